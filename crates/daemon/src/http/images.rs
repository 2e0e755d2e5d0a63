//! HTTP routes for images, kernels and warm-start templates: list, get,
//! build, pull, register, delete, bundle (see `image_ops`).

use super::Shared;
use super::stream::operation;
use crate::DaemonError;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use banger_api::images::{
    BundleEvent, BundleRequest, BundleResult, DeleteImageQuery, PullImageEvent, PullImageRequest,
    PullKernelEvent, PullKernelRequest, RegisterImageRequest, routes as p,
};
use banger_api::templates::{WarmImageEvent, WarmImageRequest, routes as t};
use banger_api::{ApiError, BuildImageEvent, BuildImageRequest, paths};
use banger_model::{ImageRecord, KernelRecord, TemplateRecord};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes of this module, merged into the daemon's router.
pub(super) fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(list_images))
        .routes(routes!(get_image))
        .routes(routes!(build_image))
        .routes(routes!(list_kernels))
        .routes(routes!(pull_image))
        .routes(routes!(register_image))
        .routes(routes!(delete_image))
        .routes(routes!(bundle_image))
        .routes(routes!(pull_kernel))
        .routes(routes!(get_kernel, delete_kernel))
        .routes(routes!(bundle_kernel))
        .routes(routes!(list_templates, warm_image, drop_templates))
}

/// The warm-start templates of an image.
#[utoipa::path(get, path = t::IMAGE_TEMPLATES, params(("image" = String, Path)),
    responses((status = 200, body = Vec<TemplateRecord>), (status = 404, body = ApiError)))]
async fn list_templates(
    State(d): State<Shared>,
    Path(image): Path<String>,
) -> Result<Json<Vec<TemplateRecord>>, DaemonError> {
    Ok(Json(d.list_templates(&image)?))
}

/// Makes (or remakes) the warm-start template of one shape of an image:
/// boots it, seals and saves the guest. Answers with newline-delimited
/// JSON `WarmImageEvent`s; disconnecting cancels.
#[utoipa::path(post, path = t::IMAGE_TEMPLATES, params(("image" = String, Path)), request_body = WarmImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = WarmImageEvent),
              (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn warm_image(
    State(d): State<Shared>,
    Path(image): Path<String>,
    Json(req): Json<WarmImageRequest>,
) -> Response {
    if let Err(e) = d.check_warm_image(&image, &req) {
        return DaemonError::from(e).into_response();
    }
    operation(
        d,
        WarmImageEvent::Done,
        WarmImageEvent::Error,
        move |d, progress, cancel| async move {
            let shape = d.default_shape(req.vcpu, req.memory_mib);
            d.build_template(&image, shape, &progress, &cancel).await
        },
    )
}

/// Deletes every warm-start template of an image (waiting for a build in
/// progress); answers with those removed.
#[utoipa::path(delete, path = t::IMAGE_TEMPLATES, params(("image" = String, Path)),
    responses((status = 200, body = Vec<TemplateRecord>), (status = 404, body = ApiError)))]
async fn drop_templates(
    State(d): State<Shared>,
    Path(image): Path<String>,
) -> Result<Json<Vec<TemplateRecord>>, DaemonError> {
    Ok(Json(d.drop_templates(&image).await?))
}

/// Pulls an image: a catalog name through the catalog (with its kernel when
/// missing), anything else as an OCI reference from its registry. Answers
/// with newline-delimited JSON `PullImageEvent`s; disconnecting cancels.
#[utoipa::path(post, path = p::IMAGE_PULL, request_body = PullImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = PullImageEvent),
              (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn pull_image(State(d): State<Shared>, Json(req): Json<PullImageRequest>) -> Response {
    if let Err(e) = d.check_pull(&req) {
        return DaemonError::from(e).into_response();
    }
    operation(
        d,
        PullImageEvent::Done,
        PullImageEvent::Error,
        move |d, progress, cancel| async move { d.pull_image(req, &progress, &cancel).await },
    )
}

/// Pulls a kernel from the catalog. Answers with newline-delimited JSON
/// `PullKernelEvent`s; disconnecting cancels.
#[utoipa::path(post, path = p::KERNEL_PULL, request_body = PullKernelRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = PullKernelEvent),
              (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn pull_kernel(State(d): State<Shared>, Json(req): Json<PullKernelRequest>) -> Response {
    if let Err(e) = d.check_pull_kernel(&req) {
        return DaemonError::from(e).into_response();
    }
    operation(
        d,
        PullKernelEvent::Done,
        PullKernelEvent::Error,
        move |d, progress, cancel| async move { d.pull_kernel(&req.name, &progress, &cancel).await },
    )
}

/// Registers local files as an unmanaged image (updating one of that name).
#[utoipa::path(post, path = p::IMAGE_REGISTER, request_body = RegisterImageRequest,
    responses((status = 200, body = ImageRecord), (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn register_image(
    State(d): State<Shared>,
    Json(req): Json<RegisterImageRequest>,
) -> Result<Json<ImageRecord>, DaemonError> {
    Ok(Json(d.register_image(req).await?))
}

/// Deletes an image (a managed one with its files). Refused while VMs use
/// it, unless `force`, which deletes those VMs first.
#[utoipa::path(delete, path = paths::IMAGE, params(("image" = String, Path), DeleteImageQuery),
    responses((status = 200, body = ImageRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_image(
    State(d): State<Shared>,
    Path(image): Path<String>,
    Query(q): Query<DeleteImageQuery>,
) -> Result<Json<ImageRecord>, DaemonError> {
    Ok(Json(d.delete_image(&image, q.force).await?))
}

#[utoipa::path(get, path = p::KERNEL, params(("kernel" = String, Path)),
    responses((status = 200, body = KernelRecord), (status = 404, body = ApiError)))]
async fn get_kernel(
    State(d): State<Shared>,
    Path(kernel): Path<String>,
) -> Result<Json<KernelRecord>, DaemonError> {
    Ok(Json(d.get_kernel(&kernel)?))
}

/// Deletes a kernel no image uses (a pulled or built one with its files).
#[utoipa::path(delete, path = p::KERNEL, params(("kernel" = String, Path)),
    responses((status = 200, body = KernelRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_kernel(
    State(d): State<Shared>,
    Path(kernel): Path<String>,
) -> Result<Json<KernelRecord>, DaemonError> {
    Ok(Json(d.delete_kernel(&kernel).await?))
}

/// Writes a catalog bundle of an image (and adds it to an index file).
/// Answers with newline-delimited JSON `BundleEvent`s.
#[utoipa::path(post, path = p::IMAGE_BUNDLE, params(("image" = String, Path)), request_body = BundleRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BundleEvent),
              (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn bundle_image(
    State(d): State<Shared>,
    Path(image): Path<String>,
    Json(req): Json<BundleRequest>,
) -> Response {
    if let Err(e) = d.check_bundle_image(&image, &req) {
        return DaemonError::from(e).into_response();
    }
    bundle(d, req, move |d, req, progress, cancel| async move {
        d.bundle_image(&image, req, &progress, &cancel).await
    })
}

/// Writes a catalog bundle of a kernel (and adds it to an index file).
/// Answers with newline-delimited JSON `BundleEvent`s.
#[utoipa::path(post, path = p::KERNEL_BUNDLE, params(("kernel" = String, Path)), request_body = BundleRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BundleEvent),
              (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn bundle_kernel(
    State(d): State<Shared>,
    Path(kernel): Path<String>,
    Json(req): Json<BundleRequest>,
) -> Response {
    if let Err(e) = d.check_bundle_kernel(&kernel, &req) {
        return DaemonError::from(e).into_response();
    }
    bundle(d, req, move |d, req, progress, cancel| async move {
        d.bundle_kernel(&kernel, req, &progress, &cancel).await
    })
}

fn bundle<F, Fut, Er>(d: Shared, req: BundleRequest, op: F) -> Response
where
    F: FnOnce(
            Shared,
            BundleRequest,
            banger_api::ProgressSink,
            tokio_util::sync::CancellationToken,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = Result<BundleResult, Er>> + Send + 'static,
    Er: Into<DaemonError>,
{
    operation(
        d,
        BundleEvent::Done,
        BundleEvent::Error,
        move |d, progress, cancel| async move { op(d, req, progress, cancel).await },
    )
}

/// Builds an image: locally from Debian packages (mmdebstrap), or with
/// `from_image` derived from a registered image in a transient VM. Answers
/// with newline-delimited JSON `BuildImageEvent`s; disconnecting cancels.
#[utoipa::path(post, path = paths::IMAGE_BUILD, request_body = BuildImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BuildImageEvent),
              (status = 400, body = ApiError)))]
async fn build_image(State(d): State<Shared>, Json(req): Json<BuildImageRequest>) -> Response {
    if let Err(e) = d.check_build_image(&req) {
        return DaemonError::from(e).into_response();
    }
    operation(
        d,
        BuildImageEvent::Done,
        BuildImageEvent::Error,
        move |d, progress, cancel| async move { d.build_image(req, &progress, cancel).await },
    )
}

#[utoipa::path(get, path = paths::IMAGES, responses((status = 200, body = Vec<ImageRecord>)))]
async fn list_images(State(d): State<Shared>) -> Result<Json<Vec<ImageRecord>>, DaemonError> {
    Ok(Json(d.list_images()?))
}

#[utoipa::path(get, path = paths::IMAGE, params(("image" = String, Path)),
    responses((status = 200, body = ImageRecord), (status = 404, body = ApiError)))]
async fn get_image(
    State(d): State<Shared>,
    Path(image): Path<String>,
) -> Result<Json<ImageRecord>, DaemonError> {
    Ok(Json(d.get_image(&image)?))
}

#[utoipa::path(get, path = paths::KERNELS, responses((status = 200, body = Vec<KernelRecord>)))]
async fn list_kernels(State(d): State<Shared>) -> Result<Json<Vec<KernelRecord>>, DaemonError> {
    Ok(Json(d.list_kernels()?))
}
