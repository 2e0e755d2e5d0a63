//! Wire types and client call of `banger bench image`: OCI import and
//! catalog install, each timed against the usual tool chain.

use crate::{ApiError, Client, ClientError, OperationEvent, Progress, Warning};
use serde::{Deserialize, Serialize};

/// Route paths of this module: internal, outside the public API document.
pub mod routes {
    pub const BENCH_IMAGE: &str = "/internal/bench/image";
}

/// `POST /v1/bench/image`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBenchRequest {
    /// OCI reference of the image to import (`registry/repo:tag`); the
    /// daemon must reach its registry.
    pub reference: String,
}

/// OCI import: banger's pull against `skopeo copy` + `umoci unpack` +
/// `mkfs.ext4 -d`, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OciImportBench {
    /// First pull (downloads the layers into an empty cache).
    pub first_pull_ms: f64,
    /// Second pull, every layer from the cache.
    pub warm_pull_ms: f64,
    pub skopeo_copy_ms: f64,
    pub umoci_unpack_ms: f64,
    pub mkfs_ms: f64,
    /// skopeo + umoci + mkfs.
    pub baseline_ms: f64,
    /// `first_pull_ms / baseline_ms`: below 1 banger is faster.
    pub first_pull_over_baseline: f64,
}

/// Catalog install of a bundle served over HTTP on loopback: banger's pull
/// (download, sha256, unpack) against `curl | zstd -d | tar x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CatalogInstallBench {
    /// Size of the compressed bundle.
    pub bundle_bytes: u64,
    /// Size of what it unpacks to (root file system and work seed).
    pub unpacked_bytes: u64,
    pub banger_install_ms: f64,
    pub raw_install_ms: f64,
    /// Unpacked MiB per second.
    pub banger_mib_per_s: f64,
    pub raw_mib_per_s: f64,
    /// `banger_install_ms / raw_install_ms`.
    pub banger_over_raw: f64,
}

/// Result of `POST /v1/bench/image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageBench {
    pub reference: String,
    /// Size of the imported root file system.
    pub rootfs_bytes: u64,
    pub oci: OciImportBench,
    pub catalog: CatalogInstallBench,
}

/// One line of the `POST /v1/bench/image` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageBenchEvent {
    Progress(Progress),
    Warning(Warning),
    Done(ImageBench),
    Error(ApiError),
}

impl OperationEvent for ImageBenchEvent {
    type Output = ImageBench;
    fn outcome(&self) -> Option<Result<ImageBench, ApiError>> {
        match self {
            Self::Done(b) => Some(Ok(b.clone())),
            Self::Error(e) => Some(Err(e.clone())),
            Self::Progress(_) | Self::Warning(_) => None,
        }
    }
}

impl Client {
    /// Runs the image benchmark in the daemon.
    pub async fn bench_image(
        &self,
        req: &ImageBenchRequest,
        on_event: impl FnMut(&ImageBenchEvent),
    ) -> Result<ImageBench, ClientError> {
        self.operation(routes::BENCH_IMAGE, req, on_event).await
    }
}
