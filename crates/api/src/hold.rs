//! A create whose connection the caller keeps: with
//! [`CreateVmRequest::ephemeral`] the daemon deletes the VM when that
//! connection closes, so the VM lives exactly as long as the [`Hold`] (or
//! the process holding it).

use crate::client::api_error;
use crate::{Client, ClientError, CreateVmEvent, CreateVmRequest, paths};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use tokio::task::JoinHandle;

/// The open connection of an ephemeral create. Dropping it closes the
/// connection, which makes the daemon delete the VM.
#[derive(Debug)]
pub struct Hold {
    conn: JoinHandle<()>,
    drain: JoinHandle<()>,
}

impl Hold {
    /// Whether the connection is still open (false once the daemon went away).
    pub fn is_open(&self) -> bool {
        !self.drain.is_finished()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.drain.abort();
        // Ending the connection task drops the socket at once.
        self.conn.abort();
    }
}

impl Client {
    /// Like [`Client::create_vm`], but on success also returns the open
    /// connection when `req.ephemeral` is set (`None` otherwise).
    pub async fn create_vm_held(
        &self,
        req: &CreateVmRequest,
        mut on_event: impl FnMut(&CreateVmEvent),
    ) -> Result<(banger_model::VmRecord, Option<Hold>), ClientError> {
        let stream = tokio::net::UnixStream::connect(self.socket())
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket().to_path_buf(),
                source,
            })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(ClientError::protocol)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        // Until the Hold exists, an early return must close the connection.
        let guard = AbortOnDrop(Some(conn));
        let body = serde_json::to_vec(req).map_err(ClientError::protocol)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(paths::VMS)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(ClientError::protocol)?;
        let resp = sender
            .send_request(request)
            .await
            .map_err(ClientError::protocol)?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(ClientError::protocol)?
                .to_bytes();
            return Err(api_error(status, &bytes));
        }
        let mut buf = Vec::new();
        let mut outcome = None;
        'read: while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ClientError::protocol)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let ev: CreateVmEvent =
                    serde_json::from_slice(&line).map_err(ClientError::protocol)?;
                on_event(&ev);
                match ev {
                    CreateVmEvent::Done(vm) => {
                        outcome = Some(Ok(*vm));
                        break 'read;
                    }
                    CreateVmEvent::Error(error) => {
                        outcome = Some(Err(ClientError::Api { status: 500, error }));
                        break 'read;
                    }
                    _ => {}
                }
            }
        }
        let vm = match outcome {
            Some(r) => r?,
            None => {
                return Err(ClientError::Protocol(
                    "the daemon closed the stream before the operation finished".into(),
                ));
            }
        };
        if !req.ephemeral {
            return Ok((vm, None));
        }
        // Keep reading the keep-alive lines so the daemon's writes never
        // block, and so `is_open` notices a daemon that went away.
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
        let conn = guard.take();
        Ok((vm, Some(Hold { conn, drain })))
    }
}

struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    fn take(mut self) -> JoinHandle<()> {
        match self.0.take() {
            Some(h) => h,
            None => tokio::spawn(async {}),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
