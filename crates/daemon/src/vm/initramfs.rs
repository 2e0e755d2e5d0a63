//! How VMs boot: banger's own initramfs (the agent as `/init`, ready as
//! soon as the root is assembled) or the distribution's, and what the
//! daemon knows of each VM's boot.
//!
//! A kernel gets the modules part of banger's initramfs
//! ([`banger_image::initramfs`]) from the first image that boots it and
//! holds its modules (`/lib/modules/<release>` in its root file system):
//! when that image is built, pulled or registered, or, for kernels from
//! before, at the first boot that may use it. Each boot then adds the
//! daemon's own agent, so a VM always runs the agent of this banger.

use crate::vm::AgentError;
use crate::{Daemon, ErrorKind};
use anyhow::{Context, anyhow};
use banger_agent_proto::client::ClientError;
use banger_api::{ProgressSink, VmBoot};
use banger_image::initramfs::{Ext4Source, InitramfsError, MODULES_CPIO_FILE};
use banger_model::{ImageRecord, InitramfsMode, KernelRecord, VmId, VmName, VmRecord};
use std::path::{Path, PathBuf};

/// File name of a boot's initramfs in the VM's directory (removed once the
/// VMM has read it).
pub(crate) const BOOT_INITRD_FILE: &str = "initrd.img";

/// Which initramfs a boot used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BootInitrd {
    Banger,
    Distro,
    None,
}

impl BootInitrd {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BootInitrd::Banger => "banger",
            BootInitrd::Distro => "distro",
            BootInitrd::None => "none",
        }
    }
}

/// What the daemon recorded of a VM's last boot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BootFacts {
    pub(crate) initrd: BootInitrd,
    /// Guest uptime at the agent's hello.
    pub(crate) hello_ms: u64,
    /// How its TAP was got (bridge networking).
    pub(crate) tap: Option<banger_api::TapAcquisition>,
}

impl Daemon {
    /// The kernel `kernel_name` with the modules part of banger's
    /// initramfs, made from `image`'s modules when it has none yet.
    /// `Ok(None)`: the image has no modules for that kernel.
    pub(crate) async fn ensure_kernel_initramfs(
        &self,
        kernel_name: &str,
        image: &ImageRecord,
    ) -> anyhow::Result<Option<KernelRecord>> {
        let _guard = self.initramfs_lock.lock().await;
        let mut k = self.store.get_kernel(kernel_name)?;
        if k.banger_initramfs.as_deref().is_some_and(Path::is_file) {
            return Ok(Some(k));
        }
        let release = k
            .release
            .clone()
            .or_else(|| crate::images::bzimage_release(&k.kernel))
            .ok_or_else(|| {
                anyhow!(
                    "kernel {kernel_name}: its release is unknown, so its modules cannot be found"
                )
            })?;
        let (dir, made) = match &k.dir {
            Some(d) if d.is_dir() => (d.clone(), false),
            _ => (
                crate::images::new_kernel_dir(&self.paths.kernels_dir, kernel_name).with_context(
                    || {
                        format!(
                            "creating a directory for kernel {kernel_name} in {}",
                            self.paths.kernels_dir.display()
                        )
                    },
                )?,
                true,
            ),
        };
        let out = dir.join(MODULES_CPIO_FILE);
        let (rootfs, rel, to) = (image.rootfs.clone(), release.clone(), out.clone());
        let built = tokio::task::spawn_blocking(move || {
            let src = Ext4Source::new(&rootfs, &rel)?;
            banger_image::initramfs::build_modules_cpio(&src, &rel, &to)
        })
        .await
        .map_err(|e| anyhow!("initramfs worker: {e}"))?;
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                if made {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                }
                return match e {
                    InitramfsError::NoModules { .. } => Ok(None),
                    other => Err(other.into()),
                };
            }
        };
        k.dir = Some(dir);
        k.banger_initramfs = Some(out);
        self.store.upsert_kernel(&k)?;
        tracing::info!(
            kernel = kernel_name,
            image = %image.name,
            modules = built.modules.len(),
            built_in = ?built.builtin,
            "made the kernel's part of banger's initramfs"
        );
        Ok(Some(k))
    }

    /// After an image was built, pulled or registered: gives its kernel
    /// banger's initramfs from the image's modules when it has none. Never
    /// fails the operation; says what happened.
    pub(crate) async fn offer_kernel_modules(&self, image: &ImageRecord, progress: &ProgressSink) {
        match self.ensure_kernel_initramfs(&image.kernel, image).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!(image = %image.name, kernel = %image.kernel, "image has no modules for its kernel")
            }
            Err(e) => {
                let msg = format!(
                    "kernel {} gets no banger initramfs from image {}: {e:#}; its VMs boot with the distribution's initramfs",
                    image.kernel, image.name
                );
                tracing::warn!("{msg}");
                progress.warn(msg);
            }
        }
    }

    /// The initrd of `vm`'s next boot and which one it is. banger's own is
    /// written to the VM's directory; the caller removes it once the VMM
    /// has read it.
    pub(crate) async fn boot_initrd(
        &self,
        vm: &VmRecord,
        kernel: &KernelRecord,
        image: &ImageRecord,
    ) -> anyhow::Result<(Option<PathBuf>, BootInitrd)> {
        let distro = || match &kernel.initrd {
            Some(i) => (Some(i.clone()), BootInitrd::Distro),
            None => (None, BootInitrd::None),
        };
        let modules = match vm.initramfs {
            InitramfsMode::Distro => return Ok(distro()),
            InitramfsMode::Banger => {
                match self.ensure_kernel_initramfs(&kernel.name, image).await {
                    Ok(Some(k)) => k.banger_initramfs,
                    Ok(None) => {
                        return Err(anyhow!(
                            "kernel {} has no banger initramfs: image {} has no modules for it (no /lib/modules/{}); boot with --initramfs distro",
                            kernel.name,
                            image.name,
                            kernel.release.as_deref().unwrap_or("<release>")
                        ));
                    }
                    Err(e) => {
                        return Err(anyhow!(
                            "kernel {} has no banger initramfs: {e:#}; boot with --initramfs distro",
                            kernel.name
                        ));
                    }
                }
            }
            InitramfsMode::Auto => {
                if let Some(p) = kernel.banger_initramfs.as_ref().filter(|p| p.is_file()) {
                    Some(p.clone())
                } else if self.first_try(&kernel.name) {
                    // A kernel from before banger made initramfs: once per
                    // daemon, from the image being booted.
                    match self.ensure_kernel_initramfs(&kernel.name, image).await {
                        Ok(k) => k.and_then(|k| k.banger_initramfs),
                        Err(e) => {
                            tracing::info!(kernel = %kernel.name, error = %format!("{e:#}"), "no banger initramfs; booting the distribution's");
                            None
                        }
                    }
                } else {
                    None
                }
            }
        };
        let Some(modules) = modules else {
            return Ok(distro());
        };
        let agent = self.agent_binary()?;
        let out = vm.dir.join(BOOT_INITRD_FILE);
        let to = out.clone();
        tokio::task::spawn_blocking(move || {
            banger_image::initramfs::assemble(&agent, &modules, &to)
        })
        .await
        .map_err(|e| anyhow!("initramfs worker: {e}"))?
        .context("writing the VM's initramfs")?;
        Ok((Some(out), BootInitrd::Banger))
    }

    /// True the first time this daemon asks for `kernel`.
    fn first_try(&self, kernel: &str) -> bool {
        self.initramfs_tried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kernel.to_string())
    }

    pub(crate) fn set_boot_facts(&self, id: &VmId, facts: Option<BootFacts>) {
        match facts {
            Some(f) => self.vms.handle(id).set_boot_facts(Some(f)),
            None => {
                if let Some(h) = self.vms.existing(id) {
                    h.set_boot_facts(None);
                }
            }
        }
    }

    pub(crate) fn boot_facts(&self, id: &VmId) -> Option<BootFacts> {
        self.vms.existing(id)?.boot_facts()
    }

    /// `GET /v1/vms/{vm}/boot`.
    pub async fn vm_boot(&self, r: &str) -> Result<VmBoot, BootInfoError> {
        let (vm, agent) = self.running_agent(r)?;
        let report = agent
            .boot_status(false)
            .await
            .map_err(|error| BootInfoError::Ask {
                name: vm.name.clone(),
                error,
            })?;
        let facts = self.boot_facts(&vm.id);
        let ready = facts.map(|f| f.hello_ms);
        Ok(VmBoot {
            name: vm.name.to_string(),
            initramfs: facts.map(|f| f.initrd.as_str().to_string()),
            kernel_init_ms: report.kernel_init_ms,
            agent_ready_ms: ready,
            ready_over_kernel_init: match (ready, report.kernel_init_ms) {
                (Some(r), Some(k)) if k > 0 => Some(r as f64 / k as f64),
                _ => None,
            },
            agent_start: report.agent.as_str().to_string(),
            booting: report.system.is_booting(),
            system: report.system.describe().to_string(),
            tap: facts.and_then(|f| f.tap),
        })
    }
}

/// Why `GET /v1/vms/{vm}/boot` did not answer.
#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The agent did not answer.
    #[error("asking VM {name}'s agent: {error}")]
    Ask { name: VmName, error: ClientError },
}

impl BootInfoError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BootInfoError::Agent(e) => e.kind(),
            BootInfoError::Ask { .. } => ErrorKind::Failed,
        }
    }
}
