//! Images and kernels: lookup, and the local Debian build.
//!
//! Images and kernels from elsewhere: catalog and OCI pulls, registration of
//! local files, deletion and catalog bundles.

mod bundle;
mod debian;
mod derive;
mod kernels;
mod pull;
mod register;

pub use bundle::BundleError;
pub use debian::BuildError;
pub use derive::DeriveError;
pub use kernels::DeleteKernelError;
pub use pull::PullError;

pub use register::{DeleteImageError, RegisterError};

use crate::error::Chain;
use crate::{Daemon, ErrorKind};
use banger_api::templates::WarmImageRequest;
use banger_api::{BuildImageRequest, ProgressSink, Step};
use banger_catalog::CatalogError;
use banger_model::{ImageRecord, KernelRecord};
use banger_store::StoreError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Whether a pull reference is an OCI image reference rather than a catalog
/// name (catalog names never hold `/`, `:` or `@`).
pub(crate) fn is_oci_reference(reference: &str) -> bool {
    reference.contains(['/', ':', '@'])
}

/// The rule for image and kernel names: they become directory names and
/// catalog names.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), NameError> {
    let rule = match kind {
        "kernel" => &banger_api::rules::KERNEL_NAME,
        _ => &banger_api::rules::IMAGE_NAME,
    };
    rule.check(name).map_err(NameError::Rule)
}

/// An image or kernel name that cannot be used for a new one.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// It breaks the naming rule (a request to fix).
    #[error("{0}")]
    Rule(banger_api::rules::RuleError),
    /// An image of this name exists already.
    #[error(
        "image {0} already exists: delete it first (banger image delete {0}) or choose another name"
    )]
    ImageExists(String),
    /// A kernel of this name is registered already.
    #[error("kernel {0} is already registered: delete it first (banger kernel delete {0})")]
    KernelExists(String),
}

impl NameError {
    /// What kind of failure this is: a bad name is the request's, a taken
    /// one the store's state.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NameError::Rule(_) => ErrorKind::Invalid,
            NameError::ImageExists(_) | NameError::KernelExists(_) => ErrorKind::Conflict,
        }
    }
}

/// A named image or kernel that is not recorded.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("no image named {0}: see `banger image list`")]
    Image(String),
    #[error("no kernel named {0}: see `banger kernel list`")]
    Kernel(String),
}

impl Missing {
    /// Always [`ErrorKind::NotFound`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::NotFound
    }
}

/// Why the image a VM or a build boots is not there.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// No image of this name, and it is not the default image.
    #[error(
        "no image named {0}: see `banger image list`, or build it with `banger image build --name {0}`"
    )]
    NoImage(String),
    /// The catalog has the default image, but pulling it failed.
    #[error("pulling default image {name}: {}", Chain(.error))]
    DefaultPull { name: String, error: CatalogError },
    /// The catalog cannot provide the default image and its local build
    /// failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl EnsureError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EnsureError::NoImage(_) => ErrorKind::NotFound,
            EnsureError::DefaultPull { .. } => ErrorKind::Failed,
            EnsureError::Build(e) => e.kind(),
            EnsureError::Store(e) => crate::error::store_kind(e),
        }
    }
}

/// A default image name for an OCI reference: last repository component and
/// tag (`ghcr.io/org/tool:1.2` -> `tool-1.2`).
pub(crate) fn name_from_reference(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let raw = match last.split_once(':') {
        Some((repo, tag)) if !tag.is_empty() && tag != "latest" => format!("{repo}-{tag}"),
        Some((repo, _)) => repo.to_string(),
        None => last.to_string(),
    };
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    name.truncate(63);
    if name.is_empty() {
        "oci-image".into()
    } else {
        name
    }
}

/// The catalog errors after which `vm run` builds the default image locally:
/// the catalog cannot be reached or does not have it.
pub(crate) fn catalog_unavailable(e: &CatalogError) -> bool {
    matches!(
        e,
        CatalogError::NotInCatalog { .. }
            | CatalogError::WrongArch { .. }
            | CatalogError::Http { .. }
            | CatalogError::BadIndex { .. }
            | CatalogError::Incomplete { .. }
    )
}

/// The kind of a catalog error: an entry it lacks is not found, a pull
/// in the way conflicts, a bad bundle request is the caller's.
fn catalog_kind(e: &CatalogError) -> ErrorKind {
    match e {
        CatalogError::NotInCatalog { .. } => ErrorKind::NotFound,
        CatalogError::Exists(_) | CatalogError::Busy(_) => ErrorKind::Conflict,
        CatalogError::Invalid(_) => ErrorKind::Invalid,
        _ => ErrorKind::Failed,
    }
}

/// The kind of an OCI error: a bad reference or digest is the caller's,
/// an image already unpacked conflicts.
fn oci_kind(e: &banger_oci::OciError) -> ErrorKind {
    use banger_oci::OciError as O;
    match e {
        O::BadReference { .. } | O::BadDigest(_) => ErrorKind::Invalid,
        O::Exists(_) => ErrorKind::Conflict,
        _ => ErrorKind::Failed,
    }
}

/// The message an error of `kind` has always had: its own text for the
/// caller's errors, with its causes (as anyhow's `{:#}`) for failures.
fn shown(kind: ErrorKind, e: &(dyn std::error::Error + 'static)) -> String {
    match kind {
        ErrorKind::Failed => Chain(e).to_string(),
        _ => e.to_string(),
    }
}

/// `path` as an absolute, existing regular file (symlinks resolved). A
/// path that is not absolute is a bad request; a missing file is not
/// found, and one that is no regular file or cannot be read conflicts
/// with the host's state.
fn regular_file(what: &'static str, path: &str) -> Result<PathBuf, FileError> {
    let p = Path::new(path);
    let (what, path) = (what, path.to_string());
    if !p.is_absolute() {
        return Err(FileError::NotAbsolute { what, path });
    }
    match std::fs::metadata(p) {
        Ok(md) if md.is_file() => {
            std::fs::canonicalize(p).map_err(|error| FileError::Resolve { what, path, error })
        }
        Ok(_) => Err(FileError::NotRegular { what, path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(FileError::Missing { what, path })
        }
        Err(error) => Err(FileError::Unreadable { what, path, error }),
    }
}

/// A host file named in a request that cannot be used; `what` says which
/// (rootfs, kernel, ...).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {path:?} must be an absolute path")]
    NotAbsolute { what: &'static str, path: String },
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: String },
    #[error("{what} {path} is not a regular file")]
    NotRegular { what: &'static str, path: String },
    #[error("{what} {path} cannot be read: {error}")]
    Unreadable {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{what} {path}: {error}")]
    Resolve {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
}

impl FileError {
    /// What kind of failure this is: a relative path is the request's
    /// fault, a missing file not found, the rest the host's state.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FileError::NotAbsolute { .. } => ErrorKind::Invalid,
            FileError::Missing { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Conflict,
        }
    }
}

/// `path` as an absolute directory path (it need not exist yet).
fn absolute_dir(what: &'static str, path: &str) -> Result<PathBuf, FileError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(FileError::NotAbsolute {
            what,
            path: path.to_string(),
        });
    }
    Ok(p.to_path_buf())
}

/// The release of a bzImage, from its setup header's version string
/// (`kernel_version` at 0x20E points to it, relative to 0x200).
pub(crate) fn bzimage_release(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut hdr = [0u8; 0x210];
    f.read_exact(&mut hdr).ok()?;
    if &hdr[0x202..0x206] != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([hdr[0x20E], hdr[0x20F]]);
    if ptr == 0 {
        return None;
    }
    f.seek(SeekFrom::Start(u64::from(ptr) + 0x200)).ok()?;
    let mut s = [0u8; 128];
    let n = f.read(&mut s).ok()?;
    let text = String::from_utf8_lossy(&s[..n]);
    let release = text.split([' ', '\0']).next()?.trim();
    (!release.is_empty()).then(|| release.to_string())
}

/// The directory `file` is directly in, when that directory is `store/<x>`:
/// the daemon's own artifact directory, safe to remove.
fn owned_dir(store: &Path, file: &Path) -> Option<PathBuf> {
    let dir = file.parent()?;
    (dir.parent()? == store).then(|| dir.to_path_buf())
}

/// A new, empty directory `kernels_dir/<name>.<random>` (mode 0700).
pub(crate) fn new_kernel_dir(kernels_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    loop {
        let dir = kernels_dir.join(format!("{name}.{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove artifact directory");
    }
}

/// The Debian suite of the default image.
const DEFAULT_SUITE: &str = "bookworm";

impl Daemon {
    /// The image named `name`; when it is missing and it is the default image,
    /// pulls it from the catalog, or builds it locally when the catalog
    /// cannot provide it.
    pub(crate) async fn ensure_image(
        self: &Arc<Self>,
        name: &str,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, EnsureError> {
        match self.store.get_image(name) {
            Ok(img) => return Ok(img),
            Err(banger_store::StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if name != self.config.default_image_name {
            return Err(EnsureError::NoImage(name.to_string()));
        }
        progress.phase(
            Step::Image,
            format!("default image {name} not found; pulling it from the catalog"),
        );
        // Its bytes are told as lines: the operations that make the default
        // image on the way (create, template builds) have no progress bars.
        let pulled = self
            .pull_catalog_image(name, &progress.as_lines(), cancel)
            .await;
        match pulled {
            Ok(img) => return Ok(img),
            Err(e) if catalog_unavailable(&e) => progress.phase(
                Step::Image,
                format!(
                    "the catalog does not provide {name} ({e}); building it from Debian packages instead (takes about a minute)"
                ),
            ),
            Err(error) => {
                return Err(EnsureError::DefaultPull {
                    name: name.to_string(),
                    error,
                });
            }
        }
        Ok(self
            .build_debian_image(name, DEFAULT_SUITE, Vec::new(), progress, cancel.clone())
            .await?)
    }

    /// A template build of `image`, checked before its stream starts: the
    /// shape's resources, the name, and the image (the default image may
    /// still be missing: the build makes it).
    pub(crate) fn check_warm_image(
        &self,
        image: &str,
        req: &WarmImageRequest,
    ) -> Result<(), crate::warm::TemplateError> {
        crate::vm::settings::check_resources(req.vcpu, req.memory_mib, None)?;
        crate::images::check_name("image", image)?;
        if image == self.config.default_image_name {
            return Ok(());
        }
        self.store
            .get_image(image)
            .map(|_| ())
            .map_err(|_| Missing::Image(image.to_string()).into())
    }

    /// The names of a build request, checked before its stream starts.
    pub(crate) fn check_build_image(&self, req: &BuildImageRequest) -> Result<(), BuildError> {
        let names = [Some(&req.name), req.from_image.as_ref()];
        Ok(names
            .into_iter()
            .flatten()
            .try_for_each(|n| crate::images::check_name("image", n))?)
    }

    /// `POST /v1/images/build`: a local Debian build, or with `from_image`
    /// an image derived from a registered one in a transient VM.
    pub(crate) async fn build_image(
        self: &Arc<Self>,
        req: BuildImageRequest,
        progress: &ProgressSink,
        cancel: CancellationToken,
    ) -> Result<ImageRecord, BuildError> {
        match req.from_image.as_deref() {
            Some(_) if req.suite.is_some() => Err(BuildError::SuiteWithBase),
            Some(base) => {
                let derive = derive::DeriveRequest {
                    name: &req.name,
                    base,
                    docker: req.docker,
                    packages: &req.packages,
                };
                Ok(self.derive_image(derive, progress, cancel).await?)
            }
            None => {
                let suite = req.suite.as_deref().unwrap_or(DEFAULT_SUITE);
                let mut packages = req.packages.clone();
                if req.docker {
                    packages.push(banger_image::derive::DOCKER_PACKAGE.into());
                }
                self.build_debian_image(&req.name, suite, packages, progress, cancel)
                    .await
            }
        }
    }

    /// Every image's record.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.store.list_images()
    }

    /// The record of image `name`.
    pub fn get_image(&self, name: &str) -> Result<ImageRecord, StoreError> {
        self.store.get_image(name)
    }

    /// Every kernel's record.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        self.store.list_kernels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_names() {
        assert!(!is_oci_reference("debian-bookworm"));
        assert!(!is_oci_reference("generic-6.12"));
        assert!(is_oci_reference("127.0.0.1:5000/test/alpine:3"));
        assert!(is_oci_reference("docker.io/library/busybox"));
        assert!(is_oci_reference("x@sha256:00"));
        assert_eq!(name_from_reference("ghcr.io/org/tool:1.2"), "tool-1.2");
        assert_eq!(
            name_from_reference("127.0.0.1:5000/a/Busy_Box:latest"),
            "busy_box"
        );
        assert_eq!(name_from_reference("reg:5000/repo"), "repo");
        assert_eq!(
            name_from_reference(&format!("reg/repo@sha256:{}", "a".repeat(64))),
            "repo"
        );
        assert_eq!(name_from_reference("reg/--x:t+1"), "x-t-1");
        check_name("image", &name_from_reference("reg/--x:t+1")).expect("valid");
        assert!(check_name("image", "Bad").is_err());
        assert!(check_name("image", "-x").is_err());
    }

    #[test]
    fn only_the_store_s_own_directories_are_owned() {
        let store = Path::new("/s/images");
        assert_eq!(
            owned_dir(store, Path::new("/s/images/a/rootfs.ext4")),
            Some(PathBuf::from("/s/images/a"))
        );
        assert_eq!(owned_dir(store, Path::new("/home/u/rootfs.ext4")), None);
        assert_eq!(owned_dir(store, Path::new("/s/images/rootfs.ext4")), None);
        assert_eq!(
            owned_dir(store, Path::new("/s/images/a/b/rootfs.ext4")),
            None
        );
    }

    #[test]
    fn bzimage_release_reads_the_setup_header() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("bz");
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-42-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        std::fs::write(&p, &img).expect("write");
        assert_eq!(bzimage_release(&p).as_deref(), Some("6.1.0-42-cloud-amd64"));
        std::fs::write(&p, b"not a kernel").expect("write");
        assert_eq!(bzimage_release(&p), None);
    }
}
