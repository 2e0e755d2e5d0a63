//! Catalog and OCI pulls of images and kernels.

use super::*;
use crate::vm::now_rfc3339;
use crate::{Daemon, DaemonError};
use banger_api::images::{PullImageRequest, PullKernelRequest};
use banger_api::{ProgressSink, Step};
use banger_catalog::CatalogError;
use banger_model::{ImageRecord, KernelRecord};
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
    ) -> Result<KernelRecord, DaemonError> {
        check_name("kernel", name)?;
        if self.store.get_kernel(name).is_ok() {
            return Err(DaemonError::Conflict(format!(
                "kernel {name} is already registered: delete it first (banger kernel delete {name})"
            )));
        }
        let index = banger_catalog::load_index(self.config.catalog_url.as_deref())
            .await
            .map_err(catalog_error)?;
        let entry = index.kernel(name).map_err(catalog_error)?.clone();
        let _guard = self.image_lock.lock().await;
        progress.phase(
            Step::Download,
            format!("pulling kernel {name} from {}", entry.url),
        );
        let k = self
            .pull_kernel_entry(&entry, progress, cancel)
            .await
            .map_err(catalog_error)?;
        progress.phase(Step::Done, format!("kernel {name} registered"));
        Ok(k)
    }

    /// The checks of a pull request that need nothing but the request and
    /// the store, so a bad one is answered before the stream starts;
    /// [`Daemon::pull_image`] runs them again.
    pub(crate) fn check_pull(&self, req: &PullImageRequest) -> Result<(), DaemonError> {
        let rule = |r: &banger_api::rules::StringRule, v: &str| {
            r.check(v).map_err(|e| DaemonError::Invalid(e.to_string()))
        };
        rule(&banger_api::rules::REFERENCE, &req.reference)?;
        if let Some(k) = &req.kernel_ref {
            rule(&banger_api::rules::KERNEL_NAME, k)?;
        }
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            if req.kernel_ref.is_some() {
                return Err(DaemonError::Invalid(format!(
                    "--kernel-ref is for OCI images; catalog image {reference} boots the kernel its catalog entry names"
                )));
            }
            if req.name.as_deref().is_some_and(|n| n != reference) {
                return Err(DaemonError::Invalid(format!(
                    "--name is for OCI images; catalog image {reference} keeps its catalog name"
                )));
            }
            check_name("image", reference)?;
            return self.refuse_existing_image(reference);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        check_name("image", &name)?;
        banger_oci::parse_reference(reference).map_err(oci_error)?;
        self.refuse_existing_image(&name)
    }

    /// A kernel pull, checked before its stream starts: a valid name that
    /// no kernel has yet.
    pub(crate) fn check_pull_kernel(&self, req: &PullKernelRequest) -> Result<(), DaemonError> {
        check_name("kernel", &req.name)?;
        match self.store.get_kernel(&req.name) {
            Ok(_) => Err(DaemonError::Conflict(format!(
                "kernel {} is already registered: delete it first (banger kernel delete {})",
                req.name, req.name
            ))),
            Err(_) => Ok(()),
        }
    }

    /// `POST /v1/images/pull`: a catalog name or an OCI reference.
    pub(crate) async fn pull_image(
        self: &Arc<Self>,
        req: PullImageRequest,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        self.check_pull(&req)?;
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            return self
                .pull_catalog_image(reference, progress, cancel)
                .await
                .map_err(catalog_error);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        let kernel = match &req.kernel_ref {
            Some(k) => self.store.get_kernel(k).map_err(|_| {
                DaemonError::NotFound(format!(
                    "no kernel named {k}: see `banger kernel list`, or pull one with `banger kernel pull {k}`"
                ))
            })?,
            None => {
                let default = self.config.default_image_name.clone();
                progress.phase(
                    Step::Kernel,
                    format!("using the kernel of the default image {default} (choose another with --kernel-ref)"),
                );
                let img = self
                    .ensure_image(&default, progress, cancel)
                    .await?;
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
        let pulled = banger_oci::pull_to_ext4(opts).await.map_err(oci_error)?;
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
