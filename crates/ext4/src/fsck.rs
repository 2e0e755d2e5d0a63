//! Checking and growing ext4 file systems: `e2fsck` and `resize2fs`.

use crate::{CancellationToken, Ext4Error, run_on};
use std::ffi::OsString;
use std::path::Path;

/// `e2fsck -fn`: a read-only full check of the ext4 in `image` (not in
/// use). Any error it finds is [`Ext4Error::Failed`] with e2fsck's last
/// line as the message.
pub async fn check(
    image: &Path,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), Ext4Error> {
    let args = vec!["-fn".into(), image.into()];
    run_on("e2fsck", image, args, on_line, cancel).await
}

/// Grows the ext4 in `image` (not in use) to fill its file, which the
/// caller has already extended.
pub async fn grow(image: &Path) -> Result<(), Ext4Error> {
    let cancel = CancellationToken::new();
    let resize = || run_on("resize2fs", image, vec![image.into()], &|_| {}, &cancel);
    // resize2fs refuses a file system mounted since its last check (a used
    // work disk) and asks for `e2fsck -f` first; a fresh copy of a seed
    // needs no check, which saves a third of a VM create's disk work.
    match resize().await {
        Err(Ext4Error::Failed { ref tail, .. }) if tail.iter().any(|l| l.contains("e2fsck")) => {}
        other => return other,
    }
    // -p repairs only what is safe without asking.
    let args: Vec<OsString> = vec!["-f".into(), "-p".into(), image.into()];
    match run_on("e2fsck", image, args, &|_| {}, &cancel).await {
        Ok(()) => {}
        // Exit status 1: errors were corrected; the file system is fine now.
        Err(Ext4Error::Failed { code: Some(1), .. }) => {}
        Err(e) => return Err(e),
    }
    resize().await
}
