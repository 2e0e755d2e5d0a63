//! Pulling a catalog entry into the image or kernel store.

use crate::bundle::bundle_file_name;
use crate::download::{Source, VerifiedPart, fetch};
use crate::extract::extract;
use crate::index::{ImageEntry, KernelEntry};
use crate::manifest::{
    CONFIG_FILE, INITRD_FILE, ImageManifest, KERNEL_FILE, KernelManifest, MANIFEST_FILE,
    MODULES_FILE, Manifest, ROOTFS_FILE, VMLINUX_FILE, WORK_SEED_FILE, parse_manifest,
};
use crate::names::{NAME_RULE, is_sha256_hex, is_valid_name};
use crate::{CatalogError, blocking};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Where a pull is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Bundle bytes on disk (a resumed download starts above 0).
    Download { done: u64, total: u64 },
    /// Bytes of the bundle's files unpacked into the store.
    Extract { done: u64, total: u64 },
}

/// Receives [`Progress`]; called often, so keep it cheap.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    pub progress: ProgressFn,
    /// Cancelling stops the pull; a partial download is kept for the next try.
    pub cancel: CancellationToken,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            progress: Arc::new(|_| {}),
            cancel: CancellationToken::new(),
        }
    }
}

/// A pulled image: `images_dir/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    pub dir: PathBuf,
    /// The ext4 root file system.
    pub rootfs: PathBuf,
    /// The ext4 `/root` seed of new VMs' work disks, if the bundle has one.
    pub work_seed: Option<PathBuf>,
    /// Size of the root file system.
    pub size_bytes: u64,
    pub manifest: ImageManifest,
}

/// A pulled kernel: `kernels_dir/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledKernel {
    pub dir: PathBuf,
    /// bzImage, for QEMU.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Uncompressed ELF, for Firecracker.
    pub vmlinux: Option<PathBuf>,
    /// The modules as a tar (paths under `lib/modules/<release>/`).
    pub modules: Option<PathBuf>,
    /// The kernel's build config.
    pub config: Option<PathBuf>,
    pub release: String,
    pub manifest: KernelManifest,
}

/// Downloads the bundle of `entry` (to `cache_dir`, resuming an earlier
/// attempt), verifies it and unpacks it into `images_dir/<name>/`. Fails
/// if that directory exists. On failure nothing is left in `images_dir`.
pub async fn pull_image(
    entry: &ImageEntry,
    cache_dir: &Path,
    images_dir: &Path,
    opts: &PullOptions,
) -> Result<PulledImage, CatalogError> {
    let target = Target {
        name: &entry.name,
        url: &entry.url,
        sha256: &entry.sha256,
        size: entry.size,
        arch: &entry.arch,
    };
    let kernel = entry.kernel.clone();
    let check = move |m: &ImageManifest| {
        if m.kernel == kernel {
            Ok(())
        } else {
            Err(format!(
                "it boots kernel {:?}, the catalog entry says {kernel:?}",
                m.kernel
            ))
        }
    };
    let (dir, manifest) = pull(&target, check, cache_dir, images_dir, opts).await?;
    Ok(PulledImage::new(dir, manifest))
}

/// Downloads the bundle of `entry` (to `cache_dir`, resuming an earlier
/// attempt), verifies it and unpacks it into `kernels_dir/<name>/`. Fails
/// if that directory exists. On failure nothing is left in `kernels_dir`.
pub async fn pull_kernel(
    entry: &KernelEntry,
    cache_dir: &Path,
    kernels_dir: &Path,
    opts: &PullOptions,
) -> Result<PulledKernel, CatalogError> {
    let target = Target {
        name: &entry.name,
        url: &entry.url,
        sha256: &entry.sha256,
        size: entry.size,
        arch: &entry.arch,
    };
    let release = entry.release.clone();
    let check = move |m: &KernelManifest| {
        if m.release == release {
            Ok(())
        } else {
            Err(format!(
                "it holds kernel release {:?}, the catalog entry says {release:?}",
                m.release
            ))
        }
    };
    let (dir, manifest) = pull(&target, check, cache_dir, kernels_dir, opts).await?;
    Ok(PulledKernel::new(dir, manifest))
}

impl PulledImage {
    fn new(dir: PathBuf, manifest: ImageManifest) -> Self {
        let file = |n: &str| manifest.file(n).map(|_| dir.join(n));
        PulledImage {
            rootfs: dir.join(ROOTFS_FILE),
            work_seed: file(WORK_SEED_FILE),
            size_bytes: manifest.file(ROOTFS_FILE).map_or(0, |f| f.size),
            dir,
            manifest,
        }
    }

    /// The image pulled earlier into `images_dir/<name>/`, if it is
    /// complete: its manifest is there and every file it lists has the
    /// listed size. Lets the daemon adopt a pull that finished just before
    /// it crashed, instead of failing with [`CatalogError::Exists`].
    pub fn open(images_dir: &Path, name: &str) -> Option<PulledImage> {
        let (dir, m) = open_complete::<ImageManifest>(images_dir, name)?;
        Some(PulledImage::new(dir, m))
    }
}

impl PulledKernel {
    fn new(dir: PathBuf, manifest: KernelManifest) -> Self {
        let file = |n: &str| manifest.file(n).map(|_| dir.join(n));
        PulledKernel {
            kernel: dir.join(KERNEL_FILE),
            initrd: file(INITRD_FILE),
            vmlinux: file(VMLINUX_FILE),
            modules: file(MODULES_FILE),
            config: file(CONFIG_FILE),
            release: manifest.release.clone(),
            dir,
            manifest,
        }
    }

    /// The kernel pulled earlier into `kernels_dir/<name>/`, if complete;
    /// see [`PulledImage::open`].
    pub fn open(kernels_dir: &Path, name: &str) -> Option<PulledKernel> {
        let (dir, m) = open_complete::<KernelManifest>(kernels_dir, name)?;
        Some(PulledKernel::new(dir, m))
    }
}

fn open_complete<M: Manifest>(store_dir: &Path, name: &str) -> Option<(PathBuf, M)> {
    if !is_valid_name(name) {
        return None;
    }
    let dir = store_dir.join(name);
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    let m: M = parse_manifest(&bytes, name).ok()?;
    let complete = m.files().iter().all(|f| {
        std::fs::symlink_metadata(dir.join(&f.name))
            .is_ok_and(|md| md.is_file() && md.len() == f.size)
    });
    complete.then_some((dir, m))
}

struct Target<'a> {
    name: &'a str,
    url: &'a str,
    sha256: &'a str,
    size: u64,
    arch: &'a str,
}

/// Prefix of the staging directories pulls unpack into, inside the store.
/// Distinct from the image build's, whose cleanup must not touch ours.
const STAGING_PREFIX: &str = ".pull-";

async fn pull<M: Manifest>(
    t: &Target<'_>,
    check: impl Fn(&M) -> Result<(), String> + Send + Sync + 'static,
    cache_dir: &Path,
    store_dir: &Path,
    opts: &PullOptions,
) -> Result<(PathBuf, M), CatalogError> {
    if !is_valid_name(t.name) {
        return Err(CatalogError::Invalid(format!(
            "{} name {:?} is not valid: {NAME_RULE}",
            M::KIND,
            t.name
        )));
    }
    if !is_sha256_hex(t.sha256) {
        return Err(CatalogError::Invalid(format!(
            "{} {:?} has sha256 {:?}: expected 64 lowercase hex digits",
            M::KIND,
            t.name,
            t.sha256
        )));
    }
    if t.arch != std::env::consts::ARCH {
        return Err(CatalogError::WrongArch {
            kind: M::KIND,
            name: t.name.to_string(),
            arch: t.arch.to_string(),
            host: std::env::consts::ARCH,
        });
    }
    let dest = store_dir.join(t.name);
    if std::fs::symlink_metadata(&dest).is_ok() {
        return Err(CatalogError::Exists(dest));
    }
    std::fs::create_dir_all(store_dir).map_err(CatalogError::io(format!(
        "creating {}",
        store_dir.display()
    )))?;
    {
        let store_dir = store_dir.to_path_buf();
        blocking(move || remove_stale(&store_dir)).await?;
    }

    let part = cache_dir.join(format!("{}.part", bundle_file_name(t.name, t.sha256)));
    let src = Source {
        url: t.url,
        sha256: t.sha256,
        size: t.size,
    };
    let verified = fetch(&src, &part, &opts.progress, &opts.cancel).await?;
    tracing::info!(
        kind = M::KIND,
        name = t.name,
        url = t.url,
        "bundle downloaded and verified"
    );

    let job = {
        let (store_dir, dest, name) = (store_dir.to_path_buf(), dest.clone(), t.name.to_string());
        let (label, progress, cancel) = (
            t.url.to_string(),
            opts.progress.clone(),
            opts.cancel.clone(),
        );
        let bundle = verified.path.clone();
        move || -> Result<M, CatalogError> {
            let staging = Staging::create(&store_dir, &name)?;
            let m = extract::<M>(
                &bundle,
                &label,
                &name,
                &check,
                &staging.dir,
                &progress,
                &cancel,
            )?;
            staging.publish(&dest)?;
            Ok(m)
        }
    };
    match blocking(job).await {
        Ok(m) => {
            verified.remove();
            Ok((dest, m))
        }
        Err(e) => {
            finish_failed(verified, &e);
            Err(e)
        }
    }
}

/// A verified bundle that failed to unpack is kept when trying again can
/// work (cancelled, disk full) and deleted when its content is wrong.
fn finish_failed(verified: VerifiedPart, e: &CatalogError) {
    if matches!(e, CatalogError::BadBundle { .. }) {
        verified.remove();
    }
}

/// A pull's staging directory, locked while the pull lives (so a
/// concurrent pull's cleanup leaves it alone) and removed on drop unless
/// published.
struct Staging {
    dir: PathBuf,
    lock: Option<Flock<File>>,
}

impl Staging {
    fn create(store_dir: &Path, name: &str) -> Result<Staging, CatalogError> {
        let dir = store_dir.join(format!(
            "{STAGING_PREFIX}{name}-{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir(&dir)
            .map_err(CatalogError::io(format!("creating {}", dir.display())))?;
        let mut s = Staging { dir, lock: None };
        let f =
            File::open(&s.dir).map_err(CatalogError::io(format!("opening {}", s.dir.display())))?;
        s.lock = Some(
            Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| CatalogError::Io {
                context: format!("locking {}", s.dir.display()),
                source: e.into(),
            })?,
        );
        Ok(s)
    }

    /// Renames the directory to `dest` and makes that durable.
    fn publish(mut self, dest: &Path) -> Result<(), CatalogError> {
        if std::fs::symlink_metadata(dest).is_ok() {
            return Err(CatalogError::Exists(dest.to_path_buf()));
        }
        std::fs::rename(&self.dir, dest).map_err(CatalogError::io(format!(
            "moving {} into place",
            dest.display()
        )))?;
        self.dir = dest.to_path_buf();
        self.lock = None;
        let parent = dest.parent().unwrap_or(Path::new("."));
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(CatalogError::io(format!("flushing {}", parent.display())))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes staging directories of pulls that died (their lock is gone).
fn remove_stale(store_dir: &Path) -> Result<(), CatalogError> {
    let entries = std::fs::read_dir(store_dir)
        .map_err(CatalogError::io(format!("listing {}", store_dir.display())))?;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            continue;
        }
        let path = entry.path();
        let Ok(f) = File::open(&path) else { continue };
        if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            tracing::info!(dir = %path.display(), "removing what an interrupted pull left");
            let _ = std::fs::remove_dir_all(&path);
            drop(lock);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_staging_goes_live_staging_stays() {
        let t = tempfile::tempdir().expect("tempdir");
        let live = Staging::create(t.path(), "img").expect("create");
        std::fs::write(live.dir.join("rootfs.ext4"), "x").expect("write");
        let dead = t.path().join(".pull-img-dead");
        std::fs::create_dir_all(dead.join("sub")).expect("mkdir");
        std::fs::create_dir(t.path().join("img")).expect("mkdir");
        remove_stale(t.path()).expect("clean");
        assert!(!dead.exists());
        assert!(live.dir.join("rootfs.ext4").exists());
        assert!(t.path().join("img").exists());
        let dir = live.dir.clone();
        drop(live);
        assert!(!dir.exists());
    }

    #[test]
    fn publishing_moves_and_refuses_to_replace() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = Staging::create(t.path(), "k").expect("create");
        std::fs::write(s.dir.join("vmlinuz"), "x").expect("write");
        s.publish(&t.path().join("k")).expect("publish");
        assert!(t.path().join("k/vmlinuz").exists());
        let s = Staging::create(t.path(), "k").expect("create");
        let dir = s.dir.clone();
        assert!(matches!(
            s.publish(&t.path().join("k")),
            Err(CatalogError::Exists(_))
        ));
        assert!(!dir.exists());
    }
}
