use serde::{Deserialize, Serialize};

/// `manifest.json` of a built image: what it is and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub suite: String,
    pub kernel_name: String,
    pub kernel_release: String,
    /// File names inside the image directory.
    pub rootfs: String,
    pub rootfs_bytes: u64,
    /// sha256 of the banger-agent binary baked in.
    pub agent_sha256: String,
    pub created_at_unix: u64,
}

impl Manifest {
    pub const FILE: &'static str = "manifest.json";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let m = Manifest {
            name: "debian-bookworm".into(),
            suite: "bookworm".into(),
            kernel_name: "debian-6.1.0-50-cloud-amd64".into(),
            kernel_release: "6.1.0-50-cloud-amd64".into(),
            rootfs: "rootfs.ext4".into(),
            rootfs_bytes: 1 << 33,
            agent_sha256: "ab".into(),
            created_at_unix: 1,
        };
        let s = serde_json::to_string(&m).expect("ser");
        assert_eq!(serde_json::from_str::<Manifest>(&s).expect("de"), m);
        assert!(serde_json::from_str::<Manifest>(r#"{"name":"x"}"#).is_err());
    }
}
