//! The local Debian image build: mmdebstrap, customisation, kernel, mkfs.

use crate::customize::{GuestPayload, InstallSection, customize, find_kernel, write_file};
use crate::fsutil::{sha256_file, tree_usage};
use crate::staging::{
    STAGING_PREFIX, Staging, lock_images_dir, mounts_under, remove_stale, remove_tree,
    unmount_all_under,
};
use crate::{ImageError, Manifest};
use banger_ext4::{find_tool, inode_count, mkfs_tree, rootfs_size, run_tool, set_root_mode};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

mod packages;

pub use packages::BASE_PACKAGES;
pub(crate) use packages::is_package_name;
use packages::{mmdebstrap_args, package_list, validate};

/// Docker's settings in the default image: its data on the `/root` work
/// disk (ext4, grown with the VM's disk), where the overlay2 driver works;
/// the root file system is an overlayfs, which overlay2 cannot sit on.
pub const DOCKER_DAEMON_JSON: &str = "{\n  \"data-root\": \"/root/.local/share/docker\"\n}\n";

/// File name of the root file system inside an image directory.
const ROOTFS_FILE: &str = "rootfs.ext4";

/// File name of the `/root` work seed inside an image directory.
pub const WORK_SEED_FILE: &str = "work-seed.ext4";

/// Smallest work seed made: VMs grow their copy to their disk size, and
/// growing needs some room to start from.
const WORK_SEED_MIN_BYTES: u64 = 64 * MIB;

/// File names of the kernel and initrd inside a kernel directory.
const KERNEL_FILE: &str = "vmlinuz";
/// The uncompressed ELF kernel extracted from the bzImage, for Firecracker.
use crate::vmlinux::VMLINUX_FILE;
const INITRD_FILE: &str = "initrd.img";

const MIB: u64 = 1 << 20;

/// What to build.
#[derive(Debug, Clone)]
pub struct DebianBuild {
    /// Image name (a DNS label); the image goes to `images_dir/<name>/`.
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Debian mirror URL; `None` for mmdebstrap's default (deb.debian.org,
    /// plus the updates and security archives of a stable suite).
    pub mirror: Option<String>,
    /// Packages installed on top of [`BASE_PACKAGES`].
    pub extra_packages: Vec<String>,
    /// The agent, its unit and its module list to bake in.
    pub payload: GuestPayload,
    /// The image store; the image goes to `images_dir/<name>/`.
    pub images_dir: PathBuf,
    /// The kernel store; the kernel goes to `kernels_dir/<kernel name>/`.
    pub kernels_dir: PathBuf,
}

/// A finished image and its kernel (also the root helper's answer to a
/// build, hence serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltImage {
    /// `images_dir/<name>/`.
    pub dir: PathBuf,
    /// The ext4 root file system, shared read-only by the image's VMs.
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    /// The ext4 file system VMs clone for their `/root` work disk.
    pub work_seed: PathBuf,
    /// Directory name of the kernel under the kernels directory, see [`kernel_name`].
    pub kernel_name: String,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The ELF vmlinux extracted from the kernel (for Firecracker); None
    /// when the kernel's compression could not be unpacked.
    pub vmlinux: Option<PathBuf>,
    /// e.g. `6.1.0-50-cloud-amd64`.
    pub kernel_release: String,
    /// True when a complete image was already there and nothing was done.
    pub already_existed: bool,
}

/// Build progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A phase began: `packages`, `customize`, `kernel`, `mkfs`, then `done`.
    Phase { name: &'static str, message: String },
    /// A line of tool output (mmdebstrap, mkfs), for verbose logs.
    Line(String),
}

/// Name of the kernel of a Debian `suite` image with kernel `release`.
pub fn kernel_name(suite: &str, release: &str) -> String {
    format!("debian-{suite}-{release}")
}

/// The complete image `name` in `images_dir`, if there is one: its manifest
/// is valid, its root file system has the recorded size and its kernel files
/// are in `kernels_dir`.
pub fn debian_image_exists(
    images_dir: &Path,
    kernels_dir: &Path,
    name: &str,
) -> Option<BuiltImage> {
    let dir = images_dir.join(name);
    let m = Manifest::read(&dir).ok()?;
    if m.name != name || !is_plain_file_name(&m.rootfs) || !is_plain_file_name(&m.kernel_name) {
        return None;
    }
    let rootfs = dir.join(&m.rootfs);
    let kdir = kernels_dir.join(&m.kernel_name);
    let (kernel, initrd) = (kdir.join(KERNEL_FILE), kdir.join(INITRD_FILE));
    let rootfs_ok =
        std::fs::metadata(&rootfs).is_ok_and(|md| md.is_file() && md.len() == m.rootfs_bytes);
    // Images from before work seeds existed are rebuilt.
    let work_seed = dir.join(m.work_seed.as_deref().filter(|s| is_plain_file_name(s))?);
    if !(rootfs_ok && work_seed.is_file() && kernel.is_file() && initrd.is_file()) {
        return None;
    }
    Some(BuiltImage {
        dir,
        rootfs,
        work_seed,
        size_bytes: m.rootfs_bytes,
        kernel_name: m.kernel_name,
        vmlinux: Some(kdir.join(VMLINUX_FILE)).filter(|p| p.is_file()),
        kernel,
        initrd,
        kernel_release: m.kernel_release,
        already_existed: true,
    })
}

fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/')
}

/// Builds the image `spec.name` from Debian packages, or returns the
/// complete one already there (`already_existed`). Needs root.
///
/// Builds sharing an images directory run one at a time. Everything happens
/// in a staging directory renamed into place at the end; on failure or
/// cancellation the tools are stopped, whatever they mounted is unmounted
/// and the staging directory removed. Leftovers of a crashed build are
/// removed by the next one.
pub async fn build_debian(
    spec: &DebianBuild,
    progress: impl Fn(Progress) + Send + Sync,
    cancel: CancellationToken,
) -> Result<BuiltImage, ImageError> {
    validate(spec)?;
    if let Some(built) = debian_image_exists(&spec.images_dir, &spec.kernels_dir, &spec.name) {
        return Ok(built);
    }
    if !spec.payload.agent_binary.is_file() {
        return Err(ImageError::AgentMissing(spec.payload.agent_binary.clone()));
    }
    InstallSection::parse(&spec.payload.agent_unit)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NeedsRoot);
    }
    let tools = Tools {
        mmdebstrap: find_tool("mmdebstrap").ok_or(ImageError::ToolMissing {
            tool: "mmdebstrap",
            package: "mmdebstrap",
        })?,
    };
    // Checked before the long part of the build; the calls find them again.
    for tool in ["mkfs.ext4", "debugfs"] {
        banger_ext4::tool(tool)?;
    }

    std::fs::create_dir_all(&spec.images_dir).map_err(ImageError::io(format!(
        "creating {}",
        spec.images_dir.display()
    )))?;
    let _lock = lock_images_dir(&spec.images_dir, &cancel).await?;
    // Another build may have finished it while this one waited for the lock.
    if let Some(built) = debian_image_exists(&spec.images_dir, &spec.kernels_dir, &spec.name) {
        return Ok(built);
    }
    let images_dir = spec.images_dir.clone();
    blocking(move || remove_stale(&images_dir)).await?;

    let staging = Staging::create(&spec.images_dir, &spec.name)?;
    let mut new_kernel_dir = None;
    match build_in(
        spec,
        &tools,
        staging.path(),
        &progress,
        &cancel,
        &mut new_kernel_dir,
    )
    .await
    {
        Ok(built) => {
            staging.keep();
            progress(Progress::Phase {
                name: "done",
                message: format!(
                    "image {} ready: {} ({} MiB), kernel {}",
                    spec.name,
                    built.rootfs.display(),
                    built.size_bytes / MIB,
                    built.kernel_name
                ),
            });
            Ok(built)
        }
        Err(err) => {
            // A cleanup failure (something still mounted) needs the user's
            // attention more than the build error that led to it.
            staging.discard().await?;
            if let Some(kdir) = new_kernel_dir {
                blocking(move || remove_tree(&kdir)).await?;
            }
            Err(err)
        }
    }
}

struct Tools {
    mmdebstrap: PathBuf,
}

/// The build proper, inside `staging`. Records in `new_kernel_dir` the
/// kernel directory it created, for removal if the build then fails.
async fn build_in(
    spec: &DebianBuild,
    tools: &Tools,
    staging: &Path,
    progress: &(impl Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
    new_kernel_dir: &mut Option<PathBuf>,
) -> Result<BuiltImage, ImageError> {
    let phase = |name: &'static str, message: String| progress(Progress::Phase { name, message });
    let on_line = |line: String| progress(Progress::Line(line));
    let checkpoint = || {
        if cancel.is_cancelled() {
            Err(ImageError::Cancelled)
        } else {
            Ok(())
        }
    };
    let tree = staging.join("root");

    let packages = package_list(spec);
    phase(
        "packages",
        format!(
            "downloading and installing {} Debian {} packages and their dependencies from {} (mmdebstrap, about a minute)",
            packages.len(),
            spec.suite,
            spec.mirror.as_deref().unwrap_or("deb.debian.org")
        ),
    );
    // mmdebstrap's temporary files (a gpg home) go in the staging directory,
    // so a killed run leaves none in /tmp.
    let tmp = staging.join("tmp");
    std::fs::create_dir(&tmp).map_err(ImageError::io(format!("creating {}", tmp.display())))?;
    let args = mmdebstrap_args(spec, &packages, &tree);
    // mise's pinned tarball downloads while mmdebstrap runs.
    let mise_tarball = tmp.join("mise.tgz");
    let env = [("TMPDIR", tmp.as_path())];
    let (debootstrapped, mise) = tokio::join!(
        run_tool(
            "mmdebstrap",
            &tools.mmdebstrap,
            args,
            &env,
            &on_line,
            cancel,
        ),
        crate::mise::fetch_mise(&mise_tarball, cancel),
    );
    debootstrapped?;
    // mmdebstrap unmounts what it mounted when it succeeds; make sure, as
    // mkfs must not copy a mounted /proc.
    if !mounts_under(&tree).is_empty() {
        unmount_all_under(&tree)?;
    }
    checkpoint()?;

    phase(
        "customize",
        "installing the banger agent, hardening sshd, trimming the boot".into(),
    );
    let agent_sha256 = {
        let (tree, payload) = (tree.clone(), spec.payload.clone());
        blocking(move || {
            customize(&tree, &payload)?;
            sha256_file(&payload.agent_binary)
        })
        .await?
    };
    checkpoint()?;

    match mise {
        Ok(()) => {
            phase(
                "mise",
                format!(
                    "installing mise {} at {} (the pinned npm tarball, sha512-checked)",
                    crate::derive::MISE_VERSION,
                    crate::mise::MISE_PATH
                ),
            );
            let (t, tarball) = (tree.clone(), mise_tarball.clone());
            blocking(move || crate::mise::install_mise(&t, &tarball)).await?;
            let chroot = chroot_tool()?;
            let args = [
                tree.as_os_str(),
                crate::mise::MISE_PATH.as_ref(),
                "--version".as_ref(),
            ]
            .map(OsString::from)
            .to_vec();
            run_tool("mise", &chroot, args, &[], &on_line, cancel).await?;
        }
        Err(ImageError::Cancelled) => return Err(ImageError::Cancelled),
        // Not fatal: a host that reaches its Debian mirror but not npm
        // still gets an image, and is told what it lacks.
        Err(e) => phase(
            "mise",
            format!(
                "warning: the image has no mise: {e}; `banger image build --from-image` adds it later"
            ),
        ),
    }
    if tree.join("usr/sbin/dockerd").exists() {
        write_file(
            &tree,
            "etc/docker/daemon.json",
            DOCKER_DAEMON_JSON.as_bytes(),
            0o644,
        )?;
    }
    checkpoint()?;

    let kernel = find_kernel(&tree)?;
    phase(
        "initramfs",
        "putting the agent's channel modules in the initramfs".into(),
    );
    add_initramfs_modules(&tree)?;
    let chroot = chroot_tool()?;
    let args = [
        tree.as_os_str(),
        "update-initramfs".as_ref(),
        "-u".as_ref(),
        "-k".as_ref(),
        kernel.release.as_ref(),
    ]
    .map(OsString::from)
    .to_vec();
    run_tool("update-initramfs", &chroot, args, &[], &on_line, cancel).await?;
    checkpoint()?;

    let kname = kernel_name(&spec.suite, &kernel.release);
    let kdir = spec.kernels_dir.join(&kname);
    phase(
        "kernel",
        format!(
            "copying kernel {} and its initrd to {}",
            kernel.release,
            kdir.display()
        ),
    );
    if std::fs::symlink_metadata(&kdir).is_err() {
        *new_kernel_dir = Some(kdir.clone());
    }
    {
        let (kdir, kernel) = (kdir.clone(), kernel.clone());
        blocking(move || install_kernel(&kdir, &kernel.vmlinuz, &kernel.initrd)).await?;
    }
    // Firecracker boots only the uncompressed kernel. Not fatal: QEMU does
    // not need it, and a Firecracker launch says what is missing.
    let vmlinux = {
        let (src, dest) = (kdir.join(KERNEL_FILE), kdir.join(VMLINUX_FILE));
        let extracted = blocking(move || {
            Ok(crate::vmlinux::extract_vmlinux_file(&src, &dest).map(|c| (dest, c)))
        })
        .await?;
        match extracted {
            Ok((dest, compression)) => {
                on_line(format!(
                    "extracted the {compression} kernel to {}",
                    dest.display()
                ));
                Some(dest)
            }
            Err(e) => {
                on_line(format!("warning: no vmlinux for Firecracker: {e}"));
                None
            }
        }
    };
    checkpoint()?;

    let usage = {
        let tree = tree.clone();
        blocking(move || tree_usage(&tree)).await?
    };
    // /root becomes the work seed: VMs mount their own copy over it.
    let seed_usage = {
        let root = tree.join("root");
        blocking(move || tree_usage(&root)).await?
    };
    let seed_size = rootfs_size(seed_usage.bytes).max(WORK_SEED_MIN_BYTES);
    phase(
        "work-seed",
        format!("writing the {} MiB /root work seed", seed_size / MIB),
    );
    let work_seed = staging.join(WORK_SEED_FILE);
    std::fs::File::create(&work_seed)
        .and_then(|f| f.set_len(seed_size))
        .map_err(ImageError::io(format!("creating {}", work_seed.display())))?;
    mkfs_tree(
        &tree.join("root"),
        &work_seed,
        "work",
        inode_count(seed_usage.inodes, seed_size),
        &on_line,
        cancel,
    )
    .await?;
    // mkfs -d gives the root directory mode 0755; /root is private.
    set_root_mode(&work_seed, 0o700, &on_line, cancel).await?;
    checkpoint()?;

    let size = rootfs_size(usage.bytes);
    phase(
        "mkfs",
        format!(
            "writing the {} MiB ext4 root file system ({} MiB of files)",
            size / MIB,
            usage.bytes.div_ceil(MIB)
        ),
    );
    let rootfs = staging.join(ROOTFS_FILE);
    // A sparse file of the final size: mkfs takes its size from it.
    std::fs::File::create(&rootfs)
        .and_then(|f| f.set_len(size))
        .map_err(ImageError::io(format!("creating {}", rootfs.display())))?;
    let inodes = inode_count(usage.inodes, size);
    mkfs_tree(&tree, &rootfs, "rootfs", inodes, &on_line, cancel).await?;
    {
        // The unpacked tree is big and no longer needed.
        let (tree, tmp) = (tree.clone(), tmp.clone());
        blocking(move || remove_tree(&tree).and_then(|()| remove_tree(&tmp))).await?;
    }
    for f in [&rootfs, &work_seed] {
        std::fs::File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(ImageError::io(format!("flushing {}", f.display())))?;
    }

    let manifest = Manifest {
        name: spec.name.clone(),
        suite: spec.suite.clone(),
        mirror: spec.mirror.clone(),
        packages,
        kernel_name: kname.clone(),
        kernel_release: kernel.release.clone(),
        rootfs: ROOTFS_FILE.into(),
        rootfs_bytes: size,
        work_seed: Some(WORK_SEED_FILE.into()),
        tree_bytes: usage.bytes,
        agent_sha256,
        created_at: now_rfc3339(),
    };
    manifest.write(staging)?;
    checkpoint()?;

    let dest = spec.images_dir.join(&spec.name);
    publish(staging, &dest).await?;
    Ok(BuiltImage {
        rootfs: dest.join(ROOTFS_FILE),
        work_seed: dest.join(WORK_SEED_FILE),
        dir: dest,
        size_bytes: size,
        kernel_name: kname,
        kernel: kdir.join(KERNEL_FILE),
        initrd: kdir.join(INITRD_FILE),
        vmlinux,
        kernel_release: kernel.release,
        already_existed: false,
    })
}

/// The `chroot` binary, for running tools inside the image tree.
fn chroot_tool() -> Result<std::path::PathBuf, ImageError> {
    find_tool("chroot").ok_or(ImageError::ToolMissing {
        tool: "chroot",
        package: "coreutils",
    })
}

/// Copies the kernel and initrd into `kdir`, each through a temporary file
/// and a rename, so a VM starting meanwhile never reads a half-written one.
fn install_kernel(kdir: &Path, vmlinuz: &Path, initrd: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(kdir)
        .map_err(ImageError::io(format!("creating {}", kdir.display())))?;
    for (src, name) in [(vmlinuz, KERNEL_FILE), (initrd, INITRD_FILE)] {
        let tmp = kdir.join(format!(".{name}.{:016x}", rand::random::<u64>()));
        let dst = kdir.join(name);
        let copied = std::fs::copy(src, &tmp)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &dst));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(ImageError::Io {
                context: format!("copying {} to {}", src.display(), dst.display()),
                source: e,
            });
        }
    }
    Ok(())
}

/// Renames the finished staging directory to `dest`. An incomplete image
/// already at `dest` (the caller found no valid manifest there) is moved
/// aside first and removed afterwards.
async fn publish(staging: &Path, dest: &Path) -> Result<(), ImageError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let mut old = None;
    if std::fs::symlink_metadata(dest).is_ok() {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside = parent.join(format!(
            "{STAGING_PREFIX}{name}-{:016x}-old",
            rand::random::<u64>()
        ));
        std::fs::rename(dest, &aside).map_err(ImageError::io(format!(
            "moving the incomplete {} aside",
            dest.display()
        )))?;
        old = Some(aside);
    }
    std::fs::rename(staging, dest).map_err(ImageError::io(format!(
        "moving the image into {}",
        dest.display()
    )))?;
    // Make the rename durable before anyone records the image.
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io(format!("flushing {}", parent.display())))?;
    if let Some(old) = old {
        blocking(move || remove_tree(&old)).await?;
    }
    Ok(())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Runs file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Io {
            context: "image build worker".into(),
            source: std::io::Error::other(e),
        })?
}

/// Modules the initramfs loads so the agent's channel exists as soon as
/// systemd starts the agent, instead of after they load from the root file
/// system (about 2 s later under TCG).
/// `overlay` is there for the agent's early-init mode, which runs before
/// the root file system's modules are reachable by name.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    "overlay",
];

/// Appends [`INITRAMFS_MODULES`] to the tree's initramfs-tools module list
/// (each once).
fn add_initramfs_modules(tree: &Path) -> Result<(), ImageError> {
    let path = tree.join("etc/initramfs-tools/modules");
    let mut text = std::fs::read_to_string(&path)
        .map_err(ImageError::io(format!("reading {}", path.display())))?;
    for m in INITRAMFS_MODULES {
        if !text.lines().any(|l| l.trim() == *m) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(m);
            text.push('\n');
        }
    }
    std::fs::write(&path, text).map_err(ImageError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(root: &Path) -> DebianBuild {
        DebianBuild {
            name: "debian-bookworm".into(),
            suite: "bookworm".into(),
            mirror: None,
            extra_packages: vec![],
            payload: GuestPayload {
                agent_binary: "/bin/true".into(),
                agent_unit: "[Service]\nExecStart=/usr/local/bin/banger-agent\n[Install]\nWantedBy=sysinit.target\n".into(),
                agent_modules_conf: "virtio_console\n".into(),
            },
            images_dir: root.join("images"),
            kernels_dir: root.join("kernels"),
        }
    }

    /// Lays out what a finished build leaves, without running one.
    fn fake_built(s: &DebianBuild) -> Manifest {
        let m = Manifest {
            name: s.name.clone(),
            suite: s.suite.clone(),
            mirror: None,
            packages: package_list(s),
            kernel_name: kernel_name(&s.suite, "6.1.0-9-cloud-amd64"),
            kernel_release: "6.1.0-9-cloud-amd64".into(),
            rootfs: ROOTFS_FILE.into(),
            rootfs_bytes: 4096,
            work_seed: Some(WORK_SEED_FILE.into()),
            tree_bytes: 1024,
            agent_sha256: "00".repeat(32),
            created_at: now_rfc3339(),
        };
        let dir = s.images_dir.join(&s.name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::File::create(dir.join(ROOTFS_FILE))
            .and_then(|f| f.set_len(4096))
            .expect("rootfs");
        std::fs::write(dir.join(WORK_SEED_FILE), "seed").expect("work seed");
        m.write(&dir).expect("manifest");
        let kdir = s.kernels_dir.join(&m.kernel_name);
        std::fs::create_dir_all(&kdir).expect("mkdir");
        std::fs::write(kdir.join(KERNEL_FILE), "k").expect("kernel");
        std::fs::write(kdir.join(INITRD_FILE), "i").expect("initrd");
        m
    }

    #[tokio::test]
    async fn an_existing_complete_image_is_returned_without_building() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = spec(t.path());
        assert!(debian_image_exists(&s.images_dir, &s.kernels_dir, &s.name).is_none());
        let m = fake_built(&s);
        // Even without root or tools, and with a cancelled token: nothing runs.
        let cancel = CancellationToken::new();
        cancel.cancel();
        let b = build_debian(&s, |p| panic!("unexpected progress {p:?}"), cancel)
            .await
            .expect("exists");
        assert!(b.already_existed);
        assert_eq!(b.rootfs, s.images_dir.join("debian-bookworm/rootfs.ext4"));
        assert_eq!(b.kernel, s.kernels_dir.join(&m.kernel_name).join("vmlinuz"));
        assert_eq!(
            b.initrd,
            s.kernels_dir.join(&m.kernel_name).join("initrd.img")
        );
        assert_eq!(
            (b.size_bytes, b.kernel_release.as_str()),
            (4096, "6.1.0-9-cloud-amd64")
        );
        assert_eq!(b.kernel_name, "debian-bookworm-6.1.0-9-cloud-amd64");
    }

    #[test]
    fn an_image_is_incomplete_if_any_part_is_off() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = spec(t.path());
        let m = fake_built(&s);
        let exists = || debian_image_exists(&s.images_dir, &s.kernels_dir, &s.name).is_some();
        assert!(exists());
        // A truncated root file system.
        std::fs::File::options()
            .write(true)
            .open(s.images_dir.join("debian-bookworm/rootfs.ext4"))
            .and_then(|f| f.set_len(10))
            .expect("truncate");
        assert!(!exists());
        fake_built(&s);
        assert!(exists());
        // A missing initrd.
        std::fs::remove_file(s.kernels_dir.join(&m.kernel_name).join(INITRD_FILE)).expect("rm");
        assert!(!exists());
        fake_built(&s);
        // A manifest of another image, or one pointing outside.
        let mut other = m.clone();
        other.name = "other".into();
        other
            .write(&s.images_dir.join("debian-bookworm"))
            .expect("write");
        assert!(!exists());
        let mut escape = m.clone();
        escape.rootfs = "../../etc/passwd".into();
        escape
            .write(&s.images_dir.join("debian-bookworm"))
            .expect("write");
        assert!(!exists());
    }

    #[tokio::test]
    async fn bad_specs_are_refused_before_touching_the_disk() {
        let t = tempfile::tempdir().expect("tempdir");
        type Check = fn(&ImageError) -> bool;
        let cases: Vec<(DebianBuild, Check)> = vec![
            (
                DebianBuild {
                    name: "Bad Name".into(),
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadName(_)),
            ),
            (
                DebianBuild {
                    name: "-x".into(),
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadName(_)),
            ),
            (
                DebianBuild {
                    name: "../x".into(),
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadName(_)),
            ),
            (
                DebianBuild {
                    suite: "--help".into(),
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadSuite(_)),
            ),
            (
                DebianBuild {
                    mirror: Some("--setup-hook=x".into()),
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadMirror(_)),
            ),
            (
                DebianBuild {
                    extra_packages: vec!["vim,evil".into()],
                    ..spec(t.path())
                },
                |e| matches!(e, ImageError::BadPackage(_)),
            ),
            (
                {
                    let mut s = spec(t.path());
                    s.payload.agent_binary = t.path().join("nope");
                    s
                },
                |e| matches!(e, ImageError::AgentMissing(_)),
            ),
            (
                {
                    let mut s = spec(t.path());
                    s.payload.agent_unit = "[Service]\nExecStart=/x\n".into();
                    s
                },
                |e| matches!(e, ImageError::BadUnit(_)),
            ),
        ];
        for (s, check) in cases {
            let r = build_debian(&s, |_| {}, CancellationToken::new()).await;
            match r {
                Err(e) => assert!(check(&e), "{}: unexpected error {e}", s.name),
                Ok(b) => panic!("{}: built {b:?}", s.name),
            }
        }
        assert!(!t.path().join("images").exists());
    }

    #[test]
    fn package_names_are_plain() {
        for ok in [
            "vim",
            "python3",
            "g++",
            "libc6-dev",
            "linux-image-6.1.0-9-cloud-amd64",
            "git=1:2.39.5-0+deb12u1",
            "jq/bookworm-backports",
        ] {
            assert!(is_package_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "Vim",
            "-x",
            "vim,jq",
            "vim jq",
            "?essential",
            "./x.deb",
            "/x.deb",
            "x=",
            "x/a b",
            "(x)",
        ] {
            assert!(!is_package_name(bad), "{bad}");
        }
    }

    #[test]
    fn command_lines() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut s = spec(t.path());
        s.mirror = Some("http://deb.example/debian".into());
        s.extra_packages = vec!["vim".into(), "jq".into()];
        let packages = package_list(&s);
        assert_eq!(
            packages.len(),
            BASE_PACKAGES.len() + 1,
            "jq is already a base package"
        );
        let args = mmdebstrap_args(&s, &packages, Path::new("/s/root"));
        let args: Vec<&str> = args.iter().map(|a| a.to_str().expect("utf8")).collect();
        assert_eq!(&args[..2], ["--mode=root", "--variant=minbase"]);
        assert!(args.contains(&"--include=systemd-sysv,openssh-server,linux-image-cloud-amd64,initramfs-tools,iproute2,git,curl,ca-certificates,jq,tmux,kmod,udev,dbus,procps,less,python3,docker.io,containerd,apparmor,vim"));
        assert_eq!(
            &args[args.len() - 4..],
            ["--", "bookworm", "/s/root", "http://deb.example/debian"]
        );
        assert!(!args.iter().any(|a| a.starts_with("--setup-hook")));

        // A backports pin brings its release into apt's sources, once.
        s.extra_packages = vec![
            "qemu-system-x86/bookworm-backports".into(),
            "qemu-utils/bookworm-backports".into(),
            "vim=2:9.0".into(),
        ];
        let packages = package_list(&s);
        let args = mmdebstrap_args(&s, &packages, Path::new("/s/root"));
        let hooks: Vec<&str> = args
            .iter()
            .map(|a| a.to_str().expect("utf8"))
            .filter(|a| a.starts_with("--setup-hook="))
            .collect();
        assert_eq!(
            hooks,
            [
                "--setup-hook=echo 'deb http://deb.example/debian bookworm-backports main' > \"$1/etc/apt/sources.list.d/bookworm-backports.list\""
            ]
        );
        s.mirror = None;
        let args = mmdebstrap_args(&s, &packages, Path::new("/s/root"));
        assert!(args.iter().any(|a| {
            a.to_str()
                .expect("utf8")
                .contains("'deb http://deb.debian.org/debian bookworm-backports main'")
        }));
    }

    #[tokio::test]
    async fn publishing_replaces_an_incomplete_image_and_leaves_no_staging() {
        let t = tempfile::tempdir().expect("tempdir");
        let staging = t.path().join(".staging-img-1");
        std::fs::create_dir_all(&staging).expect("mkdir");
        std::fs::write(staging.join("manifest.json"), "new").expect("write");
        let dest = t.path().join("img");
        std::fs::create_dir_all(dest.join("junk")).expect("mkdir");
        publish(&staging, &dest).await.expect("publish");
        let left: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["img"]);
        assert_eq!(
            std::fs::read_to_string(dest.join("manifest.json")).expect("read"),
            "new"
        );
        assert!(!dest.join("junk").exists());
    }

    #[test]
    fn kernel_install_replaces_files_atomically_and_leaves_no_temporaries() {
        let t = tempfile::tempdir().expect("tempdir");
        let (k, i) = (t.path().join("vmlinuz-x"), t.path().join("initrd.img-x"));
        std::fs::write(&k, "kernel").expect("write");
        std::fs::write(&i, "initrd").expect("write");
        let kdir = t.path().join("kernels/debian-bookworm-x");
        install_kernel(&kdir, &k, &i).expect("install");
        std::fs::write(&k, "kernel2").expect("write");
        install_kernel(&kdir, &k, &i).expect("again");
        let mut names: Vec<_> = std::fs::read_dir(&kdir)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        assert_eq!(names, ["initrd.img", "vmlinuz"]);
        assert_eq!(
            std::fs::read_to_string(kdir.join("vmlinuz")).expect("read"),
            "kernel2"
        );
    }
}
