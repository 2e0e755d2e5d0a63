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
//! Wire format of a frame: `u32` little-endian payload length, then the
//! payload: a postcard-encoded [`Frame`]. Payloads over [`MAX_FRAME`] are
//! refused before any allocation.

pub mod archive;
pub mod boot;
pub mod client;
mod codec;

pub use archive::{ArchiveSummary, GetArchive, PutArchive};
pub use codec::{FrameCodec, ProtoError};

use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change. The daemon refuses agents that differ.
pub const PROTO_VERSION: u32 = 2;

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
    /// closed. Host → agent on an archive channel: abort the transfer.
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
    /// more [`Body::ArchiveData`] frames.
    Credit(u32),
    /// Agent → host: the transfer is complete; the channel is closed.
    ArchiveDone(ArchiveSummary),
}

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
    /// Seconds since the guest kernel booted, from /proc/uptime.
    pub uptime_ms: u64,
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
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}
