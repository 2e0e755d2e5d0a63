//! Routes outside the public document: the benchmarks `banger bench`
//! drives (`/internal/...`, no stability promise).

use super::Shared;
use super::stream::operation;
use crate::DaemonError;
use axum::extract::State;
use axum::response::Response;
use axum::{Json, Router};
use banger_api::bench::{ImageBenchEvent, ImageBenchRequest, routes as p};
use banger_api::{NetworkBench, paths};

/// The internal routes, outside the public document.
pub(super) fn router(daemon: Shared) -> Router {
    Router::new()
        .route(paths::NETWORK_BENCH, axum::routing::post(network_bench))
        .route(p::BENCH_IMAGE, axum::routing::post(bench_image))
        .with_state(daemon)
}

/// Times TAP acquisition (warm pool vs cold) and 10k `.vm` DNS queries.
async fn network_bench(State(d): State<Shared>) -> Result<Json<NetworkBench>, DaemonError> {
    Ok(Json(d.network_bench().await?))
}

/// Times an OCI import and a catalog install against skopeo/umoci/mkfs and
/// curl/zstd/tar. Answers with newline-delimited JSON `ImageBenchEvent`s;
/// disconnecting cancels.
async fn bench_image(State(d): State<Shared>, Json(req): Json<ImageBenchRequest>) -> Response {
    operation(
        d,
        ImageBenchEvent::Done,
        ImageBenchEvent::Error,
        move |d, progress, cancel| async move { d.bench_image(&req, &progress, &cancel).await },
    )
}
