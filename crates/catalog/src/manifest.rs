//! `manifest.json`: the first entry of every bundle, listing its files. It is
//! also written into the pulled image or kernel directory, last, so its
//! presence there means the directory is complete.

use crate::names::{NAME_RULE, is_sha256_hex, is_valid_name};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// File name of the manifest in a bundle and in a pulled directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest format this banger reads and writes.
pub(crate) const MANIFEST_VERSION: u32 = 1;

/// Largest manifest accepted.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A file a bundle may hold, and whether it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    pub name: &'static str,
    pub required: bool,
}

/// The files of an image bundle: the root file system and the optional
/// work-seed (the `/root` file system new VMs' work disks are cloned from).
pub const IMAGE_FILES: &[FileSpec] = &[
    FileSpec {
        name: ROOTFS_FILE,
        required: true,
    },
    FileSpec {
        name: WORK_SEED_FILE,
        required: false,
    },
];
pub const ROOTFS_FILE: &str = "rootfs.ext4";
pub const WORK_SEED_FILE: &str = "work-seed.ext4";

/// The files of a kernel bundle: bzImage and initrd (QEMU), the
/// uncompressed ELF vmlinux (Firecracker), the modules as a tar and the
/// kernel's build config.
pub const KERNEL_FILES: &[FileSpec] = &[
    FileSpec {
        name: KERNEL_FILE,
        required: true,
    },
    FileSpec {
        name: INITRD_FILE,
        required: false,
    },
    FileSpec {
        name: VMLINUX_FILE,
        required: false,
    },
    FileSpec {
        name: MODULES_FILE,
        required: false,
    },
    FileSpec {
        name: CONFIG_FILE,
        required: false,
    },
];
/// Same names as the kernels the local Debian build installs.
pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";
pub const VMLINUX_FILE: &str = "vmlinux";
pub const MODULES_FILE: &str = "modules.tar";
pub const CONFIG_FILE: &str = "config";

/// The names of the files an image bundle may hold.
pub fn image_files() -> impl Iterator<Item = &'static str> {
    IMAGE_FILES.iter().map(|f| f.name)
}

/// The names of the files a kernel bundle may hold.
pub fn kernel_files() -> impl Iterator<Item = &'static str> {
    KERNEL_FILES.iter().map(|f| f.name)
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub name: String,
    pub size: u64,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Bytes in 4 KiB blocks that are not all zeros: the disk space the file
    /// takes once written sparse, checked against free space before a pull.
    pub data_bytes: u64,
}

/// The manifest of an image bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub version: u32,
    pub name: String,
    /// Name of the kernel the image boots with.
    pub kernel: String,
    pub files: Vec<BundleFile>,
    /// RFC 3339 time the bundle was made.
    pub created_at: String,
    /// The banger that made it, e.g. `v0.1.0`.
    pub banger_version: String,
}

/// The manifest of a kernel bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelManifest {
    pub version: u32,
    pub name: String,
    /// Kernel release (`uname -r`).
    pub release: String,
    pub files: Vec<BundleFile>,
    /// RFC 3339 time the bundle was made.
    pub created_at: String,
    /// The banger that made it, e.g. `v0.1.0`.
    pub banger_version: String,
}

/// What extraction needs to know about either manifest.
pub(crate) trait Manifest: DeserializeOwned + Serialize + Send + 'static {
    const KIND: &'static str;
    const FILES: &'static [FileSpec];
    fn version(&self) -> u32;
    fn name(&self) -> &str;
    fn files(&self) -> &[BundleFile];
}

impl Manifest for ImageManifest {
    const KIND: &'static str = "image";
    const FILES: &'static [FileSpec] = IMAGE_FILES;
    fn version(&self) -> u32 {
        self.version
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn files(&self) -> &[BundleFile] {
        &self.files
    }
}

impl Manifest for KernelManifest {
    const KIND: &'static str = "kernel";
    const FILES: &'static [FileSpec] = KERNEL_FILES;
    fn version(&self) -> u32 {
        self.version
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn files(&self) -> &[BundleFile] {
        &self.files
    }
}

impl ImageManifest {
    /// The entry for `name`, if the image has that file.
    pub fn file(&self, name: &str) -> Option<&BundleFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

impl KernelManifest {
    /// The entry for `name`, if the kernel has that file.
    pub fn file(&self, name: &str) -> Option<&BundleFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Parses a manifest and checks it describes a `M::KIND` named
/// `expected_name` with only known files, each once, the required ones present.
pub(crate) fn parse_manifest<M: Manifest>(bytes: &[u8], expected_name: &str) -> Result<M, String> {
    let m: M = serde_json::from_slice(bytes).map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
    if m.version() != MANIFEST_VERSION {
        return Err(format!(
            "{MANIFEST_FILE} has format version {}, this banger reads version {MANIFEST_VERSION}: upgrade banger",
            m.version()
        ));
    }
    if !is_valid_name(m.name()) {
        return Err(format!(
            "{MANIFEST_FILE} names the {} {:?}: {NAME_RULE}",
            M::KIND,
            m.name()
        ));
    }
    if m.name() != expected_name {
        return Err(format!(
            "it holds the {} {:?}, the catalog entry is {expected_name:?}",
            M::KIND,
            m.name()
        ));
    }
    let mut seen = BTreeSet::new();
    for f in m.files() {
        if !M::FILES.iter().any(|s| s.name == f.name) {
            return Err(format!(
                "{MANIFEST_FILE} lists {:?}; {} bundles hold only {}",
                f.name,
                M::KIND,
                M::FILES
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(format!("{MANIFEST_FILE} lists {:?} twice", f.name));
        }
        if !is_sha256_hex(&f.sha256) {
            return Err(format!(
                "{MANIFEST_FILE} gives {:?} the sha256 {:?}",
                f.name, f.sha256
            ));
        }
        if f.data_bytes > f.size {
            return Err(format!(
                "{MANIFEST_FILE} gives {:?} more data bytes than its size",
                f.name
            ));
        }
    }
    if let Some(missing) = M::FILES
        .iter()
        .find(|s| s.required && !seen.contains(s.name))
    {
        return Err(format!("{MANIFEST_FILE} does not list {}", missing.name));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn Fn(&mut ImageManifest)>;

    fn file(name: &str) -> BundleFile {
        BundleFile {
            name: name.into(),
            size: 8192,
            sha256: "ab".repeat(32),
            data_bytes: 4096,
        }
    }

    fn sample() -> ImageManifest {
        ImageManifest {
            version: 1,
            name: "debian-bookworm".into(),
            kernel: "generic-6.12".into(),
            files: vec![file(ROOTFS_FILE), file(WORK_SEED_FILE)],
            created_at: "2026-11-23T10:00:00Z".into(),
            banger_version: "v0.1.0".into(),
        }
    }

    fn check(m: &ImageManifest) -> Result<ImageManifest, String> {
        parse_manifest::<ImageManifest>(&serde_json::to_vec(m).expect("json"), "debian-bookworm")
    }

    #[test]
    fn accepts_a_good_manifest_and_refuses_bad_ones() {
        assert_eq!(check(&sample()).expect("good"), sample());
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|m| m.name = "other".into()), "\"other\""),
            (Box::new(|m| m.version = 9), "version 9"),
            (Box::new(|m| m.files.push(file("../etc"))), "\"../etc\""),
            (Box::new(|m| m.files.push(file(ROOTFS_FILE))), "twice"),
            (Box::new(|m| m.files.remove(0).name.clear()), ROOTFS_FILE),
            (Box::new(|m| m.files[0].sha256 = "x".into()), "\"x\""),
            (Box::new(|m| m.files[0].data_bytes = 9999), "data bytes"),
        ];
        for (change, expect) in cases {
            let mut m = sample();
            change(&mut m);
            let err = check(&m).expect_err(expect);
            assert!(err.contains(expect), "{err} lacks {expect}");
        }
        let mut v = serde_json::to_value(sample()).expect("value");
        v["files"][0]["mode"] = serde_json::json!(493);
        let err = parse_manifest::<ImageManifest>(v.to_string().as_bytes(), "debian-bookworm")
            .expect_err("unknown field");
        assert!(err.contains("unknown field `mode`"), "{err}");
        let k = parse_manifest::<KernelManifest>(
            &serde_json::to_vec(&sample()).expect("json"),
            "debian-bookworm",
        );
        assert!(k.is_err(), "an image manifest is not a kernel manifest");
    }
}
