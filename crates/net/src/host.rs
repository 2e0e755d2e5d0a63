//! The privileged host operations, behind one narrow trait.
//!
//! Everything that needs CAP_NET_ADMIN goes through [`HostNet`], with typed,
//! validated arguments. [`LocalHostNet`] performs the operations directly
//! (netlink, `/dev/net/tun`, nft, sysctl, resolvectl); a root helper can
//! implement the same trait over a socket later without callers changing.

use crate::alloc::Subnet;
use crate::firewall::{self, Repaired};
use crate::guard;
use crate::ifname::{IfName, TapName};
use crate::link::{BridgeChange, LinkError, LinkState, Netlink};
use crate::nat::{self, NatError};
use crate::resolved::{self, ResolvedError};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

/// A privileged operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error(transparent)]
    Resolved(#[from] ResolvedError),
    #[error("refused: {0}")]
    Refused(String),
    /// The root helper (system install) failed or refused the operation.
    #[error("{0}")]
    Helper(String),
}

/// The bridge VMs' TAPs join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: IfName,
    pub subnet: Subnet,
}

/// A banger TAP as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    pub name: TapName,
    /// Index of the bridge it is attached to, if any.
    pub controller: Option<u32>,
    pub owner: Option<u32>,
    pub up: bool,
}

/// The privileged network operations banger needs, and nothing else.
///
/// Implementations validate what the types cannot (addresses inside the
/// subnet, names that exist) and must be idempotent where documented, so
/// callers can retry and reconcile freely.
#[async_trait::async_trait]
pub trait HostNet: Send + Sync {
    /// Creates the bridge if missing, gives it the subnet's bridge address
    /// and brings it up. Idempotent. Refuses a same-named non-bridge link.
    async fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<BridgeChange, HostNetError>;

    /// Index of `bridge`, `None` when it does not exist.
    async fn bridge_index(&self, bridge: &IfName) -> Result<Option<u32>, HostNetError>;

    /// Creates persistent TAP `tap` owned by `owner_uid`, attached to
    /// `bridge` and up. Fails if `tap` already exists.
    async fn create_tap(
        &self,
        tap: &TapName,
        owner_uid: u32,
        bridge: &IfName,
    ) -> Result<(), HostNetError>;

    /// Deletes `tap`; a missing TAP is not an error.
    async fn delete_tap(&self, tap: &TapName) -> Result<(), HostNetError>;

    /// banger's TAPs (names carrying the TAP prefix).
    async fn list_taps(&self) -> Result<Vec<TapInfo>, HostNetError>;

    /// NAT on for guest `vm_ip` of `subnet`. Idempotent.
    async fn nat_enable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError>;

    /// NAT off for guest `vm_ip`. Idempotent.
    async fn nat_disable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError>;

    /// NAT for exactly `vm_ips` (reconcile); empty removes banger's table.
    async fn nat_rebuild(
        &self,
        subnet: &Subnet,
        vm_ips: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), HostNetError>;

    /// The guests' address checks on the bridge for exactly `bindings`
    /// (reconcile; see [`crate::guard`]).
    async fn guard_rebuild(
        &self,
        subnet: &Subnet,
        bindings: &guard::Bindings,
    ) -> Result<(), HostNetError>;

    /// Checks banger's tables against the address checks for exactly
    /// `guard` (`None`: the checks are off) and NAT for exactly `nat`, and
    /// rebuilds those someone else changed (see [`crate::firewall`]).
    async fn firewall_ensure(
        &self,
        subnet: &Subnet,
        guard: Option<&guard::Bindings>,
        nat: &BTreeSet<Ipv4Addr>,
    ) -> Result<Repaired, HostNetError>;

    /// Lets the guest behind `tap` send as `ip`. Idempotent.
    async fn guard_allow(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError>;

    /// Takes that permission away again. Idempotent.
    async fn guard_forget(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError>;

    /// Routes `.vm` lookups through `bridge` to `dns` in systemd-resolved.
    async fn resolved_wire(&self, bridge: &IfName, dns: SocketAddr) -> Result<(), HostNetError>;

    /// Drops banger's resolved settings from `bridge`.
    async fn resolved_unwire(&self, bridge: &IfName) -> Result<(), HostNetError>;
}

/// [`HostNet`] done directly by this process (which must be root or hold
/// CAP_NET_ADMIN), in the network namespace of the thread that connected.
pub struct LocalHostNet {
    netlink: Netlink,
    /// nft changes read-modify-write banger's tables, and a check rebuilds
    /// them from what it is given: one at a time.
    nft_lock: tokio::sync::Mutex<()>,
}

impl LocalHostNet {
    /// Opens the netlink connection on the current tokio runtime.
    pub fn connect() -> Result<Self, HostNetError> {
        Ok(Self {
            netlink: Netlink::connect()?,
            nft_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The underlying netlink handle (for inspection and tests).
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }
}

fn loopback_only(dns: SocketAddr) -> Result<(), HostNetError> {
    // A root helper must not be talked into pointing the host's resolver at
    // an arbitrary server.
    if dns.ip().is_loopback() {
        Ok(())
    } else {
        Err(HostNetError::Refused(format!(
            "DNS address {dns} is not a loopback address"
        )))
    }
}

#[async_trait::async_trait]
impl HostNet for LocalHostNet {
    async fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<BridgeChange, HostNetError> {
        let change = self
            .netlink
            .ensure_bridge(
                &bridge.name,
                bridge.subnet.bridge_ip(),
                bridge.subnet.prefix(),
            )
            .await?;
        if change != BridgeChange::default() {
            tracing::info!(bridge = %bridge.name, ?change, "bridge set up");
        }
        Ok(change)
    }

    async fn bridge_index(&self, bridge: &IfName) -> Result<Option<u32>, HostNetError> {
        Ok(self
            .netlink
            .link(bridge.as_str())
            .await?
            .filter(|l| l.kind == "bridge")
            .map(|l| l.index))
    }

    async fn create_tap(
        &self,
        tap: &TapName,
        owner_uid: u32,
        bridge: &IfName,
    ) -> Result<(), HostNetError> {
        match self.netlink.link(bridge.as_str()).await? {
            Some(l) if l.kind == "bridge" => {}
            Some(l) => {
                return Err(LinkError::NotABridge {
                    link: bridge.to_string(),
                    kind: l.kind,
                }
                .into());
            }
            None => return Err(LinkError::NoBridge(bridge.to_string()).into()),
        }
        self.netlink.create_tap(tap, owner_uid, bridge).await?;
        Ok(())
    }

    async fn delete_tap(&self, tap: &TapName) -> Result<(), HostNetError> {
        match self.netlink.link(tap.as_str()).await? {
            None => Ok(()),
            Some(l) if l.kind == "tun" => Ok(self.netlink.delete_link(tap.as_str()).await?),
            Some(l) => Err(HostNetError::Refused(format!(
                "{tap} is a {} link, not a TAP: not deleting it",
                l.kind
            ))),
        }
    }

    async fn list_taps(&self) -> Result<Vec<TapInfo>, HostNetError> {
        Ok(self
            .netlink
            .list_taps()
            .await?
            .into_iter()
            .filter_map(|l: LinkState| {
                Some(TapInfo {
                    name: TapName::new(l.name).ok()?,
                    controller: l.controller,
                    owner: l.tun_owner,
                    up: l.up,
                })
            })
            .collect())
    }

    async fn nat_enable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(nat::enable(subnet, vm_ip).await?)
    }

    async fn nat_disable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(nat::disable(subnet, vm_ip).await?)
    }

    async fn nat_rebuild(
        &self,
        subnet: &Subnet,
        vm_ips: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(nat::rebuild(subnet, vm_ips).await?)
    }

    async fn guard_rebuild(
        &self,
        subnet: &Subnet,
        bindings: &guard::Bindings,
    ) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(guard::rebuild(subnet, bindings).await?)
    }

    async fn firewall_ensure(
        &self,
        subnet: &Subnet,
        guard: Option<&guard::Bindings>,
        nat: &BTreeSet<Ipv4Addr>,
    ) -> Result<Repaired, HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(firewall::ensure(subnet, guard, nat).await?)
    }

    async fn guard_allow(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(guard::allow(subnet, tap, ip).await?)
    }

    async fn guard_forget(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError> {
        let _g = self.nft_lock.lock().await;
        Ok(guard::forget(subnet, tap, ip).await?)
    }

    async fn resolved_wire(&self, bridge: &IfName, dns: SocketAddr) -> Result<(), HostNetError> {
        loopback_only(dns)?;
        if self.bridge_index(bridge).await?.is_none() {
            return Err(LinkError::NoBridge(bridge.to_string()).into());
        }
        Ok(resolved::wire(bridge, dns).await?)
    }

    async fn resolved_unwire(&self, bridge: &IfName) -> Result<(), HostNetError> {
        Ok(resolved::unwire(bridge).await?)
    }
}
