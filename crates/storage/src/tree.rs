//! Writing host files and directories into a (not running) ext4 disk with
//! `debugfs`, for `[[file_sync]]` and credential sync. Unlike
//! [`crate::write_files`] the content is streamed from host files, names
//! may contain spaces, and directories are entries of their own.

use crate::StorageError;
use banger_ext4::CancellationToken;
use banger_ext4::debugfs::{self, quote_str as quote};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What a [`GuestEntry`] puts at its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (created if missing; its mode is set either way).
    Dir,
    /// A regular file copied from this host path. The last component is
    /// opened without following symlinks, so a file swapped for a link
    /// after it was chosen is refused rather than followed.
    HostFile(PathBuf),
}

/// One entry to write, owned by root (uid and gid 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEntry {
    /// Absolute path inside the file system (`/.aws/config` on a work disk
    /// is the guest's `/root/.aws/config`).
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits, e.g. 0o600.
    pub mode: u32,
}

/// Whether `path` can be written by [`write_entries`]: absolute, made of
/// plain components, without double quotes, backslashes or control
/// characters (debugfs has no way to quote those).
pub fn entry_path_ok(path: &str) -> bool {
    path.starts_with('/')
        && !path
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Writes `entries`, in order, into the ext4 file system in `disk` (which
/// must not be in use). Files already there are replaced; missing parent
/// directories are created (0755, root); existing directories keep their
/// mode unless they are a [`EntryKind::Dir`] entry. Every file is read
/// back afterwards: debugfs reports nothing through its exit status.
pub async fn write_entries(disk: &Path, entries: &[GuestEntry]) -> Result<(), StorageError> {
    if entries.is_empty() {
        return Ok(());
    }
    for e in entries {
        if !entry_path_ok(&e.path) {
            return Err(StorageError::Io {
                context: format!("guest path {:?}", e.path),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "must be absolute and plain, without '..', quotes, backslashes or control characters",
                ),
            });
        }
    }
    let staging = crate::inject::tempfile_dir(disk)?;
    let result = write_in(disk, entries, &staging).await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

async fn write_in(disk: &Path, entries: &[GuestEntry], staging: &Path) -> Result<(), StorageError> {
    let mut script = String::new();
    let mut known_dirs: Vec<String> = Vec::new();
    let mut written: Vec<(String, PathBuf)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let q = quote(&e.path);
        // Parents: mkdir of an existing directory only prints an error.
        let mut dir = String::new();
        let parts: Vec<&str> = e.path.split('/').filter(|p| !p.is_empty()).collect();
        for p in &parts[..parts.len() - 1] {
            dir.push('/');
            dir.push_str(p);
            if !known_dirs.contains(&dir) {
                script.push_str(&format!("mkdir {}\n", quote(&dir)));
                known_dirs.push(dir.clone());
            }
        }
        match &e.kind {
            EntryKind::Dir => {
                if !known_dirs.contains(&e.path) {
                    script.push_str(&format!("mkdir {q}\n"));
                    known_dirs.push(e.path.clone());
                }
                script.push_str(&format!(
                    "set_inode_field {q} mode 04{:04o}\n",
                    e.mode & 0o7777
                ));
            }
            EntryKind::HostFile(src) => {
                let local = staging.join(format!("f{i}"));
                stage_copy(src, &local)?;
                script.push_str(&format!("rm {q}\n"));
                script.push_str(&format!("write {} {q}\n", quote(&local.to_string_lossy())));
                script.push_str(&format!(
                    "set_inode_field {q} mode 010{:04o}\n",
                    e.mode & 0o7777
                ));
                written.push((e.path.clone(), local));
            }
        }
        script.push_str(&format!(
            "set_inode_field {q} uid 0\nset_inode_field {q} gid 0\n"
        ));
    }
    let out = run_script(disk, staging, "commands", &script).await?;
    // Read every file back in one more debugfs run.
    let mut check = String::new();
    for (i, (path, _)) in written.iter().enumerate() {
        let back = staging.join(format!("v{i}"));
        check.push_str(&format!(
            "dump {} {}\n",
            quote(path),
            quote(&back.to_string_lossy())
        ));
    }
    if !written.is_empty() {
        run_script(disk, staging, "check", &check).await?;
    }
    for (i, (path, local)) in written.iter().enumerate() {
        let back = staging.join(format!("v{i}"));
        if !same_content(local, &back) {
            return Err(StorageError::Tool {
                tool: "debugfs",
                path: disk.to_path_buf(),
                detail: format!(
                    "writing {path} did not take (is the disk full, or a directory in the way?): {}",
                    out.last_error()
                ),
            });
        }
    }
    Ok(())
}

/// Copies `src` (last component not followed if a symlink) into `dst`.
fn stage_copy(src: &Path, dst: &Path) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        context: format!("copying {}", src.display()),
        source,
    };
    let mut from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .map_err(io)?;
    if !from.metadata().map_err(io)?.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut to = std::fs::File::create(dst).map_err(|source| StorageError::Io {
        context: format!("staging {}", dst.display()),
        source,
    })?;
    std::io::copy(&mut from, &mut to).map_err(io)?;
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let (Ok(na), Ok(nb)) = (read_full(&mut fa, &mut ba), read_full(&mut fb, &mut bb)) else {
            return false;
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

async fn run_script(
    disk: &Path,
    staging: &Path,
    name: &str,
    script: &str,
) -> Result<debugfs::ScriptOutput, StorageError> {
    let path = staging.join(name);
    let cancel = CancellationToken::new();
    Ok(debugfs::run_script(disk, &path, script.as_bytes(), true, &cancel).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        for ok in ["/a", "/.aws/config", "/dir with space/f"] {
            assert!(entry_path_ok(ok), "{ok}");
        }
        for bad in [
            "", "/", "a", "/a/../b", "/./a", "/a/", "//a", "/a\"b", "/a\\b", "/a\nb",
        ] {
            assert!(!entry_path_ok(bad), "{bad:?}");
        }
    }
}
