//! File transfer over WebSockets: tar streams into and out of a running
//! VM, through its guest agent.
//!
//! Put (`GET /v1/vms/{vm}/files/put`, upgraded): the client sends a text
//! [`PutFilesStart`], then the tar stream as binary messages, then the text
//! [`FilesControl::End`]; the daemon answers with one text
//! [`FilesReport`]. Entries are unpacked in the guest as they arrive; a
//! refused entry (absolute path, `..`, a symlink leaving the destination,
//! a device node) fails the transfer.
//!
//! Get (`GET /v1/vms/{vm}/files/get`, upgraded): the client sends a text
//! [`GetFilesStart`]; the daemon streams the tar as binary messages and
//! ends with a text [`FilesReport`]. Closing the socket cancels either.

use crate::client::{api_error_of, websocket};
use crate::{ApiError, Client, ClientError, paths};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Route paths of this module.
pub mod routes {
    pub const VM_FILES_PUT: &str = "/v1/vms/{vm}/files/put";
    pub const VM_FILES_GET: &str = "/v1/vms/{vm}/files/get";
}

/// First message of a put.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutFilesStart {
    /// Absolute guest directory the tar is unpacked into (created when missing).
    pub dest: String,
    /// Replace `dest` as a whole once the stream is complete and valid,
    /// instead of merging into it.
    #[serde(default)]
    pub replace: bool,
}

/// First message of a get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetFilesStart {
    /// Absolute guest path of a file or directory.
    pub path: String,
    /// Name of its top entry in the tar.
    pub name: String,
}

/// Client → daemon text messages after a put's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FilesControl {
    /// The tar stream is complete.
    End,
}

/// What a transfer moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FilesSummary {
    pub files: u64,
    pub bytes: u64,
    /// What the guest side left out (gets only), one line each.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// The daemon's last message on a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FilesReport {
    Done(FilesSummary),
    Error(ApiError),
}

impl Client {
    /// Starts unpacking a tar stream into `start.dest` in a running VM.
    pub async fn put_files(
        &self,
        vm: &str,
        start: &PutFilesStart,
    ) -> Result<FilesUpload, ClientError> {
        let ws = open(self, routes::VM_FILES_PUT, vm, start).await?;
        Ok(FilesUpload { ws })
    }

    /// Starts streaming a tar of `start.path` out of a running VM.
    pub async fn get_files(
        &self,
        vm: &str,
        start: &GetFilesStart,
    ) -> Result<FilesDownload, ClientError> {
        let ws = open(self, routes::VM_FILES_GET, vm, start).await?;
        Ok(FilesDownload { ws, summary: None })
    }
}

async fn open(
    client: &Client,
    template: &str,
    vm: &str,
    start: &impl Serialize,
) -> Result<WebSocketStream<UnixStream>, ClientError> {
    let mut ws = websocket(client, &paths::fill(template, vm)).await?;
    let start = serde_json::to_string(start).map_err(protocol)?;
    ws.send(Message::text(start)).await.map_err(protocol)?;
    Ok(ws)
}

fn protocol(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// Reads until the daemon's report.
async fn report(ws: &mut WebSocketStream<UnixStream>) -> Result<FilesSummary, ClientError> {
    while let Some(msg) = ws.next().await {
        match msg.map_err(protocol)? {
            Message::Text(t) => {
                return match serde_json::from_str(&t).map_err(protocol)? {
                    FilesReport::Done(s) => Ok(s),
                    FilesReport::Error(e) => Err(api_error_of(e)),
                };
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Err(ClientError::Protocol(
        "the daemon closed the transfer without a result".into(),
    ))
}

/// A tar stream on its way into a VM.
pub struct FilesUpload {
    ws: WebSocketStream<UnixStream>,
}

impl FilesUpload {
    /// Sends the next bytes of the tar stream (waits while the guest is
    /// behind). When the guest has refused the stream, returns its error.
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        if let Err(e) = self.ws.send(Message::binary(data)).await {
            // The daemon ends the socket after reporting why.
            return Err(report(&mut self.ws).await.err().unwrap_or(protocol(e)));
        }
        Ok(())
    }

    /// Ends the stream and waits for the summary.
    pub async fn finish(mut self) -> Result<FilesSummary, ClientError> {
        let end = serde_json::to_string(&FilesControl::End).map_err(protocol)?;
        if let Err(e) = self.ws.send(Message::text(end)).await {
            return Err(report(&mut self.ws).await.err().unwrap_or(protocol(e)));
        }
        report(&mut self.ws).await
    }
}

/// A tar stream coming out of a VM.
pub struct FilesDownload {
    ws: WebSocketStream<UnixStream>,
    summary: Option<FilesSummary>,
}

impl FilesDownload {
    /// The next piece of the tar; `None` once complete (then
    /// [`summary`](Self::summary) is set).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        while let Some(msg) = self.ws.next().await {
            match msg.map_err(protocol)? {
                Message::Binary(b) => return Ok(Some(b.to_vec())),
                Message::Text(t) => {
                    return match serde_json::from_str(&t).map_err(protocol)? {
                        FilesReport::Done(s) => {
                            self.summary = Some(s);
                            Ok(None)
                        }
                        FilesReport::Error(e) => Err(api_error_of(e)),
                    };
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        Err(ClientError::Protocol(
            "the daemon closed the transfer before it was complete".into(),
        ))
    }

    pub fn summary(&self) -> Option<&FilesSummary> {
        self.summary.as_ref()
    }
}
