//! The banger agent protocol.
//!
//! One byte stream per VM (virtio-serial under QEMU, vsock under Firecracker)
//! carries length-prefixed frames. Each frame names a channel: channel 0 is
//! control (hello, ping, shutdown); every exec gets its own channel, opened by
//! the host with [`Body::Exec`] and closed by the agent with [`Body::Exited`]
//! or [`Body::Error`].
//!
//! File transfers use archive channels (see [`archive`]): a tar stream in
//! [`Body::ArchiveData`] chunks under credit-based flow control.
//!
//! Output of exec, attach and logs channels is under credit too: the agent
//! may have at most [`OUTPUT_WINDOW`] [`Body::Stdout`]/[`Body::Stderr`]
//! frames (of at most [`MAX_CHUNK`] bytes each) unacknowledged on a
//! channel, and the host grants more with [`Body::Credit`] as its consumer
//! takes them. A process whose reader is slow (`vm exec box -- cat
//! /dev/urandom | sleep 1d`) is held up in the guest, never buffered on the
//! host; an agent that sends past its window loses the channel.
//!
//! Wire format of a frame: `u32` little-endian payload length, then the
//! payload: a postcard-encoded [`Frame`]. Payloads over [`MAX_FRAME`] are
//! refused before any allocation.

pub mod archive;
pub mod boot;
pub mod client;
mod codec;
pub mod identity;
pub mod install;
pub mod outbox;

pub use archive::{ArchiveSummary, GetArchive, PutArchive};
pub use codec::{FrameCodec, ProtoError};
pub use identity::{
    GuestNetConfig, RestoreIdentity, RestoreReport, SEALED_MESSAGE, SSHD_DEFER, SealReport,
    SshHostKey, SshdPlan, SshdStart,
};

use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change. The daemon refuses agents that differ.
/// 4: output of exec, attach and logs channels is under credit
/// ([`OUTPUT_WINDOW`]); the host ends an exec it drops with [`Body::Error`].
/// 5: boot status (`BootStatus`/`Boot`), the boot contract carries `root=`
/// and ro/rw, the module list and the boot failure line.
/// 6: warm starts: `Hello.sealed`, `Seal`/`Sealed`, `Restore`/`Restored`.
/// 7: `BootStatus.explain` and `BootReport.pending` (what a late init is
/// doing).
/// 8: `Restore.sshd`: a restored guest may hold sshd back for its first
/// command.
pub const PROTO_VERSION: u32 = 8;

/// Output frames an agent may send on one exec, attach or logs channel
/// before the host grants more with [`Body::Credit`].
pub const OUTPUT_WINDOW: u32 = 64;

/// Largest frame payload accepted, in bytes.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest data chunk put in one stdout/stderr/stdin frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// The control channel.
pub const CONTROL: u32 = 0;

/// Name of the virtio-serial port the agent opens under QEMU.
pub const VIRTIO_PORT_NAME: &str = "org.banger.agent";

/// vsock port the agent connects to on the host (CID 2) under Firecracker.
pub const VSOCK_PORT: u32 = 1024;

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub channel: u32,
    pub body: Body,
}

impl Frame {
    pub fn new(channel: u32, body: Body) -> Self {
        Self { channel, body }
    }
}

#[cfg(test)]
impl Frame {
    /// A test agent's greeting (`agent_version` "test") speaking
    /// `proto_version`.
    pub(crate) fn test_hello(proto_version: u32) -> Self {
        let hello = Hello {
            proto_version,
            agent_version: "test".into(),
            uptime_ms: 1,
            sealed: false,
        };
        Frame::new(CONTROL, Body::Hello(hello))
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Agent → host on [`CONTROL`], first thing after the channel opens, and
    /// again in answer to every [`Body::Ping`]. This is the readiness signal.
    Hello(Hello),
    /// Host → agent on [`CONTROL`]: "say hello again" (used after the host
    /// (re)connects to a running guest).
    Ping,
    /// Host → agent on [`CONTROL`]: power the guest off (or reboot it).
    Shutdown { reboot: bool },
    /// Host → agent: start a process on this (new) channel.
    Exec(ExecRequest),
    /// Host → agent: bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: close the process's stdin.
    StdinEof,
    /// Host → agent: deliver a signal (e.g. 2 for SIGINT) to the process.
    Signal(i32),
    /// Agent → host: the process wrote to stdout.
    Stdout(Vec<u8>),
    /// Agent → host: the process wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent → host: the process ended; the channel is closed.
    Exited(ExitStatus),
    /// Agent → host: the request on this channel failed; the channel is
    /// closed. Host → agent: abort what runs on the channel (a transfer, or
    /// an exec whose process is then killed).
    Error(String),
    /// Host → agent: list the guest's listening TCP sockets on this (new)
    /// channel; answered with [`Body::Listeners`] or [`Body::Error`].
    ListListeners,
    /// Agent → host: the listening sockets; the channel is closed.
    Listeners(Vec<Listener>),
    /// Host → agent: unpack the tar stream that follows on this (new)
    /// channel into a guest directory.
    PutArchive(PutArchive),
    /// Host → agent: stream a tar of a guest path on this (new) channel.
    GetArchive(GetArchive),
    /// Either way on an archive channel: the next piece of the tar stream.
    ArchiveData(Vec<u8>),
    /// Host → agent on a put channel: the tar stream is complete.
    ArchiveEnd,
    /// The receiver of an archive stream lets the sender send this many
    /// more [`Body::ArchiveData`] frames; on an exec, attach or logs
    /// channel, the host lets the agent send this many more output frames.
    Credit(u32),
    /// Agent → host: the transfer is complete; the channel is closed.
    ArchiveDone(ArchiveSummary),

    // Terminals and sessions.
    /// Host → agent: the terminal of the process (or attached session) on
    /// this channel changed size.
    Resize(TtySize),
    /// Host → agent: stop following the session on this channel (attach or
    /// logs); the session keeps running. Answered with [`Body::Session`].
    Detach,
    /// Host → agent: start a supervised session, which outlives this channel
    /// and the host connection. Answered with [`Body::Session`] or [`Body::Error`].
    SessionStart(SessionSpec),
    /// Host → agent: list sessions; answered with [`Body::Sessions`].
    SessionList,
    /// Host → agent: end a session (SIGTERM, SIGKILL after a grace period)
    /// and forget it; answered with [`Body::Session`] once it has exited.
    SessionStop { name: String },
    /// Host → agent: stream the session's output from now on and feed its
    /// input from this channel until [`Body::Detach`] or the session's end;
    /// the channel ends with [`Body::Session`].
    SessionAttach { name: String },
    /// Host → agent: the session's ring log(s) (stdout first), then with
    /// `follow` its live output until it ends; the channel ends with
    /// [`Body::Session`].
    SessionLogs {
        name: String,
        stream: Option<OutputStream>,
        follow: bool,
    },
    /// Agent → host: one session's state; the channel is closed.
    Session(SessionInfo),
    /// Agent → host: every session; the channel is closed.
    Sessions(Vec<SessionInfo>),

    // Boot.
    /// Host → agent on a new channel: how the guest booted and how far the
    /// image's init is. With `wait` the answer waits until that init has
    /// finished booting (systemd's `is-system-running --wait`). With
    /// `explain`, a still booting init's [`BootReport::pending`] is filled
    /// in (it runs `systemctl`, so only when asked). Answered with
    /// [`Body::Boot`] or [`Body::Error`].
    BootStatus { wait: bool, explain: bool },
    /// Agent → host: the answer to [`Body::BootStatus`]; the channel is closed.
    Boot(BootReport),

    // Warm starts (see [`identity`]).
    /// Host → agent on a new channel: stop sshd, delete the SSH host keys,
    /// sync, and refuse all work until [`Body::Restore`] (the guest is
    /// about to become a template). Refused while execs or sessions run.
    /// Answered with [`Body::Sealed`] or [`Body::Error`]; the host sends
    /// nothing more before it snapshots.
    Seal,
    /// Agent → host: the guest is sealed; the channel is closed.
    Sealed(SealReport),
    /// Host → agent on a new channel: give this sealed clone its own
    /// identity. Answered with [`Body::Restored`] or [`Body::Error`].
    /// (Boxed: it is the largest body by far.)
    Restore(Box<RestoreIdentity>),
    /// Agent → host: the identity is applied and the agent serves again;
    /// the channel is closed.
    Restored(RestoreReport),
}

impl Body {
    /// The variant's name, for messages: never the payload, which may be
    /// large and comes from the other side.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello(_) => "Hello",
            Body::Ping => "Ping",
            Body::Shutdown { .. } => "Shutdown",
            Body::Exec(_) => "Exec",
            Body::Stdin(_) => "Stdin",
            Body::StdinEof => "StdinEof",
            Body::Signal(_) => "Signal",
            Body::Stdout(_) => "Stdout",
            Body::Stderr(_) => "Stderr",
            Body::Exited(_) => "Exited",
            Body::Error(_) => "Error",
            Body::ListListeners => "ListListeners",
            Body::Listeners(_) => "Listeners",
            Body::PutArchive(_) => "PutArchive",
            Body::GetArchive(_) => "GetArchive",
            Body::ArchiveData(_) => "ArchiveData",
            Body::ArchiveEnd => "ArchiveEnd",
            Body::Credit(_) => "Credit",
            Body::ArchiveDone(_) => "ArchiveDone",
            Body::Resize(_) => "Resize",
            Body::Detach => "Detach",
            Body::SessionStart(_) => "SessionStart",
            Body::SessionList => "SessionList",
            Body::SessionStop { .. } => "SessionStop",
            Body::SessionAttach { .. } => "SessionAttach",
            Body::SessionLogs { .. } => "SessionLogs",
            Body::Session(_) => "Session",
            Body::Sessions(_) => "Sessions",
            Body::BootStatus { .. } => "BootStatus",
            Body::Boot(_) => "Boot",
            Body::Seal => "Seal",
            Body::Sealed(_) => "Sealed",
            Body::Restore(_) => "Restore",
            Body::Restored(_) => "Restored",
        }
    }
}

/// How the guest booted, as its agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// How the answering agent was started.
    pub agent: AgentStart,
    /// Kernel uptime, in milliseconds, when the kernel started its first
    /// process (`Run /init as init process` in the kernel log); `None`
    /// when the kernel log no longer holds that line.
    pub kernel_init_ms: Option<u64>,
    /// Kernel uptime, in milliseconds, when the answering agent started.
    pub agent_start_ms: u64,
    /// The image's init and how far its boot is.
    pub system: SystemState,
    /// What a still booting init is doing, when asked (`explain`):
    /// systemd's unfinished jobs, or PID 1's kernel state when systemd
    /// does not answer. Empty otherwise. Bounded by the daemon when used.
    pub pending: Vec<String>,
}

/// How the agent was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStart {
    /// As `/init` of banger's initramfs: it loaded the modules, assembled
    /// the root and handed PID 1 to the image's init.
    Initramfs,
    /// As `init=` after the distribution's initramfs (or none) mounted the
    /// root; it assembled the overlay and handed PID 1 to the image's init.
    InitParam,
    /// By the image's init (a systemd unit or an inittab line).
    Service,
}

impl AgentStart {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStart::Initramfs => "initramfs",
            AgentStart::InitParam => "init-param",
            AgentStart::Service => "service",
        }
    }
}

/// The image's init and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemState {
    /// PID 1 is not systemd (busybox, runit, OpenRC...): nothing reports
    /// a boot state, so there is nothing more to wait for.
    NoSystemd { init: String },
    /// systemd's `is-system-running` answer: `initializing`, `starting`,
    /// `running`, `degraded`, `maintenance`, `stopping`...
    Systemd { state: String },
}

impl SystemState {
    /// True while the init is still booting (systemd `initializing` or
    /// `starting`); every other state is final for a boot.
    pub fn is_booting(&self) -> bool {
        matches!(self, SystemState::Systemd { state } if state == "initializing" || state == "starting")
    }

    /// One word for people and JSON: systemd's state, or `no-systemd`.
    pub fn describe(&self) -> &str {
        match self {
            SystemState::NoSystemd { .. } => "no-systemd",
            SystemState::Systemd { state } => state,
        }
    }
}

/// Size of a terminal in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for TtySize {
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// What a session's stdin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StdinMode {
    /// A pipe fed by attached clients; stays open between attaches.
    #[default]
    Pipe,
    /// A pseudo-terminal (stdout and stderr both go to its output).
    Tty,
    /// /dev/null.
    Null,
}

/// Longest session name.
pub const MAX_SESSION_NAME: usize = 48;

/// Checks a session name: 1 to [`MAX_SESSION_NAME`] of `[A-Za-z0-9._-]`,
/// not starting with a dot (names become file names on the host).
pub fn validate_session_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SESSION_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid session name {name:?}: use 1 to {MAX_SESSION_NAME} letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// A session to start.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SessionSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: StdinMode,
}

/// A session as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub name: String,
    pub argv: Vec<String>,
    pub stdin: StdinMode,
    pub pid: Option<u32>,
    /// Unix time (guest clock) the session started, in seconds.
    pub started_at: u64,
    /// Set once the process has exited.
    pub status: Option<ExitStatus>,
    /// Bytes written to each stream since the start (the ring logs keep the
    /// newest [`SESSION_LOG_BYTES`] of each).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// Bytes kept per output stream of a session.
pub const SESSION_LOG_BYTES: usize = 1 << 20;

/// A listening TCP socket in the guest, from `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// The local address, e.g. `0.0.0.0`, `127.0.0.1`, `::`.
    pub addr: String,
    pub port: u16,
    /// The owning process, when the agent could map the socket to one.
    pub pid: Option<u32>,
    /// That process's command line, space-joined.
    pub command: Option<String>,
}

/// The agent's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u32,
    pub agent_version: String,
    /// Milliseconds since the guest kernel booted: for the agent's first
    /// greeting on the kernel log's clock (that of its console timestamps),
    /// else from /proc/uptime.
    pub uptime_ms: u64,
    /// The guest is sealed (a template or a clone waiting for
    /// [`Body::Restore`]): it refuses all other work.
    pub sealed: bool,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Extra environment on top of the agent's default (PATH, HOME, TERM).
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// When false the process gets /dev/null as stdin.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (the process's session and
    /// controlling terminal); its stdout and stderr are then one stream.
    pub tty: Option<TtySize>,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal. Both
    /// numbers come from the guest, so what no process can end with (a
    /// code outside 0..=255, a signal outside 1..=127) is 255: never an
    /// overflow, nor a status that passes for success.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) if (0..=255).contains(&c) => c,
            (None, Some(s)) if (1..=127).contains(&s) => 128 + s,
            _ => 255,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_exit_status_is_a_failure_not_an_overflow() {
        let st = |code, signal| ExitStatus { code, signal }.shell_code();
        assert_eq!(st(Some(0), None), 0);
        assert_eq!(st(Some(3), Some(9)), 3);
        assert_eq!(st(None, Some(9)), 137);
        assert_eq!(st(None, Some(127)), 255);
        assert_eq!(st(None, None), 255);
        for bad in [i32::MAX, 128, 0, -128, i32::MIN] {
            assert_eq!(st(None, Some(bad)), 255, "signal {bad}");
        }
        for bad in [256, -1, i32::MIN, i32::MAX] {
            assert_eq!(st(Some(bad), None), 255, "code {bad}");
        }
    }
}
