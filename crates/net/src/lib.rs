//! Host networking for banger VMs.
//!
//! Every VM gets a TAP device on one host bridge, an IPv4 address inside the
//! configured `cidr`, optional NAT to the outside world (nftables, in a table
//! banger owns), and a `<name>.vm` record in a small authoritative DNS server.
//!
//! Privileged operations (bridge, TAPs, NAT, `ip_forward`, resolved wiring)
//! are reached only through the [`HostNet`] trait so they can move behind a
//! root helper without touching the callers. The pure parts ([`alloc`],
//! [`guest`], [`ifname`]) and the unprivileged parts ([`dns`]) are used
//! directly.
//!
//! Daemon start-up order: [`NetSettings::from_config`], [`LocalHostNet::connect`],
//! [`HostNet::ensure_bridge`], [`HostNet::nat_rebuild`] with the NAT-enabled VMs,
//! [`TapPool::start`] with the TAPs of running VMs, [`DnsServer::start`] and
//! [`HostNet::resolved_wire`].

pub mod alloc;
pub mod dns;
pub mod firewall;
pub mod guard;
pub mod guest;
pub mod host;
pub mod ifname;
pub mod link;
pub mod nat;
pub mod pool;
pub mod resolved;
mod settings;

pub use alloc::{AllocError, MacAddr, Subnet, allocate};
pub use dns::{DnsError, DnsRecords, DnsServer};
pub use guest::GuestNet;
pub use host::{HostNet, HostNetError, LocalHostNet};
pub use ifname::{IfName, NameError, TAP_PREFIX, TapName};
pub use pool::{AcquiredTap, PoolConfig, PoolError, TapPool};
pub use settings::{NetSettings, SettingsError};
