//! File transfer relays: tar streams into and out of a running VM over
//! WebSockets (protocol: `banger_api::files`), relayed to the guest agent's
//! archive channels. The agent's credit window paces the relay, and the
//! relay only reads from the client when the agent can take more, so a
//! fast client is held back by its socket, not buffered here.

use axum::extract::ws::{Message, WebSocket};
use banger_agent_proto::archive::MAX_SKIPPED;
use banger_agent_proto::client::{AgentClient, ClientError};
use banger_agent_proto::{ArchiveSummary, GetArchive, PutArchive};
use banger_api::ApiError;
use banger_api::files::{FilesControl, FilesReport, FilesSummary, GetFilesStart, PutFilesStart};

async fn start<T: serde::de::DeserializeOwned>(socket: &mut WebSocket) -> Option<T> {
    match socket.recv().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
            Ok(s) => Some(s),
            Err(e) => {
                fail(socket, "invalid", format!("bad transfer request: {e}")).await;
                None
            }
        },
        _ => None,
    }
}

fn check_absolute(path: &str) -> Result<(), String> {
    if std::path::Path::new(path).is_absolute() {
        Ok(())
    } else {
        Err(format!("{path:?} is not an absolute guest path"))
    }
}

pub(crate) async fn run_put(agent: AgentClient, mut socket: WebSocket) {
    let Some(req) = start::<PutFilesStart>(&mut socket).await else {
        return;
    };
    if let Err(m) = check_absolute(&req.dest) {
        return fail(&mut socket, "invalid", m).await;
    }
    let mut up = match agent.put_archive(PutArchive {
        dest: req.dest,
        replace: req.replace,
    }) {
        Ok(u) => u,
        Err(e) => return agent_failed(&mut socket, e).await,
    };
    loop {
        match socket.recv().await {
            Some(Ok(Message::Binary(b))) => {
                if let Err(e) = up.write(&b).await {
                    return agent_failed(&mut socket, e).await;
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<FilesControl>(&t) {
                Ok(FilesControl::End) => break,
                Err(e) => {
                    return fail(&mut socket, "invalid", format!("bad transfer message: {e}"))
                        .await;
                }
            },
            Some(Ok(_)) => {}
            // Client gone: dropping the upload aborts it in the guest.
            Some(Err(_)) | None => return,
        }
    }
    match up.finish().await {
        Ok(s) => done(&mut socket, s).await,
        Err(e) => agent_failed(&mut socket, e).await,
    }
}

pub(crate) async fn run_get(agent: AgentClient, mut socket: WebSocket) {
    let Some(req) = start::<GetFilesStart>(&mut socket).await else {
        return;
    };
    if let Err(m) = check_absolute(&req.path) {
        return fail(&mut socket, "invalid", m).await;
    }
    let mut down = match agent.get_archive(GetArchive {
        path: req.path,
        name: req.name,
    }) {
        Ok(d) => d,
        Err(e) => return agent_failed(&mut socket, e).await,
    };
    loop {
        tokio::select! {
            chunk = down.next() => match chunk {
                Ok(Some(data)) => {
                    if socket.send(Message::Binary(data.into())).await.is_err() {
                        return; // client gone: dropping the download aborts it
                    }
                }
                Ok(None) => {
                    let s = down.summary().cloned().unwrap_or_default();
                    return done(&mut socket, s).await;
                }
                Err(e) => return agent_failed(&mut socket, e).await,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn done(socket: &mut WebSocket, s: ArchiveSummary) {
    let summary = FilesSummary {
        files: s.files,
        bytes: s.bytes,
        skipped: bounded_skips(s.skipped),
    };
    send_report(socket, FilesReport::Done(summary)).await;
}

/// Longest skip note passed on, in characters.
const MAX_SKIP_NOTE: usize = 256;

/// The agent's skip notes as the client gets them: the agent keeps to
/// [`MAX_SKIPPED`] short lines, but one replaced by root in the guest
/// need not, so at most that many, each cut to [`MAX_SKIP_NOTE`]
/// characters, then one line counting the rest.
fn bounded_skips(skipped: Vec<String>) -> Vec<String> {
    let dropped = skipped.len().saturating_sub(MAX_SKIPPED);
    let mut out: Vec<String> = skipped
        .into_iter()
        .take(MAX_SKIPPED)
        .map(|note| match note.char_indices().nth(MAX_SKIP_NOTE) {
            Some((end, _)) => format!("{}…", &note[..end]),
            None => note,
        })
        .collect();
    if dropped > 0 {
        out.push(format!(
            "{dropped} more skip notes from the guest were dropped"
        ));
    }
    out
}

async fn agent_failed(socket: &mut WebSocket, e: ClientError) {
    let msg = match e {
        ClientError::Refused(m) => m,
        other => other.to_string(),
    };
    fail(socket, "failed", msg).await;
}

async fn fail(socket: &mut WebSocket, code: &str, message: String) {
    let error = ApiError {
        code: code.to_string(),
        message,
    };
    send_report(socket, FilesReport::Error(error)).await;
}

async fn send_report(socket: &mut WebSocket, r: FilesReport) {
    if let Ok(text) = serde_json::to_string(&r) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_s_skip_notes_are_bounded_in_number_and_length() {
        let mut notes: Vec<String> = (0..MAX_SKIPPED + 5000).map(|i| format!("n{i}")).collect();
        notes[0] = "é".repeat(100_000);
        let got = bounded_skips(notes);
        assert_eq!(got.len(), MAX_SKIPPED + 1);
        assert_eq!(got[0].chars().count(), MAX_SKIP_NOTE + 1);
        assert!(got[0].ends_with('…'), "{}", got[0]);
        assert_eq!(got[1], "n1");
        assert_eq!(got[MAX_SKIPPED - 1], format!("n{}", MAX_SKIPPED - 1));
        assert_eq!(
            got[MAX_SKIPPED],
            "5000 more skip notes from the guest were dropped"
        );
        // An agent that keeps to the rules is passed on as it is.
        let few = vec!["a symlink leaves the tree".to_string(); 3];
        assert_eq!(bounded_skips(few.clone()), few);
    }
}
