//! The network block of `banger bench`: how long the bench's VMs waited
//! for their TAP devices, and the latency of the daemon's `.vm` DNS server.
//!
//! Both from outside the daemon: the TAP timings are what the daemon
//! reports of each VM's boot (`GET /v1/vms/{vm}/boot`, `tap`) and of its
//! pool (`GET /v1/network`, `tap_pool.last_create_us`); the DNS queries go
//! from here to the address `GET /v1/network` reports (`dns_listen`).

use anyhow::Context;
use banger_api::{NetworkStatus, TapAcquisition};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Queries timed against the `.vm` DNS server.
const DNS_QUERIES: usize = 10_000;

/// TAP acquisition and `.vm` DNS latency.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkBench {
    /// A TAP from the warm pool, in microseconds (median over the bench's
    /// VMs that got one).
    pub tap_warm_us: Option<u64>,
    /// A TAP created on demand, in microseconds: the median over the
    /// bench's VMs that found the pool empty, else the daemon's latest TAP
    /// creation (see `tap_note`).
    pub tap_cold_us: Option<u64>,
    /// Why TAP timings are missing (user-mode networking, pool disabled),
    /// or where a cold timing came from.
    pub tap_note: Option<String>,
    pub dns_queries: usize,
    pub dns_p50_us: u64,
    pub dns_p99_us: u64,
    pub dns_max_us: u64,
    /// The name asked for (`<name>.vm`), and why it has no record when it
    /// has none.
    pub dns_name: String,
    pub dns_note: Option<String>,
}

/// Runs the block: `taps` are the TAP acquisitions the bench's VMs
/// reported; `vm` names a running VM whose `.vm` record the queries ask for.
pub async fn network_bench(
    client: &banger_api::Client,
    taps: &[TapAcquisition],
    vm: &str,
) -> anyhow::Result<NetworkBench> {
    let status = client.network().await?;
    let (tap_warm_us, tap_cold_us, tap_note) = tap_summary(&status, taps);
    anyhow::ensure!(
        status.dns_error.is_none(),
        "the .vm DNS server is not running: {}",
        status.dns_error.as_deref().unwrap_or_default()
    );
    let server: SocketAddr = status
        .dns_listen
        .parse()
        .with_context(|| format!("the daemon's DNS address {:?}", status.dns_listen))?;
    // Only bridge networking publishes VMs under `.vm`; elsewhere the
    // server answers NXDOMAIN from the same zone lookup.
    let (name, want_answer, dns_note) = if status.mode == "bridge" {
        (vm.to_string(), true, None)
    } else {
        (
            format!("banger-bench-{:08x}", rand::random::<u32>()),
            false,
            Some(format!(
                "{} networking publishes no .vm records: the queries asked for a name without one (NXDOMAIN answers)",
                status.mode
            )),
        )
    };
    let stats = dns_latency(
        server,
        &name,
        want_answer,
        DNS_QUERIES,
        Duration::from_secs(1),
    )
    .await
    .context("timing .vm queries")?;
    Ok(NetworkBench {
        tap_warm_us,
        tap_cold_us,
        tap_note,
        dns_queries: stats.queries,
        dns_p50_us: micros(stats.p50),
        dns_p99_us: micros(stats.p99),
        dns_max_us: micros(stats.max),
        dns_name: format!("{name}.vm"),
        dns_note,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The TAP fields from the VMs' acquisitions and the daemon's network
/// status: (warm µs, cold µs, note).
fn tap_summary(
    status: &NetworkStatus,
    taps: &[TapAcquisition],
) -> (Option<u64>, Option<u64>, Option<String>) {
    if status.mode != "bridge" {
        return (
            None,
            None,
            Some(format!("{} networking has no TAPs", status.mode)),
        );
    }
    let median_of = |from_pool: bool| {
        let v: Vec<u64> = taps
            .iter()
            .filter(|t| t.from_pool == from_pool)
            .map(|t| t.took_us)
            .collect();
        median_u64(v)
    };
    let (warm, cold) = (median_of(true), median_of(false));
    let pool = status.tap_pool;
    let mut notes = Vec::new();
    if taps.is_empty() {
        notes.push("no bench VM reported how it got its TAP".to_string());
    } else if warm.is_none() {
        notes.push(match pool {
            Some(p) if p.configured == 0 => {
                "tap_pool_size is 0: every TAP was created on demand".to_string()
            }
            _ => "no bench VM found a TAP ready in the pool".to_string(),
        });
    }
    let cold = match (cold, pool.and_then(|p| p.last_create_us)) {
        (Some(c), _) => Some(c),
        (None, Some(made)) => {
            notes.push(
                "tap_cold_us is the daemon's latest TAP creation (the pool refilling after a bench VM took one: the same work as a start that finds the pool empty)".to_string(),
            );
            Some(made)
        }
        (None, None) => {
            notes.push("the daemon has not created a TAP yet".to_string());
            None
        }
    };
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    (warm, cold, note)
}

/// The median of `v` (the lower middle of an even count); `None` if empty.
fn median_u64(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

/// Latency percentiles over a run of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Sends `n` A queries for `<name>.vm` to `server` over UDP, one at a time,
/// and reports latency. Every answer must be NOERROR with an answer record
/// (`want_answer`) or NXDOMAIN; each query waits at most `timeout`.
pub async fn dns_latency(
    server: SocketAddr,
    name: &str,
    want_answer: bool,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<LatencyStats> {
    let qname = banger_net::dns::fqdn(name)?;
    let bind: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind)
        .await
        .context("binding a UDP socket")?;
    sock.connect(server)
        .await
        .with_context(|| format!("DNS server {server}"))?;
    let mut samples = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    for i in 0..n {
        let id = (i % usize::from(u16::MAX)) as u16;
        let bytes = query_bytes(id, &qname)?;
        let t = Instant::now();
        sock.send(&bytes)
            .await
            .with_context(|| format!("DNS query to {server}"))?;
        let len = tokio::time::timeout(timeout, sock.recv(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("{server}: no answer within {timeout:?}"))?
            .with_context(|| format!("DNS answer from {server}"))?;
        samples.push(t.elapsed());
        let reply = Message::from_vec(&buf[..len]).context("decoding a DNS answer")?;
        let code = reply.metadata.response_code;
        let ok = if want_answer {
            code == ResponseCode::NoError && !reply.answers.is_empty()
        } else {
            code == ResponseCode::NXDomain
        };
        anyhow::ensure!(
            reply.metadata.id == id && ok,
            "{qname}: answer {code} with {} records from {server}",
            reply.answers.len()
        );
    }
    LatencyStats::from_samples(samples).context("no queries sent (n = 0)")
}

fn query_bytes(id: u16, qname: &Name) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(qname.clone(), RecordType::A));
    m.to_vec().context("encoding a DNS query")
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::TapPool;

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
        assert_eq!(median_u64(vec![5, 1, 3]), Some(3));
        assert_eq!(median_u64(vec![4, 2]), Some(2));
        assert_eq!(median_u64(vec![]), None);
    }

    fn status(mode: &str, pool: Option<TapPool>) -> NetworkStatus {
        NetworkStatus {
            mode: mode.into(),
            reason: String::new(),
            bridge: "banger0".into(),
            cidr: "172.30.0.0/24".into(),
            bridge_ip: "172.30.0.1".into(),
            tap_pool: pool,
            dns_listen: "127.0.0.1:42069".into(),
            dns_error: None,
            nft_version: None,
            ip_forward: None,
            nat_error: None,
            resolver_ok: false,
            resolver_detail: String::new(),
            guard_ok: true,
            guard_detail: String::new(),
            tun_ok: true,
            tun_detail: String::new(),
        }
    }

    fn tap(from_pool: bool, took_us: u64) -> TapAcquisition {
        TapAcquisition { from_pool, took_us }
    }

    #[test]
    fn tap_timings_come_from_the_vms_then_the_pool() {
        let pool = |configured, last| {
            Some(TapPool {
                idle: configured,
                configured,
                last_create_us: last,
            })
        };
        // Warm from the VMs; cold from the pool's latest creation, said so.
        let (w, c, note) = tap_summary(
            &status("bridge", pool(2, Some(9000))),
            &[tap(true, 30), tap(true, 10), tap(true, 20)],
        );
        assert_eq!((w, c), (Some(20), Some(9000)));
        assert!(note.expect("note").contains("latest TAP creation"));
        // A VM that found the pool empty gives the cold timing itself.
        let (w, c, note) = tap_summary(
            &status("bridge", pool(2, Some(9000))),
            &[tap(true, 10), tap(false, 7000)],
        );
        assert_eq!((w, c, note), (Some(10), Some(7000), None));
        // No pool: every TAP made on demand.
        let (w, c, note) = tap_summary(&status("bridge", pool(0, Some(8000))), &[tap(false, 8000)]);
        assert_eq!((w, c), (None, Some(8000)));
        assert!(note.expect("note").contains("tap_pool_size is 0"));
        // User-mode networking has none.
        let (w, c, note) = tap_summary(&status("user", None), &[]);
        assert_eq!((w, c), (None, None));
        assert_eq!(note.as_deref(), Some("user networking has no TAPs"));
    }

    #[tokio::test]
    async fn dns_latency_checks_every_answer() {
        // banger's own `.vm` server, as the daemon runs it.
        let records = banger_net::DnsRecords::new();
        records.set("vm1", [172, 16, 0, 2].into()).expect("record");
        let server = banger_net::DnsServer::start(([127, 0, 0, 1], 0).into(), records)
            .await
            .expect("dns server");
        let addr = server.local_addr();
        let t = Duration::from_secs(2);
        let s = dns_latency(addr, "vm1", true, 50, t)
            .await
            .expect("answered");
        assert_eq!(s.queries, 50);
        assert!(s.p50 <= s.p99 && s.p99 <= s.max, "{s:?}");
        let s = dns_latency(addr, "nobody", false, 5, t).await.expect("nx");
        assert_eq!(s.queries, 5);
        let e = dns_latency(addr, "nobody", true, 5, t)
            .await
            .expect_err("an NXDOMAIN is not an answer");
        assert!(e.to_string().contains("Non-Existent Domain"), "{e:#}");
        let e = dns_latency(addr, "vm1", false, 5, t)
            .await
            .expect_err("an answer is not NXDOMAIN");
        assert!(e.to_string().contains("1 records"), "{e:#}");
        server.shutdown().await.expect("shutdown");
    }
}
