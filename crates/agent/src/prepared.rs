//! Whether the guest is ready for the host's work.
//!
//! Early init's PID 1 forks the agent off as soon as the root is assembled
//! and the agent's channel is up, so the agent greets the host at once.
//! PID 1 then finishes what commands expect (the network card's driver, the
//! network and resolver, `/tmp` settled) and execs the image's init, which
//! closes its end of a close-on-exec pipe; the agent holds the host's
//! requests until then (0.2-0.3 s after the fork under emulation, part of
//! which the host spends on its side of the boot), so a command never runs
//! before the network or sees PID 1 before the handover.

use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::sync::watch;

/// How long requests wait for PID 1 before they run anyway (it only loads
/// modules, sets addresses and writes two files; it never takes this long
/// unless the network card never shows up, which it reports on the console).
pub const PREPARE_WAIT: Duration = Duration::from_secs(30);

/// The guest's readiness for the host's requests (cheap to clone).
#[derive(Debug, Clone)]
pub struct Prepared(watch::Receiver<bool>);

impl Default for Prepared {
    /// Ready now: an agent started by the image's init, or in tests.
    fn default() -> Self {
        Self(watch::channel(true).1)
    }
}

impl Prepared {
    /// Ready once the other end of the pipe `rd` is closed (or written to),
    /// or after `limit`. Must be called inside a Tokio runtime.
    pub fn from_pipe(rd: OwnedFd, limit: Duration) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::task::spawn_blocking(move || {
            if !wait_readable(&rd, limit) {
                tracing::warn!(
                    limit_s = limit.as_secs(),
                    "early init did not finish preparing the guest in time; serving anyway"
                );
            }
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Returns once the guest is ready.
    pub async fn wait(&mut self) {
        // An error means the sender is gone without saying ready, which
        // only happens when its task died: serve rather than hang.
        let _ = self.0.wait_for(|ready| *ready).await;
    }

    /// Whether the guest is ready now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }
}

/// Whether `fd` became readable (data or end of file) within `limit`.
fn wait_readable(fd: &OwnedFd, limit: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_when_the_writer_closes_not_before() {
        let (rd, wr) = nix::unistd::pipe().expect("pipe");
        let mut p = Prepared::from_pipe(rd, PREPARE_WAIT);
        let early = tokio::time::timeout(Duration::from_millis(200), p.wait()).await;
        assert!(early.is_err(), "ready before the writer closed");
        assert!(!p.is_ready());
        drop(wr);
        tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .expect("ready once the writer closed");
        assert!(p.is_ready());
    }

    #[tokio::test]
    async fn gives_up_waiting_after_the_limit() {
        let (rd, _wr) = nix::unistd::pipe().expect("pipe");
        let mut p = Prepared::from_pipe(rd, Duration::from_millis(50));
        tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .expect("ready after the limit");
    }

    #[tokio::test]
    async fn default_is_ready() {
        let mut p = Prepared::default();
        assert!(p.is_ready());
        p.wait().await;
    }
}
