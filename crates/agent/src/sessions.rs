//! Supervised sessions: long-lived guest processes that belong to the agent,
//! not to a host connection, so they survive the host (and its clients)
//! going away. Their output is kept in bounded ring logs; hosts attach to
//! them, read their logs and stop them over any connection.

use crate::OUTPUT_CHUNK;
use crate::exec::{self, Feed, Input, SessionMsg, Spawned, StdinFeeder};
use crate::ring::RingLog;
use banger_agent_proto::{
    Body, ExitStatus, Frame, OUTPUT_WINDOW, OutputStream, SESSION_LOG_BYTES, SessionInfo,
    SessionSpec, StdinMode, validate_session_name,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// After the process exited, how long its output pipes may stay open (held
/// by a process it left behind) before the session counts as ended anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What a channel following a session does.
pub(crate) enum Follow {
    /// Live output from now on, input from the host.
    Attach,
    /// The ring logs (one stream or both), then live output if `follow`.
    Logs {
        stream: Option<OutputStream>,
        follow: bool,
    },
}

/// The agent's sessions, by name.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

struct Session {
    name: String,
    argv: Vec<String>,
    mode: StdinMode,
    pid: u32,
    pgid: Pid,
    started_at: u64,
    state: Mutex<State>,
    /// Bumped on every output and at the end; followers wait on it.
    changed: watch::Sender<u64>,
    /// Input of pipe and tty sessions.
    input: Mutex<Option<StdinFeeder>>,
}

struct State {
    stdout: RingLog,
    stderr: RingLog,
    status: Option<ExitStatus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these cannot leave a ring inconsistent
    // in a way that matters more than losing the session.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    fn info(&self) -> SessionInfo {
        let st = lock(&self.state);
        SessionInfo {
            name: self.name.clone(),
            argv: self.argv.clone(),
            stdin: self.mode,
            pid: Some(self.pid),
            started_at: self.started_at,
            status: st.status,
            stdout_bytes: st.stdout.end(),
            stderr_bytes: st.stderr.end(),
        }
    }

    fn ended(&self) -> bool {
        lock(&self.state).status.is_some()
    }

    fn append(&self, stream: OutputStream, data: &[u8]) {
        {
            let mut st = lock(&self.state);
            match stream {
                OutputStream::Stdout => st.stdout.push(data),
                OutputStream::Stderr => st.stderr.push(data),
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn feed(&self, feed: Feed) -> bool {
        lock(&self.input).as_ref().is_some_and(|f| f.feed(feed))
    }

    /// Waits (at most `limit`) for the session to end; true if it has.
    async fn wait_end(&self, limit: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let ended = async {
            while !self.ended() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, ended).await.is_ok()
    }
}

impl Sessions {
    fn get(&self, name: &str) -> Result<Arc<Session>, String> {
        lock(&self.map)
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no session named {name:?}: `vm session list` shows them"))
    }

    /// Starts a session; fails if one of that name is still running.
    pub(crate) fn start(&self, spec: SessionSpec) -> Result<SessionInfo, String> {
        validate_session_name(&spec.name)?;
        let mut map = lock(&self.map);
        if map.get(&spec.name).is_some_and(|s| !s.ended()) {
            return Err(format!(
                "session {:?} is already running: stop it first or pick another name",
                spec.name
            ));
        }
        let input = match spec.stdin {
            StdinMode::Pipe => Input::Pipe,
            StdinMode::Tty => Input::Tty(Default::default()),
            StdinMode::Null => Input::Null,
        };
        let Spawned {
            child,
            pgid,
            input,
            stdout,
            stderr,
        } = exec::spawn(&spec.argv, &spec.env, spec.cwd.as_deref(), input)?;
        let (changed, _) = watch::channel(0);
        let session = Arc::new(Session {
            name: spec.name.clone(),
            argv: spec.argv,
            mode: spec.stdin,
            pid: pgid.as_raw().unsigned_abs(),
            pgid,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            state: Mutex::new(State {
                stdout: RingLog::new(SESSION_LOG_BYTES),
                stderr: RingLog::new(SESSION_LOG_BYTES),
                status: None,
            }),
            changed,
            input: Mutex::new(input),
        });
        tracing::info!(name = %session.name, pid = session.pid, "session started");
        tokio::spawn(supervise(session.clone(), child, stdout, stderr));
        let info = session.info();
        map.insert(spec.name, session);
        Ok(info)
    }

    /// Names of the sessions still running.
    pub(crate) fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.map)
            .values()
            .filter(|s| !s.ended())
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    }

    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = lock(&self.map).values().map(|s| s.info()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Ends a session (SIGTERM, then SIGKILL) and forgets it.
    pub(crate) async fn stop(&self, name: &str) -> Result<SessionInfo, String> {
        let s = self.get(name)?;
        if !s.ended() {
            exec::signal_group(s.pgid, Signal::SIGTERM);
            if !s.wait_end(STOP_GRACE).await {
                exec::signal_group(s.pgid, Signal::SIGKILL);
                if !s.wait_end(STOP_GRACE).await {
                    return Err(format!(
                        "session {name:?} (pid {}) did not end after SIGKILL",
                        s.pid
                    ));
                }
            }
        }
        let mut map = lock(&self.map);
        if map.get(name).is_some_and(|cur| Arc::ptr_eq(cur, &s)) {
            map.remove(name);
        }
        tracing::info!(name, "session stopped");
        Ok(s.info())
    }

    /// Serves an attach (`attach`: live output from now, input from the
    /// host) or a logs request (ring logs from their start, `follow` for
    /// live output) on `channel`, until the session ends, the host detaches
    /// or the connection goes. Ends the channel with `Session` (or `Error`).
    pub(crate) async fn follow(
        &self,
        channel: u32,
        name: &str,
        how: Follow,
        mut msgs: mpsc::UnboundedReceiver<SessionMsg>,
        out: mpsc::Sender<Frame>,
    ) {
        let s = match self.get(name) {
            Ok(s) => s,
            Err(e) => {
                let _ = out.send(Frame::new(channel, Body::Error(e))).await;
                return;
            }
        };
        let (attach, streams, follow) = match how {
            Follow::Attach => (true, None, true),
            Follow::Logs { stream, follow } => (false, stream, follow),
        };
        let mut rx = s.changed.subscribe();
        let want_out = streams != Some(OutputStream::Stderr);
        let want_err = streams != Some(OutputStream::Stdout);
        let (mut off_out, mut off_err) = if attach {
            let st = lock(&s.state);
            (st.stdout.end(), st.stderr.end())
        } else {
            (0, 0)
        };
        // Output frames the host takes before it grants more; the rings
        // keep the rest (and drop their oldest bytes, as for anyone).
        let mut credit = OUTPUT_WINDOW;
        loop {
            rx.borrow_and_update();
            // Send what is there: stdout's log first, then stderr's.
            let mut starved = false;
            for (want, stream) in [
                (want_out, OutputStream::Stdout),
                (want_err, OutputStream::Stderr),
            ] {
                if !want || starved {
                    continue;
                }
                loop {
                    if credit == 0 {
                        starved = true;
                        break;
                    }
                    let (data, next) = {
                        let st = lock(&s.state);
                        match stream {
                            OutputStream::Stdout => st.stdout.read_from(off_out, OUTPUT_CHUNK),
                            OutputStream::Stderr => st.stderr.read_from(off_err, OUTPUT_CHUNK),
                        }
                    };
                    match stream {
                        OutputStream::Stdout => off_out = next,
                        OutputStream::Stderr => off_err = next,
                    }
                    if data.is_empty() {
                        break;
                    }
                    let body = match stream {
                        OutputStream::Stdout => Body::Stdout(data),
                        OutputStream::Stderr => Body::Stderr(data),
                    };
                    if out.send(Frame::new(channel, body)).await.is_err() {
                        return;
                    }
                    credit -= 1;
                }
            }
            // Output is appended before the end is published, so after the
            // drain above an ended session has nothing more to say.
            if !starved && (!(attach || follow) || s.ended()) {
                break;
            }
            tokio::select! {
                r = rx.changed(), if !starved => if r.is_err() { break },
                m = msgs.recv() => match m {
                    Some(SessionMsg::Credit(n)) => credit = credit.saturating_add(n),
                    Some(SessionMsg::Stdin(d)) if attach => { s.feed(Feed::Data(d)); }
                    Some(SessionMsg::Resize(size)) if attach => { s.feed(Feed::Resize(size)); }
                    Some(SessionMsg::StdinEof) if attach => {
                        if let Some(f) = lock(&s.input).as_mut() {
                            f.close();
                        }
                    }
                    Some(SessionMsg::Signal(n)) if attach => match Signal::try_from(n) {
                        Ok(sig) => exec::signal_group(s.pgid, sig),
                        Err(_) => {
                            let msg = format!("invalid signal number {n}");
                            let _ = out.send(Frame::new(channel, Body::Error(msg))).await;
                            return;
                        }
                    },
                    Some(SessionMsg::Detach) => break,
                    // The connection is gone (or ending): nobody to answer.
                    Some(SessionMsg::Abort(_)) | None => return,
                    Some(other) => tracing::debug!(channel, ?other, "ignoring input on a logs channel"),
                },
            }
        }
        let _ = out.send(Frame::new(channel, Body::Session(s.info()))).await;
    }
}

/// Collects a session's output into its rings and publishes its end.
async fn supervise(
    s: Arc<Session>,
    mut child: tokio::process::Child,
    mut stdout: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
    mut stderr: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
) {
    let mut out_buf = vec![0u8; OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; OUTPUT_CHUNK];
    let mut status = None;
    let drain_deadline = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain_deadline);
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            r = exec::read_some(&mut stdout, &mut out_buf) => match r {
                Some(n) => s.append(OutputStream::Stdout, &out_buf[..n]),
                None => stdout = None,
            },
            r = exec::read_some(&mut stderr, &mut err_buf) => match r {
                Some(n) => s.append(OutputStream::Stderr, &err_buf[..n]),
                None => stderr = None,
            },
            r = child.wait(), if status.is_none() => {
                status = Some(match r {
                    Ok(st) => ExitStatus { code: st.code(), signal: st.signal() },
                    Err(e) => {
                        tracing::warn!(name = %s.name, error = %e, "waiting for a session failed");
                        ExitStatus { code: None, signal: None }
                    }
                });
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            () = &mut drain_deadline => break,
        }
    }
    // Nobody can write to an ended process.
    lock(&s.input).take();
    lock(&s.state).status = status;
    s.changed.send_modify(|n| *n += 1);
    tracing::info!(name = %s.name, ?status, "session ended");
}
