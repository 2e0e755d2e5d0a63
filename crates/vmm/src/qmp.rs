//! A small typed QMP client (QEMU Machine Protocol) over the VM's control
//! socket, built on the `qapi` crate's generated command types.
//!
//! QEMU serves one QMP client at a time on a socket chardev, so callers open
//! a connection per operation and drop it when done.

use qapi::futures::{QapiStream, QmpStreamTokio};
use std::path::{Path, PathBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

pub use qapi::qmp::{MigrationStatus, RunState, StatusInfo};

use qapi::qmp::{
    FileMigrationArgs, MigrationAddress, MigrationCapability, MigrationCapabilityStatus,
    MigrationChannel, MigrationChannelType,
};

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
    #[error("QMP {command} on {path}: unexpected answer: {detail}")]
    Answer {
        path: PathBuf,
        command: &'static str,
        detail: String,
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

    /// `stop`: pauses the vCPUs. QEMU drains and flushes the block devices
    /// before answering, so the disk files are complete afterwards.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", qapi::qmp::stop {}).await.map(drop)
    }

    /// `cont`: resumes the vCPUs (after `-S` or `stop`).
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", qapi::qmp::cont {}).await.map(drop)
    }

    /// `query-version`: QEMU's version as (major, minor, micro).
    pub async fn query_version(&mut self) -> Result<(i64, i64, i64), QmpError> {
        let v = self
            .execute("query-version", qapi::qmp::query_version {})
            .await?;
        Ok((v.qemu.major, v.qemu.minor, v.qemu.micro))
    }

    /// `query-migrate-capabilities`: the names of every migration
    /// capability this QEMU knows (read untyped: a newer QEMU lists
    /// capabilities the generated schema does not have).
    pub async fn query_migrate_capabilities(&mut self) -> Result<Vec<String>, QmpError> {
        const CMD: &str = "query-migrate-capabilities";
        let caps = self.execute(CMD, RawQueryMigrateCapabilities {}).await?;
        caps.iter()
            .map(|c| {
                c.get("capability")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| self.answer(CMD, format!("no capability name in {c}")))
            })
            .collect()
    }

    /// `migrate-set-capabilities`: turns `x-ignore-shared` on (RAM blocks
    /// backed by a named file stay out of the stream); needed on both the
    /// saving and the loading side, which must agree on the stream's form.
    pub async fn set_ignore_shared(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            qapi::qmp::migrate_set_capabilities {
                capabilities: vec![MigrationCapabilityStatus {
                    capability: MigrationCapability::x_ignore_shared,
                    state: true,
                }],
            },
        )
        .await
        .map(drop)
    }

    /// `qom-get` of `/objects/<id>`'s `mem-path`: the file a memory backend
    /// maps, `None` when there is no such backend (anonymous RAM).
    pub async fn memory_backend_path(&mut self, id: &str) -> Result<Option<PathBuf>, QmpError> {
        const CMD: &str = "qom-get";
        let answer = self
            .execute(
                CMD,
                qapi::qmp::qom_get {
                    path: format!("/objects/{id}"),
                    property: "mem-path".into(),
                },
            )
            .await;
        match answer {
            Ok(v) => v
                .as_str()
                .map(|p| Some(PathBuf::from(p)))
                .ok_or_else(|| self.answer(CMD, format!("mem-path is not a string: {v}"))),
            Err(QmpError::Command { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `migrate` to the file `path` (the migration runs in the background;
    /// see [`Qmp::query_migrate`]).
    pub async fn migrate_file(&mut self, path: &Path) -> Result<(), QmpError> {
        let channels = Some(vec![self.file_channel("migrate", path)?]);
        self.execute(
            "migrate",
            qapi::qmp::migrate {
                channels,
                detach: None,
                resume: None,
                uri: None,
            },
        )
        .await
        .map(drop)
    }

    /// `migrate-incoming` from the file `path`, for a QEMU started with
    /// `-incoming defer`. With `exit-on-error: false` a failed load leaves
    /// QEMU up, so [`Qmp::query_migrate`] can report why.
    pub async fn migrate_incoming_file(&mut self, path: &Path) -> Result<(), QmpError> {
        let channels = Some(vec![self.file_channel("migrate-incoming", path)?]);
        self.execute(
            "migrate-incoming",
            qapi::qmp::migrate_incoming {
                channels,
                exit_on_error: Some(false),
                uri: None,
            },
        )
        .await
        .map(drop)
    }

    /// `query-migrate`: the state of the outgoing or incoming migration
    /// and, when it failed, QEMU's description.
    pub async fn query_migrate(
        &mut self,
    ) -> Result<(Option<MigrationStatus>, Option<String>), QmpError> {
        let info = self
            .execute("query-migrate", qapi::qmp::query_migrate {})
            .await?;
        Ok((info.status, info.error_desc))
    }

    /// Polls [`Qmp::query_migrate`] until the migration completed (`Ok`),
    /// failed or was cancelled (`Err` with QEMU's reason), or `limit`
    /// passed.
    pub async fn wait_migration(
        &mut self,
        what: &'static str,
        limit: std::time::Duration,
    ) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut poll = MIGRATION_POLL_FIRST;
        loop {
            let (status, desc) = self.query_migrate().await?;
            match status {
                Some(MigrationStatus::completed) => return Ok(()),
                Some(MigrationStatus::failed | MigrationStatus::cancelled) => {
                    return Err(QmpError::Command {
                        path: self.path.clone(),
                        command: what,
                        desc: desc.unwrap_or_else(|| "migration failed".into()),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(
                    self.answer(what, format!("still {status:?} after {}s", limit.as_secs()))
                );
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(MIGRATION_POLL_MAX);
        }
    }

    /// `block_resize` of the drive with id `device` to `bytes`. The guest
    /// is told the new capacity. Refuses to shrink (QEMU would truncate a
    /// raw file).
    pub async fn block_resize(&mut self, device: &str, bytes: u64) -> Result<(), QmpError> {
        const CMD: &str = "block_resize";
        let current = self.block_size(device).await?;
        if bytes < current {
            return Err(self.answer(
                CMD,
                format!("{device} is {current} bytes; disks only grow, {bytes} refused"),
            ));
        }
        if bytes == current {
            return Ok(());
        }
        let size = i64::try_from(bytes)
            .map_err(|_| self.answer(CMD, format!("size {bytes} too large")))?;
        self.execute(
            CMD,
            qapi::qmp::block_resize {
                device: Some(device.to_owned()),
                node_name: None,
                size,
            },
        )
        .await
        .map(drop)
    }

    /// The virtual size of the drive with id `device` (`query-block`, read
    /// untyped for the same reason as the capabilities).
    pub async fn block_size(&mut self, device: &str) -> Result<u64, QmpError> {
        const CMD: &str = "query-block";
        let blocks = self.execute(CMD, RawQueryBlock {}).await?;
        blocks
            .iter()
            .find(|b| b.get("device").and_then(serde_json::Value::as_str) == Some(device))
            .and_then(|b| b.pointer("/inserted/image/virtual-size"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| self.answer(CMD, format!("no drive {device} with a size")))
    }

    fn file_channel(
        &self,
        command: &'static str,
        path: &Path,
    ) -> Result<MigrationChannel, QmpError> {
        let filename = path
            .to_str()
            .ok_or_else(|| self.answer(command, format!("{} is not UTF-8", path.display())))?
            .to_owned();
        Ok(MigrationChannel {
            channel_type: MigrationChannelType::main,
            addr: MigrationAddress::file(FileMigrationArgs {
                filename,
                offset: 0,
            }),
        })
    }

    fn answer(&self, command: &'static str, detail: String) -> QmpError {
        QmpError::Answer {
            path: self.path.clone(),
            command,
            detail,
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

/// How often a running migration is polled: soon at first, since loading
/// a template's device state takes a few milliseconds and a restore waits
/// on it, then less often for a long save.
const MIGRATION_POLL_FIRST: std::time::Duration = std::time::Duration::from_millis(1);
const MIGRATION_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// `query-migrate-capabilities` with an untyped answer.
#[derive(Debug, serde::Serialize)]
struct RawQueryMigrateCapabilities {}

impl qapi::Command for RawQueryMigrateCapabilities {
    type Ok = Vec<serde_json::Value>;
    const NAME: &'static str = "query-migrate-capabilities";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for RawQueryMigrateCapabilities {}

/// `query-block` with an untyped answer.
#[derive(Debug, serde::Serialize)]
struct RawQueryBlock {}

impl qapi::Command for RawQueryBlock {
    type Ok = Vec<serde_json::Value>;
    const NAME: &'static str = "query-block";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for RawQueryBlock {}
