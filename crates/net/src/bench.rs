//! Measurements for `banger bench`: TAP acquisition warm vs cold, and DNS
//! query latency.

use crate::dns::DnsError;
use crate::pool::{PoolError, TapPool};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// How long getting a TAP takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TapTimings {
    /// From the pool.
    pub warm: Duration,
    /// Created on demand.
    pub cold: Duration,
}

/// A benchmark that could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the TAP pool did not fill up within {0:?}")]
    PoolNotReady(Duration),
    #[error("the TAP pool is disabled (tap_pool_size = 0)")]
    PoolDisabled,
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("DNS query to {addr}: {message}")]
    Query { addr: SocketAddr, message: String },
}

/// Times one TAP taken from the (full) pool and one created cold; both are
/// released again.
pub async fn tap_acquire(
    pool: &TapPool,
    ready_timeout: Duration,
) -> Result<TapTimings, BenchError> {
    if pool.size() == 0 {
        return Err(BenchError::PoolDisabled);
    }
    if !pool.wait_idle(pool.size(), ready_timeout).await {
        return Err(BenchError::PoolNotReady(ready_timeout));
    }
    let t = Instant::now();
    let warm_tap = pool.acquire().await?;
    let warm = t.elapsed();
    let t = Instant::now();
    let cold_tap = pool.acquire_cold().await;
    let cold = t.elapsed();
    pool.release(&warm_tap.name).await?;
    let cold_tap = cold_tap?;
    pool.release(&cold_tap.name).await?;
    debug_assert!(warm_tap.warm && !cold_tap.warm);
    Ok(TapTimings { warm, cold })
}

/// Latency percentiles over a run of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LatencyStats {
    pub queries: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LatencyStats {
    /// Nearest-rank percentiles of `samples`; `None` when empty.
    pub fn from_samples(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: usize| samples[(samples.len() * p).div_ceil(100).max(1) - 1];
        Some(Self {
            queries: samples.len(),
            p50: rank(50),
            p99: rank(99),
            max: samples[samples.len() - 1],
        })
    }
}

/// Sends `n` A queries for `<name>.vm` to the server at `server` over UDP,
/// one at a time, and reports latency. Every answer must be NOERROR with an
/// answer record; each query waits at most `timeout`.
pub async fn dns_latency(
    server: SocketAddr,
    name: &str,
    n: usize,
    timeout: Duration,
) -> Result<LatencyStats, BenchError> {
    let qname = crate::dns::fqdn(name)?;
    let bind: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let qerr = |message: String| BenchError::Query {
        addr: server,
        message,
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| qerr(e.to_string()))?;
    sock.connect(server)
        .await
        .map_err(|e| qerr(e.to_string()))?;
    let mut samples = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    for i in 0..n {
        let id = (i % usize::from(u16::MAX)) as u16;
        let bytes = query_bytes(id, &qname).map_err(qerr)?;
        let t = Instant::now();
        sock.send(&bytes).await.map_err(|e| qerr(e.to_string()))?;
        let len = tokio::time::timeout(timeout, sock.recv(&mut buf))
            .await
            .map_err(|_| qerr(format!("no answer within {timeout:?}")))?
            .map_err(|e| qerr(e.to_string()))?;
        samples.push(t.elapsed());
        let reply = Message::from_vec(&buf[..len]).map_err(|e| qerr(e.to_string()))?;
        if reply.metadata.id != id
            || reply.metadata.response_code != ResponseCode::NoError
            || reply.answers.is_empty()
        {
            return Err(qerr(format!(
                "{qname}: answer {} with {} records",
                reply.metadata.response_code,
                reply.answers.len()
            )));
        }
    }
    LatencyStats::from_samples(samples).ok_or_else(|| qerr("no queries sent (n = 0)".into()))
}

fn query_bytes(id: u16, qname: &Name) -> Result<Vec<u8>, String> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(qname.clone(), RecordType::A));
    m.to_vec().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let ms = Duration::from_millis;
        let s = LatencyStats::from_samples((1..=100).map(ms).collect()).expect("stats");
        assert_eq!(
            (s.p50, s.p99, s.max, s.queries),
            (ms(50), ms(99), ms(100), 100)
        );
        let s = LatencyStats::from_samples(vec![ms(3)]).expect("one");
        assert_eq!((s.p50, s.p99), (ms(3), ms(3)));
        assert!(LatencyStats::from_samples(vec![]).is_none());
    }
}
