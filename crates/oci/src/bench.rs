//! Timing an import against the usual tool chain, for `banger bench image`:
//! [`pull_to_ext4`] from a warm cache versus `skopeo copy` + `umoci unpack`
//! + `mkfs.ext4 -d` of the same image.

use crate::pull::{PullOptions, pull_to_ext4};
use crate::registry::{is_loopback, parse_reference};
use crate::{OciError, ROOTFS_FILE};
use banger_ext4::{find_tool, inode_count, mkfs_tree, rootfs_size, run_tool};
use banger_image::{ImageError, tree_usage};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Wall-clock times of one image import, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchResult {
    /// The first pull (fills the cache; downloads what was not cached).
    pub first_pull: Duration,
    /// A second pull, every layer from the cache.
    pub warm_pull: Duration,
    /// `skopeo copy` to an OCI layout.
    pub skopeo_copy: Duration,
    /// `umoci unpack --rootless`.
    pub umoci_unpack: Duration,
    /// `mkfs.ext4 -d` of the unpacked rootfs.
    pub mkfs: Duration,
}

impl BenchResult {
    /// skopeo + umoci + mkfs.
    pub fn baseline(&self) -> Duration {
        self.skopeo_copy + self.umoci_unpack + self.mkfs
    }
}

async fn timed_tool(
    tool: &'static str,
    args: Vec<OsString>,
    cancel: &CancellationToken,
) -> Result<Duration, OciError> {
    let path = find_tool(tool).ok_or(ImageError::ToolMissing {
        tool,
        package: tool,
    })?;
    let start = Instant::now();
    run_tool(tool, &path, args, &[], &|_| {}, cancel)
        .await
        .map_err(ImageError::from)?;
    Ok(start.elapsed())
}

/// Imports `opts.reference` twice with [`pull_to_ext4`] (into
/// `work/pull-1` and `work/pull-2`; `opts.out_dir` is ignored), then once
/// with skopeo, umoci and mkfs.ext4 under `work/baseline`. `work` must be
/// empty or missing.
pub async fn bench_image(opts: &PullOptions, work: &Path) -> Result<BenchResult, OciError> {
    let cancel = &opts.cancel;
    std::fs::create_dir_all(work).map_err(OciError::io(format!("creating {}", work.display())))?;
    let mut o = opts.clone();
    o.out_dir = work.join("pull-1");
    let start = Instant::now();
    pull_to_ext4(o.clone()).await?;
    let first_pull = start.elapsed();
    o.out_dir = work.join("pull-2");
    let start = Instant::now();
    pull_to_ext4(o).await?;
    let warm_pull = start.elapsed();

    let reference = parse_reference(&opts.reference)?;
    let base = work.join("baseline");
    std::fs::create_dir_all(&base).map_err(OciError::io(format!("creating {}", base.display())))?;
    let layout = base.join("layout");
    let mut args: Vec<OsString> = vec!["copy".into(), "--quiet".into()];
    if is_loopback(reference.resolve_registry()) {
        args.push("--src-tls-verify=false".into());
    }
    args.push(format!("docker://{}", reference.whole()).into());
    args.push(format!("oci:{}:bench", layout.display()).into());
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
    let usage = tree_usage(&tree)?;
    let size = rootfs_size(usage.bytes).max(opts.min_size);
    let image = base.join(ROOTFS_FILE);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .map_err(OciError::io(format!("creating {}", image.display())))?;
    let inodes = inode_count(usage.inodes, size);
    let start = Instant::now();
    mkfs_tree(&tree, &image, "rootfs", inodes, &|_| {}, cancel).await?;
    let mkfs = start.elapsed();
    Ok(BenchResult {
        first_pull,
        warm_pull,
        skopeo_copy,
        umoci_unpack,
        mkfs,
    })
}
