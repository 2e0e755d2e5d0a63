//! Booting a VM: its disks' layout, the VMM launch and the wait for its agent.

use super::*;
use crate::error::{Chain, store_kind};
use crate::steps::{Steps, UndoSlot};
use crate::vm::{BootFacts, BootInitrd};
use crate::{Daemon, ErrorKind};
use anyhow::{Context, anyhow};
use banger_agent_proto::boot::BootArgs;
use banger_agent_proto::client::AgentClient;
use banger_api::{ProgressSink, Step};
use banger_model::{ImageRecord, KernelRecord, VmBackend, VmId, VmRecord, VmState};
use banger_storage::VmDisks;
use banger_store::StoreError;
use banger_vmm::{DiskFormat, DiskSpec, LaunchSpec, VmPaths, Vmm};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

impl Daemon {
    /// Boots `vm` (state must be creating or stopped) and waits for its agent.
    pub(crate) async fn boot(
        self: &Arc<Self>,
        ctx: BootCtx<'_>,
        vm: &mut VmRecord,
        steps: &mut Steps<'_>,
    ) -> Result<LaunchSpec, BootError> {
        let BootCtx {
            vmm,
            kernel,
            image,
            progress,
            cancel,
            writable_root,
            purpose,
        } = ctx;
        let template = purpose == BootPurpose::Template;
        let paths = VmPaths::new(&vm.dir);
        let disks = VmDisks::in_dir(&vm.dir);
        if let Err(e) = self.set_state(vm, VmState::Starting, None, None) {
            return Err(fail(steps, e.into()).await);
        }
        // The VM is not running: its work disk may be written. Never into
        // a template, which every VM of every user of this host restores.
        if !template && let Err(e) = self.sync_credentials(vm, progress).await {
            return Err(fail(steps, e).await);
        }
        // Firecracker boots an uncompressed ELF; QEMU the bzImage.
        let kernel_file = match vmm.backend() {
            VmBackend::Firecracker => match &kernel.vmlinux {
                Some(v) => v.clone(),
                None => {
                    let err = anyhow!(
                        "kernel {} has no vmlinux, which Firecracker needs: re-pull or rebuild image {}, or set vmm = \"qemu\"",
                        kernel.name,
                        image.name
                    );
                    return Err(fail(steps, err).await);
                }
            },
            VmBackend::Qemu => kernel.kernel.clone(),
        };
        progress.phase(Step::Network, "setting up the VM's network");
        let mut boot_net = match self.net_up(vm, steps).await {
            Ok(n) => n,
            Err(e) => return Err(fail(steps, e.into()).await),
        };
        let guard = boot_net.as_mut().and_then(|n| n.guard.take());
        let (boot_args, disk_specs) = boot_layout(image, &disks, writable_root);
        let hostname = if template {
            TEMPLATE_HOSTNAME
        } else {
            vm.name.as_str()
        };
        let mut extra_cmdline = kernel_cmdline(&boot_args, hostname);
        let mut nets = Vec::new();
        let tap = boot_net.as_ref().and_then(|n| n.tap);
        if let Some(n) = boot_net {
            if template {
                // Attached but never configured: no address or connection
                // is frozen into the snapshot.
                nets = n.nets;
                for net in &mut nets {
                    net.mac = TEMPLATE_MAC.to_string();
                }
            } else {
                extra_cmdline.push(' ');
                extra_cmdline.push_str(&n.cmdline);
                nets = n.nets;
            }
        }
        let (initrd, initrd_kind) = match self.boot_initrd(vm, kernel, image).await {
            Ok(x) => x,
            Err(e) => return Err(fail(steps, e).await),
        };
        let spec = LaunchSpec {
            name: vm.name.to_string(),
            dir: vm.dir.clone(),
            kernel: kernel_file,
            initrd,
            extra_cmdline,
            disks: disk_specs,
            nets,
            vcpu: vm.spec.vcpu.value,
            memory_mib: vm.spec.memory_mib.value,
            // A template's memory goes straight into its snapshot file
            // where the backend snapshots that way (QEMU).
            memory_file: (template && vmm.snapshot_memory_at_launch())
                .then(|| vm.dir.join(crate::warm::header::MEMORY_FILE)),
        };
        if let Some(g) = guard
            && let Err(e) = g.wait().await
        {
            return Err(fail(steps, e.into()).await);
        }
        let launch_vmm = vmm.clone();
        let launch_spec = spec.clone();
        let launched = steps
            .run("boot", "starting the VMM", |u: UndoSlot<'_>| async move {
                let vmm = launch_vmm;
                let l = vmm.launch(&launch_spec).await?;
                let (v, d, pid) = (vmm.clone(), launch_spec.dir.clone(), l.pid);
                u.set(move || async move { v.terminate(&d, pid).await.map_err(Into::into) });
                Ok(l)
            })
            .await;
        if initrd_kind == BootInitrd::Banger && !template {
            // The VMM has read it into the guest's memory (QEMU at start-up,
            // Firecracker at InstanceStart).
            let _ = tokio::fs::remove_file(vm.dir.join(crate::vm::BOOT_INITRD_FILE)).await;
        }
        let launched = launched.map_err(|e| BootError::Failed(e.into()))?;
        let launched_pid = launched.pid;
        cap_logs(spec.dir.clone(), launched_pid);
        // The console starts over at each launch: so does its time index.
        crate::vm::log_index::spawn_sampler(
            vec![paths.console_log(), paths.vmm_log()],
            launched_pid,
            true,
            self.shutdown.clone(),
        );
        let mut exited = launched.exited;
        let agent_ep = launched.agent;
        if let Err(e) = self.set_state(vm, VmState::Starting, Some(launched_pid), None) {
            return Err(fail(steps, e.into()).await);
        }

        let console = paths.console_log();
        let ready_by = Instant::now() + self.ready_timeout();
        // Firecracker's guest connects to us: a VMM that exits first (a
        // failed boot) or a guest that never connects must not hang this.
        let opened = steps
            .run("agent", "waiting for the guest agent", |_| async {
                tokio::select! {
                    r = tokio::time::timeout_at(ready_by.into(), agent_ep.open()) => match r {
                        Ok(stream) => Ok(Some(AgentClient::spawn(
                            stream.context("connecting to the agent channel")?,
                        ))),
                        Err(_) => Ok(None),
                    },
                    _ = &mut exited => Err(crate::vm::stopped_before_agent(vm.name.as_str(), &paths)),
                }
            })
            .await
            .map_err(|e| BootError::Failed(e.into()))?;
        let Some(agent) = opened else {
            self.watch_exit(vm.id.clone(), launched_pid, exited);
            return Err(BootError::NotReady(format!(
                "VM {name}'s agent did not connect within {}s (ready_timeout_secs); it is kept running for inspection: `banger vm logs {name}` shows its console ({}), `banger vm delete {name}` removes it",
                self.ready_timeout().as_secs(),
                console.display(),
                name = vm.name,
            )));
        };
        let hello = tokio::select! {
            r = tokio::time::timeout_at(ready_by.into(), agent.wait_hello()) => r,
            _ = cancel.cancelled() => {
                return Err(fail(steps, anyhow!(self.cancel_reason())).await);
            }
        };
        match hello {
            Ok(Ok(hello)) => {
                tracing::info!(vm = %vm.name, agent = %hello.agent_version, guest_uptime_ms = hello.uptime_ms, initramfs = initrd_kind.as_str(), "agent ready");
                self.set_boot_facts(
                    &vm.id,
                    Some(BootFacts {
                        initrd: initrd_kind,
                        hello_ms: hello.uptime_ms,
                        tap,
                    }),
                );
                progress.phase(
                    Step::Ready,
                    format!(
                        "guest agent is up ({} ms after the guest kernel started; {} initramfs)",
                        hello.uptime_ms,
                        initrd_kind.as_str()
                    ),
                );
            }
            Ok(Err(banger_agent_proto::client::ClientError::Disconnected)) => {
                let err = crate::vm::stopped_before_agent(vm.name.as_str(), &paths);
                return Err(fail(steps, err).await);
            }
            Ok(Err(e)) => return Err(fail(steps, e.into()).await),
            Err(_) => {
                self.set_agent(&vm.id, Some(agent));
                self.watch_exit(vm.id.clone(), launched_pid, exited);
                return Err(BootError::NotReady(format!(
                    "VM {name} did not signal readiness within {}s (ready_timeout_secs); it is kept running for inspection: `banger vm logs {name}` shows its console ({}), `banger vm delete {name}` removes it",
                    self.ready_timeout().as_secs(),
                    console.display(),
                    name = vm.name,
                )));
            }
        }
        self.set_agent(&vm.id, Some(agent.clone()));
        if let Err(e) = self.set_state(vm, VmState::Running, Some(launched_pid), None) {
            return Err(fail(steps, e.into()).await);
        }
        self.net_ready(vm);
        self.watch_exit(vm.id.clone(), launched_pid, exited);
        Ok(spec)
    }
}

/// What a boot needs besides the VM and its steps.
pub(crate) struct BootCtx<'a> {
    pub(crate) vmm: &'a Arc<dyn Vmm>,
    pub(crate) kernel: &'a KernelRecord,
    pub(crate) image: &'a ImageRecord,
    pub(crate) progress: &'a ProgressSink,
    pub(crate) cancel: &'a CancellationToken,
    /// Boot this writable root file system instead of the image's shared
    /// one under an overlay (the transient VM of `image build
    /// --from-image`, whose writes must land in the new image's file).
    pub(crate) writable_root: Option<&'a std::path::Path>,
    pub(crate) purpose: BootPurpose,
}

/// What a boot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BootPurpose {
    /// A VM of its own: its name, address and the owner's credentials.
    Vm,
    /// A warm-start template's guest: nothing per-VM or per-user enters it
    /// (neutral host name, NIC attached but never configured, no
    /// credentials), and banger's initrd is kept for the restores.
    Template,
}

/// Host name of every template guest (clones get their own at restore).
pub(crate) const TEMPLATE_HOSTNAME: &str = "banger";
/// MAC of every template guest's NIC (clones set their own at restore).
pub(crate) const TEMPLATE_MAC: &str = "06:00:00:00:00:01";

/// Kernel parameters and disks of a boot.
///
/// The standard layout is the boot contract's: the image's root
/// (read-only), the VM's overlay, its work disk. With a writable root there
/// is no overlay: early init boots that root as it is, mounted `rw` (by
/// banger's initramfs, the distribution's or the kernel), and the work disk
/// comes second.
fn boot_layout(
    image: &ImageRecord,
    disks: &VmDisks,
    writable_root: Option<&std::path::Path>,
) -> (String, Vec<DiskSpec>) {
    let disk = |path: &std::path::Path, read_only: bool| DiskSpec {
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
        read_only,
    };
    match writable_root {
        None => (
            BootArgs::standard().kernel_params(banger_agent_proto::install::BINARY_PATH),
            vec![
                disk(&image.rootfs, true),
                disk(&disks.overlay, false),
                disk(&disks.work, false),
            ],
        ),
        Some(root) => {
            let args = BootArgs {
                root_writable: true,
                overlay: None,
                work: None,
                ..BootArgs::standard()
            };
            (
                args.kernel_params(banger_agent_proto::install::BINARY_PATH),
                vec![disk(root, false), disk(&disks.work, false)],
            )
        }
    }
}

/// Kernel parameters every guest boots with, beyond the boot contract's:
/// - `cryptomgr.notests` skips the kernel's crypto self-tests, about a
///   fifth of a Debian cloud kernel's start under emulation (0.3 s of
///   1.35 s to `Run /init` here); libguestfs boots its short-lived
///   appliance VMs the same way, and a kernel booted with `fips=1` runs
///   them anyway.
/// - `init_on_alloc=0` stops the kernel zeroing every page and slab object
///   it allocates (Debian turns it on as hardening against leaks of stale
///   kernel memory to the guest's own processes, which in a one-owner
///   sandbox whose commands run as root guards nothing): the greeting
///   came ~70 ms sooner here, and a guest's page cache fills faster.
const KERNEL_TUNING: &str = "cryptomgr.notests init_on_alloc=0";

/// The guest kernel's command line beyond what the VMM adds: the boot
/// contract's parameters, [`KERNEL_TUNING`], the host name.
fn kernel_cmdline(boot_args: &str, hostname: &str) -> String {
    format!("{boot_args} {KERNEL_TUNING} systemd.hostname={hostname}")
}

/// Guest device of the work disk in the writable-root layout of
/// [`boot_layout`].
pub(crate) const WRITABLE_ROOT_WORK_DEVICE: &str = "/dev/vdb";

/// Why a boot (with its readiness wait) did not end with a ready VM: the
/// outcome start and create share.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The guest did not greet, finish booting or answer ssh in time; the
    /// VM is kept, in error, for inspection.
    #[error("{0}")]
    NotReady(String),
    /// Boot failed and was rolled back.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// Recording the VM's state after its boot failed.
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
    /// The VM's state after its boot could not be recorded (a refused
    /// move, or the store failed).
    #[error(transparent)]
    State(#[from] crate::vm::StateError),
}

impl BootError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BootError::NotReady(_) | BootError::Failed(_) => ErrorKind::Failed,
            BootError::Store(e) => store_kind(e),
            BootError::State(e) => e.kind(),
        }
    }
}

impl Daemon {
    /// Gives up a boot whose agent greeted (the client went away, the
    /// guest went down): its agent is forgotten, its steps rolled back.
    pub(super) async fn abandon_boot(
        &self,
        id: &VmId,
        steps: &mut Steps<'_>,
        cause: anyhow::Error,
    ) -> BootError {
        self.set_agent(id, None);
        fail(steps, cause).await
    }
}

/// Rolls back every step so far and reports `cause` with any undo failures.
pub(super) async fn fail(steps: &mut Steps<'_>, cause: anyhow::Error) -> BootError {
    let rollback_errors = steps.rollback().await;
    BootError::Failed(
        crate::steps::StepError {
            step: "boot",
            cause,
            rollback_errors,
        }
        .into(),
    )
}

pub(crate) use banger_vmm::console::{console_tail, read_tail};

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn every_guest_gets_the_kernel_tuning_and_keeps_its_contract() {
        let params = BootArgs::standard().kernel_params(banger_agent_proto::install::BINARY_PATH);
        let line = kernel_cmdline(&params, "calm-otter");
        for tuning in ["cryptomgr.notests", "init_on_alloc=0"] {
            assert!(line.split(' ').any(|p| p == tuning), "{tuning}: {line}");
        }
        assert!(line.ends_with(" systemd.hostname=calm-otter"), "{line}");
        // The agent still reads its contract from the whole line.
        assert_eq!(BootArgs::parse(&line), BootArgs::parse(&params));
    }

    #[test]
    fn boot_layouts() {
        let image = ImageRecord {
            name: "img".into(),
            rootfs: "/images/img/rootfs.ext4".into(),
            work_seed: None,
            kernel: "k".into(),
            managed: true,
            size_bytes: 0,
            created_at: String::new(),
        };
        let disks = VmDisks::in_dir(Path::new("/vms/x"));
        let paths = |d: &[DiskSpec]| -> Vec<(PathBuf, bool)> {
            d.iter().map(|s| (s.path.clone(), s.read_only)).collect()
        };

        let (params, d) = boot_layout(&image, &disks, None);
        assert!(params.contains("root=/dev/vda ro "), "{params}");
        // What the guest kernel gets under Firecracker names one root.
        let fc = banger_vmm::firecracker::boot_args(&params);
        assert_eq!(fc.matches("root=").count(), 1, "{fc}");
        assert_eq!(
            fc.split(' ').filter(|a| *a == "rw" || *a == "ro").count(),
            1,
            "{fc}"
        );
        assert!(params.contains("banger.overlay=/dev/vdb"), "{params}");
        assert_eq!(
            paths(&d),
            [
                (PathBuf::from("/images/img/rootfs.ext4"), true),
                (PathBuf::from("/vms/x/overlay.ext4"), false),
                (PathBuf::from("/vms/x/work.ext4"), false),
            ]
        );

        let root = Path::new("/vms/x/rootfs.ext4");
        let (params, d) = boot_layout(&image, &disks, Some(root));
        assert!(params.starts_with("root=/dev/vda rw "), "{params}");
        assert!(BootArgs::parse(&params).root_writable);
        let fc = banger_vmm::firecracker::boot_args(&params);
        assert_eq!(
            fc.split(' ').filter(|a| *a == "rw" || *a == "ro").count(),
            1,
            "{fc}"
        );
        assert!(!params.contains("banger.overlay"), "{params}");
        assert_eq!(
            BootArgs::parse(&params).overlay,
            None,
            "early init must boot the root as it is"
        );
        assert_eq!(
            paths(&d),
            [
                (root.to_path_buf(), false),
                (PathBuf::from("/vms/x/work.ext4"), false),
            ]
        );
        assert_eq!(WRITABLE_ROOT_WORK_DEVICE, "/dev/vdb");
    }
}
