//! One agent per guest.
//!
//! The agent forked off early init serves the host from the first second;
//! the image's init then starts its own agent (systemd unit, inittab line),
//! which must not fight it for the channel. The serving agent holds an
//! abstract Unix socket ([`NAME`]); another agent that finds the name taken
//! stands by: it connects to that socket and waits for the connection to
//! end, which happens when the holder dies, and then takes over. No file is
//! involved, so it works before any file system is writable and leaves
//! nothing behind.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener as StdListener, UnixStream as StdStream};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

/// The abstract socket name the serving agent holds.
pub const NAME: &[u8] = b"banger-agent";

/// How many standing-by connections the holder keeps (each is one agent
/// waiting; more can only be strays).
const MAX_WAITERS: usize = 8;

/// Tries to become the serving agent. `Ok(None)` when another holds `name`.
pub fn try_hold(name: &[u8]) -> io::Result<Option<StdListener>> {
    let addr = SocketAddr::from_abstract_name(name)?;
    match StdListener::bind_addr(&addr) {
        Ok(l) => {
            l.set_nonblocking(true)?;
            Ok(Some(l))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps the name held for as long as the process lives: accepts the
/// connections of agents standing by and keeps them open (they end when
/// this process does). Needs a Tokio runtime.
pub fn keep(listener: StdListener) -> io::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        let mut waiters: Vec<UnixStream> = Vec::new();
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    // Drop the ones that went away, and strays beyond the cap.
                    waiters.retain(|w| w.peer_addr().is_ok());
                    if waiters.len() >= MAX_WAITERS {
                        waiters.remove(0);
                    }
                    waiters.push(s);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent lock socket: accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}

/// Holds `name`, standing by for as long as another process holds it.
/// Says once that it stands by.
pub async fn acquire(name: &[u8]) -> io::Result<StdListener> {
    let mut said = false;
    loop {
        if let Some(l) = try_hold(name)? {
            if said {
                tracing::info!("the agent that served the host is gone; taking over");
            }
            return Ok(l);
        }
        if !said {
            tracing::info!(
                "another banger agent (started before the image's init) serves the host; standing by"
            );
            said = true;
        }
        wait_released(name).await;
    }
}

/// Returns once the holder of `name` is gone (its connection ends), or at
/// once when it cannot be reached.
async fn wait_released(name: &[u8]) {
    let conn = SocketAddr::from_abstract_name(name)
        .and_then(|a| StdStream::connect_addr(&a))
        .and_then(|s| {
            s.set_nonblocking(true)?;
            UnixStream::from_std(s)
        });
    match conn {
        Ok(mut s) => {
            let mut buf = [0u8; 64];
            // The holder never writes: this ends at its exit.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        // Bound but not accepting (a holder starting up or going away):
        // look again shortly.
        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_stands_by_until_the_holder_is_gone() {
        let name = format!("banger-agent-test2-{}", std::process::id()).into_bytes();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let first = try_hold(&name).expect("bind").expect("free");
            assert!(try_hold(&name).expect("bind").is_none(), "held twice");
            let n = name.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let holder = tokio::spawn(async move {
                let l = UnixListener::from_std(first).expect("listener");
                let (conn, _) = l.accept().await.expect("accept");
                let _ = tx.send(());
                // Keeps the waiter's connection until the holder ends.
                std::future::pending::<()>().await;
                drop((l, conn));
            });
            let waiter = tokio::spawn(async move { acquire(&n).await });
            rx.await.expect("the waiter connected");
            assert!(!waiter.is_finished());
            holder.abort();
            let held = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("took over in time")
                .expect("task")
                .expect("acquired");
            drop(held);
        });
    }
}
