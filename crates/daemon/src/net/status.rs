//! Networking facts for `doctor`.

use crate::Daemon;
use banger_api::NetworkStatus;
use std::time::Duration;

use super::*;

impl Daemon {
    /// Networking facts for `doctor`.
    pub async fn network_status(&self) -> Result<NetworkStatus, NetError> {
        let (tun_ok, tun_detail) = tun_access();
        let nat = banger_net::nat::status().await;
        let Some(net) = self.network() else {
            return Err(NetError::NotInitialised);
        };
        let s = &net.settings;
        let (reason, tap_pool) = match &net.mode {
            Mode::Bridge { pool, .. } => (
                format!("bangerd manages bridge {}", s.bridge),
                Some(banger_api::TapPool {
                    idle: pool.idle_count() as u64,
                    configured: pool.size() as u64,
                    last_create_us: pool
                        .last_create()
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                }),
            ),
            Mode::User { reason } | Mode::Unavailable { reason } => (reason.clone(), None),
        };
        let (resolver_ok, resolver_detail) = match net.dns_addr() {
            None => (false, "the .vm DNS server is not running".to_string()),
            Some(addr) => {
                let check = banger_net::resolved::check(&s.bridge, addr).await;
                match banger_net::resolved::probe(&net.records, Duration::from_secs(2)).await {
                    banger_net::resolved::ProbeResult::Routed => {
                        (true, format!("the host resolver answers .vm from {addr}"))
                    }
                    banger_net::resolved::ProbeResult::NotRouted(why) => {
                        (false, format!("{why}; {}", check.detail))
                    }
                }
            }
        };
        // Checked now, not as of daemon start: someone may have flushed
        // the tables since (the check makes them again).
        let checked = match &net.mode {
            Mode::Bridge { firewall, .. } => Some(firewall.heal().await),
            _ => None,
        };
        let guard_ok = match (&net.mode, &net.guard, &checked) {
            (Mode::User { .. }, _, _) => true,
            (_, Guard::On, Some(Err(_))) => false,
            (_, guard, _) => guard.is_on(),
        };
        let mut guard_detail = match (&net.mode, &net.guard) {
            (Mode::User { .. }, _) => {
                "user-mode networking: every guest has a network of its own".to_string()
            }
            (_, Guard::On) => format!(
                "each guest on {} sends only as its own address (nftables: table bridge {})",
                s.bridge,
                banger_net::guard::TABLE
            ),
            (_, Guard::Off(why)) => why.clone(),
        };
        match &checked {
            Some(Ok(r)) if r.any() => guard_detail.push_str(
                "; banger's nftables tables had been removed or changed by someone else and were made again just now",
            ),
            Some(Err(e)) => guard_detail
                .push_str(&format!("; but banger's nftables tables could not be checked: {e}")),
            _ => {}
        }
        Ok(NetworkStatus {
            mode: net.mode_name().into(),
            reason,
            bridge: s.bridge.to_string(),
            cidr: s.subnet.cidr().to_string(),
            bridge_ip: s.subnet.bridge_ip().to_string(),
            tap_pool,
            dns_listen: net.dns_addr().unwrap_or(s.dns_listen).to_string(),
            dns_error: net.dns_error.clone(),
            nft_version: nat.nft_version,
            ip_forward: nat.ip_forward,
            nat_error: nat.error,
            resolver_ok,
            resolver_detail,
            guard_ok,
            guard_detail,
            tun_ok,
            tun_detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::daemon;
    use banger_net::{DnsRecords, DnsServer};

    /// A configured port 0 is reported as the port the server got, so a
    /// client can query it.
    #[tokio::test]
    async fn dns_listen_is_the_bound_address() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let mut settings = settings(&d.config).expect("settings");
        settings.dns_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let records = DnsRecords::new();
        let dns = DnsServer::start(settings.dns_listen, records.clone())
            .await
            .expect("dns");
        let bound = dns.local_addr();
        assert_ne!(bound.port(), 0);
        let net = Network {
            settings,
            mode: Mode::User {
                reason: "test".into(),
            },
            guard: Guard::Off("not bridge networking".into()),
            records,
            dns: Some(dns),
            dns_error: None,
        };
        assert!(d.network.set(net).is_ok());
        let status = d.network_status().await.expect("status");
        assert_eq!(status.dns_listen, bound.to_string());
        assert_eq!(status.tap_pool, None);
    }
}
