//! Flattening the staging tree into an ext4 image without root:
//! `mkfs.ext4 -d` copies the tree, one `debugfs -w -f` run then gives every
//! inode the owner and mode the layers asked for and adds the device nodes,
//! and `e2fsck -fn` checks the result.

use crate::OciError;
use crate::unpack::{EntryMeta, Node, Tree};
use banger_image::{ImageError, find_tool, inode_count, mkfs_args, rootfs_size, run_tool};
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const S_IFMT: u32 = 0o170000;

fn tool(name: &'static str) -> Result<PathBuf, OciError> {
    find_tool(name).ok_or(OciError::Image(ImageError::ToolMissing {
        tool: name,
        package: "e2fsprogs",
    }))
}

/// `/rel` quoted for debugfs's command parser (`"` doubled inside quotes).
fn quote(rel: &Path) -> Vec<u8> {
    let mut s = b"/".to_vec();
    s.extend_from_slice(rel.as_os_str().as_bytes());
    quote_bytes(&s)
}

fn quote_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = b"\"".to_vec();
    for &b in s {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
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
        let name = &quote_bytes(name.as_bytes());
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
    let (mkfs, debugfs, e2fsck) = (tool("mkfs.ext4")?, tool("debugfs")?, tool("e2fsck")?);
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
    let args = mkfs_args(
        tree.root(),
        rootfs,
        "rootfs",
        inode_count(usage.inodes + devices, size),
    );
    run_tool("mkfs.ext4", &mkfs, args, &[], on_line, cancel).await?;

    let (script, count) = debugfs_script(tree)?;
    if count > 0 {
        let cmd_file = parent.join(".debugfs-commands");
        std::fs::write(&cmd_file, &script)
            .map_err(OciError::io(format!("writing {}", cmd_file.display())))?;
        let run = run_debugfs(&debugfs, &cmd_file, rootfs, cancel).await;
        let _ = std::fs::remove_file(&cmd_file);
        let errors = run?;
        if let Some(first) = errors.first() {
            return Err(OciError::Debugfs {
                image: rootfs.to_path_buf(),
                count: errors.len(),
                first: first.clone(),
            });
        }
    }
    let fsck = run_tool(
        "e2fsck",
        &e2fsck,
        vec!["-fn".into(), rootfs.into()],
        &[],
        on_line,
        cancel,
    )
    .await;
    match fsck {
        Ok(()) => Ok((size, count)),
        Err(ImageError::ToolFailed { last_line, .. }) => Err(OciError::Fsck {
            image: rootfs.to_path_buf(),
            last_line,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Runs `debugfs -w -f cmd_file image` and returns its error lines (debugfs
/// exits 0 even when commands fail, and reports them on stderr).
async fn run_debugfs(
    debugfs: &Path,
    cmd_file: &Path,
    image: &Path,
    cancel: &CancellationToken,
) -> Result<Vec<String>, OciError> {
    let child = tokio::process::Command::new(debugfs)
        .arg("-w")
        .arg("-f")
        .arg(cmd_file)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(OciError::io(format!("starting {}", debugfs.display())))?;
    let out = tokio::select! {
        out = child.wait_with_output() => out.map_err(OciError::io("waiting for debugfs"))?,
        _ = cancel.cancelled() => return Err(OciError::Cancelled),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut errors: Vec<String> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .map(String::from)
        .collect();
    if !out.status.success() {
        errors.insert(0, format!("debugfs exited with {}", out.status));
    }
    Ok(errors)
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
