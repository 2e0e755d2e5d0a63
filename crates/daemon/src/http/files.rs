//! File transfer routes: tar streams into and out of a running VM over
//! WebSockets (protocol: `banger_api::files`); the relays are in
//! `stream::files`.

use super::Shared;
use super::stream::{files, upgrade_to_agent};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::response::Response;
use banger_api::ApiError;
use banger_api::files::{GetFilesStart, PutFilesStart, routes as p};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes of this module, merged into the daemon's router.
pub(super) fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(put_files))
        .routes(routes!(get_files))
}

/// Unpacks a tar stream into a running VM (WebSocket; protocol:
/// `banger_api::files`).
#[utoipa::path(get, path = p::VM_FILES_PUT, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 101, description = "WebSocket: a PutFilesStart, binary tar data, then FilesControl::End", body = PutFilesStart),
              (status = 409, body = ApiError), (status = 404, body = ApiError)))]
async fn put_files(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade_to_agent(&d, &vm, ws, files::run_put)
}

/// Streams a tar of a path out of a running VM (WebSocket; protocol:
/// `banger_api::files`).
#[utoipa::path(get, path = p::VM_FILES_GET, params(("vm" = String, Path, description = "name or id prefix")),
    responses((status = 101, description = "WebSocket: a GetFilesStart, answered by binary tar data and a FilesReport", body = GetFilesStart),
              (status = 409, body = ApiError), (status = 404, body = ApiError)))]
async fn get_files(
    State(d): State<Shared>,
    Path(vm): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade_to_agent(&d, &vm, ws, files::run_get)
}
