//! Finding and holding the host channel.
//!
//! Under QEMU the host end is a virtio-serial port named
//! [`VIRTIO_PORT_NAME`]. Its semantics shape this code: while no host
//! process has the socket open, reads return 0 and writes block; when the
//! host (re)connects, data flows again. Each host connection is one
//! protocol session (a fresh decoder and a fresh greeting), so a daemon that
//! died mid-frame cannot desynchronise the next one.
//! Under Firecracker there is no virtio-serial; the agent connects to the
//! host over vsock instead and reconnects when that connection drops.

use crate::serve::{ShutdownFn, serve};
use banger_agent_proto::{VIRTIO_PORT_NAME, VSOCK_PORT};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Host CID in vsock addressing.
const VSOCK_HOST_CID: u32 = 2;

/// Finds the transport and serves sessions forever.
pub async fn run() -> std::io::Result<()> {
    let shutdown: ShutdownFn = Arc::new(power_off);
    if let Some(port) = find_virtio_port(Duration::from_secs(30)) {
        eprintln!("banger-agent: using {}", port.display());
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&port)?;
        return serve_port(f, shutdown).await;
    }
    if Path::new("/dev/vsock").exists() {
        eprintln!("banger-agent: no virtio port; using vsock to the host");
        return serve_vsock(shutdown).await;
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no host channel: neither a virtio-serial port named {VIRTIO_PORT_NAME} nor /dev/vsock"),
    ))
}

/// The `/dev/vportNpM` whose name is ours, loading virtio_console if needed.
fn find_virtio_port(timeout: Duration) -> Option<PathBuf> {
    if let Some(p) = scan_ports(Path::new("/sys/class/virtio-ports")) {
        return Some(p);
    }
    // The cloud kernel builds virtio_console as a module; udev may not have
    // loaded it yet this early in boot.
    let _ = std::process::Command::new("modprobe").arg("virtio_console").status();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(p) = scan_ports(Path::new("/sys/class/virtio-ports")) {
            return Some(p);
        }
        // No virtio-serial device at all (Firecracker): stop early.
        if !virtio_console_devices_present() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Whether the guest has any virtio console device (driver bound or not).
fn virtio_console_devices_present() -> bool {
    // virtio device id 3 is the console.
    std::fs::read_dir("/sys/bus/virtio/devices")
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == "0x0003")
            })
        })
        .unwrap_or(false)
}

/// Looks through `/sys/class/virtio-ports/*/name` for our port.
pub fn scan_ports(class_dir: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(class_dir).ok()?;
    for e in rd.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == VIRTIO_PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Events from the port reader thread.
enum PortEvent {
    Data(Vec<u8>),
    /// The host closed its end.
    HostGone,
}

async fn serve_port(port: File, shutdown: ShutdownFn) -> std::io::Result<()> {
    let mut reader = port.try_clone()?;
    let mut writer = port;
    let (ev_tx, mut ev_rx) = mpsc::channel::<PortEvent>(64);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut connected = false;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    // Host not connected: reads return at once; wait a little.
                    if connected {
                        connected = false;
                        if ev_tx.blocking_send(PortEvent::HostGone).is_err() {
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(n) => {
                    connected = true;
                    if ev_tx.blocking_send(PortEvent::Data(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("banger-agent: reading the port: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        // Blocks while the host is away; resumes when it reconnects.
        for chunk in out_rx {
            if let Err(e) = writer.write_all(&chunk) {
                eprintln!("banger-agent: writing the port: {e}");
            }
        }
    });

    loop {
        // One session per host connection.
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let session = tokio::spawn(serve(ours, shutdown.clone()));
        let (mut from_session, mut to_session) = tokio::io::split(theirs);
        let out = out_tx.clone();
        let forward_out = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from_session.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        loop {
            match ev_rx.recv().await {
                Some(PortEvent::Data(d)) => {
                    if to_session.write_all(&d).await.is_err() {
                        break;
                    }
                }
                Some(PortEvent::HostGone) => {
                    eprintln!("banger-agent: host disconnected; waiting for it to come back");
                    break;
                }
                None => return Ok(()),
            }
        }
        drop(to_session);
        let _ = session.await;
        forward_out.abort();
    }
}

async fn serve_vsock(shutdown: ShutdownFn) -> std::io::Result<()> {
    let mut backoff = Duration::from_millis(10);
    loop {
        match connect_vsock(VSOCK_HOST_CID, VSOCK_PORT) {
            Ok(fd) => {
                backoff = Duration::from_millis(10);
                let std_stream = std::os::unix::net::UnixStream::from(fd);
                std_stream.set_nonblocking(true)?;
                // A connected stream socket: tokio only reads and writes it.
                let stream = tokio::net::UnixStream::from_std(std_stream)?;
                serve(stream, shutdown.clone()).await?;
                eprintln!("banger-agent: host connection closed; reconnecting");
            }
            Err(e) => {
                if backoff >= Duration::from_secs(1) {
                    eprintln!("banger-agent: vsock connect: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn connect_vsock(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(fd)
}

/// Powers the guest off (or reboots it): through systemd when it is PID 1,
/// directly when the agent itself is init.
fn power_off(reboot: bool) {
    nix::unistd::sync();
    if std::process::id() == 1 {
        let how = if reboot { nix::sys::reboot::RebootMode::RB_AUTOBOOT } else { nix::sys::reboot::RebootMode::RB_POWER_OFF };
        let _ = nix::sys::reboot::reboot(how);
        return;
    }
    let verb = if reboot { "reboot" } else { "poweroff" };
    if let Err(e) = std::process::Command::new("systemctl").arg(verb).spawn() {
        eprintln!("banger-agent: systemctl {verb}: {e}");
    }
}

