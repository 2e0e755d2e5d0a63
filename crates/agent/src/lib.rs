//! banger's guest agent.
//!
//! The agent runs inside every guest, started by systemd before the rest of
//! the boot ([`SYSTEMD_UNIT`]). It finds its channel to the host
//! ([`transport`]: a virtio-serial port under QEMU, vsock under Firecracker),
//! greets the host with [`Body::Hello`](banger_agent_proto::Body::Hello) and
//! then serves the frames of `banger-agent-proto` ([`Agent::serve`]): it runs
//! commands and streams their output, and powers the guest off on request.
//! For warm starts it seals a template guest and gives each restored clone
//! its own identity ([`identity`]).
//!
//! The binary only wires these together; everything here works on any byte
//! stream, so the tests drive it over an in-memory pipe.

mod archive;
pub mod boot_tmp;
pub mod bootinfo;
mod exec;
pub mod identity;
pub mod init;
mod listeners;
pub mod netconf;
pub mod power;
pub mod prepared;
mod ring;
mod serve;
mod sessions;
pub mod singleton;
pub mod transport;

pub use identity::{IdentitySys, SealGate, SystemIdentity};
pub use power::{Power, PowerError, SystemPower};
pub use prepared::Prepared;
pub use serve::{Agent, BadFrame, HostFrames};

pub use banger_agent_proto::install::{
    BINARY_PATH, MODULES_LOAD, MODULES_LOAD_PATH, SYSTEMD_UNIT, UNIT_NAME, UNIT_PATH,
    UNIT_WANTS_LINK, UNIT_WANTS_LINK_TARGET,
};

/// Largest stdout/stderr chunk the agent puts in one frame.
///
/// Smaller than [`MAX_CHUNK`](banger_agent_proto::MAX_CHUNK) so that every
/// frame the agent sends fits in one virtio-serial write (the guest driver
/// takes at most 32 KiB per `write`): a frame then goes whole to one host
/// connection and never straddles a host reconnect.
pub const OUTPUT_CHUNK: usize = 16 * 1024;
