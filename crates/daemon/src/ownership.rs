//! Ownership repair for a system install: files in banger's directories
//! that another user left behind (a banger run as root by mistake) are
//! given back to the owner through the root helper, so the unprivileged
//! daemon can use them.

use banger_root_client::HelperClient;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Walks `dirs` (not following symlinks) and asks the helper to chown
/// every entry not owned by this process's uid. Returns how many were
/// repaired; failures are logged and skipped.
pub(crate) async fn repair(helper: &HelperClient, dirs: &[PathBuf]) -> usize {
    let me = nix::unistd::geteuid().as_raw();
    let mut repaired = 0;
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if md.file_type().is_symlink() {
            continue;
        }
        if md.uid() != me {
            match helper.chown_to_owner(&path).await {
                Ok(()) => {
                    repaired += 1;
                    tracing::info!(path = %path.display(), from_uid = md.uid(), "gave back to the owner");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot repair ownership");
                    continue;
                }
            }
        }
        if md.is_dir()
            && let Ok(rd) = std::fs::read_dir(&path)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    repaired
}
