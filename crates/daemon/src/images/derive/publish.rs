//! Saving a derived image: checking its file systems and moving them into the image store.

use super::*;
use anyhow::Context;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The files of a saved derived image.
pub(super) struct DerivedFiles {
    pub(super) dir: PathBuf,
    pub(super) rootfs: PathBuf,
    pub(super) work_seed: PathBuf,
}

pub(super) fn file_len(p: &Path) -> anyhow::Result<u64> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .with_context(|| format!("reading {}", p.display()))
}

pub(super) async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a derived image's directory");
    }
}

/// `e2fsck -fn`: the guest powered off cleanly, so both file systems must
/// be clean; anything else means they are not fit to become an image.
pub(super) async fn fsck(disk: &Path, cancel: &CancellationToken) -> anyhow::Result<()> {
    banger_ext4::check(disk, &|_| {}, cancel)
        .await
        .with_context(|| format!("checking {}", disk.display()))
}

/// Moves the root file system and work disk into `images_dir/<name>/`
/// through a hidden directory renamed into place, so the image directory
/// appears complete or not at all.
pub(super) fn publish(
    images_dir: &Path,
    name: &str,
    dest: &Path,
    root: &Path,
    work: &Path,
) -> anyhow::Result<DerivedFiles> {
    let tmp = images_dir.join(format!(".derive-{name}-{:016x}", rand::random::<u64>()));
    let result = (|| {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        move_file(root, &tmp.join(ROOTFS_FILE))?;
        move_file(work, &tmp.join(WORK_SEED_FILE))?;
        // No record names this directory (the name was checked free), so
        // anything there is the leftover of an interrupted save.
        if std::fs::symlink_metadata(dest).is_ok() {
            std::fs::remove_dir_all(dest)
                .with_context(|| format!("removing the stale {}", dest.display()))?;
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("moving the image into {}", dest.display()))?;
        std::fs::File::open(images_dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", images_dir.display()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(DerivedFiles {
        dir: dest.to_path_buf(),
        rootfs: dest.join(ROOTFS_FILE),
        work_seed: dest.join(WORK_SEED_FILE),
    })
}

/// Renames `from` to `to`, copying (sparse-aware, through `cp`) when they
/// are on different file systems.
fn move_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let status = std::process::Command::new("cp")
                .args(["--sparse=always", "--"])
                .arg(from)
                .arg(to)
                .status()
                .context("running cp")?;
            if !status.success() {
                anyhow::bail!("copying {} to {} failed", from.display(), to.display());
            }
            std::fs::File::open(to)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing {}", to.display()))
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "moving {} to {}",
            from.display(),
            to.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_moves_both_files_and_replaces_a_stale_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let images = t.path().join("images");
        let vm = t.path().join("vm");
        std::fs::create_dir_all(images.join("img/junk")).expect("stale");
        std::fs::create_dir_all(&vm).expect("vm");
        let (root, work) = (vm.join("rootfs.ext4"), vm.join("work.ext4"));
        std::fs::write(&root, "root").expect("root");
        std::fs::write(&work, "work").expect("work");
        let dest = images.join("img");
        let f = publish(&images, "img", &dest, &root, &work).expect("publish");
        assert_eq!(std::fs::read_to_string(&f.rootfs).expect("read"), "root");
        assert_eq!(std::fs::read_to_string(&f.work_seed).expect("read"), "work");
        assert!(!dest.join("junk").exists());
        assert!(!root.exists() && !work.exists());
        let left: Vec<_> = std::fs::read_dir(&images)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["img"]);

        // A failure leaves no hidden directory behind.
        let err = publish(&images, "x", &images.join("x"), &root, &work);
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(&images).expect("ls").count(), 1);
    }
}
