//! Writing files into a VM's disk before it boots, without mounting it:
//! `debugfs` edits the ext4 image directly, owner and mode included, so the
//! daemon needs no root for it.

use crate::StorageError;
use banger_ext4::{CancellationToken, debugfs};
use std::path::{Component, Path, PathBuf};

/// One file to put into a disk, owned by root.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Path inside the file system, absolute (`/upper/etc/ssh/key`).
    pub path: String,
    pub content: Vec<u8>,
    /// Permission bits, e.g. 0o600.
    pub mode: u32,
    /// Mode of parent directories created on the way.
    pub dir_mode: u32,
}

/// Writes `files` into the ext4 file system in `disk` (not in use),
/// replacing files already there and creating missing parent directories.
/// Paths must be absolute and plain (no `.`/`..`, no quoting needed).
pub async fn write_files(disk: &Path, files: &[GuestFile]) -> Result<(), StorageError> {
    let staging = tempfile_dir(disk)?;
    let result = write_files_in(disk, files, &staging).await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

async fn write_files_in(
    disk: &Path,
    files: &[GuestFile],
    staging: &Path,
) -> Result<(), StorageError> {
    let mut script = String::new();
    let mut made_dirs: Vec<String> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let parts = plain_components(&f.path)?;
        let mut dir = String::new();
        for p in &parts[..parts.len() - 1] {
            dir.push('/');
            dir.push_str(p);
            if !made_dirs.contains(&dir) {
                // mkdir of an existing directory only prints an error,
                // which is fine: the mode is set either way.
                script.push_str(&format!("mkdir {dir}\n"));
                script.push_str(&format!(
                    "set_inode_field {dir} mode 04{:04o}\n",
                    f.dir_mode & 0o7777
                ));
                script.push_str(&format!(
                    "set_inode_field {dir} uid 0\nset_inode_field {dir} gid 0\n"
                ));
                made_dirs.push(dir.clone());
            }
        }
        let local = staging.join(format!("f{i}"));
        std::fs::write(&local, &f.content).map_err(|source| StorageError::Io {
            context: format!("staging {}", local.display()),
            source,
        })?;
        let path = &f.path;
        script.push_str(&format!("rm {path}\n"));
        script.push_str(&format!("write {} {path}\n", local.display()));
        script.push_str(&format!(
            "set_inode_field {path} mode 010{:04o}\n",
            f.mode & 0o7777
        ));
        script.push_str(&format!(
            "set_inode_field {path} uid 0\nset_inode_field {path} gid 0\n"
        ));
    }
    let script_path = staging.join("commands");
    let out = debugfs::run_script(
        disk,
        &script_path,
        script.as_bytes(),
        true,
        &CancellationToken::new(),
    )
    .await?;
    // debugfs exits 0 whatever its commands did: check each file instead.
    for f in files {
        if debugfs::cat(disk, &f.path).await? != f.content {
            return Err(StorageError::Tool {
                tool: "debugfs",
                path: disk.to_path_buf(),
                detail: format!("writing {} did not take: {}", f.path, out.last_error()),
            });
        }
    }
    Ok(())
}

fn plain_components(path: &str) -> Result<Vec<String>, StorageError> {
    let bad = || StorageError::Io {
        context: format!("guest path {path:?}"),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "must be absolute, plain and free of spaces and quotes",
        ),
    };
    if !path.starts_with('/')
        || path
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        return Err(bad());
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts)
}

/// A private scratch directory next to `disk` (same file system, and the
/// VM directory is the daemon's own).
pub(crate) fn tempfile_dir(disk: &Path) -> Result<PathBuf, StorageError> {
    let parent = disk.parent().unwrap_or(Path::new("."));
    for n in 0..100u32 {
        let dir = parent.join(format!(".inject-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(StorageError::Io {
                    context: format!("creating a scratch directory in {}", parent.display()),
                    source,
                });
            }
        }
    }
    Err(StorageError::Io {
        context: format!("creating a scratch directory in {}", parent.display()),
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    })
}
