//! Writes a [`Plan`] as a tar stream.

use crate::plan::{Plan, Source};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use tar::{EntryType, Header};

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
