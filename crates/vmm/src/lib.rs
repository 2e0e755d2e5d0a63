//! Virtual machine monitors behind one trait.
//!
//! A backend turns a [`LaunchSpec`] into a running VMM process and knows how
//! to stop it. It owns nothing else: disks are made by `banger-storage`, the
//! agent stream is spoken by `banger-agent-proto`, state lives in the daemon.
//!
//! The trait is shaped so both QEMU (everything on the command line) and
//! Firecracker (API calls, all configuration before `InstanceStart`) fit:
//! `launch` does whatever the backend needs up to a booting guest.

pub mod console;
pub mod firecracker;
pub mod host;
pub mod logcap;
mod process;
pub mod qemu;
pub mod qmp;
pub mod select;

pub use firecracker::FirecrackerVmm;
pub use qemu::{Accel, QemuVmm};
pub use select::{BackendKind, HostFacts, Selection, VmmChoice, select_backend};

use banger_model::VmBackend;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};

/// Errors from a VMM backend.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "{binary} not found: install it (see `banger doctor`) or set {config_key} in config.toml"
    )]
    BinaryMissing {
        binary: String,
        config_key: &'static str,
    },
    #[error("could not start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} exited during start-up: {detail} (see {log})")]
    EarlyExit {
        binary: String,
        detail: String,
        log: PathBuf,
    },
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("VMM control channel: {0}")]
    Control(String),
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error(transparent)]
    FirecrackerApi(#[from] firecracker::ApiError),
    /// The spec is invalid or asks for something this backend cannot do;
    /// the message says what to change.
    #[error("{0}")]
    Spec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// This backend (binary, version or host) cannot snapshot or restore;
    /// the message says why (the same text as [`WarmSupport::Unsupported`]).
    #[error("warm start unavailable: {0}")]
    WarmUnsupported(String),
    /// Saving or loading a snapshot failed inside the VMM; `detail` is the
    /// VMM's own description.
    #[error("{what} failed: {detail}")]
    Snapshot { what: &'static str, detail: String },
    /// The disk copies a restore waited for could not be made (the caller
    /// knows why).
    #[error("the VM's disk copies could not be made")]
    DisksUnavailable,
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Format of a disk image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// One block device given to the guest, in order (`/dev/vda`, `/dev/vdb`, ...).
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Used in process titles and logs.
    pub name: String,
    /// The VM's runtime directory; the backend puts its sockets and logs here
    /// (see [`VmPaths`]).
    pub dir: PathBuf,
    /// bzImage for QEMU, ELF vmlinux for Firecracker.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Appended to the backend's own kernel arguments (console, root, ...).
    pub extra_cmdline: String,
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in order (`eth0`, ...). Empty for none.
    pub nets: Vec<NetSpec>,
    pub vcpu: u32,
    pub memory_mib: u64,
    /// Guest memory in this file, mapped shared, instead of anonymous
    /// memory: a VM that will be snapshotted under a backend whose
    /// [`Vmm::snapshot_memory_at_launch`] is true (the file then is the
    /// snapshot's memory). `None` for every other launch.
    pub memory_file: Option<PathBuf>,
}

/// One guest network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub backend: NetBackend,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

impl NetSpec {
    /// An interface on host tap device `tap_name`, which must exist.
    pub fn tap(tap_name: impl Into<String>, mac: impl Into<String>) -> Self {
        Self {
            backend: NetBackend::Tap {
                name: tap_name.into(),
            },
            mac: mac.into(),
        }
    }

    /// What the interface is attached to, for error messages.
    pub fn describe(&self) -> String {
        match &self.backend {
            NetBackend::Tap { name } => name.clone(),
            NetBackend::User { .. } => "user-mode network".into(),
        }
    }
}

/// What backs a guest network interface on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// An existing host tap device.
    Tap { name: String },
    /// QEMU's user-mode network stack (no host privileges), with TCP ports
    /// of the host forwarded to the guest. The guest lives in `net`, as
    /// `guest`, with the gateway at `host` and QEMU's resolver at `dns`.
    User {
        net: std::net::Ipv4Addr,
        prefix: u8,
        host: std::net::Ipv4Addr,
        dns: std::net::Ipv4Addr,
        guest: std::net::Ipv4Addr,
        forwards: Vec<HostForward>,
    },
}

/// A TCP port of the host forwarded into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    pub host: std::net::SocketAddrV4,
    pub guest_port: u16,
}

/// Whether `mac` is six colon-separated hex byte pairs.
pub fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Well-known file names inside a VM's directory, shared by all backends so
/// the daemon can find them again after a restart.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// Serial console output of the guest.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VMM's own stdout/stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// Host end of the agent channel.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// The VMM's pid, written after spawn.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    /// Every file a running VMM (of any backend) leaves in the VM's
    /// directory and that means nothing once it is gone. Logs and disks
    /// are not among them.
    pub fn runtime_files(&self) -> [PathBuf; 4] {
        [
            self.agent_socket(),
            firecracker::agent_listener_path(&self.dir),
            self.control_socket(),
            self.pid_file(),
        ]
    }
}

/// How the host reaches the guest agent's byte stream.
#[derive(Debug)]
pub enum AgentEndpoint {
    /// Connect to a Unix socket the VMM serves (QEMU chardev in server mode).
    Connect(PathBuf),
    /// Accept the connection the guest makes (Firecracker vsock to host).
    Accept(UnixListener),
}

impl AgentEndpoint {
    /// Opens the stream. For `Accept` this waits until the guest connects.
    pub async fn open(self) -> std::io::Result<UnixStream> {
        match self {
            AgentEndpoint::Connect(p) => UnixStream::connect(p).await,
            AgentEndpoint::Accept(l) => l.accept().await.map(|(s, _)| s),
        }
    }
}

/// A VMM process that has been started.
#[derive(Debug)]
pub struct Launched {
    pub pid: u32,
    pub agent: AgentEndpoint,
    /// Resolves when the VMM process exits (and reaps it).
    pub exited: tokio::task::JoinHandle<()>,
}

/// Whether a backend can snapshot a running guest and restore it into a new
/// VMM process (warm starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmSupport {
    /// Supported; `id` names the exact VMM build ("Firecracker v1.14.1",
    /// "QEMU 10.0.2"), since a snapshot only loads into the build that made it.
    Supported { id: String },
    /// Not supported; the reason, one line, for `doctor` and cold-start notes.
    Unsupported(String),
}

/// The files a snapshot is written to and restored from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// Guest memory, one byte per byte of guest RAM (sparse where the
    /// guest never wrote).
    pub memory: PathBuf,
    /// Device state (Firecracker's vmstate; QEMU's migration stream, with
    /// the RAM left out).
    pub vmstate: PathBuf,
}

/// Resolves once the disk files a restore names hold their contents:
/// `true`, or `false` when they could not be made (see [`Vmm::restore`]).
pub type DisksReady = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Disks that are complete already, for [`Vmm::restore`].
pub fn disks_ready() -> DisksReady {
    Box::pin(std::future::ready(true))
}

/// Everything needed to start a VMM from a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// The new VM as for a launch: its own `dir`, its own copies of the
    /// template's disks (same order and file names), its own host network
    /// backends (TAP, user-mode forwards); but the template's kernel, initrd,
    /// `extra_cmdline`, vCPU count and memory size, which must be exactly
    /// what the template was launched with. The MACs in `nets` are ignored:
    /// the guest's MAC is the template's until the guest changes it.
    pub launch: LaunchSpec,
    /// The snapshot to load; it is only read (both backends map the memory
    /// file privately for the clone's lifetime: never rewrite it in place).
    pub from: SnapshotFiles,
    /// The template's interfaces as it was launched (same order as
    /// `launch.nets`): their MACs rebuild an identical machine, their host
    /// backends are not used.
    pub template_nets: Vec<NetSpec>,
}

/// What a guest does so that its VMM exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// Power off (QEMU ends on ACPI power-off).
    PowerOff,
    /// Reboot: Firecracker has no power-off device (a powered-off guest
    /// halts and Firecracker keeps running), but with `reboot=k` a guest
    /// reboot ends it.
    Reboot,
}

/// A virtual machine monitor backend.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync {
    fn backend(&self) -> VmBackend;

    /// How the guest must go down for this VMM to exit (the agent is asked
    /// for that when the host stops a VM).
    fn guest_exit(&self) -> GuestExit;

    /// Starts the VMM and boots the guest. Precondition: `spec.dir` and all
    /// disks exist. On error nothing of this call is left running.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError>;

    /// The agent endpoint of a VM that is already running (after a daemon
    /// restart). Precondition: the VMM process `pid` is alive.
    fn reattach_agent(&self, dir: &Path) -> Result<AgentEndpoint, VmmError>;

    /// Asks the guest to power off (ACPI power button / Ctrl-Alt-Del).
    /// Returns once the request is delivered, not when the guest is down.
    async fn request_shutdown(&self, dir: &Path) -> Result<(), VmmError>;

    /// Ends the VMM now. Precondition: none; a VMM that is already gone is fine.
    async fn terminate(&self, dir: &Path, pid: u32) -> Result<(), VmmError>;

    /// Whether [`Vmm::snapshot`] and [`Vmm::restore`] work with this binary on
    /// this host. Probed on first call (may run the VMM binary once) and
    /// cached.
    async fn warm_support(&self) -> WarmSupport;

    /// Whether a VM to be snapshotted must be launched with its memory in
    /// the snapshot's memory file ([`LaunchSpec::memory_file`]): QEMU's
    /// snapshot is that file plus a device-state stream, Firecracker writes
    /// its memory file when it snapshots.
    fn snapshot_memory_at_launch(&self) -> bool {
        false
    }

    /// Pauses the running VM of `dir` (VMM process `pid`), writes its state
    /// to `out` and ends the VMM: the guest never runs again, and its disks
    /// are flushed and no longer written when this returns `Ok`. On error
    /// the VMM may still be running (paused); call [`Vmm::terminate`].
    async fn snapshot(&self, dir: &Path, pid: u32, out: &SnapshotFiles) -> Result<(), VmmError>;

    /// Starts a VMM in `spec.launch.dir` from the snapshot and resumes the
    /// guest: it is running when this returns. Preconditions: the directory
    /// exists, and the disk copies exist at their full size; their contents
    /// may still be being written: the VMM reads them only once `disks`
    /// resolves `true` (QEMU: before the incoming migration; Firecracker:
    /// before loading the snapshot), so they can be copied while the VMM
    /// starts. `false` ends the restore with [`VmmError::DisksUnavailable`].
    /// On error nothing of this call is left running. The agent endpoint is
    /// the same kind as `launch`'s (see [`AgentEndpoint`]); the template's
    /// agent connection is gone and the host opens a new one. QEMU (`Connect`): the guest agent does not
    /// greet a host that connects after the restore by itself; send `Ping`
    /// first, it answers `Hello`. Firecracker (`Accept`): the vsock device
    /// was reset at the snapshot; the guest agent notices the reset and
    /// connects to the listener again (docs/design/warm-starts.md §5a);
    /// bound the wait on `open` all the same.
    async fn restore(&self, spec: &RestoreSpec, disks: DisksReady) -> Result<Launched, VmmError>;

    /// Grows disk number `index` (in [`LaunchSpec::disks`] order) of the
    /// running VM of `dir` to `bytes` and tells the guest the new size. The
    /// file system inside is the guest's to grow. Growing to the current
    /// size is a no-op; shrinking is refused.
    async fn grow_disk(&self, dir: &Path, index: usize, bytes: u64) -> Result<(), VmmError>;
}

/// Whether a process with this pid exists and is the VMM of `dir`, judged by
/// its command line naming the VM directory (pids are reused).
pub fn vmm_process_alive(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Kills the VMM `pid` of `dir` (SIGKILL) and waits for its exit: for a VM
/// whose disks are discarded, which needs no orderly quit (QEMU's flushes
/// the disks). A process that is gone, or is not that VMM, is left alone.
pub async fn kill_vmm(pid: u32, dir: &Path) -> Result<(), VmmError> {
    match process::PidFd::open_vmm(pid, dir)? {
        Some(fd) => fd.kill_and_wait(&format!("VMM {pid}")).await,
        None => Ok(()),
    }
}

/// A task that ends when process `pid` exits, for VMMs that are not our
/// children (re-adopted after a daemon restart). `Ok(None)` when the process
/// is already gone.
pub fn watch_exit(pid: u32) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(pidfd) = process::PidFd::open(pid)? else {
        return Ok(None);
    };
    Ok(Some(tokio::spawn(async move {
        while !pidfd.wait_exit(std::time::Duration::from_secs(3600)).await {}
    })))
}
