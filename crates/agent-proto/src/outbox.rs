//! The host's queue of frames to one agent, bounded for bulk data.
//!
//! Frames go to a writer task through an unbounded channel, so small
//! control frames (credit, signals, a cancel from `Drop`) can be sent from
//! synchronous code. Bulk data (stdin, an upload's tar stream) waits with
//! [`Outbox::send_bulk`] while more than [`BACKLOG_MAX`] bytes are queued
//! and not yet written: a guest that stops reading its end of the stream
//! (root in the guest can replace the agent) then stalls its own transfers
//! instead of making the host buffer everything the owner sends.

use crate::client::ClientError;
use crate::{Body, Frame};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc};

/// Bytes of frames queued for the writer beyond which bulk senders wait.
pub const BACKLOG_MAX: usize = 16 * crate::MAX_CHUNK;

/// Bytes a frame adds to the backlog: its payload for data frames, a
/// nominal size for the rest.
fn weight(frame: &Frame) -> usize {
    match &frame.body {
        Body::Stdin(d) | Body::ArchiveData(d) => d.len().max(1),
        _ => 64,
    }
}

#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
    closed: AtomicBool,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Frame>,
    backlog: Arc<Backlog>,
}

/// The writer task's side: frames to write, and what to report when each
/// is written.
pub(crate) struct Inbox {
    rx: mpsc::UnboundedReceiver<Frame>,
    backlog: Arc<Backlog>,
}

/// A new queue.
pub(crate) fn channel() -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    (
        Outbox {
            tx,
            backlog: backlog.clone(),
        },
        Inbox { rx, backlog },
    )
}

impl Outbox {
    /// Queues `frame` at once.
    pub(crate) fn send(&self, frame: Frame) -> Result<(), ClientError> {
        let w = weight(&frame);
        self.backlog.bytes.fetch_add(w, Ordering::AcqRel);
        self.tx.send(frame).map_err(|_| {
            self.backlog.bytes.fetch_sub(w, Ordering::AcqRel);
            ClientError::Disconnected
        })
    }

    /// Queues `frame` once the backlog is below [`BACKLOG_MAX`];
    /// `Disconnected` if the writer has stopped meanwhile.
    pub(crate) async fn send_bulk(&self, frame: Frame) -> Result<(), ClientError> {
        loop {
            let drained = self.backlog.drained.notified();
            if self.backlog.closed.load(Ordering::Acquire) {
                return Err(ClientError::Disconnected);
            }
            if self.backlog.bytes.load(Ordering::Acquire) < BACKLOG_MAX {
                return self.send(frame);
            }
            drained.await;
        }
    }
}

impl Inbox {
    /// The next frame to write, and a guard that takes it off the backlog
    /// once dropped (after the write).
    pub(crate) async fn recv(&mut self) -> Option<(Frame, Written)> {
        let frame = self.rx.recv().await?;
        let written = Written {
            bytes: weight(&frame),
            backlog: self.backlog.clone(),
        };
        Some((frame, written))
    }
}

impl Drop for Inbox {
    /// The writer has stopped: bulk senders waiting for room give up.
    fn drop(&mut self) {
        self.backlog.closed.store(true, Ordering::Release);
        self.backlog.drained.notify_waiters();
    }
}

/// One frame's share of the backlog, released when dropped.
pub(crate) struct Written {
    bytes: usize,
    backlog: Arc<Backlog>,
}

impl Drop for Written {
    fn drop(&mut self) {
        self.backlog.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.backlog.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bulk_senders_wait_for_the_writer_and_give_up_when_it_stops() {
        let (out, mut inbox) = channel();
        let chunk = || Frame::new(1, Body::Stdin(vec![0; crate::MAX_CHUNK]));
        for _ in 0..BACKLOG_MAX / crate::MAX_CHUNK {
            out.send_bulk(chunk()).await.expect("room");
        }
        // Full: the next bulk frame waits, a control frame does not.
        let waiting = tokio::time::timeout(Duration::from_millis(100), out.send_bulk(chunk()));
        assert!(waiting.await.is_err(), "a bulk frame passed a full backlog");
        out.send(Frame::new(1, Body::StdinEof)).expect("control");
        // One frame written: room again.
        let (_, written) = inbox.recv().await.expect("frame");
        drop(written);
        tokio::time::timeout(Duration::from_secs(5), out.send_bulk(chunk()))
            .await
            .expect("room after a write")
            .expect("sent");
        // The writer stops: a waiting sender fails instead of waiting on.
        let stuck = tokio::spawn({
            let out = out.clone();
            async move { out.send_bulk(chunk()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(inbox);
        let r = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("woken")
            .expect("join");
        assert!(matches!(r, Err(ClientError::Disconnected)), "{r:?}");
    }
}
