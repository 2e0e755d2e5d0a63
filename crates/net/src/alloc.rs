//! Guest address allocation inside the bridge network, and guest MACs.
//!
//! Pure logic: the caller says which addresses are taken (from its store),
//! this module picks the lowest free one. The network address, the broadcast
//! address and the bridge's own address are never handed out.

use banger_config::Ipv4Cidr;
use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

/// Why a network, a bridge address or an allocation is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("cidr {cidr} is not a network address (host bits set): use {network}/{prefix}")]
    NotNetworkAddress {
        cidr: Ipv4Net,
        network: Ipv4Addr,
        prefix: u8,
    },
    #[error(
        "cidr {cidr} is too small: a prefix of at most /{max} leaves room for the bridge and a guest"
    )]
    TooSmall { cidr: Ipv4Net, max: u8 },
    #[error(
        "bridge_ip {bridge_ip} is outside cidr {cidr}: pick an address inside it or change cidr"
    )]
    BridgeOutside { bridge_ip: Ipv4Addr, cidr: Ipv4Net },
    #[error(
        "bridge_ip {bridge_ip} is the network or broadcast address of {cidr}: pick a host address"
    )]
    BridgeNotHost { bridge_ip: Ipv4Addr, cidr: Ipv4Net },
    #[error(
        "no free guest address in {cidr}: {in_use} of {capacity} in use; delete VMs or set a larger cidr (e.g. /{suggested_prefix}) in config.toml"
    )]
    Exhausted {
        cidr: Ipv4Net,
        in_use: u64,
        capacity: u64,
        suggested_prefix: u8,
    },
}

/// Longest prefix that still holds network, bridge, one guest and broadcast.
pub const MAX_PREFIX: u8 = 30;

/// A validated bridge network: `cidr` is a network address with room for
/// guests and `bridge_ip` is one of its host addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    net: Ipv4Net,
    bridge_ip: Ipv4Addr,
}

impl Subnet {
    pub fn new(cidr: Ipv4Net, bridge_ip: Ipv4Addr) -> Result<Self, AllocError> {
        if cidr.addr() != cidr.network() {
            return Err(AllocError::NotNetworkAddress {
                cidr,
                network: cidr.network(),
                prefix: cidr.prefix_len(),
            });
        }
        if cidr.prefix_len() > MAX_PREFIX {
            return Err(AllocError::TooSmall {
                cidr,
                max: MAX_PREFIX,
            });
        }
        if !cidr.contains(&bridge_ip) {
            return Err(AllocError::BridgeOutside { bridge_ip, cidr });
        }
        if bridge_ip == cidr.network() || bridge_ip == cidr.broadcast() {
            return Err(AllocError::BridgeNotHost { bridge_ip, cidr });
        }
        Ok(Self {
            net: cidr,
            bridge_ip,
        })
    }

    /// From the config's `cidr` and effective bridge address.
    pub fn from_config(cidr: Ipv4Cidr, bridge_ip: Ipv4Addr) -> Result<Self, AllocError> {
        // Ipv4Cidr keeps its prefix at most /30, so this cannot fail; it is
        // mapped rather than unwrapped all the same.
        let net =
            Ipv4Net::new(cidr.network(), cidr.prefix()).map_err(|_| AllocError::TooSmall {
                cidr: Ipv4Net::default(),
                max: MAX_PREFIX,
            })?;
        Self::new(net, bridge_ip)
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.net
    }

    pub fn network(&self) -> Ipv4Addr {
        self.net.network()
    }

    pub fn prefix(&self) -> u8 {
        self.net.prefix_len()
    }

    pub fn netmask(&self) -> Ipv4Addr {
        self.net.netmask()
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        self.net.broadcast()
    }

    /// The bridge's address, the guests' gateway.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip
    }

    /// How many guest addresses the network holds (hosts minus the bridge).
    pub fn capacity(&self) -> u64 {
        (1u64 << (32 - self.prefix())) - 3
    }

    /// Whether `ip` may be given to a guest: a host address of the network
    /// other than the bridge's.
    pub fn is_guest_ip(&self, ip: Ipv4Addr) -> bool {
        self.net.contains(&ip)
            && ip != self.network()
            && ip != self.broadcast()
            && ip != self.bridge_ip
    }

    /// The lowest guest address not in `in_use`.
    pub fn allocate(
        &self,
        in_use: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Ipv4Addr, AllocError> {
        let taken: BTreeSet<u32> = in_use
            .into_iter()
            .filter(|ip| self.is_guest_ip(*ip))
            .map(u32::from)
            .collect();
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        let bridge = u32::from(self.bridge_ip);
        // Walk the sorted taken set once: the first gap is the answer.
        let mut candidate = first;
        let mut taken_iter = taken.iter().peekable();
        while candidate <= last {
            if candidate == bridge {
                candidate += 1;
                continue;
            }
            while taken_iter.next_if(|t| **t < candidate).is_some() {}
            if taken_iter.peek() == Some(&&candidate) {
                candidate += 1;
                continue;
            }
            return Ok(Ipv4Addr::from(candidate));
        }
        Err(AllocError::Exhausted {
            cidr: self.net,
            in_use: taken.len() as u64,
            capacity: self.capacity(),
            suggested_prefix: self.prefix().saturating_sub(1).max(8),
        })
    }
}

/// The lowest free guest address in `cidr`, never its network or broadcast
/// address nor `bridge_ip`.
pub fn allocate(
    cidr: Ipv4Net,
    bridge_ip: Ipv4Addr,
    in_use: impl IntoIterator<Item = Ipv4Addr>,
) -> Result<Ipv4Addr, AllocError> {
    Subnet::new(cidr, bridge_ip)?.allocate(in_use)
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `06:00:` followed by the four bytes of `ip` (the convention of
    /// Firecracker's examples): locally administered, unicast, and unique on
    /// the bridge because guest addresses are.
    pub fn from_ip(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        Self([0x06, 0x00, a, b, c, d])
    }

    /// A stable address derived from a VM id (FNV-1a), locally administered
    /// and unicast, for guests whose address is not known yet.
    pub fn from_id(id: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Self::local([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// A random address, locally administered and unicast.
    pub fn random() -> Self {
        Self::local(rand::random())
    }

    /// `bytes` with the multicast bit cleared and the locally administered
    /// bit set.
    fn local(mut bytes: [u8; 6]) -> Self {
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Self(bytes)
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test cidr")
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test ip")
    }

    #[test]
    fn lowest_free_skips_network_bridge_and_taken() {
        let c = net("172.16.0.0/24");
        let b = ip("172.16.0.1");
        assert_eq!(allocate(c, b, []), Ok(ip("172.16.0.2")));
        assert_eq!(
            allocate(c, b, [ip("172.16.0.2"), ip("172.16.0.3")]),
            Ok(ip("172.16.0.4"))
        );
        // A hole is reused.
        assert_eq!(
            allocate(c, b, [ip("172.16.0.2"), ip("172.16.0.4")]),
            Ok(ip("172.16.0.3"))
        );
        // Bridge in the middle of the range.
        assert_eq!(allocate(c, ip("172.16.0.2"), []), Ok(ip("172.16.0.1")));
        assert_eq!(
            allocate(c, ip("172.16.0.2"), [ip("172.16.0.1")]),
            Ok(ip("172.16.0.3"))
        );
        // Addresses outside the network do not count.
        assert_eq!(allocate(c, b, [ip("10.0.0.2")]), Ok(ip("172.16.0.2")));
    }

    #[test]
    fn last_address_and_exhaustion() {
        let c = net("10.0.0.0/30");
        let b = ip("10.0.0.1");
        assert_eq!(allocate(c, b, []), Ok(ip("10.0.0.2")));
        let e = allocate(c, b, [ip("10.0.0.2")]).expect_err("full");
        assert_eq!(
            e,
            AllocError::Exhausted {
                cidr: c,
                in_use: 1,
                capacity: 1,
                suggested_prefix: 29
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("1 of 1 in use"), "{msg}");
        assert!(msg.contains("larger cidr"), "{msg}");

        let c = net("172.16.0.0/24");
        let all: Vec<Ipv4Addr> = (2..=254).map(|n| Ipv4Addr::new(172, 16, 0, n)).collect();
        let e = allocate(c, ip("172.16.0.1"), all.clone()).expect_err("full");
        assert!(e.to_string().contains("253 of 253 in use"), "{e}");
        let mut some = all;
        some.retain(|a| *a != ip("172.16.0.254"));
        assert_eq!(allocate(c, ip("172.16.0.1"), some), Ok(ip("172.16.0.254")));
    }

    #[test]
    fn bad_networks_and_bridges() {
        let e = allocate(net("172.16.0.5/24"), ip("172.16.0.1"), []).expect_err("host bits");
        assert!(matches!(e, AllocError::NotNetworkAddress { .. }));
        assert!(e.to_string().contains("use 172.16.0.0/24"), "{e}");

        let e = allocate(net("172.16.0.0/31"), ip("172.16.0.1"), []).expect_err("small");
        assert!(matches!(e, AllocError::TooSmall { .. }));

        let e = allocate(net("172.16.0.0/24"), ip("10.0.0.1"), []).expect_err("outside");
        assert!(matches!(e, AllocError::BridgeOutside { .. }));
        assert!(
            e.to_string()
                .contains("10.0.0.1 is outside cidr 172.16.0.0/24")
        );

        for b in ["172.16.0.0", "172.16.0.255"] {
            let e = allocate(net("172.16.0.0/24"), ip(b), []).expect_err("not host");
            assert!(matches!(e, AllocError::BridgeNotHost { .. }), "{b}");
        }
    }

    #[test]
    fn subnet_from_config() {
        let s = Subnet::from_config(Ipv4Cidr::DEFAULT, ip("172.16.0.1")).expect("default");
        assert_eq!(s.netmask(), ip("255.255.255.0"));
        assert_eq!(s.capacity(), 253);
        assert!(s.is_guest_ip(ip("172.16.0.2")));
        assert!(!s.is_guest_ip(ip("172.16.0.1")));
        assert!(!s.is_guest_ip(ip("172.16.0.255")));
        assert!(!s.is_guest_ip(ip("172.16.1.2")));
    }

    #[test]
    fn macs() {
        let m = MacAddr::from_ip(ip("172.16.0.2"));
        assert_eq!(m.to_string(), "06:00:ac:10:00:02");
        assert!(m.is_locally_administered() && m.is_unicast());
        for id in ["", "a", "01J0000000000000000000000", "vm-123"] {
            let m = MacAddr::from_id(id);
            assert!(m.is_locally_administered() && m.is_unicast(), "{id}: {m}");
            assert_eq!(m, MacAddr::from_id(id));
        }
        assert_ne!(MacAddr::from_id("a"), MacAddr::from_id("b"));
        for _ in 0..64 {
            let m = MacAddr::random();
            assert!(m.is_locally_administered() && m.is_unicast(), "{m}");
        }
    }
}
