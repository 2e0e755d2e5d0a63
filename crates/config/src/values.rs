//! Typed config values. Each parses from the string a user writes, with a
//! message that says what a valid value looks like.

use serde::Deserialize;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// `log_level`: how much `bangerd.log` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The name as written in config and understood by `tracing` filters.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            other => Err(format!(
                "unknown level {other:?}: use debug, info, warn or error"
            )),
        }
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `network`: how VMs reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum NetworkMode {
    /// The bridge when the daemon may manage it (root or CAP_NET_ADMIN),
    /// else QEMU user-mode networking.
    #[default]
    Auto,
    /// Always the bridge; VMs fail to boot when it cannot be set up.
    Bridge,
    /// Always QEMU user-mode networking (host port forwards on 127.0.0.1).
    User,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Auto => "auto",
            NetworkMode::Bridge => "bridge",
            NetworkMode::User => "user",
        }
    }
}

impl FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(NetworkMode::Auto),
            "bridge" => Ok(NetworkMode::Bridge),
            "user" => Ok(NetworkMode::User),
            other => Err(format!(
                "unknown network mode {other:?}: use auto, bridge or user"
            )),
        }
    }
}

impl TryFrom<String> for NetworkMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `vmm`: which VMM runs new VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum VmmChoice {
    /// Firecracker when `/dev/kvm` works with it, else QEMU.
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

impl VmmChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmChoice::Auto => "auto",
            VmmChoice::Firecracker => "firecracker",
            VmmChoice::Qemu => "qemu",
        }
    }
}

impl FromStr for VmmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            "firecracker" => Ok(VmmChoice::Firecracker),
            "qemu" => Ok(VmmChoice::Qemu),
            other => Err(format!(
                "unknown VMM {other:?}: use auto, firecracker or qemu"
            )),
        }
    }
}

impl TryFrom<String> for VmmChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for VmmChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IPv4 network written `a.b.c.d/n`, where `a.b.c.d` is the network
/// address itself (no host bits set) and the network has room for a bridge
/// and at least one guest (prefix at most /30).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// banger's default network, 172.16.0.0/24.
    pub const DEFAULT: Ipv4Cidr = Ipv4Cidr {
        network: Ipv4Addr::new(172, 16, 0, 0),
        prefix: 24,
    };

    /// The longest prefix banger accepts: network, bridge, one guest, broadcast.
    pub const MAX_PREFIX: u8 = 30;

    /// `None` when `network` has host bits set or `prefix` is over 30.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > Self::MAX_PREFIX {
            return None;
        }
        let c = Self { network, prefix };
        (u32::from(network) & !c.mask() == 0).then_some(c)
    }

    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    /// The broadcast address (all host bits set).
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `ip` lies in the network, network and broadcast addresses included.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether `ip` can be given to an interface: inside, and neither the
    /// network nor the broadcast address.
    pub fn is_host(self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }

    /// The first host address, the bridge's default.
    pub fn first_host(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network such as 172.16.0.0/24");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > Self::MAX_PREFIX {
            return Err(format!(
                "{s:?}: prefix /{prefix} is too long, at most /{} leaves room for guests",
                Self::MAX_PREFIX
            ));
        }
        let c = Self {
            network: addr,
            prefix,
        };
        let net = Ipv4Addr::from(u32::from(addr) & c.mask());
        if net != addr {
            return Err(format!(
                "{s:?} has host bits set: did you mean {net}/{prefix}?"
            ));
        }
        Ok(c)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A file mode written as an octal string, e.g. `"0755"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an octal file mode such as \"0644\"");
        if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o7777 => Ok(FileMode(m)),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for FileMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let c: Ipv4Cidr = "172.16.0.0/24".parse().expect("ok");
        assert_eq!(
            (c.network(), c.prefix()),
            (Ipv4Addr::new(172, 16, 0, 0), 24)
        );
        assert_eq!(c.broadcast(), Ipv4Addr::new(172, 16, 0, 255));
        assert_eq!(c.first_host(), Ipv4Addr::new(172, 16, 0, 1));
        assert!(c.is_host(Ipv4Addr::new(172, 16, 0, 9)));
        assert!(!c.is_host(Ipv4Addr::new(172, 16, 0, 255)));
        assert!(!c.is_host(Ipv4Addr::new(172, 16, 0, 0)));
        assert!(!c.contains(Ipv4Addr::new(172, 16, 1, 1)));
        assert_eq!(c.to_string(), "172.16.0.0/24");
        for bad in [
            "10.0.0.300/24",
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/31",
            "10.0.0.0/x",
            "/24",
            "",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let e = "10.0.0.1/24".parse::<Ipv4Cidr>().expect_err("host bits");
        assert!(e.contains("10.0.0.0/24"), "{e}");
        assert_eq!(Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 1), 24), None);
    }

    #[test]
    fn modes() {
        assert_eq!("0755".parse::<FileMode>(), Ok(FileMode(0o755)));
        assert_eq!("600".parse::<FileMode>(), Ok(FileMode(0o600)));
        assert_eq!(FileMode(0o600).to_string(), "0600");
        for bad in ["", "999", "0o755", "+755", "17777", "rwx"] {
            assert!(bad.parse::<FileMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn levels_and_vmms_round_trip() {
        for l in [
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
        ] {
            assert_eq!(l.as_str().parse::<LogLevel>(), Ok(l));
        }
        for v in [VmmChoice::Auto, VmmChoice::Firecracker, VmmChoice::Qemu] {
            assert_eq!(v.as_str().parse::<VmmChoice>(), Ok(v));
        }
        assert!(
            "verbose"
                .parse::<LogLevel>()
                .expect_err("bad")
                .contains("\"verbose\"")
        );
    }
}
