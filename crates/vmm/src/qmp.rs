//! A small typed QMP client (QEMU Machine Protocol) over the VM's control
//! socket, built on the `qapi` crate's generated command types.
//!
//! QEMU serves one QMP client at a time on a socket chardev, so callers open
//! a connection per operation and drop it when done.

use qapi::futures::{QapiStream, QmpStreamTokio};
use std::path::{Path, PathBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

pub use qapi::qmp::{RunState, StatusInfo};

type Reader = QmpStreamTokio<ReadHalf<UnixStream>>;
type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;

/// Errors from a QMP conversation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP on {path}: {command}")]
    Io {
        path: PathBuf,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {command} on {path} failed: {desc}")]
    Command {
        path: PathBuf,
        command: &'static str,
        desc: String,
    },
}

impl QmpError {
    /// True when the socket is absent or nobody listens on it yet, the normal
    /// state while QEMU starts up.
    pub fn is_not_listening(&self) -> bool {
        matches!(self, QmpError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }

    /// True when QEMU closed the connection, e.g. because it is exiting.
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset))
    }
}

/// A negotiated QMP connection.
pub struct Qmp {
    path: PathBuf,
    stream: QapiStream<Reader, Writer>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let io_err = |source| QmpError::Io {
            path: path.to_path_buf(),
            command: "greeting",
            source,
        };
        let socket = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = tokio::io::split(socket);
        let negotiation = QmpStreamTokio::open_split(r, w).await.map_err(io_err)?;
        let stream = negotiation
            .negotiate()
            .await
            .map_err(|source| QmpError::Io {
                path: path.to_path_buf(),
                command: "qmp_capabilities",
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            stream,
        })
    }

    /// `query-status`: the run state of the guest.
    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute("query-status", qapi::qmp::query_status {})
            .await
    }

    /// `system_powerdown`: presses the ACPI power button. Returns once QEMU
    /// accepted the request; the guest decides what to do with it.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", qapi::qmp::system_powerdown {})
            .await
            .map(drop)
    }

    /// `quit`: QEMU exits at once. QEMU may close the connection before its
    /// reply arrives; that counts as success.
    pub async fn quit(mut self) -> Result<(), QmpError> {
        match self.execute("quit", qapi::qmp::quit {}).await {
            Err(e) if e.is_closed() => Ok(()),
            other => other.map(drop),
        }
    }

    async fn execute<C: qapi::Command + qapi::qmp::QmpCommand>(
        &mut self,
        command: &'static str,
        c: C,
    ) -> Result<C::Ok, QmpError> {
        self.stream.execute(c).await.map_err(|e| match e {
            qapi::ExecuteError::Qapi(e) => QmpError::Command {
                path: self.path.clone(),
                command,
                desc: e.desc,
            },
            qapi::ExecuteError::Io(source) => QmpError::Io {
                path: self.path.clone(),
                command,
                source,
            },
        })
    }
}
