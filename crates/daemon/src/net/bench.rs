//! The network benchmark: TAP acquisition and `.vm` DNS latency.

use crate::Daemon;
use crate::bench_image::BenchError;
use anyhow::{Context, anyhow};
use banger_api::NetworkBench;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::*;

impl Daemon {
    /// TAP acquisition warm vs cold and `.vm` query latency.
    pub async fn network_bench(&self) -> Result<NetworkBench, BenchError> {
        let net = self.network().ok_or(NetError::NotInitialised)?;
        let (tap_warm_us, tap_cold_us, tap_note) = match &net.mode {
            Mode::Bridge { pool, .. } if pool.size() > 0 => {
                let t = banger_net::bench::tap_acquire(pool.as_ref(), Duration::from_secs(30))
                    .await
                    .context("timing TAP acquisition")?;
                (
                    Some(t.warm.as_micros() as u64),
                    Some(t.cold.as_micros() as u64),
                    None,
                )
            }
            Mode::Bridge { .. } => (None, None, Some("tap_pool_size is 0".to_string())),
            _ => (
                None,
                None,
                Some(format!("{} networking has no TAPs", net.mode_name())),
            ),
        };
        let addr = net
            .dns_addr()
            .ok_or_else(|| anyhow!("the .vm DNS server is not running: {:?}", net.dns_error))?;
        let label = format!("banger-bench-{:08x}", rand::random::<u32>());
        net.records
            .set(&label, Ipv4Addr::new(192, 0, 2, 1))
            .map_err(|e| anyhow!("{e}"))?;
        let stats =
            banger_net::bench::dns_latency(addr, &label, 10_000, Duration::from_secs(1)).await;
        net.records.remove(&label);
        let stats = stats.context("timing .vm queries")?;
        Ok(NetworkBench {
            tap_warm_us,
            tap_cold_us,
            tap_note,
            dns_queries: stats.queries,
            dns_p50_us: stats.p50.as_micros() as u64,
            dns_p99_us: stats.p99.as_micros() as u64,
            dns_max_us: stats.max.as_micros() as u64,
        })
    }
}
