//! `banger vm cp`: files and directories to and from a running VM, as tar
//! streams through its guest agent; and the upload/download plumbing that
//! workspace copies share.

use crate::connect;
use anyhow::Context;
use banger_api::Client;
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::files::{FilesSummary, GetFilesStart, PutFilesStart};
use banger_client::files;
use banger_transfer::{Plan, plan_path};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};

/// Transfers at least this large get a progress bar (on a terminal).
const BAR_FROM: u64 = 16 << 20;

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

/// A bar for an upload of `total` bytes when it is large and stderr a
/// terminal.
pub(crate) fn upload_bar(total: u64) -> Option<ProgressBar> {
    (crate::output::chatty() && total >= BAR_FROM).then(|| bar(Some(total)))
}

/// [`banger_client::files::upload`] with a progress bar for large copies
/// on a terminal.
pub(crate) async fn upload(
    client: &Client,
    vm: &str,
    plan: Plan,
    blob_repo: Option<PathBuf>,
    start: PutFilesStart,
) -> anyhow::Result<FilesSummary> {
    let bar = upload_bar(plan.total_bytes());
    let s = files::upload(client, vm, plan, blob_repo, start, &mut |n| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    s
}

/// [`banger_client::files::download`] with a progress bar once the copy is
/// large, on a terminal.
pub(crate) async fn download(
    client: &Client,
    vm: &str,
    start: GetFilesStart,
    dir: PathBuf,
) -> anyhow::Result<FilesSummary> {
    let chatty = crate::output::chatty();
    let mut progress: Option<ProgressBar> = None;
    let s = files::download(client, vm, start, dir, &mut |received| {
        if chatty && received >= BAR_FROM {
            progress
                .get_or_insert_with(|| bar(None))
                .set_position(received);
        }
    })
    .await;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    s
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
