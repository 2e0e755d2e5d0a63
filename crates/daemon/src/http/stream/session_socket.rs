//! The per-session Unix socket that `vm session attach` (or any local tool)
//! connects to: a bridge from its bytes to a session's stdin, and from the
//! session's output back.

use crate::DaemonError;
use banger_agent_proto::client::{AgentClient, ExecEvent, ExecSession};
use std::path::{Path as FsPath, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Longest path a Unix socket address holds (sun_path minus its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `<vm dir>/sessions/<name>.sock`, if it fits in a socket address.
pub(crate) fn socket_path(vm_dir: &FsPath, name: &str) -> Result<PathBuf, DaemonError> {
    let path = vm_dir.join("sessions").join(format!("{name}.sock"));
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(DaemonError::Invalid(format!(
            "attach socket {} is longer than a Unix socket address allows ({MAX_SOCKET_PATH} bytes): use a shorter session name",
            path.display()
        )));
    }
    Ok(path)
}

/// Makes sure a bridge listens on `socket`: a live one is reused, a stale
/// file (from a stopped daemon) is replaced.
pub(crate) async fn ensure_bridge(
    socket: &FsPath,
    agent: AgentClient,
    name: String,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), DaemonError> {
    if UnixStream::connect(socket).await.is_ok() {
        // A live bridge just got an empty connection, which it treats as
        // an attach that detached at once.
        return Ok(());
    }
    let failed = |what: &str, e: std::io::Error| {
        DaemonError::Failed(anyhow::anyhow!("{what} {}: {e}", socket.display()))
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed("creating the directory of", e))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("removing stale", e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| failed("listening on", e))?;
    let path = socket.to_path_buf();
    tokio::spawn(async move {
        serve_bridge(listener, &agent, &name, shutdown).await;
        let _ = std::fs::remove_file(&path);
        tracing::debug!(session = %name, "attach bridge closed");
    });
    Ok(())
}

/// Accepts attach connections until the session ends, the VM's agent goes
/// away or the daemon stops.
async fn serve_bridge(
    listener: UnixListener,
    agent: &AgentClient,
    name: &str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => match c {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!(session = name, error = %e, "attach socket accept failed");
                    return;
                }
            },
            () = agent.closed() => return,
            () = shutdown.cancelled() => return,
        };
        let Ok(session) = agent.session_attach(name) else {
            return;
        };
        let agent = agent.clone();
        let name = name.to_string();
        let ended = tokio::spawn(async move {
            let ended = bridge(conn, session).await;
            // Check the agent's view too: a session gone while nobody was
            // attached also ends the bridge.
            ended
                || !agent
                    .session_list()
                    .await
                    .is_ok_and(|all| all.iter().any(|s| s.name == name && s.status.is_none()))
        });
        // One client at a time keeps input ordering simple; later
        // connections wait in the listen queue.
        match ended.await {
            Ok(false) => continue,
            _ => return,
        }
    }
}

/// Copies `conn`'s bytes to the session's stdin and its output back, until
/// the client closes (detach) or the session ends. True if it ended.
async fn bridge(conn: UnixStream, mut session: ExecSession) -> bool {
    let (mut rd, mut wr) = conn.into_split();
    let mut buf = vec![0u8; 32 * 1024];
    let mut reading = true;
    loop {
        tokio::select! {
            n = rd.read(&mut buf), if reading => match n {
                Ok(0) | Err(_) => {
                    reading = false;
                    let _ = session.detach();
                }
                Ok(n) => {
                    if session.write_stdin(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
            },
            ev = session.next_event() => match ev {
                Ok(Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d))) => {
                    if wr.write_all(&d).await.is_err() {
                        let _ = session.detach();
                        reading = false;
                    }
                }
                Ok(Some(ExecEvent::Session(info))) => return info.status.is_some(),
                Ok(Some(ExecEvent::Error(_) | ExecEvent::Exited(_))) | Ok(None) => return true,
                Err(_) => return true,
            },
        }
    }
}
