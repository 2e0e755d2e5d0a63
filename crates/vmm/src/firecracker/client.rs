//! A typed HTTP/1.1 client of one Firecracker process's API socket.

use super::api::{
    ActionType, BootSource, Drive, EntropyDevice, FirecrackerVersion, InstanceActionInfo,
    InstanceInfo, Logger, MachineConfiguration, Metrics, NetworkInterface, PartialDrive,
    SnapshotCreateParams, SnapshotLoadParams, Vm, VmState, Vsock,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// Bound on one API exchange, so a hung Firecracker cannot hang the daemon.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to Firecracker's API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Firecracker API socket {socket} does not answer: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Firecracker answered with an error status; `fault_message` is its own
    /// explanation.
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Rejected {
        method: Method,
        path: String,
        status: u16,
        fault_message: String,
    },
    #[error("Firecracker API {method} {path}: {detail}")]
    Protocol {
        method: Method,
        path: String,
        detail: String,
    },
    #[error("Firecracker API {method} {path}: no answer within {}s", .timeout.as_secs())]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
    },
}

impl ApiError {
    /// True when nothing listens on the socket yet (Firecracker starting) or
    /// any more (Firecracker gone).
    pub fn is_not_listening(&self) -> bool {
        matches!(self, ApiError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// A client bound to one API socket; connects per request.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Bound on each request, connection included.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; the answer's body when it is a success.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let protocol = |detail: String| ApiError::Protocol {
            method: method.clone(),
            path: path.to_owned(),
            detail,
        };
        let exchange = async {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ApiError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| protocol(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", "localhost")
                .header("accept", "application/json");
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| protocol(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| protocol(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| protocol(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(rejected(method.clone(), path, status, &bytes))
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                method: method.clone(),
                path: path.to_owned(),
                timeout: self.timeout,
            })?
    }

    /// `PUT path` with a JSON body; Firecracker answers 204 on success.
    pub async fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|e| ApiError::Protocol {
            method: Method::PUT,
            path: path.to_owned(),
            detail: format!("encoding the body: {e}"),
        })?;
        self.request(Method::PUT, path, Some(json)).await.map(drop)
    }

    /// `PATCH path` with a JSON body; Firecracker answers 204 on success.
    pub async fn patch<T: Serialize>(&self, path: &str, body: &T) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|e| ApiError::Protocol {
            method: Method::PATCH,
            path: path.to_owned(),
            detail: format!("encoding the body: {e}"),
        })?;
        self.request(Method::PATCH, path, Some(json))
            .await
            .map(drop)
    }

    /// `GET path`, decoding the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol {
            method: Method::GET,
            path: path.to_owned(),
            detail: format!(
                "unexpected answer ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ),
        })
    }

    /// `GET /`: the instance's id, state and version.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }

    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ApiError> {
        self.put("/logger", logger).await
    }

    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), ApiError> {
        self.put("/metrics", metrics).await
    }

    pub async fn put_machine_config(&self, config: &MachineConfiguration) -> Result<(), ApiError> {
        self.put("/machine-config", config).await
    }

    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}`. The id must be a plain path segment.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", path_segment(&drive.drive_id)?);
        self.put(&path, drive).await
    }

    /// `PUT /network-interfaces/{iface_id}`. The id must be a plain path segment.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", path_segment(&iface.iface_id)?);
        self.put(&path, iface).await
    }

    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), ApiError> {
        self.put("/vsock", vsock).await
    }

    pub async fn put_entropy(&self, entropy: &EntropyDevice) -> Result<(), ApiError> {
        self.put("/entropy", entropy).await
    }

    /// `PUT /snapshot/create`: writes the paused VM's state and memory.
    pub async fn put_snapshot_create(&self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.put("/snapshot/create", params).await
    }

    /// `PUT /snapshot/load`: on a fresh process only (after logger and
    /// metrics at most). Firecracker ends itself when loading fails.
    pub async fn put_snapshot_load(&self, params: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.put("/snapshot/load", params).await
    }

    /// `PATCH /vm`: pauses or resumes the vCPUs.
    pub async fn patch_vm(&self, state: VmState) -> Result<(), ApiError> {
        self.patch("/vm", &Vm { state }).await
    }

    /// `PATCH /drives/{drive_id}` after boot (see [`PartialDrive`]).
    pub async fn patch_drive(&self, drive: &PartialDrive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", path_segment(&drive.drive_id)?);
        self.patch(&path, drive).await
    }

    /// `GET /vm/config`: the whole configuration, untyped (banger reads
    /// only its drives).
    pub async fn vm_config(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/vm/config").await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo::new(action)).await
    }
}

/// Firecracker's ids allow letters, digits and `_`/`-`; anything else would
/// also change the request path.
fn path_segment(id: &str) -> Result<&str, ApiError> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(id)
    } else {
        Err(ApiError::Protocol {
            method: Method::PUT,
            path: id.to_owned(),
            detail: format!("device id {id:?} must be 1-64 letters, digits, _ or -"),
        })
    }
}

/// Turns an error answer into [`ApiError::Rejected`], with Firecracker's
/// `fault_message` when the body has one, else the body itself.
fn rejected(method: Method, path: &str, status: StatusCode, body: &[u8]) -> ApiError {
    let fault_message = serde_json::from_slice::<super::api::Error>(body)
        .ok()
        .and_then(|e| e.fault_message)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body).trim().to_owned();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no explanation")
                    .to_owned()
            } else {
                text
            }
        });
    ApiError::Rejected {
        method,
        path: path.to_owned(),
        status: status.as_u16(),
        fault_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_carries_fault_message() {
        let e = rejected(
            Method::PUT,
            "/machine-config",
            StatusCode::BAD_REQUEST,
            br#"{"fault_message":"The vCPU number is invalid!"}"#,
        );
        assert!(
            matches!(&e, ApiError::Rejected { status: 400, fault_message, .. } if fault_message == "The vCPU number is invalid!"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "Firecracker refused PUT /machine-config (400): The vCPU number is invalid!"
        );
        let e = rejected(Method::GET, "/", StatusCode::INTERNAL_SERVER_ERROR, b"");
        assert!(
            e.to_string().ends_with("(500): Internal Server Error"),
            "{e}"
        );
        let e = rejected(Method::GET, "/", StatusCode::BAD_REQUEST, b"oops\n");
        assert!(e.to_string().ends_with("(400): oops"), "{e}");
    }

    #[test]
    fn ids_must_be_plain_segments() {
        assert!(path_segment("rootfs").is_ok());
        assert!(path_segment("eth_0-1").is_ok());
        for bad in ["", "../x", "a/b", "a b", "a?b"] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn missing_socket_is_not_listening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ApiClient::new(dir.path().join("none.sock"));
        let e = c.describe_instance().await.expect_err("no socket");
        assert!(e.is_not_listening(), "{e:?}");
    }
}
