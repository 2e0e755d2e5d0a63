//! Registration of local files as images, and deletion of images.

use super::*;
use crate::error::{Chain, store_kind};
use crate::vm::DeleteError;
use crate::vm::now_rfc3339;
use crate::{Daemon, ErrorKind};
use banger_api::images::RegisterImageRequest;
use banger_model::{ImageRecord, KernelRecord};
use banger_store::StoreError;
use std::sync::Arc;

impl Daemon {
    /// Refuses a name an image has already.
    pub(crate) fn refuse_existing_image(&self, name: &str) -> Result<(), NameError> {
        if self.store.get_image(name).is_ok() {
            return Err(NameError::ImageExists(name.to_string()));
        }
        Ok(())
    }

    /// `POST /v1/images/register`.
    pub(crate) async fn register_image(
        &self,
        req: RegisterImageRequest,
    ) -> Result<ImageRecord, RegisterError> {
        let name = req.name.as_str();
        check_name("image", name)?;
        let rootfs = regular_file("rootfs", &req.rootfs)?;
        let work_seed = req
            .work_seed
            .as_deref()
            .map(|p| regular_file("work seed", p))
            .transpose()?;
        let _guard = self.image_lock.lock().await;
        let old = self.store.get_image(name).ok();
        if let Some(old) = &old
            && old.managed
        {
            return Err(RegisterError::ManagedImage(name.to_string()));
        }
        let kernel = match (&req.kernel_ref, &req.kernel) {
            (Some(_), Some(_)) => {
                return Err(RegisterError::TwoKernels);
            }
            (None, None) => {
                return Err(RegisterError::NoKernel);
            }
            (Some(k), None) => {
                if req.initrd.is_some() {
                    return Err(RegisterError::InitrdWithRef);
                }
                self.store
                    .get_kernel(k)
                    .map_err(|_| RegisterError::NoKernelNamed(k.clone()))?
            }
            (None, Some(kpath)) => {
                let kernel = regular_file("kernel", kpath)?;
                let initrd = req
                    .initrd
                    .as_deref()
                    .map(|p| regular_file("initrd", p))
                    .transpose()?;
                let existing = self.store.get_kernel(name).ok();
                if existing.as_ref().is_some_and(KernelRecord::is_managed) {
                    return Err(RegisterError::ManagedKernel(name.to_string()));
                }
                let (vmlinux, dir) = self.registered_vmlinux(name, &kernel).await?;
                let k = KernelRecord {
                    name: name.to_string(),
                    release: bzimage_release(&kernel),
                    kernel,
                    initrd,
                    vmlinux,
                    dir,
                    banger_initramfs: None,
                    created_at: now_rfc3339(),
                };
                if let Err(e) = self.store.upsert_kernel(&k) {
                    if let Some(d) = &k.dir {
                        remove_dir(d).await;
                    }
                    return Err(e.into());
                }
                // The vmlinux of the kernel this registration replaces.
                if let Some(old_dir) = existing.and_then(|e| e.dir)
                    && Some(&old_dir) != k.dir.as_ref()
                {
                    self.remove_kernel_dir(&old_dir).await;
                }
                k
            }
        };
        let size_bytes = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
        let image = ImageRecord {
            name: name.to_string(),
            rootfs,
            work_seed,
            kernel: kernel.name.clone(),
            managed: false,
            size_bytes,
            created_at: now_rfc3339(),
        };
        self.store.upsert_image(&image)?;
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, &banger_api::ProgressSink::discard())
            .await;
        // A kernel registered with an earlier --kernel and no longer used goes too.
        if let Some(old) = old
            && old.kernel == name
            && image.kernel != name
        {
            let _ = self.store.delete_kernel(name);
        }
        tracing::info!(image = name, kernel = %image.kernel, "image registered");
        Ok(self.store.get_image(name)?)
    }

    /// `DELETE /v1/images/{image}`. Managed images lose their directory,
    /// unmanaged ones only their record. VMs boot from overlays of the
    /// image, so they cannot outlive it: without `force` an image with VMs
    /// is refused, with `force` its VMs are deleted first.
    pub(crate) async fn delete_image(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<ImageRecord, DeleteImageError> {
        let img = self
            .store
            .get_image(name)
            .map_err(|_| DeleteImageError::NoImage(name.to_string()))?;
        self.cancel_background_builds(name).await;
        let users: Vec<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| v.image == name)
            .map(|v| v.name.to_string())
            .collect();
        if !users.is_empty() {
            if !force {
                return Err(DeleteImageError::Used {
                    name: name.to_string(),
                    vms: users,
                });
            }
            for vm in &users {
                tracing::info!(image = name, vm = %vm, "deleting VM with its image (--force)");
                self.delete_vm(vm).await?;
            }
        }
        let _guard = self.image_lock.lock().await;
        {
            // A template build in progress would save a template of a
            // deleted image: wait for it, then remove them all.
            let _build = self.template_build.lock().await;
            self.remove_image_templates(name);
        }
        self.store.delete_image(name)?;
        if img.managed
            && let Some(dir) = owned_dir(&self.paths.images_dir, &img.rootfs)
        {
            remove_dir(&dir).await;
        }
        tracing::info!(image = name, managed = img.managed, "image deleted");
        Ok(img)
    }
}

/// Why `image register` recorded nothing.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// An image of this name was pulled or built by banger.
    #[error(
        "image {0} was pulled or built by banger: delete it first (banger image delete {0}) or register under another name"
    )]
    ManagedImage(String),
    #[error("give either --kernel-ref or --kernel, not both")]
    TwoKernels,
    #[error(
        "give the image's kernel: --kernel-ref NAME (see banger kernel list) or --kernel PATH [--initrd PATH]"
    )]
    NoKernel,
    #[error("--initrd goes with --kernel PATH; a kernel ref has its own initrd")]
    InitrdWithRef,
    /// `--kernel-ref` names no recorded kernel.
    #[error(
        "no kernel named {0}: see `banger kernel list`, or pull one with `banger kernel pull {0}`"
    )]
    NoKernelNamed(String),
    /// A kernel of the image's name was pulled or built by banger.
    #[error(
        "kernel {0} was pulled or built by banger: register the image under another name, or use --kernel-ref {0}"
    )]
    ManagedKernel(String),
    #[error(transparent)]
    Name(#[from] NameError),
    /// The kernel file yields no vmlinux Firecracker can boot.
    #[error(
        "kernel {} cannot be booted by Firecracker: {why}; give a bzImage compressed with gzip, xz, zstd, lz4 or lzma, or its uncompressed ELF vmlinux",
        .kernel.display()
    )]
    KernelUnusable { kernel: PathBuf, why: String },
    /// Making the kernel's directory or extracting its vmlinux failed.
    #[error("{0:#}")]
    Vmlinux(anyhow::Error),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl RegisterError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use RegisterError as E;
        match self {
            E::ManagedImage(_) | E::ManagedKernel(_) | E::KernelUnusable { .. } => {
                ErrorKind::Conflict
            }
            E::TwoKernels | E::NoKernel | E::InitrdWithRef => ErrorKind::Invalid,
            E::NoKernelNamed(_) => ErrorKind::NotFound,
            E::Name(e) => e.kind(),
            E::Vmlinux(_) => ErrorKind::Failed,
            E::File(e) => e.kind(),
            E::Store(e) => store_kind(e),
        }
    }
}

/// Why an image was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteImageError {
    #[error("no image named {0}: see `banger image list`")]
    NoImage(String),
    /// VMs boot from the image and `--force` was not given.
    #[error(
        "image {name} is used by VM {}: delete them first (banger vm delete {}) or pass --force to delete them with the image",
        .vms.join(", "),
        .vms.join(" ")
    )]
    Used { name: String, vms: Vec<String> },
    /// Deleting one of its VMs (`--force`) failed.
    #[error(transparent)]
    DeleteVm(#[from] DeleteError),
    /// The store failed, or refused: the image is still in use.
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl DeleteImageError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeleteImageError::NoImage(_) => ErrorKind::NotFound,
            DeleteImageError::Used { .. } | DeleteImageError::Store(StoreError::InUse { .. }) => {
                ErrorKind::Conflict
            }
            DeleteImageError::DeleteVm(e) => e.kind(),
            DeleteImageError::Store(e) => store_kind(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};
    use banger_model::VmState;

    #[test]
    fn register_and_file_errors_keep_todays_text() {
        let e = RegisterError::NoKernelNamed("k1".into());
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "no kernel named k1: see `banger kernel list`, or pull one with `banger kernel pull k1`"
        );
        assert_eq!(RegisterError::TwoKernels.kind(), ErrorKind::Invalid);
        let e = RegisterError::ManagedImage("img".into());
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "image img was pulled or built by banger: delete it first (banger image delete img) or register under another name"
        );
        let e = regular_file("rootfs", "rel/path").expect_err("relative");
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            "rootfs \"rel/path\" must be an absolute path"
        );
        let e = regular_file("kernel", "/no/such/file").expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "kernel /no/such/file does not exist");
        let e = regular_file("rootfs", "/").expect_err("a directory");
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Conflict, "rootfs / is not a regular file")
        );
    }

    #[tokio::test]
    async fn an_image_with_vms_is_refused_naming_them() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        record(&d, "calm-otter", VmState::Stopped);
        record(&d, "bold-heron", VmState::Stopped);
        let e = d.delete_image("img", false).await.expect_err("in use");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        let msg = e.to_string();
        assert!(
            msg.starts_with("image img is used by VM ")
                && msg.ends_with(") or pass --force to delete them with the image")
                && msg.contains("calm-otter")
                && msg.contains("bold-heron"),
            "{msg}"
        );
        let e = d.delete_image("nope", false).await.expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "no image named nope: see `banger image list`"
        );
        assert_eq!(crate::DaemonError::from(e).kind(), ErrorKind::NotFound);
    }
}
