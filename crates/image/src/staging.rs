//! The staging directory a build works in, and getting rid of it safely.
//!
//! mmdebstrap (root mode) mounts /proc, /sys, /dev/pts and friends inside its
//! chroot and unmounts them only when it finishes normally. A killed build can
//! leave them mounted, and deleting a tree recursively through a mounted
//! `/dev/shm` would delete the host's files, so every removal here unmounts
//! first and refuses to delete while anything is still mounted.

use crate::ImageError;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, umount2};
use std::fs::File;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Prefix of staging directories inside the images directory.
pub(crate) const STAGING_PREFIX: &str = ".staging-";

/// Lock file that serialises builds sharing an images directory.
pub const LOCK_FILE: &str = ".build.lock";

/// Mount points at or below `dir` in this process's mount namespace, in
/// mount order (parents before children).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// Mount points (field 5) of a mountinfo text.
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted at or below `dir`, children first. A mount
/// that is busy (a dying process still uses it) is detached lazily: it
/// disappears from the tree at once.
pub(crate) fn unmount_all_under(dir: &Path) -> Result<(), ImageError> {
    // Mounts can stack on the same point; a few passes take them all.
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts.iter().rev() {
            if umount2(m, MntFlags::empty()).is_err() {
                let _ = umount2(m, MntFlags::MNT_DETACH);
            }
        }
    }
    let count = mounts_under(dir).len();
    if count == 0 {
        Ok(())
    } else {
        Err(ImageError::MountsLeft {
            dir: dir.to_path_buf(),
            count,
        })
    }
}

/// Unmounts what is mounted under `dir`, then deletes it (a file or symlink
/// is just removed). A missing `dir` is fine.
pub fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    let removed = match std::fs::symlink_metadata(dir) {
        Err(_) => return Ok(()),
        Ok(m) if !m.is_dir() => std::fs::remove_file(dir),
        Ok(_) => {
            unmount_all_under(dir)?;
            std::fs::remove_dir_all(dir)
        }
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Io {
            context: format!("removing {}", dir.display()),
            source: e,
        }),
    }
}

/// Removes what crashed builds left in `images_dir`. Only call it while
/// holding the build lock: then no staging directory belongs to a live build.
pub(crate) fn remove_stale(images_dir: &Path) -> Result<(), ImageError> {
    let entries = std::fs::read_dir(images_dir)
        .map_err(ImageError::io(format!("listing {}", images_dir.display())))?;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// Takes the exclusive build lock of `images_dir`, waiting for another build
/// to finish. The lock is released when the returned value is dropped, or by
/// the kernel if the process dies.
pub(crate) async fn lock_images_dir(
    images_dir: &Path,
    cancel: &CancellationToken,
) -> Result<Flock<File>, ImageError> {
    let path = images_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(ImageError::io(format!("opening {}", path.display())))?;
    let ctx = format!("locking {}", path.display());
    let wait = tokio::task::spawn_blocking(move || {
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
            context: ctx,
            source: std::io::Error::from(errno),
        })
    });
    tokio::select! {
        // If cancelled while waiting, the blocking task drops the lock as soon
        // as it gets it.
        _ = cancel.cancelled() => Err(ImageError::Cancelled),
        r = wait => r.map_err(|e| ImageError::Io { context: "waiting for the build lock".into(), source: std::io::Error::other(e) })?,
    }
}

/// A build's staging directory. Unless [`Staging::keep`] is called it is
/// removed when dropped, so a build future dropped mid-way cleans up too.
pub struct Staging {
    dir: PathBuf,
    armed: bool,
}

impl Staging {
    /// Creates `images_dir/.staging-<name>-<random>`.
    pub fn create(images_dir: &Path, name: &str) -> Result<Staging, ImageError> {
        let dir = images_dir.join(format!(
            "{STAGING_PREFIX}{name}-{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir(&dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
        Ok(Staging { dir, armed: true })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Removes the directory now (unmounting first) and reports failures.
    pub async fn discard(mut self) -> Result<(), ImageError> {
        self.armed = false;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || remove_tree(&dir))
            .await
            .map_err(|e| ImageError::Io {
                context: format!("removing {}", self.dir.display()),
                source: std::io::Error::other(e),
            })?
    }

    /// The directory stays; the caller has moved or taken it over.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_tree(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes_mount_points() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    90 27 0:50 / /var/lib/banger/images/.staging-a\\040b/root/proc rw - proc proc rw\n";
        assert_eq!(
            parse_mount_points(text),
            [
                PathBuf::from("/proc"),
                PathBuf::from("/var/lib/banger/images/.staging-a b/root/proc")
            ]
        );
        assert_eq!(unescape_octal("/a\\134b\\011c"), "/a\\b\tc");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn nothing_is_mounted_under_a_fresh_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        assert!(mounts_under(t.path()).is_empty());
        let all = mounts_under(Path::new("/"));
        assert!(
            all.contains(&PathBuf::from("/")) && all.contains(&PathBuf::from("/proc")),
            "{all:?}"
        );
    }

    #[test]
    fn stale_staging_dirs_go_and_everything_else_stays() {
        let t = tempfile::tempdir().expect("tempdir");
        for d in [
            ".staging-deb-1/root/etc",
            ".staging-other-2/root",
            "deb",
            "other",
        ] {
            std::fs::create_dir_all(t.path().join(d)).expect("mkdir");
        }
        std::fs::write(t.path().join(".staging-deb-3"), "half-written file").expect("write");
        std::fs::write(t.path().join("deb/manifest.json"), "{}").expect("write");
        remove_stale(t.path()).expect("remove stale");
        let mut left: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        assert_eq!(left, ["deb", "other"]);
        assert!(t.path().join("deb/manifest.json").exists());
    }

    #[test]
    fn a_dropped_staging_dir_is_removed_unless_kept() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = Staging::create(t.path(), "img").expect("create");
        let dropped = s.path().to_path_buf();
        assert!(
            dropped
                .file_name()
                .expect("name")
                .to_string_lossy()
                .starts_with(".staging-img-")
        );
        std::fs::create_dir_all(dropped.join("root/etc")).expect("mkdir");
        drop(s);
        assert!(!dropped.exists());

        let s = Staging::create(t.path(), "img").expect("create");
        let kept = s.path().to_path_buf();
        s.keep();
        assert!(kept.is_dir());
    }

    #[tokio::test]
    async fn discard_removes_now_and_the_build_lock_is_exclusive() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = Staging::create(t.path(), "img").expect("create");
        let dir = s.path().to_path_buf();
        s.discard().await.expect("discard");
        assert!(!dir.exists());

        let cancel = CancellationToken::new();
        let held = lock_images_dir(t.path(), &cancel).await.expect("lock");
        // A second locker waits; cancelling it returns at once.
        let waiter = {
            let (dir, cancel) = (t.path().to_path_buf(), cancel.clone());
            tokio::spawn(async move { lock_images_dir(&dir, &cancel).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        cancel.cancel();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("waiter returns");
        assert!(matches!(r.expect("join"), Err(ImageError::Cancelled)));
        drop(held);
        let again = lock_images_dir(t.path(), &CancellationToken::new()).await;
        assert!(again.is_ok());
    }

    #[test]
    fn removes_what_is_mounted_under_a_tree_before_deleting_it() {
        if !nix::unistd::geteuid().is_root() {
            // Mounting needs root; the build itself requires root anyway.
            panic!("this test needs root (mount a tmpfs)");
        }
        let t = tempfile::tempdir().expect("tempdir");
        let tree = t.path().join(".staging-x-1/root");
        let mnt = tree.join("proc");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs");
        std::fs::write(mnt.join("inside"), "x").expect("write");
        assert_eq!(mounts_under(t.path()), std::slice::from_ref(&mnt));
        remove_stale(t.path()).expect("remove");
        assert!(mounts_under(t.path()).is_empty());
        assert!(!t.path().join(".staging-x-1").exists());
    }
}
