//! Images banger boots.
//!
//! This crate builds the default image locally from Debian packages, for
//! hosts without catalog access ([`build_debian`]): `mmdebstrap` makes the
//! tree, [`customize`] prepares it for banger (agent, sshd hardening, per-VM
//! identity), the kernel and initrd are copied out as the image's kernel, and
//! `mkfs.ext4 -d` writes the root file system. Everything happens in a
//! staging directory that is renamed into place only at the end, so a failed
//! or cancelled build leaves nothing behind, and a finished one is marked by
//! its `manifest.json` ([`debian_image_exists`]).

mod build;
pub mod customize;
pub mod derive;
mod fsutil;
pub mod initramfs;
mod manifest;
pub mod mise;
mod staging;
pub mod vmlinux;

/// The tool finder and runner are banger-ext4's; the image build runs
/// mmdebstrap and friends with them too.
pub use build::{
    BASE_PACKAGES, BuiltImage, DOCKER_DAEMON_JSON, DebianBuild, Progress, build_debian,
    debian_image_exists, kernel_name,
};
pub use customize::GuestPayload;
pub use fsutil::{TreeUsage, tree_usage};
pub use manifest::Manifest;
pub use staging::{LOCK_FILE, Staging, mounts_under, remove_tree};

use std::path::PathBuf;

/// Errors building or reading images. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "building the Debian image needs root: mmdebstrap mounts /proc and /sys in its chroot and \
         creates root-owned files; run the build through the root daemon or with sudo"
    )]
    NeedsRoot,
    #[error(
        "image name {0:?} is not valid: use 1 to 63 characters a-z, 0-9 and -, not starting with -"
    )]
    BadName(String),
    #[error("suite {0:?} is not valid: give a Debian suite name such as bookworm")]
    BadSuite(String),
    #[error(
        "package {0:?} is not valid: give plain Debian package names (no spaces or commas, not starting with -)"
    )]
    BadPackage(String),
    #[error("mirror {0:?} is not valid: give a URL such as http://deb.debian.org/debian")]
    BadMirror(String),
    #[error("agent binary {0} does not exist: build banger-agent first")]
    AgentMissing(PathBuf),
    #[error("agent unit: {0}")]
    BadUnit(String),
    #[error("{tool} failed ({status}): {last_line}")]
    ToolFailed {
        tool: &'static str,
        status: String,
        last_line: String,
        /// The last lines the tool printed, oldest first.
        tail: Vec<String>,
    },
    #[error("image build cancelled")]
    Cancelled,
    #[error("no kernel in {0}: is linux-image-cloud-amd64 among the packages?")]
    NoKernel(PathBuf),
    #[error("no initrd at {0}: is initramfs-tools among the packages?")]
    NoInitrd(PathBuf),
    #[error(
        "several kernels in /boot ({0}): drop the extra kernel package from the extra packages"
    )]
    SeveralKernels(String),
    #[error(
        "{0} does not include sshd_config.d/*.conf, so banger's sshd settings would be ignored: \
         use Debian bookworm or newer"
    )]
    SshdNoInclude(PathBuf),
    #[error(
        "cannot remove {dir}: {count} file systems are still mounted under it; unmount them (umount -R) and remove it"
    )]
    MountsLeft { dir: PathBuf, count: usize },
    #[error("downloading {url}: {reason}")]
    Download { url: String, reason: String },
    #[error(transparent)]
    Ext4(banger_ext4::Ext4Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<banger_ext4::Ext4Error> for ImageError {
    fn from(e: banger_ext4::Ext4Error) -> Self {
        match e {
            banger_ext4::Ext4Error::Cancelled { .. } => ImageError::Cancelled,
            e => ImageError::Ext4(e),
        }
    }
}

impl From<banger_ext4::RunError> for ImageError {
    fn from(e: banger_ext4::RunError) -> Self {
        use banger_ext4::RunError;
        match e {
            RunError::Failed {
                tool,
                status,
                last_line,
                tail,
                ..
            } => ImageError::ToolFailed {
                tool,
                status,
                last_line,
                tail,
            },
            RunError::Cancelled { .. } => ImageError::Cancelled,
            RunError::Io { context, source } => ImageError::Io { context, source },
        }
    }
}

impl ImageError {
    /// Wraps an I/O error with what was being done (naming the path).
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}
