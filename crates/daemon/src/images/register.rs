//! Registration of local files as images, and deletion of images.

use super::*;
use crate::vm::now_rfc3339;
use crate::{Daemon, DaemonError};
use banger_api::images::RegisterImageRequest;
use banger_model::{ImageRecord, KernelRecord};
use std::sync::Arc;

impl Daemon {
    pub(crate) fn refuse_existing_image(&self, name: &str) -> Result<(), DaemonError> {
        if self.store.get_image(name).is_ok() {
            return Err(DaemonError::Conflict(format!(
                "image {name} already exists: delete it first (banger image delete {name}) or choose another name"
            )));
        }
        Ok(())
    }

    /// `POST /v1/images/register`.
    pub(crate) async fn register_image(
        &self,
        req: RegisterImageRequest,
    ) -> Result<ImageRecord, DaemonError> {
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
            return Err(DaemonError::Conflict(format!(
                "image {name} was pulled or built by banger: delete it first (banger image delete {name}) or register under another name"
            )));
        }
        let kernel = match (&req.kernel_ref, &req.kernel) {
            (Some(_), Some(_)) => {
                return Err(DaemonError::Invalid(
                    "give either --kernel-ref or --kernel, not both".into(),
                ));
            }
            (None, None) => {
                return Err(DaemonError::Invalid(
                    "give the image's kernel: --kernel-ref NAME (see banger kernel list) or --kernel PATH [--initrd PATH]".into(),
                ));
            }
            (Some(k), None) => {
                if req.initrd.is_some() {
                    return Err(DaemonError::Invalid(
                        "--initrd goes with --kernel PATH; a kernel ref has its own initrd".into(),
                    ));
                }
                self.store.get_kernel(k).map_err(|_| {
                    DaemonError::NotFound(format!(
                        "no kernel named {k}: see `banger kernel list`, or pull one with `banger kernel pull {k}`"
                    ))
                })?
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
                    return Err(DaemonError::Conflict(format!(
                        "kernel {name} was pulled or built by banger: register the image under another name, or use --kernel-ref {name}"
                    )));
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
        self.store.get_image(name).map_err(Into::into)
    }

    /// `DELETE /v1/images/{image}`. Managed images lose their directory,
    /// unmanaged ones only their record. VMs boot from overlays of the
    /// image, so they cannot outlive it: without `force` an image with VMs
    /// is refused, with `force` its VMs are deleted first.
    pub(crate) async fn delete_image(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<ImageRecord, DaemonError> {
        let img = self.store.get_image(name).map_err(|_| {
            DaemonError::NotFound(format!("no image named {name}: see `banger image list`"))
        })?;
        let users: Vec<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| v.image == name)
            .map(|v| v.name.to_string())
            .collect();
        if !users.is_empty() {
            if !force {
                return Err(DaemonError::Conflict(format!(
                    "image {name} is used by VM {}: delete them first (banger vm delete {}) or pass --force to delete them with the image",
                    users.join(", "),
                    users.join(" ")
                )));
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
        self.store.delete_image(name).map_err(in_use)?;
        if img.managed
            && let Some(dir) = owned_dir(&self.paths.images_dir, &img.rootfs)
        {
            remove_dir(&dir).await;
        }
        tracing::info!(image = name, managed = img.managed, "image deleted");
        Ok(img)
    }
}
