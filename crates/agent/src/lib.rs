//! banger's guest agent.
//!
//! Runs inside every guest. It opens one byte stream to the host (a
//! virtio-serial port under QEMU, vsock under Firecracker), greets the host
//! at once (the readiness signal), then serves exec and shutdown requests
//! multiplexed over that stream (protocol: `banger-agent-proto`).

mod exec;
pub mod serve;
pub mod transport;

pub use serve::serve;

/// Where image builders install the agent.
pub const INSTALL_PATH: &str = "/usr/local/bin/banger-agent";

/// The systemd unit image builders install as `banger-agent.service`.
///
/// It starts with the earliest units (no default dependencies, pulled in by
/// sysinit.target) so the host learns the guest is up seconds before the
/// rest of the boot finishes; the agent loads the virtio console module
/// itself instead of waiting for udev.
pub const SYSTEMD_UNIT: &str = "\
[Unit]
Description=banger guest agent
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
";

/// `/etc/modules-load.d/banger.conf`: the transports' modules, which the
/// Debian cloud kernel builds as modules and its initramfs does not load.
pub const MODULES_LOAD_CONF: &str = "virtio_console\nvsock\nvmw_vsock_virtio_transport\n";
