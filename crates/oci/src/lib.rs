//! OCI image import: `banger image pull <registry/repo:tag|@digest>`.
//!
//! [`pull_to_ext4`] resolves a reference on any OCI / Docker v2 registry
//! (anonymous, basic or bearer auth; credentials from the Docker config
//! file), picks the linux/amd64 image of a multi-arch index, downloads its
//! layers into a digest-addressed cache (each blob verified by sha256 and
//! size before it is renamed into place, and reused without network
//! afterwards), unpacks them in order into a staging tree (whiteouts, opaque
//! directories, hard links, symlinks never followed, device nodes and
//! ownership recorded rather than created), injects banger's guest agent and
//! an sshd bootstrap, and writes an ext4 root file system without root:
//! `mkfs.ext4 -d`, then one `debugfs -w -f` run for ownership, modes and
//! device nodes, checked by `e2fsck -fn`. Everything is written in a staging
//! directory renamed into place at the end, so a failed or cancelled pull
//! leaves nothing behind.
//!
//! Registry content is untrusted: path traversal, writes through symlinks,
//! device nodes outside `/dev`, digest or size mismatches, unknown media
//! types and layers larger than the free space are all refused.

mod auth;
mod cache;
mod ext4;
mod inject;
mod pull;
mod registry;
mod unpack;

pub use auth::{Credentials, DockerConfigAuth, HelperRef, docker_config_path};
pub use cache::BlobCache;
pub use inject::{FIRST_BOOT_SSHD_SCRIPT, GuestInfo, INSTALL_SSHD_PATH, INSTALL_SSHD_UNIT};
pub use pull::{
    IMAGE_INFO_FILE, PullOptions, PullProgress, PullReport, PulledImage, ROOTFS_FILE, pull_to_ext4,
};
pub use registry::{is_loopback, parse_reference};
pub use unpack::{EntryMeta, Node, Tree};

use std::path::PathBuf;

/// Errors of an OCI import. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("image reference {reference:?} is not valid: {reason}")]
    BadReference { reference: String, reason: String },
    #[error(
        "registry {registry} refused access to {reference} ({detail}): add credentials for \
         {registry} to the Docker config file (docker login {registry})"
    )]
    Unauthorized {
        registry: String,
        reference: String,
        detail: String,
    },
    #[error(
        "credential helper {helper} failed for {registry}: {reason}; try `{helper} get` with \
         {registry} on its stdin, or `docker login {registry}`"
    )]
    CredentialHelper {
        helper: String,
        registry: String,
        reason: String,
    },
    #[error("registry error for {reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error(
        "{what} {digest} of {reference} has media type {media_type:?}, which banger cannot import \
         (supported: OCI and Docker v2 schema2 images with tar, tar+gzip or tar+zstd layers)"
    )]
    UnknownMediaType {
        reference: String,
        what: &'static str,
        digest: String,
        media_type: String,
    },
    #[error(
        "{reference} has no linux/amd64 image (the index lists: {available}); banger guests are linux/amd64"
    )]
    NoPlatform {
        reference: String,
        available: String,
    },
    #[error("{reference} is a {platform} image; banger guests are linux/amd64")]
    WrongPlatform { reference: String, platform: String },
    #[error("digest {0:?} is not a valid sha256 digest (sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error(
        "blob {digest} from the registry has sha256:{actual}: the content does not match its digest, \
         so it was discarded; the registry's copy is corrupt or was tampered with"
    )]
    DigestMismatch { digest: String, actual: String },
    #[error(
        "blob {digest}: the registry sent {actual} bytes where the manifest declares {expected} \
         (a truncated or oversized download); it was discarded, try the pull again"
    )]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer {layer}: refusing entry {path:?}: {reason}")]
    UnsafeEntry {
        layer: String,
        path: String,
        reason: String,
    },
    #[error("layer {layer} is not a valid tar archive: {reason}")]
    BadLayer { layer: String, reason: String },
    #[error(
        "not enough free space in {path} for {what}: {needed} bytes needed, {available} available; \
         free some space or use another directory"
    )]
    NoSpace {
        path: PathBuf,
        what: String,
        needed: u64,
        available: u64,
    },
    #[error("Docker config {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
    #[error("{0} already exists: remove it or choose another name")]
    Exists(PathBuf),
    #[error("e2fsck found errors in the new file system {image}: {last_line}")]
    Fsck { image: PathBuf, last_line: String },
    #[error(transparent)]
    Image(#[from] banger_image::ImageError),
    #[error(transparent)]
    Ext4(banger_ext4::Ext4Error),
    #[error("image pull cancelled")]
    Cancelled,
    /// A file banger must read from the image is not usable.
    #[error("{0}; fix the image and pull it again")]
    BadImageFile(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<banger_ext4::Ext4Error> for OciError {
    fn from(e: banger_ext4::Ext4Error) -> Self {
        match e {
            banger_ext4::Ext4Error::Cancelled { .. } => OciError::Cancelled,
            e => OciError::Ext4(e),
        }
    }
}

impl OciError {
    /// Wraps an I/O error with what was being done (naming the path).
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| OciError::Io { context, source }
    }
}

/// Runs blocking file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OciError::Io {
            context: "image pull worker".into(),
            source: std::io::Error::other(e),
        })?
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub(crate) fn free_space(path: &std::path::Path) -> Result<u64, OciError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| OciError::Io {
        context: format!("checking free space of {}", path.display()),
        source: std::io::Error::from(e),
    })?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}
