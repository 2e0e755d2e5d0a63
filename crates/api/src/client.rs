//! Typed client of the daemon API over its Unix socket.

use crate::exec::{ExecControl, ExecOutput, ExecReport, ExecStart, STDERR, STDOUT};
use crate::{
    ApiError, BuildImageEvent, BuildImageRequest, CreateVmEvent, CreateVmRequest, DaemonInfo, paths,
};
use banger_model::{ImageRecord, KernelRecord, VmRecord};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("daemon socket {socket} does not answer: {source}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{}", .error.message)]
    Api { status: u16, error: ApiError },
    #[error("talking to the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    pub(crate) fn protocol(e: impl std::fmt::Display) -> Self {
        ClientError::Protocol(e.to_string())
    }

    /// The API error code, when the daemon answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

/// A client bound to one daemon socket. Cheap to clone; connects per request.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn stream(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let io = hyper_util::rt::TokioIo::new(self.stream().await?);
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(ClientError::protocol)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut conn = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(ClientError::protocol)?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(ClientError::protocol)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::protocol)?
            .to_bytes();
        Err(api_error(status, &bytes))
    }

    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::protocol)?;
        let resp = self.send(method, path, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::protocol)?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::protocol)
    }

    /// Reads an NDJSON event stream, handing each event to `on_event`.
    async fn events<E: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_event: impl FnMut(&E),
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::protocol)?;
        let mut resp = self.send(Method::POST, path, Some(body)).await?.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = resp.frame().await {
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
                let ev: E = serde_json::from_slice(&line).map_err(ClientError::protocol)?;
                on_event(&ev);
            }
        }
        Ok(())
    }

    pub async fn info(&self) -> Result<DaemonInfo, ClientError> {
        self.json(Method::GET, paths::INFO, None::<&()>).await
    }

    /// Asks the daemon to exit (VMs keep running).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.send(Method::POST, paths::SHUTDOWN, None)
            .await
            .map(|_| ())
    }

    /// `method` on a VM route without a body, answered with the VM.
    async fn vm_call(
        &self,
        method: Method,
        template: &str,
        vm: &str,
    ) -> Result<VmRecord, ClientError> {
        self.json(method, &paths::fill(template, vm), None::<&()>)
            .await
    }

    pub async fn list_vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        self.json(Method::GET, paths::VMS, None::<&()>).await
    }

    pub async fn get_vm(&self, vm: &str) -> Result<VmRecord, ClientError> {
        self.vm_call(Method::GET, paths::VM, vm).await
    }

    /// Stops (if running) and deletes a VM with its disks.
    pub async fn delete_vm(&self, vm: &str) -> Result<VmRecord, ClientError> {
        self.vm_call(Method::DELETE, paths::VM, vm).await
    }

    /// Runs a long operation, handing each event to `on_event`; its final
    /// event is the result.
    pub(crate) async fn operation<E: crate::OperationEvent + DeserializeOwned>(
        &self,
        path: &str,
        req: &impl Serialize,
        mut on_event: impl FnMut(&E),
    ) -> Result<E::Output, ClientError> {
        let mut result = None;
        self.events(path, req, |ev: &E| {
            if let Some(outcome) = ev.outcome() {
                result = Some(outcome);
            }
            on_event(ev);
        })
        .await?;
        match result {
            Some(Ok(v)) => Ok(v),
            Some(Err(error)) => Err(ClientError::Api { status: 500, error }),
            None => Err(ClientError::Protocol(
                "the daemon closed the stream before the operation finished".into(),
            )),
        }
    }

    /// Boots a stopped VM and waits for its agent.
    pub async fn start_vm(&self, vm: &str) -> Result<VmRecord, ClientError> {
        self.vm_call(Method::POST, paths::VM_START, vm).await
    }

    /// Powers a VM off; disks are kept.
    pub async fn stop_vm(&self, vm: &str) -> Result<VmRecord, ClientError> {
        self.vm_call(Method::POST, paths::VM_STOP, vm).await
    }

    pub async fn restart_vm(&self, vm: &str) -> Result<VmRecord, ClientError> {
        self.vm_call(Method::POST, paths::VM_RESTART, vm).await
    }

    /// Listening ports of a running VM, probed for HTTP/HTTPS.
    /// How a running VM booted.
    pub async fn vm_boot(&self, vm: &str) -> Result<crate::VmBoot, ClientError> {
        self.json(Method::GET, &paths::fill(paths::VM_BOOT, vm), None::<&()>)
            .await
    }

    pub async fn vm_ports(&self, vm: &str) -> Result<Vec<crate::PortInfo>, ClientError> {
        self.json(Method::GET, &paths::fill(paths::VM_PORTS, vm), None::<&()>)
            .await
    }

    /// The daemon's networking (mode, DNS, NAT, resolver).
    pub async fn network(&self) -> Result<crate::NetworkStatus, ClientError> {
        self.json(Method::GET, paths::NETWORK, None::<&()>).await
    }

    /// Sends signal number `signal` to the VM's VMM.
    pub async fn kill_vm(&self, vm: &str, signal: i32) -> Result<VmRecord, ClientError> {
        let req = crate::KillRequest { signal };
        self.json(Method::POST, &paths::fill(paths::VM_KILL, vm), Some(&req))
            .await
    }

    /// Changes a stopped VM's resources (see [`crate::SetVmRequest`]).
    pub async fn set_vm(
        &self,
        vm: &str,
        req: &crate::SetVmRequest,
    ) -> Result<VmRecord, ClientError> {
        self.json(Method::PATCH, &paths::fill(paths::VM, vm), Some(req))
            .await
    }

    /// Host-side statistics of a VM, plus the guest's own when `guest`.
    pub async fn vm_stats(&self, vm: &str, guest: bool) -> Result<crate::VmStats, ClientError> {
        let path = format!("{}?guest={guest}", paths::fill(paths::VM_STATS, vm));
        self.json(Method::GET, &path, None::<&()>).await
    }

    /// A VM's log (from where `query` says); with `follow`, `on_chunk`
    /// keeps receiving what is appended until the VM is deleted.
    pub async fn logs(
        &self,
        vm: &str,
        query: &crate::LogsQuery,
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let path = format!("{}?{}", paths::fill(paths::VM_LOGS, vm), query.to_query());
        let mut body = self.send(Method::GET, &path, None).await?.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(ClientError::protocol)?.into_data() {
                on_chunk(&data);
            }
        }
        Ok(())
    }

    /// Creates (and by default boots) a VM, reporting progress to `on_event`.
    pub async fn create_vm(
        &self,
        req: &CreateVmRequest,
        on_event: impl FnMut(&CreateVmEvent),
    ) -> Result<VmRecord, ClientError> {
        self.operation(paths::VMS, req, on_event).await
    }

    /// Waits until running VM `vm` is there as `until` says (at most the
    /// daemon's `ready_timeout_secs`), reporting progress to `on_event`.
    pub async fn wait_vm(
        &self,
        vm: &str,
        until: crate::WaitFor,
        on_event: impl FnMut(&crate::WaitEvent),
    ) -> Result<VmRecord, ClientError> {
        let req = crate::WaitRequest { until };
        self.operation(&paths::fill(paths::VM_WAIT, vm), &req, on_event)
            .await
    }

    /// Builds a Debian image in the daemon, reporting progress to `on_event`.
    pub async fn build_image(
        &self,
        req: &BuildImageRequest,
        on_event: impl FnMut(&BuildImageEvent),
    ) -> Result<ImageRecord, ClientError> {
        self.operation(paths::IMAGE_BUILD, req, on_event).await
    }

    pub async fn list_images(&self) -> Result<Vec<ImageRecord>, ClientError> {
        self.json(Method::GET, paths::IMAGES, None::<&()>).await
    }

    pub async fn get_image(&self, name: &str) -> Result<ImageRecord, ClientError> {
        self.json(Method::GET, &paths::fill(paths::IMAGE, name), None::<&()>)
            .await
    }

    pub async fn list_kernels(&self) -> Result<Vec<KernelRecord>, ClientError> {
        self.json(Method::GET, paths::KERNELS, None::<&()>).await
    }

    /// The daemon's OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, paths::OPENAPI, None::<&()>).await
    }

    /// Starts a process in a running VM.
    pub async fn exec(
        &self,
        vm: &str,
        start: &ExecStart,
    ) -> Result<(ExecWriter, ExecReader), ClientError> {
        let stream = self.stream().await?;
        let url = format!("ws://localhost{}", paths::fill(paths::VM_EXEC, vm));
        let (mut ws, _) = match tokio_tungstenite::client_async(url, stream).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                return Err(api_error(resp.status(), &body));
            }
            Err(e) => return Err(ClientError::protocol(e)),
        };
        let start = serde_json::to_string(start).map_err(ClientError::protocol)?;
        ws.send(Message::text(start))
            .await
            .map_err(ClientError::protocol)?;
        let (sink, stream) = ws.split();
        Ok((
            ExecWriter { sink },
            ExecReader {
                stream,
                done: false,
            },
        ))
    }
}

/// A WebSocket to `path` on the daemon; a refused upgrade is the daemon's
/// error.
pub(crate) async fn websocket(
    client: &Client,
    path: &str,
) -> Result<WebSocketStream<UnixStream>, ClientError> {
    let stream = client.stream().await?;
    let url = format!("ws://localhost{path}");
    match tokio_tungstenite::client_async(url, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err(api_error(resp.status(), &body))
        }
        Err(e) => Err(ClientError::protocol(e)),
    }
}

/// An error the daemon reported inside a stream.
pub(crate) fn api_error_of(error: ApiError) -> ClientError {
    ClientError::Api { status: 500, error }
}

/// The error of a non-2xx answer: the daemon's `ApiError` body, or (from
/// anything else on the socket) the status and the body as text.
pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| ApiError {
        code: status_code_name(status),
        message: String::from_utf8_lossy(body).trim().to_string(),
    });
    ClientError::Api {
        status: status.as_u16(),
        error,
    }
}

fn status_code_name(s: StatusCode) -> String {
    s.canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_")
}

/// Sending half of an exec.
pub struct ExecWriter {
    sink: SplitSink<WebSocketStream<UnixStream>, Message>,
}

impl ExecWriter {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.sink
            .send(Message::binary(data.to_vec()))
            .await
            .map_err(ClientError::protocol)
    }

    pub async fn control(&mut self, c: ExecControl) -> Result<(), ClientError> {
        let text = serde_json::to_string(&c).map_err(ClientError::protocol)?;
        self.sink
            .send(Message::text(text))
            .await
            .map_err(ClientError::protocol)
    }
}

/// Receiving half of an exec.
pub struct ExecReader {
    stream: SplitStream<WebSocketStream<UnixStream>>,
    done: bool,
}

impl ExecReader {
    /// The next chunk or the final report; `None` after the final report.
    pub async fn next(&mut self) -> Result<Option<ExecOutput>, ClientError> {
        if self.done {
            return Ok(None);
        }
        while let Some(msg) = self.stream.next().await {
            match msg.map_err(ClientError::protocol)? {
                Message::Binary(b) => match b.first() {
                    Some(&STDOUT) => return Ok(Some(ExecOutput::Stdout(b[1..].to_vec()))),
                    Some(&STDERR) => return Ok(Some(ExecOutput::Stderr(b[1..].to_vec()))),
                    _ => return Err(ClientError::Protocol("unknown exec output tag".into())),
                },
                Message::Text(t) => {
                    self.done = true;
                    return Ok(Some(
                        match serde_json::from_str(&t).map_err(ClientError::protocol)? {
                            ExecReport::Exit(e) => ExecOutput::Exit(e),
                            ExecReport::Error(e) => ExecOutput::Error(e),
                        },
                    ));
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        Err(ClientError::Protocol(
            "the daemon closed the exec before the process ended".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_encodes_refs() {
        assert_eq!(paths::fill(paths::VM, "calm-otter"), "/v1/vms/calm-otter");
        assert_eq!(
            paths::fill(paths::VM_EXEC, "a b/c"),
            "/v1/vms/a%20b%2Fc/exec"
        );
    }
}
