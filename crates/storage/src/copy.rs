//! Sparse file copy: only the data extents of the source are copied, holes
//! stay holes, so cloning a mostly empty file system image costs what its
//! files take, not its size.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Copies `src` to the new file `dst` (which must not exist), keeping
/// holes. On error returns how many bytes the copy needed in total, with
/// the cause; the caller removes `dst`.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> Result<(), (u64, io::Error)> {
    let mut from = File::open(src).map_err(|e| (0, e))?;
    let needed = allocated(&from);
    // Disks hold secrets (file_sync files, host keys): the owner's only.
    let mut to = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| (needed, e))?;
    copy_into(src, &mut from, &mut to)?;
    to.sync_all().map_err(|e| (needed, e))
}

/// Copies the data extents of `from` (opened from `src`) into the empty
/// file `to` and sets its length; the caller syncs it. On error returns
/// how many bytes the copy needed in total, with the cause.
pub(crate) fn copy_into(
    src: &Path,
    from: &mut File,
    to: &mut File,
) -> Result<(), (u64, io::Error)> {
    let len = from.metadata().map_err(|e| (0, e))?.len();
    let needed = allocated(from);
    let fail = |e| (needed, e);
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek_data(from, pos).map_err(fail)? else {
            break;
        };
        let end = seek_hole(from, start).map_err(fail)?.min(len);
        from.seek(SeekFrom::Start(start)).map_err(fail)?;
        to.seek(SeekFrom::Start(start)).map_err(fail)?;
        let copied = io::copy(&mut from.take(end - start), to).map_err(fail)?;
        if copied != end - start {
            return Err(fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being copied", src.display()),
            )));
        }
        pos = end;
    }
    to.set_len(len).map_err(fail)
}

/// Bytes `f` takes on disk.
pub(crate) fn allocated(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Next data offset at or after `pos`, `None` when only a hole follows.
pub(crate) fn seek_data(f: &File, pos: u64) -> io::Result<Option<u64>> {
    match nix::unistd::lseek(f.as_fd(), to_off(pos)?, nix::unistd::Whence::SeekData) {
        Ok(off) => Ok(Some(off as u64)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Next hole at or after `pos` (the end of file counts as a hole).
pub(crate) fn seek_hole(f: &File, pos: u64) -> io::Result<u64> {
    nix::unistd::lseek(f.as_fd(), to_off(pos)?, nix::unistd::Whence::SeekHole)
        .map(|off| off as u64)
        .map_err(Into::into)
}

fn to_off(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}
