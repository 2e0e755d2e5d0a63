//! Small file-system helpers: tree usage (what sizes the ext4 made from a
//! tree, see [`banger_ext4::rootfs_size`]) and hashing.

use crate::ImageError;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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

/// Lowercase hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use sha2::Digest;
    let ctx = || format!("reading {}", path.display());
    let mut f = std::fs::File::open(path).map_err(ImageError::io(ctx()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(ImageError::io(ctx()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
