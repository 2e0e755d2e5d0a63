//! File transfer between the host and a guest: what goes into a tar stream
//! and how one is unpacked safely.
//!
//! - [`plan`]: the list of entries to send, from a file or directory
//!   ([`plan::plan_path`]) or from a git workspace ([`workspace`]).
//! - [`pack`]: writes a [`plan::Plan`] as a tar stream.
//! - [`unpack`]: extracts a tar stream from an untrusted peer into a
//!   directory, refusing anything that could land outside it.
//!
//! Everything here is synchronous and streams: nothing holds a whole
//! archive in memory.

pub mod pack;
pub mod plan;
pub mod unpack;
pub mod workspace;

pub use pack::{PackError, write_tar};
pub use plan::{Entry, Plan, PlanError, Source, plan_path};
pub use unpack::{UnpackError, Unpacked, unpack, unpack_only};
