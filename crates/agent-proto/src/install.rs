//! How the agent is installed in an image: its path, its systemd unit and
//! the modules its channels need. Shared by the agent and by everything on
//! the host that builds images (the Debian build, OCI pulls, derived
//! images), which need these values but not the agent itself.

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
