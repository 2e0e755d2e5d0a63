//! `vm ports`: a VM's listening ports, probed from the host.

use crate::Daemon;
use banger_api::PortInfo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// How long the agent has to list a VM's listening ports.
const PORTS_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Listening ports of a running VM, probed from the host.
    ///
    /// The agent walks the guest's /proc for the listeners' processes; right
    /// after boot (ready at init) that competes with the image's init for an
    /// emulated CPU, hence [`PORTS_TIMEOUT`].
    pub async fn vm_ports(self: &Arc<Self>, r: &str) -> Result<Vec<PortInfo>, NetError> {
        let (vm, agent) = self.running_agent(r)?;
        let listeners = tokio::time::timeout(PORTS_TIMEOUT, agent.list_listeners())
            .await
            .map_err(|_| NetError::PortsTimeout {
                name: vm.name.clone(),
                secs: PORTS_TIMEOUT.as_secs(),
            })?
            .map_err(|cause| NetError::Ports {
                name: vm.name.clone(),
                cause,
            })?;
        let target = match self.network().map(|n| &n.mode) {
            Some(Mode::Bridge { .. }) => vm.ip,
            _ => None,
        };
        let name = vm.name.to_string();
        let unprobed = |l: banger_agent_proto::Listener| PortInfo {
            addr: l.addr,
            port: l.port,
            pid: l.pid,
            command: l.command,
            protocol: None,
            url: None,
            note: Some(format!(
                "not probed: only the first {MAX_PROBED} listening ports are"
            )),
        };
        let probe_one = |l: banger_agent_proto::Listener| {
            let name = name.clone();
            async move {
                let mut info = PortInfo {
                    addr: l.addr.clone(),
                    port: l.port,
                    pid: l.pid,
                    command: l.command,
                    protocol: None,
                    url: None,
                    note: None,
                };
                let local_only = l
                    .addr
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
                match target {
                    _ if local_only => info.note = Some("listens on loopback only".into()),
                    None => {
                        info.note =
                            Some("not reachable from the host (user-mode networking)".into())
                    }
                    Some(ip) => {
                        let addr = SocketAddr::from((ip, l.port));
                        if let Some(proto) = probe(addr, &name).await {
                            info.url = Some(format!("{proto}://{name}.vm:{}/", l.port));
                            info.protocol = Some(proto.into());
                        }
                    }
                }
                info
            }
        };
        Ok(bounded_probes(listeners, probe_one, unprobed).await)
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Most listening ports one `vm ports` probes: the guest says how many
/// there are, and each probe costs the host two connections.
const MAX_PROBED: usize = 64;

/// Most probes in flight at once.
const PROBES_AT_ONCE: usize = 8;

/// `probe` of the first [`MAX_PROBED`] `items`, [`PROBES_AT_ONCE`] at a
/// time, and `skip` of the rest; results in the order of `items`.
async fn bounded_probes<T, R, F, Fut>(items: Vec<T>, probe: F, skip: impl Fn(T) -> R) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    use futures::StreamExt;
    let mut items = items;
    let rest = items.split_off(items.len().min(MAX_PROBED));
    let mut out: Vec<R> = futures::stream::iter(items.into_iter().map(probe))
        .buffered(PROBES_AT_ONCE)
        .collect()
        .await;
    out.extend(rest.into_iter().map(skip));
    out
}

/// `http` or `https` when the service at `addr` speaks it.
async fn probe(addr: SocketAddr, name: &str) -> Option<&'static str> {
    let head = format!("HEAD / HTTP/1.0\r\nHost: {name}.vm\r\n\r\n");
    if let Some(reply) = exchange(addr, head.as_bytes()).await
        && reply.starts_with(b"HTTP/")
    {
        return Some("http");
    }
    // Any TLS record back (a handshake or an alert) means TLS is spoken.
    match exchange(addr, &client_hello(name)).await {
        Some(r) if r.len() >= 2 && (r[0] == 0x16 || r[0] == 0x15) && r[1] == 0x03 => Some("https"),
        _ => None,
    }
}

/// Connects, sends `request` and returns the first bytes of the answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(request).await.ok()?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        buf.truncate(n);
        Some(buf)
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .ok()
        .flatten()
}

/// A minimal TLS 1.2 ClientHello with SNI `<name>.vm`.
fn client_hello(name: &str) -> Vec<u8> {
    let host = format!("{name}.vm");
    let mut ext = Vec::new();
    // server_name
    let sni_len = host.len() as u16;
    ext.extend_from_slice(&[0x00, 0x00]);
    ext.extend_from_slice(&(sni_len + 5).to_be_bytes());
    ext.extend_from_slice(&(sni_len + 3).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&sni_len.to_be_bytes());
    ext.extend_from_slice(host.as_bytes());
    // supported_groups: x25519, secp256r1
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    let suites: &[u8] = &[0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x2c, 0xc0, 0x30, 0x00, 0x9c];
    let mut body = vec![0x03, 0x03];
    body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    body.push(0); // session id
    body.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    body.extend_from_slice(suites);
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_probes_are_capped_and_few_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (now, most, calls) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let (now, most, calls) = (&now, &most, &calls);
        let items: Vec<usize> = (0..30_000).collect();
        let out = bounded_probes(
            items,
            |i| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                now.fetch_sub(1, Ordering::SeqCst);
                (i, true)
            },
            |i| (i, false),
        )
        .await;
        assert_eq!(out.len(), 30_000);
        assert!(
            out.iter().enumerate().all(|(i, (j, _))| i == *j),
            "order kept"
        );
        assert_eq!(out.iter().filter(|(_, probed)| *probed).count(), MAX_PROBED);
        assert_eq!(calls.load(Ordering::SeqCst), MAX_PROBED);
        let most = most.load(Ordering::SeqCst);
        assert!((1..=PROBES_AT_ONCE).contains(&most), "{most} at once");
    }

    #[tokio::test]
    async fn probe_tells_http_from_other_services() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http_addr = http.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = http.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            }
        });
        assert_eq!(probe(http_addr, "box").await, Some("http"));

        // A server that greets first with something else (like sshd).
        let ssh = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ssh_addr = ssh.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = ssh.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
            }
        });
        assert_eq!(probe(ssh_addr, "box").await, None);

        // A TLS server answering the hello with an alert.
        let tls = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tls_addr = tls.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tls.accept().await {
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf).await
                    && n > 5
                    && buf[0] == 0x16
                {
                    let _ = s
                        .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                        .await;
                }
            }
        });
        assert_eq!(probe(tls_addr, "box").await, Some("https"));
    }

    #[test]
    fn client_hello_lengths_add_up() {
        let h = client_hello("calm-otter");
        assert_eq!(&h[..3], &[0x16, 0x03, 0x01]);
        let rec_len = u16::from_be_bytes([h[3], h[4]]) as usize;
        assert_eq!(rec_len, h.len() - 5);
        let hs_len = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
        assert_eq!(hs_len, h.len() - 9);
    }
}
