//! Catalog and OCI pulls of images and kernels.

use super::*;
use crate::error::store_kind;
use crate::vm::now_rfc3339;
use crate::{Daemon, ErrorKind};
use banger_api::images::{PullImageRequest, PullKernelRequest};
use banger_api::{ProgressSink, Step};
use banger_catalog::CatalogError;
use banger_model::{ImageRecord, KernelRecord};
use banger_store::StoreError;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Sizes of OCI root file systems are at least this (sparse): room for the
/// first-boot sshd install before the guest grows its file system.
const OCI_MIN_ROOTFS: u64 = 512 << 20;

impl Daemon {
    fn catalog_options(
        &self,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> banger_catalog::PullOptions {
        banger_catalog::PullOptions {
            progress: crate::progress::catalog(progress),
            cancel: cancel.clone(),
        }
    }

    fn catalog_cache(&self) -> PathBuf {
        self.paths.cache_dir.join("catalog")
    }

    /// Pulls image `name` from the catalog (and its kernel when it is not
    /// registered) and registers it. Errors are the catalog's, so callers can
    /// tell "unavailable" from other failures.
    pub(crate) async fn pull_catalog_image(
        self: &Arc<Self>,
        name: &str,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, CatalogError> {
        let index = banger_catalog::load_index(self.config.catalog_url.as_deref()).await?;
        let entry = index.image(name)?.clone();
        let _guard = self.image_lock.lock().await;
        if self.store.get_kernel(&entry.kernel).is_err() {
            let kentry = index.kernel(&entry.kernel)?.clone();
            progress.phase(
                Step::Kernel,
                format!("pulling kernel {} from the catalog", kentry.name),
            );
            self.pull_kernel_entry(&kentry, progress, cancel).await?;
        }
        progress.phase(
            Step::Download,
            format!(
                "pulling image {name} from {} ({} bytes)",
                entry.url, entry.size
            ),
        );
        let opts = self.catalog_options(progress, cancel);
        let pulled = match banger_catalog::pull_image(
            &entry,
            &self.catalog_cache(),
            &self.paths.images_dir,
            &opts,
        )
        .await
        {
            Ok(p) => p,
            // A pull that completed just before a crash: adopt it.
            Err(CatalogError::Exists(dir)) => {
                banger_catalog::PulledImage::open(&self.paths.images_dir, name)
                    .ok_or(CatalogError::Exists(dir))?
            }
            Err(e) => return Err(e),
        };
        let image = ImageRecord {
            name: name.to_string(),
            rootfs: pulled.rootfs,
            work_seed: pulled.work_seed,
            kernel: entry.kernel.clone(),
            managed: true,
            size_bytes: pulled.size_bytes,
            created_at: now_rfc3339(),
        };
        self.store
            .upsert_image(&image)
            .map_err(|e| CatalogError::Invalid(e.to_string()))?;
        // Snapshots of the old contents: never restorable on the new ones.
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, progress).await;
        tracing::info!(image = name, kernel = %entry.kernel, "image pulled from the catalog");
        progress.phase(Step::Done, format!("image {name} registered"));
        Ok(image)
    }

    async fn pull_kernel_entry(
        &self,
        entry: &banger_catalog::KernelEntry,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<KernelRecord, CatalogError> {
        let opts = self.catalog_options(progress, cancel);
        let pulled = match banger_catalog::pull_kernel(
            entry,
            &self.catalog_cache(),
            &self.paths.kernels_dir,
            &opts,
        )
        .await
        {
            Ok(p) => p,
            Err(CatalogError::Exists(dir)) => {
                banger_catalog::PulledKernel::open(&self.paths.kernels_dir, &entry.name)
                    .ok_or(CatalogError::Exists(dir))?
            }
            Err(e) => return Err(e),
        };
        let k = KernelRecord {
            name: entry.name.clone(),
            kernel: pulled.kernel,
            initrd: pulled.initrd,
            vmlinux: pulled.vmlinux,
            release: Some(pulled.release),
            dir: Some(pulled.dir),
            banger_initramfs: None,
            created_at: now_rfc3339(),
        };
        self.store
            .upsert_kernel(&k)
            .map_err(|e| CatalogError::Invalid(e.to_string()))?;
        tracing::info!(kernel = %k.name, "kernel pulled from the catalog");
        Ok(k)
    }

    /// `POST /v1/kernels/pull`.
    pub(crate) async fn pull_kernel(
        self: &Arc<Self>,
        name: &str,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<KernelRecord, PullError> {
        check_name("kernel", name)?;
        if self.store.get_kernel(name).is_ok() {
            return Err(NameError::KernelExists(name.to_string()).into());
        }
        let index = banger_catalog::load_index(self.config.catalog_url.as_deref()).await?;
        let entry = index.kernel(name)?.clone();
        let _guard = self.image_lock.lock().await;
        progress.phase(
            Step::Download,
            format!("pulling kernel {name} from {}", entry.url),
        );
        let k = self.pull_kernel_entry(&entry, progress, cancel).await?;
        progress.phase(Step::Done, format!("kernel {name} registered"));
        Ok(k)
    }

    /// The checks of a pull request that need nothing but the request and
    /// the store, so a bad one is answered before the stream starts;
    /// [`Daemon::pull_image`] runs them again.
    pub(crate) fn check_pull(&self, req: &PullImageRequest) -> Result<(), PullError> {
        let rule =
            |r: &banger_api::rules::StringRule, v: &str| r.check(v).map_err(PullError::Request);
        rule(&banger_api::rules::REFERENCE, &req.reference)?;
        if let Some(k) = &req.kernel_ref {
            rule(&banger_api::rules::KERNEL_NAME, k)?;
        }
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            if req.kernel_ref.is_some() {
                return Err(PullError::KernelRefForCatalog(reference.to_string()));
            }
            if req.name.as_deref().is_some_and(|n| n != reference) {
                return Err(PullError::NameForCatalog(reference.to_string()));
            }
            check_name("image", reference)?;
            return Ok(self.refuse_existing_image(reference)?);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        check_name("image", &name)?;
        banger_oci::parse_reference(reference)?;
        Ok(self.refuse_existing_image(&name)?)
    }

    /// A kernel pull, checked before its stream starts: a valid name that
    /// no kernel has yet.
    pub(crate) fn check_pull_kernel(&self, req: &PullKernelRequest) -> Result<(), PullError> {
        check_name("kernel", &req.name)?;
        match self.store.get_kernel(&req.name) {
            Ok(_) => Err(NameError::KernelExists(req.name.clone()).into()),
            Err(_) => Ok(()),
        }
    }

    /// `POST /v1/images/pull`: a catalog name or an OCI reference.
    pub(crate) async fn pull_image(
        self: &Arc<Self>,
        req: PullImageRequest,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, PullError> {
        self.check_pull(&req)?;
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            return Ok(self.pull_catalog_image(reference, progress, cancel).await?);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        let kernel = match &req.kernel_ref {
            Some(k) => self
                .store
                .get_kernel(k)
                .map_err(|_| PullError::NoKernelNamed(k.clone()))?,
            None => {
                let default = self.config.default_image_name.clone();
                progress.phase(
                    Step::Kernel,
                    format!("using the kernel of the default image {default} (choose another with --kernel-ref)"),
                );
                let img = self.ensure_image(&default, progress, cancel).await?;
                self.store.get_kernel(&img.kernel)?
            }
        };
        let _guard = self.image_lock.lock().await;
        self.refuse_existing_image(&name)?;
        let out_dir = self.paths.images_dir.join(&name);
        let opts = banger_oci::PullOptions {
            reference: reference.to_string(),
            cache_dir: self.paths.cache_dir.clone(),
            out_dir,
            payload: banger_image::GuestPayload::new(self.agent_binary()?),
            min_size: OCI_MIN_ROOTFS,
            auth: banger_oci::Credentials::DockerConfig,
            progress: Some(crate::progress::oci(progress)),
            cancel: cancel.clone(),
        };
        let pulled = banger_oci::pull_to_ext4(opts).await?;
        let image = ImageRecord {
            name: name.clone(),
            rootfs: pulled.rootfs.clone(),
            work_seed: None,
            kernel: kernel.name.clone(),
            managed: true,
            size_bytes: pulled.size_bytes,
            created_at: now_rfc3339(),
        };
        if let Err(e) = self.store.upsert_image(&image) {
            remove_dir(&pulled.dir).await;
            return Err(e.into());
        }
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, progress).await;
        tracing::info!(image = %name, reference, digest = %pulled.digest, "OCI image pulled");
        progress.phase(
            Step::Done,
            format!("image {name} registered ({})", pulled.digest),
        );
        Ok(image)
    }
}

/// Why an image or a kernel was not pulled.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Name(#[from] NameError),
    /// The reference or the kernel name breaks its rule.
    #[error("{0}")]
    Request(banger_api::rules::RuleError),
    #[error(
        "--kernel-ref is for OCI images; catalog image {0} boots the kernel its catalog entry names"
    )]
    KernelRefForCatalog(String),
    #[error("--name is for OCI images; catalog image {0} keeps its catalog name")]
    NameForCatalog(String),
    /// `--kernel-ref` names no recorded kernel.
    #[error(
        "no kernel named {0}: see `banger kernel list`, or pull one with `banger kernel pull {0}`"
    )]
    NoKernelNamed(String),
    /// The catalog refused or failed.
    #[error("{}", shown(catalog_kind(.0), .0))]
    Catalog(#[from] CatalogError),
    /// The registry or the unpacking refused or failed (boxed: it is
    /// large).
    #[error("{}", shown(oci_kind(.0), &**.0))]
    Oci(Box<banger_oci::OciError>),
    /// An OCI image boots the default image's kernel: getting that image
    /// failed.
    #[error(transparent)]
    DefaultImage(#[from] EnsureError),
    /// The guest agent to install cannot be found.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl From<banger_oci::OciError> for PullError {
    fn from(e: banger_oci::OciError) -> Self {
        PullError::Oci(Box::new(e))
    }
}

impl PullError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use PullError as E;
        match self {
            E::Name(e) => e.kind(),
            E::Request(_) | E::KernelRefForCatalog(_) | E::NameForCatalog(_) => ErrorKind::Invalid,
            E::NoKernelNamed(_) => ErrorKind::NotFound,
            E::Catalog(e) => catalog_kind(e),
            E::Oci(e) => oci_kind(e),
            E::DefaultImage(e) => e.kind(),
            E::Failed(_) => ErrorKind::Failed,
            E::Store(e) => store_kind(e),
        }
    }
}
