//! banger's image and kernel catalog.
//!
//! The catalog is an index ([`Index`], JSON) of pre-built bundles: an image
//! bundle holds a root file system (and optionally a `/root` work-seed), a
//! kernel bundle holds a kernel for QEMU (bzImage + initrd) and Firecracker
//! (vmlinux). Bundles are tar streams compressed with zstd, with a
//! `manifest.json` first that lists every file with its size and sha256
//! ([`ImageManifest`], [`KernelManifest`]). Published bundle files are named
//! by their content: `<name>-<sha256[..16]>.tar.zst`.
//!
//! Pulling ([`pull_image`], [`pull_kernel`]) downloads the bundle to a
//! `.part` file in the cache directory (resumed with HTTP `Range` after an
//! interruption), checks the sha256 of the whole bundle against the index,
//! and only then unpacks it into a staging directory of the store that is
//! renamed into place at the end. Publishing ([`bundle_image`],
//! [`bundle_kernel`], [`merge_into_index_file`]) writes bundles and the
//! index entries that describe them.

mod bundle;
mod download;
mod extract;
mod index;
mod manifest;
mod names;
mod pull;

pub use bundle::{
    BundledImage, BundledKernel, ImageBundleRequest, KernelBundleRequest, bundle_file_name,
    bundle_image, bundle_kernel,
};
pub use index::{
    EMBEDDED_INDEX, INDEX_VERSION, ImageEntry, Index, IndexEntry, KernelEntry, load_index,
    merge_into_index_file,
};
pub use manifest::{
    BundleFile, CONFIG_FILE, FileSpec, IMAGE_FILES, INITRD_FILE, ImageManifest, KERNEL_FILE,
    KERNEL_FILES, KernelManifest, MANIFEST_FILE, MODULES_FILE, ROOTFS_FILE, VMLINUX_FILE,
    WORK_SEED_FILE, image_files, kernel_files,
};
pub use pull::{
    Progress, ProgressFn, PullOptions, PulledImage, PulledKernel, pull_image, pull_kernel,
};

use std::path::PathBuf;

/// Errors of the catalog. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{kind} {name:?} is not in the catalog (catalog has: {available})")]
    NotInCatalog {
        kind: &'static str,
        name: String,
        /// The names the catalog does have, comma-separated, or `none`.
        available: String,
    },
    #[error("catalog index {source_name} is not valid: {reason}")]
    BadIndex { source_name: String, reason: String },
    #[error("{kind} {name:?} is built for {arch}, this host is {host}")]
    WrongArch {
        kind: &'static str,
        name: String,
        arch: String,
        host: &'static str,
    },
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error(
        "download of {url} stopped at {got} of {expected} bytes ({reason}); run the pull again to resume"
    )]
    Incomplete {
        url: String,
        got: u64,
        expected: u64,
        reason: String,
    },
    #[error(
        "{url} is {actual} bytes but the catalog says {expected}: the catalog entry or the server is wrong"
    )]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "bundle {url} is corrupt: its sha256 is {actual} but the catalog says {expected}; the download was deleted, run the pull again"
    )]
    Sha256Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("bundle {bundle} is not valid: {reason}")]
    BadBundle { bundle: String, reason: String },
    #[error(
        "not enough space in {dir}: {needed} bytes needed, {available} available; free some space and pull again"
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{0} already exists: delete it first (banger image delete / banger kernel delete)")]
    Exists(PathBuf),
    #[error("another pull is downloading {0} right now: wait for it to finish")]
    Busy(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("pull cancelled; run it again to resume the download")]
    Cancelled,
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CatalogError {
    /// Wraps an I/O error with what was being done (naming the path).
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| CatalogError::Io { context, source }
    }

    pub(crate) fn bad_bundle(bundle: &str, reason: impl Into<String>) -> Self {
        CatalogError::BadBundle {
            bundle: bundle.to_string(),
            reason: reason.into(),
        }
    }
}

/// Runs file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CatalogError::Io {
            context: "background file work failed".into(),
            source: std::io::Error::other(e),
        })?
}

/// RFC 3339 UTC now.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
