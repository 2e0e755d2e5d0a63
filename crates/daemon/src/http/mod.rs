//! The HTTP/JSON API on the daemon's Unix socket, described by OpenAPI.

mod error;
mod files;
mod images;
mod sessions;
mod stream;
mod vms;

use crate::{Daemon, DaemonError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, Router};
use banger_api::{ApiError, DaemonInfo, LogSource, NetworkStatus, paths};
use banger_version::BuildInfo;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The daemon as the handlers' state.
type Shared = Arc<Daemon>;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "banger daemon API",
        description = "bangerd's API on its Unix socket. Paths under /v1 are stable: \
            fields and routes are only added, never removed or changed in meaning. \
            Every error is an ApiError with a stable `code`."
    ),
    // Schemas only named by query parameters, which the route list does not collect.
    components(schemas(LogSource, banger_api::sessions::LogStream))
)]
struct ApiDoc;

/// The router and its OpenAPI document, built from the same route list so
/// they cannot drift apart. Every error response, the framework's own
/// rejections included, leaves as an `ApiError` ([`error`]),
/// and the document lists the statuses those rejections use.
pub fn router(daemon: Shared) -> (Router, serde_json::Value) {
    let (router, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(info))
        .routes(routes!(shutdown))
        .routes(routes!(network_status))
        .merge(vms::router())
        .merge(images::router())
        .merge(files::router())
        .merge(sessions::router())
        .with_state(daemon.clone())
        .split_for_parts();
    error::document(&mut api);
    let mut api = serde_json::to_value(&api).expect("an OpenAPI document serialises to JSON");
    banger_api::rules::complete_document(&mut api);
    let doc = api.clone();
    let router = router
        .route(
            paths::OPENAPI,
            axum::routing::get(move || async move { Json(doc) }),
        )
        .fallback(error::no_route)
        .layer(axum::middleware::from_fn(error::layer));
    (router, api)
}

#[utoipa::path(get, path = paths::INFO, responses((status = 200, body = DaemonInfo)))]
async fn info(State(d): State<Shared>) -> Json<DaemonInfo> {
    Json(DaemonInfo {
        build: BuildInfo::current(),
        pid: std::process::id(),
        socket: d.paths.socket.display().to_string(),
        log_path: d.paths.log_file.display().to_string(),
        state_dir: d.paths.state_dir.display().to_string(),
        backend: d.backend().to_string(),
        backend_reason: d.backend_reason.clone(),
        warm: d.warm_info().await,
    })
}

/// Stops the daemon. Running VMs keep running and are re-adopted at the next start.
#[utoipa::path(post, path = paths::SHUTDOWN, responses((status = 202)))]
async fn shutdown(State(d): State<Shared>) -> StatusCode {
    d.shutdown.cancel();
    StatusCode::ACCEPTED
}

/// The daemon's networking: mode, DNS server, NAT prerequisites, resolver.
#[utoipa::path(get, path = paths::NETWORK, responses((status = 200, body = NetworkStatus), (status = 409, body = ApiError)))]
async fn network_status(State(d): State<Shared>) -> Result<Json<NetworkStatus>, DaemonError> {
    Ok(Json(d.network_status().await?))
}
