//! Development tool: the host side of the agent protocol, by hand.
//!
//! ```text
//! agent-host exec SOCKET [--ping] -- CMD [ARG...]
//!     connect to an agent's Unix socket (QEMU's chardev), wait for Hello
//!     (printing how long it took), run CMD with this tool's stdin, and exit
//!     with CMD's status. --ping asks a running agent to greet again first.
//! agent-host shutdown SOCKET [--reboot]
//!     power the guest off (or reboot it) and wait for the connection to close.
//! agent-host install-files ROOT
//!     write the agent's systemd unit, its enabling symlink and its
//!     modules-load.d file under ROOT (a mounted guest root file system).
//! ```

use banger_agent_proto::ExecRequest;
use banger_agent_proto::client::{AgentClient, ExecEvent};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

const USAGE: &str = "usage: agent-host exec SOCKET [--ping] -- CMD [ARG...]
       agent-host shutdown SOCKET [--reboot]
       agent-host install-files ROOT";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["exec", socket, rest @ ..] => {
            let (ping, rest) = match rest {
                ["--ping", rest @ ..] => (true, rest),
                rest => (false, rest),
            };
            match rest {
                ["--", argv @ ..] if !argv.is_empty() => exec(socket, ping, argv).await,
                _ => Err(USAGE.to_string()),
            }
        }
        ["shutdown", socket] => shutdown(socket, false).await,
        ["shutdown", socket, "--reboot"] => shutdown(socket, true).await,
        ["install-files", root] => install_files(Path::new(root)).map(|()| ExitCode::SUCCESS),
        _ => Err(USAGE.to_string()),
    };
    result.unwrap_or_else(|e| {
        eprintln!("agent-host: {e}");
        ExitCode::from(2)
    })
}

/// Connects (retrying while the socket does not exist yet) and waits for
/// the agent's greeting.
async fn connect(socket: &str, ping: bool) -> Result<AgentClient, String> {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                verbose(&format!("waiting for {socket}: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("cannot connect to {socket}: {e}")),
        }
    };
    let client = AgentClient::spawn(stream);
    if ping {
        client.ping().map_err(|e| e.to_string())?;
    }
    let hello = client.wait_hello().await.map_err(|e| e.to_string())?;
    eprintln!(
        "agent-host: hello after {:.3} s (agent {}, protocol v{}, guest uptime {:.3} s)",
        start.elapsed().as_secs_f64(),
        hello.agent_version,
        hello.proto_version,
        hello.uptime_ms as f64 / 1000.0
    );
    Ok(client)
}

fn verbose(msg: &str) {
    if std::env::var_os("AGENT_HOST_VERBOSE").is_some() {
        eprintln!("agent-host: {msg}");
    }
}

async fn exec(socket: &str, ping: bool, argv: &[&str]) -> Result<ExitCode, String> {
    let client = connect(socket, ping).await?;
    let start = Instant::now();
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdin: true,
        ..Default::default()
    };
    let mut session = client.exec(req).map_err(|e| e.to_string())?;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    session.close_stdin().map_err(|e| e.to_string())?;
                }
                Ok(n) => session.write_stdin(&buf[..n]).await.map_err(|e| e.to_string())?,
            },
            ev = session.next_event() => match ev.map_err(|e| e.to_string())? {
                Some(ExecEvent::Stdout(d)) => write_out(&mut std::io::stdout(), &d)?,
                Some(ExecEvent::Stderr(d)) => write_out(&mut std::io::stderr(), &d)?,
                Some(ExecEvent::Exited(st)) => {
                    eprintln!("agent-host: {st:?} after {:.3} s", start.elapsed().as_secs_f64());
                    return Ok(ExitCode::from(st.shell_code().clamp(0, 255) as u8));
                }
                Some(ExecEvent::Error(e)) => return Err(format!("agent: {e}")),
                Some(ExecEvent::Session(_)) | None => return Err("session ended without a status".into()),
            },
        }
    }
}

fn write_out(w: &mut impl Write, data: &[u8]) -> Result<(), String> {
    w.write_all(data)
        .and_then(|()| w.flush())
        .map_err(|e| e.to_string())
}

async fn shutdown(socket: &str, reboot: bool) -> Result<ExitCode, String> {
    let client = connect(socket, true).await?;
    let start = Instant::now();
    client.shutdown(reboot).map_err(|e| e.to_string())?;
    // The guest going down closes the VMM's socket.
    while !client.is_closed() {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the guest is still up two minutes after the shutdown request".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "agent-host: connection closed {:.3} s after the request",
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn install_files(root: &Path) -> Result<(), String> {
    let under = |abs: &str| root.join(abs.trim_start_matches('/'));
    let write = |abs: &str, text: &str| {
        let path = under(abs);
        std::fs::create_dir_all(path.parent().unwrap_or(root))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    write(banger_agent::UNIT_PATH, banger_agent::SYSTEMD_UNIT)?;
    write(banger_agent::MODULES_LOAD_PATH, banger_agent::MODULES_LOAD)?;
    let link = under(banger_agent::UNIT_WANTS_LINK);
    std::fs::create_dir_all(link.parent().unwrap_or(root))
        .map_err(|e| format!("{}: {e}", link.display()))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(banger_agent::UNIT_WANTS_LINK_TARGET, &link)
        .map_err(|e| format!("{}: {e}", link.display()))
}
