//! Extraction of tar streams from an untrusted peer.
//!
//! Every entry is checked before it touches the disk: absolute paths,
//! `..`, symlinks whose target leaves the destination, hard links to
//! outside, device nodes and fifos all fail the extraction with an error
//! naming the entry. Writes that would pass through a symlink to outside
//! the destination are refused by the `tar` crate's own check. Modes and
//! modification times are kept; ownership is not (files belong to the
//! extracting user).

use crate::plan::link_stays_inside;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use tar::EntryType;

/// Errors while extracting.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry {path:?} refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
    #[error("extracting {path:?} into {dest}: {source}")]
    Write {
        path: String,
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating {0}: {1}")]
    Dest(PathBuf, #[source] io::Error),
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Non-directory entries (files and links).
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// Extracts the tar stream `reader` into the directory `dest` (created
/// with its parents when missing), entry by entry as the stream arrives.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<Unpacked, UnpackError> {
    std::fs::create_dir_all(dest).map_err(|e| UnpackError::Dest(dest.to_path_buf(), e))?;
    let real_dest = dest
        .canonicalize()
        .map_err(|e| UnpackError::Dest(dest.to_path_buf(), e))?;
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_ownerships(false);
    let mut done = Unpacked::default();
    for entry in ar.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| UnpackError::Refused {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let rel = safe_relative(&entry.path().map_err(UnpackError::Read)?).map_err(&refuse)?;
        let kind = entry.header().entry_type();
        match kind {
            // GNU sparse files are written with their holes.
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory => {}
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refuse("symlink without a target"))?
                    .into_owned();
                let real_parent = real_parent(&real_dest, &rel).map_err(|r| refuse(&r))?;
                let at = real_parent.join(rel.file_name().unwrap_or_default());
                if !link_stays_inside(&at, &target) {
                    return Err(refuse(&format!(
                        "symlink target {} leaves the destination",
                        target.display()
                    )));
                }
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refuse("hard link without a target"))?;
                safe_relative(&target).map_err(|r| refuse(&format!("hard link target: {r}")))?;
            }
            EntryType::XGlobalHeader => continue,
            EntryType::Char | EntryType::Block => {
                return Err(refuse("device nodes are not copied"));
            }
            EntryType::Fifo => return Err(refuse("fifos are not copied")),
            other => return Err(refuse(&format!("unsupported entry type {other:?}"))),
        }
        if rel.as_os_str().is_empty() {
            // "./": the destination itself.
            continue;
        }
        // The file's size (a sparse entry stores less).
        let size = entry.size();
        let written = entry
            .unpack_in(&real_dest)
            .map_err(|source| UnpackError::Write {
                path: shown.clone(),
                dest: dest.to_path_buf(),
                source,
            })?;
        if !written {
            return Err(refuse("path leaves the destination"));
        }
        if !kind.is_dir() {
            done.files += 1;
        }
        if matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
        ) {
            done.bytes += size;
        }
    }
    Ok(done)
}

/// `p` as a relative path without `..`, `.` components dropped.
fn safe_relative(p: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Where the parent of `rel` really is under `real_dest`, following
/// symlinks already there (created, if missing, like `unpack_in` would).
fn real_parent(real_dest: &Path, rel: &Path) -> Result<PathBuf, String> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = real_dest.join(parent);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating its directory: {e}"))?;
    let real = dir
        .canonicalize()
        .map_err(|e| format!("resolving its directory: {e}"))?;
    real.strip_prefix(real_dest)
        .map(Path::to_path_buf)
        .map_err(|_| "its directory leads outside the destination".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::Header;

    fn file_header(size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// Writes `name` into the raw header, bypassing the builder's own
    /// checks, as a hostile peer would.
    fn raw_entry(name: &[u8], kind: EntryType, link: Option<&[u8]>, data: &[u8]) -> Vec<u8> {
        let mut h = file_header(data.len() as u64);
        h.set_entry_type(kind);
        {
            let g = h.as_gnu_mut().expect("gnu");
            g.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                g.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn refused(entries: &[Vec<u8>]) -> (String, tempfile::TempDir) {
        let t = tempfile::tempdir().expect("tmp");
        let dest = t.path().join("dest");
        let err = unpack(archive(entries).as_slice(), &dest).expect_err("must be refused");
        assert!(matches!(err, UnpackError::Refused { .. }), "{err}");
        (err.to_string(), t)
    }

    #[test]
    fn dotdot_is_refused() {
        let (msg, t) = refused(&[raw_entry(b"a/../../evil", EntryType::Regular, None, b"x")]);
        assert!(msg.contains(".."), "{msg}");
        assert!(!t.path().join("evil").exists());
    }

    #[test]
    fn absolute_path_is_refused() {
        let (msg, _t) = refused(&[raw_entry(b"/tmp/evil", EntryType::Regular, None, b"x")]);
        assert!(msg.contains("absolute"), "{msg}");
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        refused(&[raw_entry(b"l", EntryType::Symlink, Some(b"/etc"), b"")]);
        refused(&[raw_entry(
            b"l",
            EntryType::Symlink,
            Some(b"../outside"),
            b"",
        )]);
        // `s -> .` is fine on its own, but then `s/..` is the parent.
        let (msg, t) = refused(&[
            raw_entry(b"s", EntryType::Symlink, Some(b"."), b""),
            raw_entry(b"a", EntryType::Symlink, Some(b"s/.."), b""),
        ]);
        assert!(msg.contains("leaves"), "{msg}");
        assert!(t.path().join("dest/s").is_symlink());
        assert!(!t.path().join("dest/a").exists());
    }

    #[test]
    fn symlink_reached_through_a_symlink_is_judged_where_it_lands() {
        // `d -> .` puts `d/l` in the destination itself, where `../x` leaves it.
        refused(&[
            raw_entry(b"d", EntryType::Symlink, Some(b"."), b""),
            raw_entry(b"d/l", EntryType::Symlink, Some(b"../x"), b""),
        ]);
    }

    #[test]
    fn device_nodes_and_fifos_are_refused() {
        let (msg, _t) = refused(&[raw_entry(b"dev", EntryType::Char, None, b"")]);
        assert!(msg.contains("device"), "{msg}");
        refused(&[raw_entry(b"blk", EntryType::Block, None, b"")]);
        refused(&[raw_entry(b"fifo", EntryType::Fifo, None, b"")]);
    }

    #[test]
    fn hard_link_to_outside_is_refused() {
        refused(&[raw_entry(
            b"h",
            EntryType::Link,
            Some(b"../../etc/passwd"),
            b"",
        )]);
        refused(&[raw_entry(b"h", EntryType::Link, Some(b"/etc/passwd"), b"")]);
    }

    #[test]
    fn good_entries_keep_modes_and_mtimes() {
        let mut h = file_header(2);
        h.set_mode(0o751);
        h.set_mtime(1_000_000);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "sub/run.sh", &b"hi"[..])
            .expect("append");
        let mut l = Header::new_gnu();
        l.set_entry_type(EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "sub/link", "run.sh").expect("link");
        let data = b.into_inner().expect("tar");
        let t = tempfile::tempdir().expect("tmp");
        let got = unpack(data.as_slice(), t.path()).expect("unpack");
        assert_eq!(got, Unpacked { files: 2, bytes: 2 });
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(t.path().join("sub/run.sh")).expect("meta");
        assert_eq!(m.permissions().mode() & 0o777, 0o751);
        assert_eq!(m.mtime(), 1_000_000);
        assert_eq!(
            std::fs::read_link(t.path().join("sub/link")).expect("link"),
            PathBuf::from("run.sh")
        );
    }
}
