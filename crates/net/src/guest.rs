//! What a guest needs to know about its network: the kernel `ip=` argument
//! and its resolver.

use crate::alloc::{MacAddr, Subnet};
use std::net::Ipv4Addr;

/// A guest's network configuration, derived from its allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub prefix: u8,
    pub mac: MacAddr,
    /// Resolvers for `/etc/resolv.conf`; empty leaves the image's own.
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNet {
    /// Precondition: `ip` came from [`Subnet::allocate`].
    pub fn new(subnet: &Subnet, ip: Ipv4Addr, default_dns: Option<Ipv4Addr>) -> Self {
        Self {
            ip,
            gateway: subnet.bridge_ip(),
            netmask: subnet.netmask(),
            prefix: subnet.prefix(),
            mac: MacAddr::from_ip(ip),
            dns: default_dns.into_iter().collect(),
        }
    }

    /// The kernel's static IP configuration argument,
    /// `ip=<guest>::<gateway>:<netmask>::eth0:off`, with the first resolver
    /// appended as `dns0` when there is one.
    pub fn kernel_ip_arg(&self) -> String {
        let mut arg = format!(
            "ip={}::{}:{}::eth0:off",
            self.ip, self.gateway, self.netmask
        );
        if let Some(dns) = self.dns.first() {
            arg.push_str(&format!(":{dns}"));
        }
        arg
    }

    /// `nameserver` lines for the guest's `/etc/resolv.conf`, or `None` when
    /// no resolver is configured.
    pub fn resolv_conf(&self) -> Option<String> {
        if self.dns.is_empty() {
            return None;
        }
        Some(
            self.dns
                .iter()
                .map(|d| format!("nameserver {d}\n"))
                .collect(),
        )
    }
}

/// Where the host's real upstream resolvers are listed: systemd-resolved's
/// upstream file first (its stub file only names 127.0.0.53), then the
/// classic file.
const HOST_RESOLV_FILES: [&str; 2] = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"];

/// The host's IPv4 upstream resolvers that a guest can use: loopback
/// addresses (local stubs such as systemd-resolved or dnsmasq) are
/// unreachable from a guest and left out. Empty when none is found.
pub fn host_upstream_resolvers() -> Vec<Ipv4Addr> {
    HOST_RESOLV_FILES
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .map(|text| upstream_resolvers(&text))
        .find(|r| !r.is_empty())
        .unwrap_or_default()
}

/// The non-loopback IPv4 `nameserver`s of a resolv.conf text.
pub fn upstream_resolvers(text: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(conf) = resolv_conf::Config::parse(text) else {
        return Vec::new();
    };
    conf.nameservers
        .iter()
        .filter_map(|ns| match ns {
            resolv_conf::ScopedIp::V4(ip) if !ip.is_loopback() => Some(*ip),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_resolvers_skip_loopback_stubs_and_ipv6() {
        let text = b"# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver 192.168.1.1\noptions edns0\n";
        assert_eq!(
            upstream_resolvers(text),
            vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(192, 168, 1, 1)]
        );
        assert!(upstream_resolvers(b"nameserver 127.0.0.1\n").is_empty());
        assert!(upstream_resolvers(b"\xff\xfe garbage").is_empty());
    }

    fn subnet() -> Subnet {
        Subnet::new(
            "172.16.0.0/24".parse().expect("cidr"),
            Ipv4Addr::new(172, 16, 0, 1),
        )
        .expect("subnet")
    }

    #[test]
    fn kernel_argument() {
        let g = GuestNet::new(&subnet(), Ipv4Addr::new(172, 16, 0, 7), None);
        assert_eq!(
            g.kernel_ip_arg(),
            "ip=172.16.0.7::172.16.0.1:255.255.255.0::eth0:off"
        );
        assert_eq!(g.resolv_conf(), None);
        assert_eq!(g.mac.to_string(), "06:00:ac:10:00:07");
    }

    #[test]
    fn with_resolver() {
        let g = GuestNet::new(
            &subnet(),
            Ipv4Addr::new(172, 16, 0, 2),
            Some(Ipv4Addr::new(1, 1, 1, 1)),
        );
        assert_eq!(
            g.kernel_ip_arg(),
            "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off:1.1.1.1"
        );
        assert_eq!(g.resolv_conf().as_deref(), Some("nameserver 1.1.1.1\n"));
    }
}
