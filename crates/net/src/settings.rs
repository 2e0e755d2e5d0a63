//! The network part of banger's config, validated once.

use crate::alloc::{AllocError, Subnet};
use crate::dns;
use crate::ifname::{IfName, NameError};
use banger_config::Config;
use std::net::{Ipv4Addr, SocketAddr};

/// Why the network settings in `config.toml` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("bridge_name: {0}")]
    BridgeName(#[from] NameError),
    #[error("cidr/bridge_ip: {0}")]
    Network(#[from] AllocError),
}

/// Everything the networking code needs from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSettings {
    pub bridge: IfName,
    pub subnet: Subnet,
    pub tap_pool_size: usize,
    /// Resolver given to guests, if any.
    pub default_dns: Option<Ipv4Addr>,
    /// Where the `.vm` DNS server listens (UDP and TCP).
    pub dns_listen: SocketAddr,
}

impl NetSettings {
    pub fn from_config(config: &Config) -> Result<Self, SettingsError> {
        Ok(Self {
            bridge: IfName::new(config.bridge_name.clone())?,
            subnet: Subnet::from_config(config.cidr, config.effective_bridge_ip())?,
            tap_pool_size: config.tap_pool_size as usize,
            default_dns: config.default_dns,
            dns_listen: dns::DEFAULT_LISTEN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = NetSettings::from_config(&Config::default()).expect("defaults are valid");
        assert_eq!(s.bridge.as_str(), "banger0");
        assert_eq!(s.subnet.cidr().to_string(), "172.16.0.0/24");
        assert_eq!(s.subnet.bridge_ip(), Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(s.tap_pool_size, 2);
        assert_eq!(s.dns_listen.to_string(), "127.0.0.1:42069");
    }

    #[test]
    fn bridge_name_is_checked() {
        let c = Config {
            bridge_name: "br_banger".into(),
            ..Config::default()
        };
        let e = NetSettings::from_config(&c).expect_err("underscore");
        assert!(e.to_string().starts_with("bridge_name: "), "{e}");
    }
}
