//! `banger bench image` (`POST /internal/bench/image`, routed by
//! `http::internal`): an OCI import and a catalog install, each timed side
//! by side with the usual tool chain in the same run, in a scratch directory
//! removed afterwards.
//!
//! - OCI: [`banger_oci::bench::bench_image`] (banger's pull with a cold and a
//!   warm cache, then `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`).
//! - Catalog: the imported root file system is bundled, served over HTTP
//!   on 127.0.0.1 by this daemon, and installed by banger's catalog pull
//!   (download, sha256, unpack), then by `curl | zstd -d | tar -x`.

use crate::images::PullError;
use crate::net::NetError;
use crate::{Daemon, ErrorKind};
use anyhow::{Context, anyhow};
use banger_api::bench::{CatalogInstallBench, ImageBench, ImageBenchRequest, OciImportBench};
use banger_api::{ProgressSink, Step};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Why a daemon-side benchmark (`/internal/bench/*`) did not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Networking is not started.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The image reference is not valid.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// A timed step failed; the context says which.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl BenchError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BenchError::Net(e) => e.kind(),
            BenchError::Pull(e) => e.kind(),
            BenchError::Failed(_) => ErrorKind::Failed,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// MiB per second of `bytes` in `d`.
fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    ratio(bytes as f64 / f64::from(1 << 20), d.as_secs_f64())
}

impl Daemon {
    pub(crate) async fn bench_image(
        self: &Arc<Self>,
        req: &ImageBenchRequest,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageBench, BenchError> {
        let reference = req.reference.trim();
        banger_oci::parse_reference(reference).map_err(PullError::from)?;
        let work = self
            .paths
            .cache_dir
            .join(format!("bench-image-{:016x}", rand::random::<u64>()));
        let result = self.bench_in(reference, &work, progress, cancel).await;
        if let Err(e) = tokio::fs::remove_dir_all(&work).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %work.display(), error = %e, "bench directory not removed");
        }
        result
    }

    async fn bench_in(
        self: &Arc<Self>,
        reference: &str,
        work: &Path,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageBench, BenchError> {
        progress.phase(
            Step::Oci,
            format!(
                "importing {reference}: banger (cold and warm cache), then skopeo + umoci + mkfs.ext4"
            ),
        );
        let opts = banger_oci::PullOptions {
            reference: reference.to_string(),
            // An empty cache: the first pull downloads like skopeo does.
            cache_dir: work.join("cache"),
            out_dir: work.join("unused"),
            payload: banger_image::GuestPayload::new(self.agent_binary()?),
            min_size: 0,
            auth: banger_oci::Credentials::DockerConfig,
            progress: None,
            cancel: cancel.clone(),
        };
        let oci_dir = work.join("oci");
        let r = banger_oci::bench::bench_image(&opts, &oci_dir)
            .await
            .map_err(|e| BenchError::Failed(anyhow::Error::new(e).context("OCI import bench")))?;
        let rootfs = oci_dir.join("pull-1").join(banger_oci::ROOTFS_FILE);
        let rootfs_bytes = std::fs::metadata(&rootfs)
            .with_context(|| format!("reading {}", rootfs.display()))?
            .len();
        let oci = OciImportBench {
            first_pull_ms: ms(r.first_pull),
            warm_pull_ms: ms(r.warm_pull),
            skopeo_copy_ms: ms(r.skopeo_copy),
            umoci_unpack_ms: ms(r.umoci_unpack),
            mkfs_ms: ms(r.mkfs),
            baseline_ms: ms(r.baseline()),
            first_pull_over_baseline: ratio(ms(r.first_pull), ms(r.baseline())),
        };

        progress.phase(
            Step::Catalog,
            "bundling the imported root file system and serving it on 127.0.0.1",
        );
        let catalog = catalog_bench(&rootfs, work, cancel).await?;
        Ok(ImageBench {
            reference: reference.to_string(),
            rootfs_bytes,
            oci,
            catalog,
        })
    }
}

/// Bundles `rootfs`, serves the bundle on loopback and times both installs.
async fn catalog_bench(
    rootfs: &Path,
    work: &Path,
    cancel: &CancellationToken,
) -> Result<CatalogInstallBench, BenchError> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding a loopback port for the bundle server")?;
    let port = listener
        .local_addr()
        .context("bundle server address")?
        .port();
    let bundle = banger_catalog::bundle_image(
        &banger_catalog::ImageBundleRequest {
            name: "bench-image".into(),
            description: "banger bench image".into(),
            kernel: "bench-kernel".into(),
            rootfs: rootfs.to_path_buf(),
            work_seed: None,
            out_dir: work.join("bundle"),
            base_url: format!("http://127.0.0.1:{port}/"),
        },
        cancel,
    )
    .await
    .map_err(|e| BenchError::Failed(anyhow::Error::new(e).context("bundling for the bench")))?;
    let server = serve_file(listener, bundle.path.clone()).await?;

    let opts = banger_catalog::PullOptions {
        progress: Arc::new(|_| {}),
        cancel: cancel.clone(),
    };
    let start = Instant::now();
    let pulled = banger_catalog::pull_image(
        &bundle.entry,
        &work.join("catalog-cache"),
        &work.join("catalog-images"),
        &opts,
    )
    .await
    .map_err(|e| BenchError::Failed(anyhow::Error::new(e).context("catalog install bench")))?;
    let banger = start.elapsed();
    let unpacked_bytes = dir_bytes(&pulled.dir);

    let raw_dir = work.join("raw");
    std::fs::create_dir_all(&raw_dir).with_context(|| format!("creating {}", raw_dir.display()))?;
    let url = bundle.entry.url.clone();
    let raw = tokio::task::spawn_blocking(move || curl_zstd_tar(&url, &raw_dir))
        .await
        .map_err(|e| anyhow!("bench worker: {e}"))??;
    server.abort();
    Ok(CatalogInstallBench {
        bundle_bytes: bundle.entry.size,
        unpacked_bytes,
        banger_install_ms: ms(banger),
        raw_install_ms: ms(raw),
        banger_mib_per_s: mib_per_s(unpacked_bytes, banger),
        raw_mib_per_s: mib_per_s(unpacked_bytes, raw),
        banger_over_raw: ratio(ms(banger), ms(raw)),
    })
}

/// Serves `file` (whatever the path asked) until the task is aborted.
async fn serve_file(
    listener: tokio::net::TcpListener,
    file: PathBuf,
) -> Result<tokio::task::JoinHandle<()>, BenchError> {
    let data = bytes::Bytes::from(
        tokio::fs::read(&file)
            .await
            .with_context(|| format!("reading {}", file.display()))?,
    );
    let app = axum::Router::new().fallback(move || {
        let data = data.clone();
        async move { data }
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "bench bundle server stopped");
        }
    }))
}

/// Apparent size of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `curl -fsS URL | zstd -d | tar -x -C dir`, as three processes joined by
/// pipes; returns the wall time.
fn curl_zstd_tar(url: &str, dir: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut curl = Command::new("curl")
        .args(["-fsS", "--", url])
        .stdout(Stdio::piped())
        .spawn()
        .context("running curl (apt-get install curl)")?;
    let curl_out = curl.stdout.take().context("curl's stdout")?;
    let mut zstd = Command::new("zstd")
        .args(["-d", "-q", "-c"])
        .stdin(Stdio::from(curl_out))
        .stdout(Stdio::piped())
        .spawn()
        .context("running zstd (apt-get install zstd)")?;
    let zstd_out = zstd.stdout.take().context("zstd's stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .stdin(Stdio::from(zstd_out))
        .status()
        .context("running tar")?;
    let z = zstd.wait().context("waiting for zstd")?;
    let c = curl.wait().context("waiting for curl")?;
    let elapsed = start.elapsed();
    for (tool, st) in [("curl", c), ("zstd", z), ("tar", tar)] {
        if !st.success() {
            anyhow::bail!("{tool} failed ({st}) in curl | zstd -d | tar -x of {url}");
        }
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_ratios() {
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert_eq!(mib_per_s(4 << 20, Duration::from_secs(2)), 2.0);
        assert_eq!(mib_per_s(1, Duration::ZERO), 0.0);
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }

    #[test]
    fn dir_bytes_counts_files_only() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(t.path().join("a"), [0u8; 10]).expect("a");
        std::fs::create_dir(t.path().join("d")).expect("d");
        std::fs::write(t.path().join("d/b"), [0u8; 5]).expect("b");
        assert_eq!(dir_bytes(t.path()), 10);
        assert_eq!(dir_bytes(&t.path().join("missing")), 0);
    }
}
