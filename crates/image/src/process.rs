//! Running build tools: output streamed line by line, cancellation that
//! stops the tool and waits for it, and a tail of output for errors.

use crate::ImageError;
use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Runs `cmd`, passing each output line to `on_line`. On cancellation the
/// tool gets SIGTERM (mmdebstrap cleans its mounts on it), then SIGKILL.
pub async fn run_tool(
    tool: &'static str,
    mut cmd: Command,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), ImageError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::ToolMissing { tool, package: package_of(tool) },
        _ => ImageError::Io { context: format!("starting {tool}"), source: e },
    })?;
    let tail = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::<String>::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for pipe in [child.stdout.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                 child.stderr.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>)]
        .into_iter()
        .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let mut lines_open = true;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.map_err(ImageError::io(format!("waiting for {tool}")))?,
            line = rx.recv(), if lines_open => match line {
                Some(l) => {
                    if let Ok(mut t) = tail.lock() {
                        t.push_back(l.clone());
                        if t.len() > 20 { t.pop_front(); }
                    }
                    on_line(l);
                }
                None => lines_open = false,
            },
            _ = cancel.cancelled() => {
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return Err(ImageError::Cancelled);
            }
        }
    };
    // Drain what the pipes still hold.
    while let Ok(l) = rx.try_recv() {
        on_line(l);
    }
    if status.success() {
        return Ok(());
    }
    let tail = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default();
    Err(ImageError::ToolFailed { tool, status: status.to_string(), tail })
}

fn package_of(tool: &str) -> &'static str {
    match tool {
        "mmdebstrap" => "mmdebstrap",
        "mkfs.ext4" | "e2fsck" | "resize2fs" => "e2fsprogs",
        _ => "the package that provides it",
    }
}
