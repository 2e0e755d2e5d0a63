//! Assembling the VM's root: the base read-only under an overlay on the
//! VM's overlay disk, the work disk at `/root`, then `switch_root` (from
//! banger's initramfs) or `pivot_root` (after the distribution's).

use super::{InitError, io, sys};
use banger_agent_proto::boot::{BootArgs, WORK_MOUNT};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// How long banger's initramfs waits for the root disk to appear once
/// its driver is loaded (it is there at once in practice).
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// Where banger's initramfs assembles the new root and mounts the disks
/// under it (in the initramfs's own, writable, file system).
const INITRAMFS_NEWROOT: &str = "/newroot";
const INITRAMFS_BASE: &str = "/banger/base";
const INITRAMFS_DISK: &str = "/banger/disk";
const INITRAMFS_WORK: &str = "/banger/work";

/// Waits for a mount running in a thread of its own.
fn joined(thread: std::thread::JoinHandle<Result<(), InitError>>) -> Result<(), InitError> {
    thread
        .join()
        .map_err(|_| InitError::Panicked("mounting the VM's disks"))?
}

/// Mounts the root device and the VM's disks under [`INITRAMFS_NEWROOT`]:
/// the base read-only under an overlay whose upper layer is on the overlay
/// disk, the work disk at `/root`. Without an overlay disk the root is
/// mounted as it is (read-write when asked).
pub(super) fn assemble_from_initramfs(
    args: &BootArgs,
    overlayfs: impl FnOnce() -> Result<usize, InitError>,
) -> Result<PathBuf, InitError> {
    wait_for_device(&args.root, ROOT_WAIT)?;
    let newroot = PathBuf::from(INITRAMFS_NEWROOT);
    mkdir(&newroot)?;
    match &args.overlay {
        None => {
            let flags = if args.root_writable {
                MsFlags::empty()
            } else {
                MsFlags::MS_RDONLY
            };
            mount_ext4(&args.root, &newroot, flags)?;
            if let Some(work_dev) = &args.work {
                mount_work(work_dev, &newroot, &newroot)?;
            }
            overlayfs()?;
        }
        Some(overlay_dev) => {
            let (base, disk) = (Path::new(INITRAMFS_BASE), Path::new(INITRAMFS_DISK));
            mkdir(base)?;
            mkdir(disk)?;
            // The three disks mount at once: each mount waits on emulated
            // I/O much of the time. The work disk is staged, then moved
            // under the new root once that is mounted.
            let upper = {
                let dev = overlay_dev.clone();
                std::thread::spawn(move || mount_upper_disk(&dev, Path::new(INITRAMFS_DISK)))
            };
            let work = match &args.work {
                Some(work_dev) => {
                    mkdir(Path::new(INITRAMFS_WORK))?;
                    let dev = work_dev.clone();
                    Some(std::thread::spawn(move || {
                        wait_for_device(&dev, ROOT_WAIT)?;
                        mount_ext4_data(
                            &dev,
                            Path::new(INITRAMFS_WORK),
                            MsFlags::empty(),
                            VM_DISK_OPTIONS,
                        )
                    }))
                }
                None => None,
            };
            mount_ext4(&args.root, base, MsFlags::MS_RDONLY)?;
            joined(upper)?;
            overlayfs()?;
            mount_overlay_root(base, disk, &newroot)?;
            if let Some(work) = work {
                joined(work)?;
                let target = newroot.join(&WORK_MOUNT[1..]);
                std::fs::create_dir_all(&target)
                    .map_err(io(format!("creating {}", target.display())))?;
                mount(
                    Some(INITRAMFS_WORK),
                    &target,
                    None::<&str>,
                    MsFlags::MS_MOVE,
                    None::<&str>,
                )
                .map_err(sys(format!("moving the work disk to {}", target.display())))?;
                fill_fresh_work(base, &target)?;
            }
        }
    }
    Ok(newroot)
}

/// Waits for a block device node to appear (devtmpfs makes it when the
/// driver finds the disk).
fn wait_for_device(dev: &str, timeout: Duration) -> Result<(), InitError> {
    use std::os::unix::fs::FileTypeExt;
    let started = Instant::now();
    loop {
        if std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device()) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(InitError::NoRootDisk {
                device: dev.to_string(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `switch_root`: moves the API file systems into `newroot` and makes it
/// the root. The initramfs's files are deleted later ([`OldRoot::delete`]),
/// off the path to the agent's greeting.
pub(super) fn switch_root(newroot: &Path) -> Result<OldRoot, InitError> {
    move_api_mounts(newroot)?;
    let dir = std::fs::File::open("/").map_err(io("opening /"))?;
    let dev = dir.metadata().map_err(io("reading /"))?.dev();
    nix::unistd::chdir(newroot).map_err(sys("entering the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the new root onto /"))?;
    nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(OldRoot { dir, dev })
}

/// The initramfs's file system after [`switch_root`], reachable only
/// through this open directory.
#[derive(Debug)]
pub(super) struct OldRoot {
    dir: std::fs::File,
    dev: u64,
}

impl OldRoot {
    /// Deletes the initramfs's files, freeing their memory (as
    /// `switch_root(8)` does). Best effort.
    pub(super) fn delete(self) {
        use std::os::fd::AsRawFd;
        // The process's own descriptor reaches the directory from outside
        // the new root.
        let dir = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        delete_tree(&dir, self.dev, Path::new(""));
    }
}

/// Removes what is under `dir` on the file system `dev`, skipping `keep`
/// and other file systems (the mounted disks). Best effort: what cannot be
/// removed only costs memory.
pub(super) fn delete_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == keep {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            delete_tree(&p, dev, keep);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// After either path: `/run` is a tmpfs (systemd expects one, and the
/// agent's early children may write there), `/dev/pts` is mounted (the
/// agent's terminals need it before the image's init mounts anything).
pub(super) fn finish_root() -> Result<(), InitError> {
    if Path::new("/run").is_dir() && !is_mount_point(Path::new("/run")) {
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=20%"),
        )
        .map_err(sys("mounting a tmpfs on /run"))?;
    }
    let pts = Path::new("/dev/pts");
    let _ = std::fs::create_dir(pts);
    if pts.is_dir() && !is_mount_point(pts) {
        mount(
            Some("devpts"),
            pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        )
        .map_err(sys("mounting devpts on /dev/pts"))?;
    }
    Ok(())
}

/// The `init=` path: the root is mounted at `/` (read-only); stack the
/// overlay in a staging tmpfs and pivot into it.
pub(super) fn prepare(args: &BootArgs) -> Result<(), InitError> {
    let Some(overlay_dev) = args.overlay.clone() else {
        // No overlay disk: boot the base as it is.
        return Ok(());
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
        mkdir(d)?;
    }
    mount_overlay(&overlay_dev, Path::new("/"), &disk, &newroot)?;
    if let Some(work_dev) = &args.work {
        mount_work(work_dev, Path::new("/"), &newroot)?;
    }
    move_api_mounts(&newroot)?;
    // pivot_root(".", ".") stacks the old root under the new one at "/";
    // detaching it leaves only the new root (see pivot_root(2)).
    nix::unistd::chdir(&newroot).map_err(sys("entering the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the overlay"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}

/// Mounts the overlay disk at `disk` and an overlay of `base` (read-only
/// lower layer) with its upper layer on that disk at `newroot`.
fn mount_overlay(
    overlay_dev: &str,
    base: &Path,
    disk: &Path,
    newroot: &Path,
) -> Result<(), InitError> {
    mount_ext4_data(overlay_dev, disk, MsFlags::empty(), VM_DISK_OPTIONS)?;
    make_upper_dirs(disk)?;
    mount_overlay_root(base, disk, newroot)
}

/// Mounts the overlay disk at `disk` (once its device is there) with the
/// overlay's directories on it.
fn mount_upper_disk(overlay_dev: &str, disk: &Path) -> Result<(), InitError> {
    wait_for_device(overlay_dev, ROOT_WAIT)?;
    mount_ext4_data(overlay_dev, disk, MsFlags::empty(), VM_DISK_OPTIONS)?;
    make_upper_dirs(disk)
}

fn make_upper_dirs(disk: &Path) -> Result<(), InitError> {
    for d in [disk.join("upper"), disk.join("work")] {
        mkdir(&d)?;
    }
    Ok(())
}

/// Stacks the overlay on `newroot`: `base` read-only below, the upper
/// layer on the overlay disk mounted at `disk`.
fn mount_overlay_root(base: &Path, disk: &Path, newroot: &Path) -> Result<(), InitError> {
    let (upper, work) = (disk.join("upper"), disk.join("work"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        newroot,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(sys(format!("mounting the overlay root ({opts})")))
}

/// Mounts the work disk at `<newroot>/root`. A work disk made without a
/// seed starts empty: it gets the image's own /root, read from `base`.
fn mount_work(work_dev: &str, base: &Path, newroot: &Path) -> Result<(), InitError> {
    let target = newroot.join(&WORK_MOUNT[1..]);
    std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
    mount_ext4_data(work_dev, &target, MsFlags::empty(), VM_DISK_OPTIONS)?;
    fill_fresh_work(base, &target)
}

/// A work disk made without a seed starts empty: it gets the image's own
/// /root, read from `base`.
fn fill_fresh_work(base: &Path, target: &Path) -> Result<(), InitError> {
    if is_fresh_fs(target)? {
        copy_tree(&base.join(&WORK_MOUNT[1..]), target)?;
    }
    Ok(())
}

/// Moves the API file systems that are mounted into `newroot` (creating
/// their directories on a writable root when the image lacks them).
fn move_api_mounts(newroot: &Path) -> Result<(), InitError> {
    // A root made of a static binary or two has no mount points of its
    // own: make them in the overlay (the base stays read-only; a root
    // booted read-only without one keeps what it has).
    for (d, mode) in ROOT_DIRS {
        let p = newroot.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::create_dir(&p) {
                Ok(()) => std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                    .map_err(io(format!("setting the mode of {}", p.display())))?,
                Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => {}
                Err(e) => return Err(io(format!("creating {}", p.display()))(e)),
            }
        }
    }
    // Device nodes are reached through /dev until it moves; decide what
    // to move before moving /proc, which is where we look.
    let mounted = mount_points()?;
    for m in MOVED_MOUNTS {
        if mounted.iter().any(|p| p == Path::new(m)) {
            let target = newroot.join(&m[1..]);
            let _ = std::fs::create_dir(&target);
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
    Ok(())
}

fn mkdir(d: &Path) -> Result<(), InitError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(format!("creating {}", d.display()))(e)),
    }
}

/// Mounts `fstype` at `dir` unless something is mounted there already.
pub(super) fn ensure_mounted(source: &str, dir: &str, fstype: &str) -> Result<(), InitError> {
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
    use std::os::unix::fs::PermissionsExt;
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

fn mount_ext4(dev: &str, dir: &Path, flags: MsFlags) -> Result<(), InitError> {
    mount(Some(dev), dir, Some("ext4"), flags, None::<&str>)
        .map_err(sys(format!("mounting {dev} on {}", dir.display())))
}

/// Mount options of the VM's own disks. They are made with lazily
/// initialised inode tables (a sparse file stays small); `noinit_itable`
/// keeps the kernel from zeroing those tables in the background at every
/// boot, which under emulation competes with the boot for the CPU.
const VM_DISK_OPTIONS: &str = "noinit_itable";

fn mount_ext4_data(dev: &str, dir: &Path, flags: MsFlags, data: &str) -> Result<(), InitError> {
    mount(Some(dev), dir, Some("ext4"), flags, Some(data))
        .map_err(sys(format!("mounting {dev} on {} ({data})", dir.display())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    #[test]
    fn deleting_the_initramfs_keeps_the_new_root_and_other_file_systems() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path();
        for d in ["newroot/etc", "banger/modules", "dev"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("init"), "agent").expect("w");
        std::fs::write(root.join("banger/modules/a.ko"), "m").expect("w");
        std::fs::write(root.join("newroot/etc/os-release"), "ID=x").expect("w");
        let dev = std::fs::metadata(root).expect("md").dev();
        delete_tree(root, dev, &root.join("newroot"));
        let left: Vec<_> = std::fs::read_dir(root)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["newroot"]);
        assert!(root.join("newroot/etc/os-release").is_file());
    }

    #[test]
    fn the_old_root_is_emptied_through_its_open_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("initramfs");
        std::fs::create_dir_all(root.join("banger/modules")).expect("mkdir");
        std::fs::write(root.join("init"), "agent").expect("w");
        std::fs::write(root.join("banger/modules/a.ko"), "m").expect("w");
        let dir = std::fs::File::open(&root).expect("open");
        let dev = dir.metadata().expect("md").dev();
        // As after the switch: the directory's path no longer reaches it.
        let moved = t.path().join("elsewhere");
        std::fs::rename(&root, &moved).expect("rename");
        OldRoot { dir, dev }.delete();
        assert_eq!(std::fs::read_dir(&moved).expect("ls").count(), 0);
    }
}
