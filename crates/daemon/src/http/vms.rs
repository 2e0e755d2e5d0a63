//! HTTP routes for VMs: list, create, inspect, lifecycle, settings, logs,
//! ports, waiting, and exec (the relay is `stream::exec`).

use super::Shared;
use super::stream::{self, ndjson, operation, upgrade_to_agent};
use crate::DaemonError;
use axum::Json;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use banger_api::exec::ExecStart;
use banger_api::{
    ApiError, CreateVmEvent, CreateVmRequest, KillRequest, LogsQuery, PortInfo, SetVmRequest,
    VmBoot, VmStats, WaitEvent, WaitRequest, paths,
};
use banger_model::VmRecord;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes of this module, merged into the daemon's router.
pub(super) fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(get_vm, delete_vm, set_vm))
        .routes(routes!(vm_stats))
        .routes(routes!(exec_vm))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(restart_vm))
        .routes(routes!(kill_vm))
        .routes(routes!(vm_logs))
        .routes(routes!(vm_ports))
        .routes(routes!(vm_boot))
        .routes(routes!(wait_vm))
}

#[utoipa::path(get, path = paths::VMS, responses((status = 200, body = Vec<VmRecord>)))]
async fn list_vms(State(d): State<Shared>) -> Result<Json<Vec<VmRecord>>, DaemonError> {
    Ok(Json(d.list_vms()?))
}

/// Creates a VM and (by default) boots it. Answers with newline-delimited
/// JSON `CreateVmEvent`s: `planned`, `progress`..., then `done` or `error`.
/// A request that is wrong on its face (name, resources, image) is refused
/// before the stream starts.
#[utoipa::path(post, path = paths::VMS, request_body = CreateVmRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = CreateVmEvent),
              (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn create_vm(State(d): State<Shared>, Json(req): Json<CreateVmRequest>) -> Response {
    if let Err(e) = d.check_create(&req) {
        return DaemonError::from(e).into_response();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    // The operation lives as long as its client listens: a client that goes
    // away (Ctrl-C) cancels it, and it rolls back. Daemon shutdown does too.
    let cancel = d.shutdown.child_token();
    let guard = cancel.clone().drop_guard();
    let ephemeral = req.ephemeral;
    tokio::spawn(async move {
        let progress = stream::progress::sink(&tx);
        let planned = |p| {
            let _ = tx.send(CreateVmEvent::Planned(p));
        };
        match d.create_vm(req, planned, &progress, cancel).await {
            Ok(vm) => {
                let _ = tx.send(CreateVmEvent::Done(Box::new(vm.clone())));
                if ephemeral {
                    // The stream stays open: its end deletes the VM.
                    d.hold_ephemeral(vm, tx).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "create failed");
                let _ = tx.send(CreateVmEvent::Error(DaemonError::from(e).to_api()));
            }
        }
    });
    ndjson(rx, guard)
}

#[utoipa::path(get, path = paths::VM, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError)))]
async fn get_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.get_vm(&vm)?))
}

/// Stops (if running) and deletes a VM and its disks.
#[utoipa::path(delete, path = paths::VM, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError)))]
async fn delete_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.delete_vm(&vm).await?))
}

/// Changes vcpu, memory, disk size (grow only) or NAT of a stopped VM.
#[utoipa::path(patch, path = paths::VM, params(("vm" = String, Path, description = "name or id prefix")),
    request_body = SetVmRequest,
    responses((status = 200, body = VmRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn set_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Json(req): Json<SetVmRequest>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.set_vm(&vm, req).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct StatsQuery {
    /// Also ask the guest (memory, load, file systems); slower.
    #[serde(default)]
    guest: bool,
}

/// CPU, memory and disk use of a VM.
#[utoipa::path(get, path = paths::VM_STATS, params(("vm" = String, Path, description = "name or id prefix"), StatsQuery),
    responses((status = 200, body = VmStats), (status = 404, body = ApiError)))]
async fn vm_stats(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<VmStats>, DaemonError> {
    Ok(Json(d.vm_stats(&vm, q.guest).await?))
}

/// Runs a process in a running VM over a WebSocket (protocol: `banger_api::exec`).
#[utoipa::path(get, path = paths::VM_EXEC, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 101, description = "WebSocket: first text message is an ExecStart", body = ExecStart),
              (status = 409, body = ApiError), (status = 404, body = ApiError)))]
async fn exec_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade_to_agent(&d, &vm, ws, stream::exec::run_exec)
}

/// Boots a stopped VM and waits for its agent.
#[utoipa::path(post, path = paths::VM_START, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn start_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.start_vm(&vm).await?))
}

/// Powers a VM off (killing its VMM after a timeout); disks are kept.
#[utoipa::path(post, path = paths::VM_STOP, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn stop_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.stop_vm(&vm).await?))
}

/// Stops, then starts a VM.
#[utoipa::path(post, path = paths::VM_RESTART, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn restart_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.restart_vm(&vm).await?))
}

/// Sends a signal to a VM's VMM process.
#[utoipa::path(post, path = paths::VM_KILL, params(("vm" = String, Path, description = "name or id prefix")),
    request_body = KillRequest,
    responses((status = 200, body = VmRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn kill_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Json(req): Json<KillRequest>,
) -> Result<Json<VmRecord>, DaemonError> {
    Ok(Json(d.kill_vm(&vm, req.signal).await?))
}

/// A VM's serial console or VMM log, as text, from the last `tail` lines
/// and/or what was written since `since_ms`; with `follow`, a stream.
#[utoipa::path(get, path = paths::VM_LOGS, params(("vm" = String, Path, description = "name or id prefix"), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ApiError)))]
async fn vm_logs(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, DaemonError> {
    let stream = d.log_stream(&vm, &q)?;
    Ok(stream::bytes("text/plain; charset=utf-8", stream))
}

/// Listening TCP ports of a running VM (from its agent), probed from the
/// host for HTTP and HTTPS.
#[utoipa::path(get, path = paths::VM_PORTS, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = Vec<PortInfo>), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn vm_ports(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<Vec<PortInfo>>, DaemonError> {
    Ok(Json(d.vm_ports(&vm).await?))
}

/// How a running VM booted: which initramfs, when the kernel started its
/// first process and when the agent greeted (guest uptime), and how far
/// the image's init is.
#[utoipa::path(get, path = paths::VM_BOOT, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 200, body = VmBoot), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn vm_boot(
    State(d): State<Shared>,
    Path(vm): Path<String>,
) -> Result<Json<VmBoot>, DaemonError> {
    Ok(Json(d.vm_boot(&vm).await?))
}

/// Waits until a running VM's sshd greets (an `SSH-` banner probed from the
/// host) or its init has finished booting, at most `ready_timeout_secs`.
/// Answers with newline-delimited JSON `WaitEvent`s: a progress note if it
/// has to wait, then `done` with the VM or `error`.
#[utoipa::path(post, path = paths::VM_WAIT, params(("vm" = String, Path, description = "name or id prefix")),
    request_body = WaitRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = WaitEvent),
              (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn wait_vm(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    Json(req): Json<WaitRequest>,
) -> Response {
    // An unknown or stopped VM is a plain 404 or 409, before any stream.
    if let Err(e) = d.running_agent(&vm) {
        return DaemonError::from(e).into_response();
    }
    operation(
        d,
        |vm| WaitEvent::Done(Box::new(vm)),
        WaitEvent::Error,
        move |d, progress, cancel| async move { d.wait_vm(&vm, req.until, &progress, &cancel).await },
    )
}
