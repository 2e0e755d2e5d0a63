//! `vm logs`: a VM's serial console or VMM log as a stream of bytes,
//! read a piece at a time from where `--tail`/`--since` start, and
//! followed across rotation until the VM is deleted.

use crate::vm::LookupError;
use crate::{Daemon, ErrorKind};
use banger_api::{LogSource, LogsQuery};
use futures::Stream;
use std::path::PathBuf;
use std::sync::Arc;

impl Daemon {
    /// The bytes of `vm`'s log that `q` asks for: from the last `tail`
    /// lines and/or what was written since `since_ms` (else the rotated
    /// generation, then the current one); with `follow`, it waits for more
    /// and ends when the VM is deleted.
    pub(crate) fn log_stream(
        self: &Arc<Self>,
        vm: &str,
        q: &LogsQuery,
    ) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, LogsError> {
        q.check().map_err(LogsError::Invalid)?;
        let vm = self.get_vm(vm)?;
        let vp = banger_vmm::VmPaths::new(&vm.dir);
        let path = match q.source {
            LogSource::Console => vp.console_log(),
            LogSource::Vmm => vp.vmm_log(),
        };
        let follow = q.follow;
        // With --since or --tail, the current generation from where they
        // start (the index behind --since covers it alone); otherwise the
        // previous generation of a rotated log first, then the log itself.
        // Either is read a piece at a time (never a whole file in memory).
        let filtered = q.since_ms.is_some() || q.tail.is_some();
        let start =
            crate::vm::log_index::start_offset(&path, q.since_ms, q.tail).map_err(|error| {
                LogsError::Read {
                    path: path.clone(),
                    error,
                }
            })?;
        let old = banger_vmm::logcap::rotated(&path);
        let files = if !filtered && old.is_file() {
            vec![old, path]
        } else {
            vec![path]
        };
        let d = self.clone();
        // State: which file, and the bytes of it sent so far.
        Ok(futures::stream::unfold(
            (0usize, start),
            move |(file, offset)| {
                let (d, files, id) = (d.clone(), files.clone(), vm.id.clone());
                async move {
                    let mut offset = offset;
                    loop {
                        let path = &files[file];
                        let last = file + 1 == files.len();
                        match read_piece(path, offset).await {
                            Piece::Data(data) => {
                                let next = offset + data.len() as u64;
                                return Some((data, (file, next)));
                            }
                            // Rotated under us: its new generation starts at 0.
                            Piece::Shrunk if last => offset = 0,
                            Piece::End | Piece::Shrunk if !last => {
                                return Some((Vec::new(), (file + 1, 0)));
                            }
                            Piece::End | Piece::Shrunk => {
                                if !follow {
                                    return None;
                                }
                                // Following: stop when the VM is gone, else wait.
                                d.store.get_vm(&id).ok()?;
                                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                            }
                        }
                    }
                }
            },
        ))
    }
}

/// Why `vm logs` cannot stream.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The query is wrong (`--tail` too large, ...); the message says how.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// Finding where `--since`/`--tail` start failed.
    #[error("reading {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl LogsError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LogsError::Invalid(_) => ErrorKind::Invalid,
            LogsError::Lookup(e) => e.kind(),
            LogsError::Read { .. } => ErrorKind::Failed,
        }
    }
}

/// Most bytes of a log read (and held) at once.
const LOG_PIECE: u64 = 256 * 1024;

/// What the next read of a log found.
enum Piece {
    /// Up to [`LOG_PIECE`] bytes from the offset.
    Data(Vec<u8>),
    /// Nothing after the offset (or no file).
    End,
    /// The file is now shorter than the offset: it was rotated.
    Shrunk,
}

async fn read_piece(path: &std::path::Path, offset: u64) -> Piece {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Piece::End;
    };
    match f.metadata().await {
        Ok(m) if m.len() < offset => return Piece::Shrunk,
        Ok(_) => {}
        Err(_) => return Piece::End,
    }
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Piece::End;
    }
    let mut buf = Vec::new();
    match f.take(LOG_PIECE).read_to_end(&mut buf).await {
        Ok(n) if n > 0 => Piece::Data(buf),
        _ => Piece::End,
    }
}
