//! The exec relay: one process in a running VM over a WebSocket (protocol:
//! `banger_api::exec`), relayed to the guest agent's exec channel.

use axum::extract::ws::{Message, WebSocket};
use banger_agent_proto::client::ExecEvent;
use banger_agent_proto::{ExecRequest, TtySize};
use banger_api::ApiError;
use banger_api::exec::{ExecControl, ExecExit, ExecReport, ExecStart, STDERR, STDOUT};

pub(crate) async fn run_exec(
    agent: banger_agent_proto::client::AgentClient,
    mut socket: WebSocket,
) {
    let start: ExecStart = match socket.recv().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
            Ok(s) => s,
            Err(e) => {
                return report(
                    &mut socket,
                    error("invalid", format!("bad exec request: {e}")),
                )
                .await;
            }
        },
        _ => return,
    };
    if start.argv.is_empty() {
        return report(&mut socket, error("invalid", "exec needs a command".into())).await;
    }
    let req = ExecRequest {
        argv: start.argv,
        env: start.env.into_iter().map(|e| (e.name, e.value)).collect(),
        cwd: start.cwd,
        stdin: start.stdin,
        tty: start.tty.map(|t| TtySize {
            rows: t.rows,
            cols: t.cols,
        }),
    };
    let mut session = match agent.exec(req) {
        Ok(s) => s,
        Err(e) => return report(&mut socket, error("failed", e.to_string())).await,
    };
    loop {
        tokio::select! {
            ev = session.next_event() => {
                let msg = match ev {
                    Ok(Some(ExecEvent::Stdout(d))) => tagged(STDOUT, d),
                    Ok(Some(ExecEvent::Stderr(d))) => tagged(STDERR, d),
                    Ok(Some(ExecEvent::Exited(s))) => {
                        let exit = ExecExit { code: s.code, signal: s.signal };
                        return report(&mut socket, ExecReport::Exit(exit)).await;
                    }
                    Ok(Some(ExecEvent::Error(m))) => return report(&mut socket, error("failed", m)).await,
                    Ok(Some(ExecEvent::Session(_))) | Ok(None) => return,
                    Err(e) => return report(&mut socket, error("failed", e.to_string())).await,
                };
                if socket.send(msg).await.is_err() {
                    return; // client gone: dropping the session kills the process
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => { let _ = session.write_stdin(&b).await; }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecControl>(&t) {
                    Ok(ExecControl::StdinEof) => { let _ = session.close_stdin(); }
                    Ok(ExecControl::Signal(s)) => { let _ = session.signal(s); }
                    Ok(ExecControl::Resize(t)) => { let _ = session.resize(TtySize { rows: t.rows, cols: t.cols }); }
                    Err(e) => tracing::debug!(error = %e, "ignoring bad exec control message"),
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
}

fn tagged(tag: u8, mut data: Vec<u8>) -> Message {
    data.insert(0, tag);
    Message::Binary(data.into())
}

fn error(code: &str, message: String) -> ExecReport {
    ExecReport::Error(ApiError {
        code: code.to_string(),
        message,
    })
}

async fn report(socket: &mut WebSocket, r: ExecReport) {
    if let Ok(text) = serde_json::to_string(&r) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}
