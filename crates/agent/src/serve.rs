//! The protocol loop over one host connection.

use crate::archive::{self, ArchiveMsg};
use crate::bootinfo::BootInfo;
use crate::exec::{self, SessionMsg};
use crate::identity::{self, IdentitySys, SealGate, SystemIdentity};
use crate::power::Power;
use crate::prepared::Prepared;
use crate::sessions::{Follow, Sessions};
use banger_agent_proto::{
    Body, CONTROL, Frame, FrameCodec, Hello, PROTO_VERSION, ProtoError, RestoreIdentity,
    SEALED_MESSAGE, SSHD_DEFER, SshdStart,
};
use bytes::BytesMut;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, Encoder, FramedRead};

/// Frames queued towards the host before producers (process output) wait.
const OUTBOX: usize = 64;

/// How long a closed connection waits for its killed processes to be reaped.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);

/// The agent: serves host connections one at a time.
#[derive(Clone)]
pub struct Agent {
    power: Arc<dyn Power>,
    /// Supervised sessions, shared by all host connections.
    sessions: Arc<Sessions>,
    /// How the guest booted, for [`Body::BootStatus`].
    boot: Arc<BootInfo>,
    /// Called once the first greeting has been written to a host.
    first_greeting: Arc<std::sync::Mutex<Option<Greeted>>>,
    /// The next greeting is stamped in the kernel log (see
    /// [`Agent::stamp_first_greeting`]).
    unannounced: Arc<std::sync::atomic::AtomicBool>,
    /// Sealed for a template, or waiting for a clone's identity: shared by
    /// all host connections (a clone's first connection is a new one).
    gate: Arc<SealGate>,
    /// The system calls of sealing and restoring.
    identity: Arc<dyn IdentitySys>,
    /// Told when a command ends, if a restore holds sshd back for it.
    first_command: FirstCommand,
    /// Whether early init has finished preparing the guest for commands.
    prepared: Prepared,
}

/// Where a restore that holds sshd back for the first command waits to be
/// told it has ended (see [`SshdStart::AfterFirstCommand`]).
type FirstCommand = Arc<std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>>;

type Greeted = Box<dyn FnOnce() + Send>;

impl Agent {
    /// An agent that carries out shutdown requests through `power`,
    /// started by the image's init.
    pub fn new(power: Arc<dyn Power>) -> Self {
        Self::with_boot(power, BootInfo::service())
    }

    /// An agent that knows how it was started (early init's child).
    pub fn with_boot(power: Arc<dyn Power>, boot: BootInfo) -> Self {
        Self {
            power,
            sessions: Arc::default(),
            boot: Arc::new(boot),
            first_greeting: Arc::default(),
            unannounced: Arc::default(),
            gate: Arc::default(),
            identity: Arc::new(SystemIdentity),
            first_command: Arc::default(),
            prepared: Prepared::default(),
        }
    }

    /// Holds the host's requests (all but pings, boot status and flow
    /// control) until `prepared` is ready; the greeting goes out at once.
    pub fn with_prepared(mut self, prepared: Prepared) -> Self {
        self.prepared = prepared;
        self
    }

    /// Seals and restores through `sys` instead of the guest's own system
    /// calls (tests record them).
    pub fn with_identity(mut self, sys: Arc<dyn IdentitySys>) -> Self {
        self.identity = sys;
        self
    }

    /// Whether the agent is sealed (see [`SealGate`]).
    pub fn is_sealed(&self) -> bool {
        self.gate.is_sealed()
    }

    /// Stamps the first greeting in the guest's kernel log and gives its
    /// uptime on that log's clock (the one the kernel's `Run /init` is
    /// timed by), so the host can compare the two. For the guest's agent
    /// only: it writes to the kernel log of the machine it runs on.
    pub fn stamp_first_greeting(self) -> Self {
        self.unannounced
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Calls `f` once the first greeting has been written to a host.
    pub fn on_first_greeting(&self, f: impl FnOnce() + Send + 'static) {
        if let Ok(mut g) = self.first_greeting.lock() {
            *g = Some(Box::new(f));
        }
    }

    /// Serves one host connection on `stream` until the host closes it.
    ///
    /// Greets first, then answers every frame. Processes started on this
    /// connection belong to it: when it ends they are killed (the host that
    /// could read their output is gone, and the next host numbers its
    /// channels from 1 again).
    pub async fn serve<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (out, out_rx) = mpsc::channel::<Frame>(OUTBOX);
        let greeted = self.first_greeting.lock().ok().and_then(|mut g| g.take());
        let boot_greeting = self
            .unannounced
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let writer = tokio::spawn(write_frames(wr, out_rx, greeted));
        let mut conn = Connection {
            power: self.power.clone(),
            sessions: self.sessions.clone(),
            boot: self.boot.clone(),
            gate: self.gate.clone(),
            identity: self.identity.clone(),
            first_command: self.first_command.clone(),
            prepared: self.prepared.clone(),
            out,
            channels: HashMap::new(),
            archives: HashMap::new(),
            tasks: JoinSet::new(),
            next_id: 0,
        };
        conn.send(CONTROL, hello(self.gate.is_sealed(), boot_greeting))
            .await;

        let mut frames = FramedRead::new(rd, HostFrames);
        loop {
            tokio::select! {
                next = frames.next() => match next {
                    Some(Ok(Ok(frame))) => conn.handle(frame).await,
                    Some(Ok(Err(bad))) => conn.reject(bad).await,
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "host connection failed");
                        break;
                    }
                    None => {
                        tracing::info!("host closed the connection");
                        break;
                    }
                },
                Some(done) = conn.tasks.join_next() => conn.reap(done),
                () = conn.out.closed() => {
                    tracing::info!("cannot write to the host any more");
                    break;
                }
            }
        }
        writer.abort();
        conn.teardown().await;
    }
}

/// State of one host connection.
struct Connection {
    power: Arc<dyn Power>,
    sessions: Arc<Sessions>,
    boot: Arc<BootInfo>,
    gate: Arc<SealGate>,
    identity: Arc<dyn IdentitySys>,
    first_command: FirstCommand,
    prepared: Prepared,
    out: mpsc::Sender<Frame>,
    /// Live channels (exec, session attach, session logs) with the id of
    /// the task serving each.
    channels: HashMap<u32, (u64, mpsc::UnboundedSender<SessionMsg>)>,
    /// Live file transfers by channel.
    archives: HashMap<u32, mpsc::Sender<ArchiveMsg>>,
    tasks: JoinSet<(u32, u64)>,
    next_id: u64,
}

impl Connection {
    async fn send(&self, channel: u32, body: Body) {
        // A failed send means the connection is going away; the main loop
        // sees that through `out.closed()`.
        let _ = self.out.send(Frame::new(channel, body)).await;
    }

    async fn handle(&mut self, frame: Frame) {
        let Frame { channel, body } = frame;
        // A sealed guest runs nothing with its template's identity.
        if self.gate.is_sealed()
            && !matches!(
                body,
                Body::Ping | Body::BootStatus { .. } | Body::Restore(_)
            )
        {
            // Credit or an abort needs no answer, sealed or not.
            if !matches!(body, Body::Credit(_) | Body::Error(_)) {
                self.send(channel, Body::Error(SEALED_MESSAGE.into())).await;
            }
            return;
        }
        if channel == CONTROL {
            return self.handle_control(body).await;
        }
        // Commands, transfers and sessions expect the network and a settled
        // /tmp. Frames are handled in order, so waiting here keeps a
        // channel's later frames behind its opening one.
        if !matches!(
            body,
            Body::BootStatus { .. } | Body::Credit(_) | Body::Error(_)
        ) {
            self.prepared.wait().await;
        }
        let body = match self.handle_archive(channel, body).await {
            Some(b) => b,
            None => return,
        };
        // Credit or an abort for a channel that has ended needs no answer.
        let quiet = matches!(body, Body::Credit(_) | Body::Error(_));
        let msg = match body {
            Body::Exec(req) => {
                let (out, first) = (self.out.clone(), self.first_command.clone());
                return self.open(channel, move |rx| async move {
                    exec::run(channel, req, rx, out).await;
                    let waiting = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(tx) = waiting {
                        let _ = tx.send(());
                    }
                });
            }
            Body::ListListeners => return self.list_listeners(channel),
            Body::Seal => return self.seal(channel).await,
            Body::Restore(id) => return self.restore(channel, *id).await,
            Body::SessionStart(spec) => {
                let answer = match self.sessions.start(spec) {
                    Ok(info) => Body::Session(info),
                    Err(e) => Body::Error(e),
                };
                return self.send(channel, answer).await;
            }
            Body::SessionList => {
                let all = self.sessions.list();
                return self.send(channel, Body::Sessions(all)).await;
            }
            Body::BootStatus { wait, explain } => {
                // Waiting for the init's boot can take long: off the loop.
                let (boot, out) = (self.boot.clone(), self.out.clone());
                tokio::spawn(async move {
                    let report = boot.report(wait, explain).await;
                    let _ = out.send(Frame::new(channel, Body::Boot(report))).await;
                });
                return;
            }
            Body::SessionStop { name } => {
                let (sessions, out) = (self.sessions.clone(), self.out.clone());
                tokio::spawn(async move {
                    let answer = match sessions.stop(&name).await {
                        Ok(info) => Body::Session(info),
                        Err(e) => Body::Error(e),
                    };
                    let _ = out.send(Frame::new(channel, answer)).await;
                });
                return;
            }
            Body::SessionAttach { name } => {
                let (sessions, out) = (self.sessions.clone(), self.out.clone());
                return self.open(channel, move |rx| async move {
                    sessions
                        .follow(channel, &name, Follow::Attach, rx, out)
                        .await
                });
            }
            Body::SessionLogs {
                name,
                stream,
                follow,
            } => {
                let (sessions, out) = (self.sessions.clone(), self.out.clone());
                return self.open(channel, move |rx| async move {
                    sessions
                        .follow(channel, &name, Follow::Logs { stream, follow }, rx, out)
                        .await
                });
            }
            Body::Stdin(data) => SessionMsg::Stdin(data),
            Body::StdinEof => SessionMsg::StdinEof,
            Body::Signal(sig) => SessionMsg::Signal(sig),
            Body::Resize(size) => SessionMsg::Resize(size),
            Body::Detach => SessionMsg::Detach,
            Body::Credit(n) => SessionMsg::Credit(n),
            Body::Error(reason) => {
                SessionMsg::Abort(format!("the host ended the channel: {reason}"))
            }
            other => SessionMsg::Abort(format!("unexpected {} frame from the host", other.kind())),
        };
        let live = self
            .channels
            .get(&channel)
            .filter(|(_, tx)| !tx.is_closed());
        match live {
            Some((_, tx)) => {
                let _ = tx.send(msg);
            }
            // Late credit, or the end of a channel that already ended:
            // nothing to answer.
            None if quiet => {}
            None => {
                let what = match &msg {
                    SessionMsg::Abort(reason) => reason.clone(),
                    _ => format!("no process is running on channel {channel}"),
                };
                self.send(channel, Body::Error(what)).await;
            }
        }
    }

    /// Takes the frames of archive channels; gives any other body back.
    async fn handle_archive(&mut self, channel: u32, body: Body) -> Option<Body> {
        let msg = match body {
            Body::PutArchive(req) => {
                let rx = self.open_archive(channel);
                tokio::spawn(archive::put(channel, req, rx, self.out.clone()));
                return None;
            }
            Body::GetArchive(req) => {
                let rx = self.open_archive(channel);
                tokio::spawn(archive::get(channel, req, rx, self.out.clone()));
                return None;
            }
            Body::ArchiveData(d) => ArchiveMsg::Data(d),
            Body::ArchiveEnd => ArchiveMsg::End,
            Body::Credit(n) if self.archives.contains_key(&channel) => ArchiveMsg::Credit(n),
            Body::Error(m) if self.archives.contains_key(&channel) => ArchiveMsg::Abort(m),
            other => {
                if self.archives.contains_key(&channel) {
                    let reason = format!("unexpected {} frame on a transfer", other.kind());
                    self.abort(channel, reason).await;
                    return None;
                }
                return Some(other);
            }
        };
        let Some(tx) = self.archives.get(&channel) else {
            // A transfer that already ended (its error was sent then).
            tracing::debug!(channel, "frame for a finished transfer");
            return None;
        };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.abort(channel, "the host exceeded its flow-control window".into())
                    .await;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.archives.remove(&channel);
            }
        }
        None
    }

    fn open_archive(&mut self, channel: u32) -> mpsc::Receiver<ArchiveMsg> {
        let (tx, rx) = mpsc::channel(archive::QUEUE);
        if let Some(old) = self.archives.insert(channel, tx) {
            let _ = old.try_send(ArchiveMsg::Abort(format!(
                "channel {channel} was reused by a new transfer"
            )));
        }
        self.archives.retain(|_, tx| !tx.is_closed());
        rx
    }

    /// Ends whatever runs on `channel` with an error: a malformed or
    /// out-of-order frame closes its channel, never the connection.
    async fn abort(&mut self, channel: u32, reason: String) {
        if let Some(tx) = self.archives.remove(&channel) {
            // The queue may be full: the transfer then sees its sender
            // dropped, which also aborts it.
            let _ = tx.try_send(ArchiveMsg::Abort(reason));
            return;
        }
        match self.channels.remove(&channel) {
            Some((_, tx)) if !tx.is_closed() => {
                let _ = tx.send(SessionMsg::Abort(reason));
            }
            _ => self.send(channel, Body::Error(reason)).await,
        }
    }

    async fn handle_control(&mut self, body: Body) {
        match body {
            Body::Ping => {
                self.send(CONTROL, hello(self.gate.is_sealed(), false))
                    .await
            }
            Body::Shutdown { reboot } => {
                tracing::info!(reboot, "host asked to shut down");
                let power = self.power.clone();
                let out = self.out.clone();
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || power.power_off(reboot)).await;
                    let err = match result {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("shutdown task failed: {e}"),
                    };
                    tracing::error!(error = %err, "shutdown failed");
                    let _ = out.send(Frame::new(CONTROL, Body::Error(err))).await;
                });
            }
            other => {
                let msg = format!("unexpected {} frame on the control channel", other.kind());
                self.send(CONTROL, Body::Error(msg)).await;
            }
        }
    }

    /// Seals the guest (see [`identity::seal`]) unless work is live: a
    /// template must hold no process or transfer of the host that built it.
    async fn seal(&mut self, channel: u32) {
        self.channels.retain(|_, (_, tx)| !tx.is_closed());
        self.archives.retain(|_, tx| !tx.is_closed());
        let sessions = self.sessions.running();
        if !self.channels.is_empty() || !self.archives.is_empty() || !sessions.is_empty() {
            let msg = format!(
                "cannot seal while work runs: {} command(s), {} transfer(s), sessions [{}]",
                self.channels.len(),
                self.archives.len(),
                sessions.join(", ")
            );
            return self.send(channel, Body::Error(msg)).await;
        }
        if let Err(e) = self.gate.begin_seal() {
            return self.send(channel, Body::Error(e)).await;
        }
        let (sys, gate, out) = (self.identity.clone(), self.gate.clone(), self.out.clone());
        tokio::task::spawn_blocking(move || {
            identity::run_seal(&*sys, &gate, |body| {
                let _ = out.blocking_send(Frame::new(channel, body));
            });
        });
    }

    /// Gives a sealed guest its identity (see [`identity::restore`]).
    async fn restore(&mut self, channel: u32, id: RestoreIdentity) {
        let plan = match self.gate.begin_restore() {
            Ok(p) => p,
            Err(e) => return self.send(channel, Body::Error(e)).await,
        };
        // Set before the answer, so the first command cannot end unseen.
        let first = match id.sshd {
            SshdStart::Now => None,
            SshdStart::AfterFirstCommand => {
                let (tx, rx) = std::sync::mpsc::channel();
                *self.first_command.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                Some(rx)
            }
        };
        let (sys, gate, out) = (self.identity.clone(), self.gate.clone(), self.out.clone());
        tokio::task::spawn_blocking(move || {
            let answer = |body| {
                let _ = out.blocking_send(Frame::new(channel, body));
            };
            let hold = || {
                if let Some(rx) = first {
                    let _ = rx.recv_timeout(SSHD_DEFER);
                }
            };
            identity::run_restore(&*sys, &gate, &id, plan, answer, hold);
        });
    }

    /// Answers on `channel` from a blocking task: walking /proc can take a
    /// moment on a busy guest.
    fn list_listeners(&self, channel: u32) {
        let out = self.out.clone();
        tokio::spawn(async move {
            let found = tokio::task::spawn_blocking(|| {
                crate::listeners::list(std::path::Path::new("/proc"))
            })
            .await;
            let body = match found {
                Ok(Ok(l)) => Body::Listeners(l),
                Ok(Err(e)) => Body::Error(format!("reading /proc/net/tcp: {e}")),
                Err(e) => Body::Error(format!("listing sockets failed: {e}")),
            };
            let _ = out.send(Frame::new(channel, body)).await;
        });
    }

    /// A frame that did not decode: the channel it was for (when its
    /// header could be read) is closed with an error; others are untouched.
    async fn reject(&mut self, bad: BadFrame) {
        tracing::warn!(channel = ?bad.channel, error = %bad.error, "bad frame from the host");
        let Some(channel) = bad.channel.filter(|c| *c != CONTROL) else {
            return;
        };
        let reason = format!("malformed frame on channel {channel}: {}", bad.error);
        self.abort(channel, reason).await;
    }

    /// Serves a new channel with the task `serve` makes from its inbox.
    fn open<F, Fut>(&mut self, channel: u32, serve: F)
    where
        F: FnOnce(mpsc::UnboundedReceiver<SessionMsg>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some((_, old)) = self.channels.remove(&channel) {
            // The host reused a live channel: the old process can no longer
            // be told apart from the new one, so it ends with an error.
            let _ = old.send(SessionMsg::Abort(format!(
                "channel {channel} was reused by a new request"
            )));
        }
        tracing::debug!(channel, "channel opened");
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.channels.insert(channel, (id, tx));
        let fut = serve(rx);
        self.tasks.spawn(async move {
            fut.await;
            (channel, id)
        });
    }

    fn reap(&mut self, done: Result<(u32, u64), tokio::task::JoinError>) {
        match done {
            Ok((channel, id)) => {
                if self
                    .channels
                    .get(&channel)
                    .is_some_and(|(live, _)| *live == id)
                {
                    self.channels.remove(&channel);
                }
            }
            Err(e) => tracing::error!(error = %e, "exec session task failed"),
        }
    }

    /// Kills every process of this connection and waits (boundedly) for
    /// them to be reaped.
    async fn teardown(mut self) {
        for (_, (_, tx)) in self.channels.drain() {
            let _ = tx.send(SessionMsg::Abort("the host connection closed".into()));
        }
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(TEARDOWN_GRACE, drain).await.is_err() {
            tracing::warn!("exec sessions did not end after the host left; abandoning them");
            self.tasks.abort_all();
        }
    }
}

/// Writes each frame with its own `write` so that a transport which
/// delivers whole writes (virtio-serial) never splits a frame.
/// Writes frames to the host; `greeted` is called after the first one (the
/// greeting) has been written.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Frame>,
    mut greeted: Option<Greeted>,
) {
    let mut buf = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        buf.clear();
        if let Err(e) = FrameCodec.encode(frame, &mut buf) {
            tracing::error!(error = %e, "cannot encode a frame for the host");
            continue;
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::info!(error = %e, "writing to the host failed");
            return;
        }
        if let Some(f) = greeted.take() {
            let _ = wr.flush().await;
            f();
        }
    }
}

/// The greeting. The agent's first (the one the host times a boot by) is
/// also marked in the kernel log, and its uptime is on that log's clock,
/// the one the kernel's `Run /init` is timed by.
fn hello(sealed: bool, boot_greeting: bool) -> Body {
    let uptime_ms = boot_greeting
        .then(|| crate::bootinfo::kernel_log_mark("banger-agent: greeting the host"))
        .flatten()
        .unwrap_or_else(crate::bootinfo::uptime_ms);
    Body::Hello(Hello {
        proto_version: PROTO_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms,
        sealed,
    })
}

/// A frame from the host that could not be used.
#[derive(Debug)]
pub struct BadFrame {
    /// The channel it named, when its header was readable.
    pub channel: Option<u32>,
    pub error: ProtoError,
}

/// [`FrameCodec`] for the agent's side: no frame, however bad, ends the
/// connection. An undecodable payload is reported with the channel it
/// named (the stream stays in sync); an impossible length means the stream
/// is out of sync, so what is buffered is dropped and decoding starts again
/// on the next bytes.
pub struct HostFrames;

impl Decoder for HostFrames {
    type Item = Result<Frame, BadFrame>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, std::io::Error> {
        // A frame's payload starts with its channel (postcard varint).
        let channel = src.get(4..).and_then(varint_u32);
        match FrameCodec.decode(src) {
            Ok(None) => Ok(None),
            Ok(Some(frame)) => Ok(Some(frame.map_err(|e| BadFrame {
                channel,
                error: ProtoError::from(e),
            }))),
            Err(ProtoError::Io(e)) => Err(e),
            Err(error) => {
                src.clear();
                Ok(Some(Err(BadFrame {
                    channel: None,
                    error,
                })))
            }
        }
    }
}

/// A postcard (LEB128) `u32` at the start of `b`.
fn varint_u32(b: &[u8]) -> Option<u32> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().take(5).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{Recorder, grown, identity};
    use banger_agent_proto::client::{AgentClient, ClientError, ExecEvent, ExecSession};
    use banger_agent_proto::{ExecRequest, PutArchive, SshdPlan};
    use bytes::BufMut;
    use futures::SinkExt;
    use tokio::time::timeout;
    use tokio_util::codec::FramedWrite;

    const LIMIT: Duration = Duration::from_secs(30);

    struct NoPower;

    impl Power for NoPower {
        fn power_off(&self, _reboot: bool) -> Result<(), crate::PowerError> {
            Ok(())
        }
    }

    /// An agent whose seal and restore are recorded; the guest's sshd runs
    /// under systemd as `ssh.service`.
    fn agent() -> (Agent, Arc<Recorder>) {
        let rec = Arc::new(Recorder {
            systemd: true,
            active_units: vec!["ssh.service"],
            ..grown()
        });
        let agent = Agent::new(Arc::new(NoPower)).with_identity(rec.clone());
        (agent, rec)
    }

    /// The host's raw frame reader and writer on one connection of `agent`.
    type RawHost = (
        FramedRead<tokio::io::ReadHalf<tokio::io::DuplexStream>, FrameCodec>,
        FramedWrite<tokio::io::WriteHalf<tokio::io::DuplexStream>, FrameCodec>,
        tokio::task::JoinHandle<()>,
    );

    /// Serves one connection of `agent`; returns the host's raw frames, for
    /// tests that send what the client never would.
    fn connect_raw(agent: &Agent) -> RawHost {
        let (host, guest) = tokio::io::duplex(1 << 16);
        let a = agent.clone();
        let task = tokio::spawn(async move { a.serve(guest).await });
        let (rd, wr) = tokio::io::split(host);
        (
            FramedRead::new(rd, FrameCodec),
            FramedWrite::new(wr, FrameCodec),
            task,
        )
    }

    /// Serves one connection of `agent`; returns the host's client.
    async fn connect(agent: &Agent) -> (AgentClient, tokio::task::JoinHandle<()>) {
        let (host, guest) = tokio::io::duplex(1 << 20);
        let a = agent.clone();
        let task = tokio::spawn(async move { a.serve(guest).await });
        (AgentClient::spawn(host), task)
    }

    async fn hello(c: &AgentClient) -> Hello {
        timeout(LIMIT, c.wait_hello())
            .await
            .expect("hello in time")
            .expect("hello")
    }

    #[tokio::test]
    async fn restore_when_not_sealed_is_refused() {
        let (agent, rec) = agent();
        let (c, _) = connect(&agent).await;
        assert!(!hello(&c).await.sealed);
        let err = c.restore(identity()).await.expect_err("refused");
        assert!(
            matches!(&err, ClientError::Refused(m) if m.contains("not sealed")),
            "{err}"
        );
        assert!(rec.lines().is_empty());
    }

    #[tokio::test]
    async fn sealed_agent_refuses_work_but_pings_and_restores() {
        let (agent, rec) = agent();
        let (c, _) = connect(&agent).await;
        hello(&c).await;
        let report = timeout(LIMIT, c.seal())
            .await
            .expect("in time")
            .expect("seal");
        assert_eq!(report.sshd, SshdPlan::Unit("ssh.service".into()));
        assert!(agent.is_sealed());

        // Exec, a file transfer, a second seal: refused with the one message.
        let mut exec = c
            .exec(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .expect("exec");
        assert_eq!(
            next(&mut exec).await,
            Some(ExecEvent::Error(SEALED_MESSAGE.into()))
        );
        let put = c
            .put_archive(PutArchive {
                dest: "/tmp/x".into(),
                replace: false,
            })
            .expect("put");
        let err = timeout(LIMIT, put.finish())
            .await
            .expect("in time")
            .expect_err("refused");
        assert!(err.to_string().contains(SEALED_MESSAGE), "{err}");
        let err = c.seal().await.expect_err("sealed");
        assert!(err.to_string().contains(SEALED_MESSAGE), "{err}");
        let err = c.list_listeners().await.expect_err("sealed");
        assert!(err.to_string().contains(SEALED_MESSAGE), "{err}");

        // A ping is answered, saying sealed.
        let (mut rd, mut wr, _) = connect_raw(&agent);
        let first = rd.next().await.expect("frame").expect("io").expect("valid");
        assert!(matches!(
            first.body,
            Body::Hello(Hello { sealed: true, .. })
        ));
        wr.send(Frame::new(CONTROL, Body::Ping))
            .await
            .expect("ping");
        let again = rd.next().await.expect("frame").expect("io").expect("valid");
        assert!(matches!(
            again.body,
            Body::Hello(Hello { sealed: true, .. })
        ));
        wr.send(Frame::new(CONTROL, Body::Shutdown { reboot: false }))
            .await
            .expect("shutdown");
        let refused = rd.next().await.expect("frame").expect("io").expect("valid");
        assert_eq!(
            refused,
            Frame::new(CONTROL, Body::Error(SEALED_MESSAGE.into()))
        );
        drop(wr);

        // The restore opens the gate: the same exec now runs.
        let r = timeout(LIMIT, c.restore(identity()))
            .await
            .expect("in time")
            .expect("restore");
        assert_eq!(r.sshd, "unit ssh.service");
        assert!(!agent.is_sealed());
        let mut exec = c
            .exec(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .expect("exec");
        let ev = next(&mut exec).await;
        assert!(
            matches!(ev, Some(ExecEvent::Exited(s)) if s.code == Some(0)),
            "{ev:?}"
        );
        // sshd is started after the answer (so possibly after the exec
        // above has finished, too).
        assert!(
            sshd_started(&rec).await,
            "sshd never started: {:?}",
            rec.lines()
        );
        assert_eq!(
            rec.lines().last().map(String::as_str),
            Some("systemctl start --no-block ssh.service"),
            "sshd not started last"
        );
    }

    /// The next event of `exec`, within [`LIMIT`].
    async fn next(exec: &mut ExecSession) -> Option<ExecEvent> {
        timeout(LIMIT, exec.next_event())
            .await
            .expect("in time")
            .expect("event")
    }

    /// Runs `script` under `sh -c` after an `echo up`, and returns once
    /// that line arrived: the command is running for sure.
    async fn running(c: &AgentClient, script: &str) -> ExecSession {
        let mut exec = c
            .exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), format!("echo up; {script}")],
                ..Default::default()
            })
            .expect("exec");
        let ev = next(&mut exec).await;
        assert_eq!(ev, Some(ExecEvent::Stdout(b"up\n".to_vec())));
        exec
    }

    /// Whether the recorder saw sshd started, within [`LIMIT`].
    async fn sshd_started(rec: &Recorder) -> bool {
        let started = async {
            while !rec
                .lines()
                .iter()
                .any(|l| l == "systemctl start --no-block ssh.service")
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        timeout(LIMIT, started).await.is_ok()
    }

    /// A sealed agent on a new connection, restored with `sshd` held back.
    async fn restored_holding_sshd(agent: &Agent) -> AgentClient {
        let (c, _) = connect(agent).await;
        hello(&c).await;
        timeout(LIMIT, c.seal())
            .await
            .expect("in time")
            .expect("seal");
        let held = RestoreIdentity {
            sshd: SshdStart::AfterFirstCommand,
            ..identity()
        };
        timeout(LIMIT, c.restore(held))
            .await
            .expect("in time")
            .expect("restore");
        c
    }

    /// sshd held back for the first command is not started while that
    /// command runs, and is once it has ended (well before the deadline).
    #[tokio::test]
    async fn a_held_sshd_starts_when_the_first_command_ends() {
        let (agent, rec) = agent();
        let asked = std::time::Instant::now();
        let c = restored_holding_sshd(&agent).await;
        let mut exec = running(&c, "sleep 0.2").await;
        assert!(
            !rec.lines().iter().any(|l| l.starts_with("systemctl start")),
            "sshd started while the first command ran: {:?}",
            rec.lines()
        );
        let ev = next(&mut exec).await;
        assert!(
            matches!(ev, Some(ExecEvent::Exited(s)) if s.code == Some(0)),
            "{ev:?}"
        );
        assert!(
            sshd_started(&rec).await,
            "sshd never started: {:?}",
            rec.lines()
        );
        assert!(
            asked.elapsed() < SSHD_DEFER,
            "sshd waited for the deadline ({:?}), not for the command",
            asked.elapsed()
        );
    }

    /// With no command, sshd held back starts at the deadline.
    #[tokio::test]
    async fn a_held_sshd_starts_by_the_deadline_without_a_command() {
        let (agent, rec) = agent();
        let asked = std::time::Instant::now();
        let _c = restored_holding_sshd(&agent).await;
        assert!(
            sshd_started(&rec).await,
            "sshd never started: {:?}",
            rec.lines()
        );
        assert!(
            asked.elapsed() >= SSHD_DEFER,
            "sshd started after {:?}, before the deadline, with no command",
            asked.elapsed()
        );
    }

    /// A clone's first host connection is a new one (Firecracker resets
    /// vsock at the snapshot): it is greeted sealed, and restored on it.
    #[tokio::test]
    async fn the_seal_outlives_the_connection() {
        let (agent, _) = agent();
        let (mut rd, mut wr, task) = connect_raw(&agent);
        let first = rd.next().await.expect("frame").expect("io").expect("valid");
        assert!(matches!(
            first.body,
            Body::Hello(Hello { sealed: false, .. })
        ));
        wr.send(Frame::new(1, Body::Seal)).await.expect("seal");
        let sealed = rd.next().await.expect("frame").expect("io").expect("valid");
        assert!(matches!(sealed.body, Body::Sealed(_)), "{sealed:?}");
        // The connection breaks (a vsock reset): the agent serves the next.
        drop((rd, wr));
        timeout(LIMIT, task)
            .await
            .expect("serve returns")
            .expect("task");
        let (c, _) = connect(&agent).await;
        assert!(hello(&c).await.sealed);
        timeout(LIMIT, c.restore(identity()))
            .await
            .expect("in time")
            .expect("restore");
        c.ping().expect("ping");
        let (c, _) = connect(&agent).await;
        assert!(!hello(&c).await.sealed);
    }

    #[tokio::test]
    async fn seal_is_refused_while_a_command_runs() {
        let (agent, rec) = agent();
        let (c, _) = connect(&agent).await;
        hello(&c).await;
        let exec = running(&c, "exec sleep 30").await;
        let err = c.seal().await.expect_err("refused");
        assert!(
            err.to_string()
                .contains("cannot seal while work runs: 1 command"),
            "{err}"
        );
        assert!(!agent.is_sealed());
        assert!(rec.lines().is_empty(), "nothing was stopped");
        drop(exec);
    }

    #[test]
    fn oversized_length_drops_the_buffer_and_decoding_resumes() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(u32::MAX);
        buf.extend_from_slice(b"garbage");
        assert!(matches!(
            HostFrames.decode(&mut buf),
            Ok(Some(Err(BadFrame {
                error: ProtoError::TooLarge(_),
                ..
            })))
        ));
        assert!(buf.is_empty());
        FrameCodec
            .encode(Frame::new(CONTROL, Body::Ping), &mut buf)
            .expect("encode");
        let next = HostFrames
            .decode(&mut buf)
            .expect("decode")
            .expect("frame")
            .expect("valid");
        assert_eq!(next, Frame::new(CONTROL, Body::Ping));
    }

    #[test]
    fn malformed_payload_is_an_item_not_an_error() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(3);
        // Channel 7, then a body tag no variant has.
        buf.extend_from_slice(&[7, 0xff, 0x7f]);
        assert!(matches!(
            HostFrames.decode(&mut buf),
            Ok(Some(Err(BadFrame {
                channel: Some(7),
                error: ProtoError::Malformed(_)
            })))
        ));
        assert!(buf.is_empty());
    }
}
