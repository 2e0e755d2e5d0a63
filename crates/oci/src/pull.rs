//! [`pull_to_ext4`]: reference in, verified ext4 root file system out.

use crate::auth::{Credentials, resolve as resolve_credentials};
use crate::cache::BlobCache;
use crate::inject::{INSTALL_SSHD_PATH, inject};
use crate::registry::{ImageConfig, client, parse_reference, resolve};
use crate::unpack::{Tree, open_blob};
use crate::{OciError, blocking, ext4, free_space};
use banger_image::Staging;
use banger_image::customize::{AGENT_BINARY_PATH, AGENT_MODULES_CONF_PATH, GuestPayload, rel};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// File name of the root file system inside the output directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// File name of the JSON description of the import inside the output directory.
pub const IMAGE_INFO_FILE: &str = "oci-image.json";

/// Lowest expansion assumed for a compressed layer when checking free space
/// before unpacking (the tree, then the ext4 image of about the same size).
const EXPANSION: u64 = 2;

/// Space kept free on the output file system.
const OUT_RESERVE: u64 = 64 << 20;

/// Progress of a pull, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The reference resolved to this image manifest.
    Resolved {
        digest: String,
        layers: usize,
        total_bytes: u64,
    },
    /// Bytes of layer `index` (0-based) so far; `cached` when it came from the cache.
    Layer {
        index: usize,
        digest: String,
        done: u64,
        total: u64,
        cached: bool,
    },
    /// A phase began: `resolve`, `download`, `unpack`, `inject`, `mkfs`, `done`.
    Phase { name: &'static str, message: String },
    /// A line of tool output (mkfs, e2fsck), for verbose logs.
    Line(String),
    /// Something the user should know (e.g. credentials that were skipped).
    Note(String),
}

/// Progress callback.
pub type ProgressFn = Arc<dyn Fn(PullProgress) + Send + Sync>;

/// What to pull, and where to.
#[derive(Clone)]
pub struct PullOptions {
    /// `registry/repo:tag` or `registry/repo@sha256:...`.
    pub reference: String,
    /// The layer cache goes to `cache_dir/oci/`.
    pub cache_dir: PathBuf,
    /// The image directory to create (must not exist): `rootfs.ext4` and
    /// `oci-image.json`. It is written in a staging directory beside it.
    pub out_dir: PathBuf,
    /// The agent, its unit (installed when the image has systemd) and its
    /// module list.
    pub payload: GuestPayload,
    /// The root file system is at least this big (sparse).
    pub min_size: u64,
    /// Registry credentials.
    pub auth: Credentials,
    pub progress: Option<ProgressFn>,
    pub cancel: CancellationToken,
}

/// What a pull did, to tell what came from the network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PullReport {
    pub layers: usize,
    /// Layers downloaded (the others came from the cache).
    pub layers_downloaded: usize,
    pub layers_cached: usize,
    /// Bytes downloaded (layers and config).
    pub bytes_downloaded: u64,
    /// Inode changes debugfs made (owners, modes, device nodes).
    pub debugfs_changes: usize,
    /// Things the user should know, e.g. skipped credential helpers.
    pub notes: Vec<String>,
    #[serde(skip)]
    pub download_time: Duration,
    #[serde(skip)]
    pub unpack_time: Duration,
    #[serde(skip)]
    pub mkfs_time: Duration,
}

/// A finished import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PulledImage {
    /// The output directory.
    pub dir: PathBuf,
    /// `dir/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// The reference as given, fully qualified.
    pub reference: String,
    /// Digest of the image manifest (linux/amd64 entry of an index).
    pub digest: String,
    /// Size of the root file system file (apparent; it is sparse).
    pub size_bytes: u64,
    /// `ID=` of the image's os-release.
    pub os_id: Option<String>,
    pub has_systemd: bool,
    /// Whether the image had sshd; without it a first-boot unit or inittab
    /// line installs openssh-server.
    pub has_sshd: bool,
    pub report: PullReport,
}

/// Pulls `opts.reference` and writes its root file system to `opts.out_dir`.
/// A failed or cancelled pull leaves no output directory and no unverified
/// blob in the cache.
pub async fn pull_to_ext4(opts: PullOptions) -> Result<PulledImage, OciError> {
    let emit = |p: PullProgress| {
        if let Some(f) = &opts.progress {
            f(p)
        }
    };
    let phase = |name: &'static str, message: String| emit(PullProgress::Phase { name, message });
    let cancel = &opts.cancel;
    let checkpoint = || {
        if cancel.is_cancelled() {
            Err(OciError::Cancelled)
        } else {
            Ok(())
        }
    };
    let mut report = PullReport::default();

    // Everything local is checked before the network.
    let reference = parse_reference(&opts.reference)?;
    if !opts.payload.agent_binary.is_file() {
        return Err(
            banger_image::ImageError::AgentMissing(opts.payload.agent_binary.clone()).into(),
        );
    }
    banger_image::customize::InstallSection::parse(&opts.payload.agent_unit)?;
    if std::fs::symlink_metadata(&opts.out_dir).is_ok() {
        return Err(OciError::Exists(opts.out_dir.clone()));
    }
    let out_parent = opts
        .out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let out_name = opts
        .out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| OciError::Exists(opts.out_dir.clone()))?;
    std::fs::create_dir_all(&out_parent)
        .map_err(OciError::io(format!("creating {}", out_parent.display())))?;

    let registry = reference.resolve_registry().to_string();
    let (auth, note) = resolve_credentials(&opts.auth, &registry).await?;
    if let Some(n) = note {
        emit(PullProgress::Note(n.clone()));
        report.notes.push(n);
    }

    phase("resolve", format!("resolving {}", reference.whole()));
    let client = client(&reference);
    let resolved = tokio::select! {
        r = resolve(&client, &reference, &auth) => r?,
        _ = cancel.cancelled() => return Err(OciError::Cancelled),
    };
    let total: u64 = resolved
        .layers
        .iter()
        .map(|l| u64::try_from(l.size).unwrap_or(0))
        .sum();
    emit(PullProgress::Resolved {
        digest: resolved.digest.clone(),
        layers: resolved.layers.len(),
        total_bytes: total,
    });
    report.layers = resolved.layers.len();

    let cache = BlobCache::new(&opts.cache_dir);
    cache.remove_stale_temporaries();
    let started = Instant::now();
    let no_progress = |_: u64, _: u64| {};
    if cache
        .ensure(&client, &reference, &resolved.config, &no_progress, cancel)
        .await?
    {
        report.bytes_downloaded += u64::try_from(resolved.config.size).unwrap_or(0);
    }
    let config_path = cache.blob_path(&resolved.config.digest)?;
    let config: ImageConfig = serde_json::from_slice(
        &std::fs::read(&config_path)
            .map_err(OciError::io(format!("reading {}", config_path.display())))?,
    )
    .map_err(|e| OciError::BadReference {
        reference: reference.whole(),
        reason: format!("image config {} is not valid: {e}", resolved.config.digest),
    })?;
    if config.os != "linux" || config.architecture != "amd64" {
        return Err(OciError::WrongPlatform {
            reference: reference.whole(),
            platform: format!("{}/{}", config.os, config.architecture),
        });
    }

    phase(
        "download",
        format!("{} layers, {total} bytes", resolved.layers.len()),
    );
    for (index, layer) in resolved.layers.iter().enumerate() {
        checkpoint()?;
        let size = u64::try_from(layer.size).unwrap_or(0);
        let cached = cache.has(&layer.digest, size);
        let on_bytes = |done: u64, total: u64| {
            emit(PullProgress::Layer {
                index,
                digest: layer.digest.clone(),
                done,
                total,
                cached,
            })
        };
        if cache
            .ensure(&client, &reference, layer, &on_bytes, cancel)
            .await?
        {
            report.layers_downloaded += 1;
            report.bytes_downloaded += size;
        } else {
            report.layers_cached += 1;
        }
    }
    report.download_time = started.elapsed();

    // Unpacking: the tree, then the image of about the same size.
    let available = free_space(&out_parent)?;
    let needed = total
        .saturating_mul(EXPANSION * 2)
        .saturating_add(OUT_RESERVE);
    if needed > available {
        return Err(OciError::NoSpace {
            path: out_parent.clone(),
            what: format!(
                "unpacking {} ({total} compressed bytes) and its ext4 image",
                reference.whole()
            ),
            needed,
            available,
        });
    }
    let staging = Staging::create(&out_parent, &format!("oci-{out_name}"))?;
    let staging_dir = staging.path().to_path_buf();
    let tree_root = staging_dir.join("root");
    let budget = available.saturating_sub(OUT_RESERVE) / 2;

    phase(
        "unpack",
        format!("unpacking {} layers", resolved.layers.len()),
    );
    let started = Instant::now();
    let layer_paths = resolved
        .layers
        .iter()
        .map(|l| Ok((l.digest.clone(), cache.blob_path(&l.digest)?)))
        .collect::<Result<Vec<_>, OciError>>()?;
    let tree = {
        let (tree_root, cancel) = (tree_root.clone(), cancel.clone());
        blocking(move || {
            let mut tree = Tree::create(&tree_root, budget)?;
            for (digest, path) in &layer_paths {
                tree.apply_layer(digest, open_blob(path)?, &cancel)?;
            }
            tree.finish()?;
            Ok(tree)
        })
        .await?
    };
    report.unpack_time = started.elapsed();
    checkpoint()?;

    phase("inject", "adding the banger agent".into());
    let (tree, info) = {
        let payload = opts.payload.clone();
        blocking(move || {
            let mut tree = tree;
            let info = inject(tree.root(), &payload)?;
            // What banger wrote is root-owned with the mode it was given,
            // whatever a layer recorded at that path.
            for p in [
                AGENT_BINARY_PATH,
                AGENT_MODULES_CONF_PATH,
                INSTALL_SSHD_PATH,
                "/etc/inittab",
                "/etc/systemd/system/banger-agent.service",
                "/etc/systemd/system/banger-install-sshd.service",
            ] {
                tree.forget_path(rel(p));
            }
            Ok((tree, info))
        })
        .await?
    };
    checkpoint()?;

    let rootfs = staging_dir.join(ROOTFS_FILE);
    phase(
        "mkfs",
        format!("writing {}", opts.out_dir.join(ROOTFS_FILE).display()),
    );
    let started = Instant::now();
    let on_line = |l: String| emit(PullProgress::Line(l));
    let (size, changes) = ext4::make_ext4(&tree, &rootfs, opts.min_size, &on_line, cancel).await?;
    report.debugfs_changes = changes;
    report.mkfs_time = started.elapsed();
    {
        let tree_root = tree_root.clone();
        blocking(move || banger_image::remove_tree(&tree_root).map_err(OciError::from)).await?;
    }
    checkpoint()?;

    let dest_rootfs = opts.out_dir.join(ROOTFS_FILE);
    let pulled = PulledImage {
        dir: opts.out_dir.clone(),
        rootfs: dest_rootfs,
        reference: reference.whole(),
        digest: resolved.digest.clone(),
        size_bytes: size,
        os_id: info.os_id.clone(),
        has_systemd: info.has_systemd,
        has_sshd: info.has_sshd,
        report,
    };
    let info_path = staging_dir.join(IMAGE_INFO_FILE);
    let json = serde_json::to_vec_pretty(&pulled).map_err(|e| OciError::Io {
        context: format!("writing {}", info_path.display()),
        source: e.into(),
    })?;
    std::fs::write(&info_path, json)
        .map_err(OciError::io(format!("writing {}", info_path.display())))?;
    if std::fs::symlink_metadata(&opts.out_dir).is_ok() {
        return Err(OciError::Exists(opts.out_dir.clone()));
    }
    std::fs::rename(&staging_dir, &opts.out_dir).map_err(OciError::io(format!(
        "moving the image into {}",
        opts.out_dir.display()
    )))?;
    staging.keep();
    std::fs::File::open(&out_parent)
        .and_then(|d| d.sync_all())
        .map_err(OciError::io(format!("flushing {}", out_parent.display())))?;
    phase("done", format!("{} ready", pulled.rootfs.display()));
    Ok(pulled)
}
