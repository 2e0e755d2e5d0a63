//! One guest process per exec channel.

use crate::OUTPUT_CHUNK;
use banger_agent_proto::{Body, ExecRequest, ExitStatus, Frame};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// What the connection forwards to a running session.
#[derive(Debug)]
pub(crate) enum SessionMsg {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    /// End the process now and close the channel with this error.
    Abort(String),
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_HOME: &str = "/root";

/// Runs `req` on `channel`: streams its output to `out` and ends the
/// channel with `Exited` once the process has exited and both of its output
/// pipes are closed, or with `Error` if it cannot start or is aborted.
pub(crate) async fn run(
    channel: u32,
    req: ExecRequest,
    msgs: mpsc::UnboundedReceiver<SessionMsg>,
    out: mpsc::Sender<Frame>,
) {
    let last = match spawn(&req) {
        Ok(child) => supervise(channel, child, msgs, &out).await,
        Err(msg) => Body::Error(msg),
    };
    if let Body::Error(msg) = &last {
        tracing::debug!(channel, error = %msg, "exec failed");
    }
    let _ = out.send(Frame::new(channel, last)).await;
}

fn spawn(req: &ExecRequest) -> Result<Child, String> {
    let Some((program, args)) = req.argv.split_first() else {
        return Err("empty command".to_string());
    };
    let cwd = match &req.cwd {
        Some(dir) => {
            if let Err(e) = std::fs::read_dir(dir) {
                return Err(format!("{dir}: {}", describe(&e)));
            }
            dir.as_str()
        }
        // A guest without /root (unusual images) still runs commands.
        None if Path::new(DEFAULT_HOME).is_dir() => DEFAULT_HOME,
        None => "/",
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", DEFAULT_HOME)
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm-256color")
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a signal reaches the whole job
        // (a shell and its pipeline), not just the first process.
        .process_group(0);
    cmd.spawn()
        .map_err(|e| format!("{program}: {}", describe(&e)))
}

/// "No such file or directory" rather than "... (os error 2)".
fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

async fn supervise(
    channel: u32,
    mut child: Child,
    mut msgs: mpsc::UnboundedReceiver<SessionMsg>,
    out: &mpsc::Sender<Frame>,
) -> Body {
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        return Body::Error("process vanished right after it started".to_string());
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdin = child.stdin.take().map(StdinFeeder::start);
    let mut out_buf = vec![0u8; OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; OUTPUT_CHUNK];
    let mut status = None;
    let mut msgs_open = true;

    let end = loop {
        if let (Some(st), None, None) = (status, &stdout, &stderr) {
            break Ok(st);
        }
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => match r {
                Some(n) => {
                    let _ = out.send(Frame::new(channel, Body::Stdout(out_buf[..n].to_vec()))).await;
                }
                None => stdout = None,
            },
            r = read_some(&mut stderr, &mut err_buf) => match r {
                Some(n) => {
                    let _ = out.send(Frame::new(channel, Body::Stderr(err_buf[..n].to_vec()))).await;
                }
                None => stderr = None,
            },
            r = child.wait(), if status.is_none() => match r {
                Ok(st) => status = Some(st),
                Err(e) => break Err(format!("waiting for the process: {e}")),
            },
            m = msgs.recv(), if msgs_open => match m {
                Some(SessionMsg::Stdin(data)) => {
                    if !stdin.as_ref().is_some_and(|f| f.feed(data)) {
                        break Err(stdin_refusal(channel));
                    }
                }
                Some(SessionMsg::StdinEof) => {
                    if !stdin.as_mut().is_some_and(StdinFeeder::close) {
                        break Err(stdin_refusal(channel));
                    }
                }
                Some(SessionMsg::Signal(n)) => match Signal::try_from(n) {
                    Ok(sig) => signal_group(pgid, sig),
                    Err(_) => break Err(format!("invalid signal number {n}")),
                },
                Some(SessionMsg::Abort(reason)) => break Err(reason),
                // The connection is gone without saying why.
                None => {
                    msgs_open = false;
                    signal_group(pgid, Signal::SIGKILL);
                }
            },
        }
    };
    drop(stdin);

    match end {
        Ok(st) => Body::Exited(ExitStatus {
            code: st.code(),
            signal: st.signal(),
        }),
        Err(reason) => {
            signal_group(pgid, Signal::SIGKILL);
            // Reap it; its output no longer matters, and pipes held open by
            // processes that left the group must not keep the channel open.
            if status.is_none() {
                let _ = child.wait().await;
            }
            Body::Error(reason)
        }
    }
}

fn stdin_refusal(channel: u32) -> String {
    format!("stdin of the process on channel {channel} is not open")
}

/// Reads once from an open pipe: `Some(n)` with data, `None` at its end.
/// Never resolves for a pipe that is already closed.
async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(r) => match r.read(buf).await {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!(error = %e, "reading process output failed");
                None
            }
        },
        None => std::future::pending().await,
    }
}

fn signal_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        // The whole group is already gone.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group")
        }
    }
}

/// Writes stdin on its own task so that a process that does not read its
/// input never holds up its output, its signals or its exit.
struct StdinFeeder {
    /// `None` once the host sent EOF.
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StdinFeeder {
    fn start(mut pipe: ChildStdin) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let task = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                // A process that closed its stdin just loses the rest.
                if pipe.write_all(&data).await.is_err() {
                    return;
                }
            }
            // All queued data is written; dropping the pipe is the EOF.
        });
        Self { tx: Some(tx), task }
    }

    /// Queues data; false if stdin was already closed by the host.
    fn feed(&self, data: Vec<u8>) -> bool {
        match &self.tx {
            Some(tx) => {
                let _ = tx.send(data);
                true
            }
            None => false,
        }
    }

    /// Closes stdin once the queued data is written; false if already closed.
    fn close(&mut self) -> bool {
        self.tx.take().is_some()
    }
}

impl Drop for StdinFeeder {
    /// The session is over: nobody will read the pipe any more.
    fn drop(&mut self) {
        self.task.abort();
    }
}
