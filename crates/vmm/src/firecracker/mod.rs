//! Firecracker backend: the `firecracker` process is started with only its
//! API socket, then configured through the API (logger, metrics, machine,
//! boot source, drives, network, vsock, entropy) and started with
//! `InstanceStart`.
//!
//! The agent channel is hybrid vsock: the guest agent connects to the host
//! (CID 2) on [`VSOCK_PORT`], and Firecracker forwards that connection to
//! the Unix socket `<dir>/agent.sock_<port>`, on which banger listens. The
//! agent reconnects in a loop, so after a daemon restart banger only has to
//! listen there again.

pub mod api;
pub mod client;
mod config;
pub mod version;
mod warm;

pub use client::{ApiClient, ApiError};
use config::logger;
pub use config::{VmConfig, boot_args, drive_name, firecracker_args, vm_config, vm_relative};
pub use version::{
    MIN_SUPPORTED, TESTED, VersionVerdict, check_version, firecracker_version, judge_version,
    parse_firecracker_version,
};
pub use warm::{
    MIN_WARM, judge_warm, network_overrides, punch_zero_pages, snapshot_create_params,
    snapshot_load_params,
};

use crate::host::{self};
use crate::process::{
    KillOnDrop, PidFd, SpawnFailure, Startup, kill_and_reap, log_tail, reaper, spawn_checked,
    wait_startup,
};
use crate::{
    AgentEndpoint, DisksReady, GuestExit, LaunchSpec, Launched, RestoreSpec, SnapshotFiles,
    VmPaths, Vmm, VmmError, WarmSupport, vmm_process_alive,
};
use api::{ActionType, Metrics, NetworkOverride, PartialDrive, VmState};
use banger_agent_proto::VSOCK_PORT;
use banger_model::VmBackend;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

/// Name of the Firecracker binary looked up in PATH.
pub const FIRECRACKER_BINARY: &str = "firecracker";
/// Config key that overrides the binary's location.
pub const FIRECRACKER_CONFIG_KEY: &str = "firecracker_bin";
/// The guest's vsock context id (0-2 are reserved; one guest per VMM).
pub const GUEST_CID: u32 = 3;
/// Kernel arguments banger always passes; Firecracker appends `pci=off` and
/// its virtio-mmio device list itself. `reboot=k` makes a guest reboot
/// reach Firecracker (through the i8042 keyboard controller), which then
/// exits, and `panic=1` turns a guest panic into such a reboot. The root
/// device and its `ro`/`rw` come from the caller's arguments only (no
/// drive is Firecracker's root device, so it adds none of its own).
pub const BASE_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// How long Firecracker gets to answer on its API socket after spawn. It
/// normally does within milliseconds.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the `InstanceStart` call (see [`FirecrackerVmm::configure`]);
/// the guest's boot has its own, longer bound.
const INSTANCE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the API socket is retried while Firecracker starts; it gives
/// no other signal that its API thread is up.
const CONNECT_RETRY: Duration = Duration::from_millis(2);
/// After a failed API call, how long to wait for the process to turn out
/// to have exited (so the error can quote its log instead).
const EXIT_CHECK: Duration = Duration::from_secs(1);
/// Bound on `PUT /snapshot/create`, which writes all guest memory.
const SNAPSHOT_CREATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on `PUT /snapshot/load` (maps the memory file; pages come in lazily).
const SNAPSHOT_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The Unix socket the host listens on for the guest agent's connection:
/// `<dir>/agent.sock_<VSOCK_PORT>`.
pub fn agent_listener_path(dir: &Path) -> PathBuf {
    let mut p = VmPaths::new(dir).agent_socket().into_os_string();
    p.push(format!("_{VSOCK_PORT}"));
    PathBuf::from(p)
}

/// Where Firecracker writes its JSON metrics.
pub fn metrics_path(dir: &Path) -> PathBuf {
    dir.join("metrics.json")
}

/// Removes a file if it exists (a socket left by an earlier run).
fn remove_stale(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io(
            format!("removing stale {}", path.display()),
            e,
        )),
    }
}

/// Listens on the agent's vsock socket, replacing a stale socket file.
fn bind_agent_listener(dir: &Path) -> Result<UnixListener, VmmError> {
    let path = agent_listener_path(dir);
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(VmmError::io(
            format!("listening on {}", path.display()),
            std::io::Error::other("not inside a Tokio runtime"),
        ));
    }
    remove_stale(&path)?;
    UnixListener::bind(&path)
        .map_err(|e| VmmError::io(format!("listening on {}", path.display()), e))
}

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    binary: PathBuf,
    startup_timeout: Duration,
    request_timeout: Duration,
    /// [`Vmm::warm_support`], probed once per backend value.
    warm: std::sync::Arc<std::sync::OnceLock<WarmSupport>>,
}

impl FirecrackerVmm {
    /// Finds the binary: `firecracker_bin` from config (a bare name is
    /// looked up in PATH), else `firecracker` in PATH.
    pub fn from_host(configured_bin: Option<&Path>) -> Result<Self, VmmError> {
        let binary = host::find_binary(FIRECRACKER_BINARY, configured_bin).ok_or_else(|| {
            VmmError::BinaryMissing {
                binary: configured_bin.map_or_else(
                    || FIRECRACKER_BINARY.to_owned(),
                    |p| p.display().to_string(),
                ),
                config_key: FIRECRACKER_CONFIG_KEY,
            }
        })?;
        Ok(Self::new(binary))
    }

    /// A backend running `binary`.
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            request_timeout: client::DEFAULT_REQUEST_TIMEOUT,
            warm: Default::default(),
        }
    }

    /// How long `launch` waits for the API socket to answer.
    pub fn with_startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Bound on each API request.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    fn api(&self, dir: &Path) -> ApiClient {
        ApiClient::new(VmPaths::new(dir).control_socket()).with_timeout(self.request_timeout)
    }

    /// Truncates the logs and metrics file (Firecracker opens them but does
    /// not create them) and removes sockets an earlier run left, which
    /// Firecracker would refuse to bind.
    fn prepare_dir(&self, paths: &VmPaths) -> Result<(std::fs::File, std::fs::File), VmmError> {
        for stale in paths.runtime_files() {
            remove_stale(&stale)?;
        }
        let create = |path: PathBuf, append: bool| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| {
                    if append {
                        // Reopened in append mode so Firecracker's own
                        // stderr never writes over the logger's lines.
                        drop(f);
                        std::fs::OpenOptions::new().append(true).open(&path)
                    } else {
                        Ok(f)
                    }
                })
                .map_err(|e| VmmError::io(format!("creating {}", path.display()), e))
        };
        create(metrics_path(&paths.dir), false)?;
        // Appended to, so the daemon can rotate it (`logcap`).
        let console = create(paths.console_log(), true)?;
        let log = create(paths.vmm_log(), true)?;
        Ok((console, log))
    }

    /// Spawns Firecracker for the VM of `spec` in its directory (relative
    /// paths resolve there) with its logs prepared; returns once the API
    /// answers. On error nothing is left running.
    async fn spawn(&self, spec: &LaunchSpec) -> Result<(Child, u32), VmmError> {
        let paths = VmPaths::new(&spec.dir);
        let (console, log) = self.prepare_dir(&paths)?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(firecracker_args(spec))
            .current_dir(&spec.dir)
            // Firecracker's stdout is the guest's serial console.
            .stdout(console)
            .stderr(log);
        let ready = async |child: &mut Child, pid: u32| {
            std::fs::write(paths.pid_file(), format!("{pid}\n"))
                .map_err(|e| VmmError::io(format!("writing {}", paths.pid_file().display()), e))?;
            self.wait_ready(child, &paths).await
        };
        match spawn_checked("Firecracker", &spec.name, self.binary_name(), cmd, ready).await {
            Ok(s) => Ok((s.child, s.pid)),
            Err(SpawnFailure::Exited(status)) => Err(self.early_exit(status, &paths)),
            Err(SpawnFailure::Vmm(e)) => Err(e),
        }
    }

    /// Logger and metrics, the agent listener, `PUT /snapshot/load` (not
    /// resumed), `PATCH /vm Resumed`.
    async fn load_and_resume(
        &self,
        spec: &RestoreSpec,
        vmstate: &Path,
        overrides: Vec<NetworkOverride>,
    ) -> Result<UnixListener, VmmError> {
        let dir = &spec.launch.dir;
        let paths = VmPaths::new(dir);
        let api = self.api(dir);
        api.put_logger(&logger(&paths)).await?;
        api.put_metrics(&Metrics {
            metrics_path: metrics_path(dir),
        })
        .await?;
        // Bound before the guest runs: its agent reconnects at once after
        // the vsock reset the snapshot recorded.
        let listener = bind_agent_listener(dir)?;
        api.clone()
            .with_timeout(self.request_timeout.max(SNAPSHOT_LOAD_TIMEOUT))
            .put_snapshot_load(&snapshot_load_params(vmstate, &spec.from.memory, overrides))
            .await?;
        api.patch_vm(VmState::Resumed).await?;
        Ok(listener)
    }

    /// `firecracker --version` (>= [`MIN_WARM`]) and a usable /dev/kvm.
    fn probe_warm(&self) -> WarmSupport {
        let version = match firecracker_version(&self.binary) {
            Ok(v) => v,
            Err(e) => return WarmSupport::Unsupported(format!("Firecracker version unknown: {e}")),
        };
        judge_warm(version, &host::kvm_status())
    }

    /// Waits until the API answers `GET /`, or the process exits, or time
    /// runs out.
    async fn wait_ready(&self, child: &mut Child, paths: &VmPaths) -> Result<(), VmmError> {
        let api = self.api(&paths.dir);
        let ready = async {
            loop {
                match api.describe_instance().await {
                    Ok(info) => {
                        tracing::debug!(id = %info.id, version = %info.vmm_version, "Firecracker API up");
                        return Ok(());
                    }
                    Err(e) if e.is_not_listening() => tokio::time::sleep(CONNECT_RETRY).await,
                    Err(e) => return Err(e),
                }
            }
        };
        match wait_startup(child, self.startup_timeout, ready).await {
            Startup::Ready(Ok(())) => Ok(()),
            Startup::Exited(status) => Err(self.early_exit(status, paths)),
            Startup::Ready(Err(e)) => Err(e.into()),
            Startup::TimedOut => Err(VmmError::Timeout {
                what: format!(
                    "{} to answer on {}",
                    self.binary_name(),
                    paths.control_socket().display()
                ),
                secs: self.startup_timeout.as_secs(),
            }),
        }
    }

    /// Sends the whole configuration, then `InstanceStart`. The agent
    /// listener is bound before the guest can connect.
    async fn configure(
        &self,
        paths: &VmPaths,
        config: &VmConfig,
    ) -> Result<UnixListener, VmmError> {
        let api = self.api(&paths.dir);
        api.put_logger(&config.logger).await?;
        api.put_metrics(&config.metrics).await?;
        api.put_machine_config(&config.machine).await?;
        api.put_boot_source(&config.boot).await?;
        for drive in &config.drives {
            api.put_drive(drive).await?;
        }
        for net in &config.nets {
            api.put_network_interface(net).await?;
        }
        let listener = bind_agent_listener(&paths.dir)?;
        api.put_vsock(&config.vsock).await?;
        api.put_entropy(&config.entropy).await?;
        // InstanceStart loads the kernel and initrd into guest memory and
        // sets up the vCPUs before it answers: on a loaded or nested host
        // that takes longer than a configuration call.
        api.with_timeout(self.request_timeout.max(INSTANCE_START_TIMEOUT))
            .action(ActionType::InstanceStart)
            .await?;
        Ok(listener)
    }

    /// An API error, or the process's own account when it turns out to
    /// have exited (a refused connection or a dropped answer usually means
    /// Firecracker died).
    async fn explain(&self, err: VmmError, child: &mut Child, paths: &VmPaths) -> VmmError {
        let gone =
            matches!(&err, VmmError::FirecrackerApi(e) if !matches!(e, ApiError::Rejected { .. }));
        if gone && let Ok(status) = tokio::time::timeout(EXIT_CHECK, child.wait()).await {
            return self.early_exit(status, paths);
        }
        err
    }

    fn early_exit(&self, status: std::io::Result<ExitStatus>, paths: &VmPaths) -> VmmError {
        let log = paths.vmm_log();
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        // Before its logger is configured Firecracker logs to stdout, which
        // is the console log.
        let tail = [log.clone(), paths.console_log()]
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|b| log_tail(&b, 5))
            .find(|t| !t.is_empty())
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

#[async_trait::async_trait]
impl Vmm for FirecrackerVmm {
    fn backend(&self) -> VmBackend {
        VmBackend::Firecracker
    }

    fn guest_exit(&self) -> GuestExit {
        GuestExit::Reboot
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let config = vm_config(spec)?;
        let paths = VmPaths::new(&spec.dir);
        let (mut child, pid) = self.spawn(spec).await?;
        let guard = KillOnDrop::new(pid);
        let listener = match self.configure(&paths, &config).await {
            Ok(l) => l,
            Err(e) => {
                let e = self.explain(e, &mut child, &paths).await;
                guard.disarm();
                kill_and_reap(&mut child).await;
                let _ = std::fs::remove_file(agent_listener_path(&spec.dir));
                return Err(e);
            }
        };
        guard.disarm();
        Ok(Launched {
            pid,
            agent: AgentEndpoint::Accept(listener),
            exited: reaper("Firecracker", &spec.name, pid, child),
        })
    }

    /// Listens again on the agent's socket; the guest agent reconnects by
    /// itself once its old connection is gone. Must run inside a Tokio
    /// runtime.
    fn reattach_agent(&self, dir: &Path) -> Result<AgentEndpoint, VmmError> {
        bind_agent_listener(dir).map(AgentEndpoint::Accept)
    }

    /// Presses Ctrl-Alt-Del: the guest reboots, which with `reboot=k` ends
    /// Firecracker. Callers should fall back to `terminate` when the VM
    /// does not exit in time.
    async fn request_shutdown(&self, dir: &Path) -> Result<(), VmmError> {
        self.api(dir).action(ActionType::SendCtrlAltDel).await?;
        Ok(())
    }

    async fn terminate(&self, dir: &Path, pid: u32) -> Result<(), VmmError> {
        if let Some(pidfd) = PidFd::open_vmm(pid, dir)? {
            pidfd.kill_and_wait(&format!("Firecracker {pid}")).await?;
        }
        // Nobody will connect to it any more.
        remove_stale(&agent_listener_path(dir))
    }

    async fn warm_support(&self) -> WarmSupport {
        if let Some(w) = self.warm.get() {
            return w.clone();
        }
        let this = self.clone();
        let probed = tokio::task::spawn_blocking(move || this.probe_warm())
            .await
            .unwrap_or_else(|e| WarmSupport::Unsupported(format!("probing Firecracker: {e}")));
        self.warm.get_or_init(|| probed).clone()
    }

    /// `PATCH /vm Paused`, `PUT /snapshot/create` (full), then the process
    /// is killed: the snapshotted guest never runs again. The memory file's
    /// zero pages are then punched out (it keeps its size).
    async fn snapshot(&self, dir: &Path, pid: u32, out: &SnapshotFiles) -> Result<(), VmmError> {
        let vmstate = out.vmstate.as_path();
        if !vmm_process_alive(pid, dir) {
            return Err(VmmError::Control(format!(
                "Firecracker {pid} of {} is not running",
                dir.display()
            )));
        }
        // Both files hold guest state: the owner's only. Firecracker
        // truncates them and keeps the mode.
        for f in [vmstate, out.memory.as_path()] {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(f)
                .map_err(|e| VmmError::io(format!("create {}", f.display()), e))?;
        }
        let api = self.api(dir);
        api.patch_vm(VmState::Paused).await?;
        api.with_timeout(self.request_timeout.max(SNAPSHOT_CREATE_TIMEOUT))
            .put_snapshot_create(&snapshot_create_params(vmstate, &out.memory))
            .await?;
        self.terminate(dir, pid).await?;
        let memory = out.memory.clone();
        match tokio::task::spawn_blocking(move || punch_zero_pages(&memory)).await {
            Ok(Ok(bytes)) => tracing::debug!(pid, bytes, "zero pages of the memory file punched"),
            // The file is whole either way, only larger on disk.
            Ok(Err(e)) => {
                tracing::warn!(pid, error = %e, "cannot punch the memory file's zero pages")
            }
            Err(e) => tracing::warn!(pid, error = %e, "punching the memory file's zero pages"),
        }
        Ok(())
    }

    /// A fresh Firecracker in the clone's directory loads the template's
    /// state: drives and vsock were given relative to the template's
    /// directory, so they resolve to the clone's copies; TAPs are
    /// overridden.
    async fn restore(&self, spec: &RestoreSpec, disks: DisksReady) -> Result<Launched, VmmError> {
        let vmstate = spec.from.vmstate.as_path();
        let overrides = network_overrides(spec)?;
        let launch = &spec.launch;
        let paths = VmPaths::new(&launch.dir);
        let (mut child, pid) = self.spawn(launch).await?;
        let guard = KillOnDrop::new(pid);
        let loaded = async {
            // The snapshot's load opens the drives.
            if !disks.await {
                return Err(VmmError::DisksUnavailable);
            }
            self.load_and_resume(spec, vmstate, overrides).await
        };
        let listener = match loaded.await {
            Ok(l) => l,
            Err(e) => {
                let e = self.explain(e, &mut child, &paths).await;
                guard.disarm();
                kill_and_reap(&mut child).await;
                let _ = std::fs::remove_file(agent_listener_path(&launch.dir));
                return Err(e);
            }
        };
        guard.disarm();
        Ok(Launched {
            pid,
            agent: AgentEndpoint::Accept(listener),
            exited: reaper("Firecracker", &launch.name, pid, child),
        })
    }

    /// Extends the file and `PATCH /drives/{id}`: Firecracker re-reads the
    /// size and raises a config interrupt in the guest.
    async fn grow_disk(&self, dir: &Path, index: usize, bytes: u64) -> Result<(), VmmError> {
        let api = self.api(dir);
        let drive_id = drive_name(index);
        let config = api.vm_config().await?;
        let on_host = config
            .get("drives")
            .and_then(serde_json::Value::as_array)
            .and_then(|drives| {
                drives.iter().find(|d| {
                    d.get("drive_id").and_then(serde_json::Value::as_str) == Some(&drive_id)
                })
            })
            .and_then(|d| d.get("path_on_host"))
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| {
                VmmError::Control(format!(
                    "Firecracker of {} has no drive {drive_id}",
                    dir.display()
                ))
            })?;
        let file = dir.join(&on_host);
        let current = std::fs::metadata(&file)
            .map_err(|e| VmmError::io(format!("disk {}", file.display()), e))?
            .len();
        if bytes < current {
            return Err(VmmError::Spec(format!(
                "disk {} is {current} bytes; disks only grow, so {bytes} bytes is refused",
                file.display()
            )));
        }
        if bytes == current {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| VmmError::io(format!("extending {}", file.display()), e))?;
        api.patch_drive(&PartialDrive {
            drive_id,
            path_on_host: Some(on_host),
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::config::instance_id;
    use super::*;
    use crate::host::Version;
    use crate::{DiskFormat, DiskSpec, NetSpec};

    fn spec(dir: &Path, kernel: &Path) -> LaunchSpec {
        LaunchSpec {
            name: "calm otter".into(),
            dir: dir.join("vm"),
            kernel: kernel.to_path_buf(),
            initrd: Some("/img/initrd.img".into()),
            extra_cmdline: " systemd.hostname=calm ".into(),
            disks: vec![
                DiskSpec {
                    path: "/img/rootfs.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
                DiskSpec {
                    path: "/img/data.raw".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
            ],
            nets: vec![NetSpec::tap("tap0", "06:00:AC:10:00:02")],
            vcpu: 2,
            memory_mib: 512,
            memory_file: None,
        }
    }

    fn elf_kernel(dir: &Path) -> PathBuf {
        let p = dir.join("vmlinux");
        std::fs::write(&p, b"\x7fELF\x02\x01\x01rest").expect("kernel");
        p
    }

    #[test]
    fn config_from_spec() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spec(tmp.path(), &elf_kernel(tmp.path()));
        let c = vm_config(&s).expect("config");
        let vm = tmp.path().join("vm");
        assert_eq!(c.logger.log_path, vm.join("vmm.log"));
        assert_eq!(c.metrics.metrics_path, vm.join("metrics.json"));
        assert_eq!(c.machine.vcpu_count, 2);
        assert_eq!(c.machine.mem_size_mib, 512);
        assert_eq!(
            c.boot.boot_args.as_deref(),
            Some("console=ttyS0 reboot=k panic=1 systemd.hostname=calm")
        );
        assert_eq!(c.boot.initrd_path, Some(PathBuf::from("/img/initrd.img")));
        assert_eq!(
            c.drives
                .iter()
                .map(|d| (d.drive_id.as_str(), d.is_read_only, d.is_root_device))
                .collect::<Vec<_>>(),
            [("vda", false, false), ("vdb", true, false)]
        );
        assert_eq!(c.nets.len(), 1);
        assert_eq!(c.nets[0].iface_id, "eth0");
        assert_eq!(c.nets[0].host_dev_name, "tap0");
        assert_eq!(c.nets[0].guest_mac.as_deref(), Some("06:00:ac:10:00:02"));
        assert_eq!(c.vsock.guest_cid, 3);
        // Relative to the VM dir, where Firecracker runs (see `vm_relative`).
        assert_eq!(c.vsock.uds_path, Path::new("agent.sock"));
        assert_eq!(agent_listener_path(&vm), vm.join("agent.sock_1024"));
    }

    #[test]
    fn refuses_what_firecracker_cannot_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kernel = elf_kernel(tmp.path());

        let mut s = spec(tmp.path(), &kernel);
        s.disks[1].format = DiskFormat::Qcow2;
        let e = vm_config(&s).expect_err("qcow2");
        assert!(matches!(e, VmmError::Spec(_)), "{e:?}");
        assert!(e.to_string().contains("/img/data.raw is qcow2"), "{e}");
        assert!(e.to_string().contains("raw disk images only"), "{e}");

        let bz = tmp.path().join("bzImage");
        std::fs::write(&bz, b"MZ\x00\x00 not elf").expect("write");
        let e = vm_config(&spec(tmp.path(), &bz)).expect_err("bzImage");
        assert!(e.to_string().contains("not an ELF vmlinux"), "{e}");

        let e = vm_config(&spec(tmp.path(), &tmp.path().join("missing"))).expect_err("missing");
        assert!(matches!(e, VmmError::Io { .. }), "{e:?}");

        let mut s = spec(tmp.path(), &kernel);
        s.nets[0].mac = "06:00:ac:10:00".into();
        assert!(vm_config(&s).is_err());

        let mut s = spec(tmp.path(), &kernel);
        s.vcpu = 33;
        assert!(vm_config(&s).is_err());
    }

    #[test]
    fn a_memory_file_launch_is_refused() {
        let s = LaunchSpec {
            memory_file: Some("/vms/a/memory".into()),
            ..spec(Path::new("/vms/a"), Path::new("/k"))
        };
        let err = vm_config(&s).expect_err("no file-backed memory");
        assert!(err.to_string().contains("/vms/a/memory"), "{err}");
    }

    #[test]
    fn argv_names_the_vm_dir() {
        let s = LaunchSpec {
            name: "calm otter/é".into(),
            ..spec(Path::new("/vms/a"), Path::new("/k"))
        };
        let args: Vec<String> = firecracker_args(&s)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--api-sock",
                "/vms/a/vm/control.sock",
                "--id",
                "calm-otter--"
            ]
        );
        assert_eq!(instance_id(""), "banger-vm");
        assert_eq!(instance_id(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn drive_names_follow_the_guest() {
        assert_eq!(drive_name(0), "vda");
        assert_eq!(drive_name(25), "vdz");
        assert_eq!(drive_name(26), "vdaa");
        assert_eq!(drive_name(27), "vdab");
    }

    #[test]
    fn files_in_the_vm_dir_are_relative() {
        let dir = Path::new("/vms/a");
        assert_eq!(
            vm_relative(dir, Path::new("/vms/a/overlay.ext4")),
            Path::new("overlay.ext4")
        );
        assert_eq!(
            vm_relative(dir, Path::new("/img/rootfs.ext4")),
            Path::new("/img/rootfs.ext4")
        );
        assert_eq!(
            vm_relative(dir, Path::new("/vms/a/sub/x")),
            Path::new("/vms/a/sub/x")
        );
        assert_eq!(vm_relative(dir, Path::new("/vms/ab")), Path::new("/vms/ab"));
    }

    #[test]
    fn warm_needs_network_overrides_and_kvm() {
        let v = |minor| Version {
            major: 1,
            minor,
            patch: 0,
        };
        let kvm = host::KvmStatus::Usable { api_version: 12 };
        assert_eq!(
            judge_warm(v(14), &kvm),
            WarmSupport::Supported {
                id: "Firecracker v1.14.0".into()
            }
        );
        assert!(matches!(
            judge_warm(v(11), &kvm),
            WarmSupport::Unsupported(why) if why.contains("network_overrides")
        ));
        let no_kvm = host::KvmStatus::Unusable(host::KvmProblem::PvmOnly {
            pvm_module: true,
            cpu_virt_flags: false,
        });
        assert!(matches!(
            judge_warm(v(14), &no_kvm),
            WarmSupport::Unsupported(why) if why.contains("/dev/kvm")
        ));
    }

    #[test]
    fn clone_taps_override_the_templates() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut launch = spec(t.path(), &elf_kernel(t.path()));
        launch.nets = vec![crate::NetSpec::tap("tap-clone", "06:00:ac:10:00:09")];
        let r = RestoreSpec {
            launch,
            from: SnapshotFiles {
                memory: "/t/memory".into(),
                vmstate: "/t/vmstate".into(),
            },
            template_nets: vec![crate::NetSpec::tap("tap-tpl", "06:00:00:00:00:01")],
        };
        assert_eq!(
            network_overrides(&r).expect("overrides"),
            [NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap-clone".into()
            }]
        );
        let mut fewer = r.clone();
        fewer.template_nets.clear();
        assert!(network_overrides(&fewer).is_err());
    }

    #[test]
    fn boot_args_append_extra() {
        assert_eq!(boot_args("  "), BASE_BOOT_ARGS);
        assert_eq!(boot_args(" quiet "), format!("{BASE_BOOT_ARGS} quiet"));
    }

    #[test]
    fn missing_binary_names_the_config_key() {
        let err = FirecrackerVmm::from_host(Some(Path::new("/nonexistent/firecracker")))
            .expect_err("missing");
        assert!(
            matches!(
                err,
                VmmError::BinaryMissing {
                    config_key: "firecracker_bin",
                    ..
                }
            ),
            "{err}"
        );
    }
}
