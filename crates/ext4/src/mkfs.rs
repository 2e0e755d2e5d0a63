//! Making ext4 file systems: the size and inode arithmetic for a tree, and
//! `mkfs.ext4` with banger's standard options.

use crate::{CancellationToken, Ext4Error, run_on};
use std::ffi::OsString;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Free space the root file system gets on top of its files, besides the
/// proportional 25%: room for the first boot (journal, machine-id, ssh host
/// keys) before a VM's own disk size is applied.
pub const ROOTFS_HEADROOM: u64 = 256 * MIB;

/// ext4 bytes-per-inode ratio of the `default` usage type (`/etc/mke2fs.conf`).
const INODE_RATIO: u64 = 16384;

/// Size of the root file system for a tree using `tree_bytes`: the tree plus
/// 25% (ext4 metadata, journal, slack) plus [`ROOTFS_HEADROOM`], rounded up
/// to a whole MiB.
pub fn rootfs_size(tree_bytes: u64) -> u64 {
    (tree_bytes + tree_bytes / 4 + ROOTFS_HEADROOM).div_ceil(MIB) * MIB
}

/// Inodes to ask mkfs for: its default for `size`, unless the tree holds so
/// many small files that the default would not fit them with room to spare.
pub fn inode_count(tree_inodes: u64, size: u64) -> u64 {
    (size / INODE_RATIO).max(tree_inodes + tree_inodes / 4 + 1024)
}

/// `mkfs.ext4` arguments writing the tree at `tree` into the (already sized)
/// file `rootfs`, labelled `label`, with `inodes` inodes and a root-owned
/// root directory.
pub fn mkfs_args(tree: &Path, rootfs: &Path, label: &str, inodes: u64) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-F", "-T", "default", "-b", "4096", "-E", "root_owner=0:0"]
        .iter()
        .map(OsString::from)
        .collect();
    args.extend([
        "-L".into(),
        label.into(),
        "-N".into(),
        inodes.to_string().into(),
        "-d".into(),
        tree.into(),
        rootfs.into(),
    ]);
    args
}

/// Writes the tree at `tree` into the (already sized, sparse) file
/// `image` with `mkfs.ext4 -d` ([`mkfs_args`]), passing its output lines to
/// `on_line`.
pub async fn mkfs_tree(
    tree: &Path,
    image: &Path,
    label: &str,
    inodes: u64,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), Ext4Error> {
    let args = mkfs_args(tree, image, label, inodes);
    run_on("mkfs.ext4", image, args, on_line, cancel).await
}

/// Makes the (already sized, sparse) file `path` an empty ext4 labelled
/// `label` whose root directory belongs to root (whoever runs mkfs) with
/// permission bits `root_mode`. Lazy init keeps creation to a few
/// milliseconds; the guest kernel finishes inode table init in the
/// background.
pub async fn mkfs_empty(path: &Path, label: &str, root_mode: u32) -> Result<(), Ext4Error> {
    let cancel = CancellationToken::new();
    let args = [
        "-q",
        "-F",
        "-m",
        "0",
        "-L",
        label,
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
    ]
    .map(OsString::from)
    .into_iter()
    .chain([path.as_os_str().to_owned()])
    .collect();
    run_on("mkfs.ext4", path, args, &|_| {}, &cancel).await?;
    // mkfs has no option for the root directory's mode.
    set_root_mode(path, root_mode, &|_| {}, &cancel).await
}

/// Sets the permission bits of the root directory of the ext4 in `image`
/// (not in use) to `mode` with `debugfs -w`: `mkfs -d` gives it 0755.
pub async fn set_root_mode(
    image: &Path,
    mode: u32,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), Ext4Error> {
    let request = format!("set_inode_field / mode 04{:04o}", mode & 0o7777);
    let args = ["-w", "-R", &request]
        .map(OsString::from)
        .into_iter()
        .chain([image.as_os_str().to_owned()])
        .collect();
    run_on("debugfs", image, args, on_line, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_tree_plus_a_quarter_plus_headroom_in_whole_mib() {
        assert_eq!(rootfs_size(0), 256 * MIB);
        assert_eq!(rootfs_size(400 * MIB), (400 + 100 + 256) * MIB);
        // 1 byte more than 400 MiB still rounds up to the next MiB.
        assert_eq!(rootfs_size(400 * MIB + 1), (400 + 100 + 256 + 1) * MIB);
        assert_eq!(rootfs_size(430 * MIB) % MIB, 0);
        assert!(rootfs_size(430 * MIB) >= 430 * MIB * 5 / 4 + ROOTFS_HEADROOM);
    }

    #[test]
    fn inode_count_keeps_the_default_unless_the_tree_needs_more() {
        assert_eq!(inode_count(14_520, 800 * MIB), 800 * MIB / INODE_RATIO);
        assert_eq!(inode_count(100_000, 800 * MIB), 100_000 + 25_000 + 1024);
    }

    #[test]
    fn mkfs_args_write_the_tree_with_a_root_owned_root() {
        let args = mkfs_args(
            Path::new("/s/root"),
            Path::new("/s/rootfs.ext4"),
            "rootfs",
            50_000,
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().expect("utf8")).collect();
        assert_eq!(
            args,
            [
                "-F",
                "-T",
                "default",
                "-b",
                "4096",
                "-E",
                "root_owner=0:0",
                "-L",
                "rootfs",
                "-N",
                "50000",
                "-d",
                "/s/root",
                "/s/rootfs.ext4"
            ]
        );
    }
}
