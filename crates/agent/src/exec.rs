//! One guest process per exec channel.

use crate::OUTPUT_CHUNK;
use banger_agent_proto::{Body, ExecRequest, ExitStatus, Frame, OUTPUT_WINDOW, TtySize};
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
    Resize(TtySize),
    /// Stop following (attach/logs channels); an exec treats it as an error.
    Detach,
    /// End the process now and close the channel with this error.
    Abort(String),
    /// The host may take this many more output frames.
    Credit(u32),
}

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
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
    let stdin = match (req.tty, req.stdin) {
        (Some(size), _) => Input::Tty(size),
        (None, true) => Input::Pipe,
        (None, false) => Input::Null,
    };
    let last = match spawn(&req.argv, &req.env, req.cwd.as_deref(), stdin) {
        Ok(proc) => supervise(channel, proc, msgs, &out).await,
        // Like a shell: a command that is missing or cannot be run says so
        // on stderr and exits 127 or 126, so callers tell it from a failure
        // of banger's own.
        Err(SpawnError {
            message,
            shell_status: Some(code),
        }) => {
            let line = format!("banger-agent: {message}\n").into_bytes();
            let _ = out.send(Frame::new(channel, Body::Stderr(line))).await;
            Body::Exited(ExitStatus {
                code: Some(code),
                signal: None,
            })
        }
        Err(e) => Body::Error(e.message),
    };
    if let Body::Error(msg) = &last {
        tracing::debug!(channel, error = %msg, "exec failed");
    }
    let _ = out.send(Frame::new(channel, last)).await;
}

/// How a process's stdin is wired.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input {
    Null,
    Pipe,
    /// A new pseudo-terminal of this size: stdin, stdout and stderr.
    Tty(TtySize),
}

type Output = Box<dyn AsyncRead + Unpin + Send>;

/// A started process with its ends.
pub(crate) struct Spawned {
    pub child: Child,
    /// Its process group (it leads its own group, or its own session on a tty).
    pub pgid: Pid,
    /// Takes stdin data, EOF and resizes; `None` for /dev/null.
    pub input: Option<StdinFeeder>,
    pub stdout: Option<Output>,
    /// `None` on a tty, where stderr is part of stdout.
    pub stderr: Option<Output>,
}

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpawnError {
    pub message: String,
    /// The status a shell gives a command that could not run: 127 when it
    /// is not found, 126 when it is found but cannot be executed. `None`
    /// for other failures (a bad working directory, no pty).
    pub shell_status: Option<i32>,
}

impl SpawnError {
    fn other(message: String) -> Self {
        Self {
            message,
            shell_status: None,
        }
    }

    /// The failure of exec'ing `program`.
    fn exec(program: &str, e: &std::io::Error) -> Self {
        let errno = e.raw_os_error().map(Errno::from_raw);
        let shell_status = match errno {
            Some(Errno::ENOENT) => Some(127),
            Some(
                Errno::EACCES | Errno::ENOEXEC | Errno::EISDIR | Errno::EPERM | Errno::ENOTDIR,
            ) => Some(126),
            _ => None,
        };
        let message = match errno {
            Some(Errno::ENOENT) if !program.contains('/') => {
                format!("{program}: command not found")
            }
            _ => format!("{program}: {}", describe(e)),
        };
        Self {
            message,
            shell_status,
        }
    }
}

impl From<SpawnError> for String {
    fn from(e: SpawnError) -> String {
        e.message
    }
}

/// Starts `argv` with the agent's default environment plus `env`, in `cwd`
/// (default /root).
pub(crate) fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    input: Input,
) -> Result<Spawned, SpawnError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(SpawnError::other("empty command".to_string()));
    };
    let cwd = match cwd {
        Some(dir) => {
            if let Err(e) = std::fs::read_dir(dir) {
                return Err(SpawnError::other(format!("{dir}: {}", describe(&e))));
            }
            dir
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
        .envs(env.iter().map(|(k, v)| (k, v)));
    let started = |e: &dyn std::fmt::Display| SpawnError::other(format!("{program}: {e}"));
    let (child, input, stdout, stderr) = match input {
        Input::Tty(size) => {
            let (pty, pts) = pty_process::open().map_err(|e| started(&e))?;
            pty.resize(pty_process::Size::new(size.rows, size.cols))
                .map_err(|e| started(&e))?;
            // pty-process makes the child a session leader with the pty as
            // its controlling terminal (so it leads its own process group).
            let child = pty_process::Command::from(cmd)
                .spawn(pts)
                .map_err(|e| match e {
                    pty_process::Error::Io(io) => SpawnError::exec(program, &io),
                    other => started(&other),
                })?;
            let (rd, wr) = pty.into_split();
            let out: Output = Box::new(rd);
            (
                child,
                Some(StdinFeeder::start(Sink::Pty(wr))),
                Some(out),
                None,
            )
        }
        Input::Pipe | Input::Null => {
            let piped = matches!(input, Input::Pipe);
            cmd.stdin(if piped { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group, so a signal reaches the whole job
                // (a shell and its pipeline), not just the first process.
                .process_group(0);
            let mut child = cmd.spawn().map_err(|e| SpawnError::exec(program, &e))?;
            let input = child
                .stdin
                .take()
                .map(|p| StdinFeeder::start(Sink::Pipe(p)));
            let out = child.stdout.take().map(|o| Box::new(o) as Output);
            let err = child.stderr.take().map(|o| Box::new(o) as Output);
            (child, input, out, err)
        }
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        return Err(SpawnError::other(
            "process vanished right after it started".to_string(),
        ));
    };
    Ok(Spawned {
        child,
        pgid,
        input,
        stdout,
        stderr,
    })
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
    proc: Spawned,
    mut msgs: mpsc::UnboundedReceiver<SessionMsg>,
    out: &mpsc::Sender<Frame>,
) -> Body {
    let Spawned {
        mut child,
        pgid,
        input,
        mut stdout,
        mut stderr,
    } = proc;
    let mut stdin = input;
    let mut out_buf = vec![0u8; OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; OUTPUT_CHUNK];
    let mut status = None;
    let mut msgs_open = true;
    // Output frames the host takes before it grants more: without credit
    // the pipes are not read, so the process waits, not the host's memory.
    // Once the host is gone (`msgs` closed) output is read and dropped.
    let mut credit = OUTPUT_WINDOW;

    let end = loop {
        if let (Some(st), None, None) = (status, &stdout, &stderr) {
            break Ok(st);
        }
        let may_read = credit > 0 || !msgs_open;
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf), if may_read => match r {
                Some(n) if msgs_open => {
                    credit -= 1;
                    let _ = out.send(Frame::new(channel, Body::Stdout(out_buf[..n].to_vec()))).await;
                }
                Some(_) => {}
                None => stdout = None,
            },
            r = read_some(&mut stderr, &mut err_buf), if may_read => match r {
                Some(n) if msgs_open => {
                    credit -= 1;
                    let _ = out.send(Frame::new(channel, Body::Stderr(err_buf[..n].to_vec()))).await;
                }
                Some(_) => {}
                None => stderr = None,
            },
            r = child.wait(), if status.is_none() => match r {
                Ok(st) => status = Some(st),
                Err(e) => break Err(format!("waiting for the process: {e}")),
            },
            m = msgs.recv(), if msgs_open => match m {
                Some(SessionMsg::Stdin(data)) => {
                    if !stdin.as_ref().is_some_and(|f| f.feed(Feed::Data(data))) {
                        break Err(stdin_refusal(channel));
                    }
                }
                Some(SessionMsg::Resize(size)) => {
                    // Only a tty can be resized; a pipe ignores it.
                    if let Some(f) = &stdin {
                        f.feed(Feed::Resize(size));
                    }
                }
                Some(SessionMsg::Detach) => break Err("an exec cannot be detached".to_string()),
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
                Some(SessionMsg::Credit(n)) => credit = credit.saturating_add(n),
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
pub(crate) async fn read_some<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<usize> {
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

pub(crate) fn signal_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        // The whole group is already gone.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group")
        }
    }
}

/// Where a feeder writes.
pub(crate) enum Sink {
    Pipe(ChildStdin),
    Pty(pty_process::OwnedWritePty),
}

/// What a feeder is asked to do, in order.
#[derive(Debug)]
pub(crate) enum Feed {
    Data(Vec<u8>),
    Resize(TtySize),
}

/// Writes stdin on its own task so that a process that does not read its
/// input never holds up its output, its signals or its exit.
pub(crate) struct StdinFeeder {
    /// `None` once the host sent EOF.
    tx: Option<mpsc::UnboundedSender<Feed>>,
    task: tokio::task::JoinHandle<()>,
}

impl StdinFeeder {
    fn start(mut sink: Sink) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Feed>();
        let task = tokio::spawn(async move {
            while let Some(feed) = rx.recv().await {
                let written = match (&mut sink, feed) {
                    (Sink::Pipe(p), Feed::Data(d)) => p.write_all(&d).await,
                    (Sink::Pty(p), Feed::Data(d)) => p.write_all(&d).await,
                    (Sink::Pty(p), Feed::Resize(size)) => {
                        if let Err(e) = p.resize(pty_process::Size::new(size.rows, size.cols)) {
                            tracing::debug!(error = %e, "resizing the terminal failed");
                        }
                        Ok(())
                    }
                    (Sink::Pipe(_), Feed::Resize(_)) => Ok(()),
                };
                // A process that closed its stdin just loses the rest.
                if written.is_err() {
                    return;
                }
            }
            // All queued data is written. A pipe's EOF is dropping it; a
            // terminal's is its EOF character (^D) at the start of a line.
            if let Sink::Pty(p) = &mut sink {
                let _ = p.write_all(&[4]).await;
            }
        });
        Self { tx: Some(tx), task }
    }

    /// Queues data or a resize; false if stdin was already closed by the host.
    pub(crate) fn feed(&self, feed: Feed) -> bool {
        match &self.tx {
            Some(tx) => {
                let _ = tx.send(feed);
                true
            }
            None => false,
        }
    }

    /// Closes stdin once the queued data is written; false if already closed.
    pub(crate) fn close(&mut self) -> bool {
        self.tx.take().is_some()
    }
}

impl Drop for StdinFeeder {
    /// The process is over: nobody will read its input any more.
    fn drop(&mut self) {
        self.task.abort();
    }
}
