//! The root helper's side of a system install that unprivileged code links:
//! its typed, versioned protocol ([`proto`]) and the client ([`client`])
//! the owner daemon (host networking, chown, image builds) and the CLI
//! (`system status`) use. The helper itself (policy and server) is
//! `banger-root-helper`, linked only into `bangerd`.

pub mod client;
pub mod proto;

pub use client::{HelperClient, HelperError, HelperInfo};
