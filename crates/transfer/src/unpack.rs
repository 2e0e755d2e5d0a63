//! Extraction of tar streams from an untrusted peer.
//!
//! Every entry is checked before it touches the disk: absolute paths,
//! `..`, symlinks whose target leaves the destination, hard links to
//! outside, device nodes and fifos all fail the extraction with an error
//! naming the entry. Writes that would pass through a symlink to outside
//! the destination are refused by the `tar` crate's own check. Modes and
//! modification times are kept; ownership is not (files belong to the
//! extracting user).
//!
//! [`unpack_only`] is for archives from a peer that is not trusted at all
//! (a guest, whose root can replace the agent): only the one requested
//! top entry (and what is below it, when it is a directory) is accepted,
//! nothing is written through a symlink, links stay inside that tree,
//! setuid and setgid bits are cleared, and a file is refused before it is
//! written when it and the files before it are more than the free space
//! the destination's file system had when the extraction began (a file
//! with holes counts its data).

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
    extract(reader, dest, None)
}

/// Like [`unpack`], for an archive from an untrusted peer that was asked
/// for one file or directory named `top` (see the module docs).
pub fn unpack_only<R: Read>(reader: R, dest: &Path, top: &str) -> Result<Unpacked, UnpackError> {
    let top_path = Path::new(top);
    if top.is_empty() || top_path.components().count() != 1 || safe_relative(top_path).is_err() {
        return Err(UnpackError::Refused {
            path: top.to_string(),
            reason: "the requested name must be one plain file name".into(),
        });
    }
    extract(reader, dest, Some(top))
}

/// Permission bits never taken from an untrusted archive.
const SETID_BITS: u32 = 0o6000;

fn extract<R: Read>(reader: R, dest: &Path, only: Option<&str>) -> Result<Unpacked, UnpackError> {
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
    if only.is_some() {
        ar.set_mask(SETID_BITS);
    }
    // Whether the requested top entry arrived, and as a directory.
    let mut top_seen: Option<bool> = None;
    let mut room = None;
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
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        // Where a link's relative target is judged from: the destination,
        // or for an untrusted archive the requested tree.
        let mut link_base = rel.clone();
        if let Some(top) = only {
            let below = rel
                .strip_prefix(top)
                .map_err(|_| refuse(&format!("only {top:?} was asked for")))?;
            match top_seen {
                None if below.as_os_str().is_empty() => {
                    if !matches!(
                        kind,
                        EntryType::Regular
                            | EntryType::Continuous
                            | EntryType::GNUSparse
                            | EntryType::Directory
                    ) {
                        return Err(refuse("the requested entry must be a file or a directory"));
                    }
                    top_seen = Some(kind.is_dir());
                }
                None => return Err(refuse(&format!("{top:?} must come first"))),
                Some(_) if below.as_os_str().is_empty() => {
                    return Err(refuse("the requested entry came twice"));
                }
                Some(false) => return Err(refuse(&format!("{top:?} is not a directory"))),
                Some(true) => {}
            }
            no_symlink_on_the_way(&real_dest, &rel).map_err(|r| refuse(&r))?;
            link_base = below.to_path_buf();
        }
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
                let at = if only.is_some() {
                    link_base.clone()
                } else {
                    let real_parent = real_parent(&real_dest, &rel).map_err(|r| refuse(&r))?;
                    real_parent.join(rel.file_name().unwrap_or_default())
                };
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
                let target = safe_relative(&target)
                    .map_err(|r| refuse(&format!("hard link target: {r}")))?;
                if let Some(top) = only
                    && (!target.starts_with(top) || target == Path::new(top))
                {
                    return Err(refuse(&format!(
                        "hard link target {} is not inside {top:?}",
                        target.display()
                    )));
                }
            }
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
        // Its length (a sparse file's with its holes), for the summary.
        let size = entry.size();
        if only.is_some()
            && matches!(
                kind,
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
            )
        {
            let room = match &mut room {
                Some(r) => r,
                None => room.insert(Room::of(&real_dest).map_err(|r| refuse(&r))?),
            };
            let needs = written_size(&mut entry, kind);
            room.take(needs, &real_dest).map_err(|r| refuse(&r))?;
        }
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
            done.bytes = done.bytes.saturating_add(size);
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

/// Refuses `rel` when an existing directory on its way below `real_dest`
/// is a symlink (or not a directory): nothing from an untrusted archive
/// is written through a link, even one that stays inside.
fn no_symlink_on_the_way(real_dest: &Path, rel: &Path) -> Result<(), String> {
    let mut at = real_dest.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{} is a symlink or not a directory: nothing is written through it",
                    at.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("checking {}: {e}", at.display())),
        }
    }
    Ok(())
}

/// The bytes extracting `entry` writes, checked before it is written. The
/// data the tar crate reads for an entry is the size of its PAX `size`
/// record when it has one, else its header's (which can say 0 beside an
/// exabyte in the record). For a regular file that is [`tar::Entry::size`];
/// a sparse file's is its length with the holes, while only its data
/// regions are written, at most that stored size: a disk image with holes
/// copied out of a guest needs room for its data only.
fn written_size<R: Read>(entry: &mut tar::Entry<'_, R>, kind: EntryType) -> u64 {
    if kind != EntryType::GNUSparse {
        return entry.size();
    }
    let pax_size = match entry.pax_extensions() {
        Ok(Some(exts)) => exts
            .filter_map(Result::ok)
            .find(|e| e.key() == Ok("size"))
            .map(|e| e.value().ok().and_then(|v| v.parse::<u64>().ok())),
        Ok(None) => None,
        // Unreadable records: count the whole length.
        Err(_) => return entry.size(),
    };
    match pax_size {
        Some(Some(n)) => n,
        // A size record that is not a number: the whole length.
        Some(None) => entry.size(),
        None => entry.header().entry_size().unwrap_or_else(|_| entry.size()),
    }
}

/// The free space of the destination's file system when the first file
/// came, and how much of it the files so far announced: an untrusted
/// archive cannot fill the disk with many files that each fit.
#[derive(Debug)]
struct Room {
    free: u64,
    taken: u64,
}

impl Room {
    fn of(dir: &Path) -> Result<Self, String> {
        let st =
            nix::sys::statvfs::statvfs(dir).map_err(|e| format!("checking free space: {e}"))?;
        Ok(Self {
            free: st.blocks_available().saturating_mul(st.fragment_size()),
            taken: 0,
        })
    }

    /// Counts a file of `size` bytes, or refuses it when it does not fit
    /// (the announced size, checked before anything is written).
    fn take(&mut self, size: u64, dir: &Path) -> Result<(), String> {
        match self.taken.checked_add(size) {
            Some(total) if total <= self.free => {
                self.taken = total;
                Ok(())
            }
            _ => Err(format!(
                "its announced size ({size} bytes) with the {} bytes before it is more \
                 than the {} bytes free in {}",
                self.taken,
                self.free,
                dir.display()
            )),
        }
    }
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

    fn with_mode(mut entry: Vec<u8>, mode: u32) -> Vec<u8> {
        let mut h = Header::new_gnu();
        h.as_mut_bytes().copy_from_slice(&entry[..512]);
        h.set_mode(mode);
        h.set_cksum();
        entry[..512].copy_from_slice(h.as_bytes());
        entry
    }

    fn dir_entry(name: &[u8]) -> Vec<u8> {
        with_mode(raw_entry(name, EntryType::Directory, None, b""), 0o755)
    }

    /// `vm cp box:/root/log .` in a repository: the guest answers with
    /// more than `log`.
    fn refused_only(entries: &[Vec<u8>]) -> (String, tempfile::TempDir) {
        let t = tempfile::tempdir().expect("tmp");
        let repo = t.path().join("repo");
        std::fs::create_dir_all(repo.join(".git/hooks")).expect("mkdir");
        let err = unpack_only(archive(entries).as_slice(), &repo, "log").expect_err("refused");
        assert!(matches!(err, UnpackError::Refused { .. }), "{err}");
        (err.to_string(), t)
    }

    #[test]
    fn an_untrusted_archive_gets_only_the_name_asked_for() {
        let hook = with_mode(
            raw_entry(b".git/hooks/pre-commit", EntryType::Regular, None, b"evil"),
            0o755,
        );
        let (msg, t) = refused_only(&[
            raw_entry(b"log", EntryType::Regular, None, b"x"),
            hook.clone(),
        ]);
        assert!(msg.contains("only \"log\" was asked for"), "{msg}");
        assert!(!t.path().join("repo/.git/hooks/pre-commit").exists());
        // Before the requested entry too.
        refused_only(std::slice::from_ref(&hook));
        // Below a top that is a file, or before the top arrived.
        refused_only(&[
            raw_entry(b"log", EntryType::Regular, None, b"x"),
            raw_entry(b"log/x", EntryType::Regular, None, b"x"),
        ]);
        refused_only(&[raw_entry(b"log/x", EntryType::Regular, None, b"x")]);
        // A top that is a link, to somewhere inside the destination.
        let (msg, _t) = refused_only(&[raw_entry(
            b"log",
            EntryType::Symlink,
            Some(b".git/hooks"),
            b"",
        )]);
        assert!(msg.contains("file or a directory"), "{msg}");
        // A symlink inside the tree pointing out of it (but inside the
        // destination), and writes through a link that stays inside.
        refused_only(&[
            dir_entry(b"log"),
            raw_entry(b"log/l", EntryType::Symlink, Some(b"../.git"), b""),
        ]);
        let (msg, t) = refused_only(&[
            dir_entry(b"log"),
            dir_entry(b"log/sub"),
            raw_entry(b"log/l", EntryType::Symlink, Some(b"sub"), b""),
            raw_entry(b"log/l/x", EntryType::Regular, None, b"x"),
        ]);
        assert!(msg.contains("nothing is written through it"), "{msg}");
        assert!(!t.path().join("repo/log/sub/x").exists());
        // Hard links to files outside the tree.
        refused_only(&[
            dir_entry(b"log"),
            raw_entry(b"log/h", EntryType::Link, Some(b".git/config"), b""),
        ]);
        // The requested name must be a plain name.
        let t = tempfile::tempdir().expect("tmp");
        for bad in ["", "a/b", "..", "/x"] {
            assert!(
                unpack_only(archive(&[]).as_slice(), t.path(), bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_untrusted_archive_keeps_its_tree_but_loses_setuid_and_setgid() {
        let t = tempfile::tempdir().expect("tmp");
        let entries = [
            with_mode(dir_entry(b"log"), 0o2775),
            with_mode(raw_entry(b"log/su", EntryType::Regular, None, b"x"), 0o4755),
            dir_entry(b"log/sub"),
            raw_entry(b"log/sub/f", EntryType::Regular, None, b"hello"),
            raw_entry(b"log/sub/l", EntryType::Symlink, Some(b"f"), b""),
            raw_entry(b"log/up", EntryType::Symlink, Some(b"sub/f"), b""),
            raw_entry(b"log/h", EntryType::Link, Some(b"log/sub/f"), b""),
        ];
        let got = unpack_only(archive(&entries).as_slice(), t.path(), "log").expect("unpack");
        assert_eq!(got, Unpacked { files: 5, bytes: 6 });
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(t.path().join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("log"), 0o775);
        assert_eq!(mode("log/su"), 0o755);
        assert_eq!(std::fs::read(t.path().join("log/h")).expect("h"), b"hello");
    }

    #[test]
    fn an_untrusted_file_larger_than_the_free_space_is_refused_before_writing() {
        let t = tempfile::tempdir().expect("tmp");
        // Announces an exabyte, sends nothing.
        let mut h = file_header(1 << 60);
        {
            let g = h.as_gnu_mut().expect("gnu");
            g.name[..3].copy_from_slice(b"log");
        }
        h.set_cksum();
        let err = unpack_only(
            archive(&[h.as_bytes().to_vec()]).as_slice(),
            t.path(),
            "log",
        )
        .expect_err("does not fit");
        assert!(err.to_string().contains("announced size"), "{err}");
        assert!(!t.path().join("log").exists());
    }

    /// A PAX extended header of one `key=value` record.
    fn pax_entry(key: &str, value: &str) -> Vec<u8> {
        let kv = format!(" {key}={value}\n");
        // The record's length counts its own digits.
        let mut len = kv.len() + 1;
        while format!("{len}{kv}").len() != len {
            len += 1;
        }
        let record = format!("{len}{kv}");
        raw_entry(
            b"././@PaxHeader",
            EntryType::XHeader,
            None,
            record.as_bytes(),
        )
    }

    #[test]
    fn an_untrusted_pax_size_is_the_size_checked_against_the_free_space() {
        let t = tempfile::tempdir().expect("tmp");
        // The header says 0 bytes, its PAX record an exabyte, and the
        // stream goes on with data as long as the guest likes.
        let mut stream = pax_entry("size", &(1u64 << 60).to_string());
        stream.extend(raw_entry(b"log", EntryType::Regular, None, b""));
        stream.extend_from_slice(&[7u8; 4096]);
        let err = unpack_only(stream.as_slice(), t.path(), "log").expect_err("does not fit");
        assert!(matches!(err, UnpackError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("announced size"), "{err}");
        assert!(!t.path().join("log").exists());
    }

    #[test]
    fn untrusted_files_count_together_against_the_free_space() {
        let dir = Path::new("/dest");
        let mut room = Room {
            free: 100,
            taken: 0,
        };
        room.take(60, dir).expect("fits alone");
        let msg = room.take(60, dir).expect_err("not with the first");
        assert!(msg.contains("with the 60 bytes before it"), "{msg}");
        room.take(40, dir).expect("the rest fits");
        room.take(0, dir).expect("empty files always fit");
        assert!(room.take(u64::MAX, dir).is_err(), "no overflow");
    }

    /// A file with holes needs room for its data only, however long it is.
    #[test]
    fn a_sparse_file_longer_than_the_free_space_fits_by_its_data() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("disk.img");
        let st = nix::sys::statvfs::statvfs(t.path()).expect("statvfs");
        let free = st.blocks_available() * st.fragment_size();
        // Longer than the free space, within what ext4 and others allow.
        let len = free + (1 << 30);
        let f = std::fs::File::create(&src).expect("create");
        f.set_len(len).expect("set_len");
        f.write_all_at(&[9u8; 4096], 0).expect("data");
        drop(f);
        let plan = crate::plan_path(&src, "disk.img").expect("plan");
        let tar = crate::write_tar(&plan, Vec::new(), None, &mut |_| {}).expect("tar");
        let out = t.path().join("out");
        std::fs::create_dir(&out).expect("out");
        unpack_only(tar.as_slice(), &out, "disk.img").expect("its data fits");
        let got = std::fs::metadata(out.join("disk.img")).expect("copied");
        assert_eq!(got.len(), len);
        assert!(got.blocks() * 512 < 1 << 20, "arrived sparse");
    }
}
