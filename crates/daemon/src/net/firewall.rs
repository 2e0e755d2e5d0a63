//! What banger's nftables tables must say, kept by the daemon, and the
//! check that makes them say it again after someone else changed them.
//!
//! The tables are made at daemon start from the VM records, and each VM's
//! start and stop changes them. A host's `nft flush ruleset` (a restart of
//! its nftables service does one) takes them away underneath the daemon:
//! without the address checks a guest can send as another VM's address,
//! and without the NAT table's forward guard a LAN neighbour routing the
//! cidr through the host reaches the guests. So every change also goes
//! into [`Firewall`]'s kept state, under one lock with the change itself,
//! and [`Firewall::heal`] (every [`HEAL_EVERY`], and for `doctor`) has the
//! tables rebuilt from that state where they differ from it.

use banger_net::firewall::Repaired;
use banger_net::{HostNet, HostNetError, Subnet, TapName, guard};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the tables are checked.
pub(crate) const HEAL_EVERY: Duration = Duration::from_secs(10);

/// banger's nftables state as the daemon keeps it, and the changes to it.
pub(crate) struct Firewall {
    host: Arc<dyn HostNet>,
    subnet: Subnet,
    /// Whether the guests' address checks are on (see `Guard`).
    guard: bool,
    /// Taken for each change and check, so that a check never rebuilds
    /// from a state a change has not reached yet.
    kept: tokio::sync::Mutex<Kept>,
}

/// What the tables must hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Kept {
    bindings: guard::Bindings,
    nat: BTreeSet<Ipv4Addr>,
}

impl Firewall {
    /// Keeps what daemon start made the tables hold: `bindings` (when the
    /// checks are on) and NAT for `nat`.
    pub(crate) fn new(
        host: Arc<dyn HostNet>,
        subnet: Subnet,
        guard: bool,
        bindings: guard::Bindings,
        nat: BTreeSet<Ipv4Addr>,
    ) -> Self {
        Self {
            host,
            subnet,
            guard,
            kept: tokio::sync::Mutex::new(Kept { bindings, nat }),
        }
    }

    /// Lets the guest behind `tap` send as `ip`.
    pub(crate) async fn allow(&self, tap: &TapName, ip: Ipv4Addr) -> Result<(), HostNetError> {
        let mut kept = self.kept.lock().await;
        self.host.guard_allow(&self.subnet, tap, ip).await?;
        kept.bindings.insert(tap.clone(), ip);
        Ok(())
    }

    /// Takes that away again. Forgotten here even when the change fails:
    /// the next check removes what is left.
    pub(crate) async fn forget(&self, tap: &TapName, ip: Ipv4Addr) -> Result<(), HostNetError> {
        let mut kept = self.kept.lock().await;
        if kept.bindings.get(tap) == Some(&ip) {
            kept.bindings.remove(tap);
        }
        self.host.guard_forget(&self.subnet, tap, ip).await
    }

    /// Turns NAT for guest `ip` on or off. Off is kept even when the change
    /// fails, on only once it is made.
    pub(crate) async fn nat(&self, ip: Ipv4Addr, on: bool) -> Result<(), HostNetError> {
        let mut kept = self.kept.lock().await;
        if on {
            self.host.nat_enable(&self.subnet, ip).await?;
            kept.nat.insert(ip);
            Ok(())
        } else {
            kept.nat.remove(&ip);
            self.host.nat_disable(&self.subnet, ip).await
        }
    }

    /// Checks the tables against the kept state and has those that differ
    /// rebuilt from it.
    pub(crate) async fn heal(&self) -> Result<Repaired, HostNetError> {
        let kept = self.kept.lock().await;
        let guard = self.guard.then_some(&kept.bindings);
        let repaired = self
            .host
            .firewall_ensure(&self.subnet, guard, &kept.nat)
            .await?;
        if repaired.any() {
            tracing::warn!(
                checks = repaired.guard,
                nat = repaired.nat,
                vms = kept.bindings.len(),
                "banger's nftables tables had been removed or changed by someone else (nft flush ruleset?): made them again"
            );
        }
        Ok(repaired)
    }

    /// Heals every [`HEAL_EVERY`] until `stop`. A failing check is logged
    /// once, and again when its error changes.
    pub(crate) fn watch(self: Arc<Self>, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEAL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match self.heal().await {
                    Ok(_) => last_error = None,
                    Err(e) => {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "checking banger's nftables tables");
                            last_error = Some(e);
                        }
                    }
                }
            }
        });
    }
}
