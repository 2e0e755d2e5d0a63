//! Per-VM disks.
//!
//! Every VM boots from its image's root file system, which is shared by all
//! of the image's VMs and never written. Each VM owns two more disks, both
//! sparse raw ext4 files in its directory:
//!
//! - the system overlay ([`OVERLAY_DISK`]): the upper layer of the overlayfs
//!   the guest agent's early-init mode stacks on the shared root, so writes
//!   to `/` persist without copying the image;
//! - the work disk ([`WORK_DISK`]): mounted at `/root`, cloned from the
//!   image's work seed and grown with `resize2fs` to the VM's disk size.
//!
//! Both are made with e2fsprogs on plain files: no root, no device-mapper,
//! no loop devices. Stop keeps them; delete removes the VM directory.

mod clone;
mod copy;
mod digest;
mod inject;
mod tree;

pub use clone::{
    CloneKind, Reserved, Unsynced, clone_file, clone_file_unsynced, reflink_supported,
    reserve_clone,
};
pub use digest::{DigestError, content_digest};
pub use inject::{GuestFile, write_files};
pub use tree::{EntryKind, GuestEntry, entry_path_ok, write_entries};

use banger_ext4::Ext4Error;
use std::path::{Path, PathBuf};

/// File name of a VM's system overlay disk inside its directory.
pub const OVERLAY_DISK: &str = "overlay.ext4";
/// File name of a VM's work disk inside its directory.
pub const WORK_DISK: &str = "work.ext4";

/// Smallest disk banger makes: ext4 with a journal needs some room, and a
/// guest with less than this for /root is not useful.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

const MIB: u64 = 1 << 20;

/// Errors making, growing or measuring disks.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path} does not exist: rebuild or re-pull the image")]
    MissingSource { path: PathBuf },
    #[error(transparent)]
    Ext4(Ext4Error),
    /// debugfs ran, but what it was to write is not in the disk.
    #[error("{tool} failed on {path}: {detail}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "no space left on the file system holding {path} (about {needed_mib} MiB needed): free some space and retry"
    )]
    NoSpace { path: PathBuf, needed_mib: u64 },
    #[error("disk {path} is {current} bytes; disks only grow, so {requested} bytes is refused")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("a disk must be at least {} MiB, not {requested} bytes", MIN_DISK_BYTES / MIB)]
    TooSmall { requested: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<Ext4Error> for StorageError {
    fn from(e: Ext4Error) -> Self {
        match e {
            Ext4Error::NoSpace { image, .. } => StorageError::NoSpace {
                path: image,
                needed_mib: 1,
            },
            e => StorageError::Ext4(e),
        }
    }
}

impl StorageError {
    /// An I/O error on `path`, turned into [`StorageError::NoSpace`] when
    /// the file system is full.
    fn io_on(path: &Path, needed: u64, context: String, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StorageError::NoSpace {
                path: path.to_path_buf(),
                needed_mib: needed.div_ceil(MIB),
            }
        } else {
            StorageError::Io { context, source }
        }
    }
}

/// The disks of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisks {
    pub overlay: PathBuf,
    pub work: PathBuf,
}

impl VmDisks {
    /// The disks of the VM whose directory is `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            overlay: dir.join(OVERLAY_DISK),
            work: dir.join(WORK_DISK),
        }
    }
}

/// What a new work disk starts from.
#[derive(Debug, Clone, Copy)]
pub enum WorkSource<'a> {
    /// A copy of the image's work seed (an ext4 image of its `/root`).
    Seed(&'a Path),
    /// An empty file system; the guest's early init fills it from the
    /// image's own `/root` on first boot (slower, for images without seed).
    Empty,
}

/// Host disk use of one disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Size the guest sees.
    pub virtual_bytes: u64,
    /// Bytes allocated on the host (the file is sparse).
    pub allocated_bytes: u64,
}

/// Makes `path` an empty sparse ext4 file system of `size` bytes for the
/// system overlay. Precondition: `path` does not exist. On error nothing is
/// left at `path`.
pub async fn create_overlay_disk(path: &Path, size: u64) -> Result<(), StorageError> {
    check_size(size)?;
    let result = async {
        create_sparse(path, size)?;
        mkfs_empty(path, "overlay").await
    }
    .await;
    remove_on_error(path, result)
}

/// Makes `path` the work disk: a copy of the seed (or an empty file system)
/// grown to `size` bytes. Precondition: `path` does not exist. On error,
/// including a full host disk, nothing is left at `path`.
pub async fn create_work_disk(
    source: WorkSource<'_>,
    path: &Path,
    size: u64,
) -> Result<(), StorageError> {
    check_size(size)?;
    let result = async {
        match source {
            WorkSource::Seed(seed) => {
                if !seed.is_file() {
                    return Err(StorageError::MissingSource {
                        path: seed.to_path_buf(),
                    });
                }
                let (seed, out) = (seed.to_path_buf(), path.to_path_buf());
                let copied = tokio::task::spawn_blocking(move || copy::sparse_copy(&seed, &out))
                    .await
                    .map_err(|e| StorageError::Io {
                        context: "disk copy worker".into(),
                        source: std::io::Error::other(e),
                    })?;
                copied.map_err(|(needed, e)| {
                    let context = format!("copying the work seed to {}", path.display());
                    StorageError::io_on(path, needed, context, e)
                })?;
                let len = file_len(path)?;
                if size > len {
                    grow_fs(path, size).await?;
                }
                Ok(())
            }
            WorkSource::Empty => {
                create_sparse(path, size)?;
                mkfs_empty(path, "work").await
            }
        }
    }
    .await;
    remove_on_error(path, result)
}

/// Grows the ext4 file system in `path` (not in use by a VM) to `size`
/// bytes. Growing to the current size is a no-op; shrinking is refused.
/// Returns the new size.
pub async fn grow_disk(path: &Path, size: u64) -> Result<u64, StorageError> {
    let current = file_len(path)?;
    if size < current {
        return Err(StorageError::Shrink {
            path: path.to_path_buf(),
            current,
            requested: size,
        });
    }
    if size > current {
        grow_fs(path, size).await?;
    }
    Ok(size)
}

/// Virtual and allocated size of a disk file; zeros when it is missing.
pub fn disk_usage(path: &Path) -> DiskUsage {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(md) => DiskUsage {
            virtual_bytes: md.len(),
            allocated_bytes: md.blocks() * 512,
        },
        Err(_) => DiskUsage::default(),
    }
}

/// Bytes actually allocated on the host by the files under `dir` (sparse-aware).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            total += allocated_bytes(&e.path());
        } else {
            total += md.blocks() * 512;
        }
    }
    total
}

fn check_size(size: u64) -> Result<(), StorageError> {
    if size < MIN_DISK_BYTES {
        return Err(StorageError::TooSmall { requested: size });
    }
    Ok(())
}

fn file_len(path: &Path) -> Result<u64, StorageError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| StorageError::Io {
            context: format!("reading {}", path.display()),
            source,
        })
}

/// A new sparse file of `size` bytes, the owner's only (mode 0600: disks
/// hold the VM's host key and `file_sync` secrets).
fn create_sparse(path: &Path, size: u64) -> Result<(), StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| StorageError::io_on(path, MIB, format!("creating {}", path.display()), e))
}

/// Removes what a failed create left at `path`, unless the failure was
/// that `path` already existed (then it is someone else's file).
fn remove_on_error(path: &Path, result: Result<(), StorageError>) -> Result<(), StorageError> {
    let existed = matches!(&result, Err(StorageError::Io { source, .. })
        if source.kind() == std::io::ErrorKind::AlreadyExists);
    if result.is_err() && !existed {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// An empty ext4 whose root directory belongs to root (whoever runs mkfs):
/// the guest mounts it at / (upper layer) or /root, where sshd checks
/// ownership.
async fn mkfs_empty(path: &Path, label: &str) -> Result<(), StorageError> {
    let mode = if label == "work" { 0o700 } else { 0o755 };
    Ok(banger_ext4::mkfs_empty(path, label, mode).await?)
}

/// Extends the file to `size` and grows its ext4 to fill it.
async fn grow_fs(path: &Path, size: u64) -> Result<(), StorageError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| StorageError::io_on(path, MIB, format!("extending {}", path.display()), e))?;
    Ok(banger_ext4::grow(path).await?)
}

#[cfg(test)]
mod tests;
