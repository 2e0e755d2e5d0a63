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

use crate::image_ops::check_name;
use crate::vm::admit::NewVm;
use crate::vm::power::{Ask, PowerOff};
use crate::vms::{BootCtx, BootError, WRITABLE_ROOT_WORK_DEVICE, console_tail, now_rfc3339};
use crate::{Daemon, DaemonError};
use anyhow::{Context, anyhow};
use banger_agent_proto::ExecRequest;
use banger_agent_proto::client::{AgentClient, ExecEvent};
use banger_config::{HostResources, apply_flags, effective_defaults};
use banger_image::derive::{
    DeriveOptions, GuestStep, HostFile, check_packages, provisioning_steps,
};
use banger_model::{ImageRecord, VmName, VmRecord, VmSpec};
use banger_storage::{VmDisks, WorkSource};
use banger_vmm::VmPaths;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
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
    fn take(name: &str) -> Result<Self, DaemonError> {
        let mut set = in_progress().lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(name.to_string()) {
            return Err(DaemonError::Conflict(format!(
                "image {name} is being built right now: wait for that build to finish"
            )));
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

type ProgressRef<'a> = &'a (dyn Fn(&str, &str) + Send + Sync);

impl Daemon {
    /// Builds image `req.name` from image `req.base` in a transient VM and
    /// registers it. See the module docs.
    pub(crate) async fn derive_image(
        self: &Arc<Self>,
        req: DeriveRequest<'_>,
        progress: ProgressRef<'_>,
        cancel: CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        let name = req.name;
        check_name("image", name)?;
        if name == req.base {
            return Err(DaemonError::Invalid(format!(
                "--name {name} is the base image: give the derived image another name"
            )));
        }
        check_packages(req.packages).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        self.refuse_existing_image(name)?;
        let _claim = BuildClaim::take(name)?;
        let plan = provisioning_steps(&DeriveOptions {
            docker: req.docker,
            packages: req.packages.to_vec(),
            work_device: WRITABLE_ROOT_WORK_DEVICE.into(),
        })
        .map_err(|e| DaemonError::Invalid(e.to_string()))?;
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
            progress(
                "cleanup",
                &format!("removing {vm_name}, left over by an interrupted build"),
            );
            self.delete_vm(old.id.as_str()).await?;
        }
        let vm = self.transient_vm(&vm_name, &base).await?;
        progress(
            "vm",
            &format!("transient VM {vm_name} (removed when the build ends)"),
        );
        let built = self
            .derive_in(&vm, &base, name, &plan, progress, &cancel)
            .await;
        progress("cleanup", &format!("removing transient VM {vm_name}"));
        let removed = self.delete_vm(vm.id.as_str()).await;
        match (built, removed) {
            (Ok(files), Ok(_)) => {
                let img = self.register_derived(name, &base, files).await?;
                progress(
                    "done",
                    &format!("image {name} registered (from {})", req.base),
                );
                Ok(img)
            }
            (Ok(files), Err(e)) => {
                remove_dir(&files.dir).await;
                Err(DaemonError::Failed(anyhow!(
                    "removing the transient VM {vm_name} failed, so image {name} was not registered: {e}"
                )))
            }
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(e2)) => {
                tracing::warn!(vm = %vm_name, error = %e2, "transient VM not removed");
                Err(DaemonError::Failed(anyhow!(
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
    ) -> Result<VmRecord, DaemonError> {
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
    ) -> Result<VmRecord, DaemonError> {
        self.vmm()?;
        let name = VmName::parse(vm_name).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        let new = NewVm {
            name,
            image: image.to_string(),
            spec,
            nat,
            initramfs: self.config.initramfs,
            start: Default::default(),
        };
        let mut steps = crate::steps::Steps::new(|_, _| {});
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
        progress: ProgressRef<'_>,
        cancel: &CancellationToken,
    ) -> Result<DerivedFiles, DaemonError> {
        let guard = self.lock_vm_id(&vm.id).await?;
        let mut vm = guard.vm.clone();
        let vmm = self.vmm()?.clone();
        let kernel = self.store.get_kernel(&base.kernel)?;
        let disks = VmDisks::in_dir(&vm.dir);
        let root = vm.dir.join(ROOTFS_FILE);

        let mut host_files = Vec::new();
        for f in plan.iter().filter_map(|s| s.stdin) {
            let (url, _) = f.source();
            progress("download", &format!("downloading {url} on the host"));
            let path = vm.dir.join(format!("host-file-{}", host_files.len()));
            fetch_verified(f, &path, cancel).await?;
            host_files.push((f, path));
        }

        let base_len = file_len(&base.rootfs)?;
        progress(
            "disks",
            &format!(
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

        let mut steps = crate::steps::Steps::new(|p, m| progress(p, m));
        let boot_progress = |p: &str, m: &str| progress(p, m);
        let ctx = BootCtx {
            vmm: &vmm,
            kernel: &kernel,
            image: base,
            progress: &boot_progress,
            cancel,
            writable_root: Some(&root),
            purpose: crate::vms::BootPurpose::Vm,
        };
        let booted = match self.boot(ctx, &mut vm, &mut steps).await.map(|_| ()) {
            // Provisioning (apt, dpkg's service restarts) runs against a
            // fully booted system, as it would on a host.
            Ok(()) => match self.wait_system(&vm, &boot_progress, cancel).await {
                crate::boot_path::SystemWait::Booted => Ok(()),
                crate::boot_path::SystemWait::TimedOut(m) => Err(BootError::NotReady(m)),
                crate::boot_path::SystemWait::Cancelled => {
                    Err(BootError::Failed(anyhow!(self.cancel_reason())))
                }
            },
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => steps.commit(),
            Err(BootError::NotReady(_)) => {
                steps.commit();
                let tail = console_tail(&VmPaths::new(&vm.dir).console_log());
                return Err(DaemonError::Failed(anyhow!(
                    "the transient VM did not come up; last console lines:\n{tail}"
                )));
            }
            Err(BootError::Failed(e)) => return Err(DaemonError::Failed(e)),
        }
        let agent = self
            .agent(&vm.id)
            .ok_or_else(|| anyhow!("the transient VM has no agent connection"))?;

        for step in plan {
            progress(step.name, &step.message);
            let stdin = step
                .stdin
                .and_then(|f| host_files.iter().find(|(h, _)| *h == f))
                .map(|(_, p)| p.as_path());
            run_step(&agent, step, stdin, cancel)
                .await
                .map_err(|e| anyhow!("provisioning step {} failed: {e}", step.name))?;
        }

        progress("shutdown", "powering the guest off");
        match self
            .power_off(&guard, Ask::Agent(&agent), POWEROFF_TIMEOUT, Some(cancel))
            .await
        {
            PowerOff::Exited => {}
            PowerOff::Unwatched => {
                return Err(DaemonError::Failed(anyhow!(
                    "the transient VM's VMM is not watched; cannot tell when it powers off"
                )));
            }
            PowerOff::NotAsked(e) => {
                return Err(DaemonError::Failed(
                    e.context("asking the guest to power off"),
                ));
            }
            PowerOff::Cancelled => return Err(DaemonError::Failed(anyhow!(self.cancel_reason()))),
            PowerOff::TimedOut => {
                return Err(DaemonError::Failed(anyhow!(
                    "the guest did not power off within {}s, so its disks may be inconsistent; the image was not saved",
                    POWEROFF_TIMEOUT.as_secs()
                )));
            }
        }
        drop(guard);

        progress("check", "checking the new file systems (e2fsck)");
        for disk in [&root, &disks.work] {
            fsck(disk, cancel).await?;
        }

        progress("save", &format!("saving image {name}"));
        let dir = self.paths.images_dir.join(name);
        let (work, images_dir, dest) = (disks.work.clone(), self.paths.images_dir.clone(), dir);
        let name = name.to_string();
        tokio::task::spawn_blocking(move || publish(&images_dir, &name, &dest, &root, &work))
            .await
            .map_err(|e| anyhow!("image save worker: {e}"))?
            .map_err(DaemonError::Failed)
    }

    /// Records the derived image, or removes its files if that fails.
    async fn register_derived(
        &self,
        name: &str,
        base: &ImageRecord,
        files: DerivedFiles,
    ) -> Result<ImageRecord, DaemonError> {
        let _guard = self.image_lock.lock().await;
        if let Err(e) = self.refuse_existing_image(name) {
            remove_dir(&files.dir).await;
            return Err(e);
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

/// The files of a saved derived image.
struct DerivedFiles {
    dir: PathBuf,
    rootfs: PathBuf,
    work_seed: PathBuf,
}

fn file_len(p: &Path) -> Result<u64, DaemonError> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .with_context(|| format!("reading {}", p.display()))
        .map_err(Into::into)
}

async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a derived image's directory");
    }
}

/// `e2fsck -fn`: the guest powered off cleanly, so both file systems must
/// be clean; anything else means they are not fit to become an image.
async fn fsck(disk: &Path, cancel: &CancellationToken) -> Result<(), DaemonError> {
    banger_ext4::check(disk, &|_| {}, cancel)
        .await
        .with_context(|| format!("checking {}", disk.display()))
        .map_err(Into::into)
}

/// Moves the root file system and work disk into `images_dir/<name>/`
/// through a hidden directory renamed into place, so the image directory
/// appears complete or not at all.
fn publish(
    images_dir: &Path,
    name: &str,
    dest: &Path,
    root: &Path,
    work: &Path,
) -> anyhow::Result<DerivedFiles> {
    let tmp = images_dir.join(format!(".derive-{name}-{:016x}", rand::random::<u64>()));
    let result = (|| {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        move_file(root, &tmp.join(ROOTFS_FILE))?;
        move_file(work, &tmp.join(WORK_SEED_FILE))?;
        // No record names this directory (the name was checked free), so
        // anything there is the leftover of an interrupted save.
        if std::fs::symlink_metadata(dest).is_ok() {
            std::fs::remove_dir_all(dest)
                .with_context(|| format!("removing the stale {}", dest.display()))?;
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("moving the image into {}", dest.display()))?;
        std::fs::File::open(images_dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", images_dir.display()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(DerivedFiles {
        dir: dest.to_path_buf(),
        rootfs: dest.join(ROOTFS_FILE),
        work_seed: dest.join(WORK_SEED_FILE),
    })
}

/// Renames `from` to `to`, copying (sparse-aware, through `cp`) when they
/// are on different file systems.
fn move_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let status = std::process::Command::new("cp")
                .args(["--sparse=always", "--"])
                .arg(from)
                .arg(to)
                .status()
                .context("running cp")?;
            if !status.success() {
                anyhow::bail!("copying {} to {} failed", from.display(), to.display());
            }
            std::fs::File::open(to)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing {}", to.display()))
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "moving {} to {}",
            from.display(),
            to.display()
        ))),
    }
}

/// Runs one provisioning step through the agent; its output goes to the
/// daemon log, and the last lines into the error when it fails.
async fn run_step(
    agent: &AgentClient,
    step: &GuestStep,
    stdin: Option<&Path>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let input = match stdin {
        Some(p) => Some(
            tokio::fs::read(p)
                .await
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => None,
    };
    let mut session = agent.exec(ExecRequest {
        argv: step.argv.clone(),
        env: vec![],
        cwd: Some("/".into()),
        stdin: input.is_some(),
        tty: None,
    })?;
    if let Some(data) = input {
        session.write_stdin(&data)?;
        session.close_stdin()?;
    }
    let mut tail = Tail::default();
    let deadline = tokio::time::sleep(STEP_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        let ev = tokio::select! {
            ev = session.next_event() => ev?,
            _ = cancel.cancelled() => anyhow::bail!("cancelled"),
            _ = &mut deadline => anyhow::bail!(
                "it ran longer than {} minutes; last output:\n{}",
                STEP_TIMEOUT.as_secs() / 60,
                tail.text()
            ),
        };
        match ev {
            Some(ExecEvent::Stdout(d)) | Some(ExecEvent::Stderr(d)) => {
                for line in tail.push(&d) {
                    tracing::debug!(target: "image_build", step = step.name, "{line}");
                }
            }
            Some(ExecEvent::Exited(s)) if s.code == Some(0) => return Ok(()),
            Some(ExecEvent::Exited(s)) => anyhow::bail!(
                "it exited with status {}; last output:\n{}",
                s.code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| format!("signal {}", s.signal.unwrap_or(0))),
                tail.text()
            ),
            Some(ExecEvent::Error(m)) => anyhow::bail!("{m}"),
            // Only attach and logs channels end with a session record.
            Some(ExecEvent::Session(_)) | None => {
                anyhow::bail!("the guest agent ended the session without an exit status")
            }
        }
    }
}

/// Downloads host file `f` to `path` and checks its sha512.
async fn fetch_verified(
    f: HostFile,
    path: &Path,
    cancel: &CancellationToken,
) -> Result<(), DaemonError> {
    let (url, want) = f.source();
    banger_image::mise::fetch_sha512(url, want, path, cancel)
        .await
        .map_err(|e| DaemonError::Failed(e.into()))
}

/// The last lines of a process's output.
#[derive(Default)]
struct Tail {
    partial: Vec<u8>,
    lines: VecDeque<String>,
}

impl Tail {
    /// Adds output; returns the lines it completed.
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(data);
        let mut done = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim_end()
                .to_string();
            if text.is_empty() {
                continue;
            }
            if self.lines.len() == TAIL_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(text.clone());
            done.push(text);
        }
        done
    }

    fn text(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        let rest = String::from_utf8_lossy(&self.partial).trim().to_string();
        if !rest.is_empty() {
            lines.push(rest);
        }
        lines.join("\n")
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
        assert!(matches!(
            BuildClaim::take("claim-test"),
            Err(DaemonError::Conflict(_))
        ));
        drop(a);
        BuildClaim::take("claim-test").expect("free again");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail::default();
        assert!(t.push(b"par").is_empty());
        assert_eq!(t.push(b"tial\nnext\r\n\n"), ["partial", "next"]);
        for i in 0..20 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"unterminated");
        let text = t.text();
        assert!(text.starts_with("line 8\n"), "{text}");
        assert!(text.ends_with("line 19\nunterminated"), "{text}");
    }

    #[test]
    fn publish_moves_both_files_and_replaces_a_stale_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let images = t.path().join("images");
        let vm = t.path().join("vm");
        std::fs::create_dir_all(images.join("img/junk")).expect("stale");
        std::fs::create_dir_all(&vm).expect("vm");
        let (root, work) = (vm.join("rootfs.ext4"), vm.join("work.ext4"));
        std::fs::write(&root, "root").expect("root");
        std::fs::write(&work, "work").expect("work");
        let dest = images.join("img");
        let f = publish(&images, "img", &dest, &root, &work).expect("publish");
        assert_eq!(std::fs::read_to_string(&f.rootfs).expect("read"), "root");
        assert_eq!(std::fs::read_to_string(&f.work_seed).expect("read"), "work");
        assert!(!dest.join("junk").exists());
        assert!(!root.exists() && !work.exists());
        let left: Vec<_> = std::fs::read_dir(&images)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["img"]);

        // A failure leaves no hidden directory behind.
        let err = publish(&images, "x", &images.join("x"), &root, &work);
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(&images).expect("ls").count(), 1);
    }
}
