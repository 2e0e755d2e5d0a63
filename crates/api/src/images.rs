//! Wire types and client calls for images and kernels: catalog and OCI
//! pulls, registration of local files, deletion and catalog bundles.

use crate::{ApiError, Client, ClientError, OperationEvent, Progress, Warning, paths};
use banger_model::{ImageRecord, KernelRecord};
use hyper::Method;
use serde::{Deserialize, Serialize};

/// Route paths of this module.
pub mod routes {
    pub const IMAGE_PULL: &str = "/v1/images/pull";
    pub const IMAGE_REGISTER: &str = "/v1/images/register";
    pub const IMAGE_BUNDLE: &str = "/v1/images/{image}/bundle";
    pub const KERNEL: &str = "/v1/kernels/{kernel}";
    pub const KERNEL_PULL: &str = "/v1/kernels/pull";
    pub const KERNEL_BUNDLE: &str = "/v1/kernels/{kernel}/bundle";
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// A catalog name (`debian-bookworm`), or an OCI reference
    /// (`registry/repo:tag`, `registry/repo@sha256:...`).
    #[schema(schema_with = crate::rules::schema::reference)]
    pub reference: String,
    /// Name of the new image; for OCI references the default is derived
    /// from the repository and tag, for catalog names it is the name.
    #[schema(schema_with = crate::rules::schema::image_name_opt)]
    pub name: Option<String>,
    /// Kernel an OCI image boots with; default: the default image's kernel.
    #[schema(schema_with = crate::rules::schema::kernel_name_opt)]
    pub kernel_ref: Option<String>,
}

/// `POST /v1/kernels/pull`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullKernelRequest {
    /// Catalog name, e.g. `generic-6.12`.
    #[schema(schema_with = crate::rules::schema::kernel_name)]
    pub name: String,
}

/// Bytes moved so far by a long transfer (download, unpack, compression).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transfer {
    /// `download`, `extract`, `layer`, ...
    pub phase: String,
    pub done: u64,
    /// 0 when unknown.
    pub total: u64,
}

/// One line of the `POST /v1/images/pull` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullImageEvent {
    Progress(Progress),
    Warning(Warning),
    Transfer(Transfer),
    Done(ImageRecord),
    Error(ApiError),
}

/// One line of the `POST /v1/kernels/pull` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullKernelEvent {
    Progress(Progress),
    Warning(Warning),
    Transfer(Transfer),
    Done(KernelRecord),
    Error(ApiError),
}

/// `POST /v1/images/register`: an image made of files the daemon does not
/// own (unmanaged). Registering an existing name updates it in place.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    #[schema(schema_with = crate::rules::schema::image_name)]
    pub name: String,
    /// Absolute path of the ext4 root file system.
    #[schema(schema_with = crate::rules::schema::host_path)]
    pub rootfs: String,
    /// Absolute path of an ext4 seed for new VMs' `/root` disks.
    #[schema(schema_with = crate::rules::schema::host_path_opt)]
    pub work_seed: Option<String>,
    /// A registered kernel. Exactly one of `kernel_ref` and `kernel` is
    /// given (`oneOf`, see [`crate::rules::complete_document`]); neither
    /// may be `null`.
    #[serde(
        default,
        deserialize_with = "crate::rules::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = crate::rules::schema::kernel_name)]
    pub kernel_ref: Option<String>,
    /// Absolute path of a kernel image (bzImage); recorded as a kernel named
    /// after the image.
    #[serde(
        default,
        deserialize_with = "crate::rules::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = crate::rules::schema::host_path)]
    pub kernel: Option<String>,
    /// Absolute path of its initrd (only with `kernel`).
    #[serde(
        default,
        deserialize_with = "crate::rules::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = crate::rules::schema::host_path)]
    pub initrd: Option<String>,
}

/// Query of `DELETE /v1/images/{image}`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteImageQuery {
    /// Also stop and delete the VMs that use the image (their disks are
    /// overlays of the image and cannot outlive it).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/images/{image}/bundle` and `POST /v1/kernels/{kernel}/bundle`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    /// Absolute path of the directory the bundle is written to.
    #[schema(schema_with = crate::rules::schema::host_path)]
    pub out_dir: String,
    /// URL of that directory once published (http, https or file).
    #[schema(schema_with = crate::rules::schema::base_url)]
    pub base_url: String,
    /// Absolute path of an index file to add the entry to (created if missing).
    #[schema(schema_with = crate::rules::schema::host_path_opt)]
    pub index: Option<String>,
    /// One line for the catalog listing.
    pub description: Option<String>,
}

/// A written bundle and its index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleResult {
    /// `image` or `kernel`.
    pub kind: String,
    pub name: String,
    /// The bundle file.
    pub path: String,
    /// Where the index says it is published.
    pub url: String,
    pub sha256: String,
    pub size: u64,
    /// The index entry as JSON.
    #[schema(value_type = Object)]
    pub entry: serde_json::Value,
    /// The index file written, if one was asked for.
    pub index: Option<String>,
}

/// One line of a bundle response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BundleEvent {
    Progress(Progress),
    Warning(Warning),
    Done(BundleResult),
    Error(ApiError),
}

macro_rules! outcome {
    ($ty:ty, $out:ty, $($other:pat),+) => {
        impl OperationEvent for $ty {
            type Output = $out;
            fn outcome(&self) -> Option<Result<$out, ApiError>> {
                match self {
                    Self::Done(v) => Some(Ok(v.clone())),
                    Self::Error(e) => Some(Err(e.clone())),
                    $($other)|+ => None,
                }
            }
        }
    };
}

outcome!(
    PullImageEvent,
    ImageRecord,
    PullImageEvent::Progress(_),
    PullImageEvent::Transfer(_),
    PullImageEvent::Warning(_)
);
outcome!(
    PullKernelEvent,
    KernelRecord,
    PullKernelEvent::Progress(_),
    PullKernelEvent::Transfer(_),
    PullKernelEvent::Warning(_)
);
outcome!(
    BundleEvent,
    BundleResult,
    BundleEvent::Progress(_),
    BundleEvent::Warning(_)
);

impl Client {
    /// Pulls an image from the catalog or an OCI registry.
    pub async fn pull_image(
        &self,
        req: &PullImageRequest,
        on_event: impl FnMut(&PullImageEvent),
    ) -> Result<ImageRecord, ClientError> {
        self.operation(routes::IMAGE_PULL, req, on_event).await
    }

    /// Pulls a kernel from the catalog.
    pub async fn pull_kernel(
        &self,
        req: &PullKernelRequest,
        on_event: impl FnMut(&PullKernelEvent),
    ) -> Result<KernelRecord, ClientError> {
        self.operation(routes::KERNEL_PULL, req, on_event).await
    }

    /// Registers (or updates) an unmanaged image.
    pub async fn register_image(
        &self,
        req: &RegisterImageRequest,
    ) -> Result<ImageRecord, ClientError> {
        self.json(Method::POST, routes::IMAGE_REGISTER, Some(req))
            .await
    }

    /// Deletes an image; with `force`, also the VMs that use it.
    pub async fn delete_image(&self, name: &str, force: bool) -> Result<ImageRecord, ClientError> {
        let path = format!("{}?force={force}", paths::fill(paths::IMAGE, name));
        self.json(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn get_kernel(&self, name: &str) -> Result<KernelRecord, ClientError> {
        self.json(Method::GET, &paths::fill(routes::KERNEL, name), None::<&()>)
            .await
    }

    /// Deletes a kernel no image uses.
    pub async fn delete_kernel(&self, name: &str) -> Result<KernelRecord, ClientError> {
        self.json(
            Method::DELETE,
            &paths::fill(routes::KERNEL, name),
            None::<&()>,
        )
        .await
    }

    /// Writes a catalog bundle of an image.
    pub async fn bundle_image(
        &self,
        name: &str,
        req: &BundleRequest,
        on_event: impl FnMut(&BundleEvent),
    ) -> Result<BundleResult, ClientError> {
        self.operation(&paths::fill(routes::IMAGE_BUNDLE, name), req, on_event)
            .await
    }

    /// Writes a catalog bundle of a kernel.
    pub async fn bundle_kernel(
        &self,
        name: &str,
        req: &BundleRequest,
        on_event: impl FnMut(&BundleEvent),
    ) -> Result<BundleResult, ClientError> {
        self.operation(&paths::fill(routes::KERNEL_BUNDLE, name), req, on_event)
            .await
    }
}
