//! Archive channels: unpacking tar streams from the host and streaming
//! tars of guest paths to it (protocol: `banger_agent_proto::archive`).
//!
//! The tar work is blocking and runs on blocking threads; the connection
//! only forwards frames through bounded queues. A host that sends beyond
//! its window gets its transfer failed rather than buffered.

use crate::OUTPUT_CHUNK;
use banger_agent_proto::archive::{MAX_SKIPPED, WINDOW};
use banger_agent_proto::{ArchiveSummary, Body, Frame, GetArchive, PutArchive};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// What the connection forwards to a transfer.
#[derive(Debug)]
pub(crate) enum ArchiveMsg {
    Data(Vec<u8>),
    End,
    Credit(u32),
    /// End the transfer now with this error.
    Abort(String),
}

/// Room in a transfer's queue: a full window of data plus control frames.
pub(crate) const QUEUE: usize = WINDOW as usize + 4;

/// Unpacks the stream arriving on `msgs` as `req` says; ends the channel
/// with `ArchiveDone` or `Error`.
pub(crate) async fn put(
    channel: u32,
    req: PutArchive,
    msgs: mpsc::Receiver<ArchiveMsg>,
    out: mpsc::Sender<Frame>,
) {
    let credit_out = out.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            channel,
            msgs,
            out: credit_out,
            buf: Vec::new(),
            pos: 0,
            consumed: 0,
            ended: false,
            aborted: None,
        };
        put_blocking(&req, &mut reader)
    })
    .await;
    let body = match res {
        Ok(Ok(s)) => Body::ArchiveDone(s),
        Ok(Err(m)) => Body::Error(m),
        Err(e) => Body::Error(format!("unpacking failed: {e}")),
    };
    if let Body::Error(m) = &body {
        tracing::info!(channel, error = %m, "upload failed");
    }
    let _ = out.send(Frame::new(channel, body)).await;
}

fn absolute(p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!("{p:?} is not an absolute guest path"))
    }
}

fn put_blocking(req: &PutArchive, reader: &mut ChannelReader) -> Result<ArchiveSummary, String> {
    let dest = absolute(&req.dest)?;
    let target = if req.replace {
        staging(&dest, reader.channel, "partial")?
    } else {
        dest.clone()
    };
    let unpacked = banger_transfer::unpack(&mut *reader, &target).and_then(|u| {
        // The tar's end marker may come before the host's last chunks.
        io::copy(&mut *reader, &mut io::sink())
            .map(|_| u)
            .map_err(banger_transfer::UnpackError::Read)
    });
    let result = match unpacked {
        Ok(u) if reader.ended => Ok(u),
        Ok(_) => Err(reader
            .aborted
            .clone()
            .unwrap_or_else(|| "the stream ended early".into())),
        Err(e) => Err(reader.aborted.clone().unwrap_or_else(|| e.to_string())),
    };
    let u = match result {
        Ok(u) => u,
        Err(m) => {
            if req.replace {
                let _ = std::fs::remove_dir_all(&target);
            }
            return Err(m);
        }
    };
    if req.replace {
        swap_in(&target, &dest, reader.channel)?;
    }
    Ok(ArchiveSummary {
        files: u.files,
        bytes: u.bytes,
        skipped: Vec::new(),
    })
}

/// A fresh directory beside `dest` (same file system, so it can be renamed
/// over it).
fn staging(dest: &Path, channel: u32, what: &str) -> Result<PathBuf, String> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(format!("{} cannot be replaced", dest.display()));
    };
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let p = parent.join(format!(
        ".{}.banger-{what}-{}-{channel}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&p);
    Ok(p)
}

/// Puts the complete `staged` tree at `dest`, removing what was there.
fn swap_in(staged: &Path, dest: &Path, channel: u32) -> Result<(), String> {
    let old = staging(dest, channel, "old")?;
    let had_old = match std::fs::rename(dest, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            let _ = std::fs::remove_dir_all(staged);
            return Err(format!("moving the old {} aside: {e}", dest.display()));
        }
    };
    if let Err(e) = std::fs::rename(staged, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(staged);
        return Err(format!("putting {} in place: {e}", dest.display()));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The tar stream as a blocking reader over the transfer's queue; grants
/// the host credit as it consumes chunks.
struct ChannelReader {
    channel: u32,
    msgs: mpsc::Receiver<ArchiveMsg>,
    out: mpsc::Sender<Frame>,
    buf: Vec<u8>,
    pos: usize,
    consumed: u32,
    ended: bool,
    aborted: Option<String>,
}

impl Read for ChannelReader {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            if let Some(m) = &self.aborted {
                return Err(io::Error::other(m.clone()));
            }
            match self.msgs.blocking_recv() {
                Some(ArchiveMsg::Data(d)) => {
                    self.consumed += 1;
                    if self.consumed >= WINDOW / 2 {
                        let credit = Frame::new(self.channel, Body::Credit(self.consumed));
                        let _ = self.out.blocking_send(credit);
                        self.consumed = 0;
                    }
                    self.buf = d;
                    self.pos = 0;
                }
                Some(ArchiveMsg::End) => self.ended = true,
                Some(ArchiveMsg::Credit(_)) => {
                    self.aborted = Some("the host sent credit on an upload".into());
                }
                Some(ArchiveMsg::Abort(m)) => self.aborted = Some(m),
                None => self.aborted = Some("the host connection closed".into()),
            }
        }
        let n = dst.len().min(self.buf.len() - self.pos);
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Streams a tar of `req.path` within the host's credit; ends the channel
/// with `ArchiveDone` or `Error`. An abort from the host ends it silently.
pub(crate) async fn get(
    channel: u32,
    req: GetArchive,
    mut msgs: mpsc::Receiver<ArchiveMsg>,
    out: mpsc::Sender<Frame>,
) {
    let (chunks_tx, mut chunks) = mpsc::channel::<Vec<u8>>(2);
    let packer = tokio::task::spawn_blocking(move || get_blocking(&req, chunks_tx));
    let mut credit = WINDOW;
    let mut failure = None;
    loop {
        tokio::select! {
            c = chunks.recv(), if credit > 0 => match c {
                Some(d) => {
                    credit -= 1;
                    if out.send(Frame::new(channel, Body::ArchiveData(d))).await.is_err() {
                        failure = Some(String::new());
                        break;
                    }
                }
                None => break,
            },
            m = msgs.recv() => match m {
                Some(ArchiveMsg::Credit(n)) => credit = credit.saturating_add(n),
                Some(ArchiveMsg::Abort(m)) => { failure = Some(m); break; }
                None => { failure = Some(String::new()); break; }
                Some(ArchiveMsg::Data(_) | ArchiveMsg::End) => {
                    failure = Some("the host sent data on a download".into());
                    break;
                }
            },
        }
    }
    // Dropping the receiver stops the packer at its next chunk.
    drop(chunks);
    let packed = packer.await;
    let body = match (failure, packed) {
        (Some(m), _) if m.is_empty() => return,
        (Some(m), _) => Body::Error(m),
        (None, Ok(Ok(s))) => Body::ArchiveDone(s),
        (None, Ok(Err(m))) => Body::Error(m),
        (None, Err(e)) => Body::Error(format!("packing failed: {e}")),
    };
    let _ = out.send(Frame::new(channel, body)).await;
}

fn get_blocking(req: &GetArchive, chunks: mpsc::Sender<Vec<u8>>) -> Result<ArchiveSummary, String> {
    let path = absolute(&req.path)?;
    let plan = banger_transfer::plan_path(&path, &req.name).map_err(|e| e.to_string())?;
    let mut w = ChunkWriter {
        tx: chunks,
        buf: Vec::with_capacity(OUTPUT_CHUNK),
    };
    let w =
        banger_transfer::write_tar(&plan, &mut w, None, &mut |_| {}).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let (files, bytes) = (plan.files() as u64, plan.total_bytes());
    let mut skipped = plan.skipped;
    skipped.truncate(MAX_SKIPPED);
    Ok(ArchiveSummary {
        files,
        bytes,
        skipped,
    })
}

/// Cuts the tar stream into frame-sized chunks.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(OUTPUT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == OUTPUT_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(OUTPUT_CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the transfer was cancelled"))
    }
}
