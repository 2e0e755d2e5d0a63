//! HTTP routes for supervised guest sessions; the per-session Unix socket
//! that `vm session attach` connects to is `http::stream::session_socket`.

use super::Shared;
use super::stream::{self, session_socket};
use crate::DaemonError;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use banger_agent_proto::{OutputStream, SessionSpec, TtySize};
use banger_api::ApiError;
use banger_api::exec::ExecExit;
use banger_api::sessions::{
    AttachInfo, AttachRequest, LogStream, SessionInfo, StartSession, StdinMode, paths as p,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes of this module, merged into the daemon's router.
pub(super) fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(list_sessions, start_session))
        .routes(routes!(stop_session))
        .routes(routes!(session_logs))
        .routes(routes!(attach_session))
}

fn to_api(s: banger_agent_proto::SessionInfo) -> SessionInfo {
    SessionInfo {
        name: s.name,
        argv: s.argv,
        stdin: match s.stdin {
            banger_agent_proto::StdinMode::Pipe => StdinMode::Pipe,
            banger_agent_proto::StdinMode::Tty => StdinMode::Tty,
            banger_agent_proto::StdinMode::Null => StdinMode::Null,
        },
        pid: s.pid,
        started_at: s.started_at,
        exit: s.status.map(|st| ExecExit {
            code: st.code,
            signal: st.signal,
        }),
        stdout_bytes: s.stdout_bytes,
        stderr_bytes: s.stderr_bytes,
    }
}

/// The path parameters of a session's routes.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct SessionPath {
    /// The VM: name or id prefix.
    vm: String,
    /// The session's name.
    #[param(value_type = banger_api::rules::SessionNameParam, inline)]
    name: String,
}

fn check_name(name: &str) -> Result<(), DaemonError> {
    banger_api::rules::SESSION_NAME
        .check(name)
        .map_err(|e| DaemonError::Invalid(e.to_string()))
}

/// Sessions of a running VM, running and ended.
#[utoipa::path(get, path = p::SESSIONS, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = Vec<SessionInfo>), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn list_sessions(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<Vec<SessionInfo>>, DaemonError> {
    let all = d.list_sessions(&vm).await?;
    Ok(Json(all.into_iter().map(to_api).collect()))
}

/// Starts a supervised session in a running VM.
#[utoipa::path(post, path = p::SESSIONS, params(("vm" = String, Path, description = "name or id prefix")),
    request_body = StartSession,
    responses((status = 200, body = SessionInfo), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn start_session(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Json(req): Json<StartSession>,
) -> Result<Json<SessionInfo>, DaemonError> {
    check_name(&req.name)?;
    if req.argv.is_empty() {
        return Err(DaemonError::Invalid("a session needs a command".into()));
    }
    let spec = SessionSpec {
        name: req.name,
        argv: req.argv,
        env: req.env.into_iter().map(|e| (e.name, e.value)).collect(),
        cwd: req.cwd,
        stdin: match req.stdin {
            StdinMode::Pipe => banger_agent_proto::StdinMode::Pipe,
            StdinMode::Tty => banger_agent_proto::StdinMode::Tty,
            StdinMode::Null => banger_agent_proto::StdinMode::Null,
        },
    };
    let info = d.start_session(&vm, spec).await?;
    Ok(Json(to_api(info)))
}

/// Ends a session (SIGTERM, SIGKILL after 10 s) and forgets it.
#[utoipa::path(post, path = p::SESSION_STOP,
    params(SessionPath),
    responses((status = 200, body = SessionInfo), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn stop_session(
    State(d): State<Shared>,
    Path(SessionPath { vm, name }): Path<SessionPath>,
) -> Result<Json<SessionInfo>, DaemonError> {
    check_name(&name)?;
    let info = d.stop_session(&vm, &name).await?;
    Ok(Json(to_api(info)))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// One stream only (default: stdout's log, then stderr's).
    #[param(value_type = Option<LogStream>)]
    stream: Option<LogStream>,
    /// Keep streaming the session's output until it ends.
    #[serde(default)]
    follow: bool,
}

/// A session's ring logs (the last 1 MiB of each stream), as bytes; with
/// `follow`, then its live output until it ends.
#[utoipa::path(get, path = p::SESSION_LOGS,
    params(SessionPath, LogsQuery),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn session_logs(
    State(d): State<Shared>,
    Path(SessionPath { vm, name }): Path<SessionPath>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, DaemonError> {
    check_name(&name)?;
    let stream = q.stream.map(|s| match s {
        LogStream::Stdout => OutputStream::Stdout,
        LogStream::Stderr => OutputStream::Stderr,
    });
    let logs = d.session_log_stream(&vm, &name, stream, q.follow).await?;
    Ok(stream::bytes("application/octet-stream", logs))
}

/// Opens (or reuses) the session's attach socket and, for a tty session
/// and a given size, resizes its terminal.
#[utoipa::path(post, path = p::SESSION_ATTACH,
    params(SessionPath),
    request_body = AttachRequest,
    responses((status = 200, body = AttachInfo), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn attach_session(
    State(d): State<Shared>,
    Path(SessionPath { vm, name }): Path<SessionPath>,
    Json(req): Json<AttachRequest>,
) -> Result<Json<AttachInfo>, DaemonError> {
    check_name(&name)?;
    let size = req.size.map(|size| TtySize {
        rows: size.rows,
        cols: size.cols,
    });
    let attach = d.attach_session(&vm, &name, size).await?;
    let socket = session_socket::socket_path(&attach.vm.dir, &name)?;
    session_socket::ensure_bridge(&socket, attach.agent, name, d.shutdown.clone()).await?;
    Ok(Json(AttachInfo {
        socket: socket.display().to_string(),
        session: to_api(attach.session),
    }))
}
