//! Per-VM disks.
//!
//! Every VM boots from its image's rootfs, which is never written: each VM
//! gets a copy-on-write overlay file backed by it, so creating a VM costs a
//! few kilobytes and milliseconds whatever the image size.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// Errors making or removing disks.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("base image {0} does not exist: rebuild or re-pull the image")]
    MissingBase(PathBuf),
    #[error("qemu-img not found: apt-get install qemu-utils")]
    QemuImgMissing,
    #[error("qemu-img failed to create {path}: {stderr}")]
    QemuImg { path: PathBuf, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The file name of a VM's root overlay inside its directory.
pub const ROOT_OVERLAY: &str = "root.qcow2";

/// Creates `out` as a qcow2 overlay whose reads fall through to the raw `base`,
/// with a virtual size of at least `min_size` bytes (never smaller than the
/// base). Returns the virtual size. Precondition: `out` does not exist. On
/// error nothing is left at `out`.
pub async fn create_root_overlay(
    base: &Path,
    out: &Path,
    min_size: u64,
) -> Result<u64, StorageError> {
    let base_len = match std::fs::metadata(base) {
        Ok(md) if md.is_file() => md.len(),
        _ => return Err(StorageError::MissingBase(base.to_path_buf())),
    };
    // qcow2 sizes are whole sectors; round up to MiB for tidy numbers.
    let size = base_len.max(min_size).div_ceil(1 << 20) * (1 << 20);
    let base = std::path::absolute(base).map_err(|source| StorageError::Io {
        context: format!("resolving {}", base.display()),
        source,
    })?;
    let output = Command::new("qemu-img")
        .arg("create")
        .args(["-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(out)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::QemuImgMissing,
            _ => StorageError::Io {
                context: "running qemu-img".into(),
                source: e,
            },
        })?;
    if !output.status.success() {
        let _ = tokio::fs::remove_file(out).await;
        return Err(StorageError::QemuImg {
            path: out.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(size)
}

/// Bytes actually allocated on the host by the files under `dir` (sparse-aware).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            total += allocated_bytes(&e.path());
        } else {
            total += md.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlay_is_small_and_backed_by_base() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("base.ext4");
        let f = std::fs::File::create(&base).expect("base");
        f.set_len(64 << 20).expect("len");
        let out = t.path().join(ROOT_OVERLAY);
        let size = create_root_overlay(&base, &out, 128 << 20)
            .await
            .expect("overlay");
        assert_eq!(size, 128 << 20);
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&out)
            .output()
            .await
            .expect("info");
        let v = String::from_utf8_lossy(&info.stdout);
        assert!(v.contains("\"backing-filename\""), "{v}");
        assert!(v.contains(&*base.to_string_lossy()), "{v}");
        assert!(std::fs::metadata(&out).expect("md").len() < 1 << 20);
    }

    #[tokio::test]
    async fn missing_base_is_a_clear_error_and_leaves_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let out = t.path().join(ROOT_OVERLAY);
        let err = create_root_overlay(&t.path().join("nope"), &out, 0)
            .await
            .expect_err("must fail");
        assert!(matches!(err, StorageError::MissingBase(_)));
        assert!(!out.exists());
    }
}
