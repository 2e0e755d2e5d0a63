//! Copying files into and out of a VM: a tar streamed through the
//! daemon to the guest agent, packed and unpacked as it flows. The guest is
//! not trusted: what comes out of it is confined to the name asked for.

use anyhow::Context;
use banger_api::Client;
use banger_api::files::{FilesSummary, GetFilesStart, PutFilesStart};
use banger_transfer::pack::BlobSource;
use banger_transfer::workspace::CatFile;
use banger_transfer::{Plan, write_tar};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Size of the pieces the tar stream is sent in.
const CHUNK: usize = 64 * 1024;

/// Streams `plan` as a tar into the VM; blobs (for `--branch`/`--from`
/// workspaces) come from `blob_repo`. `on_bytes` hears how many bytes of
/// the plan have been sent so far.
pub async fn upload(
    client: &Client,
    vm: &str,
    plan: Plan,
    blob_repo: Option<PathBuf>,
    start: PutFilesStart,
    on_bytes: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<FilesSummary> {
    let done = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let progress = done.clone();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut blobs = blob_repo.as_deref().map(CatFile::start).transpose()?;
        let w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let mut w = write_tar(
            &plan,
            w,
            blobs.as_mut().map(|b| b as &mut dyn BlobSource),
            &mut |n| progress.store(n, Ordering::Relaxed),
        )?;
        w.flush()?;
        Ok(())
    });
    let mut up = client
        .put_files(vm, &start)
        .await
        .with_context(|| format!("copying into {vm}:{}", start.dest))?;
    while let Some(chunk) = rx.recv().await {
        up.write(chunk)
            .await
            .with_context(|| format!("copying into {vm}:{}", start.dest))?;
        on_bytes(done.load(Ordering::Relaxed));
    }
    // A failed tar (a file changed, unreadable) must not be finished:
    // dropping the upload aborts it in the guest.
    writer.await??;
    let s = up
        .finish()
        .await
        .with_context(|| format!("copying into {vm}:{}", start.dest))?;
    Ok(s)
}

/// Streams a tar out of the VM and unpacks it into `dir` as it arrives;
/// only `start.name` (and what is below it) is accepted. `on_bytes` hears
/// how many bytes have arrived so far.
pub async fn download(
    client: &Client,
    vm: &str,
    start: GetFilesStart,
    dir: PathBuf,
    on_bytes: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<FilesSummary> {
    let mut down = client
        .get_files(vm, &start)
        .await
        .with_context(|| format!("copying from {vm}:{}", start.path))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let target = dir.clone();
    let top = start.name.clone();
    // The guest is not trusted: only the name asked for, nothing through
    // a symlink, no setuid/setgid bits, nothing larger than the free space.
    let extractor = tokio::task::spawn_blocking(move || {
        banger_transfer::unpack_only(
            ChunkReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            },
            &target,
            &top,
        )
    });
    let mut received: u64 = 0;
    loop {
        match down.next().await {
            Ok(Some(d)) => {
                received += d.len() as u64;
                if tx.send(d).await.is_err() {
                    break; // the extractor stopped: its error says why
                }
                on_bytes(received);
            }
            Ok(None) => break,
            Err(e) => {
                drop(tx);
                let _ = extractor.await;
                return Err(
                    anyhow::Error::from(e).context(format!("copying from {vm}:{}", start.path))
                );
            }
        }
    }
    drop(tx);
    extractor
        .await?
        .with_context(|| format!("unpacking into {}", dir.display()))?;
    down.summary()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the copy from {vm}:{} did not complete", start.path))
}

/// Cuts the tar stream into pieces for the async side.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the copy was cancelled")
        })
    }
}

/// The received pieces as a blocking reader.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(d) => {
                    self.buf = d;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = dst.len().min(self.buf.len() - self.pos);
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
