//! vsock to the host (Firecracker, or QEMU with a vhost-user vsock device).
//!
//! The guest connects out to the host (CID 2); the VMM forwards the
//! connection to the host's Unix socket for that port. When the connection
//! drops (daemon restart), the agent connects again, the first time at once.
//!
//! A connection can also break without a word from the host: Firecracker
//! resets the vsock device when it snapshots a VM, and a clone resumes with
//! its connection reset by the guest's driver (`sk_err = ECONNRESET`). The
//! socket then polls as `EPOLLERR | EPOLLOUT`, never readable, and tokio
//! wakes a reader only on read readiness: a reader waiting on the dead
//! connection would wait forever. So a read also waits for the socket's
//! error readiness, and ends with that error.

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, Shutdown, SockFlag, SockType, VsockAddr, connect, shutdown, socket,
};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// A connected vsock stream.
pub struct VsockStream {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Resolves once the socket reports an error (see the module docs);
    /// `None` after that, when every read fails.
    failed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// Connects to `port` on the host, retrying with exponential back-off
/// (up to [`MAX_RETRY`] apart) until the host accepts.
pub async fn connect_host(port: u32) -> VsockStream {
    let mut wait = FIRST_RETRY;
    let mut failures = 0u32;
    loop {
        match VsockStream::connect(HOST_CID, port).await {
            Ok(stream) => {
                tracing::info!(port, "connected to the host over vsock");
                return stream;
            }
            Err(e) => {
                failures += 1;
                // Say it once, then only now and then: the host may simply
                // not be listening yet.
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::info!(port, error = %e, failures, "cannot reach the host over vsock yet");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY);
            }
        }
    }
}

impl VsockStream {
    /// Connects to `cid:port`.
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        // vsock connect blocks up to its own timeout; keep it off the runtime.
        let fd = tokio::task::spawn_blocking(move || -> io::Result<OwnedFd> {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
            Ok(fd)
        })
        .await
        .map_err(io::Error::other)??;
        Self::from_fd(fd)
    }

    /// Serves a connected stream socket.
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open (and is
        // not replaced) for as long as it is registered.
        let fd = Arc::new(unsafe { AsyncFd::register(fd)? });
        let watched = fd.clone();
        let failed = Box::pin(async move {
            let _ = watched.ready(Interest::ERROR).await;
        });
        Ok(Self {
            fd,
            failed: Some(failed),
        })
    }

    /// The socket's pending error (`SO_ERROR`), or a reset when it names none.
    fn error(&self) -> io::Error {
        use nix::sys::socket::{getsockopt, sockopt};
        match getsockopt(self.fd.get_ref(), sockopt::SocketError) {
            Ok(e) if e != 0 => io::Error::from_raw_os_error(e),
            _ => io::Error::from(io::ErrorKind::ConnectionReset),
        }
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(failed) = this.failed.as_mut() else {
                return Poll::Ready(Err(this.error()));
            };
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(guard) => guard?,
                Poll::Pending => {
                    // Not readable: also wake up on an error.
                    ready!(failed.as_mut().poll(cx));
                    this.failed = None;
                    let e = this.error();
                    tracing::info!(error = %e, "the vsock connection broke");
                    return Poll::Ready(Err(e));
                }
            };
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            shutdown(self.fd.get_ref().as_raw_fd(), Shutdown::Write).map_err(io::Error::from),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket that fails with nothing to read polls `EPOLLERR | EPOLLOUT`,
    /// as a vsock connection does after a transport reset. A connected UDP
    /// socket whose datagram meets a closed loopback port gets there too
    /// (ICMP port unreachable): a pending read must end with the error
    /// instead of waiting forever.
    #[tokio::test]
    async fn a_pending_read_ends_when_the_socket_fails() {
        let closed = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dead = closed.local_addr().expect("addr");
        drop(closed);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.connect(dead).expect("connect");
        let mut stream = VsockStream::from_fd(OwnedFd::from(sock)).expect("stream");
        let mut buf = [0u8; 16];
        // Nothing to read yet: the read is pending.
        let pending = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
        assert!(pending.is_err(), "nothing to read: {pending:?}");
        stream.write_all(b"ping").await.expect("send");
        let err = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the read ends")
            .expect_err("with the socket's error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // And stays failed.
        assert!(stream.read(&mut buf).await.is_err());
    }
}
