//! Writes a [`Plan`] as a tar stream.
//!
//! A file with holes (fewer blocks allocated than its size: a disk image,
//! say) is written as a GNU sparse entry: only its data regions, found with
//! `SEEK_DATA`/`SEEK_HOLE`, travel, and [`crate::unpack`] recreates the
//! holes. Other files are plain entries.

use crate::plan::{Plan, Source};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

/// tar's block size: sparse data regions start and end on it.
const BLOCK: u64 = 512;

/// Errors while writing a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while it was being copied ({expected} bytes planned); copy again")]
    Changed { path: PathBuf, expected: u64 },
    #[error("writing the archive: {0}")]
    Write(#[source] io::Error),
    #[error("git blob {oid} of {name}: {source}")]
    Blob {
        oid: String,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} needs git objects but no repository was given")]
    NoBlobs(String),
}

/// Content of git blobs, by object id.
pub trait BlobSource {
    /// A reader of exactly the blob's bytes.
    fn blob(&mut self, oid: &str) -> io::Result<(u64, Box<dyn Read + '_>)>;
}

/// Writes `plan` as a tar stream to `out`, calling `progress` with the
/// number of content bytes written so far. Files are re-read at this point;
/// one whose size changed since planning fails the transfer instead of
/// producing a corrupt archive.
pub fn write_tar<W: Write>(
    plan: &Plan,
    out: W,
    mut blobs: Option<&mut dyn BlobSource>,
    progress: &mut dyn FnMut(u64),
) -> Result<W, PackError> {
    let mut b = tar::Builder::new(out);
    let mut done: u64 = 0;
    for e in &plan.entries {
        let mut h = Header::new_gnu();
        h.set_mode(e.mode);
        h.set_mtime(e.mtime);
        h.set_uid(0);
        h.set_gid(0);
        match &e.source {
            Source::Dir => {
                h.set_entry_type(EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, &e.name, io::empty())
                    .map_err(PackError::Write)?;
            }
            Source::Symlink(target) => {
                h.set_entry_type(EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &e.name, target)
                    .map_err(PackError::Write)?;
            }
            Source::File(path) | Source::GitInternal(path) => {
                let f = match std::fs::File::open(path) {
                    Ok(f) => f,
                    Err(err)
                        if err.kind() == io::ErrorKind::NotFound
                            && matches!(e.source, Source::GitInternal(_)) =>
                    {
                        continue;
                    }
                    Err(source) => {
                        return Err(PackError::Read {
                            path: path.clone(),
                            source,
                        });
                    }
                };
                if let Some(regions) = sparse_regions(&f, e.size) {
                    append_sparse(
                        &mut b, h, &e.name, &f, e.size, &regions, &mut done, progress,
                    )
                    .map_err(|err| match err {
                        SparseError::Changed => PackError::Changed {
                            path: path.clone(),
                            expected: e.size,
                        },
                        SparseError::Read(source) => PackError::Read {
                            path: path.clone(),
                            source,
                        },
                        SparseError::Write(source) => PackError::Write(source),
                    })?;
                    continue;
                }
                h.set_entry_type(EntryType::Regular);
                h.set_size(e.size);
                let mut r = Exact::new(f, e.size, &mut done, progress);
                let res = b.append_data(&mut h, &e.name, &mut r);
                if r.short {
                    return Err(PackError::Changed {
                        path: path.clone(),
                        expected: e.size,
                    });
                }
                res.map_err(|source| match source.kind() {
                    io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero => {
                        PackError::Write(source)
                    }
                    _ if r.read_failed => PackError::Read {
                        path: path.clone(),
                        source,
                    },
                    _ => PackError::Write(source),
                })?;
            }
            Source::Blob { oid } => {
                let src = blobs
                    .as_deref_mut()
                    .ok_or_else(|| PackError::NoBlobs(e.name.clone()))?;
                let blob_err = |source| PackError::Blob {
                    oid: oid.clone(),
                    name: e.name.clone(),
                    source,
                };
                let (size, reader) = src.blob(oid).map_err(blob_err)?;
                h.set_entry_type(EntryType::Regular);
                h.set_size(size);
                let mut r = Exact::new(reader, size, &mut done, progress);
                let res = b.append_data(&mut h, &e.name, &mut r);
                if r.short || r.read_failed {
                    return Err(blob_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "git cat-file ended early",
                    )));
                }
                res.map_err(PackError::Write)?;
            }
            Source::Bytes(data) => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(data.len() as u64);
                let mut r = Exact::new(data.as_slice(), data.len() as u64, &mut done, progress);
                b.append_data(&mut h, &e.name, &mut r)
                    .map_err(PackError::Write)?;
            }
        }
    }
    b.into_inner().map_err(PackError::Write)
}

/// The data regions `(offset, length)` of `f` (of `size` bytes), on tar
/// block boundaries, when it has holes; `None` for a file without holes or
/// on a file system that cannot say where they are.
fn sparse_regions(f: &std::fs::File, size: u64) -> Option<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let md = f.metadata().ok()?;
    if size == 0 || md.blocks().saturating_mul(512) >= size {
        return None;
    }
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut at: u64 = 0;
    while at < size {
        let start = match lseek(f, i64::try_from(at).ok()?, Whence::SeekData) {
            Ok(o) => o as u64,
            // No data after `at`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = match lseek(f, start as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).min(size),
            Err(_) => return None,
        };
        if end <= start {
            return None;
        }
        // Whole tar blocks (a little hole read as data is harmless).
        let (start, end) = (start / BLOCK * BLOCK, end.div_ceil(BLOCK) * BLOCK);
        let end = end.min(size);
        match regions.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = end.max(last.0 + last.1) - last.0,
            _ => regions.push((start, end - start)),
        }
        at = end;
    }
    Some(regions)
}

/// Why a sparse entry could not be written.
enum SparseError {
    Changed,
    Read(io::Error),
    Write(io::Error),
}

/// Appends `f` as a GNU sparse entry holding `regions` of its `size` bytes:
/// the header lists the first four regions, extension headers (21 each)
/// the rest, then the regions' data follows; a region `(size, 0)` ends the
/// map when the file ends in a hole.
#[allow(clippy::too_many_arguments)]
fn append_sparse<W: Write>(
    b: &mut tar::Builder<W>,
    mut h: Header,
    name: &str,
    f: &std::fs::File,
    size: u64,
    regions: &[(u64, u64)],
    done: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), SparseError> {
    let mut map: Vec<(u64, u64)> = regions.to_vec();
    if map.last().is_none_or(|&(o, l)| o + l < size) {
        map.push((size, 0));
    }
    let stored: u64 = map.iter().map(|&(_, l)| l).sum();
    let set = |slot: &mut GnuSparseHeader, &(offset, length): &(u64, u64)| {
        slot.set_offset(offset);
        slot.set_length(length);
    };
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(stored);
    let (first, rest) = map.split_at(map.len().min(4));
    {
        let gnu = h
            .as_gnu_mut()
            .ok_or_else(|| SparseError::Write(io::Error::other("not a GNU header")))?;
        gnu.set_real_size(size);
        for (slot, r) in gnu.sparse.iter_mut().zip(first) {
            set(slot, r);
        }
        gnu.set_is_extended(!rest.is_empty());
    }
    // Extension headers go between the header and the data: `append_data`
    // writes them as the start of the entry's content (they are whole
    // blocks, so its padding stays right).
    let mut ext_blocks = Vec::new();
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, r) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            set(slot, r);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        ext_blocks.extend_from_slice(ext.as_bytes());
    }
    let mut data = Regions {
        f,
        regions: regions.to_vec(),
        current: 0,
        pos: regions.first().map_or(0, |r| r.0),
        short: false,
        read_failed: None,
    };
    let before = *done;
    let mut counted = Counted {
        inner: (&ext_blocks[..]).chain(&mut data),
        skip: ext_blocks.len() as u64,
        done,
        progress,
    };
    let res = b.append_data(&mut h, name, &mut counted);
    if data.short {
        return Err(SparseError::Changed);
    }
    if let Some(e) = data.read_failed.take() {
        return Err(SparseError::Read(e));
    }
    res.map_err(SparseError::Write)?;
    // The holes count as copied.
    *done = before + size;
    progress(*done);
    Ok(())
}

/// Reads the data regions of a file one after the other.
struct Regions<'a> {
    f: &'a std::fs::File,
    regions: Vec<(u64, u64)>,
    current: usize,
    /// The next offset to read in the file.
    pos: u64,
    /// The file ended before a region did (it shrank).
    short: bool,
    read_failed: Option<io::Error>,
}

impl Read for Regions<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(&(offset, length)) = self.regions.get(self.current) else {
                return Ok(0);
            };
            let end = offset + length;
            if self.pos >= end {
                self.current += 1;
                if let Some(&(next, _)) = self.regions.get(self.current) {
                    self.pos = next;
                }
                continue;
            }
            let cap = buf
                .len()
                .min(usize::try_from(end - self.pos).unwrap_or(usize::MAX));
            let n = match self.f.read_at(&mut buf[..cap], self.pos) {
                Ok(n) => n,
                Err(e) => {
                    let shown = io::Error::new(e.kind(), e.to_string());
                    self.read_failed = Some(e);
                    return Err(shown);
                }
            };
            if n == 0 {
                self.short = true;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while copying",
                ));
            }
            self.pos += n as u64;
            return Ok(n);
        }
    }
}

/// Counts the bytes read through it for `progress`, after the first `skip`.
struct Counted<'a, R> {
    inner: R,
    skip: u64,
    done: &'a mut u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let skipped = (n as u64).min(self.skip);
        self.skip -= skipped;
        *self.done += n as u64 - skipped;
        (self.progress)(*self.done);
        Ok(n)
    }
}

/// Reads exactly `left` bytes: stops there even if the source grew, and
/// flags `short` if it ends before (the tar header already promised them).
struct Exact<'a, R> {
    inner: R,
    left: u64,
    short: bool,
    read_failed: bool,
    done: &'a mut u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<'a, R: Read> Exact<'a, R> {
    fn new(inner: R, left: u64, done: &'a mut u64, progress: &'a mut dyn FnMut(u64)) -> Self {
        Self {
            inner,
            left,
            short: false,
            read_failed: false,
            done,
            progress,
        }
    }
}

impl<R: Read> Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let cap = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..cap]) {
            Ok(n) => n,
            Err(e) => {
                self.read_failed = true;
                return Err(e);
            }
        };
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while copying",
            ));
        }
        self.left -= n as u64;
        *self.done += n as u64;
        (self.progress)(*self.done);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan_path;

    #[test]
    fn roundtrips_through_unpack() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("d")).expect("mkdir");
        std::fs::write(src.join("d/x"), "data").expect("write");
        std::os::unix::fs::symlink("d/x", src.join("l")).expect("symlink");
        let plan = plan_path(&src, "copy").expect("plan");
        let mut last = 0;
        let tar = write_tar(&plan, Vec::new(), None, &mut |n| last = n).expect("tar");
        assert_eq!(last, 4);
        let dst = t.path().join("dst");
        let got = crate::unpack(tar.as_slice(), &dst).expect("unpack");
        assert_eq!(got.files, 2);
        assert_eq!(got.bytes, 4);
        assert_eq!(
            std::fs::read_to_string(dst.join("copy/d/x")).expect("read"),
            "data"
        );
        assert_eq!(
            std::fs::read_link(dst.join("copy/l")).expect("link"),
            PathBuf::from("d/x")
        );
    }

    /// A file of `size` bytes with data (not zeros) at `(offset, length)`s.
    fn sparse_file(path: &std::path::Path, size: u64, data: &[(u64, u64)]) -> Vec<u8> {
        let f = std::fs::File::create(path).expect("create");
        f.set_len(size).expect("set_len");
        let mut want = vec![0u8; size as usize];
        for (i, &(offset, length)) in data.iter().enumerate() {
            let chunk: Vec<u8> = (0..length)
                .map(|j| (i as u64 * 7 + j % 251 + 1) as u8)
                .collect();
            f.write_all_at(&chunk, offset).expect("write");
            want[offset as usize..(offset + length) as usize].copy_from_slice(&chunk);
        }
        want
    }

    fn allocated(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    #[test]
    fn sparse_files_travel_as_their_data_and_arrive_sparse() {
        const MIB: u64 = 1 << 20;
        let t = tempfile::tempdir().expect("tmp");
        /// Name, size and data regions of each test file.
        type Case = (&'static str, u64, Vec<(u64, u64)>);
        let cases: Vec<Case> = vec![
            // Data at both ends, a hole between.
            ("ends", 64 * MIB, vec![(0, 4096), (64 * MIB - 8192, 8192)]),
            // Ends in a hole.
            ("tail-hole", 32 * MIB, vec![(MIB, 3 * 4096)]),
            // Only a hole.
            ("empty", 16 * MIB, vec![]),
            // More regions than the header and one extension header hold.
            (
                "many",
                64 * MIB,
                (0..40).map(|i| (i * MIB + MIB / 2, 4096)).collect(),
            ),
        ];
        for (name, size, data) in cases {
            let src = t.path().join(name);
            let want = sparse_file(&src, size, &data);
            assert!(
                allocated(&src) < size / 4,
                "{name}: the test file is not sparse here"
            );
            let plan = plan_path(&src, name).expect("plan");
            let mut last = 0;
            let tar = write_tar(&plan, Vec::new(), None, &mut |n| last = n).expect("tar");
            assert_eq!(last, size, "{name}: progress counts the holes");
            // Only the data (plus headers) travels.
            let data_bytes: u64 = data.iter().map(|d| d.1).sum();
            assert!(
                (tar.len() as u64) < data_bytes + 64 * 1024,
                "{name}: {} bytes of tar for {data_bytes} bytes of data",
                tar.len()
            );
            let kinds: Vec<EntryType> = tar::Archive::new(tar.as_slice())
                .entries()
                .expect("entries")
                .map(|e| e.expect("entry").header().entry_type())
                .collect();
            assert_eq!(kinds, [EntryType::GNUSparse], "{name}");
            let dst = t.path().join(format!("out-{name}"));
            let got = crate::unpack(tar.as_slice(), &dst).expect("unpack");
            assert_eq!(got.bytes, size, "{name}");
            let out = dst.join(name);
            assert_eq!(std::fs::read(&out).expect("read"), want, "{name}");
            assert!(
                allocated(&out) <= allocated(&src) + 64 * 1024,
                "{name}: {} bytes allocated for {} at the source",
                allocated(&out),
                allocated(&src)
            );
            // GNU tar reads it too, and makes the same file.
            if std::path::Path::new("/bin/tar").is_file() {
                let gnu = t.path().join(format!("gnu-{name}"));
                std::fs::create_dir(&gnu).expect("mkdir");
                let mut child = std::process::Command::new("tar")
                    .args(["-x", "-f", "-", "-C"])
                    .arg(&gnu)
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("tar");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(&tar)
                    .expect("to tar");
                assert!(
                    child.wait().expect("wait").success(),
                    "{name}: GNU tar refused it"
                );
                assert_eq!(std::fs::read(gnu.join(name)).expect("read"), want, "{name}");
            }
        }
    }

    #[test]
    fn a_file_without_holes_is_a_plain_entry() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("dense");
        std::fs::write(&f, vec![7u8; 100_000]).expect("write");
        let plan = plan_path(&f, "dense").expect("plan");
        let tar = write_tar(&plan, Vec::new(), None, &mut |_| {}).expect("tar");
        let mut ar = tar::Archive::new(tar.as_slice());
        let e = ar
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        assert_eq!(e.header().entry_type(), EntryType::Regular);
    }

    #[test]
    fn a_file_that_shrank_fails_the_transfer() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("f");
        std::fs::write(&f, "0123456789").expect("write");
        let plan = plan_path(&f, "f").expect("plan");
        std::fs::write(&f, "01").expect("truncate");
        let err = write_tar(&plan, Vec::new(), None, &mut |_| {}).expect_err("must fail");
        assert!(matches!(err, PackError::Changed { .. }), "{err}");
    }

    #[test]
    fn a_vanished_git_file_is_left_out_but_a_vanished_file_fails() {
        let t = tempfile::tempdir().expect("tmp");
        let (kept, gone) = (t.path().join("kept"), t.path().join("gc.pid"));
        std::fs::write(&kept, "k").expect("write");
        std::fs::write(&gone, "1").expect("write");
        let mut plan = Plan::default();
        for (name, p) in [("gc.pid", &gone), ("kept", &kept)] {
            let mut e = plan_path(p, name).expect("plan").entries.remove(0);
            e.source = Source::GitInternal(p.clone());
            plan.entries.push(e);
        }
        std::fs::remove_file(&gone).expect("rm");
        let tar = write_tar(&plan, Vec::new(), None, &mut |_| {}).expect("tar");
        let names: Vec<String> = tar::Archive::new(tar.as_slice())
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["kept"]);

        let plan = plan_path(&kept, "kept").expect("plan");
        std::fs::remove_file(&kept).expect("rm");
        let err = write_tar(&plan, Vec::new(), None, &mut |_| {}).expect_err("must fail");
        assert!(matches!(err, PackError::Read { .. }), "{err}");
    }
}
