//! The host's e2fsprogs, in one place.
//!
//! banger makes and edits ext4 images without mounting them: `mkfs.ext4`
//! writes a tree or an empty file system into a plain file, `debugfs`
//! edits inodes (owners, modes, device nodes, files) and reads files back,
//! `e2fsck` checks, `resize2fs` grows. This crate finds those tools
//! ([`find_tool`], [`tool`]), runs them with argument vectors
//! ([`run_tool`]) and with banger's standard options ([`mkfs_tree`],
//! [`mkfs_empty`], [`check`], [`grow`], [`debugfs`]), and reports their
//! failures as [`Ext4Error`]. Per-VM disks (banger-storage), the Debian
//! build (banger-image) and OCI flattening (banger-oci) keep only what
//! they put into the images.

pub mod debugfs;
mod fsck;
mod mkfs;
mod process;
mod tools;

pub use fsck::{check, grow};
pub use mkfs::{
    ROOTFS_HEADROOM, inode_count, mkfs_args, mkfs_empty, mkfs_tree, rootfs_size, set_root_mode,
};
pub use process::{RunError, run_tool};
pub use tokio_util::sync::CancellationToken;
pub use tools::{find_tool, tool};

use std::path::{Path, PathBuf};

/// Errors finding or running e2fsprogs on an image. Messages are one line
/// and name the tool and the image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("{tool} not found: install e2fsprogs (apt-get install e2fsprogs)")]
    ToolMissing { tool: &'static str },
    #[error("{tool} failed on {image} ({status}): {message}")]
    Failed {
        tool: &'static str,
        image: PathBuf,
        /// How it ended, e.g. `exit status: 1`.
        status: String,
        /// The exit code, `None` when a signal ended it.
        code: Option<i32>,
        /// The tool's own message: its last non-empty output line.
        message: String,
        /// The last lines the tool printed, oldest first.
        tail: Vec<String>,
    },
    #[error(
        "no space left on the file system holding {image} ({tool} failed): free some space and retry"
    )]
    NoSpace { tool: &'static str, image: PathBuf },
    #[error("debugfs could not apply {count} changes to {image}: {first}")]
    Debugfs {
        image: PathBuf,
        count: usize,
        first: String,
    },
    #[error("{tool} cancelled")]
    Cancelled { tool: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Ext4Error {
    /// `e`, a failure of a tool run on `image`, with the image named.
    pub fn on_image(e: RunError, image: &Path) -> Self {
        match e {
            RunError::Failed { tool, tail, .. }
                if tail.iter().any(|l| l.contains("No space left on device")) =>
            {
                Ext4Error::NoSpace {
                    tool,
                    image: image.to_path_buf(),
                }
            }
            RunError::Failed {
                tool,
                status,
                code,
                last_line,
                tail,
            } => Ext4Error::Failed {
                tool,
                image: image.to_path_buf(),
                status,
                code,
                message: last_line,
                tail,
            },
            RunError::Cancelled { tool } => Ext4Error::Cancelled { tool },
            RunError::Io { context, source } => Ext4Error::Io { context, source },
        }
    }
}

/// Runs the e2fsprogs tool `name` with `args` (which name `image`), passing
/// its output lines to `on_line`.
async fn run_on(
    name: &'static str,
    image: &Path,
    args: Vec<std::ffi::OsString>,
    on_line: &(dyn Fn(String) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), Ext4Error> {
    let bin = tool(name)?;
    run_tool(name, &bin, args, &[], on_line, cancel)
        .await
        .map_err(|e| Ext4Error::on_image(e, image))
}
