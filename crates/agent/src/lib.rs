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
mod ring;
mod serve;
mod sessions;
pub mod singleton;
pub mod transport;

pub use identity::{IdentitySys, SealGate, SystemIdentity};
pub use power::{Power, PowerError, SystemPower};
pub use serve::{Agent, BadFrame, HostFrames};

/// Where the image builder installs the agent binary.
pub const BINARY_PATH: &str = "/usr/local/bin/banger-agent";

/// Name of the systemd unit that starts the agent.
pub const UNIT_NAME: &str = "banger-agent.service";

/// Where the image builder installs [`SYSTEMD_UNIT`].
pub const UNIT_PATH: &str = "/etc/systemd/system/banger-agent.service";

/// The symlink that enables the unit (what `systemctl enable` would make).
pub const UNIT_WANTS_LINK: &str = "/etc/systemd/system/sysinit.target.wants/banger-agent.service";

/// Target of [`UNIT_WANTS_LINK`], relative to the link's directory.
pub const UNIT_WANTS_LINK_TARGET: &str = "../banger-agent.service";

/// The systemd unit that starts the agent.
///
/// It runs as early as systemd can start anything: no default dependencies,
/// ordered before `sysinit.target`, so the host's readiness signal does not
/// wait for udev, mounts, networking or sshd. The root file system is already
/// mounted read-write by then (`root=... rw`), which is all the agent needs:
/// it loads its own kernel modules and opens its device node in devtmpfs.
/// It never gives up restarting, and is stopped like everything else at
/// shutdown.
pub const SYSTEMD_UNIT: &str = "\
[Unit]
Description=banger guest agent
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=shutdown.target
StartLimitIntervalSec=0

[Service]
Type=exec
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1
StandardOutput=journal+console
StandardError=inherit
OOMScoreAdjust=-900

[Install]
WantedBy=sysinit.target
";

/// Where the image builder installs [`MODULES_LOAD`].
pub const MODULES_LOAD_PATH: &str = "/etc/modules-load.d/banger.conf";

/// `modules-load.d` list of the kernel modules behind the agent's channels.
/// The agent also loads them itself, as it usually starts before
/// `systemd-modules-load`.
pub const MODULES_LOAD: &str = "\
# Channels of the banger guest agent: virtio-serial (QEMU) and vsock (Firecracker).
virtio_console
vsock
vmw_vsock_virtio_transport
";

/// Largest stdout/stderr chunk the agent puts in one frame.
///
/// Smaller than [`MAX_CHUNK`](banger_agent_proto::MAX_CHUNK) so that every
/// frame the agent sends fits in one virtio-serial write (the guest driver
/// takes at most 32 KiB per `write`): a frame then goes whole to one host
/// connection and never straddles a host reconnect.
pub const OUTPUT_CHUNK: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_starts_the_installed_binary() {
        assert!(SYSTEMD_UNIT.contains(&format!("ExecStart={BINARY_PATH}\n")));
        assert!(UNIT_PATH.ends_with(UNIT_NAME));
        assert!(UNIT_WANTS_LINK.ends_with(&format!("sysinit.target.wants/{UNIT_NAME}")));
        assert!(UNIT_WANTS_LINK_TARGET.ends_with(UNIT_NAME));
        assert!(SYSTEMD_UNIT.contains("WantedBy=sysinit.target\n"));
    }

    #[test]
    fn modules_list_names_both_transports() {
        let modules: Vec<&str> = MODULES_LOAD
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(
            modules,
            ["virtio_console", "vsock", "vmw_vsock_virtio_transport"]
        );
    }
}
