//! Unpacking layers into a staging tree, safely and without privileges.
//!
//! Layer archives come from a registry and are untrusted. Every entry path
//! must be relative and free of `..`; every directory on its way must be a
//! real directory of the tree (never a symlink: a symlink is stored as link
//! content and never followed while writing). What an unprivileged process
//! cannot or must not create on the host (ownership, device nodes, modes it
//! could not read back) is recorded in [`Tree`] and applied inside the ext4
//! image later by debugfs.

use crate::OciError;
use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tokio_util::sync::CancellationToken;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What an entry of the image is, beyond what the host tree holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Dir,
    File,
    Symlink,
    Fifo,
    /// A character device: only recorded, created in the image by debugfs.
    Char {
        major: u32,
        minor: u32,
    },
    /// A block device: only recorded, created in the image by debugfs.
    Block {
        major: u32,
        minor: u32,
    },
}

/// Ownership, permission bits and mtime an image path must have in the
/// image, whatever the host tree says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub node: Node,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub mtime: i64,
}

/// The staging tree layers are unpacked into, with what the host tree
/// cannot hold.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    meta: BTreeMap<PathBuf, EntryMeta>,
    /// Bytes of file content written so far.
    written: u64,
    /// Bytes of file content the tree may hold in all (from free space).
    budget: u64,
    /// Where `budget` was measured, for the error.
    budget_path: PathBuf,
}

/// How a layer is compressed, from its first bytes.
fn decompressor<'a>(r: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// `path` of a tar entry as a clean relative path (`None` for the root
/// itself), or why it is refused.
fn clean_path(path: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(c) => {
                if c.as_encoded_bytes().contains(&b'\n') {
                    return Err("the name contains a newline".into());
                }
                out.push(c)
            }
            Component::CurDir => {}
            Component::ParentDir => return Err("the path contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("the path is absolute".into());
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Where char and block devices may be.
fn device_allowed(rel: &Path) -> bool {
    rel.starts_with("dev") && rel != Path::new("dev")
}

impl Tree {
    /// An empty tree at `root` (created), whose file content may use at most
    /// `budget` bytes.
    pub fn create(root: &Path, budget: u64) -> Result<Tree, OciError> {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(root)
            .map_err(OciError::io(format!("creating {}", root.display())))?;
        Ok(Tree {
            root: root.to_path_buf(),
            meta: BTreeMap::new(),
            written: 0,
            budget,
            budget_path: root.to_path_buf(),
        })
    }

    /// The tree's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What was recorded for `rel` (a path relative to the root).
    pub fn meta(&self, rel: &Path) -> Option<&EntryMeta> {
        self.meta.get(rel)
    }

    /// All recorded entries, parents before children.
    pub fn entries(&self) -> impl Iterator<Item = (&PathBuf, &EntryMeta)> {
        self.meta.iter()
    }

    /// Bytes of file content written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Records that `rel` (created by banger, not by a layer) must be owned
    /// by `uid:gid` with `mode` in the image.
    pub fn set_meta(&mut self, rel: &Path, meta: EntryMeta) {
        self.meta.insert(rel.to_path_buf(), meta);
    }

    /// Applies one layer archive (plain tar, gzip or zstd). `layer` names it
    /// in errors.
    pub fn apply_layer(
        &mut self,
        layer: &str,
        reader: impl Read,
        cancel: &CancellationToken,
    ) -> Result<(), OciError> {
        let bad = |reason: String| OciError::BadLayer {
            layer: layer.to_string(),
            reason,
        };
        let reader = decompressor(reader).map_err(|e| bad(e.to_string()))?;
        let mut archive = tar::Archive::new(reader);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            if cancel.is_cancelled() {
                return Err(OciError::Cancelled);
            }
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
            let unsafe_entry = |reason: String| OciError::UnsafeEntry {
                layer: layer.to_string(),
                path: raw.display().to_string(),
                reason,
            };
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let rel = clean_path(&raw).map_err(unsafe_entry)?;
            let Some(rel) = rel else {
                // The root directory itself: only its metadata.
                if kind.is_dir() {
                    let m = self.header_meta(&entry, Node::Dir, layer)?;
                    self.meta.insert(PathBuf::new(), m);
                }
                continue;
            };
            let name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                if name == OPAQUE_MARKER {
                    self.opaque(&parent, &this_layer, layer, &raw)?;
                } else {
                    if hidden.is_empty() || hidden == "." || hidden == ".." {
                        return Err(unsafe_entry("the whiteout names no file".into()));
                    }
                    self.remove(&parent.join(hidden), layer, &raw)?;
                }
                continue;
            }
            match kind {
                tar::EntryType::Directory => {
                    self.prepare_parent(&rel, layer, &raw)?;
                    let p = self.root.join(&rel);
                    match std::fs::symlink_metadata(&p) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            self.remove(&rel, layer, &raw)?;
                            self.mkdir(&p)?;
                        }
                        Err(_) => {
                            self.meta.remove(&rel);
                            self.mkdir(&p)?;
                        }
                    }
                    let m = self.header_meta(&entry, Node::Dir, layer)?;
                    self.meta.insert(rel.clone(), m);
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    self.prepare_leaf(&rel, layer, &raw)?;
                    let m = self.header_meta(&entry, Node::File, layer)?;
                    let size = entry.size();
                    if self.written.saturating_add(size) > self.budget {
                        return Err(OciError::NoSpace {
                            path: self.budget_path.clone(),
                            what: format!("{} of layer {layer} ({size} bytes)", raw.display()),
                            needed: self.written.saturating_add(size),
                            available: self.budget,
                        });
                    }
                    let p = self.root.join(&rel);
                    let ctx = || format!("writing {}", p.display());
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&p)
                        .map_err(OciError::io(ctx()))?;
                    let copied = std::io::copy(&mut (&mut entry).take(size), &mut f)
                        .map_err(|e| bad(format!("reading {}: {e}", raw.display())))?;
                    if copied != size {
                        return Err(bad(format!(
                            "{} is truncated ({copied} of {size} bytes)",
                            raw.display()
                        )));
                    }
                    f.flush().map_err(OciError::io(ctx()))?;
                    self.written += size;
                    set_host_mode(&p, m.mode | 0o600)?;
                    set_mtime(&p, m.mtime)?;
                    self.meta.insert(rel.clone(), m);
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| bad(e.to_string()))?
                        .ok_or_else(|| unsafe_entry("a symlink without a target".into()))?
                        .into_owned();
                    self.prepare_leaf(&rel, layer, &raw)?;
                    let p = self.root.join(&rel);
                    // The target is link content only; it is never resolved here.
                    std::os::unix::fs::symlink(&target, &p)
                        .map_err(OciError::io(format!("linking {}", p.display())))?;
                    let mut m = self.header_meta(&entry, Node::Symlink, layer)?;
                    m.mode = 0o777;
                    set_mtime(&p, m.mtime)?;
                    self.meta.insert(rel.clone(), m);
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| bad(e.to_string()))?
                        .ok_or_else(|| unsafe_entry("a hard link without a target".into()))?
                        .into_owned();
                    let target = clean_path(&target)
                        .map_err(|r| unsafe_entry(format!("the hard link target: {r}")))?
                        .ok_or_else(|| unsafe_entry("a hard link to the root".into()))?;
                    if target == rel {
                        continue;
                    }
                    let tp = self.resolve_existing(&target).map_err(|r| {
                        unsafe_entry(format!("hard link target {}: {r}", target.display()))
                    })?;
                    let tmeta = std::fs::symlink_metadata(&tp).map_err(|_| {
                        unsafe_entry(format!(
                            "hard link target {} does not exist",
                            target.display()
                        ))
                    })?;
                    if tmeta.is_dir() {
                        return Err(unsafe_entry("a hard link to a directory".into()));
                    }
                    self.prepare_leaf(&rel, layer, &raw)?;
                    let p = self.root.join(&rel);
                    // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    std::fs::hard_link(&tp, &p)
                        .map_err(OciError::io(format!("linking {}", p.display())))?;
                    if let Some(m) = self.meta.get(&target).copied() {
                        self.meta.insert(rel.clone(), m);
                    }
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    if !device_allowed(&rel) {
                        return Err(unsafe_entry(
                            "device nodes are only accepted under /dev".into(),
                        ));
                    }
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    let node = if kind == tar::EntryType::Char {
                        Node::Char { major, minor }
                    } else {
                        Node::Block { major, minor }
                    };
                    self.prepare_leaf(&rel, layer, &raw)?;
                    let m = self.header_meta(&entry, node, layer)?;
                    self.meta.insert(rel.clone(), m);
                }
                tar::EntryType::Fifo => {
                    self.prepare_leaf(&rel, layer, &raw)?;
                    let p = self.root.join(&rel);
                    nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600)).map_err(|e| {
                        OciError::Io {
                            context: format!("creating fifo {}", p.display()),
                            source: e.into(),
                        }
                    })?;
                    let m = self.header_meta(&entry, Node::Fifo, layer)?;
                    set_host_mode(&p, m.mode | 0o600)?;
                    set_mtime(&p, m.mtime)?;
                    self.meta.insert(rel.clone(), m);
                }
                other => {
                    return Err(unsafe_entry(format!(
                        "unsupported tar entry type {:?}",
                        other.as_byte() as char
                    )));
                }
            }
            this_layer.insert(rel);
        }
        Ok(())
    }

    /// Gives directories their final modes (readable by this process, so
    /// mkfs can copy them; debugfs sets the real bits) and mtimes, deepest
    /// first, once all layers are in.
    pub fn finish(&self) -> Result<(), OciError> {
        for (rel, m) in self.meta.iter().rev() {
            if m.node != Node::Dir {
                continue;
            }
            let p = self.root.join(rel);
            if std::fs::symlink_metadata(&p).is_ok_and(|md| md.is_dir()) {
                set_host_mode(&p, m.mode | 0o700)?;
                set_mtime(&p, m.mtime)?;
            }
        }
        Ok(())
    }

    fn header_meta<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        node: Node,
        layer: &str,
    ) -> Result<EntryMeta, OciError> {
        let h = entry.header();
        let bad = |what: &str, e: std::io::Error| OciError::BadLayer {
            layer: layer.to_string(),
            reason: format!(
                "{what} of {}: {e}",
                String::from_utf8_lossy(&h.path_bytes())
            ),
        };
        let uid = h.uid().map_err(|e| bad("uid", e))?;
        let gid = h.gid().map_err(|e| bad("gid", e))?;
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let mtime = h.mtime().map_err(|e| bad("mtime", e))?;
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| OciError::BadLayer {
                layer: layer.to_string(),
                reason: format!("{what} {v} is out of range"),
            })
        };
        Ok(EntryMeta {
            node,
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            mode,
            mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        })
    }

    fn mkdir(&self, p: &Path) -> Result<(), OciError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(p)
            .map_err(OciError::io(format!("creating {}", p.display())))?;
        set_host_mode(p, 0o700)
    }

    /// `root/rel` if every directory on the way to `rel` is a real
    /// directory of the tree (the last component is not looked at).
    fn resolve_existing(&self, rel: &Path) -> Result<PathBuf, String> {
        let mut p = self.root.clone();
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            if i + 1 == comps.len() {
                break;
            }
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "it goes through the symlink {}; banger never writes through symlinks",
                        p.strip_prefix(&self.root).unwrap_or(&p).display()
                    ));
                }
                Ok(_) => return Err("a parent is not a directory".into()),
                Err(_) => return Err("a parent directory does not exist".into()),
            }
        }
        Ok(p)
    }

    /// Makes sure every directory on the way to `rel` exists as a real
    /// directory of the tree, creating missing ones (root-owned, 0755).
    fn prepare_parent(&mut self, rel: &Path, layer: &str, raw: &Path) -> Result<(), OciError> {
        let mut cur = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push(c);
            let p = self.root.join(&cur);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(OciError::UnsafeEntry {
                        layer: layer.to_string(),
                        path: raw.display().to_string(),
                        reason: format!(
                            "it goes through the symlink /{}; banger never writes through symlinks",
                            cur.display()
                        ),
                    });
                }
                Ok(_) => {
                    return Err(OciError::UnsafeEntry {
                        layer: layer.to_string(),
                        path: raw.display().to_string(),
                        reason: format!("/{} is not a directory", cur.display()),
                    });
                }
                Err(_) => {
                    // A recorded device node there is replaced by the directory.
                    self.meta.remove(&cur);
                    self.mkdir(&p)?;
                    self.meta.insert(
                        cur.clone(),
                        EntryMeta {
                            node: Node::Dir,
                            uid: 0,
                            gid: 0,
                            mode: 0o755,
                            mtime: 0,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Prepares `rel` for a non-directory entry: parents exist, whatever was
    /// at `rel` is gone.
    fn prepare_leaf(&mut self, rel: &Path, layer: &str, raw: &Path) -> Result<(), OciError> {
        self.prepare_parent(rel, layer, raw)?;
        self.remove(rel, layer, raw)
    }

    /// Removes `rel` (a directory with its content; a symlink itself) from
    /// the tree and from the records.
    fn remove(&mut self, rel: &Path, layer: &str, raw: &Path) -> Result<(), OciError> {
        let p = match self.resolve_existing(rel) {
            Ok(p) => p,
            // Nothing can exist below a missing directory; through a symlink
            // nothing is touched.
            Err(reason) if reason.contains("symlink") => {
                return Err(OciError::UnsafeEntry {
                    layer: layer.to_string(),
                    path: raw.display().to_string(),
                    reason,
                });
            }
            Err(_) => {
                self.forget(rel);
                return Ok(());
            }
        };
        let removed = match std::fs::symlink_metadata(&p) {
            Err(_) => Ok(()),
            // remove_dir_all never follows symlinks inside the tree.
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
        };
        removed.map_err(OciError::io(format!("removing {}", p.display())))?;
        self.forget(rel);
        Ok(())
    }

    /// Drops what was recorded for `rel` and below it: banger wrote it
    /// itself, root-owned, with the host tree's mode.
    pub fn forget_path(&mut self, rel: &Path) {
        self.forget(rel)
    }

    /// Drops the records of `rel` and everything below it.
    fn forget(&mut self, rel: &Path) {
        let below: Vec<PathBuf> = self
            .meta
            .range(rel.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.meta.remove(&k);
        }
    }

    /// An opaque directory: what lower layers put in `dir` goes, what this
    /// layer put there stays.
    fn opaque(
        &mut self,
        dir: &Path,
        this_layer: &HashSet<PathBuf>,
        layer: &str,
        raw: &Path,
    ) -> Result<(), OciError> {
        self.prepare_parent(&dir.join(OPAQUE_MARKER), layer, raw)?;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let p = self.root.join(&d);
            let children =
                std::fs::read_dir(&p).map_err(OciError::io(format!("listing {}", p.display())))?;
            for child in children {
                let child = child.map_err(OciError::io(format!("listing {}", p.display())))?;
                let rel = d.join(child.file_name());
                if !this_layer.contains(&rel) {
                    self.remove(&rel, layer, raw)?;
                } else if child.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(rel);
                }
            }
            // Device nodes live only in the records.
            let recorded: Vec<PathBuf> = self
                .meta
                .range(d.clone()..)
                .take_while(|(k, _)| k.starts_with(&d))
                .filter(|(k, m)| {
                    k.parent() == Some(d.as_path())
                        && matches!(m.node, Node::Char { .. } | Node::Block { .. })
                        && !this_layer.contains(*k)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in recorded {
                self.meta.remove(&k);
            }
        }
        Ok(())
    }
}

/// Sets the permission bits of a file of the unpacked tree on the host.
/// Setuid, setgid and sticky bits are never set there: the recorded mode
/// (which keeps them) is what the ext4 step writes into the image, and a
/// setuid binary from an untrusted image must not exist on the host (nor
/// can a `RestrictSUIDSGID=yes` daemon make one).
fn set_host_mode(p: &Path, mode: u32) -> Result<(), OciError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(OciError::io(format!("chmod {}", p.display())))
}

fn set_mtime(p: &Path, mtime: i64) -> Result<(), OciError> {
    let t = TimeSpec::new(mtime, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| OciError::Io {
        context: format!("setting the mtime of {}", p.display()),
        source: e.into(),
    })
}

/// Opens a cached layer blob for [`Tree::apply_layer`].
pub(crate) fn open_blob(path: &Path) -> Result<File, OciError> {
    File::open(path).map_err(OciError::io(format!("opening {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A layer built in memory.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mtime(1_600_000_000);
            h.set_size(0);
            h
        }

        /// Sets the raw name field, bypassing the tar crate's own checks
        /// (which refuse `..` and absolute paths when building).
        fn raw_name(h: &mut tar::Header, path: &str) {
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
        }

        fn dir(mut self, path: &str, mode: u32) -> Layer {
            let mut h = Self::header(tar::EntryType::Directory, mode, 0, 0);
            Self::raw_name(&mut h, path);
            h.set_cksum();
            self.0.append(&h, &[][..]).expect("append");
            self
        }

        fn file(mut self, path: &str, content: &str, mode: u32, uid: u64, gid: u64) -> Layer {
            let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid);
            Self::raw_name(&mut h, path);
            h.set_size(content.len() as u64);
            h.set_cksum();
            self.0.append(&h, content.as_bytes()).expect("append");
            self
        }

        fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Layer {
            let mut h = Self::header(kind, 0o777, 0, 0);
            Self::raw_name(&mut h, path);
            let lname = &mut h.as_old_mut().linkname;
            lname.fill(0);
            lname[..target.len()].copy_from_slice(target.as_bytes());
            h.set_cksum();
            self.0.append(&h, &[][..]).expect("append");
            self
        }

        fn device(mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> Layer {
            let mut h = Self::header(kind, 0o666, 0, 0);
            Self::raw_name(&mut h, path);
            h.set_device_major(major).expect("major");
            h.set_device_minor(minor).expect("minor");
            h.set_cksum();
            self.0.append(&h, &[][..]).expect("append");
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().expect("finish")
        }

        fn gzip(self) -> Vec<u8> {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&self.bytes()).expect("gzip");
            gz.finish().expect("gzip")
        }
    }

    fn tree() -> (tempfile::TempDir, Tree) {
        let t = tempfile::tempdir().expect("tempdir");
        let tree = Tree::create(&t.path().join("root"), u64::MAX).expect("tree");
        (t, tree)
    }

    fn apply(tree: &mut Tree, layer: Vec<u8>) -> Result<(), OciError> {
        tree.apply_layer("sha256:test", &layer[..], &CancellationToken::new())
    }

    fn exists(tree: &Tree, rel: &str) -> bool {
        std::fs::symlink_metadata(tree.root().join(rel)).is_ok()
    }

    fn base() -> Layer {
        Layer::new()
            .dir("etc/", 0o755)
            .file("etc/passwd", "root:x:0:0\n", 0o644, 0, 0)
            .dir("home/", 0o755)
            .dir("home/user/", 0o750)
            .file("home/user/notes", "hi", 0o600, 1000, 1000)
            .file("home/user/sub/deep", "deep", 0o644, 1000, 1000)
    }

    #[test]
    fn files_modes_owners_and_mtimes_are_kept_or_recorded() {
        let (_t, mut tree) = tree();
        let layer = base().file("usr/bin/su", "su", 0o4755, 0, 0).device(
            tarfile(tar::EntryType::Fifo),
            "run/fifo",
            0,
            0,
        );
        apply(&mut tree, layer.gzip()).expect("apply");
        tree.finish().expect("finish");
        // The host copy has no setuid bit; the image's mode is recorded.
        let su = std::fs::symlink_metadata(tree.root().join("usr/bin/su")).expect("su");
        assert_eq!(su.mode() & 0o7777, 0o755);
        assert_eq!(tree.meta(Path::new("usr/bin/su")).expect("su").mode, 0o4755);
        assert_eq!(su.mtime(), 1_600_000_000);
        let notes = tree.meta(Path::new("home/user/notes")).expect("notes");
        assert_eq!((notes.uid, notes.gid, notes.mode), (1000, 1000, 0o600));
        let user = tree.meta(Path::new("home/user")).expect("user");
        assert_eq!((user.node, user.mode), (Node::Dir, 0o750));
        // A parent the layer did not list is root-owned 0755.
        let sub = tree.meta(Path::new("home/user/sub")).expect("sub");
        assert_eq!((sub.uid, sub.mode), (0, 0o755));
        assert_eq!(
            std::fs::read_to_string(tree.root().join("home/user/sub/deep")).expect("read"),
            "deep"
        );
        let dir = std::fs::metadata(tree.root().join("home/user")).expect("dir");
        assert_eq!(dir.mtime(), 1_600_000_000);
        let fifo = std::fs::symlink_metadata(tree.root().join("run/fifo")).expect("fifo");
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
    }

    fn tarfile(k: tar::EntryType) -> tar::EntryType {
        k
    }

    #[test]
    fn whiteouts_delete_lower_files_and_directories() {
        let (_t, mut tree) = tree();
        apply(&mut tree, base().bytes()).expect("base");
        let upper = Layer::new()
            .file("etc/.wh.passwd", "", 0o644, 0, 0)
            .file("home/.wh.user", "", 0o644, 0, 0)
            .file("etc/.wh.not-there", "", 0o644, 0, 0);
        apply(&mut tree, upper.gzip()).expect("upper");
        assert!(!exists(&tree, "etc/passwd"));
        assert!(exists(&tree, "etc"));
        assert!(!exists(&tree, "home/user"));
        assert!(tree.meta(Path::new("home/user/notes")).is_none());
        assert!(tree.meta(Path::new("home/user")).is_none());
        assert!(!exists(&tree, "etc/.wh.passwd"));
    }

    #[test]
    fn opaque_directories_hide_lower_content_but_keep_their_own() {
        let (_t, mut tree) = tree();
        apply(&mut tree, base().bytes()).expect("base");
        let upper = Layer::new()
            .dir("home/user/", 0o700)
            .file("home/user/.wh..wh..opq", "", 0o644, 0, 0)
            .file("home/user/new", "new", 0o644, 1000, 1000)
            .dir("home/user/sub/", 0o755);
        apply(&mut tree, upper.bytes()).expect("upper");
        assert!(!exists(&tree, "home/user/notes"));
        assert!(!exists(&tree, "home/user/sub/deep"));
        assert!(exists(&tree, "home/user/new"));
        assert!(exists(&tree, "home/user/sub"));
        assert!(!exists(&tree, "home/user/.wh..wh..opq"));
        assert_eq!(tree.meta(Path::new("home/user")).expect("user").mode, 0o700);
        assert!(exists(&tree, "etc/passwd"));
    }

    #[test]
    fn hard_links_share_the_inode_and_its_records() {
        let (_t, mut tree) = tree();
        let layer = base().link(tar::EntryType::Link, "home/user/alias", "home/user/notes");
        apply(&mut tree, layer.bytes()).expect("apply");
        let a = std::fs::metadata(tree.root().join("home/user/alias")).expect("alias");
        let b = std::fs::metadata(tree.root().join("home/user/notes")).expect("notes");
        assert_eq!(a.ino(), b.ino());
        assert_eq!(
            tree.meta(Path::new("home/user/alias")).expect("m").uid,
            1000
        );

        for (target, why) in [
            ("../etc/passwd", ".."),
            ("/etc/passwd", "absolute"),
            ("home/missing", "does not exist"),
            ("home/user", "directory"),
        ] {
            let layer = Layer::new().link(tar::EntryType::Link, "x", target);
            let err = apply(&mut tree, layer.bytes()).expect_err(target);
            assert!(
                matches!(err, OciError::UnsafeEntry { .. }) && err.to_string().contains(why),
                "{target}: {err}"
            );
        }
    }

    #[test]
    fn symlinks_are_kept_as_content_and_never_written_through() {
        let (t, mut tree) = tree();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let layer = Layer::new()
            .link(tar::EntryType::Symlink, "abs", "/etc/passwd")
            .link(
                tar::EntryType::Symlink,
                "escape",
                outside.to_str().expect("utf8"),
            )
            .link(tar::EntryType::Symlink, "up", "../../..");
        apply(&mut tree, layer.bytes()).expect("links");
        assert_eq!(
            std::fs::read_link(tree.root().join("abs")).expect("readlink"),
            Path::new("/etc/passwd")
        );
        for path in ["escape/file", "up/file", "escape/a/b"] {
            let layer = Layer::new().file(path, "pwned", 0o644, 0, 0);
            let err = apply(&mut tree, layer.bytes()).expect_err(path);
            assert!(err.to_string().contains("symlink"), "{path}: {err}");
        }
        // Hard links through a symlink, whiteouts through a symlink.
        let layer = Layer::new().link(tar::EntryType::Link, "escape/l", "abs");
        assert!(apply(&mut tree, layer.bytes()).is_err());
        let layer = Layer::new().file("escape/.wh.victim", "", 0o644, 0, 0);
        std::fs::write(outside.join("victim"), "keep").expect("write");
        assert!(apply(&mut tree, layer.bytes()).is_err());
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 1);
        assert!(outside.join("victim").exists());
        // Replacing the symlink itself is fine, and does not touch its target.
        let layer = Layer::new().file("escape", "now a file", 0o644, 0, 0);
        apply(&mut tree, layer.bytes()).expect("replace");
        assert!(outside.is_dir());
        assert!(
            std::fs::symlink_metadata(tree.root().join("escape"))
                .expect("m")
                .is_file()
        );
    }

    #[test]
    fn parent_dirs_and_absolute_paths_are_refused() {
        let (t, mut tree) = tree();
        for path in ["../evil", "a/../../evil", "/etc/evil", "./a/../../evil"] {
            let layer = Layer::new().file(path, "x", 0o644, 0, 0);
            let err = apply(&mut tree, layer.bytes()).expect_err(path);
            assert!(matches!(err, OciError::UnsafeEntry { .. }), "{path}: {err}");
            let layer = Layer::new().link(tar::EntryType::Symlink, path, "x");
            assert!(apply(&mut tree, layer.bytes()).is_err(), "{path}");
        }
        assert!(!t.path().join("evil").exists());
        // ./ prefixes are fine.
        apply(
            &mut tree,
            Layer::new().file("./ok", "x", 0o644, 0, 0).bytes(),
        )
        .expect("ok");
        assert!(exists(&tree, "ok"));
    }

    #[test]
    fn device_nodes_are_recorded_only_under_dev() {
        let (_t, mut tree) = tree();
        let layer = Layer::new()
            .dir("dev/", 0o755)
            .device(tar::EntryType::Char, "dev/null", 1, 3)
            .device(tar::EntryType::Block, "dev/vdb", 254, 16);
        apply(&mut tree, layer.bytes()).expect("dev");
        assert!(!exists(&tree, "dev/null"));
        assert_eq!(
            tree.meta(Path::new("dev/null")).expect("null").node,
            Node::Char { major: 1, minor: 3 }
        );
        assert_eq!(
            tree.meta(Path::new("dev/vdb")).expect("vdb").node,
            Node::Block {
                major: 254,
                minor: 16
            }
        );
        for path in ["etc/mem", "dev", "tmp/dev/x"] {
            let layer = Layer::new().device(tar::EntryType::Char, path, 1, 1);
            let err = apply(&mut tree, layer.bytes()).expect_err(path);
            assert!(err.to_string().contains("/dev"), "{path}: {err}");
        }
        // A whiteout removes a recorded device.
        apply(
            &mut tree,
            Layer::new().file("dev/.wh.vdb", "", 0o644, 0, 0).bytes(),
        )
        .expect("whiteout");
        assert!(tree.meta(Path::new("dev/vdb")).is_none());
    }

    #[test]
    fn the_space_budget_is_checked_before_writing() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut tree = Tree::create(&t.path().join("root"), 100).expect("tree");
        let layer = Layer::new().file("a", &"x".repeat(60), 0o644, 0, 0).file(
            "b",
            &"y".repeat(60),
            0o644,
            0,
            0,
        );
        let err = apply(&mut tree, layer.bytes()).expect_err("too big");
        assert!(matches!(err, OciError::NoSpace { .. }), "{err}");
        assert!(exists(&tree, "a"));
        assert!(!exists(&tree, "b"));
    }

    #[test]
    fn zstd_layers_and_garbage() {
        let (_t, mut tree) = tree();
        let zst = zstd::encode_all(&base().bytes()[..], 3).expect("zstd");
        apply(&mut tree, zst).expect("zstd");
        assert!(exists(&tree, "etc/passwd"));
        let err = apply(&mut tree, vec![0x1f, 0x8b, 1, 2, 3]).expect_err("garbage");
        assert!(matches!(err, OciError::BadLayer { .. }), "{err}");
    }
}
