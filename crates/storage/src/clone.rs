//! Cloning a file (a template's disk or memory) into a VM's directory:
//! a reflink when the file system shares extents (btrfs, XFS, bcachefs),
//! else a sparse copy.

use crate::{MIB, StorageError, copy};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How [`clone_file`] made its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    /// Extents shared with the source (copy-on-write): instant, no space.
    Reflink,
    /// Data extents copied, holes kept.
    Sparse,
}

impl CloneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneKind::Reflink => "reflink",
            CloneKind::Sparse => "sparse",
        }
    }
}

/// Copies `src` to the new file `dst` (mode 0600; it must not exist):
/// a reflink when the file system can, else a sparse copy, synced. Blocking:
/// call from a blocking thread for large files. On error nothing is left
/// at `dst` (unless it already existed, which is the error); a full file
/// system is [`StorageError::NoSpace`].
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneKind, StorageError> {
    let clone = clone_file_unsynced(src, dst)?;
    let synced = clone.sync();
    if synced.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    synced
}

/// A clone whose data may be only in the page cache yet (a copy; a
/// reflink shares extents already on disk). [`Unsynced::sync`] puts it on
/// disk; until then a crash of the host may lose it.
#[derive(Debug)]
pub struct Unsynced {
    kind: CloneKind,
    file: File,
    path: PathBuf,
    needed: u64,
}

impl Unsynced {
    pub fn kind(&self) -> CloneKind {
        self.kind
    }

    /// Syncs a copy's data and metadata; a full file system (delayed
    /// allocation) is [`StorageError::NoSpace`]. The file stays on error.
    pub fn sync(self) -> Result<CloneKind, StorageError> {
        if self.kind == CloneKind::Sparse {
            self.file.sync_all().map_err(|e| {
                let context = format!("syncing {}", self.path.display());
                StorageError::io_on(&self.path, self.needed, context, e)
            })?;
        }
        Ok(self.kind)
    }
}

/// [`clone_file`] without the sync, for a caller that has other work to
/// do meanwhile: it syncs the result with [`Unsynced::sync`] (and removes
/// the file should that fail).
pub fn clone_file_unsynced(src: &Path, dst: &Path) -> Result<Unsynced, StorageError> {
    let reserved = reserve_clone(src, dst)?;
    reserved.fill().inspect_err(|_| {
        let _ = std::fs::remove_file(dst);
    })
}

/// A clone's destination made, not filled yet: see [`reserve_clone`].
#[derive(Debug)]
pub struct Reserved {
    from: File,
    to: File,
    src: PathBuf,
    dst: PathBuf,
}

/// Makes the new file `dst` (mode 0600; it must not exist) as long as
/// `src` and all hole, so that a VMM can open it at once while
/// [`Reserved::fill`] puts `src`'s contents into that same file. On error
/// nothing is left at `dst` (unless it already existed, which is the error).
pub fn reserve_clone(src: &Path, dst: &Path) -> Result<Reserved, StorageError> {
    let from = File::open(src).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StorageError::MissingSource {
                path: src.to_path_buf(),
            }
        } else {
            StorageError::Io {
                context: format!("opening {}", src.display()),
                source: e,
            }
        }
    })?;
    // Template files hold guest memory and disks: the owner's only.
    let to = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| StorageError::io_on(dst, MIB, format!("creating {}", dst.display()), e))?;
    let sized = from.metadata().and_then(|m| to.set_len(m.len()));
    if let Err(e) = sized {
        drop(to);
        let _ = std::fs::remove_file(dst);
        return Err(StorageError::io_on(
            dst,
            MIB,
            format!("sizing {}", dst.display()),
            e,
        ));
    }
    Ok(Reserved {
        from,
        to,
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
    })
}

impl Reserved {
    /// Clones the source into the reserved file (a reflink when the file
    /// system can, else a sparse copy), unsynced. Blocking. The file stays
    /// on error: its owner removes it.
    pub fn fill(self) -> Result<Unsynced, StorageError> {
        let Reserved {
            mut from,
            mut to,
            src,
            dst,
        } = self;
        let kind = clone_into(&src, &mut from, &mut to, &dst)?;
        Ok(Unsynced {
            kind,
            file: to,
            needed: copy::allocated(&from),
            path: dst,
        })
    }
}

fn clone_into(
    src: &Path,
    from: &mut File,
    to: &mut File,
    dst: &Path,
) -> Result<CloneKind, StorageError> {
    match ficlone(from, to) {
        Ok(()) => return Ok(CloneKind::Reflink),
        Err(e) if reflink_unavailable(&e) => {}
        Err(e) => {
            let context = format!("reflinking {} to {}", src.display(), dst.display());
            return Err(StorageError::io_on(dst, MIB, context, e));
        }
    }
    copy::copy_into(src, from, to).map_err(|(needed, e)| {
        let context = format!("copying {} to {}", src.display(), dst.display());
        StorageError::io_on(dst, needed, context, e)
    })?;
    Ok(CloneKind::Sparse)
}

/// `ioctl(dst, FICLONE, src)`: the whole of `src` shared into `dst`.
fn ficlone(from: &File, to: &File) -> std::io::Result<()> {
    // SAFETY: both descriptors are open for the duration of the call;
    // FICLONE takes the source descriptor as its integer argument.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The errors that mean "this file system (pair) cannot share extents",
/// after which a plain copy is right: no support (ext4, tmpfs), different
/// file systems, or a file the file system will not clone.
fn reflink_unavailable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)
    )
}

/// Whether files in `dir` can be reflinked to each other (probed with two
/// small files, removed again). For `doctor` and the bench.
pub fn reflink_supported(dir: &Path) -> bool {
    let pid = std::process::id();
    let a = probe_path(dir, pid, "a");
    let b = probe_path(dir, pid, "b");
    let result = (|| -> std::io::Result<()> {
        let src = File::options()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&a)?;
        std::io::Write::write_all(&mut &src, &[0u8; 4096])?;
        let dst = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&b)?;
        ficlone(&src, &dst)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result.is_ok()
}

fn probe_path(dir: &Path, pid: u32, which: &str) -> PathBuf {
    dir.join(format!(".banger-reflink-probe-{pid}-{which}"))
}
