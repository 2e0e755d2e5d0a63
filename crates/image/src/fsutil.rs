//! File-system arithmetic and small helpers: tree usage, the size of the
//! root file system made from it, hashing, finding tools.

use crate::ImageError;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Free space the root file system gets on top of its files, besides the
/// proportional 25%: room for the first boot (journal, machine-id, ssh host
/// keys) before a VM's own disk size is applied.
pub const ROOTFS_HEADROOM: u64 = 256 * MIB;

/// ext4 bytes-per-inode ratio of the `default` usage type (`/etc/mke2fs.conf`).
const INODE_RATIO: u64 = 16384;

/// Disk usage of a directory tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Allocated bytes (blocks, not apparent sizes), hard links counted once.
    pub bytes: u64,
    /// Number of inodes: files, directories, links, hard links counted once.
    pub inodes: u64,
}

/// Walks `root` without following symlinks or leaving its file system
/// (like `du -x`) and adds up what it occupies.
pub fn tree_usage(root: &Path) -> Result<TreeUsage, ImageError> {
    let md = std::fs::symlink_metadata(root)
        .map_err(ImageError::io(format!("reading {}", root.display())))?;
    let dev = md.dev();
    let mut usage = TreeUsage {
        bytes: md.blocks() * 512,
        inodes: 1,
    };
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(ImageError::io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path)
                .map_err(ImageError::io(format!("reading {}", path.display())))?;
            if md.dev() != dev {
                continue;
            }
            if !md.is_dir() && md.nlink() > 1 && !seen.insert(md.ino()) {
                continue;
            }
            usage.bytes += md.blocks() * 512;
            usage.inodes += 1;
            if md.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(usage)
}

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

/// Lowercase hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use sha2::Digest;
    let ctx = || format!("reading {}", path.display());
    let mut f = std::fs::File::open(path).map_err(ImageError::io(ctx()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(ImageError::io(ctx()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

pub use banger_storage::find_tool;

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
    fn usage_counts_blocks_once_per_inode_and_not_through_symlinks() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).expect("mkdir");
        let empty = tree_usage(&root).expect("usage");
        assert_eq!(empty.inodes, 2);

        std::fs::write(root.join("d/a"), vec![1u8; 64 * 1024]).expect("write");
        let one = tree_usage(&root).expect("usage");
        assert!(one.bytes >= empty.bytes + 64 * 1024, "{one:?}");
        assert_eq!(one.inodes, 3);

        // A hard link and a sparse file add no data blocks.
        std::fs::hard_link(root.join("d/a"), root.join("b")).expect("link");
        let sparse = std::fs::File::create(root.join("sparse")).expect("create");
        sparse.set_len(1 << 30).expect("set_len");
        // A symlink to a big tree outside is not followed.
        std::fs::write(t.path().join("outside"), vec![1u8; 256 * 1024]).expect("write");
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("link")).expect("symlink");
        let more = tree_usage(&root).expect("usage");
        assert_eq!(more.inodes, 5);
        assert!(more.bytes < one.bytes + 64 * 1024, "{more:?} vs {one:?}");
    }

    #[test]
    fn usage_of_a_missing_tree_is_an_error_naming_it() {
        let err = tree_usage(Path::new("/nonexistent/banger-tree")).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/banger-tree"),
            "{err}"
        );
    }

    #[test]
    fn sha256_matches_a_known_digest() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("f");
        std::fs::write(&p, "abc").expect("write");
        assert_eq!(
            sha256_file(&p).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn finds_tools_on_path_only_when_executable() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("banger-no-such-tool").is_none());
    }
}
