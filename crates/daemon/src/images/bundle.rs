//! Catalog bundles of images and kernels.

use super::*;
use crate::{Daemon, ErrorKind};
use anyhow::anyhow;
use banger_api::images::{BundleRequest, BundleResult};
use banger_catalog::{CatalogError, IndexEntry};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

impl Daemon {
    /// A bundle of `image`, checked before its stream starts: the
    /// request's own rules, then the image.
    pub(crate) fn check_bundle_image(
        &self,
        image: &str,
        req: &BundleRequest,
    ) -> Result<(), BundleError> {
        check_bundle(req)?;
        self.store
            .get_image(image)
            .map(|_| ())
            .map_err(|_| Missing::Image(image.to_string()).into())
    }

    /// A bundle of `kernel`, checked before its stream starts: the
    /// request's own rules, then the kernel.
    pub(crate) fn check_bundle_kernel(
        &self,
        kernel: &str,
        req: &BundleRequest,
    ) -> Result<(), BundleError> {
        check_bundle(req)?;
        self.store
            .get_kernel(kernel)
            .map(|_| ())
            .map_err(|_| Missing::Kernel(kernel.to_string()).into())
    }

    /// `POST /v1/images/{image}/bundle`.
    pub(crate) async fn bundle_image(
        &self,
        name: &str,
        req: BundleRequest,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<BundleResult, BundleError> {
        let img = self
            .store
            .get_image(name)
            .map_err(|_| Missing::Image(name.to_string()))?;
        let out_dir = absolute_dir("output directory", &req.out_dir)?;
        let index = req
            .index
            .as_deref()
            .map(|p| absolute_dir("index file", p))
            .transpose()?;
        progress.phase(
            Step::Bundle,
            format!(
                "compressing {} into {}",
                img.rootfs.display(),
                out_dir.display()
            ),
        );
        let breq = banger_catalog::ImageBundleRequest {
            name: img.name.clone(),
            description: req.description.clone().unwrap_or_default(),
            kernel: img.kernel.clone(),
            rootfs: img.rootfs.clone(),
            work_seed: img.work_seed.clone(),
            out_dir,
            base_url: req.base_url.clone(),
        };
        let b = banger_catalog::bundle_image(&breq, cancel).await?;
        let (url, sha256, size) = (b.entry.url.clone(), b.entry.sha256.clone(), b.entry.size);
        let entry = serde_json::to_value(&b.entry).map_err(anyhow::Error::from)?;
        let hint = format!(
            "; add its kernel to that index first: banger kernel bundle {} --out DIR --base-url URL --index FILE",
            img.kernel
        );
        finish_bundle(
            "image",
            name,
            b.path,
            IndexEntry::Image(b.entry),
            entry,
            url,
            sha256,
            size,
            index,
            &hint,
        )
        .await
    }

    /// `POST /v1/kernels/{kernel}/bundle`.
    pub(crate) async fn bundle_kernel(
        &self,
        name: &str,
        req: BundleRequest,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<BundleResult, BundleError> {
        let k = self.get_kernel(name)?;
        let out_dir = absolute_dir("output directory", &req.out_dir)?;
        let index = req
            .index
            .as_deref()
            .map(|p| absolute_dir("index file", p))
            .transpose()?;
        let release = k
            .release
            .clone()
            .or_else(|| bzimage_release(&k.kernel))
            .ok_or_else(|| BundleError::NoRelease {
                name: name.to_string(),
                kernel: k.kernel.clone(),
            })?;
        let beside = |file: &str| {
            k.kernel
                .parent()
                .map(|d| d.join(file))
                .filter(|p| p.is_file())
        };
        progress.phase(
            Step::Bundle,
            format!("compressing kernel {name} into {}", out_dir.display()),
        );
        let breq = banger_catalog::KernelBundleRequest {
            name: k.name.clone(),
            description: req.description.clone().unwrap_or_default(),
            release,
            kernel: k.kernel.clone(),
            initrd: k.initrd.clone(),
            vmlinux: k.vmlinux.clone(),
            modules: beside(banger_catalog::MODULES_FILE),
            config: beside(banger_catalog::CONFIG_FILE),
            out_dir,
            base_url: req.base_url.clone(),
        };
        let b = banger_catalog::bundle_kernel(&breq, cancel).await?;
        let (url, sha256, size) = (b.entry.url.clone(), b.entry.sha256.clone(), b.entry.size);
        let entry = serde_json::to_value(&b.entry).map_err(anyhow::Error::from)?;
        finish_bundle(
            "kernel",
            name,
            b.path,
            IndexEntry::Kernel(b.entry),
            entry,
            url,
            sha256,
            size,
            index,
            "",
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish_bundle(
    kind: &str,
    name: &str,
    path: PathBuf,
    index_entry: IndexEntry,
    entry: serde_json::Value,
    url: String,
    sha256: String,
    size: u64,
    index: Option<PathBuf>,
    hint: &str,
) -> Result<BundleResult, BundleError> {
    if let Some(ix) = &index {
        let ix = ix.clone();
        tokio::task::spawn_blocking(move || {
            banger_catalog::merge_into_index_file(&ix, &[index_entry])
        })
        .await
        .map_err(|e| BundleError::Failed(anyhow!("index update: {e}")))?
        .map_err(|e| match e {
            CatalogError::BadIndex { .. } => BundleError::BadIndex {
                error: e,
                hint: hint.to_string(),
            },
            other => BundleError::Catalog(other),
        })?;
    }
    Ok(BundleResult {
        kind: kind.to_string(),
        name: name.to_string(),
        path: path.display().to_string(),
        url,
        sha256,
        size,
        entry,
        index: index.map(|p| p.display().to_string()),
    })
}

/// The request's own rules, checked before the stream starts.
fn check_bundle(req: &BundleRequest) -> Result<(), BundleError> {
    use banger_api::rules::{BASE_URL, HOST_PATH};
    let paths = [Some(&req.out_dir), req.index.as_ref()];
    paths
        .into_iter()
        .flatten()
        .try_for_each(|p| HOST_PATH.check(p))
        .and_then(|()| BASE_URL.check(&req.base_url))
        .map_err(BundleError::Request)
}

/// Why a catalog bundle was not written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A path or the base URL breaks its rule.
    #[error("{0}")]
    Request(banger_api::rules::RuleError),
    #[error(transparent)]
    Missing(#[from] Missing),
    /// An output or index path is not absolute.
    #[error(transparent)]
    Path(#[from] FileError),
    /// A catalog kernel entry needs its release.
    #[error(
        "kernel {name}: its release is unknown and {} has no version string; it cannot be published",
        .kernel.display()
    )]
    NoRelease { name: String, kernel: PathBuf },
    /// Writing the bundle failed (or was refused).
    #[error("{}", shown(catalog_kind(.0), .0))]
    Catalog(#[from] CatalogError),
    /// The index file to add the entry to is not valid; `hint` says what
    /// else it needs.
    #[error("{error}{hint}")]
    BadIndex { error: CatalogError, hint: String },
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl BundleError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use BundleError as E;
        match self {
            E::Request(_) | E::NoRelease { .. } | E::BadIndex { .. } => ErrorKind::Invalid,
            E::Missing(e) => e.kind(),
            E::Path(e) => e.kind(),
            E::Catalog(e) => catalog_kind(e),
            E::Failed(_) => ErrorKind::Failed,
        }
    }
}
