//! What the daemon puts into a guest and how it reaches one: synced files
//! and credentials, and ssh.

pub(crate) mod file_sync;
pub(crate) mod ssh;
