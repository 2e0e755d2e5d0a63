//! What the daemon's clients share (the `banger` CLI and `banger bench`):
//! finding and starting the daemon ([`connect`]), copying files into and
//! out of a VM ([`files`]), a repository's workspace in a VM
//! ([`workspace`]) and the `ssh` command that reaches a VM ([`ssh`]).
//! Rendering (progress bars, tables) stays with each client.

pub mod connect;
pub mod files;
pub mod ssh;
pub mod workspace;
