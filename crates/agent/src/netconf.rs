//! Guest network set-up: in early init from the kernel command line, and
//! at a warm start's restore from the host's [`GuestNetConfig`].
//!
//! At boot the host passes the guest's static address in the kernel's `ip=`
//! syntax and its resolvers as `banger.dns=` (see
//! [`banger_agent_proto::boot::NetArgs`]). The kernel cannot apply `ip=`
//! itself (the NIC driver is a module), so this does, with the classic
//! interface ioctls: no tool from the image is needed. Problems are
//! reported, never fatal: a guest without network still boots and its
//! agent still answers. A restore ([`apply_net`]) also sets the MAC (a
//! clone must not keep its template's) and fails on any problem.

use banger_agent_proto::GuestNetConfig;
use banger_agent_proto::boot::NetArgs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the NIC to appear (its driver loads from the
/// initramfs, usually before we run).
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Applies the network part of `cmdline`; returns what went wrong, if
/// anything, for the console.
pub fn apply(cmdline: &str, etc: &Path) -> Vec<String> {
    let args = NetArgs::parse(cmdline);
    let mut problems = Vec::new();
    // systemd sets it only when it starts; the host's commands may run first.
    if let Some(name) = hostname(cmdline)
        && let Err(e) = nix::unistd::sethostname(name)
    {
        problems.push(format!("setting the host name {name}: {e}"));
    }
    if let Some(ip) = &args.ip
        && let Err(e) = configure(&Interface {
            device: &ip.device,
            mac: None,
            addr: ip.addr,
            netmask: ip.netmask,
            gateway: ip.gateway,
        })
    {
        problems.push(format!("configuring {}: {e}", ip.device));
    }
    if let Some(text) = args.resolv_conf() {
        let path = etc.join("resolv.conf");
        // Often a symlink into /run (resolved): replace it with a file.
        let _ = std::fs::remove_file(&path);
        if let Err(e) = std::fs::write(&path, text) {
            problems.push(format!("writing {}: {e}", path.display()));
        }
    }
    problems
}

/// The guest's host name, `systemd.hostname=` on the kernel command line
/// (the last one wins, as for systemd).
fn hostname(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("systemd.hostname="))
        .rfind(|n| !n.is_empty() && n.len() <= 64)
}

/// `nameserver` lines for `dns`, `None` when it is empty.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> Option<String> {
    if dns.is_empty() {
        return None;
    }
    Some(dns.iter().map(|d| format!("nameserver {d}\n")).collect())
}

/// Configures the NIC of a restored clone: its MAC (the link is taken down
/// for that: a virtio NIC without live MAC changes refuses it while up,
/// and going down also flushes its neighbour and route entries), address,
/// link up, default route. `/etc/resolv.conf` is the caller's.
pub fn apply_net(net: &GuestNetConfig) -> std::io::Result<()> {
    configure(&Interface {
        device: &net.device,
        mac: Some(net.mac),
        addr: net.addr,
        netmask: net.netmask(),
        gateway: net.gateway,
    })
}

/// What [`configure`] applies to one interface.
struct Interface<'a> {
    device: &'a str,
    mac: Option<[u8; 6]>,
    addr: Ipv4Addr,
    netmask: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
}

fn configure(ip: &Interface<'_>) -> std::io::Result<()> {
    wait_for_device(ip.device)?;
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    set_up(fd, "lo")?;
    if let Some(mac) = ip.mac {
        set_down(fd, ip.device)?;
        let mut req = ifreq(ip.device)?;
        req.ifr_ifru.ifru_hwaddr = hwaddr(&mac);
        ioctl(fd, libc::SIOCSIFHWADDR as _, &mut req, "SIOCSIFHWADDR")?;
    }
    let mut req = ifreq(ip.device)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip.addr);
    ioctl(fd, libc::SIOCSIFADDR as _, &mut req, "SIOCSIFADDR")?;
    req.ifr_ifru.ifru_netmask = sockaddr(ip.netmask);
    ioctl(fd, libc::SIOCSIFNETMASK as _, &mut req, "SIOCSIFNETMASK")?;
    set_up(fd, ip.device)?;
    if let Some(gw) = ip.gateway {
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: `rt` lives across the call and matches SIOCADDRT's argument.
        let r = unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &mut rt) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("default route via {gw}: {e}"),
                ));
            }
        }
    }
    Ok(())
}

fn wait_for_device(dev: &str) -> std::io::Result<()> {
    let sys = Path::new("/sys/class/net").join(dev);
    let start = Instant::now();
    let mut probed = false;
    while !sys.exists() {
        if start.elapsed() > Duration::from_secs(1) && !probed {
            probed = true;
            let _ = std::process::Command::new("modprobe")
                .arg("virtio_net")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .status();
        }
        if start.elapsed() > DEVICE_WAIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no network device {dev} after {}s", DEVICE_WAIT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn set_up(fd: i32, dev: &str) -> std::io::Result<()> {
    let mut req = ifreq(dev)?;
    ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req, "SIOCSIFFLAGS")
}

fn set_down(fd: i32, dev: &str) -> std::io::Result<()> {
    let mut req = ifreq(dev)?;
    ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short) };
    ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req, "SIOCSIFFLAGS")
}

/// The `sockaddr` of `SIOCSIFHWADDR`: an Ethernet family and the MAC.
pub fn hwaddr(mac: &[u8; 6]) -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in sa.sa_data.iter_mut().zip(mac) {
        *d = *s as libc::c_char;
    }
    sa
}

fn ifreq(dev: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= req.ifr_name.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name {dev:?} is too long"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the family to interpret it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: i32, request: libc::Ioctl, arg: &mut T, what: &str) -> std::io::Result<()> {
    // SAFETY: `arg` is the structure `request` expects and outlives the call.
    let r = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwaddr_is_ethernet_family_then_the_mac() {
        let sa = hwaddr(&[0x02, 0xba, 0x0a, 0x00, 0xff, 0x07]);
        assert_eq!(sa.sa_family, libc::ARPHRD_ETHER);
        let bytes: Vec<u8> = sa.sa_data[..6].iter().map(|b| *b as u8).collect();
        assert_eq!(bytes, [0x02, 0xba, 0x0a, 0x00, 0xff, 0x07]);
        assert!(sa.sa_data[6..].iter().all(|b| *b == 0));
    }

    #[test]
    fn resolv_conf_lines() {
        assert_eq!(resolv_conf(&[]), None);
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(1, 1, 1, 1)]).as_deref(),
            Some("nameserver 10.0.0.1\nnameserver 1.1.1.1\n")
        );
    }

    #[test]
    fn the_host_name_comes_from_systemd_hostname() {
        assert_eq!(
            hostname("console=ttyS0 systemd.hostname=calm-otter quiet"),
            Some("calm-otter")
        );
        assert_eq!(hostname("systemd.hostname=a systemd.hostname=b"), Some("b"));
        assert_eq!(hostname("systemd.hostname= ro"), None);
        assert_eq!(hostname("hostname=x"), None);
    }
}
