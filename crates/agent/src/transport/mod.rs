//! Finding the agent's channel to the host.
//!
//! Under QEMU the host end is a virtio-serial port named
//! [`VIRTIO_PORT_NAME`] ([`virtio`]); under Firecracker there is no
//! virtio-serial device and the agent connects to the host over vsock
//! ([`vsock`]). Both carry the same framed protocol.

pub mod virtio;
pub mod vsock;

use banger_agent_proto::VIRTIO_PORT_NAME;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel lists virtio-serial ports, one directory per port.
const VIRTIO_PORTS_CLASS: &str = "/sys/class/virtio-ports";
/// Where the kernel lists virtio devices, bound to a driver or not.
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";
/// Virtio device ids (virtio spec, "Device Types").
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_VSOCK: u32 = 19;

/// How often discovery looks again while devices are still appearing.
const RESCAN: Duration = Duration::from_millis(50);

/// Errors finding the channel.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "no channel to the host after {waited:?}: no virtio-serial port named {VIRTIO_PORT_NAME} in {VIRTIO_PORTS_CLASS} and no vsock device"
    )]
    NotFound { waited: Duration },
}

/// The channel the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A virtio-serial port's device node, e.g. `/dev/vport1p1`.
    VirtioSerial(PathBuf),
    /// vsock to the host (CID 2) on [`VSOCK_PORT`](banger_agent_proto::VSOCK_PORT).
    Vsock,
}

/// Finds the channel, waiting up to `wait` for devices to show up.
///
/// The port named [`VIRTIO_PORT_NAME`] wins. If it is missing, the
/// `virtio_console` module is loaded once (the agent usually starts before
/// udev would load it). A guest with no virtio console device but a vsock
/// device (or `/dev/vsock`) uses vsock, after loading its virtio transport.
pub async fn discover(wait: Duration) -> Result<Transport, TransportError> {
    let start = Instant::now();
    let mut console_loaded = false;
    loop {
        if let Some(dev) = find_port(
            Path::new(VIRTIO_PORTS_CLASS),
            Path::new("/dev"),
            VIRTIO_PORT_NAME,
        ) {
            return Ok(Transport::VirtioSerial(dev));
        }
        if !console_loaded {
            console_loaded = true;
            modprobe("virtio_console").await;
            continue;
        }
        let ids = virtio_device_ids(Path::new(VIRTIO_DEVICES));
        let vsock = ids.contains(&VIRTIO_ID_VSOCK) || Path::new("/dev/vsock").exists();
        let timed_out = start.elapsed() >= wait;
        if vsock && (!ids.contains(&VIRTIO_ID_CONSOLE) || timed_out) {
            modprobe("vmw_vsock_virtio_transport").await;
            return Ok(Transport::Vsock);
        }
        if timed_out {
            return Err(TransportError::NotFound {
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(RESCAN).await;
    }
}

/// The device node of the virtio-serial port called `name`: the port
/// directory `<class>/vportNpM` whose `name` file holds it maps to
/// `<dev>/vportNpM`.
fn find_port(class: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class).ok()?;
    entries.flatten().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev.join(e.file_name()))
    })
}

/// Device ids of all virtio devices (`0x0003` in each `device` file).
pub fn virtio_device_ids(devices: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("device")).ok())
        .filter_map(|id| u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Loads a kernel module; failure is logged, not fatal: the module may be
/// built in, or absent on a guest that does not need it.
async fn modprobe(module: &str) {
    match tokio::process::Command::new("modprobe")
        .arg(module)
        .status()
        .await
    {
        Ok(st) if st.success() => tracing::debug!(module, "module loaded"),
        Ok(st) => tracing::info!(module, %st, "modprobe failed"),
        Err(e) => tracing::info!(module, error = %e, "cannot run modprobe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn finds_the_port_by_name() {
        let sys = tempfile::tempdir().expect("tempdir");
        let class = sys.path().join("class");
        write(&class.join("vport0p0/name"), "org.qemu.guest_agent.0\n");
        write(&class.join("vport1p3/name"), "org.banger.agent\n");
        write(&class.join("vport1p4/other"), "");
        let dev = Path::new("/dev");
        assert_eq!(
            find_port(&class, dev, VIRTIO_PORT_NAME),
            Some(PathBuf::from("/dev/vport1p3"))
        );
        assert_eq!(find_port(&class, dev, "org.banger.agentX"), None);
        assert_eq!(
            find_port(&sys.path().join("missing"), dev, VIRTIO_PORT_NAME),
            None
        );
    }

    #[test]
    fn reads_virtio_device_ids() {
        let sys = tempfile::tempdir().expect("tempdir");
        write(&sys.path().join("virtio0/device"), "0x0002\n");
        write(&sys.path().join("virtio1/device"), "0x0003\n");
        write(&sys.path().join("virtio2/device"), "0x0013\n");
        write(&sys.path().join("virtio3/device"), "junk\n");
        let mut ids = virtio_device_ids(sys.path());
        ids.sort_unstable();
        assert_eq!(ids, [2, VIRTIO_ID_CONSOLE, VIRTIO_ID_VSOCK]);
        assert!(virtio_device_ids(&sys.path().join("missing")).is_empty());
    }
}
