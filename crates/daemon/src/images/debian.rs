//! The local Debian build.

use super::{DeriveError, NameError};
use crate::error::{Chain, store_kind};
use crate::vm::now_rfc3339;
use crate::{Daemon, ErrorKind};
use anyhow::Context;
use banger_api::{ProgressSink, Step};
use banger_image::{DebianBuild, GuestPayload};
use banger_model::{ImageRecord, KernelRecord};
use banger_store::StoreError;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Daemon {
    /// Builds (or finds, if already built) a Debian image with
    /// `extra_packages` on top of the base set and registers it.
    pub async fn build_debian_image(
        self: &Arc<Self>,
        name: &str,
        suite: &str,
        extra_packages: Vec<String>,
        progress: &ProgressSink,
        cancel: CancellationToken,
    ) -> Result<ImageRecord, BuildError> {
        banger_model::VmName::parse(name).map_err(|_| BuildError::NotDnsLabel(name.to_string()))?;
        let _guard = self.image_lock.lock().await;
        if let Ok(img) = self.store.get_image(name) {
            return Ok(img);
        }
        let spec = DebianBuild {
            name: name.to_string(),
            suite: suite.to_string(),
            mirror: self.config.debian_mirror.clone(),
            extra_packages,
            payload: GuestPayload::new(self.agent_binary()?),
            images_dir: self.paths.images_dir.clone(),
            kernels_dir: self.paths.kernels_dir.clone(),
        };
        let root = nix::unistd::geteuid().is_root();
        let helper = if root {
            None
        } else {
            crate::net::system_helper().await
        };
        let built = match build_via(root, helper) {
            BuildVia::InProcess => {
                // The tools' whole output, for when a build fails.
                let log_path = self.paths.state_dir.join(format!("image-build-{name}.log"));
                let log = std::sync::Mutex::new(
                    std::fs::File::create(&log_path)
                        .with_context(|| format!("creating {}", log_path.display()))?,
                );
                banger_image::build_debian(
                    &spec,
                    |p| {
                        if let Some(line) = crate::progress::image_build(progress, p) {
                            use std::io::Write;
                            if let Ok(mut f) = log.lock() {
                                let _ = writeln!(f, "{line}");
                            }
                        }
                    },
                    cancel,
                )
                .await
                .with_context(|| {
                    format!(
                        "building image {name} (the build's output: {})",
                        log_path.display()
                    )
                })?
            }
            BuildVia::Helper(helper) => {
                progress.phase(
                    Step::Image,
                    format!(
                        "building {name} through the root helper (progress: journalctl -u bangerd-root)"
                    ),
                );
                tokio::select! {
                    r = helper.build_debian_image(name, suite) => {
                        r.with_context(|| format!("building image {name}"))?
                    }
                    _ = cancel.cancelled() => {
                        return Err(BuildError::Failed(anyhow::anyhow!(
                            "building image {name}: cancelled (the root helper finishes the build in the background)"
                        )));
                    }
                }
            }
        };
        let kernel = KernelRecord {
            name: built.kernel_name.clone(),
            kernel: built.kernel.clone(),
            initrd: Some(built.initrd.clone()),
            vmlinux: built.vmlinux.clone(),
            release: Some(built.kernel_release.clone()),
            dir: Some(self.paths.kernels_dir.join(&built.kernel_name)),
            // Another image of the same kernel may have made it already.
            banger_initramfs: self
                .store
                .get_kernel(&built.kernel_name)
                .ok()
                .and_then(|k| k.banger_initramfs),
            created_at: now_rfc3339(),
        };
        self.store.upsert_kernel(&kernel)?;
        let image = ImageRecord {
            name: name.to_string(),
            rootfs: built.rootfs.clone(),
            work_seed: Some(built.work_seed.clone()),
            kernel: kernel.name.clone(),
            managed: true,
            size_bytes: built.size_bytes,
            created_at: now_rfc3339(),
        };
        self.store.upsert_image(&image)?;
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, progress).await;
        tracing::info!(image = name, kernel = %kernel.name, "image registered");
        Ok(image)
    }
}

/// Why an image was not built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A Debian image's name becomes its kernel's and VM names.
    #[error("image name {0:?} must be a DNS label (a-z, 0-9, -)")]
    NotDnsLabel(String),
    #[error("--suite is for local Debian builds; a derived image keeps its base image's suite")]
    SuiteWithBase,
    #[error(transparent)]
    Name(#[from] NameError),
    /// The derived build (`--from-image`) failed.
    #[error(transparent)]
    Derive(Box<DeriveError>),
    /// The build itself failed or was cancelled; the message names its log.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl From<DeriveError> for BuildError {
    fn from(e: DeriveError) -> Self {
        BuildError::Derive(Box::new(e))
    }
}

impl BuildError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BuildError::NotDnsLabel(_) | BuildError::SuiteWithBase => ErrorKind::Invalid,
            BuildError::Name(e) => e.kind(),
            BuildError::Derive(e) => e.kind(),
            BuildError::Failed(_) => ErrorKind::Failed,
            BuildError::Store(e) => store_kind(e),
        }
    }
}

/// Who builds a Debian image.
#[derive(Debug)]
enum BuildVia {
    /// This process: it is root, or there is nobody else to ask (the build
    /// then fails with its "needs root" error).
    InProcess,
    /// The root helper of the system install this daemon runs in.
    Helper(banger_root_client::HelperClient),
}

fn build_via(root: bool, helper: Option<banger_root_client::HelperClient>) -> BuildVia {
    match helper {
        Some(h) if !root => BuildVia::Helper(h),
        _ => BuildVia::InProcess,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unprivileged_daemon_builds_through_its_helper() {
        let h = || {
            Some(banger_root_client::HelperClient::new(
                "/run/banger-root/helper.sock",
            ))
        };
        assert!(matches!(build_via(false, h()), BuildVia::Helper(_)));
        assert!(matches!(build_via(true, h()), BuildVia::InProcess));
        assert!(matches!(build_via(true, None), BuildVia::InProcess));
        assert!(matches!(build_via(false, None), BuildVia::InProcess));
    }
}
