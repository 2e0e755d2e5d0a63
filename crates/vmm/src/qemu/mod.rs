//! QEMU `microvm` backend: everything on the command line, QMP for control,
//! virtio-serial for the agent channel. KVM when it really works, else TCG.

use crate::host::{self, KvmStatus};
use crate::process::{
    KILL_GRACE, KillOnDrop, PidFd, SpawnFailure, Startup, kill_and_reap, log_tail, reaper,
    spawn_checked, wait_startup,
};
use crate::qmp::Qmp;
use crate::{
    AgentEndpoint, DisksReady, GuestExit, LaunchSpec, Launched, RestoreSpec, SnapshotFiles,
    VmPaths, Vmm, VmmError, WarmSupport, is_valid_mac,
};
use banger_model::VmBackend;
use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

mod args;
mod warm;

pub use args::{ArgsMode, kernel_cmdline, qemu_args, qemu_args_for};
use args::{RAM_ID, opt};
pub use warm::judge_warm;
use warm::{check_memory_file, create_memory_file, incoming_launch};

/// Name of the QEMU binary looked up in PATH.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Config key that overrides the binary's location.
pub const QEMU_CONFIG_KEY: &str = "qemu_bin";
/// virtio-serial port name the guest agent opens (`/dev/virtio-ports/<name>`).
pub const AGENT_PORT_NAME: &str = "org.banger.agent";

/// How long QEMU gets to answer on QMP after spawn.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on any single QMP exchange, so a hung QEMU cannot hang the daemon.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `terminate` lets QEMU exit by itself after `quit`.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// How often the QMP socket is retried while QEMU starts; QEMU gives no
/// other signal that its monitor is up.
const CONNECT_RETRY: Duration = Duration::from_millis(2);
/// Bound on writing a snapshot's device state (the RAM is already in its
/// file; the stream is a few hundred KiB).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on loading a snapshot's device state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// The CPU virtualisation QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm, `-cpu host`.
    Kvm,
    /// Software emulation (Tiny Code Generator), `-cpu max`.
    Tcg,
}

impl Accel {
    /// KVM when the host's /dev/kvm can run stock guests, TCG otherwise.
    pub fn for_host(kvm: &KvmStatus) -> Self {
        if kvm.is_usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The QEMU microvm backend.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
    startup_timeout: Duration,
    /// [`Vmm::warm_support`], probed once per backend value.
    warm: std::sync::Arc<tokio::sync::OnceCell<WarmSupport>>,
}

impl QemuVmm {
    /// Finds the binary (`qemu_bin` from config, else PATH) and probes the
    /// host for the accelerator and the TSC frequency.
    pub fn from_host(configured_bin: Option<&Path>) -> Result<Self, VmmError> {
        let binary = host::find_binary(QEMU_BINARY, configured_bin).ok_or_else(|| {
            VmmError::BinaryMissing {
                binary: configured_bin
                    .map_or_else(|| QEMU_BINARY.to_owned(), |p| p.display().to_string()),
                config_key: QEMU_CONFIG_KEY,
            }
        })?;
        let kvm = host::kvm_status();
        let accel = Accel::for_host(&kvm);
        let tsc_khz = host::tsc_khz();
        if accel == Accel::Tcg && tsc_khz.is_none() {
            tracing::warn!(
                "host TSC frequency unknown: TCG guests may hang while calibrating their clock"
            );
        }
        tracing::info!(binary = %binary.display(), %accel, kvm = %kvm, ?tsc_khz, "QEMU backend");
        Ok(Self::new(binary, accel, tsc_khz))
    }

    /// A backend with explicit parts, for callers that probed the host
    /// themselves.
    pub fn new(binary: PathBuf, accel: Accel, tsc_khz: Option<u64>) -> Self {
        Self {
            binary,
            accel,
            tsc_khz,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            warm: Default::default(),
        }
    }

    /// How long `launch` waits for QEMU's control socket to answer.
    pub fn with_startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn tsc_khz(&self) -> Option<u64> {
        self.tsc_khz
    }

    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    /// Spawns QEMU with `args` for the VM in `paths` and waits until it
    /// answers on QMP. Console and VMM logs start empty. On error nothing is
    /// left running.
    async fn spawn(
        &self,
        name: &str,
        paths: &VmPaths,
        args: Vec<OsString>,
    ) -> Result<(Child, u32), VmmError> {
        let console = paths.console_log();
        crate::logcap::create_log(&console)
            .map_err(|e| VmmError::io(format!("create {}", console.display()), e))?;
        let log_path = paths.vmm_log();
        let log = crate::logcap::create_log(&log_path)
            .map_err(|e| VmmError::io(format!("create {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| VmmError::io(format!("dup {}", log_path.display()), e))?;

        let mut cmd = Command::new(&self.binary);
        cmd.args(args).stdout(log).stderr(log_err);
        let ready = async |child: &mut Child, _pid: u32| self.wait_ready(child, paths).await;
        match spawn_checked("QEMU", name, self.binary_name(), cmd, ready).await {
            Ok(s) => Ok((s.child, s.pid)),
            Err(SpawnFailure::Exited(status)) => Err(self.early_exit(status, paths)),
            Err(SpawnFailure::Vmm(e)) => Err(e),
        }
    }

    /// Loads the device state into a QEMU started with `-incoming defer`
    /// and resumes it.
    async fn load_and_resume(&self, paths: &VmPaths, vmstate: &Path) -> Result<(), VmmError> {
        let mut qmp = Qmp::connect(&paths.control_socket()).await?;
        qmp_bounded("migrate-set-capabilities", qmp.set_ignore_shared()).await?;
        qmp_bounded("migrate-incoming", qmp.migrate_incoming_file(vmstate)).await?;
        qmp.wait_migration("migrate-incoming", RESTORE_TIMEOUT)
            .await
            .map_err(|e| VmmError::Snapshot {
                what: "loading the snapshot",
                detail: e.to_string(),
            })?;
        qmp_bounded("cont", qmp.cont()).await?;
        Ok(())
    }

    /// Runs a `-M none` QEMU once and asks it for its version and migration
    /// capabilities.
    async fn probe_warm(&self) -> WarmSupport {
        let dir = std::env::temp_dir().join(format!(
            "banger-qemu-probe-{}-{}",
            std::process::id(),
            PROBE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir(&dir) {
            return WarmSupport::Unsupported(format!(
                "cannot probe QEMU: creating {}: {e}",
                dir.display()
            ));
        }
        let paths = VmPaths::new(&dir);
        let socket = paths.control_socket();
        let args: Vec<OsString> = vec![
            "-machine".into(),
            "none".into(),
            "-S".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            opt("socket,id=qmp,server=on,wait=off,path=", socket.as_os_str()),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        let verdict = match self.spawn("qemu-probe", &paths, args).await {
            Ok((mut child, _pid)) => {
                let asked = async {
                    let mut qmp = Qmp::connect(&socket).await?;
                    let version = qmp.query_version().await?;
                    let caps = qmp.query_migrate_capabilities().await?;
                    let _ = qmp.quit().await;
                    Ok::<_, crate::qmp::QmpError>((version, caps))
                };
                let verdict = match tokio::time::timeout(QMP_TIMEOUT, asked).await {
                    Ok(Ok((version, caps))) => judge_warm(version, &caps),
                    Ok(Err(e)) => WarmSupport::Unsupported(format!("cannot probe QEMU: {e}")),
                    Err(_) => WarmSupport::Unsupported(format!(
                        "cannot probe QEMU: no QMP answer in {}s",
                        QMP_TIMEOUT.as_secs()
                    )),
                };
                if tokio::time::timeout(QUIT_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    kill_and_reap(&mut child).await;
                }
                verdict
            }
            Err(e) => WarmSupport::Unsupported(format!("cannot probe QEMU: {e}")),
        };
        let _ = std::fs::remove_dir_all(&dir);
        verdict
    }

    /// Waits until QEMU answers on QMP, or it exits, or time runs out.
    async fn wait_ready(&self, child: &mut Child, paths: &VmPaths) -> Result<(), VmmError> {
        let socket = paths.control_socket();
        let ready = async {
            loop {
                match Qmp::connect(&socket).await {
                    Ok(mut qmp) => return qmp.query_status().await.map(drop),
                    Err(e) if e.is_not_listening() => tokio::time::sleep(CONNECT_RETRY).await,
                    Err(e) => return Err(e),
                }
            }
        };
        match wait_startup(child, self.startup_timeout, ready).await {
            Startup::Ready(Ok(())) => Ok(()),
            Startup::Exited(status) => Err(self.early_exit(status, paths)),
            // A monitor that drops the connection usually belongs to a QEMU
            // that found a fatal problem after its monitor came up.
            Startup::Ready(Err(e)) => match tokio::time::timeout(QMP_TIMEOUT, child.wait()).await {
                Ok(status) => Err(self.early_exit(status, paths)),
                Err(_) => Err(e.into()),
            },
            Startup::TimedOut => Err(VmmError::Timeout {
                what: format!("{} to answer on {}", self.binary_name(), socket.display()),
                secs: self.startup_timeout.as_secs(),
            }),
        }
    }

    fn early_exit(&self, status: std::io::Result<ExitStatus>, paths: &VmPaths) -> VmmError {
        let log = paths.vmm_log();
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let tail = std::fs::read(&log)
            .map(|b| log_tail(&b, 5))
            .unwrap_or_default();
        let detail = if tail.is_empty() {
            status
        } else {
            format!("{status}: {tail}")
        };
        VmmError::EarlyExit {
            binary: self.binary_name(),
            detail,
            log,
        }
    }
}

static PROBE_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Bounds one QMP exchange by [`QMP_TIMEOUT`].
async fn qmp_bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, crate::qmp::QmpError>>,
) -> Result<T, VmmError> {
    match tokio::time::timeout(QMP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(VmmError::Timeout {
            what: format!("QMP {what}"),
            secs: QMP_TIMEOUT.as_secs(),
        }),
    }
}

fn check_macs(nets: &[crate::NetSpec]) -> Result<(), VmmError> {
    if let Some(net) = nets.iter().find(|n| !is_valid_mac(&n.mac)) {
        return Err(VmmError::Spec(format!(
            "network interface on {}: MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
            net.describe(),
            net.mac
        )));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Vmm for QemuVmm {
    fn backend(&self) -> VmBackend {
        VmBackend::Qemu
    }

    fn guest_exit(&self) -> GuestExit {
        GuestExit::PowerOff
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        check_macs(&spec.nets)?;
        if let Some(file) = &spec.memory_file {
            create_memory_file(file, spec.memory_mib)?;
        }
        let paths = VmPaths::new(&spec.dir);
        let args = qemu_args(spec, self.accel, self.tsc_khz);
        let (child, pid) = self.spawn(&spec.name, &paths, args).await?;
        Ok(Launched {
            pid,
            agent: AgentEndpoint::Connect(paths.agent_socket()),
            exited: reaper("QEMU", &spec.name, pid, child),
        })
    }

    fn reattach_agent(&self, dir: &Path) -> Result<AgentEndpoint, VmmError> {
        let socket = VmPaths::new(dir).agent_socket();
        let meta = std::fs::symlink_metadata(&socket)
            .map_err(|e| VmmError::io(format!("agent socket {}", socket.display()), e))?;
        if !meta.file_type().is_socket() {
            return Err(VmmError::io(
                format!("agent socket {}", socket.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a socket"),
            ));
        }
        Ok(AgentEndpoint::Connect(socket))
    }

    /// Presses the ACPI power button (microvm's generic event device). The
    /// guest kernel turns it into a KEY_POWER input event; something in the
    /// guest (systemd-logind, acpid or the agent) must act on it, so callers
    /// should fall back to the agent or `terminate` when the VM does not
    /// exit in time.
    async fn request_shutdown(&self, dir: &Path) -> Result<(), VmmError> {
        let socket = VmPaths::new(dir).control_socket();
        let powerdown = async {
            let mut qmp = Qmp::connect(&socket).await?;
            qmp.system_powerdown().await
        };
        tokio::time::timeout(QMP_TIMEOUT, powerdown)
            .await
            .map_err(|_| VmmError::Timeout {
                what: format!("system_powerdown on {}", socket.display()),
                secs: QMP_TIMEOUT.as_secs(),
            })??;
        Ok(())
    }

    async fn terminate(&self, dir: &Path, pid: u32) -> Result<(), VmmError> {
        let Some(pidfd) = PidFd::open_vmm(pid, dir)? else {
            return Ok(());
        };
        let socket = VmPaths::new(dir).control_socket();
        let quit = async { Qmp::connect(&socket).await?.quit().await };
        match tokio::time::timeout(QMP_TIMEOUT, quit).await {
            Ok(Ok(())) => {
                if pidfd.wait_exit(QUIT_GRACE).await {
                    return Ok(());
                }
            }
            Ok(Err(e)) => tracing::debug!(pid, error = %e, "QMP quit failed; killing"),
            Err(_) => tracing::debug!(pid, "QMP quit timed out; killing"),
        }
        pidfd.kill_and_wait(&format!("VMM {pid}")).await
    }

    async fn warm_support(&self) -> WarmSupport {
        self.warm.get_or_init(|| self.probe_warm()).await.clone()
    }

    fn snapshot_memory_at_launch(&self) -> bool {
        true
    }

    /// `stop` (drains and flushes the disks), `x-ignore-shared`, `migrate`
    /// of the device state to `out.vmstate`, wait, `quit`. The guest's RAM
    /// is already `out.memory`: the VM must have been launched with it as
    /// [`LaunchSpec::memory_file`] (checked against QEMU's own backend).
    async fn snapshot(&self, dir: &Path, pid: u32, out: &SnapshotFiles) -> Result<(), VmmError> {
        let pidfd = PidFd::open_vmm(pid, dir)?.ok_or_else(|| {
            VmmError::Control(format!("QEMU {pid} of {} is not running", dir.display()))
        })?;
        let mut qmp = Qmp::connect(&VmPaths::new(dir).control_socket()).await?;
        let backed = qmp_bounded("qom-get", qmp.memory_backend_path(RAM_ID)).await?;
        if backed.as_deref() != Some(out.memory.as_path()) {
            return Err(VmmError::Spec(format!(
                "QEMU {pid}'s memory is not in {} (it was launched with {}): only a VM launched with its memory file can be snapshotted",
                out.memory.display(),
                backed.map_or("anonymous memory".into(), |p| p.display().to_string())
            )));
        }
        // Only now (a refused VM leaves nothing behind): the file holds
        // guest device state, the owner's only. QEMU truncates it and
        // keeps the mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&out.vmstate)
                .map_err(|e| VmmError::io(format!("create {}", out.vmstate.display()), e))?;
        }
        qmp_bounded("stop", qmp.stop()).await?;
        qmp_bounded("migrate-set-capabilities", qmp.set_ignore_shared()).await?;
        qmp_bounded("migrate", qmp.migrate_file(&out.vmstate)).await?;
        qmp.wait_migration("migrate", SNAPSHOT_TIMEOUT)
            .await
            .map_err(|e| VmmError::Snapshot {
                what: "saving the snapshot",
                detail: e.to_string(),
            })?;
        match tokio::time::timeout(QMP_TIMEOUT, qmp.quit()).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => tracing::debug!(pid, error = %e, "QMP quit after snapshot failed"),
        }
        if !pidfd.wait_exit(QUIT_GRACE).await {
            pidfd
                .kill()
                .map_err(|e| VmmError::io(format!("kill VMM {pid}"), e))?;
            if !pidfd.wait_exit(KILL_GRACE).await {
                return Err(VmmError::Timeout {
                    what: format!("VMM {pid} to exit after its snapshot"),
                    secs: KILL_GRACE.as_secs(),
                });
            }
        }
        Ok(())
    }

    /// A `-S -incoming defer` QEMU with the template's machine (kernel,
    /// initrd, command line, MACs) on the clone's files and the template's
    /// memory file mapped privately (nothing is copied: pages fault in as
    /// the guest touches them), `x-ignore-shared`, `migrate-incoming` of
    /// the device state, wait, `cont`.
    async fn restore(&self, spec: &RestoreSpec, disks: DisksReady) -> Result<Launched, VmmError> {
        let launch = incoming_launch(spec)?;
        check_memory_file(&spec.from.memory, launch.memory_mib)?;
        let paths = VmPaths::new(&launch.dir);
        let mode = ArgsMode::Incoming {
            memory: &spec.from.memory,
        };
        let args = qemu_args_for(&launch, self.accel, self.tsc_khz, mode);
        let (mut child, pid) = self.spawn(&launch.name, &paths, args).await?;
        let guard = KillOnDrop::new(pid);
        let loaded = async {
            // Waiting for the incoming stream, QEMU holds its disks
            // inactive: it reads them only after the load.
            if !disks.await {
                return Err(VmmError::DisksUnavailable);
            }
            self.load_and_resume(&paths, &spec.from.vmstate).await
        };
        if let Err(e) = loaded.await {
            guard.disarm();
            kill_and_reap(&mut child).await;
            return Err(e);
        }
        guard.disarm();
        Ok(Launched {
            pid,
            agent: AgentEndpoint::Connect(paths.agent_socket()),
            exited: reaper("QEMU", &launch.name, pid, child),
        })
    }

    /// `block_resize` of drive `disk<index>`: QEMU extends the file and the
    /// guest sees the new capacity.
    async fn grow_disk(&self, dir: &Path, index: usize, bytes: u64) -> Result<(), VmmError> {
        let mut qmp = Qmp::connect(&VmPaths::new(dir).control_socket()).await?;
        qmp_bounded(
            "block_resize",
            qmp.block_resize(&format!("disk{index}"), bytes),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskSpec;
    use crate::{DiskFormat, NetBackend};

    fn spec(dir: &str) -> LaunchSpec {
        LaunchSpec {
            name: "calm-otter".into(),
            dir: dir.into(),
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.img".into()),
            extra_cmdline: "  quiet init=/sbin/banger-init ".into(),
            disks: vec![
                DiskSpec {
                    path: "/img/rootfs.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
                DiskSpec {
                    path: "/vms/a/overlay.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                },
            ],
            nets: Vec::new(),
            vcpu: 2,
            memory_mib: 1024,
            memory_file: None,
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag`, for each occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_argv() {
        let args = strings(&qemu_args(&spec("/vms/a"), Accel::Tcg, Some(2_445_404)));
        assert_eq!(
            values(&args, "-M"),
            ["microvm,x-option-roms=off,acpi=on,isa-serial=on"]
        );
        assert_eq!(values(&args, "-accel"), ["tcg"]);
        assert_eq!(values(&args, "-cpu"), ["max"]);
        assert_eq!(values(&args, "-bios"), ["qboot.rom"]);
        assert_eq!(values(&args, "-m"), ["1024M"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/img/initrd.img"]);
        assert_eq!(values(&args, "-pidfile"), ["/vms/a/vmm.pid"]);
        assert_eq!(values(&args, "-name"), ["guest=calm-otter"]);
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert_eq!(values(&args, "-display"), ["none"]);
        assert_eq!(
            values(&args, "-append"),
            [
                "console=ttyS0 panic=-1 tsc_early_khz=2445404 tsc=reliable quiet init=/sbin/banger-init"
            ]
        );
        assert_eq!(
            values(&args, "-drive"),
            [
                "if=none,id=disk0,format=raw,file.driver=file,file.filename=/img/rootfs.ext4,readonly=on,cache=writeback",
                "if=none,id=disk1,format=qcow2,file.driver=file,file.filename=/vms/a/overlay.qcow2,readonly=off,cache=writeback,discard=unmap",
            ]
        );
        assert_eq!(
            values(&args, "-chardev"),
            [
                "file,id=console,append=on,path=/vms/a/console.log",
                "socket,id=agent,server=on,wait=off,path=/vms/a/agent.sock",
                "socket,id=qmp,server=on,wait=off,path=/vms/a/control.sock",
            ]
        );
        assert_eq!(values(&args, "-serial"), ["chardev:console"]);
        assert_eq!(values(&args, "-mon"), ["chardev=qmp,mode=control"]);
        let devices = values(&args, "-device");
        assert_eq!(
            devices,
            [
                "virtio-blk-device,drive=disk0",
                "virtio-blk-device,drive=disk1",
                "virtio-serial-device,id=vserial",
                "virtserialport,bus=vserial.0,chardev=agent,name=org.banger.agent",
                "virtio-rng-device",
            ]
        );
    }

    #[test]
    fn kvm_argv_uses_host_cpu_and_no_tsc_override() {
        let mut s = spec("/vms/a");
        s.initrd = None;
        s.disks.clear();
        s.extra_cmdline.clear();
        let args = strings(&qemu_args(&s, Accel::Kvm, Some(2_445_404)));
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        assert!(values(&args, "-initrd").is_empty());
        assert!(values(&args, "-drive").is_empty());
        assert_eq!(values(&args, "-append"), ["console=ttyS0 panic=-1"]);
    }

    #[test]
    fn taps_become_virtio_net_devices() {
        let mut s = spec("/vms/a");
        s.nets = vec![
            crate::NetSpec::tap("tap-calm", "06:00:ac:10:00:02"),
            crate::NetSpec::tap("odd,tap", "06:00:ac:10:00:03"),
        ];
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert_eq!(
            values(&args, "-netdev"),
            [
                "tap,id=net0,ifname=tap-calm,script=no,downscript=no",
                "tap,id=net1,ifname=odd,,tap,script=no,downscript=no",
            ]
        );
        let devices = values(&args, "-device");
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02"));
        assert!(devices.contains(&"virtio-net-device,netdev=net1,mac=06:00:ac:10:00:03"));
    }

    #[test]
    fn user_mode_network_forwards_ports() {
        let mut s = spec("/vms/a");
        s.nets = vec![crate::NetSpec {
            backend: NetBackend::User {
                net: "10.0.2.0".parse().expect("ip"),
                prefix: 24,
                host: "10.0.2.2".parse().expect("ip"),
                dns: "10.0.2.3".parse().expect("ip"),
                guest: "10.0.2.15".parse().expect("ip"),
                forwards: vec![crate::HostForward {
                    host: "127.0.0.1:2222".parse().expect("addr"),
                    guest_port: 22,
                }],
            },
            mac: "06:00:0a:00:02:0f".into(),
        }];
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert_eq!(
            values(&args, "-netdev"),
            [
                "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,ipv6=off,hostfwd=tcp:127.0.0.1:2222-10.0.2.15:22"
            ]
        );
    }

    #[test]
    fn tcg_without_known_tsc_omits_it() {
        assert_eq!(
            kernel_cmdline(Accel::Tcg, None, ""),
            "console=ttyS0 panic=-1"
        );
    }

    #[test]
    fn commas_in_paths_are_escaped_and_dir_stays_verbatim() {
        let mut s = spec("/vms/odd,dir");
        s.name = "a,b".into();
        s.disks.truncate(1);
        s.disks[0].path = "/img/x,format=qcow2".into();
        let args = strings(&qemu_args(&s, Accel::Tcg, Some(1)));
        assert_eq!(values(&args, "-name"), ["guest=a,,b"]);
        assert!(
            values(&args, "-drive")[0].contains("file.filename=/img/x,,format=qcow2,readonly=on")
        );
        assert!(
            values(&args, "-chardev")
                .iter()
                .all(|c| c.contains("/vms/odd,,dir/"))
        );
        // -pidfile is a plain argument: the VM dir appears as is, which is
        // what vmm_process_alive looks for.
        assert_eq!(values(&args, "-pidfile"), ["/vms/odd,dir/vmm.pid"]);
    }

    #[test]
    fn incoming_argv_is_the_boot_argv_on_private_memory_paused_for_a_stream() {
        let s = spec("/vms/a");
        let boot = strings(&qemu_args(&s, Accel::Tcg, Some(1)));
        assert!(!boot.iter().any(|a| a == "-object"), "{boot:?}");
        let memory = Path::new("/t/tpl,1/memory");
        let mode = ArgsMode::Incoming { memory };
        let mut incoming = strings(&qemu_args_for(&s, Accel::Tcg, Some(1), mode));
        let at = incoming
            .iter()
            .position(|a| a == "-object")
            .expect("-object");
        let ram: Vec<String> = incoming.drain(at..at + 4).collect();
        assert_eq!(
            ram,
            [
                "-object",
                "memory-backend-file,id=ram,size=1024M,share=off,readonly=on,rom=off,mem-path=/t/tpl,,1/memory",
                "-machine",
                "memory-backend=ram",
            ]
        );
        assert_eq!(incoming[..boot.len()], boot[..]);
        assert_eq!(incoming[boot.len()..], ["-S", "-incoming", "defer"]);
    }

    #[test]
    fn a_memory_file_launch_maps_it_shared() {
        let mut s = spec("/vms/a");
        s.memory_file = Some("/vms/a/memory".into());
        let args = strings(&qemu_args(&s, Accel::Tcg, Some(1)));
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=ram,size=1024M,share=on,mem-path=/vms/a/memory"]
        );
        assert!(values(&args, "-machine").contains(&"memory-backend=ram"));
    }

    #[test]
    fn memory_files_are_made_and_checked_at_the_guest_size() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("memory");
        std::fs::write(&f, b"old").expect("w");
        create_memory_file(&f, 2).expect("create");
        let meta = std::fs::metadata(&f).expect("meta");
        assert_eq!(meta.len(), 2 << 20);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        check_memory_file(&f, 2).expect("fits");
        let err = check_memory_file(&f, 4).expect_err("short");
        assert!(
            err.to_string()
                .contains("is 2097152 bytes, the guest has 4194304"),
            "{err}"
        );
    }

    #[test]
    fn restore_uses_the_template_macs_and_the_clone_backends() {
        let mut launch = spec("/vms/clone");
        launch.nets = vec![crate::NetSpec::tap("tap-clone", "06:00:ac:10:00:09")];
        let r = RestoreSpec {
            launch,
            from: SnapshotFiles {
                memory: "/t/memory".into(),
                vmstate: "/t/vmstate".into(),
            },
            template_nets: vec![crate::NetSpec::tap("tap-tpl", "06:00:00:00:00:01")],
        };
        let l = incoming_launch(&r).expect("launch");
        assert_eq!(
            l.nets,
            [crate::NetSpec::tap("tap-clone", "06:00:00:00:00:01")]
        );

        let mut fewer = r.clone();
        fewer.template_nets.clear();
        assert!(matches!(incoming_launch(&fewer), Err(VmmError::Spec(_))));
        let mut user = r.clone();
        user.template_nets[0].backend = NetBackend::User {
            net: "10.0.2.0".parse().expect("ip"),
            prefix: 24,
            host: "10.0.2.2".parse().expect("ip"),
            dns: "10.0.2.3".parse().expect("ip"),
            guest: "10.0.2.15".parse().expect("ip"),
            forwards: Vec::new(),
        };
        let err = incoming_launch(&user).expect_err("kind differs");
        assert!(err.to_string().contains("network kind must match"), "{err}");
    }

    #[test]
    fn warm_needs_qemu_8_2_with_ignore_shared() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            judge_warm((10, 0, 2), &caps(&["xbzrle", "x-ignore-shared"])),
            WarmSupport::Supported {
                id: "QEMU 10.0.2".into()
            }
        );
        let old = judge_warm((8, 1, 5), &caps(&["x-ignore-shared"]));
        assert!(
            matches!(&old, WarmSupport::Unsupported(why) if why.contains("QEMU 8.1.5") && why.contains(">= 8.2")),
            "{old:?}"
        );
        let no_cap = judge_warm((9, 1, 0), &caps(&["xbzrle"]));
        assert!(
            matches!(&no_cap, WarmSupport::Unsupported(why) if why.contains("no x-ignore-shared")),
            "{no_cap:?}"
        );
    }

    #[test]
    fn accel_follows_kvm_status() {
        assert_eq!(
            Accel::for_host(&KvmStatus::Usable { api_version: 12 }),
            Accel::Kvm
        );
        let pvm = KvmStatus::Unusable(host::KvmProblem::PvmOnly {
            pvm_module: true,
            cpu_virt_flags: false,
        });
        assert_eq!(Accel::for_host(&pvm), Accel::Tcg);
    }

    #[test]
    fn log_tail_is_one_line() {
        let log = b"qemu: warning: a\n\n  qemu: -drive x: Could not open 'x'  \n";
        assert_eq!(
            log_tail(log, 5),
            "qemu: warning: a; qemu: -drive x: Could not open 'x'"
        );
        assert_eq!(log_tail(b"1\n2\n3\n", 2), "2; 3");
        assert_eq!(log_tail(b"", 2), "");
    }

    #[test]
    fn missing_binary_names_the_config_key() {
        let err = QemuVmm::from_host(Some(Path::new("/nonexistent/qemu"))).expect_err("missing");
        assert!(
            matches!(
                err,
                VmmError::BinaryMissing {
                    config_key: "qemu_bin",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
