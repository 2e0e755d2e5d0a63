//! The virtio-serial port, as a sequence of host connections.
//!
//! A virtio-serial port stays open in the guest while host processes come
//! and go on the other end (the QEMU chardev socket). The guest driver shows
//! this as follows: while no host is connected, `poll` reports `POLLHUP`
//! (and `POLLIN`), `read` returns 0 and `write` blocks (or `EAGAIN`); once a
//! host connects, data flows again. End of file is therefore not final, and
//! tokio's readiness tracking (which treats a hang-up as final) cannot drive
//! this descriptor. Two plain threads own it instead:
//!
//! - the reader polls it; while no host is there it waits for the
//!   driver's `SIGIO` (sent when the host's side opens or closes, see
//!   [`HostSignal`]), looking again after [`HOST_POLL_FIRST`], doubling up
//!   to [`HOST_POLL`], should none come (`poll` cannot wait for "host
//!   connected": `POLLHUP` is reported until then). Each time a host
//!   appears it hands out a new [`HostConnection`], and ends that
//!   connection's byte stream when the host goes away.
//! - the writer writes what connections send, one `write` per buffer. Bytes
//!   of a connection that has ended are dropped, never delivered to the next
//!   host; each buffer is at most [`WRITE_MAX`], which the driver passes to
//!   the host whole.

use bytes::Bytes;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// The longest the reader waits between looks for a host while none is
/// connected: a restored clone's host connects while the reader is at
/// this pace, so it bounds part of a warm start (50 wake-ups a second of
/// a guest whose host is away cost next to nothing).
pub const HOST_POLL: Duration = Duration::from_millis(20);
/// The first such wait after the port opens or a host leaves.
pub const HOST_POLL_FIRST: Duration = Duration::from_millis(2);

/// Largest write the guest driver hands to the host as one buffer.
pub const WRITE_MAX: usize = 32 * 1024;

/// Back-off after an unexpected error on the port.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Errors opening the port.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot open virtio-serial port {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the thread serving {path}: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open virtio-serial port. See the module docs.
pub struct VirtioPort {
    connections: mpsc::Receiver<HostConnection>,
}

impl VirtioPort {
    /// Opens the port's device node and starts its reader and writer threads.
    pub fn open(path: &Path) -> Result<Self, VirtioError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| VirtioError::Open {
                path: path.to_owned(),
                source,
            })?;
        let file = Arc::new(file);
        let epoch = Arc::new(AtomicU64::new(0));
        let (write_tx, write_rx) = mpsc::channel::<(u64, Bytes)>(16);
        let (conn_tx, connections) = mpsc::channel(1);

        let reader = Reader {
            file: file.clone(),
            epoch: epoch.clone(),
            write_tx,
            connections: conn_tx,
        };
        let writer = Writer { file, epoch };
        let thread = |name: &str| std::thread::Builder::new().name(name.to_string());
        let spawn_err = |source| VirtioError::Thread {
            path: path.to_owned(),
            source,
        };
        thread("port-reader")
            .spawn(move || reader.run())
            .map_err(spawn_err)?;
        thread("port-writer")
            .spawn(move || writer.run(write_rx))
            .map_err(spawn_err)?;
        Ok(Self { connections })
    }

    /// Waits for the next host to connect. `None` only if the reader thread
    /// is gone.
    pub async fn accept(&mut self) -> Option<HostConnection> {
        self.connections.recv().await
    }
}

/// One host's session on the port: reads end (EOF) when that host goes
/// away; writes after that are dropped.
pub struct HostConnection {
    epoch: u64,
    current: Arc<AtomicU64>,
    incoming: mpsc::Receiver<Bytes>,
    pending: Bytes,
    outgoing: PollSender<(u64, Bytes)>,
}

impl AsyncRead for HostConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match ready!(this.incoming.poll_recv(cx)) {
                Some(data) => this.pending = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HostConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.current.load(Ordering::SeqCst) != this.epoch {
            return Poll::Ready(Err(host_gone()));
        }
        ready!(this.outgoing.poll_reserve(cx)).map_err(|_| host_gone())?;
        let n = buf.len().min(WRITE_MAX);
        this.outgoing
            .send_item((this.epoch, Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| host_gone())?;
        Poll::Ready(Ok(n))
    }

    /// Data is handed to the writer thread; the port itself has no buffer
    /// the agent could flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().outgoing.close();
        Poll::Ready(Ok(()))
    }
}

fn host_gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the host left the virtio-serial port",
    )
}

/// The reader thread.
struct Reader {
    file: Arc<File>,
    /// Id of the live connection; bumped when it ends, so its pending
    /// writes are dropped.
    epoch: Arc<AtomicU64>,
    write_tx: mpsc::Sender<(u64, Bytes)>,
    connections: mpsc::Sender<HostConnection>,
}

impl Reader {
    fn run(self) {
        // Where the live connection's bytes go; `None` while no host is there.
        let mut feed: Option<mpsc::Sender<Bytes>> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let mut pause = HOST_POLL_FIRST;
        let signal = match HostSignal::arm(&self.file) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::info!(error = %e, "no SIGIO from the virtio-serial port: looking for the host every {HOST_POLL:?}");
                None
            }
        };
        loop {
            let wait = if feed.is_some() {
                PollTimeout::NONE
            } else {
                PollTimeout::ZERO
            };
            let revents = match poll_port(&self.file, PollFlags::POLLIN, wait) {
                Ok(r) => r,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "polling the virtio-serial port failed");
                    std::thread::sleep(ERROR_PAUSE);
                    continue;
                }
            };
            if revents.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                tracing::warn!(?revents, "the virtio-serial port reports an error");
                std::thread::sleep(ERROR_PAUSE);
                continue;
            }
            let mut host_gone = revents.contains(PollFlags::POLLHUP);
            // With the host gone, data it sent before leaving is still
            // delivered (a Shutdown request, say), then read returns 0.
            if revents.contains(PollFlags::POLLIN) {
                match (&*self.file).read(&mut buf) {
                    Ok(0) => host_gone = true,
                    Ok(n) => {
                        if !self.deliver(&mut feed, Bytes::copy_from_slice(&buf[..n])) {
                            return;
                        }
                        continue;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the virtio-serial port failed");
                        std::thread::sleep(ERROR_PAUSE);
                        continue;
                    }
                }
            }
            if host_gone {
                if feed.take().is_some() {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    tracing::info!("host left the virtio-serial port");
                    pause = HOST_POLL_FIRST;
                }
                match &signal {
                    Some(s) => s.wait(pause),
                    None => std::thread::sleep(pause),
                }
                pause = (pause * 2).min(HOST_POLL);
                continue;
            }
            if feed.is_none() {
                match self.connect() {
                    Some(f) => feed = Some(f),
                    None => return,
                }
            }
        }
    }

    /// Passes bytes to the live connection, starting one if there is none
    /// or if the agent dropped it. False when the port itself was dropped.
    fn deliver(&self, feed: &mut Option<mpsc::Sender<Bytes>>, mut data: Bytes) -> bool {
        loop {
            let tx = match feed {
                Some(tx) => tx,
                None => match self.connect() {
                    Some(tx) => feed.insert(tx),
                    None => return false,
                },
            };
            match tx.blocking_send(data) {
                Ok(()) => return true,
                Err(mpsc::error::SendError(back)) => {
                    data = back;
                    *feed = None;
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Hands out a new connection; `None` when the port was dropped.
    fn connect(&self) -> Option<mpsc::Sender<Bytes>> {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, incoming) = mpsc::channel(16);
        let conn = HostConnection {
            epoch,
            current: self.epoch.clone(),
            incoming,
            pending: Bytes::new(),
            outgoing: PollSender::new(self.write_tx.clone()),
        };
        tracing::info!("host connected on the virtio-serial port");
        self.connections.blocking_send(conn).ok()?;
        Some(tx)
    }
}

/// The writer thread.
struct Writer {
    file: Arc<File>,
    epoch: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<(u64, Bytes)>) {
        while let Some((epoch, data)) = rx.blocking_recv() {
            self.write(epoch, &data);
        }
    }

    fn write(&self, epoch: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            if self.epoch.load(Ordering::SeqCst) != epoch {
                tracing::debug!(
                    bytes = data.len() - done,
                    "dropping output for a host that left"
                );
                return;
            }
            match (&*self.file).write(&data[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait_writable(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "writing the virtio-serial port failed");
                    return;
                }
            }
        }
    }

    /// Waits until the port takes data again: at once when the host's queue
    /// drains; while no host is connected, a short nap before looking again
    /// (the caller then rechecks whether the data is still wanted).
    fn wait_writable(&self) {
        match poll_port(&self.file, PollFlags::POLLOUT, PollTimeout::from(1000u16)) {
            Ok(r) if r.contains(PollFlags::POLLHUP) => std::thread::sleep(HOST_POLL),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "polling the virtio-serial port failed");
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
}

/// `SIGIO` from the port to the reader thread: the guest driver sends it
/// when the host's side opens or closes (and when data arrives), so a
/// host that connects is seen at once rather than at the next look.
/// The signal is directed at this one thread (`F_OWNER_TID`), which keeps
/// it blocked and takes it with `sigtimedwait`: no handler, and no other
/// thread (nor the commands it starts) is touched.
struct HostSignal {
    set: nix::sys::signal::SigSet,
}

impl HostSignal {
    /// Arms the port's signal for the calling thread.
    fn arm(file: &File) -> nix::Result<Self> {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
        use std::os::fd::AsRawFd;
        let mut set = SigSet::empty();
        set.add(Signal::SIGIO);
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        // <linux/fcntl.h>, the same on every architecture; the libc crate
        // has them for musl only.
        const F_SETOWN_EX: libc::c_int = 15;
        const F_OWNER_TID: libc::c_int = 0;
        #[repr(C)]
        struct FOwnerEx {
            kind: libc::c_int,
            pid: libc::pid_t,
        }
        let fd = file.as_raw_fd();
        let owner = FOwnerEx {
            kind: F_OWNER_TID,
            pid: nix::unistd::gettid().as_raw(),
        };
        // SAFETY: fcntl(2) on an open descriptor with a valid, initialised
        // argument of the type each command takes.
        unsafe {
            Errno::result(libc::fcntl(fd, F_SETOWN_EX, &owner))?;
            let flags = Errno::result(libc::fcntl(fd, libc::F_GETFL))?;
            Errno::result(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC))?;
        }
        Ok(Self { set })
    }

    /// Returns when the port signals, or after `timeout` (another
    /// signal's handler does not end the wait).
    fn wait(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos()),
            };
            // SAFETY: sigtimedwait(2) with a valid set and timeout; the
            // siginfo pointer may be null.
            let r = unsafe { libc::sigtimedwait(self.set.as_ref(), std::ptr::null_mut(), &ts) };
            if r >= 0 || Errno::last() != Errno::EINTR || left.is_zero() {
                return;
            }
        }
    }
}

fn poll_port(file: &File, events: PollFlags, timeout: PollTimeout) -> nix::Result<PollFlags> {
    let mut fds = [PollFd::new(file.as_fd(), events)];
    poll(&mut fds, timeout)?;
    Ok(fds[0].revents().unwrap_or(PollFlags::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The signal wakes the waiting thread as soon as its descriptor has
    /// news (here a pipe's data), long before the wait's end; without
    /// news the wait runs its course.
    #[test]
    fn the_signal_ends_the_wait_early() {
        let (rd, wr) = nix::unistd::pipe().expect("pipe");
        let (armed_tx, armed_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let file = File::from(rd);
            let signal = HostSignal::arm(&file).expect("arm");
            let t = Instant::now();
            signal.wait(Duration::from_millis(50));
            let quiet = t.elapsed();
            armed_tx.send(()).expect("send");
            let t = Instant::now();
            signal.wait(Duration::from_secs(30));
            (quiet, t.elapsed())
        });
        armed_rx.recv().expect("armed");
        File::from(wr).write_all(b"x").expect("write");
        let (quiet, woken) = waiter.join().expect("waiter");
        assert!(quiet >= Duration::from_millis(50), "{quiet:?}");
        assert!(woken < Duration::from_secs(20), "{woken:?}");
    }
}
