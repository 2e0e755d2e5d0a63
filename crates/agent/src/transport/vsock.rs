//! vsock to the host (Firecracker, or QEMU with a vhost-user vsock device).
//!
//! The guest connects out to the host (CID 2); the VMM forwards the
//! connection to the host's Unix socket for that port. When the connection
//! drops (daemon restart), the agent connects again.

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, Shutdown, SockFlag, SockType, VsockAddr, connect, shutdown, socket,
};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// A connected vsock stream.
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
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
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open (and is
        // not replaced) for as long as it is registered.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Self { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
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
