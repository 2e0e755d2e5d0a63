//! banger's nftables tables checked against what the daemon keeps, and made
//! again where someone else changed them.
//!
//! The daemon keeps the guests' bindings (the address checks of
//! [`crate::guard`]) and the addresses that have NAT ([`crate::nat`]). A
//! host's `nft flush ruleset` (which a restart of its nftables service
//! does) or a hand edit takes the tables away underneath it: the guests
//! could then send as each other, and a LAN neighbour routing the cidr
//! through the host would reach them. [`ensure`] compares the tables with
//! the kept state and rebuilds those that differ, each in the one
//! transaction that makes it at daemon start.

use crate::alloc::Subnet;
use crate::guard::{self, Bindings};
use crate::nat::{self, NatError};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Which tables [`ensure`] had to make again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    /// The guests' address checks (`bridge` and `inet` tables).
    pub guard: bool,
    /// NAT and its forward guard (`ip` table).
    pub nat: bool,
}

impl Repaired {
    /// Whether anything was made again.
    pub fn any(&self) -> bool {
        self.guard || self.nat
    }
}

/// Makes banger's tables say what the daemon keeps: the address checks for
/// exactly `guard` (`None` when the checks are off) and NAT for exactly
/// `nat`. Tables that already do are left alone.
pub async fn ensure(
    subnet: &Subnet,
    guard: Option<&Bindings>,
    nat: &BTreeSet<Ipv4Addr>,
) -> Result<Repaired, NatError> {
    // Each part is tried even when the other fails: a lasting problem with
    // one table must not keep the other from being repaired.
    let checks = match guard {
        None => Ok(false),
        Some(bindings) => match guard::in_place(bindings).await {
            Ok(true) => Ok(false),
            Ok(false) => guard::rebuild(subnet, bindings).await.map(|()| true),
            Err(e) => Err(e),
        },
    };
    let forwarding = match nat::in_place(subnet, nat).await {
        Ok(true) => Ok(false),
        Ok(false) => nat::rebuild(subnet, nat).await.map(|()| true),
        // Without nft there is no table to keep: bridge networking works
        // without one until a VM asks for NAT.
        Err(NatError::NftMissing) if guard.is_none() && nat.is_empty() => Ok(false),
        Err(e) => Err(e),
    };
    Ok(Repaired {
        guard: checks?,
        nat: forwarding?,
    })
}
