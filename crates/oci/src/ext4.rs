//! Flattening the staging tree into an ext4 image without root:
//! `mkfs.ext4 -d` copies the tree, one `debugfs -w -f` run then gives every
//! inode the owner and mode the layers asked for and adds the device nodes,
//! and `e2fsck -fn` checks the result.

use crate::OciError;
use crate::unpack::{EntryMeta, Node, Tree};
use banger_ext4::{Ext4Error, debugfs, inode_count, mkfs_tree, rootfs_size};
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const S_IFMT: u32 = 0o170000;

/// `/rel` quoted for debugfs's command parser (`"` doubled inside quotes).
fn quote(rel: &Path) -> Vec<u8> {
    let mut s = b"/".to_vec();
    s.extend_from_slice(rel.as_os_str().as_bytes());
    debugfs::quote(&s)
}

fn push_cmd(cmds: &mut Vec<u8>, parts: &[&[u8]]) {
    cmds.extend_from_slice(&parts.join(&b' '));
    cmds.push(b'\n');
}

/// The debugfs commands that make the image built from `tree` match what
/// the layers recorded: owners, modes (mkfs copied the host's, which this
/// process may have widened to read them) and device nodes. Paths banger
/// added itself become root-owned. Returns the script and how many changes
/// it makes.
pub fn debugfs_script(tree: &Tree) -> Result<(Vec<u8>, usize), OciError> {
    let root = tree.root();
    let mut cmds = Vec::new();
    let mut count = 0;
    let mut seen_inodes = HashSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = std::fs::symlink_metadata(&p)
            .map_err(OciError::io(format!("reading {}", p.display())))?;
        if md.is_dir() {
            let entries =
                std::fs::read_dir(&p).map_err(OciError::io(format!("listing {}", p.display())))?;
            for e in entries {
                let e = e.map_err(OciError::io(format!("listing {}", p.display())))?;
                stack.push(rel.join(e.file_name()));
            }
        } else if md.nlink() > 1 && !seen_inodes.insert(md.ino()) {
            continue;
        }
        let want = tree.meta(&rel).copied().unwrap_or(EntryMeta {
            node: Node::File,
            uid: 0,
            gid: 0,
            mode: md.mode() & 0o7777,
            mtime: md.mtime(),
        });
        let q = quote(&rel);
        // The root directory's owner and mode come from mkfs, not the host: always set.
        let is_root = rel.as_os_str().is_empty();
        if md.uid() != want.uid || is_root {
            push_cmd(
                &mut cmds,
                &[
                    b"set_inode_field",
                    &q,
                    b"uid",
                    want.uid.to_string().as_bytes(),
                ],
            );
            count += 1;
        }
        if md.gid() != want.gid || is_root {
            push_cmd(
                &mut cmds,
                &[
                    b"set_inode_field",
                    &q,
                    b"gid",
                    want.gid.to_string().as_bytes(),
                ],
            );
            count += 1;
        }
        if !md.file_type().is_symlink() && (md.mode() & 0o7777 != want.mode || is_root) {
            let mode = format!("0{:o}", (md.mode() & S_IFMT) | want.mode);
            push_cmd(
                &mut cmds,
                &[b"set_inode_field", &q, b"mode", mode.as_bytes()],
            );
            count += 1;
        }
    }
    for (rel, m) in tree.entries() {
        let (kind, major, minor, ifmt) = match m.node {
            Node::Char { major, minor } => ("c", major, minor, 0o020000),
            Node::Block { major, minor } => ("b", major, minor, 0o060000),
            _ => continue,
        };
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        // debugfs's mknod takes a name in the current directory, not a path.
        let name = &debugfs::quote(name.as_bytes());
        push_cmd(&mut cmds, &[b"cd", &quote(parent)]);
        push_cmd(
            &mut cmds,
            &[
                b"mknod",
                name,
                kind.as_bytes(),
                major.to_string().as_bytes(),
                minor.to_string().as_bytes(),
            ],
        );
        let mode = format!("0{:o}", ifmt | m.mode);
        for (field, value) in [
            ("mode", mode),
            ("uid", m.uid.to_string()),
            ("gid", m.gid.to_string()),
            ("mtime", format!("@{}", m.mtime)),
        ] {
            push_cmd(
                &mut cmds,
                &[b"set_inode_field", name, field.as_bytes(), value.as_bytes()],
            );
        }
        push_cmd(&mut cmds, &[b"cd", b"/"]);
        count += 5;
    }
    Ok((cmds, count))
}

/// Writes the ext4 image `rootfs` from `tree` (at least `min_size` bytes,
/// sparse), fixes it with debugfs and checks it. Returns its size and the
/// number of inode changes debugfs made.
pub async fn make_ext4(
    tree: &Tree,
    rootfs: &Path,
    min_size: u64,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(u64, usize), OciError> {
    for tool in ["mkfs.ext4", "debugfs", "e2fsck"] {
        banger_ext4::tool(tool)?;
    }
    let usage = banger_image::tree_usage(tree.root())?;
    let devices = tree
        .entries()
        .filter(|(_, m)| matches!(m.node, Node::Char { .. } | Node::Block { .. }))
        .count() as u64;
    let size = rootfs_size(usage.bytes).max(min_size.div_ceil(MIB) * MIB);
    let parent = rootfs.parent().unwrap_or(Path::new("."));
    let available = crate::free_space(parent)?;
    // The image is sparse: it takes about what the tree takes, plus metadata.
    let needed = usage.bytes + usage.bytes / 8 + 64 * MIB;
    if needed > available {
        return Err(OciError::NoSpace {
            path: parent.to_path_buf(),
            what: "the ext4 root file system".into(),
            needed,
            available,
        });
    }
    std::fs::File::create(rootfs)
        .and_then(|f| f.set_len(size))
        .map_err(OciError::io(format!("creating {}", rootfs.display())))?;
    let inodes = inode_count(usage.inodes + devices, size);
    mkfs_tree(tree.root(), rootfs, "rootfs", inodes, on_line, cancel).await?;

    let (script, count) = debugfs_script(tree)?;
    if count > 0 {
        let cmd_file = parent.join(".debugfs-commands");
        let run = debugfs::run_script(rootfs, &cmd_file, &script, true, cancel).await;
        let _ = std::fs::remove_file(&cmd_file);
        let errors = run?.errors();
        if let Some(first) = errors.first() {
            return Err(Ext4Error::Debugfs {
                image: rootfs.to_path_buf(),
                count: errors.len(),
                first: first.clone(),
            }
            .into());
        }
    }
    match banger_ext4::check(rootfs, on_line, cancel).await {
        Ok(()) => Ok((size, count)),
        Err(Ext4Error::Failed { message, .. }) => Err(OciError::Fsck {
            image: rootfs.to_path_buf(),
            last_line: message,
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote(Path::new("a b/q\"x")), b"\"/a b/q\"\"x\"");
        assert_eq!(quote(Path::new("")), b"\"/\"");
    }
}
