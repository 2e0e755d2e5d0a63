//! A content digest of a sparse disk or memory file that reads only its
//! data: a template's 8 GiB disks hold a few MiB, and a plain sha256 of
//! them reads (and hashes) every zero of their holes.

use crate::copy::{seek_data, seek_hole};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The unit zeros are skipped in: a page, and the block of every file
/// system banger writes.
const BLOCK: usize = 4096;

/// Read size within a data extent.
const CHUNK: usize = 1 << 20;

/// Why [`content_digest`] has no answer.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `stop` said so between two reads.
    #[error("hashing {path} was stopped")]
    Stopped { path: PathBuf },
}

/// The sha256 (hex) of the file's non-zero 4 KiB blocks, each preceded by
/// its offset (little-endian u64), then of its length. It depends on the
/// bytes alone, not on which ranges are holes, so a copy of the file
/// (sparse or not) has the same digest; only the data extents are read,
/// and zero blocks in them are skipped. `stop` is asked before every
/// 1 MiB read, so a caller that is going away is not held up.
pub fn content_digest(path: &Path, stop: &dyn Fn() -> bool) -> Result<String, DigestError> {
    let fail = |source| DigestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(fail)?;
    let len = f.metadata().map_err(fail)?.len();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek_data(&f, pos).map_err(fail)? else {
            break;
        };
        let hole = seek_hole(&f, data).map_err(fail)?;
        let (start, end) = blocks_of(data, hole, pos, len);
        f.seek(SeekFrom::Start(start)).map_err(fail)?;
        let mut at = start;
        while at < end {
            if stop() {
                return Err(DigestError::Stopped {
                    path: path.to_path_buf(),
                });
            }
            let want = usize::try_from(end - at).map_or(CHUNK, |n| n.min(CHUNK));
            let got = read_full(&mut f, &mut buf[..want]).map_err(fail)?;
            if got == 0 {
                // Shorter than its length said: it changed under us.
                return Err(fail(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while being hashed",
                )));
            }
            for (i, block) in buf[..got].chunks(BLOCK).enumerate() {
                if !is_zero(block) {
                    hash.update((at + (i * BLOCK) as u64).to_le_bytes());
                    hash.update(block);
                }
            }
            at += got as u64;
        }
        pos = end;
    }
    hash.update(len.to_le_bytes());
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The whole [`BLOCK`]s holding the data extent `data..hole`, from `pos`
/// (a block boundary where the previous extent's blocks ended) on: a file
/// system with smaller blocks reports extents that start or end inside a
/// block, and a block must be hashed once, at its own offset.
fn blocks_of(data: u64, hole: u64, pos: u64, len: u64) -> (u64, u64) {
    let block = BLOCK as u64;
    let start = (data - data % block).max(pos);
    let end = hole.div_ceil(block).saturating_mul(block).min(len);
    (start, end.max(start))
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_zero(block: &[u8]) -> bool {
    // An OR over the block vectorizes; an early-exit scan does not.
    block.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn never() -> bool {
        false
    }

    #[test]
    fn a_sparse_file_and_its_dense_copy_have_one_digest() {
        let dir = tempfile::tempdir().expect("ok");
        let (sparse, dense) = (dir.path().join("sparse"), dir.path().join("dense"));
        let f = File::create(&sparse).expect("ok");
        f.set_len(64 << 20).expect("ok");
        f.write_all_at(b"superblock", 1024).expect("ok");
        f.write_all_at(&[7u8; 5000], 40 << 20).expect("ok");
        drop(f);
        // The same bytes, every zero written out.
        let mut all = vec![0u8; 64 << 20];
        all[1024..1034].copy_from_slice(b"superblock");
        all[40 << 20..(40 << 20) + 5000].fill(7);
        File::create(&dense)
            .expect("ok")
            .write_all(&all)
            .expect("ok");
        let a = content_digest(&sparse, &never).expect("ok");
        assert_eq!(a, content_digest(&dense, &never).expect("ok"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn a_changed_byte_or_length_changes_the_digest() {
        let dir = tempfile::tempdir().expect("ok");
        let path = dir.path().join("f");
        let f = File::create(&path).expect("ok");
        f.set_len(8 << 20).expect("ok");
        f.write_all_at(b"x", 3 << 20).expect("ok");
        let first = content_digest(&path, &never).expect("ok");
        // A byte in what was a hole.
        f.write_all_at(b"y", 6 << 20).expect("ok");
        let second = content_digest(&path, &never).expect("ok");
        assert_ne!(first, second);
        // Back to zero: the same bytes as the first time.
        f.write_all_at(&[0], 6 << 20).expect("ok");
        assert_eq!(content_digest(&path, &never).expect("ok"), first);
        // The same data moved one block on.
        f.write_all_at(&[0], 3 << 20).expect("ok");
        f.write_all_at(b"x", (3 << 20) + BLOCK as u64).expect("ok");
        assert_ne!(content_digest(&path, &never).expect("ok"), first);
        // Only longer: trailing zeros count.
        f.write_all_at(&[0], (3 << 20) + BLOCK as u64).expect("ok");
        f.write_all_at(b"x", 3 << 20).expect("ok");
        f.set_len((8 << 20) + 1).expect("ok");
        assert_ne!(content_digest(&path, &never).expect("ok"), first);
        // Empty files differ by nothing but have a digest.
        let empty = dir.path().join("empty");
        File::create(&empty).expect("ok");
        assert_eq!(content_digest(&empty, &never).expect("ok").len(), 64);
    }

    /// Extents of a file system with 1 KiB blocks start and end inside a
    /// 4 KiB block: each block is taken whole, once, and the walk moves on.
    #[test]
    fn extents_inside_a_block_give_whole_blocks_once() {
        // Data at [0, 1024) and [2048, 3072) of a 1 MiB file.
        assert_eq!(blocks_of(0, 1024, 0, 1 << 20), (0, 4096));
        // The second extent lies in the block already hashed.
        assert_eq!(blocks_of(2048, 3072, 4096, 1 << 20), (4096, 4096));
        assert_eq!(blocks_of(5120, 9216, 4096, 1 << 20), (4096, 12288));
        // The end of the file ends the last block.
        assert_eq!(blocks_of(8192, 10000, 8192, 10000), (8192, 10000));
    }

    #[test]
    fn a_stop_ends_the_hashing_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().expect("ok");
        let path = dir.path().join("f");
        File::create(&path)
            .expect("ok")
            .write_all(&vec![1u8; 4 << 20])
            .expect("ok");
        let asked = std::cell::Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        let err = content_digest(&path, &stop).expect_err("an error");
        assert!(matches!(err, DigestError::Stopped { .. }), "{err}");
        assert_eq!(asked.get(), 3, "asked before each read, stopped at once");
        let err = content_digest(&dir.path().join("nope"), &never).expect_err("an error");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
