//! Archive channels: tar streams between host and guest.
//!
//! Put (host → guest): the host opens a channel with
//! [`Body::PutArchive`](crate::Body::PutArchive), sends the tar stream in
//! [`Body::ArchiveData`](crate::Body::ArchiveData) chunks of at most
//! [`MAX_CHUNK`](crate::MAX_CHUNK) bytes, then
//! [`Body::ArchiveEnd`](crate::Body::ArchiveEnd). The agent unpacks entries
//! as they arrive and closes the channel with
//! [`Body::ArchiveDone`](crate::Body::ArchiveDone) or `Error`.
//!
//! Get (guest → host): the host opens a channel with
//! [`Body::GetArchive`](crate::Body::GetArchive); the agent answers with
//! `ArchiveData` chunks and `ArchiveDone` (or `Error`).
//!
//! Flow control: the sender of `ArchiveData` may have at most [`WINDOW`]
//! chunks unacknowledged; the receiver grants more with
//! [`Body::Credit`](crate::Body::Credit) as it consumes them. A sender that
//! exceeds its window fails the transfer. So neither side ever buffers more
//! than `WINDOW` chunks of one transfer, however fast the other is. The host
//! aborts a transfer by sending `Error` on its channel.

use crate::client::ClientError;
use crate::outbox::Outbox;
use crate::{Body, Frame, MAX_CHUNK};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Chunks a sender may have in flight before it needs credit.
pub const WINDOW: u32 = 16;

/// Unpack a tar stream into a guest directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutArchive {
    /// Absolute guest directory; created with its parents when missing.
    pub dest: String,
    /// Replace `dest` as a whole: unpack beside it and swap it in only when
    /// the stream was complete and valid, so an interrupted or refused
    /// transfer leaves the old contents. Otherwise merge into it.
    pub replace: bool,
}

/// Stream a tar of a guest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GetArchive {
    /// Absolute guest path of a file or directory.
    pub path: String,
    /// Name of its top entry in the archive.
    pub name: String,
}

/// The outcome of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ArchiveSummary {
    /// Files and links transferred.
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// What the packing side left out, one line each (e.g. symlinks that
    /// point outside the tree); at most [`MAX_SKIPPED`] lines.
    pub skipped: Vec<String>,
}

/// Most skip notes an [`ArchiveSummary`] carries.
pub const MAX_SKIPPED: usize = 100;

/// What the client's reader routes to an archive handle.
#[derive(Debug)]
pub(crate) enum ArchiveEvent {
    Data(Vec<u8>),
    /// The agent granted credit (the amount is in [`ArchiveRoute::credit`]):
    /// sent only when that was zero, so a flood of grants queues nothing.
    Credit,
    Done(ArchiveSummary),
    Error(String),
    /// The agent sent more data than its window allows: the transfer ends
    /// (and is cancelled in the guest) instead of the host buffering it.
    Overrun,
}

/// Where an archive channel's frames go, and its flow control, kept as
/// frames arrive: whatever the consumer's pace, a channel queues at most
/// [`WINDOW`] chunks and one credit wake-up.
pub(crate) struct ArchiveRoute {
    tx: mpsc::UnboundedSender<ArchiveEvent>,
    /// Data chunks received and not yet credited back (downloads).
    unacked: Arc<AtomicU32>,
    /// Chunks the host may still send (uploads); grants beyond [`WINDOW`]
    /// are cut, as an honest agent never has more than that in flight.
    credit: Arc<AtomicU32>,
}

pub(crate) type ArchiveRoutes = Arc<Mutex<HashMap<u32, ArchiveRoute>>>;

/// Routes an agent frame to its archive handle; gives the body back when
/// `channel` is not an archive channel.
pub(crate) fn route(routes: &ArchiveRoutes, channel: u32, body: Body) -> Result<(), Body> {
    let Ok(mut r) = routes.lock() else {
        return Err(body);
    };
    let Some(route) = r.get(&channel) else {
        return Err(body);
    };
    let (ev, last) = match body {
        Body::ArchiveData(_) if route.unacked.fetch_add(1, Ordering::AcqRel) >= WINDOW => {
            (ArchiveEvent::Overrun, true)
        }
        Body::ArchiveData(d) => (ArchiveEvent::Data(d), false),
        Body::Credit(n) => {
            let before = route
                .credit
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                    Some(c.saturating_add(n).min(WINDOW))
                })
                .unwrap_or(WINDOW);
            if before != 0 || n == 0 {
                return Ok(());
            }
            (ArchiveEvent::Credit, false)
        }
        Body::ArchiveDone(s) => (ArchiveEvent::Done(s), true),
        Body::Error(m) => (ArchiveEvent::Error(m), true),
        other => (
            ArchiveEvent::Error(format!(
                "unexpected {} frame on an archive channel",
                other.kind()
            )),
            true,
        ),
    };
    let _ = route.tx.send(ev);
    if last {
        r.remove(&channel);
    }
    Ok(())
}

/// State shared by both directions.
struct Channel {
    id: u32,
    tx: Outbox,
    events: mpsc::UnboundedReceiver<ArchiveEvent>,
    routes: ArchiveRoutes,
    /// Shared with the route (see [`ArchiveRoute`]).
    unacked: Arc<AtomicU32>,
    credit: Arc<AtomicU32>,
    done: bool,
}

impl Channel {
    pub(crate) fn open(
        id: u32,
        tx: Outbox,
        routes: ArchiveRoutes,
        request: Body,
    ) -> Result<Channel, ClientError> {
        let (ev_tx, events) = mpsc::unbounded_channel();
        let unacked = Arc::new(AtomicU32::new(0));
        let credit = Arc::new(AtomicU32::new(WINDOW));
        let route = ArchiveRoute {
            tx: ev_tx,
            unacked: unacked.clone(),
            credit: credit.clone(),
        };
        routes
            .lock()
            .map_err(|_| ClientError::Disconnected)?
            .insert(id, route);
        let ch = Channel {
            id,
            tx,
            events,
            routes,
            unacked,
            credit,
            done: false,
        };
        ch.send(request)?;
        Ok(ch)
    }

    fn send(&self, body: Body) -> Result<(), ClientError> {
        self.tx.send(Frame::new(self.id, body))
    }

    async fn event(&mut self) -> Result<ArchiveEvent, ClientError> {
        match self.events.recv().await {
            Some(ev) => {
                if matches!(ev, ArchiveEvent::Done(_) | ArchiveEvent::Error(_)) {
                    self.done = true;
                }
                Ok(ev)
            }
            None => {
                self.done = true;
                Err(ClientError::Disconnected)
            }
        }
    }
}

impl Drop for Channel {
    /// A transfer dropped before its end is aborted in the guest.
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send(Body::Error("the host cancelled the transfer".into()));
        }
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.id);
        }
    }
}

/// A tar stream on its way into the guest.
pub struct ArchiveUpload {
    ch: Channel,
}

impl ArchiveUpload {
    pub(crate) fn open(
        id: u32,
        tx: Outbox,
        routes: ArchiveRoutes,
        req: PutArchive,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            ch: Channel::open(id, tx, routes, Body::PutArchive(req))?,
        })
    }

    /// Sends the next bytes of the tar stream, waiting for credit when the
    /// window is full, and while the agent's end of the connection is not
    /// being read (see [`crate::outbox`]). Fails as soon as the agent
    /// refuses the stream.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        // An early refusal (a bad entry) must not wait for the window.
        while let Ok(ev) = self.ch.events.try_recv() {
            self.on_event(ev)?;
        }
        for chunk in data.chunks(MAX_CHUNK) {
            while !self.take_credit() {
                let ev = self.ch.event().await?;
                self.on_event(ev)?;
            }
            self.ch
                .tx
                .send_bulk(Frame::new(self.ch.id, Body::ArchiveData(chunk.to_vec())))
                .await?;
        }
        Ok(())
    }

    /// Takes one chunk's credit, if there is any.
    fn take_credit(&self) -> bool {
        self.ch
            .credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1))
            .is_ok()
    }

    fn on_event(&mut self, ev: ArchiveEvent) -> Result<(), ClientError> {
        match ev {
            ArchiveEvent::Credit => Ok(()),
            ArchiveEvent::Error(m) => {
                self.ch.done = true;
                Err(ClientError::Refused(m))
            }
            ArchiveEvent::Done(_) | ArchiveEvent::Data(_) | ArchiveEvent::Overrun => {
                self.ch.done = true;
                Err(ClientError::Refused(
                    "the guest agent ended the upload before the stream did".into(),
                ))
            }
        }
    }

    /// Ends the stream and waits for the agent's summary.
    pub async fn finish(mut self) -> Result<ArchiveSummary, ClientError> {
        while let Ok(ev) = self.ch.events.try_recv() {
            self.on_event(ev)?;
        }
        self.ch.send(Body::ArchiveEnd)?;
        loop {
            match self.ch.event().await? {
                ArchiveEvent::Credit => {}
                ArchiveEvent::Done(s) => return Ok(s),
                ArchiveEvent::Error(m) => return Err(ClientError::Refused(m)),
                ArchiveEvent::Data(_) | ArchiveEvent::Overrun => {
                    self.ch.done = true;
                    return Err(ClientError::Refused(
                        "the guest agent sent data on an upload".into(),
                    ));
                }
            }
        }
    }
}

/// A tar stream coming out of the guest.
pub struct ArchiveDownload {
    ch: Channel,
    /// Chunks consumed since the last credit.
    consumed: u32,
    summary: Option<ArchiveSummary>,
}

impl ArchiveDownload {
    pub(crate) fn open(
        id: u32,
        tx: Outbox,
        routes: ArchiveRoutes,
        req: GetArchive,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            ch: Channel::open(id, tx, routes, Body::GetArchive(req))?,
            consumed: 0,
            summary: None,
        })
    }

    /// The next piece of the tar stream; `None` once it is complete (then
    /// [`summary`](Self::summary) is set).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        loop {
            match self.ch.event().await? {
                ArchiveEvent::Data(d) => {
                    self.consumed += 1;
                    if self.consumed >= WINDOW / 2 {
                        // Counted down before the grant goes out: the data
                        // it allows may arrive before this task runs again.
                        self.ch.unacked.fetch_sub(self.consumed, Ordering::AcqRel);
                        self.ch.send(Body::Credit(self.consumed))?;
                        self.consumed = 0;
                    }
                    return Ok(Some(d));
                }
                ArchiveEvent::Overrun => {
                    return Err(ClientError::Refused(
                        "the guest agent exceeded its flow-control window".into(),
                    ));
                }
                ArchiveEvent::Credit => {}
                ArchiveEvent::Done(s) => {
                    self.summary = Some(s);
                    return Ok(None);
                }
                ArchiveEvent::Error(m) => return Err(ClientError::Refused(m)),
            }
        }
    }

    /// The agent's summary, once the stream is complete.
    pub fn summary(&self) -> Option<&ArchiveSummary> {
        self.summary.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::AgentClient;
    use crate::{FrameCodec, PROTO_VERSION};
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::io::DuplexStream;
    use tokio_util::codec::{FramedRead, FramedWrite};

    type Reader = FramedRead<tokio::io::ReadHalf<DuplexStream>, FrameCodec>;
    type Writer = FramedWrite<tokio::io::WriteHalf<DuplexStream>, FrameCodec>;

    /// A hostile agent's ends of an in-memory connection, and the host's
    /// client on the other.
    fn connect() -> (Reader, Writer, AgentClient) {
        let (host, guest) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(guest);
        let client = AgentClient::spawn(host);
        (
            FramedRead::new(rd, FrameCodec),
            FramedWrite::new(wr, FrameCodec),
            client,
        )
    }

    /// The channel of the next frame of `kind` from the host.
    async fn opened(rd: &mut Reader, kind: &str) -> u32 {
        while let Some(Ok(Ok(f))) = rd.next().await {
            if f.body.kind() == kind {
                return f.channel;
            }
        }
        panic!("the host never sent {kind}");
    }

    /// A download of `/x` and its channel, as the agent sees it opened.
    async fn download(client: &AgentClient, rd: &mut Reader) -> (ArchiveDownload, u32) {
        let down = client
            .get_archive(GetArchive {
                path: "/x".into(),
                name: "x".into(),
            })
            .expect("open");
        (down, opened(rd, "GetArchive").await)
    }

    /// Sent after other frames: once the host has it, it has read those.
    async fn mark(wr: &mut Writer) {
        wr.send(Frame::test_hello(PROTO_VERSION))
            .await
            .expect("hello");
    }

    #[tokio::test]
    async fn a_download_past_its_window_ends_as_it_arrives() {
        let (mut rd, mut wr, client) = connect();
        let (mut down, ch) = download(&client, &mut rd).await;
        // Far past the window, and nobody reads on the host meanwhile.
        for _ in 0..300 {
            wr.send(Frame::new(ch, Body::ArchiveData(vec![7; 1024])))
                .await
                .expect("the host reads on");
        }
        mark(&mut wr).await;
        client.wait_hello().await.expect("hello");
        assert!(
            down.ch.events.len() <= WINDOW as usize + 1,
            "{} events queued for a window of {WINDOW}",
            down.ch.events.len()
        );
        for _ in 0..WINDOW {
            assert_eq!(
                down.next().await.expect("within the window"),
                Some(vec![7; 1024])
            );
        }
        let e = down.next().await.expect_err("overrun");
        assert!(e.to_string().contains("flow-control window"), "{e}");
        // The guest is told the transfer is over.
        drop(down);
        let mut cancelled = false;
        while let Some(Ok(Ok(f))) = rd.next().await {
            if f.channel == ch && matches!(f.body, Body::Error(_)) {
                cancelled = true;
                break;
            }
        }
        assert!(cancelled);
    }

    #[tokio::test]
    async fn forged_credit_and_an_unread_stream_hold_an_upload_back() {
        let (mut rd, mut wr, client) = connect();
        let mut up = client
            .put_archive(PutArchive {
                dest: "/root".into(),
                replace: false,
            })
            .expect("open");
        let ch = opened(&mut rd, "PutArchive").await;
        // Endless credit, then the agent stops reading its end.
        for _ in 0..100 {
            wr.send(Frame::new(ch, Body::Credit(u32::MAX)))
                .await
                .expect("credit");
        }
        mark(&mut wr).await;
        client.wait_hello().await.expect("hello");
        assert!(up.ch.credit.load(Ordering::Acquire) <= WINDOW);
        assert!(up.ch.events.len() <= 1, "{}", up.ch.events.len());
        let data = vec![0u8; 64 << 20];
        let wrote = tokio::time::timeout(Duration::from_secs(1), up.write(&data)).await;
        assert!(
            wrote.is_err(),
            "64 MiB went into the host's queue for an agent that reads nothing"
        );
        drop(rd);
    }

    #[tokio::test]
    async fn an_unexpected_frame_is_named_not_dumped() {
        let (mut rd, mut wr, client) = connect();
        let (mut down, ch) = download(&client, &mut rd).await;
        let big = Body::Stdout(vec![b'A'; crate::MAX_CHUNK]);
        wr.send(Frame::new(ch, big)).await.expect("sent");
        let e = down.next().await.expect_err("refused");
        assert_eq!(
            e.to_string(),
            "guest agent refused the request: unexpected Stdout frame on an archive channel"
        );
    }
}
