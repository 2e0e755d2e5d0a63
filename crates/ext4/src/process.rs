//! Running a host tool (e2fsprogs, and the image build's mmdebstrap and
//! friends): argument vector, output streamed line by line, and
//! cancellation that stops the tool's whole process group and waits for it.
//!
//! Signalling only the tool is not enough for mmdebstrap: its main process
//! ignores SIGTERM and SIGINT and waits for the child doing the work, so the
//! signal has to reach every process of the build, as Ctrl-C in a terminal
//! would. The tool therefore runs in its own process group.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a cancelled tool gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(15);

/// How long output still buffered in the pipes may take to arrive once the
/// tool has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of output kept for the error of a failed tool.
const TAIL_LINES: usize = 30;

/// Errors running a tool with [`run_tool`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{tool} failed ({status}): {last_line}")]
    Failed {
        tool: &'static str,
        /// How it ended, e.g. `exit status: 1`.
        status: String,
        /// The exit code, `None` when a signal ended it.
        code: Option<i32>,
        /// The last non-empty line it printed.
        last_line: String,
        /// The last lines the tool printed, oldest first.
        tail: Vec<String>,
    },
    #[error("{tool} cancelled")]
    Cancelled { tool: &'static str },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Kills the process group when dropped, so that nothing of a build outlives
/// it even if the future running it is dropped.
struct GroupGuard(Pid);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // ESRCH once the group is empty is the normal case.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// Runs `program args` (with `envs` added to the environment) in a new
/// process group, passing every output line
/// (stdout and stderr) to `on_line`. When `cancel` fires, the group gets
/// SIGTERM, then SIGKILL after a grace period, and the call returns
/// [`RunError::Cancelled`] once the tool has exited.
pub async fn run_tool(
    tool: &'static str,
    program: &Path,
    args: Vec<OsString>,
    envs: &[(&str, &Path)],
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    if cancel.is_cancelled() {
        return Err(RunError::Cancelled { tool });
    }
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Image tools build trees for a guest (mmdebstrap, maintainer scripts):
    // their files get the modes packages intend, not bangerd's private
    // umask (077), which would leave guest files unreadable to its users.
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| RunError::Io {
        context: format!("starting {}", program.display()),
        source,
    })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| RunError::Io {
            context: format!("starting {tool}"),
            source: std::io::Error::other("the process exited before it could be tracked"),
        })?;
    let _group = GroupGuard(pid);

    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, tx.clone()));
    }
    drop(tx);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut emit = |line: String| {
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        on_line(line);
    };
    let wait_err = |e| RunError::Io {
        context: format!("waiting for {tool}"),
        source: e,
    };
    let mut lines_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(wait_err)?,
            line = rx.recv(), if lines_open => match line {
                Some(l) => emit(l),
                None => lines_open = false,
            },
            _ = cancel.cancelled() => {
                let _ = killpg(pid, Signal::SIGTERM);
                if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_err() {
                    let _ = killpg(pid, Signal::SIGKILL);
                    child.wait().await.map_err(wait_err)?;
                }
                // Whatever of the group survived its leader goes too.
                let _ = killpg(pid, Signal::SIGKILL);
                return Err(RunError::Cancelled { tool });
            }
        }
    };
    // Helpers the tool left behind would keep the pipes open forever.
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(l) = rx.recv().await {
            emit(l);
        }
    })
    .await;
    if status.success() {
        return Ok(());
    }
    let tail: Vec<String> = tail.into_iter().collect();
    let last_line = tail
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .cloned()
        .unwrap_or_else(|| "no output".to_string());
    Err(RunError::Failed {
        tool,
        status: status.to_string(),
        code: status.code(),
        last_line,
        tail,
    })
}

/// Sends each line of `pipe` (lossily decoded: dpkg output is not always
/// UTF-8) until end of file.
async fn forward_lines(pipe: impl AsyncRead + Unpin, tx: mpsc::UnboundedSender<String>) {
    let mut segments = BufReader::new(pipe).split(b'\n');
    while let Ok(Some(seg)) = segments.next_segment().await {
        let line = String::from_utf8_lossy(&seg)
            .trim_end_matches('\r')
            .to_string();
        if tx.send(line).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// `sh -c script`, lines to `on_line`.
    async fn sh(
        script: &str,
        on_line: &(dyn Fn(String) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        let args = ["-c", script].map(OsString::from).to_vec();
        run_tool("sh", Path::new("/bin/sh"), args, &[], on_line, cancel).await
    }

    #[tokio::test]
    async fn tools_run_with_the_conventional_umask_whatever_the_callers() {
        let lines = Mutex::new(Vec::new());
        let on_line = |l: String| lines.lock().expect("lock").push(l);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let r = sh("umask", &on_line, &CancellationToken::new()).await;
        nix::sys::stat::umask(old);
        r.expect("umask");
        assert_eq!(lines.lock().expect("lock").as_slice(), ["0022"]);
    }

    #[tokio::test]
    async fn streams_lines_from_both_pipes_and_reports_failure_with_the_tail() {
        let lines = Mutex::new(Vec::new());
        let on_line = |l: String| lines.lock().expect("lock").push(l);
        sh(
            "echo out; echo err >&2; printf 'bad \\377 byte\\n'",
            &on_line,
            &CancellationToken::new(),
        )
        .await
        .expect("success");
        let mut got = lines.lock().expect("lock").clone();
        got.sort();
        assert_eq!(got, ["bad \u{fffd} byte", "err", "out"]);

        let err = sh("echo why >&2; exit 3", &|_| {}, &CancellationToken::new())
            .await
            .expect_err("failure");
        match &err {
            RunError::Failed {
                tool,
                last_line,
                tail,
                ..
            } => {
                assert_eq!((*tool, last_line.as_str()), ("sh", "why"));
                assert_eq!(tail, &["why"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("sh failed (exit status: 3): why"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_an_io_error_naming_it() {
        let err = run_tool(
            "nope",
            Path::new("/nonexistent/nope"),
            vec![],
            &[],
            &|_| {},
            &CancellationToken::new(),
        )
        .await
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/nope"), "{err}");
    }

    /// Like mmdebstrap: the leader ignores SIGTERM and waits for a worker
    /// child; cancellation must still end both, promptly.
    #[tokio::test]
    async fn cancel_stops_the_whole_group_even_if_the_leader_ignores_sigterm() {
        let t = tempfile::tempdir().expect("tempdir");
        let pidfile = t.path().join("worker.pid");
        let script = format!(
            "trap '' TERM; (trap - TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; echo started; exec sleep 1000) & wait; wait",
            p = pidfile.display()
        );
        let cancel = CancellationToken::new();
        let on_line = {
            let cancel = cancel.clone();
            move |l: String| {
                if l == "started" {
                    cancel.cancel();
                }
            }
        };
        let started = std::time::Instant::now();
        let r = sh(&script, &on_line, &cancel).await;
        assert!(matches!(r, Err(RunError::Cancelled { .. })), "{r:?}");
        assert!(
            started.elapsed() < TERM_GRACE,
            "SIGTERM to the group should end it without waiting for SIGKILL"
        );
        let worker: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("int");
        // The worker was signalled; once reaped by init it is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::kill(Pid::from_raw(worker), None).is_ok() {
            let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
            if stat.split(' ').nth(2) == Some("Z") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker {worker} survived cancellation"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_already_cancelled_token_starts_nothing() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let started = std::sync::atomic::AtomicBool::new(false);
        let on_line = |_| started.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = sh("echo started", &on_line, &cancel).await;
        assert!(matches!(r, Err(RunError::Cancelled { tool: "sh" })));
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
    }
}
