//! Early-init mode: the agent as the kernel's `init=`.
//!
//! The image's root file system is shared by every VM made from it and is
//! mounted read-only. Before the image's own init runs, this mode stacks an
//! overlayfs on it whose upper layer lives on the VM's own overlay disk,
//! mounts the VM's work disk at `/root`, switches root to the result and
//! execs the image's init. Nothing here needs device-mapper, and the host
//! needs no root: both disks are plain ext4 files.
//!
//! Any failure is fatal: PID 1 exiting panics the kernel, which ends the VM
//! (`panic=-1` with `-no-reboot`), and the message on the console says why.

use banger_agent_proto::boot::{BootArgs, WORK_MOUNT};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Why early init could not hand over to the image's init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel has no overlay file system and `modprobe overlay` failed: {0}")]
    NoOverlay(String),
    #[error("none of {0:?} exists to stage the new root under")]
    NoStagingDir(&'static [&'static str]),
    #[error("bad init path {0:?}")]
    BadInit(String),
    /// The root is ready but the image has no init to hand over to (an
    /// image that is only a static binary or two): the agent is the init.
    #[error("the image has no {0}")]
    NoInit(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

/// Directories of the base root, any of which can hold the staging tmpfs.
/// The tmpfs is detached with the old root, so which one does not matter.
const STAGING_CANDIDATES: &[&str] = &["/mnt", "/tmp", "/media", "/srv", "/opt", "/home", "/run"];

/// API file systems moved into the new root when the initramfs (or this
/// function) mounted them.
const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// Directories a root needs, made (in the VM's overlay) when the image has
/// none, as a container runtime would: mount points, and /tmp for programs.
const ROOT_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// Stays PID 1 when the image has no init: reaps every orphan (the kernel
/// gives them to PID 1) and runs `serve` in a child process, started again
/// should it exit. Never returns.
pub fn be_init(serve: impl Fn() -> std::process::ExitCode) -> ! {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    loop {
        // SAFETY: PID 1 is single-threaded here (no runtime has started),
        // so the child may run anything.
        let child = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let code = serve();
                std::process::exit(if code == std::process::ExitCode::SUCCESS {
                    0
                } else {
                    1
                });
            }
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => {
                eprintln!("banger-agent (init): fork failed: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        loop {
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))
                    if pid == child =>
                {
                    eprintln!("banger-agent (init): the agent exited; starting it again");
                    break;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => break,
                Err(_) => {}
            }
        }
        // A crash loop must not spin the CPU.
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Assembles the VM's root and execs the image's init. Returns only on error.
pub fn run() -> InitError {
    match prepare() {
        Ok(args) => {
            // Before the image's init: its services (sshd) find the network
            // and resolver ready.
            if let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") {
                for p in crate::netconf::apply(&cmdline, Path::new("/etc")) {
                    eprintln!("banger-agent: network: {p}");
                }
            }
            exec_init(&args.init)
        }
        Err(e) => e,
    }
}

fn prepare() -> Result<BootArgs, InitError> {
    ensure_mounted("proc", "/proc", "proc")?;
    ensure_mounted("devtmpfs", "/dev", "devtmpfs")?;
    ensure_mounted("sysfs", "/sys", "sysfs")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(io("reading /proc/cmdline"))?;
    let args = BootArgs::parse(&cmdline);
    let Some(overlay_dev) = args.overlay.clone() else {
        // No overlay disk: boot the base as it is.
        return Ok(args);
    };
    ensure_overlayfs()?;

    // Nothing may propagate out of or into the mounts made here, and
    // pivot_root refuses shared mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;

    let staging = STAGING_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or(InitError::NoStagingDir(STAGING_CANDIDATES))?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", staging.display())))?;
    let disk = staging.join("disk");
    let newroot = staging.join("root");
    for d in [&disk, &newroot] {
        std::fs::create_dir(d).map_err(io(format!("creating {}", d.display())))?;
    }
    mount_ext4(&overlay_dev, &disk)?;
    let (upper, work) = (disk.join("upper"), disk.join("work"));
    for d in [&upper, &work] {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", d.display()))(e)),
        }
    }
    let opts = format!(
        "lowerdir=/,upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &newroot,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(sys(format!("mounting the overlay root ({opts})")))?;

    if let Some(work_dev) = &args.work {
        let target = newroot.join(&WORK_MOUNT[1..]);
        std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
        mount_ext4(work_dev, &target)?;
        // A work disk made without a seed starts empty: give it the
        // image's own /root, still visible here in the old root.
        if is_fresh_fs(&target)? {
            copy_tree(Path::new(WORK_MOUNT), &target)?;
        }
    }

    // A root made of a static binary or two has no mount points of its
    // own: make them in the overlay (the base stays read-only).
    for (d, mode) in ROOT_DIRS {
        let p = newroot.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir(&p).map_err(io(format!("creating {}", p.display())))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                .map_err(io(format!("setting the mode of {}", p.display())))?;
        }
    }

    // Device nodes are reached through /dev until it moves; decide what
    // to move before moving /proc, which is where we look.
    let mounted = mount_points()?;
    for m in MOVED_MOUNTS {
        if mounted.iter().any(|p| p == Path::new(m)) {
            let target = newroot.join(&m[1..]);
            mount(
                Some(*m),
                &target,
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(sys(format!("moving {m} into the new root")))?;
        }
    }
    // pivot_root(".", ".") stacks the old root under the new one at "/";
    // detaching it leaves only the new root (see pivot_root(2)).
    nix::unistd::chdir(&newroot).map_err(sys("entering the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the overlay"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(args)
}

/// Mounts `fstype` at `dir` unless something is mounted there already.
fn ensure_mounted(source: &str, dir: &str, fstype: &str) -> Result<(), InitError> {
    let d = Path::new(dir);
    if !d.is_dir() || is_mount_point(d) {
        return Ok(());
    }
    let flags = match fstype {
        "devtmpfs" => MsFlags::MS_NOSUID,
        _ => MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    };
    mount(Some(source), d, Some(fstype), flags, None::<&str>)
        .map_err(sys(format!("mounting {fstype} on {dir}")))
}

/// A directory is a mount point when its device differs from its parent's.
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Mount points listed in /proc/self/mounts.
fn mount_points() -> Result<Vec<PathBuf>, InitError> {
    let text =
        std::fs::read_to_string("/proc/self/mounts").map_err(io("reading /proc/self/mounts"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(PathBuf::from)
        .collect())
}

/// True when `dir` holds nothing but ext4's `lost+found`.
fn is_fresh_fs(dir: &Path) -> Result<bool, InitError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        if e.file_name() != "lost+found" {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Copies the tree under `from` into the existing directory `to`, keeping
/// modes, owners and symlinks (never following them); other special files
/// are skipped, /root has none that matter.
fn copy_tree(from: &Path, to: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("listing {}", from.display()))(e)),
    };
    for e in entries {
        let e = e.map_err(io(format!("listing {}", from.display())))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let md =
            std::fs::symlink_metadata(&src).map_err(io(format!("reading {}", src.display())))?;
        let ft = md.file_type();
        let what = || format!("copying {} to {}", src.display(), dst.display());
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io(what()))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io(what()))?;
        } else if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(io(what()))?;
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(io(what()))?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(md.uid()), Some(md.gid())).map_err(io(what()))?;
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
                .map_err(io(what()))?;
        }
    }
    let md = std::fs::metadata(from).map_err(io(format!("reading {}", from.display())))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io(format!("setting the mode of {}", to.display())))
}

fn mount_ext4(dev: &str, dir: &Path) -> Result<(), InitError> {
    mount(Some(dev), dir, Some("ext4"), MsFlags::empty(), None::<&str>)
        .map_err(sys(format!("mounting {dev} on {}", dir.display())))
}

/// Loads overlayfs when the kernel does not have it yet (the image's
/// initramfs usually loaded it already).
fn ensure_overlayfs() -> Result<(), InitError> {
    let has = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|t| t.lines().any(|l| l.trim_end().ends_with("\toverlay")))
            .unwrap_or(false)
    };
    if has() {
        return Ok(());
    }
    let out = std::process::Command::new("modprobe")
        .arg("overlay")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output();
    match out {
        Ok(o) if o.status.success() && has() => Ok(()),
        Ok(o) => Err(InitError::NoOverlay(
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        )),
        Err(e) => Err(InitError::NoOverlay(e.to_string())),
    }
}

fn exec_init(init: &str) -> InitError {
    let Ok(path) = CString::new(init) else {
        return InitError::BadInit(init.into());
    };
    // Not even a dangling symlink: nothing to exec.
    if std::fs::metadata(init).is_err() && std::fs::symlink_metadata(init).is_err() {
        return InitError::NoInit(init.into());
    }
    match nix::unistd::execv(&path, std::slice::from_ref(&path)) {
        Err(e) => InitError::Sys {
            what: format!("exec {init}"),
            source: e,
        },
        Ok(never) => match never {},
    }
}
