//! Kernels registered from local files: their vmlinux and directories, lookup and deletion.

use super::*;
use crate::error::{Chain, store_kind};
use crate::{Daemon, ErrorKind};
use anyhow::anyhow;
use banger_model::KernelRecord;
use banger_store::StoreError;
use std::path::{Path, PathBuf};

impl Daemon {
    /// The vmlinux Firecracker boots for a kernel registered from `kernel`
    /// (a user's file), and the directory banger made for it: an ELF is
    /// used as it is; a bzImage's vmlinux is extracted into a new
    /// directory of the kernel store. A kernel that yields no vmlinux is
    /// refused, and nothing is left behind.
    pub(super) async fn registered_vmlinux(
        &self,
        name: &str,
        kernel: &Path,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>), RegisterError> {
        // What the file holds, not the request's shape.
        let unusable = |why: String| RegisterError::KernelUnusable {
            kernel: kernel.to_path_buf(),
            why,
        };
        if banger_image::vmlinux::is_elf(kernel).map_err(|e| unusable(e.to_string()))? {
            return Ok((Some(kernel.to_path_buf()), None));
        }
        let dir = new_kernel_dir(&self.paths.kernels_dir, name).map_err(|e| {
            RegisterError::Vmlinux(anyhow!(
                "creating a directory for kernel {name}'s vmlinux in {}: {e}",
                self.paths.kernels_dir.display()
            ))
        })?;
        let dest = dir.join(banger_image::vmlinux::VMLINUX_FILE);
        let (src, to) = (kernel.to_path_buf(), dest.clone());
        let extracted = tokio::task::spawn_blocking(move || {
            banger_image::vmlinux::extract_vmlinux_file(&src, &to)
        })
        .await;
        match extracted {
            Ok(Ok(compression)) => {
                tracing::info!(kernel = name, %compression, vmlinux = %dest.display(), "extracted vmlinux");
                Ok((Some(dest), Some(dir)))
            }
            Ok(Err(e)) => {
                remove_dir(&dir).await;
                Err(unusable(e.to_string()))
            }
            Err(e) => {
                remove_dir(&dir).await;
                Err(RegisterError::Vmlinux(anyhow!(
                    "extracting the vmlinux of kernel {name}: {e}"
                )))
            }
        }
    }

    /// Removes a kernel directory banger recorded as its own, but only one
    /// directly in the kernel store (a record is never a licence to delete
    /// anything else).
    pub(super) async fn remove_kernel_dir(&self, dir: &Path) {
        if dir.parent() == Some(self.paths.kernels_dir.as_path()) {
            remove_dir(dir).await;
        } else {
            tracing::warn!(dir = %dir.display(), "kernel directory outside the kernel store left alone");
        }
    }

    /// Records the directories of kernels pulled or built before kernel
    /// records carried them (`kernels/<name>/`, made by banger under the
    /// record's own name).
    pub(crate) fn record_legacy_kernel_dirs(&self) -> Result<(), StoreError> {
        for mut k in self.store.list_kernels()? {
            let own = self.paths.kernels_dir.join(&k.name);
            if k.dir.is_none() && k.kernel.parent() == Some(own.as_path()) {
                k.dir = Some(own);
                self.store.upsert_kernel(&k)?;
            }
        }
        Ok(())
    }

    pub(crate) fn get_kernel(&self, name: &str) -> Result<KernelRecord, Missing> {
        self.store
            .get_kernel(name)
            .map_err(|_| Missing::Kernel(name.to_string()))
    }

    /// `DELETE /v1/kernels/{kernel}`: refused while images use it; a kernel
    /// in the daemon's kernel store loses its directory.
    pub(crate) async fn delete_kernel(
        &self,
        name: &str,
    ) -> Result<KernelRecord, DeleteKernelError> {
        let k = self
            .store
            .get_kernel(name)
            .map_err(|_| DeleteKernelError::NoKernel(name.to_string()))?;
        let _guard = self.image_lock.lock().await;
        self.store.delete_kernel(name).map_err(|e| match e {
            StoreError::InUse { what, users } => DeleteKernelError::Used { what, users },
            other => DeleteKernelError::Store(other),
        })?;
        if let Some(dir) = &k.dir {
            self.remove_kernel_dir(dir).await;
        }
        tracing::info!(kernel = name, "kernel deleted");
        Ok(k)
    }
}

/// Why a kernel was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteKernelError {
    #[error("no kernel named {0}: see `banger kernel list`")]
    NoKernel(String),
    /// Images boot it: `what` is the kernel, `users` the images.
    #[error(
        "{what} is in use by {}: delete {} first (banger image delete NAME), or register them with another kernel",
        .users.join(", "),
        those_images(.users)
    )]
    Used { what: String, users: Vec<String> },
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

fn those_images(users: &[String]) -> &'static str {
    if users.len() == 1 {
        "that image"
    } else {
        "those images"
    }
}

impl DeleteKernelError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeleteKernelError::NoKernel(_) => ErrorKind::NotFound,
            DeleteKernelError::Used { .. } => ErrorKind::Conflict,
            DeleteKernelError::Store(e) => store_kind(e),
        }
    }
}

#[cfg(test)]
mod delete_tests {
    use super::*;

    #[test]
    fn a_used_kernel_says_which_images_as_the_store_does() {
        for users in [
            vec!["image a".to_string()],
            vec!["image a".into(), "image b".into()],
        ] {
            let store = StoreError::InUse {
                what: "kernel k".into(),
                users: users.clone(),
            };
            let word = if users.len() == 1 {
                "that image"
            } else {
                "those images"
            };
            let want = format!(
                "{store}: delete {word} first (banger image delete NAME), or register them with another kernel"
            );
            let e = DeleteKernelError::Used {
                what: "kernel k".into(),
                users,
            };
            assert_eq!(e.to_string(), want);
            assert_eq!(e.kind(), ErrorKind::Conflict);
        }
        let e = DeleteKernelError::NoKernel("k".into());
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (
                ErrorKind::NotFound,
                "no kernel named k: see `banger kernel list`"
            )
        );
    }
}
