//! One guest process per channel.

use crate::serve::Channels;
use banger_agent_proto::{Body, ExecRequest, ExitStatus, Frame, MAX_CHUNK};
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Input the host sends to a running process.
pub(crate) enum ExecInput {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `req`, streaming its output on `channel` until it exits.
pub(crate) async fn run(
    channel: u32,
    req: ExecRequest,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    out: mpsc::UnboundedSender<Frame>,
    channels: Channels,
) {
    let finish = |body: Body| {
        if let Ok(mut m) = channels.lock() {
            m.remove(&channel);
        }
        let _ = out.send(Frame::new(channel, body));
    };
    let Some((prog, args)) = req.argv.split_first() else {
        return finish(Body::Error("empty command".into()));
    };
    let cwd = req.cwd.clone().unwrap_or_else(|| "/root".into());
    let cwd = if std::path::Path::new(&cwd).is_dir() || req.cwd.is_some() { cwd } else { "/".into() };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm-256color")
        .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so signals reach the whole job.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return finish(Body::Error(format!("{prog}: {e}"))),
    };
    let pgid = child.id().map(|p| p as i32);
    let stdout = child.stdout.take().map(|s| tokio::spawn(pump(s, channel, out.clone(), Body::Stdout)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(pump(s, channel, out.clone(), Body::Stderr)));
    let mut stdin = child.stdin.take();

    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            msg = input.recv() => match msg {
                Some(ExecInput::Stdin(d)) => {
                    if let Some(w) = stdin.as_mut() {
                        // A process that closed its stdin just loses the data.
                        if w.write_all(&d).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(ExecInput::StdinEof) => stdin = None,
                Some(ExecInput::Signal(sig)) => signal_group(pgid, sig),
                // Host gave up on this channel: end the job.
                None => signal_group(pgid, libc::SIGKILL),
            }
        }
    };
    drop(stdin);
    // All output must be sent before the exit status.
    for task in [stdout, stderr].into_iter().flatten() {
        let _ = task.await;
    }
    match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            finish(Body::Exited(ExitStatus { code: st.code(), signal: st.signal() }))
        }
        Err(e) => finish(Body::Error(format!("waiting for {prog}: {e}"))),
    }
}

fn signal_group(pgid: Option<i32>, sig: i32) {
    if let Some(pgid) = pgid {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    channel: u32,
    out: mpsc::UnboundedSender<Frame>,
    wrap: fn(Vec<u8>) -> Body,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send(Frame::new(channel, wrap(buf[..n].to_vec()))).is_err() {
                    break;
                }
            }
        }
    }
}
