//! `banger bench image`: an OCI import and a catalog install, each timed
//! side by side with the usual tool chain in the same run (JSON), in a
//! scratch directory under the user's banger cache directory, removed
//! afterwards.
//!
//! - OCI: banger's import ([`banger_oci::pull_to_ext4`], the code behind
//!   `image pull REF`) into an empty layer cache, then again from the now
//!   warm cache, then `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`.
//! - Catalog: the imported root file system is bundled
//!   ([`banger_catalog::bundle_image`], as `image bundle` does), served over
//!   HTTP on 127.0.0.1 by this process, and installed by banger's catalog
//!   pull ([`banger_catalog::pull_image`]: download, sha256, unpack), then by
//!   `curl | zstd -d | tar -x`.
//!
//! Both run here, in the `banger` process, with the same code the daemon
//! runs for `image pull`: no daemon is needed (nor registered images, a
//! kernel, or the default image), and nothing is left in the daemon's
//! store or caches. Registry credentials are this user's Docker config
//! (a system install's daemon reads its owner's).

use crate::util::ms;
use anyhow::{Context, anyhow};
use banger_ext4::{find_tool, inode_count, mkfs_tree, rootfs_size, run_tool};
use clap::Args;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ImageBenchArgs {
    /// OCI reference of the image (registry/repo:tag), pulled from its
    /// registry (plain HTTP is used for loopback registries).
    #[arg(long)]
    reference: String,
}

/// OCI import: banger's pull against `skopeo copy` + `umoci unpack` +
/// `mkfs.ext4 -d`, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// The report of `banger bench image`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageBench {
    pub reference: String,
    /// Size of the imported root file system.
    pub rootfs_bytes: u64,
    pub oci: OciImportBench,
    pub catalog: CatalogInstallBench,
}

pub async fn run(a: ImageBenchArgs) -> anyhow::Result<i32> {
    let reference = a.reference.trim().to_string();
    banger_oci::parse_reference(&reference)?;
    // The daemon's config names the agent it injects; the scratch space is
    // this user's own cache (a system install's is not theirs to write).
    let config = banger_config::Config::load(&banger_client::connect::daemon_paths()?)?;
    let agent = agent_binary(config.agent_path.as_deref())?;
    let work = banger_config::Paths::from_env()?
        .cache_dir
        .join(format!("bench-image-{:016x}", rand::random::<u64>()));
    let cancel = CancellationToken::new();
    let result = tokio::select! {
        r = bench_in(&reference, &agent, &work, &cancel) => r,
        _ = tokio::signal::ctrl_c() => {
            cancel.cancel();
            Err(anyhow!("interrupted"))
        }
    };
    if let Err(e) = tokio::fs::remove_dir_all(&work).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("bench: {} not removed: {e}", work.display());
    }
    crate::util::print_json(&result?)?;
    Ok(0)
}

/// The guest agent an import injects, found as the daemon finds it:
/// `agent_path` in config.toml, `BANGER_AGENT`, or next to this binary.
fn agent_binary(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("BANGER_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating banger")?;
    let beside = exe.with_file_name("banger-agent");
    anyhow::ensure!(
        beside.is_file(),
        "banger-agent not found next to {}: build it (make build) or set agent_path in config.toml",
        exe.display()
    );
    Ok(beside)
}

async fn bench_in(
    reference: &str,
    agent: &Path,
    work: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<ImageBench> {
    eprintln!(
        "bench: oci: importing {reference}: banger (cold and warm cache), then skopeo + umoci + mkfs.ext4"
    );
    let opts = banger_oci::PullOptions {
        reference: reference.to_string(),
        // An empty cache: the first pull downloads like skopeo does.
        cache_dir: work.join("cache"),
        out_dir: work.join("unused"),
        payload: banger_image::GuestPayload::new(agent.to_path_buf()),
        min_size: 0,
        auth: banger_oci::Credentials::DockerConfig,
        progress: None,
        cancel: cancel.clone(),
    };
    let oci_dir = work.join("oci");
    let r = oci_import(&opts, &oci_dir)
        .await
        .context("OCI import bench")?;
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
    eprintln!("bench: catalog: bundling the imported root file system, serving it on 127.0.0.1");
    let catalog = catalog_install(&rootfs, work, cancel).await?;
    Ok(ImageBench {
        reference: reference.to_string(),
        rootfs_bytes,
        oci,
        catalog,
    })
}

/// Wall-clock times of one image import, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OciTimes {
    /// The first pull (fills the empty cache).
    first_pull: Duration,
    /// A second pull, every layer from the cache.
    warm_pull: Duration,
    /// `skopeo copy` to an OCI layout.
    skopeo_copy: Duration,
    /// `umoci unpack --rootless`.
    umoci_unpack: Duration,
    /// `mkfs.ext4 -d` of the unpacked rootfs.
    mkfs: Duration,
}

impl OciTimes {
    /// skopeo + umoci + mkfs.
    fn baseline(&self) -> Duration {
        self.skopeo_copy + self.umoci_unpack + self.mkfs
    }
}

/// Runs `tool args` (found on PATH) to its end; returns the wall time.
async fn timed_tool(
    tool: &'static str,
    args: Vec<OsString>,
    cancel: &CancellationToken,
) -> anyhow::Result<Duration> {
    let path =
        find_tool(tool).with_context(|| format!("{tool} not found (apt-get install {tool})"))?;
    let start = Instant::now();
    run_tool(tool, &path, args, &[], &|_| {}, cancel).await?;
    Ok(start.elapsed())
}

/// Imports `opts.reference` twice with [`banger_oci::pull_to_ext4`] (into
/// `work/pull-1` and `work/pull-2`; `opts.out_dir` is ignored), then once
/// with skopeo, umoci and mkfs.ext4 under `work/baseline`.
async fn oci_import(opts: &banger_oci::PullOptions, work: &Path) -> anyhow::Result<OciTimes> {
    let cancel = &opts.cancel;
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let mut o = opts.clone();
    o.out_dir = work.join("pull-1");
    let start = Instant::now();
    banger_oci::pull_to_ext4(o.clone()).await?;
    let first_pull = start.elapsed();
    o.out_dir = work.join("pull-2");
    let start = Instant::now();
    banger_oci::pull_to_ext4(o).await?;
    let warm_pull = start.elapsed();

    let reference = banger_oci::parse_reference(&opts.reference)?;
    let base = work.join("baseline");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let layout = base.join("layout");
    let args = skopeo_args(
        reference.resolve_registry(),
        &reference.whole(),
        &format!("oci:{}:bench", layout.display()),
    );
    let skopeo_copy = timed_tool("skopeo", args, cancel).await?;
    let bundle = base.join("bundle");
    let umoci_unpack = timed_tool(
        "umoci",
        vec![
            "unpack".into(),
            "--rootless".into(),
            "--image".into(),
            format!("{}:bench", layout.display()).into(),
            bundle.clone().into(),
        ],
        cancel,
    )
    .await?;
    let tree = bundle.join("rootfs");
    let usage = banger_image::tree_usage(&tree)?;
    let size = rootfs_size(usage.bytes).max(opts.min_size);
    let image = base.join(banger_oci::ROOTFS_FILE);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", image.display()))?;
    let inodes = inode_count(usage.inodes, size);
    let start = Instant::now();
    mkfs_tree(&tree, &image, "rootfs", inodes, &|_| {}, cancel).await?;
    let mkfs = start.elapsed();
    Ok(OciTimes {
        first_pull,
        warm_pull,
        skopeo_copy,
        umoci_unpack,
        mkfs,
    })
}

/// `skopeo copy` of `whole` (a full reference) from `registry` to `dest`;
/// a loopback registry is plain HTTP, as banger's pull treats it.
fn skopeo_args(registry: &str, whole: &str, dest: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["copy".into(), "--quiet".into()];
    if banger_oci::is_loopback(registry) {
        args.push("--src-tls-verify=false".into());
    }
    args.push(format!("docker://{whole}").into());
    args.push(dest.into());
    args
}

/// Bundles `rootfs`, serves the bundle on loopback and times both installs.
async fn catalog_install(
    rootfs: &Path,
    work: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<CatalogInstallBench> {
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
    .context("bundling for the bench")?;
    let data: Arc<[u8]> = tokio::fs::read(&bundle.path)
        .await
        .with_context(|| format!("reading {}", bundle.path.display()))?
        .into();
    let server = tokio::spawn(serve_bytes(listener, data));

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
    .context("catalog install bench")?;
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

/// Answers every HTTP request on `listener` with `data` (whatever the path
/// asked), one connection at a time, until the task is aborted.
async fn serve_bytes(listener: tokio::net::TcpListener, data: Arc<[u8]>) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let data = data.clone();
        tokio::spawn(async move {
            // The request head, up to its blank line; its content does not
            // matter (one file is served).
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            );
            if conn.write_all(reply.as_bytes()).await.is_ok() {
                let _ = conn.write_all(&data).await;
                let _ = conn.shutdown().await;
            }
        });
    }
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

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// MiB per second of `bytes` in `d`.
fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    ratio(bytes as f64 / f64::from(1 << 20), d.as_secs_f64())
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
        anyhow::ensure!(
            st.success(),
            "{tool} failed ({st}) in curl | zstd -d | tar -x of {url}"
        );
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

    #[test]
    fn the_baseline_is_the_three_tools() {
        let s = Duration::from_secs;
        let t = OciTimes {
            first_pull: s(9),
            warm_pull: s(1),
            skopeo_copy: s(2),
            umoci_unpack: s(3),
            mkfs: s(4),
        };
        assert_eq!(t.baseline(), s(9));
    }

    #[test]
    fn skopeo_reads_loopback_registries_over_plain_http() {
        let a = skopeo_args("127.0.0.1:5000", "127.0.0.1:5000/bb:1", "oci:/x:bench");
        assert_eq!(
            a,
            [
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "docker://127.0.0.1:5000/bb:1",
                "oci:/x:bench"
            ]
            .map(OsString::from)
        );
        let a = skopeo_args("ghcr.io", "ghcr.io/o/r:t", "oci:/x:bench");
        assert!(!a.iter().any(|s| s == "--src-tls-verify=false"), "{a:?}");
    }

    /// The bundle server answers any path with the whole file, as curl and
    /// banger's catalog pull expect of a static file server.
    #[tokio::test]
    async fn the_bundle_server_serves_the_file() {
        let l = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(serve_bytes(l, Arc::from(&b"bundle bytes"[..])));
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /x.tar.zst HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("send");
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.expect("read");
        server.abort();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("Content-Length: 12\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nbundle bytes"), "{reply}");
    }
}
