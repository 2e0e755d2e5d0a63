//! Host side of the protocol: one [`AgentClient`] per VM connection,
//! multiplexing any number of exec sessions over the single stream.

use crate::archive::{ArchiveDownload, ArchiveRoutes, ArchiveUpload};
use crate::outbox::Outbox;
use crate::{
    Body, BootReport, CONTROL, ExecRequest, ExitStatus, Frame, FrameCodec, GetArchive, Hello,
    Listener, MAX_CHUNK, OUTPUT_WINDOW, OutputStream, PROTO_VERSION, PutArchive, RestoreIdentity,
    RestoreReport, SealReport, SessionInfo, SessionSpec, TtySize,
};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Errors talking to an agent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("connection to the guest agent was lost")]
    Disconnected,
    #[error(
        "guest agent speaks protocol v{agent}, this banger speaks v{host}: rebuild or re-pull the image so its agent matches"
    )]
    VersionMismatch { agent: u32, host: u32 },
    #[error("guest agent refused the request: {0}")]
    Refused(String),
    #[error("guest agent sent an invalid answer: {0}")]
    Invalid(String),
    #[error("the guest agent did not answer a {what} request within {secs}s")]
    Timeout { what: &'static str, secs: u64 },
}

/// How long a request waits for the agent's answer unless it says
/// otherwise: a guest that never answers must not hold a caller forever.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a seal or a restore waits: both run the guest's own work
/// (sshd stopped or started, files written and synced, a file system
/// grown) before they answer.
pub const IDENTITY_TIMEOUT: Duration = Duration::from_secs(600);

/// What an exec session reports, in order; `Exited` or `Error` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
    Error(String),
    /// Last event of a session attach or logs stream: the session's state.
    Session(SessionInfo),
}

/// Where a streaming channel's events go, and how many of its output
/// frames are received but not yet taken by its consumer (at most
/// [`OUTPUT_WINDOW`]: the agent sends no more without credit).
struct Route {
    tx: mpsc::UnboundedSender<ExecEvent>,
    unread: Arc<AtomicU32>,
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// One-shot requests waiting for their answer, by channel.
type Queries = Arc<Mutex<HashMap<u32, tokio::sync::oneshot::Sender<Body>>>>;

/// A connection to one guest agent.
#[derive(Clone)]
pub struct AgentClient {
    tx: Outbox,
    routes: Routes,
    queries: Queries,
    archives: ArchiveRoutes,
    next_channel: Arc<AtomicU32>,
    hello: watch::Receiver<Option<Hello>>,
    closed: watch::Receiver<bool>,
    /// [`QUERY_TIMEOUT`], shorter in tests.
    query_timeout: Duration,
}

impl AgentClient {
    /// Takes over `stream` and starts its reader and writer tasks.
    pub fn spawn<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, mut rx) = crate::outbox::channel();
        let routes: Routes = Arc::default();
        let queries: Queries = Arc::default();
        let archives: ArchiveRoutes = Arc::default();
        let (hello_tx, hello) = watch::channel(None);
        let (closed_tx, closed) = watch::channel(false);

        tokio::spawn(async move {
            let mut sink = FramedWrite::new(wr, FrameCodec);
            while let Some((f, _written)) = rx.recv().await {
                if let Err(e) = sink.send(f).await {
                    tracing::debug!(error = %e, "agent write failed");
                    break;
                }
            }
        });

        let reader_routes = routes.clone();
        let reader_queries = queries.clone();
        let reader_archives = archives.clone();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(rd, FrameCodec);
            let mut malformed = Malformed::default();
            while let Some(next) = frames.next().await {
                let frame = match next {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => {
                        malformed.skipped(&e);
                        continue;
                    }
                    Err(e) => {
                        // The host never closes a live connection on purpose,
                        // so a failed read is worth seeing in the daemon log.
                        tracing::warn!(error = %e, "agent connection failed");
                        break;
                    }
                };
                let Frame { channel, body } = frame;
                if let Err(body) = crate::archive::route(&reader_archives, channel, body) {
                    route(
                        Frame { channel, body },
                        &reader_routes,
                        &reader_queries,
                        &hello_tx,
                    );
                }
            }
            tracing::debug!("agent connection ended");
            // Dropping every sender ends every open session with Disconnected.
            reader_routes.lock().map(|mut r| r.clear()).ok();
            reader_queries.lock().map(|mut r| r.clear()).ok();
            reader_archives.lock().map(|mut r| r.clear()).ok();
            let _ = closed_tx.send(true);
        });

        Self {
            tx,
            routes,
            queries,
            archives,
            next_channel: Arc::new(AtomicU32::new(1)),
            hello,
            closed,
            query_timeout: QUERY_TIMEOUT,
        }
    }

    /// Waits for the agent's greeting (the readiness signal) and checks its version.
    pub async fn wait_hello(&self) -> Result<Hello, ClientError> {
        let mut hello = self.hello.clone();
        let mut closed = self.closed.clone();
        loop {
            if let Some(h) = hello.borrow_and_update().clone() {
                if h.proto_version != PROTO_VERSION {
                    return Err(ClientError::VersionMismatch {
                        agent: h.proto_version,
                        host: PROTO_VERSION,
                    });
                }
                return Ok(h);
            }
            if *closed.borrow_and_update() {
                return Err(ClientError::Disconnected);
            }
            tokio::select! {
                r = hello.changed() => if r.is_err() { return Err(ClientError::Disconnected) },
                r = closed.changed() => if r.is_err() { return Err(ClientError::Disconnected) },
            }
        }
    }

    /// True once the stream has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Asks the agent to greet again (after a reconnect).
    pub fn ping(&self) -> Result<(), ClientError> {
        self.send(Frame::new(CONTROL, Body::Ping))
    }

    /// Asks the guest to power off (or reboot).
    pub fn shutdown(&self, reboot: bool) -> Result<(), ClientError> {
        self.send(Frame::new(CONTROL, Body::Shutdown { reboot }))
    }

    /// Starts a process in the guest.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecSession, ClientError> {
        // Dropping the handle early ends the channel and kills the process
        // (a signal alone would leave it waiting for credit).
        self.stream(
            Body::Exec(req),
            Body::Error("the host closed the exec".into()),
        )
    }

    /// Attaches to a session: its live output, and its input from
    /// [`ExecSession::write_stdin`]. Dropping the handle detaches.
    pub fn session_attach(&self, name: &str) -> Result<ExecSession, ClientError> {
        let body = Body::SessionAttach {
            name: name.to_string(),
        };
        self.stream(body, Body::Detach)
    }

    /// A session's ring logs (both streams, stdout first, unless `stream`
    /// picks one), then with `follow` its output until it ends.
    pub fn session_logs(
        &self,
        name: &str,
        stream: Option<OutputStream>,
        follow: bool,
    ) -> Result<ExecSession, ClientError> {
        let body = Body::SessionLogs {
            name: name.to_string(),
            stream,
            follow,
        };
        self.stream(body, Body::Detach)
    }

    /// Opens a streaming channel with `body`; `on_drop` is sent if the
    /// handle is dropped before the channel ended.
    fn stream(&self, body: Body, on_drop: Body) -> Result<ExecSession, ClientError> {
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (ev_tx, events) = mpsc::unbounded_channel();
        let unread = Arc::new(AtomicU32::new(0));
        let route = Route {
            tx: ev_tx,
            unread: unread.clone(),
        };
        self.routes
            .lock()
            .map_err(|_| ClientError::Disconnected)?
            .insert(channel, route);
        if let Err(e) = self.send(Frame::new(channel, body)) {
            self.routes.lock().map(|mut r| r.remove(&channel)).ok();
            return Err(e);
        }
        Ok(ExecSession {
            channel,
            tx: self.tx.clone(),
            routes: self.routes.clone(),
            events,
            unread,
            taken: 0,
            done: false,
            on_drop,
        })
    }

    /// Sends `body` on a new channel and waits for the one-frame answer
    /// (at most [`QUERY_TIMEOUT`]); an [`Body::Error`] answer becomes
    /// [`ClientError::Refused`].
    async fn query(&self, body: Body) -> Result<Body, ClientError> {
        self.query_within(body, Some(self.query_timeout)).await
    }

    /// [`Self::query`] waiting at most `limit` (`None`: as long as the
    /// caller does). However the wait ends, nothing is left waiting for
    /// the answer.
    async fn query_within(&self, body: Body, limit: Option<Duration>) -> Result<Body, ClientError> {
        let what = body.kind();
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer) = tokio::sync::oneshot::channel();
        self.queries
            .lock()
            .map_err(|_| ClientError::Disconnected)?
            .insert(channel, answer_tx);
        let _pending = Unanswered {
            queries: &self.queries,
            channel,
        };
        self.send(Frame::new(channel, body))?;
        let answer = match limit {
            Some(limit) => {
                tokio::time::timeout(limit, answer)
                    .await
                    .map_err(|_| ClientError::Timeout {
                        what,
                        secs: limit.as_secs(),
                    })?
            }
            None => answer.await,
        };
        match answer {
            Ok(Body::Error(msg)) => Err(ClientError::Refused(msg)),
            Ok(body) => Ok(body),
            Err(_) => Err(ClientError::Disconnected),
        }
    }

    /// Starts unpacking a tar stream into a guest directory; feed it with
    /// [`ArchiveUpload::write`] and end it with [`ArchiveUpload::finish`].
    pub fn put_archive(&self, req: PutArchive) -> Result<ArchiveUpload, ClientError> {
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        ArchiveUpload::open(channel, self.tx.clone(), self.archives.clone(), req)
    }

    /// Starts streaming a tar of a guest path; read it with
    /// [`ArchiveDownload::next`].
    pub fn get_archive(&self, req: GetArchive) -> Result<ArchiveDownload, ClientError> {
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        ArchiveDownload::open(channel, self.tx.clone(), self.archives.clone(), req)
    }

    /// The guest's listening TCP sockets, as its agent sees them.
    pub async fn list_listeners(&self) -> Result<Vec<Listener>, ClientError> {
        match self.query(Body::ListListeners).await? {
            Body::Listeners(l) => Ok(l),
            other => Err(unexpected(&other)),
        }
    }

    /// How the guest booted; with `wait`, once its init has finished
    /// booting (the caller bounds the wait).
    pub async fn boot_status(&self, wait: bool) -> Result<BootReport, ClientError> {
        self.boot_report(wait, false).await
    }

    /// How the guest booted now and, while its init still boots, what that
    /// init is doing ([`BootReport::pending`]).
    pub async fn boot_status_explained(&self) -> Result<BootReport, ClientError> {
        self.boot_report(false, true).await
    }

    async fn boot_report(&self, wait: bool, explain: bool) -> Result<BootReport, ClientError> {
        // Waiting for the boot is as long as the caller's bound.
        let limit = (!wait).then_some(self.query_timeout);
        match self
            .query_within(Body::BootStatus { wait, explain }, limit)
            .await?
        {
            Body::Boot(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a supervised session in the guest.
    pub async fn session_start(&self, spec: SessionSpec) -> Result<SessionInfo, ClientError> {
        match self.query(Body::SessionStart(spec)).await? {
            Body::Session(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// The guest's sessions, running and ended.
    pub async fn session_list(&self) -> Result<Vec<SessionInfo>, ClientError> {
        match self.query(Body::SessionList).await? {
            Body::Sessions(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Ends a session and forgets it; answers with its final state.
    pub async fn session_stop(&self, name: &str) -> Result<SessionInfo, ClientError> {
        let body = Body::SessionStop {
            name: name.to_string(),
        };
        match self.query(body).await? {
            Body::Session(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Seals the guest for a template: sshd stopped, host keys deleted,
    /// every request but a restore refused from now on. The answer is
    /// checked against the protocol's bounds.
    pub async fn seal(&self) -> Result<SealReport, ClientError> {
        match self
            .query_within(Body::Seal, Some(IDENTITY_TIMEOUT))
            .await?
        {
            Body::Sealed(r) => {
                r.validate().map_err(ClientError::Invalid)?;
                Ok(r)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Gives a sealed guest its own identity; the agent serves again once
    /// this returns. The report is checked against the protocol's bounds.
    pub async fn restore(&self, identity: RestoreIdentity) -> Result<RestoreReport, ClientError> {
        let body = Body::Restore(Box::new(identity));
        match self.query_within(body, Some(IDENTITY_TIMEOUT)).await? {
            Body::Restored(r) => {
                r.validate().map_err(ClientError::Invalid)?;
                Ok(r)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Resolves once the stream to the agent has ended.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        while !*closed.borrow_and_update() {
            if closed.changed().await.is_err() {
                return;
            }
        }
    }

    fn send(&self, f: Frame) -> Result<(), ClientError> {
        self.tx.send(f)
    }
}

/// Logs the agent's malformed frames: the first at once, then at most one
/// line per [`MALFORMED_LOG_EVERY`] with how many were skipped, so a guest
/// sending garbage cannot flood the daemon's log (which rotates, taking
/// every other VM's lines with it).
#[derive(Default)]
struct Malformed {
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

/// See [`Malformed`].
const MALFORMED_LOG_EVERY: Duration = Duration::from_secs(10);

impl Malformed {
    /// Notes one skipped frame; whether a line was logged.
    fn skipped(&mut self, error: &dyn std::fmt::Display) -> bool {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|t| t.elapsed() < MALFORMED_LOG_EVERY)
        {
            return false;
        }
        tracing::warn!(error = %error, skipped = self.unlogged, "skipping malformed frames from agent");
        self.last_logged = Some(std::time::Instant::now());
        self.unlogged = 0;
        true
    }
}

/// A query's entry in the waiting map, removed however the wait ends.
struct Unanswered<'a> {
    queries: &'a Queries,
    channel: u32,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.queries
            .lock()
            .map(|mut q| q.remove(&self.channel))
            .ok();
    }
}

fn unexpected(body: &Body) -> ClientError {
    ClientError::Refused(format!("unexpected {} answer from the agent", body.kind()))
}

fn route(
    frame: Frame,
    routes: &Routes,
    queries: &Queries,
    hello_tx: &watch::Sender<Option<Hello>>,
) {
    if frame.channel == CONTROL {
        match frame.body {
            Body::Hello(h) => {
                let _ = hello_tx.send(Some(h));
            }
            other => tracing::debug!(?other, "ignoring control frame from agent"),
        }
        return;
    }
    if let Ok(mut q) = queries.lock()
        && let Some(answer) = q.remove(&frame.channel)
    {
        let _ = answer.send(frame.body);
        return;
    }
    let output = matches!(frame.body, Body::Stdout(_) | Body::Stderr(_));
    let (event, last) = match frame.body {
        Body::Stdout(d) if d.len() <= MAX_CHUNK => (ExecEvent::Stdout(d), false),
        Body::Stderr(d) if d.len() <= MAX_CHUNK => (ExecEvent::Stderr(d), false),
        Body::Stdout(_) | Body::Stderr(_) => (
            ExecEvent::Error(format!(
                "the guest agent sent an output frame over {MAX_CHUNK} bytes"
            )),
            true,
        ),
        Body::Exited(s) => (ExecEvent::Exited(s), true),
        Body::Error(m) => (ExecEvent::Error(m), true),
        Body::Session(s) => (ExecEvent::Session(s), true),
        other => {
            tracing::debug!(
                channel = frame.channel,
                ?other,
                "unexpected frame from agent"
            );
            return;
        }
    };
    let Ok(mut r) = routes.lock() else { return };
    let Some(route) = r.get(&frame.channel) else {
        return;
    };
    // Past its window the agent ignores flow control: the channel ends
    // rather than the host buffering without bound.
    if output && !last && route.unread.fetch_add(1, Ordering::AcqRel) >= OUTPUT_WINDOW {
        let _ = route.tx.send(ExecEvent::Error(format!(
            "the guest agent sent more than {OUTPUT_WINDOW} output frames without credit"
        )));
        r.remove(&frame.channel);
        return;
    }
    let _ = route.tx.send(event);
    if last {
        r.remove(&frame.channel);
    }
}

/// One running guest process.
pub struct ExecSession {
    channel: u32,
    tx: Outbox,
    routes: Routes,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    /// Output frames received and not taken yet (shared with the route).
    unread: Arc<AtomicU32>,
    /// Output frames taken since credit was last granted.
    taken: u32,
    done: bool,
    on_drop: Body,
}

impl ExecSession {
    /// The next output or the final status. `Err(Disconnected)` if the agent
    /// went away before the process ended; `Ok(None)` after the final event.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(ev) => {
                match ev {
                    ExecEvent::Exited(_) | ExecEvent::Error(_) | ExecEvent::Session(_) => {
                        self.done = true;
                    }
                    ExecEvent::Stdout(_) | ExecEvent::Stderr(_) => self.took_output(),
                }
                Ok(Some(ev))
            }
            None => Err(ClientError::Disconnected),
        }
    }

    /// One output frame was taken: grant the agent more, a quarter of the
    /// window at a time.
    fn took_output(&mut self) {
        self.unread.fetch_sub(1, Ordering::AcqRel);
        self.taken += 1;
        if self.taken >= OUTPUT_WINDOW / 4 {
            let _ = self.send(Body::Credit(self.taken));
            self.taken = 0;
        }
    }

    /// Feeds the process's stdin, split into protocol-sized chunks;
    /// waits while the agent's end of the stream is not being read (see
    /// [`crate::outbox`]).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.tx
                .send_bulk(Frame::new(self.channel, Body::Stdin(chunk.to_vec())))
                .await?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.send(Body::StdinEof)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) -> Result<(), ClientError> {
        self.send(Body::Signal(sig))
    }

    /// Resizes the process's terminal (exec with a tty, or a tty session).
    pub fn resize(&self, size: TtySize) -> Result<(), ClientError> {
        self.send(Body::Resize(size))
    }

    /// Stops following a session (attach or logs); it keeps running. The
    /// stream then ends with [`ExecEvent::Session`].
    pub fn detach(&self) -> Result<(), ClientError> {
        self.send(Body::Detach)
    }

    fn send(&self, body: Body) -> Result<(), ClientError> {
        self.tx.send(Frame::new(self.channel, body))
    }
}

impl Drop for ExecSession {
    /// An exec dropped before its process ended kills the process, so a
    /// vanished client never leaves a stray guest process; a dropped attach
    /// or logs stream detaches.
    fn drop(&mut self) {
        if !self.done {
            let body = std::mem::replace(&mut self.on_drop, Body::Detach);
            let _ = self.tx.send(Frame::new(self.channel, body));
        }
        // Whatever still arrives on the channel has nobody to read it.
        self.routes.lock().map(|mut r| r.remove(&self.channel)).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted fake agent on the other end of an in-memory pipe.
    async fn fake_agent(io: tokio::io::DuplexStream, version: u32) {
        let (rd, wr) = tokio::io::split(io);
        let mut rd = FramedRead::new(rd, FrameCodec);
        let mut wr = FramedWrite::new(wr, FrameCodec);
        wr.send(Frame::test_hello(version)).await.expect("hello");
        while let Some(Ok(Ok(f))) = rd.next().await {
            if f.body == Body::ListListeners {
                let l = Listener {
                    addr: "0.0.0.0".into(),
                    port: 8080,
                    pid: Some(7),
                    command: Some("python3 -m http.server 8080".into()),
                };
                wr.send(Frame::new(f.channel, Body::Listeners(vec![l])))
                    .await
                    .expect("listeners");
                continue;
            }
            if let Body::Exec(req) = f.body {
                let out = req.argv.join(" ").into_bytes();
                wr.send(Frame::new(f.channel, Body::Stdout(out)))
                    .await
                    .expect("out");
                let st = ExitStatus {
                    code: Some(3),
                    signal: None,
                };
                wr.send(Frame::new(f.channel, Body::Exited(st)))
                    .await
                    .expect("exit");
            }
        }
    }

    #[tokio::test]
    async fn listeners_roundtrip() {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(fake_agent(b, PROTO_VERSION));
        let c = AgentClient::spawn(a);
        c.wait_hello().await.expect("hello");
        let l = c.list_listeners().await.expect("listeners");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].port, 8080);
        assert_eq!(l[0].pid, Some(7));
    }

    #[tokio::test]
    async fn hello_then_exec_roundtrip() {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(fake_agent(b, PROTO_VERSION));
        let c = AgentClient::spawn(a);
        let h = c.wait_hello().await.expect("hello");
        assert_eq!(h.agent_version, "test");
        let mut s = c
            .exec(ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                ..Default::default()
            })
            .expect("exec");
        assert_eq!(
            s.next_event().await.expect("ev"),
            Some(ExecEvent::Stdout(b"echo hi".to_vec()))
        );
        assert_eq!(
            s.next_event().await.expect("ev"),
            Some(ExecEvent::Exited(ExitStatus {
                code: Some(3),
                signal: None
            }))
        );
        assert_eq!(s.next_event().await.expect("end"), None);
    }

    /// A fake agent answering one seal and one restore with the given bodies.
    async fn warm_agent(io: tokio::io::DuplexStream, sealed: Body, restored: Body) {
        let (rd, wr) = tokio::io::split(io);
        let mut rd = FramedRead::new(rd, FrameCodec);
        let mut wr = FramedWrite::new(wr, FrameCodec);
        while let Some(Ok(Ok(f))) = rd.next().await {
            let answer = match f.body {
                Body::Seal => sealed.clone(),
                Body::Restore(id) if id.hostname == "box-1" => restored.clone(),
                Body::Restore(id) => Body::Error(format!("wrong identity {}", id.hostname)),
                _ => continue,
            };
            wr.send(Frame::new(f.channel, answer))
                .await
                .expect("answer");
        }
    }

    #[tokio::test]
    async fn seal_and_restore_roundtrip() {
        let report = SealReport {
            sshd: crate::SshdPlan::Unit("ssh.service".into()),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        };
        let restored = RestoreReport {
            steps_ms: vec![("reseed".into(), 1)],
            vmgenid: false,
            clock_step_ms: 5,
            sshd: "unit ssh.service".into(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(warm_agent(
            b,
            Body::Sealed(report.clone()),
            Body::Restored(restored.clone()),
        ));
        let c = AgentClient::spawn(a);
        assert_eq!(c.seal().await.expect("seal"), report);
        let id = crate::identity::tests::identity();
        assert_eq!(c.restore(id).await.expect("restore"), restored);
    }

    /// The guest is not trusted: an answer past the protocol's bounds is
    /// an error, not data.
    #[tokio::test]
    async fn oversized_warm_answers_are_refused() {
        let report = SealReport {
            sshd: crate::SshdPlan::Process(vec!["x".repeat(crate::identity::MAX_ARG + 1)]),
            machine_id: String::new(),
        };
        let restored = RestoreReport {
            steps_ms: vec![("s".into(), 1); crate::identity::MAX_STEPS + 1],
            vmgenid: false,
            clock_step_ms: 0,
            sshd: String::new(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(warm_agent(
            b,
            Body::Sealed(report),
            Body::Restored(restored),
        ));
        let c = AgentClient::spawn(a);
        assert!(matches!(c.seal().await, Err(ClientError::Invalid(_))));
        let id = crate::identity::tests::identity();
        assert!(matches!(c.restore(id).await, Err(ClientError::Invalid(_))));
    }

    #[tokio::test]
    async fn version_mismatch_is_refused() {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(fake_agent(b, PROTO_VERSION + 1));
        let c = AgentClient::spawn(a);
        assert!(matches!(
            c.wait_hello().await,
            Err(ClientError::VersionMismatch { .. })
        ));
    }

    #[tokio::test]
    async fn lost_connection_ends_waiters() {
        let (a, b) = tokio::io::duplex(4096);
        let c = AgentClient::spawn(a);
        drop(b);
        assert!(matches!(
            c.wait_hello().await,
            Err(ClientError::Disconnected)
        ));
    }

    /// An agent that ignores credit: the host keeps at most the window of
    /// its output and ends the channel, whatever the agent sends.
    #[tokio::test]
    async fn output_beyond_the_window_ends_the_channel() {
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(b);
            let mut rd = FramedRead::new(rd, FrameCodec);
            let mut wr = FramedWrite::new(wr, FrameCodec);
            wr.send(Frame::test_hello(PROTO_VERSION))
                .await
                .expect("hello");
            while let Some(Ok(Ok(f))) = rd.next().await {
                match f.body {
                    Body::Exec(_) => {
                        for _ in 0..1000 {
                            let out = Body::Stdout(vec![b'x'; 1024]);
                            if wr.send(Frame::new(f.channel, out)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Answered after the flood: everything before is routed.
                    Body::ListListeners => {
                        let _ = wr
                            .send(Frame::new(f.channel, Body::Listeners(vec![])))
                            .await;
                    }
                    _ => {}
                }
            }
        });
        let c = AgentClient::spawn(a);
        c.wait_hello().await.expect("hello");
        let mut s = c.exec(ExecRequest::default()).expect("exec");
        c.list_listeners().await.expect("listeners");
        let mut outputs = 0;
        loop {
            match s.next_event().await.expect("event") {
                Some(ExecEvent::Stdout(_)) => outputs += 1,
                Some(ExecEvent::Error(m)) => {
                    assert!(m.contains("without credit"), "{m}");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(outputs, OUTPUT_WINDOW);
        assert_eq!(s.next_event().await.expect("end"), None);
    }

    /// Taking output grants credit, a quarter of the window at a time.
    #[tokio::test]
    async fn taking_output_grants_credit() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (credit_tx, mut credits) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(b);
            let mut rd = FramedRead::new(rd, FrameCodec);
            let mut wr = FramedWrite::new(wr, FrameCodec);
            while let Some(Ok(Ok(f))) = rd.next().await {
                match f.body {
                    Body::Exec(_) => {
                        for _ in 0..OUTPUT_WINDOW {
                            let out = Body::Stdout(b"x".to_vec());
                            wr.send(Frame::new(f.channel, out)).await.expect("out");
                        }
                    }
                    Body::Credit(n) => {
                        let _ = credit_tx.send(n);
                    }
                    _ => {}
                }
            }
        });
        let c = AgentClient::spawn(a);
        let mut s = c.exec(ExecRequest::default()).expect("exec");
        for _ in 0..OUTPUT_WINDOW {
            assert_eq!(
                s.next_event().await.expect("ev"),
                Some(ExecEvent::Stdout(b"x".to_vec()))
            );
        }
        let mut granted = 0;
        while granted < OUTPUT_WINDOW {
            let n = credits.recv().await.expect("credit");
            assert_eq!(n, OUTPUT_WINDOW / 4);
            granted += n;
        }
    }

    /// An agent that never answers: the request ends after its bound and
    /// leaves nothing waiting behind.
    #[tokio::test]
    async fn an_unanswered_request_times_out_and_is_forgotten() {
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(b);
            let mut rd = FramedRead::new(rd, FrameCodec);
            let _wr = FramedWrite::new(wr, FrameCodec);
            while let Some(Ok(Ok(_))) = rd.next().await {}
        });
        let mut c = AgentClient::spawn(a);
        c.query_timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let e = c.session_list().await.expect_err("no answer");
        assert!(
            matches!(
                e,
                ClientError::Timeout {
                    what: "SessionList",
                    secs: 1
                }
            ),
            "{e:?}"
        );
        assert!(started.elapsed() >= c.query_timeout);
        assert!(c.queries.lock().expect("lock").is_empty());
        // A caller's own, shorter bound leaves nothing behind either.
        let short = tokio::time::timeout(Duration::from_millis(100), c.list_listeners()).await;
        assert!(short.is_err());
        assert!(c.queries.lock().expect("lock").is_empty());
    }

    /// A flood of malformed frames logs one line, then one per period.
    #[test]
    fn malformed_frames_are_logged_sparingly() {
        let mut m = Malformed::default();
        assert!(m.skipped(&"bad"), "the first is logged");
        let logged = (0..10_000).filter(|_| m.skipped(&"bad")).count();
        assert_eq!(logged, 0);
        assert_eq!(m.unlogged, 10_000);
        m.last_logged = Some(std::time::Instant::now() - MALFORMED_LOG_EVERY);
        assert!(m.skipped(&"bad"), "logged again after the period");
        assert_eq!(m.unlogged, 0);
    }
}
