//! `banger vm session ...` and `banger vm acp`.

use super::exec::{self, ExecMode, RawMode};
use crate::{connect, output};
use anyhow::Context;
use banger_api::Client;
use banger_api::exec::ExecStart;
use banger_api::sessions::{LogStream, SessionInfo, StartSession, StdinMode};
use clap::{Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

/// The key that detaches from a tty session: Ctrl-].
const DETACH_KEY: u8 = 0x1d;

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Start a session: a guest process that keeps running without a client.
    Start {
        vm: String,
        /// Session name (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// Working directory in the guest (default: /root).
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment, KEY=VALUE; repeatable.
        #[arg(long = "env", short = 'e', value_parser = super::flags::parse_env)]
        env: Vec<banger_api::exec::EnvVar>,
        /// What the process reads: a pipe fed by `attach`, a terminal, or nothing.
        #[arg(long, value_enum, default_value_t = Mode::Pipe)]
        stdin_mode: Mode,
        /// The command, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List a VM's sessions (running and ended).
    List {
        vm: String,
        #[command(flatten)]
        list: crate::output::ListArgs,
    },
    /// Bridge this terminal to a session: its output here, input there.
    /// Ctrl-] (tty sessions) or Ctrl-C (others) detaches; the session keeps running.
    Attach { vm: String, name: String },
    /// Print a session's logs (the last 1 MiB of each stream).
    Logs {
        vm: String,
        name: String,
        /// Only this stream (default: stdout's log, then stderr's).
        #[arg(long, value_enum)]
        stream: Option<Stream>,
        /// Keep printing its output until it ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// End a session (SIGTERM, SIGKILL after 10s) and forget it.
    Stop { vm: String, name: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Pipe,
    Tty,
    Null,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub async fn run(cmd: SessionCommand) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    match cmd {
        SessionCommand::Start {
            vm,
            name,
            cwd,
            env,
            stdin_mode,
            command,
        } => {
            let req = StartSession {
                name,
                argv: command,
                env,
                cwd,
                stdin: match stdin_mode {
                    Mode::Pipe => StdinMode::Pipe,
                    Mode::Tty => StdinMode::Tty,
                    Mode::Null => StdinMode::Null,
                },
            };
            let s = client.start_session(&vm, &req).await?;
            println!(
                "started session {} (pid {})",
                output::printable(&s.name),
                s.pid.map_or("-".into(), |p| p.to_string())
            );
            Ok(0)
        }
        SessionCommand::List { vm, list } => {
            let all = client.list_sessions(&vm).await?;
            list.print(&all, |s| s.name.clone(), print_table)?;
            Ok(0)
        }
        SessionCommand::Attach { vm, name } => attach(&client, &vm, &name).await,
        SessionCommand::Logs {
            vm,
            name,
            stream,
            follow,
        } => {
            let stream = stream.map(|s| match s {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
            });
            let mut out = std::io::stdout();
            client
                .session_logs(&vm, &name, stream, follow, |chunk| {
                    let _ = out.write_all(chunk);
                    let _ = out.flush();
                })
                .await?;
            Ok(0)
        }
        SessionCommand::Stop { vm, name } => {
            let s = client.stop_session(&vm, &name).await?;
            println!(
                "stopped session {} ({})",
                output::printable(&s.name),
                state(&s)
            );
            Ok(0)
        }
    }
}

/// Bytes a session wrote to both streams; the counts come from the guest,
/// so their sum saturates instead of overflowing.
fn output_bytes(s: &SessionInfo) -> u64 {
    s.stdout_bytes.saturating_add(s.stderr_bytes)
}

fn state(s: &SessionInfo) -> String {
    match s.exit {
        None => "running".into(),
        Some(e) => match (e.code, e.signal) {
            (Some(c), _) => format!("exited {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".into(),
        },
    }
}

fn print_table(all: &[SessionInfo]) {
    let mut rows = vec![
        ["NAME", "STATE", "PID", "STDIN", "OUTPUT", "COMMAND"]
            .map(String::from)
            .to_vec(),
    ];
    for s in all {
        rows.push(vec![
            s.name.clone(),
            state(s),
            s.pid.map_or("-".into(), |p| p.to_string()),
            format!("{:?}", s.stdin).to_ascii_lowercase(),
            banger_model::ByteSize(output_bytes(s)).human(),
            s.argv.join(" "),
        ]);
    }
    output::table(&rows);
}

/// Connects to the session's attach socket and bridges stdio to it.
async fn attach(client: &Client, vm: &str, name: &str) -> anyhow::Result<i32> {
    let size = exec::term_size(std::io::stdin().as_fd());
    let info = client.attach_session(vm, name, size).await?;
    let tty = info.session.stdin == StdinMode::Tty && std::io::stdin().is_terminal();
    let conn = tokio::net::UnixStream::connect(&info.socket)
        .await
        .with_context(|| format!("connecting to the attach socket {}", info.socket))?;
    if output::chatty() {
        let key = if tty { "Ctrl-]" } else { "Ctrl-C" };
        eprintln!("banger: attached to session {name}; {key} detaches\r");
    }
    let raw = if tty { RawMode::enter()? } else { None };
    let (mut rd, mut wr) = conn.into_split();
    let mut stdin = exec::stdin_chunks();
    let mut stdout = tokio::io::stdout();
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut winch = signal(SignalKind::window_change()).context("handling SIGWINCH")?;
    let mut out_buf = vec![0u8; 32 * 1024];
    let mut stdin_open = true;
    let detached = loop {
        tokio::select! {
            n = rd.read(&mut out_buf) => match n {
                Ok(0) | Err(_) => break false,
                Ok(n) => {
                    stdout.write_all(&out_buf[..n]).await?;
                    stdout.flush().await?;
                }
            },
            chunk = stdin.recv(), if stdin_open => match chunk {
                // Input ended; keep showing output until detach or the end.
                Some(None) | None => stdin_open = false,
                Some(Some(data)) => {
                    let n = data.len();
                    let cut = if tty { data.iter().position(|b| *b == DETACH_KEY) } else { None };
                    wr.write_all(&data[..cut.unwrap_or(n)]).await?;
                    if cut.is_some() {
                        break true;
                    }
                }
            },
            _ = sigint.recv() => break true,
            _ = winch.recv(), if tty => {
                let size = exec::term_size(std::io::stdin().as_fd());
                let _ = client.attach_session(vm, name, size).await;
            }
        }
    };
    drop(raw);
    if detached {
        eprintln!("banger: detached from session {name}; it keeps running");
        return Ok(0);
    }
    // The daemon closed the bridge: the session has ended (or the VM went).
    let all = client.list_sessions(vm).await.unwrap_or_default();
    match all.iter().find(|s| s.name == name) {
        Some(s) if s.exit.is_some() => {
            eprintln!("banger: session {name} {}", state(s));
            Ok(s.exit.map_or(0, |e| e.shell_code()))
        }
        _ => {
            eprintln!("banger: the attach connection to session {name} closed");
            Ok(1)
        }
    }
}

/// `vm acp`: the configured ACP command in the guest, stdio bridged
/// (never a tty: ACP speaks JSON-RPC over pipes).
pub async fn acp(vm: &str) -> anyhow::Result<i32> {
    let config = banger_config::Config::load(&connect::daemon_paths()?)?;
    let start = ExecStart {
        argv: config.acp_command.clone(),
        ..Default::default()
    };
    let mode = ExecMode {
        tty: false,
        stdin: true,
    };
    exec::exec(&connect::client().await?, vm, start, mode).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_output_counts_saturate() {
        let s = SessionInfo {
            name: "s".into(),
            argv: vec!["sh".into()],
            stdin: Default::default(),
            pid: None,
            started_at: 0,
            exit: None,
            stdout_bytes: u64::MAX,
            stderr_bytes: 2,
        };
        assert_eq!(output_bytes(&s), u64::MAX);
    }
}
