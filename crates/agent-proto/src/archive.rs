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
use crate::{Body, Frame, MAX_CHUNK};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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
    Credit(u32),
    Done(ArchiveSummary),
    Error(String),
}

pub(crate) type ArchiveRoutes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<ArchiveEvent>>>>;

/// Routes an agent frame to its archive handle; gives the body back when
/// `channel` is not an archive channel.
pub(crate) fn route(routes: &ArchiveRoutes, channel: u32, body: Body) -> Result<(), Body> {
    let Ok(mut r) = routes.lock() else {
        return Err(body);
    };
    let Some(tx) = r.get(&channel) else {
        return Err(body);
    };
    let (ev, last) = match body {
        Body::ArchiveData(d) => (ArchiveEvent::Data(d), false),
        Body::Credit(n) => (ArchiveEvent::Credit(n), false),
        Body::ArchiveDone(s) => (ArchiveEvent::Done(s), true),
        Body::Error(m) => (ArchiveEvent::Error(m), true),
        other => (
            ArchiveEvent::Error(format!("unexpected {other:?} frame on an archive channel")),
            true,
        ),
    };
    let _ = tx.send(ev);
    if last {
        r.remove(&channel);
    }
    Ok(())
}

/// State shared by both directions.
struct Channel {
    id: u32,
    tx: mpsc::UnboundedSender<Frame>,
    events: mpsc::UnboundedReceiver<ArchiveEvent>,
    routes: ArchiveRoutes,
    done: bool,
}

impl Channel {
    pub(crate) fn open(
        id: u32,
        tx: mpsc::UnboundedSender<Frame>,
        routes: ArchiveRoutes,
        request: Body,
    ) -> Result<Channel, ClientError> {
        let (ev_tx, events) = mpsc::unbounded_channel();
        routes
            .lock()
            .map_err(|_| ClientError::Disconnected)?
            .insert(id, ev_tx);
        let ch = Channel {
            id,
            tx,
            events,
            routes,
            done: false,
        };
        ch.send(request)?;
        Ok(ch)
    }

    fn send(&self, body: Body) -> Result<(), ClientError> {
        self.tx
            .send(Frame::new(self.id, body))
            .map_err(|_| ClientError::Disconnected)
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
    credit: u32,
}

impl ArchiveUpload {
    pub(crate) fn open(
        id: u32,
        tx: mpsc::UnboundedSender<Frame>,
        routes: ArchiveRoutes,
        req: PutArchive,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            ch: Channel::open(id, tx, routes, Body::PutArchive(req))?,
            credit: WINDOW,
        })
    }

    /// Sends the next bytes of the tar stream, waiting for credit when the
    /// window is full. Fails as soon as the agent refuses the stream.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        // An early refusal (a bad entry) must not wait for the window.
        while let Ok(ev) = self.ch.events.try_recv() {
            self.on_event(ev)?;
        }
        for chunk in data.chunks(MAX_CHUNK) {
            while self.credit == 0 {
                let ev = self.ch.event().await?;
                self.on_event(ev)?;
            }
            self.credit -= 1;
            self.ch.send(Body::ArchiveData(chunk.to_vec()))?;
        }
        Ok(())
    }

    fn on_event(&mut self, ev: ArchiveEvent) -> Result<(), ClientError> {
        match ev {
            ArchiveEvent::Credit(n) => {
                self.credit = self.credit.saturating_add(n);
                Ok(())
            }
            ArchiveEvent::Error(m) => {
                self.ch.done = true;
                Err(ClientError::Refused(m))
            }
            ArchiveEvent::Done(_) | ArchiveEvent::Data(_) => {
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
                ArchiveEvent::Credit(_) => {}
                ArchiveEvent::Done(s) => return Ok(s),
                ArchiveEvent::Error(m) => return Err(ClientError::Refused(m)),
                ArchiveEvent::Data(_) => {
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
    /// Chunks the agent may still send without more credit.
    outstanding: u32,
    /// Chunks consumed since the last credit.
    consumed: u32,
    summary: Option<ArchiveSummary>,
}

impl ArchiveDownload {
    pub(crate) fn open(
        id: u32,
        tx: mpsc::UnboundedSender<Frame>,
        routes: ArchiveRoutes,
        req: GetArchive,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            ch: Channel::open(id, tx, routes, Body::GetArchive(req))?,
            outstanding: WINDOW,
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
                    if self.outstanding == 0 {
                        self.ch.done = false; // abort it in the guest on drop
                        return Err(ClientError::Refused(
                            "the guest agent exceeded its flow-control window".into(),
                        ));
                    }
                    self.outstanding -= 1;
                    self.consumed += 1;
                    if self.consumed >= WINDOW / 2 {
                        self.ch.send(Body::Credit(self.consumed))?;
                        self.outstanding += self.consumed;
                        self.consumed = 0;
                    }
                    return Ok(Some(d));
                }
                ArchiveEvent::Credit(_) => {}
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
