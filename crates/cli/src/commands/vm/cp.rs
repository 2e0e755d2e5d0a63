//! `banger vm cp`: files and directories to and from a running VM, as tar
//! streams through its guest agent; and the upload/download plumbing that
//! workspace copies share.

use crate::connect;
use anyhow::Context;
use banger_api::Client;
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::files::{FilesSummary, GetFilesStart, PutFilesStart};
use banger_transfer::pack::BlobSource;
use banger_transfer::workspace::CatFile;
use banger_transfer::{Plan, plan_path, write_tar};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Transfers at least this large get a progress bar (on a terminal).
const BAR_FROM: u64 = 16 << 20;

/// Size of the pieces the tar stream is sent in.
const CHUNK: usize = 64 * 1024;

#[derive(Args)]
pub struct CpArgs {
    /// Source: a local path, or `<vm>:<path>` in a running VM.
    pub src: String,
    /// Destination: a local path, or `<vm>:<path>`; exactly one side is a VM.
    /// Guest paths are relative to /root. An existing directory receives
    /// the source under its own name.
    pub dst: String,
}

/// `<vm>:<path>`: a non-empty VM ref without `/` before the first colon.
fn remote(s: &str) -> Option<(&str, String)> {
    let (vm, path) = s.split_once(':')?;
    if vm.is_empty() || vm.contains('/') {
        return None;
    }
    let path = if path.is_empty() {
        "/root".to_string()
    } else if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/root/{path}")
    };
    Some((vm, path))
}

pub async fn run(a: CpArgs) -> anyhow::Result<i32> {
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((vm, dst))) => {
            let dir_hint = a.dst.ends_with('/');
            push(
                &connect::client().await?,
                vm,
                Path::new(&a.src),
                &dst,
                dir_hint,
            )
            .await
        }
        (Some((vm, src)), None) => {
            pull(&connect::client().await?, vm, &src, Path::new(&a.dst)).await
        }
        (Some(_), Some(_)) => {
            anyhow::bail!("both sides name a VM: one side of `vm cp` must be a local path")
        }
        (None, None) => anyhow::bail!("neither side names a VM: write one side as <vm>:<path>"),
    }
}

/// The last component of `p`, after resolving `.` and `..`.
fn base_name(p: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
    let abs = abs.canonicalize().unwrap_or(abs);
    abs.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{} has no usable file name", p.display()))
}

async fn push(
    client: &Client,
    vm: &str,
    src: &Path,
    dst: &str,
    dir_hint: bool,
) -> anyhow::Result<i32> {
    std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    let (dest, name) = if dir_hint || guest_is_dir(client, vm, dst).await? {
        (dst.to_string(), base_name(src)?)
    } else {
        let p = Path::new(dst);
        let parent = p.parent().and_then(Path::to_str).unwrap_or("/");
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{dst} has no file name to copy to"))?;
        (parent.to_string(), name.to_string())
    };
    let src_owned = src.to_path_buf();
    let plan = tokio::task::spawn_blocking(move || plan_path(&src_owned, &name)).await??;
    warn_skipped(&plan.skipped);
    let start = PutFilesStart {
        dest: dest.clone(),
        replace: false,
    };
    let s = upload(client, vm, plan, None, start).await?;
    if crate::output::chatty() {
        eprintln!(
            "copied {} files ({}) to {vm}:{dest}",
            s.files,
            banger_model::ByteSize(s.bytes).human()
        );
    }
    Ok(0)
}

async fn pull(client: &Client, vm: &str, src: &str, dst: &Path) -> anyhow::Result<i32> {
    let src_name = Path::new(src)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{vm}:{src} has no file name to copy"))?
        .to_string();
    let (dir, name) = if dst.is_dir() {
        (dst.to_path_buf(), src_name)
    } else {
        let name = dst
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{} has no file name to copy to", dst.display()))?
            .to_string();
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            anyhow::bail!("{}: no such directory", parent.display());
        }
        (parent, name)
    };
    let start = GetFilesStart {
        path: src.to_string(),
        name,
    };
    let s = download(client, vm, start, dir).await?;
    warn_skipped(&s.skipped);
    if crate::output::chatty() {
        eprintln!(
            "copied {} files ({}) from {vm}:{src}",
            s.files,
            banger_model::ByteSize(s.bytes).human()
        );
    }
    Ok(0)
}

pub(crate) fn warn_skipped(skipped: &[String]) {
    for s in skipped {
        // The guest's own words, for a copy out of a VM.
        eprintln!("banger: warning: {}", crate::output::printable(s));
    }
}

/// Whether `path` is a directory in the guest (`test -d` through the agent).
async fn guest_is_dir(client: &Client, vm: &str, path: &str) -> anyhow::Result<bool> {
    let start = ExecStart {
        argv: vec!["test".into(), "-d".into(), path.into()],
        ..Default::default()
    };
    let (_w, mut r) = client.exec(vm, &start).await?;
    loop {
        match r.next().await? {
            Some(ExecOutput::Exit(e)) => return Ok(e.shell_code() == 0),
            Some(ExecOutput::Error(e)) => anyhow::bail!("{}", e.message),
            Some(_) => {}
            None => anyhow::bail!("the guest did not answer whether {path} is a directory"),
        }
    }
}

fn bar(total: Option<u64>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = match total {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        None => "{msg} {bytes} {bytes_per_sec}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("copying");
    bar
}

/// Streams `plan` as a tar into the VM; blobs (for `--branch`/`--from`
/// workspaces) come from `blob_repo`.
pub(crate) async fn upload(
    client: &Client,
    vm: &str,
    plan: Plan,
    blob_repo: Option<PathBuf>,
    start: PutFilesStart,
) -> anyhow::Result<FilesSummary> {
    let total = plan.total_bytes();
    let bar = (crate::output::chatty() && total >= BAR_FROM).then(|| bar(Some(total)));
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
        if let Some(b) = &bar {
            b.set_position(done.load(Ordering::Relaxed));
        }
    }
    // A failed tar (a file changed, unreadable) must not be finished:
    // dropping the upload aborts it in the guest.
    writer.await??;
    let s = up
        .finish()
        .await
        .with_context(|| format!("copying into {vm}:{}", start.dest))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(s)
}

/// Streams a tar out of the VM and unpacks it into `dir` as it arrives;
/// only `start.name` (and what is below it) is accepted.
pub(crate) async fn download(
    client: &Client,
    vm: &str,
    start: GetFilesStart,
    dir: PathBuf,
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
    let chatty = crate::output::chatty();
    let mut received: u64 = 0;
    let mut progress: Option<ProgressBar> = None;
    loop {
        match down.next().await {
            Ok(Some(d)) => {
                received += d.len() as u64;
                if tx.send(d).await.is_err() {
                    break; // the extractor stopped: its error says why
                }
                if chatty && received >= BAR_FROM {
                    progress
                        .get_or_insert_with(|| bar(None))
                        .set_position(received);
                }
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
    if let Some(b) = progress {
        b.finish_and_clear();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(remote("box:/etc/x"), Some(("box", "/etc/x".to_string())));
        assert_eq!(remote("box:src"), Some(("box", "/root/src".to_string())));
        assert_eq!(remote("box:"), Some(("box", "/root".to_string())));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote(":x"), None);
        assert_eq!(remote("plain"), None);
    }
}
