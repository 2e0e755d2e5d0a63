//! SSH for banger.
//!
//! - The user's key: an ed25519 key pair banger logs in with, the configured
//!   `ssh_key_path` or one it generates under its state directory (0600).
//! - Host keys: each VM's ed25519 host key is generated on the host and put
//!   into the VM's disk before its first boot, so banger's `known_hosts`
//!   names the exact key from the first connection: no trust on first use.
//! - `known_hosts` and an `ssh_config` file with one `Host` entry per VM,
//!   plus the marker-fenced `Include` block `ssh-config --install` puts in
//!   `~/.ssh/config`.

mod config_block;
mod keys;

pub use config_block::{
    BEGIN_MARKER, END_MARKER, HostEntry, include_block, install_include, render_config,
    uninstall_include,
};
pub use keys::{HostKey, UserKey, known_hosts_line};

use std::path::PathBuf;

/// Errors handling keys and ssh files.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not an OpenSSH ed25519 key ({detail}); point ssh_key_path at one, or remove it to let banger make one"
    )]
    BadKey { path: PathBuf, detail: String },
    #[error("generating a key: {0}")]
    Generate(String),
    #[error(
        "{path} has an unterminated banger block (a `{BEGIN_MARKER}` line without `{END_MARKER}`): fix or remove it by hand"
    )]
    BrokenBlock { path: PathBuf },
}

impl SshError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SshError {
        let context = context.into();
        move |source| SshError::Io { context, source }
    }
}
