//! `image build --from-image`: a derived image made in a transient VM.
//!
//! How the VM's writes become the new image: the transient VM does not boot
//! the base image under an overlay. It boots a private, writable copy of the
//! base's root file system (grown for the packages to come) with no overlay
//! at all, so every write lands directly in that ext4 file; once the guest
//! has powered off cleanly, the file *is* the new image's root file system,
//! with nothing to flatten (no overlay upper dir, whiteouts or copy-up to
//! replay). Its `/root` work disk, a copy of the base's work seed mounted on
//! `/root` by the first provisioning step, becomes the new work seed.
//!
//! The VM is named `image-build-<name>` and exists only while the build
//! runs: it is deleted whether the build succeeds or fails, and the image is
//! registered only after everything else worked, so a failed build leaves
//! neither a VM nor an image behind.

mod guest;
mod publish;

use crate::error::{Chain, NoBackend, store_kind};
use crate::images::{EnsureError, NameError, check_name};
use crate::vm::admit::NewVm;
use crate::vm::power::{Ask, PowerOff};
use crate::vm::{
    BootCtx, BootError, CreateError, DeleteError, LookupError, WRITABLE_ROOT_WORK_DEVICE,
    console_tail, now_rfc3339,
};
use crate::{Daemon, ErrorKind};
use anyhow::{Context, anyhow};
use banger_api::{ProgressSink, Step};
use banger_config::{HostResources, apply_flags, effective_defaults};
use banger_image::derive::{DeriveOptions, GuestStep, check_packages, provisioning_steps};
use banger_model::{ImageRecord, VmName, VmRecord, VmSpec};
use banger_storage::{VmDisks, WorkSource};
use banger_store::StoreError;
use banger_vmm::VmPaths;
use guest::*;
use publish::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Room added to the base's root file system for what gets installed
/// (Docker and mise are a few hundred MiB). The file is sparse: unused room
/// costs no host disk.
const ROOT_HEADROOM: u64 = 2 << 30;
/// Smallest work disk of the transient VM.
const WORK_MIN: u64 = 256 << 20;
/// Longest a provisioning step may run (package installs under TCG).
const STEP_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// How long the guest gets to power off (stopping dockerd included).
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of a failed step's output quoted in the error.
const TAIL_LINES: usize = 12;

/// File names inside the new image's directory.
const ROOTFS_FILE: &str = "rootfs.ext4";
const WORK_SEED_FILE: &str = "work-seed.ext4";

/// Name of the transient VM that builds image `image`.
pub(crate) fn transient_vm_name(image: &str) -> String {
    let clean: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("image-build-{clean}");
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// Image names being derived by this daemon right now.
fn in_progress() -> &'static Mutex<HashSet<String>> {
    static SET: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    SET.get_or_init(Mutex::default)
}

/// Marks an image name as being built until dropped.
struct BuildClaim(String);

impl BuildClaim {
    fn take(name: &str) -> Result<Self, DeriveError> {
        let mut set = in_progress().lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(name.to_string()) {
            return Err(DeriveError::Busy(name.to_string()));
        }
        Ok(Self(name.to_string()))
    }
}

impl Drop for BuildClaim {
    fn drop(&mut self) {
        in_progress()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// What to derive.
pub(crate) struct DeriveRequest<'a> {
    pub(crate) name: &'a str,
    pub(crate) base: &'a str,
    pub(crate) docker: bool,
    pub(crate) packages: &'a [String],
}

impl Daemon {
    /// Builds image `req.name` from image `req.base` in a transient VM and
    /// registers it. See the module docs.
    pub(crate) async fn derive_image(
        self: &Arc<Self>,
        req: DeriveRequest<'_>,
        progress: &ProgressSink,
        cancel: CancellationToken,
    ) -> Result<ImageRecord, DeriveError> {
        let name = req.name;
        check_name("image", name)?;
        if name == req.base {
            return Err(DeriveError::SameAsBase(name.to_string()));
        }
        check_packages(req.packages).map_err(DeriveError::Plan)?;
        self.refuse_existing_image(name)?;
        let _claim = BuildClaim::take(name)?;
        let plan = provisioning_steps(&DeriveOptions {
            docker: req.docker,
            packages: req.packages.to_vec(),
            work_device: WRITABLE_ROOT_WORK_DEVICE.into(),
        })
        .map_err(DeriveError::Plan)?;
        let base = self.ensure_image(req.base, progress, &cancel).await?;

        let vm_name = transient_vm_name(name);
        // A transient VM of this name outlived a crashed build: no build of
        // this image runs now (the claim above), so it goes.
        if let Some(old) = self
            .store
            .list_vms()?
            .into_iter()
            .find(|v| v.name.as_str() == vm_name)
        {
            progress.phase(
                Step::Cleanup,
                format!("removing {vm_name}, left over by an interrupted build"),
            );
            self.delete_vm(old.id.as_str()).await?;
        }
        let vm = self.transient_vm(&vm_name, &base).await?;
        progress.phase(
            Step::Vm,
            format!("transient VM {vm_name} (removed when the build ends)"),
        );
        let built = self
            .derive_in(&vm, &base, name, &plan, progress, &cancel)
            .await;
        progress.phase(Step::Cleanup, format!("removing transient VM {vm_name}"));
        let removed = self.delete_vm(vm.id.as_str()).await;
        match (built, removed) {
            (Ok(files), Ok(_)) => {
                let img = self.register_derived(name, &base, files).await?;
                progress.phase(
                    Step::Done,
                    format!("image {name} registered (from {})", req.base),
                );
                Ok(img)
            }
            (Ok(files), Err(e)) => {
                remove_dir(&files.dir).await;
                Err(DeriveError::Failed(anyhow!(
                    "removing the transient VM {vm_name} failed, so image {name} was not registered: {e}"
                )))
            }
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(e2)) => {
                tracing::warn!(vm = %vm_name, error = %e2, "transient VM not removed");
                Err(DeriveError::Failed(anyhow!(
                    "{e}; also, removing the transient VM {vm_name} failed ({e2}): delete it with `banger vm delete {vm_name}`"
                )))
            }
        }
    }

    /// Records the transient VM (state `creating`) with its directory.
    async fn transient_vm(
        self: &Arc<Self>,
        vm_name: &str,
        base: &ImageRecord,
    ) -> Result<VmRecord, CreateError> {
        let defaults = effective_defaults(&self.config.vm_defaults, &HostResources::detect());
        let spec = apply_flags(defaults, None, None, None);
        // The guest downloads packages: bridge networking needs NAT for
        // that; user-mode networking always has it.
        let nat = self.network().is_some_and(|n| n.mode_name() == "bridge");
        self.record_transient_vm(vm_name, &base.name, spec, nat)
            .await
    }

    /// Records a VM that a build boots and removes (a derived image's,
    /// a template's): state `creating`, its directory made, an address
    /// allocated. Nothing is left when this fails.
    pub(crate) async fn record_transient_vm(
        &self,
        vm_name: &str,
        image: &str,
        spec: VmSpec,
        nat: bool,
    ) -> Result<VmRecord, CreateError> {
        self.vmm()?;
        let name = VmName::parse(vm_name)?;
        let new = NewVm {
            name,
            image: image.to_string(),
            spec,
            nat,
            initramfs: self.config.initramfs,
            start: Default::default(),
        };
        let mut steps = crate::steps::Steps::new(&ProgressSink::discard());
        let (vm, _held) = self.admit(new, &mut steps).await?;
        steps.commit();
        Ok(vm)
    }

    /// Disks, boot, provisioning and power-off of the transient VM `vm`.
    /// Returns the new image's files, moved out of the VM's directory.
    async fn derive_in(
        self: &Arc<Self>,
        vm: &VmRecord,
        base: &ImageRecord,
        name: &str,
        plan: &[GuestStep],
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<DerivedFiles, DeriveError> {
        let guard = self.lock_vm_id(&vm.id).await?;
        let mut vm = guard.vm.clone();
        let vmm = self.vmm()?.clone();
        let kernel = self.store.get_kernel(&base.kernel)?;
        let disks = VmDisks::in_dir(&vm.dir);
        let root = vm.dir.join(ROOTFS_FILE);

        let mut host_files = Vec::new();
        for f in plan.iter().filter_map(|s| s.stdin) {
            let (url, _) = f.source();
            progress.phase(Step::Download, format!("downloading {url} on the host"));
            let path = vm.dir.join(format!("host-file-{}", host_files.len()));
            fetch_verified(f, &path, cancel).await?;
            host_files.push((f, path));
        }

        let base_len = file_len(&base.rootfs)?;
        progress.phase(
            Step::Disks,
            format!(
                "copying the root file system of {} ({} MiB) and its /root seed",
                base.name,
                base_len >> 20
            ),
        );
        banger_storage::create_work_disk(
            WorkSource::Seed(&base.rootfs),
            &root,
            base_len + ROOT_HEADROOM,
        )
        .await
        .context("copying the base image's root file system")?;
        let (source, work_size) = match &base.work_seed {
            Some(seed) => (WorkSource::Seed(seed), file_len(seed)?.max(WORK_MIN)),
            None => (WorkSource::Empty, WORK_MIN),
        };
        banger_storage::create_work_disk(source, &disks.work, work_size)
            .await
            .context("creating the /root work disk")?;

        let mut steps = crate::steps::Steps::new(progress);
        let ctx = BootCtx {
            vmm: &vmm,
            kernel: &kernel,
            image: base,
            progress,
            cancel,
            writable_root: Some(&root),
            purpose: crate::vm::BootPurpose::Vm,
        };
        let booted = match self.boot(ctx, &mut vm, &mut steps).await.map(|_| ()) {
            // Provisioning (apt, dpkg's service restarts) runs against a
            // fully booted system, as it would on a host.
            Ok(()) => self
                .wait_ready(&vm, crate::vm::Readiness::SYSTEM, progress, cancel)
                .await
                .map_err(crate::vm::Unready::into_boot),
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => steps.commit(),
            Err(BootError::NotReady(_)) => {
                steps.commit();
                let tail = console_tail(
                    &VmPaths::new(&vm.dir).console_log(),
                    crate::vm::CONSOLE_LINES,
                );
                return Err(DeriveError::Failed(anyhow!(
                    "the transient VM did not come up; last console lines:\n{tail}"
                )));
            }
            Err(BootError::Failed(e)) => return Err(DeriveError::Failed(e)),
            Err(e) => return Err(DeriveError::Boot(e)),
        }
        let agent = self
            .agent(&vm.id)
            .ok_or_else(|| anyhow!("the transient VM has no agent connection"))?;

        for step in plan {
            progress.phase(step.name, &step.message);
            let stdin = step
                .stdin
                .and_then(|f| host_files.iter().find(|(h, _)| *h == f))
                .map(|(_, p)| p.as_path());
            run_step(&agent, step, stdin, cancel)
                .await
                .map_err(|e| anyhow!("provisioning step {} failed: {e}", step.name))?;
        }

        progress.phase(Step::Shutdown, "powering the guest off");
        match self
            .power_off(&guard, Ask::Agent(&agent), POWEROFF_TIMEOUT, Some(cancel))
            .await
        {
            PowerOff::Exited => {}
            PowerOff::Unwatched => {
                return Err(DeriveError::Failed(anyhow!(
                    "the transient VM's VMM is not watched; cannot tell when it powers off"
                )));
            }
            PowerOff::NotAsked(e) => {
                return Err(DeriveError::Failed(
                    e.context("asking the guest to power off"),
                ));
            }
            PowerOff::Cancelled => return Err(DeriveError::Failed(anyhow!(self.cancel_reason()))),
            PowerOff::TimedOut => {
                return Err(DeriveError::Failed(anyhow!(
                    "the guest did not power off within {}s, so its disks may be inconsistent; the image was not saved",
                    POWEROFF_TIMEOUT.as_secs()
                )));
            }
        }
        drop(guard);

        progress.phase(Step::Check, "checking the new file systems (e2fsck)");
        for disk in [&root, &disks.work] {
            fsck(disk, cancel).await?;
        }

        progress.phase(Step::Save, format!("saving image {name}"));
        let dir = self.paths.images_dir.join(name);
        let (work, images_dir, dest) = (disks.work.clone(), self.paths.images_dir.clone(), dir);
        let name = name.to_string();
        tokio::task::spawn_blocking(move || publish(&images_dir, &name, &dest, &root, &work))
            .await
            .map_err(|e| anyhow!("image save worker: {e}"))?
            .map_err(DeriveError::Failed)
    }

    /// Records the derived image, or removes its files if that fails.
    async fn register_derived(
        &self,
        name: &str,
        base: &ImageRecord,
        files: DerivedFiles,
    ) -> Result<ImageRecord, DeriveError> {
        let _guard = self.image_lock.lock().await;
        if let Err(e) = self.refuse_existing_image(name) {
            remove_dir(&files.dir).await;
            return Err(e.into());
        }
        let image = ImageRecord {
            name: name.to_string(),
            size_bytes: file_len(&files.rootfs).unwrap_or(0),
            rootfs: files.rootfs,
            work_seed: Some(files.work_seed),
            kernel: base.kernel.clone(),
            managed: true,
            created_at: now_rfc3339(),
        };
        if let Err(e) = self.store.upsert_image(&image) {
            remove_dir(&files.dir).await;
            return Err(e.into());
        }
        tracing::info!(image = name, base = %base.name, "derived image registered");
        Ok(image)
    }
}

/// Why a derived image (`image build --from-image`) was not made.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("--name {0} is the base image: give the derived image another name")]
    SameAsBase(String),
    /// A package name or the provisioning plan is not valid.
    #[error("{0}")]
    Plan(banger_image::ImageError),
    /// This daemon is deriving an image of this name already.
    #[error("image {0} is being built right now: wait for that build to finish")]
    Busy(String),
    /// The base image is missing, or making the default one failed.
    #[error(transparent)]
    Base(#[from] EnsureError),
    /// Recording the transient VM failed.
    #[error(transparent)]
    TransientVm(#[from] CreateError),
    /// Removing a transient VM left over by an interrupted build failed.
    #[error(transparent)]
    DeleteVm(#[from] DeleteError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    NoBackend(#[from] NoBackend),
    /// Recording the transient VM's state during its boot failed.
    #[error(transparent)]
    Boot(BootError),
    /// Booting, provisioning, powering off, checking or saving failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl DeriveError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use DeriveError as E;
        match self {
            E::Name(e) => e.kind(),
            E::SameAsBase(_) | E::Plan(_) => ErrorKind::Invalid,
            E::Busy(_) => ErrorKind::Conflict,
            E::Base(e) => e.kind(),
            E::TransientVm(e) => e.kind(),
            E::Boot(e) => e.kind(),
            E::DeleteVm(e) => e.kind(),
            E::Lookup(e) => e.kind(),
            E::NoBackend(_) | E::Failed(_) => ErrorKind::Failed,
            E::Store(e) => store_kind(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_names_are_vm_names() {
        assert_eq!(transient_vm_name("devbox"), "image-build-devbox");
        assert_eq!(transient_vm_name("a.b_c"), "image-build-a-b-c");
        let long = transient_vm_name(&"x".repeat(63));
        assert_eq!(long.len(), 63);
        VmName::parse(&long).expect("valid");
        let trimmed = transient_vm_name(&format!("{}-y", "x".repeat(50)));
        VmName::parse(&trimmed).expect("no trailing dash");
    }

    #[test]
    fn a_name_is_built_once_at_a_time() {
        let a = BuildClaim::take("claim-test").expect("first");
        let e = BuildClaim::take("claim-test").err().expect("taken");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "image claim-test is being built right now: wait for that build to finish"
        );
        drop(a);
        BuildClaim::take("claim-test").expect("free again");
    }
}
