//! The local Debian image build.

use crate::customize::{Customization, customize, find_kernel};
use crate::process::run_tool;
use crate::{ImageError, Manifest};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Packages of the default image on top of mmdebstrap's minbase.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "openssh-server",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "iproute2",
    "procps",
    "less",
    "git",
    "curl",
    "ca-certificates",
    "jq",
    "tmux",
];

/// The smallest root file system banger makes. It is a sparse file, so the
/// unused part costs no disk, and VMs of the default disk size need no
/// resize at boot.
pub const MIN_ROOTFS_BYTES: u64 = 8 << 30;

/// What to build.
pub struct DebianBuild {
    /// Image name (a DNS label); the image goes to `images_dir/<name>/`.
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    pub mirror: Option<String>,
    pub extra_packages: Vec<String>,
    pub agent_binary: PathBuf,
    pub images_dir: PathBuf,
    /// Kernels go to `kernels_dir/<kernel-name>/`.
    pub kernels_dir: PathBuf,
}

/// A finished image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    pub kernel_name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
    /// True when the image was already there and nothing was done.
    pub already_existed: bool,
}

/// Build progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A new phase began.
    Phase { name: &'static str, message: String },
    /// A line of tool output (for verbose logs).
    Line(String),
}

/// The image `name` in `images_dir` if a complete build of it exists.
pub fn find_built(images_dir: &Path, kernels_dir: &Path, name: &str) -> Option<BuiltImage> {
    let dir = images_dir.join(name);
    let text = std::fs::read_to_string(dir.join(Manifest::FILE)).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    let rootfs = dir.join(&m.rootfs);
    let kdir = kernels_dir.join(&m.kernel_name);
    let (kernel, initrd) = (kdir.join("vmlinuz"), kdir.join("initrd.img"));
    if !(rootfs.is_file() && kernel.is_file() && initrd.is_file()) {
        return None;
    }
    Some(BuiltImage {
        dir,
        rootfs,
        size_bytes: m.rootfs_bytes,
        kernel_name: m.kernel_name,
        kernel,
        initrd,
        kernel_release: m.kernel_release,
        already_existed: true,
    })
}

/// Builds the image (or returns the existing one). On any failure or
/// cancellation, nothing of this build is left in `images_dir`.
pub async fn build_debian(
    spec: &DebianBuild,
    progress: impl Fn(Progress) + Send + Sync,
    cancel: CancellationToken,
) -> Result<BuiltImage, ImageError> {
    let valid = !spec.name.is_empty()
        && spec.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !spec.name.starts_with('-');
    if !valid {
        return Err(ImageError::BadName(spec.name.clone()));
    }
    if let Some(b) = find_built(&spec.images_dir, &spec.kernels_dir, &spec.name) {
        return Ok(b);
    }
    if !spec.agent_binary.is_file() {
        return Err(ImageError::AgentMissing(spec.agent_binary.clone()));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NeedsRoot);
    }
    std::fs::create_dir_all(&spec.images_dir).map_err(ImageError::io(format!("creating {}", spec.images_dir.display())))?;
    remove_stale_staging(&spec.images_dir, &spec.name);
    let staging = spec.images_dir.join(format!(".staging-{}-{:08x}", spec.name, rand::random::<u32>()));
    std::fs::create_dir(&staging).map_err(ImageError::io(format!("creating {}", staging.display())))?;
    let result = build_in(spec, &staging, &progress, &cancel).await;
    if result.is_err() {
        remove_staging(&staging);
    }
    result
}

async fn build_in(
    spec: &DebianBuild,
    staging: &Path,
    progress: &(impl Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<BuiltImage, ImageError> {
    let phase = |name: &'static str, message: String| progress(Progress::Phase { name, message });
    let line = |l: String| progress(Progress::Line(l));
    let tree = staging.join("root");

    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    packages.extend(spec.extra_packages.iter().cloned());
    phase("packages", format!("installing Debian {} packages with mmdebstrap", spec.suite));
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", packages.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg(&spec.suite)
        .arg(&tree);
    if let Some(m) = &spec.mirror {
        cmd.arg(m);
    }
    run_tool("mmdebstrap", cmd, &line, cancel).await?;
    if cancel.is_cancelled() {
        return Err(ImageError::Cancelled);
    }

    phase("customize", "installing the banger agent and hardening sshd".into());
    customize(
        &tree,
        &Customization {
            agent_binary: &spec.agent_binary,
            agent_unit: crate::AGENT_UNIT,
            modules_conf: crate::AGENT_MODULES_CONF,
        },
    )?;
    let agent_sha256 = sha256_file(&spec.agent_binary)?;

    phase("kernel", "extracting the kernel and initrd".into());
    let (release, vmlinuz, initrd) = find_kernel(&tree)?;
    let kernel_name = format!("debian-{release}");
    let kdir = spec.kernels_dir.join(&kernel_name);
    install_kernel(&kdir, &vmlinuz, &initrd)?;

    let used = tree_bytes(&tree);
    let size = (used + used / 4 + (256 << 20)).max(MIN_ROOTFS_BYTES).div_ceil(1 << 20) * (1 << 20);
    phase("mkfs", format!("writing the root file system ({} MiB of files)", used >> 20));
    let rootfs = staging.join("rootfs.ext4");
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", "rootfs", "-m", "0", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&rootfs)
        .arg(format!("{}k", size / 1024));
    run_tool("mkfs.ext4", mkfs, &line, cancel).await?;
    // The tree is big and no longer needed.
    std::fs::remove_dir_all(&tree).map_err(ImageError::io(format!("removing {}", tree.display())))?;

    let manifest = Manifest {
        name: spec.name.clone(),
        suite: spec.suite.clone(),
        kernel_name: kernel_name.clone(),
        kernel_release: release.clone(),
        rootfs: "rootfs.ext4".into(),
        rootfs_bytes: size,
        agent_sha256,
        created_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let mtext = serde_json::to_string_pretty(&manifest).map_err(|e| ImageError::Io {
        context: "encoding manifest".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(staging.join(Manifest::FILE), mtext).map_err(ImageError::io("writing manifest"))?;

    let dest = spec.images_dir.join(&spec.name);
    if dest.exists() {
        // An incomplete leftover (no valid manifest, or we would have returned early).
        std::fs::remove_dir_all(&dest).map_err(ImageError::io(format!("removing {}", dest.display())))?;
    }
    std::fs::rename(staging, &dest).map_err(ImageError::io(format!("moving the image into {}", dest.display())))?;
    phase("done", format!("image {} ready", spec.name));
    Ok(BuiltImage {
        rootfs: dest.join("rootfs.ext4"),
        dir: dest,
        size_bytes: size,
        kernel_name,
        kernel: kdir.join("vmlinuz"),
        initrd: kdir.join("initrd.img"),
        kernel_release: release,
        already_existed: false,
    })
}

fn install_kernel(kdir: &Path, vmlinuz: &Path, initrd: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(kdir).map_err(ImageError::io(format!("creating {}", kdir.display())))?;
    for (src, name) in [(vmlinuz, "vmlinuz"), (initrd, "initrd.img")] {
        // Copy then rename, so a running VM never sees a half-written kernel.
        let tmp = kdir.join(format!(".{name}.tmp"));
        std::fs::copy(src, &tmp).map_err(ImageError::io(format!("copying {}", src.display())))?;
        std::fs::rename(&tmp, kdir.join(name)).map_err(ImageError::io(format!("installing {name}")))?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String, ImageError> {
    use sha2::Digest;
    let data = std::fs::read(p).map_err(ImageError::io(format!("reading {}", p.display())))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&data)))
}

/// Bytes the tree occupies (allocated blocks, hard links counted once).
pub fn tree_bytes(root: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Staging dirs of earlier builds of `name` that crashed.
fn remove_stale_staging(images_dir: &Path, name: &str) {
    let prefix = format!(".staging-{name}-");
    if let Ok(rd) = std::fs::read_dir(images_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                remove_staging(&e.path());
            }
        }
    }
}

/// Unmounts anything left mounted under `dir` (an interrupted mmdebstrap
/// may leave /proc, /sys, /dev mounted in its chroot), then removes it.
fn remove_staging(dir: &Path) {
    for m in mounts_under(dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    if !mounts_under(dir).is_empty() {
        // Never recurse into a mounted /dev or /proc.
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let Ok(dir) = dir.canonicalize() else { return Vec::new() };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&dir))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_bytes_counts_hardlinks_once() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(t.path().join("a"), vec![1u8; 64 * 1024]).expect("a");
        let one = tree_bytes(t.path());
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).expect("link");
        assert_eq!(tree_bytes(t.path()), one);
        assert!(one >= 64 * 1024);
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn stale_staging_dirs_are_removed_only_for_that_name() {
        let t = tempfile::tempdir().expect("tmp");
        for d in [".staging-deb-1234", ".staging-other-1", "deb"] {
            std::fs::create_dir_all(t.path().join(d).join("root/etc")).expect("dir");
        }
        remove_stale_staging(t.path(), "deb");
        assert!(!t.path().join(".staging-deb-1234").exists());
        assert!(t.path().join(".staging-other-1").exists());
        assert!(t.path().join("deb").exists());
    }

    #[tokio::test]
    async fn refuses_bad_names_and_missing_agent_without_touching_disk() {
        let t = tempfile::tempdir().expect("tmp");
        let spec = |name: &str, agent: PathBuf| DebianBuild {
            name: name.into(),
            suite: "bookworm".into(),
            mirror: None,
            extra_packages: vec![],
            agent_binary: agent,
            images_dir: t.path().join("images"),
            kernels_dir: t.path().join("kernels"),
        };
        let r = build_debian(&spec("Bad Name", "/bin/true".into()), |_| {}, CancellationToken::new()).await;
        assert!(matches!(r, Err(ImageError::BadName(_))));
        let r = build_debian(&spec("ok", t.path().join("nope")), |_| {}, CancellationToken::new()).await;
        assert!(matches!(r, Err(ImageError::AgentMissing(_))));
        assert!(!t.path().join("images").exists());
    }
}
