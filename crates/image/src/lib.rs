//! Images banger boots.
//!
//! This crate builds the default image locally from Debian packages, for
//! hosts without catalog access: `mmdebstrap` makes the tree, [`customize`]
//! prepares it for banger (agent, sshd hardening, per-VM identity), the
//! kernel and initrd are taken out as the image's kernel, and `mkfs.ext4 -d`
//! writes the root file system. Everything happens in a staging directory
//! that is renamed into place only at the end, so a failed or interrupted
//! build leaves nothing behind.

mod build;
pub mod customize;
mod manifest;
mod process;

pub use build::{BuiltImage, DebianBuild, Progress, build_debian, find_built, mounts_under as mounts_under_dir};
pub use customize::{AGENT_INSTALL_PATH, AGENT_MODULES_CONF, AGENT_UNIT};
pub use manifest::Manifest;

use std::path::PathBuf;

/// Errors building or reading images. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: apt-get install {package}")]
    ToolMissing { tool: &'static str, package: &'static str },
    #[error(
        "building the Debian image needs root (mmdebstrap runs in root mode): run bangerd as root, \
         or build the image once as root and register it"
    )]
    NeedsRoot,
    #[error("{tool} failed ({status}); last output:\n{tail}")]
    ToolFailed { tool: &'static str, status: String, tail: String },
    #[error("image build cancelled")]
    Cancelled,
    #[error("the Debian tree has no kernel in /boot (is linux-image-cloud-amd64 installed?)")]
    NoKernel,
    #[error("banger-agent binary {0} does not exist: build it (scripts/build.sh) or set agent_path")]
    AgentMissing(PathBuf),
    #[error("image name {0:?} is not valid: use a-z, 0-9 and -")]
    BadName(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}
