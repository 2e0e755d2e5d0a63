//! `manifest.json`: the completion marker of a built image and the record of
//! what it was made from.

use crate::ImageError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// What a built image is and what it was made from. It is written last, just
/// before the image directory is renamed into place, so its presence means
/// the image is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// The mirror given to mmdebstrap; `None` means its default (deb.debian.org).
    pub mirror: Option<String>,
    /// Every package asked for on top of the minbase variant.
    pub packages: Vec<String>,
    /// Directory name of the kernel under the kernels directory.
    pub kernel_name: String,
    /// Kernel release, e.g. `6.1.0-50-cloud-amd64`.
    pub kernel_release: String,
    /// File name of the root file system inside the image directory.
    pub rootfs: String,
    /// Size of the root file system image.
    pub rootfs_bytes: u64,
    /// File name of the `/root` work seed inside the image directory;
    /// absent in images made before work seeds existed.
    #[serde(default)]
    pub work_seed: Option<String>,
    /// Disk usage of the unpacked tree the file system was made from.
    pub tree_bytes: u64,
    /// sha256 of the banger-agent binary baked in, lowercase hex.
    pub agent_sha256: String,
    /// RFC 3339 time the build finished.
    pub created_at: String,
}

impl Manifest {
    /// File name of the manifest inside an image directory.
    pub const FILE: &'static str = "manifest.json";

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(ImageError::io(format!("reading {}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| ImageError::Io {
            context: format!("parsing {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Writes `dir/manifest.json` and flushes it to disk.
    pub fn write(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(Self::FILE);
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| ImageError::Io {
            context: "encoding the image manifest".into(),
            source: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        let ctx = || format!("writing {}", path.display());
        let mut f = std::fs::File::create(&path).map_err(ImageError::io(ctx()))?;
        f.write_all(&text).map_err(ImageError::io(ctx()))?;
        f.sync_all().map_err(ImageError::io(ctx()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "debian-bookworm".into(),
            suite: "bookworm".into(),
            mirror: Some("http://deb.debian.org/debian".into()),
            packages: vec!["systemd-sysv".into(), "jq".into()],
            kernel_name: "debian-bookworm-6.1.0-50-cloud-amd64".into(),
            kernel_release: "6.1.0-50-cloud-amd64".into(),
            rootfs: "rootfs.ext4".into(),
            rootfs_bytes: 812 << 20,
            work_seed: Some("work-seed.ext4".into()),
            tree_bytes: 430 << 20,
            agent_sha256: "ab".repeat(32),
            created_at: "2026-11-23T10:00:00Z".into(),
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let m = sample();
        m.write(t.path()).expect("write");
        assert_eq!(Manifest::read(t.path()).expect("read"), m);
    }

    #[test]
    fn rejects_partial_and_unknown_content() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join(Manifest::FILE), r#"{"name":"x"}"#).expect("write");
        assert!(matches!(
            Manifest::read(t.path()),
            Err(ImageError::Io { .. })
        ));
        let mut v = serde_json::to_value(sample()).expect("to value");
        v["surprise"] = serde_json::json!(1);
        std::fs::write(t.path().join(Manifest::FILE), v.to_string()).expect("write");
        assert!(Manifest::read(t.path()).is_err());
        std::fs::remove_file(t.path().join(Manifest::FILE)).expect("rm");
        assert!(Manifest::read(t.path()).is_err());
    }
}
