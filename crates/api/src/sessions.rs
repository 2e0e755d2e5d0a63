//! Supervised guest sessions: `/v1/vms/{vm}/sessions...`.
//!
//! Sessions are long-lived processes run by the guest agent; they outlive
//! the clients (and the daemon) that started them. Attaching goes through a
//! per-session Unix socket the daemon serves (see [`AttachInfo`]).

use crate::client::{Client, ClientError};
use crate::exec::{EnvVar, ExecExit, TermSize};
use http_body_util::BodyExt;
use hyper::Method;
use serde::{Deserialize, Serialize};

/// Route paths of this module.
pub mod paths {
    pub const SESSIONS: &str = "/v1/vms/{vm}/sessions";
    pub const SESSION_STOP: &str = "/v1/vms/{vm}/sessions/{name}/stop";
    pub const SESSION_LOGS: &str = "/v1/vms/{vm}/sessions/{name}/logs";
    pub const SESSION_ATTACH: &str = "/v1/vms/{vm}/sessions/{name}/attach";
}

/// What a session's stdin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StdinMode {
    /// A pipe fed by attached clients; stays open between attaches.
    #[default]
    Pipe,
    /// A pseudo-terminal (stdout and stderr are one stream).
    Tty,
    /// /dev/null.
    Null,
}

/// `POST /v1/vms/{vm}/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    #[schema(schema_with = crate::rules::schema::session_name)]
    pub name: String,
    /// The command and its arguments.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub stdin: StdinMode,
}

/// A session as the guest agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub name: String,
    pub argv: Vec<String>,
    pub stdin: StdinMode,
    pub pid: Option<u32>,
    /// Unix time (guest clock) it started, in seconds.
    pub started_at: u64,
    /// Set once it has exited.
    pub exit: Option<ExecExit>,
    /// Bytes written to each stream; the guest keeps the last 1 MiB of each.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// Which log `GET .../logs` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// `POST .../attach` body: the client's terminal size, for tty sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    #[serde(default)]
    pub size: Option<TermSize>,
}

/// Where to attach: a Unix socket whose bytes are the session's stdin (in)
/// and its stdout and stderr (out). Closing the connection detaches; the
/// daemon closes it when the session ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachInfo {
    pub socket: String,
    pub session: SessionInfo,
}

/// Fills `{vm}` and `{name}` of a session path.
pub fn session_path(template: &str, vm: &str, name: &str) -> String {
    let with_vm = crate::paths::fill(template, vm);
    crate::paths::fill(&with_vm, name)
}

impl Client {
    pub async fn start_session(
        &self,
        vm: &str,
        req: &StartSession,
    ) -> Result<SessionInfo, ClientError> {
        let path = crate::paths::fill(paths::SESSIONS, vm);
        self.json(Method::POST, &path, Some(req)).await
    }

    pub async fn list_sessions(&self, vm: &str) -> Result<Vec<SessionInfo>, ClientError> {
        let path = crate::paths::fill(paths::SESSIONS, vm);
        self.json(Method::GET, &path, None::<&()>).await
    }

    /// Ends a session (SIGTERM, SIGKILL after 10 s) and forgets it.
    pub async fn stop_session(&self, vm: &str, name: &str) -> Result<SessionInfo, ClientError> {
        let path = session_path(paths::SESSION_STOP, vm, name);
        self.json(Method::POST, &path, None::<&()>).await
    }

    /// Opens (or reuses) the session's attach socket; with `size`, resizes
    /// a tty session's terminal first.
    pub async fn attach_session(
        &self,
        vm: &str,
        name: &str,
        size: Option<TermSize>,
    ) -> Result<AttachInfo, ClientError> {
        let path = session_path(paths::SESSION_ATTACH, vm, name);
        self.json(Method::POST, &path, Some(&AttachRequest { size }))
            .await
    }

    /// Streams a session's ring log(s) (stdout's first) to `on_chunk`; with
    /// `follow`, until the session ends.
    pub async fn session_logs(
        &self,
        vm: &str,
        name: &str,
        stream: Option<LogStream>,
        follow: bool,
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let mut path = session_path(paths::SESSION_LOGS, vm, name);
        let mut query = vec![format!("follow={follow}")];
        if let Some(s) = stream {
            query.push(format!(
                "stream={}",
                match s {
                    LogStream::Stdout => "stdout",
                    LogStream::Stderr => "stderr",
                }
            ));
        }
        path = format!("{path}?{}", query.join("&"));
        let mut body = self.send(Method::GET, &path, None).await?.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                on_chunk(&data);
            }
        }
        Ok(())
    }
}
