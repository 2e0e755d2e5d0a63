//! Routing `.vm` lookups on the host to banger's DNS server.
//!
//! On hosts with systemd-resolved, the bridge link gets banger's server as
//! its DNS server and `~vm` as a routing-only domain (`resolvectl`), so
//! `<name>.vm` resolves everywhere on the host and nothing else changes.
//! Elsewhere [`manual_recipe`] says what to configure (also in
//! `docs/dns-routing.md`).

use crate::dns::{self, DnsRecords};
use crate::ifname::IfName;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const RESOLVECTL: &str = "resolvectl";
const STUB_ADDR: &str = "127.0.0.53";

/// A resolved operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolvedError {
    #[error(
        "resolvectl not found: this host does not use systemd-resolved; route .vm by hand (docs/dns-routing.md)"
    )]
    Missing,
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// The `resolvectl` argument vectors that route `.vm` to `dns` through
/// `link`: its DNS server, the routing-only domain `~vm`, and no default
/// route (so no other name is ever sent to banger).
pub fn wire_commands(link: &IfName, dns: SocketAddr) -> Vec<Vec<String>> {
    let l = link.to_string();
    vec![
        vec![RESOLVECTL.into(), "dns".into(), l.clone(), dns.to_string()],
        vec![
            RESOLVECTL.into(),
            "domain".into(),
            l.clone(),
            format!("~{}", dns::ZONE),
        ],
        vec![RESOLVECTL.into(), "default-route".into(), l, "false".into()],
    ]
}

/// The `resolvectl` argument vector that drops banger's settings on `link`.
pub fn unwire_command(link: &IfName) -> Vec<String> {
    vec![RESOLVECTL.into(), "revert".into(), link.to_string()]
}

async fn run(argv: &[String]) -> Result<String, ResolvedError> {
    let command = argv.join(" ");
    let (prog, args) = argv.split_first().ok_or_else(|| ResolvedError::Failed {
        command: command.clone(),
        stderr: "empty command".into(),
    })?;
    let out = tokio::process::Command::new(prog)
        .args(args)
        .output()
        .await
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ResolvedError::Missing
            } else {
                ResolvedError::Io {
                    command: command.clone(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(ResolvedError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Routes `.vm` through `link` to `dns`. Idempotent. The link must exist;
/// resolved forgets the setting when the link is deleted, so call this
/// after every bridge (re)creation.
pub async fn wire(link: &IfName, dns: SocketAddr) -> Result<(), ResolvedError> {
    for argv in wire_commands(link, dns) {
        run(&argv).await?;
    }
    Ok(())
}

/// Removes banger's DNS settings from `link`.
pub async fn unwire(link: &IfName) -> Result<(), ResolvedError> {
    run(&unwire_command(link)).await.map(drop)
}

/// The values after `Link N (name):` in `resolvectl dns|domain LINK` output.
fn parse_link_values(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_once("):").map(|(_, v)| v))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// Whether the host routes `.vm` to banger, for `banger doctor`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoutingCheck {
    /// `resolvectl` is installed and resolved answers.
    pub resolved: bool,
    /// `/etc/resolv.conf` points at resolved's stub (127.0.0.53), so
    /// programs actually use resolved.
    pub stub_in_resolv_conf: bool,
    /// The bridge link carries banger's DNS server and `~vm`.
    pub link_wired: bool,
    /// One line for a human: what is wrong and what to do, or "ok".
    pub detail: String,
}

impl RoutingCheck {
    pub fn ok(&self) -> bool {
        self.resolved && self.stub_in_resolv_conf && self.link_wired
    }
}

fn resolv_conf_uses_stub(text: &str) -> bool {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .any(|ns| ns.trim() == STUB_ADDR)
}

/// Checks the resolved wiring of `link` for `dns`. Never fails: problems
/// are described in the result.
pub async fn check(link: &IfName, dns: SocketAddr) -> RoutingCheck {
    let stub = std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| resolv_conf_uses_stub(&t))
        .unwrap_or(false);
    let l = link.to_string();
    let servers = run(&[RESOLVECTL.into(), "dns".into(), l.clone()]).await;
    let domains = run(&[RESOLVECTL.into(), "domain".into(), l]).await;
    let (resolved, link_wired, detail) = match (servers, domains) {
        (Err(ResolvedError::Missing), _) | (_, Err(ResolvedError::Missing)) => (
            false,
            false,
            format!("systemd-resolved is not used here: {}", short_recipe(dns)),
        ),
        (Err(e), _) | (_, Err(e)) => (false, false, format!("{e}")),
        (Ok(s), Ok(d)) => {
            let wired = parse_link_values(&s).contains(&dns.to_string())
                && parse_link_values(&d).contains(&format!("~{}", dns::ZONE));
            let detail = if !wired {
                format!(
                    "{link} does not route .vm to {dns}: restart bangerd or run `resolvectl dns {link} {dns}; resolvectl domain {link} '~vm'`"
                )
            } else if !stub {
                "/etc/resolv.conf does not point at systemd-resolved (127.0.0.53): link it to /run/systemd/resolve/stub-resolv.conf".to_string()
            } else {
                "ok".to_string()
            };
            (true, wired, detail)
        }
    };
    RoutingCheck {
        resolved,
        stub_in_resolv_conf: stub,
        link_wired,
        detail,
    }
}

/// The outcome of [`probe`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ProbeResult {
    /// The host resolver answered the probe name with banger's record.
    Routed,
    /// The name did not resolve, or resolved elsewhere.
    NotRouted(String),
}

/// Asks the host's own resolver (getaddrinfo) for a throw-away name that
/// only banger's server knows, which proves end to end that `.vm` is
/// routed. The record is removed again before returning.
pub async fn probe(records: &DnsRecords, timeout: Duration) -> ProbeResult {
    let label = format!("banger-probe-{:08x}", rand::random::<u32>());
    // A loopback address nobody else would answer with.
    let expect = Ipv4Addr::new(127, 0, 0, 2 + rand::random::<u8>() % 200);
    if let Err(e) = records.set(&label, expect) {
        return ProbeResult::NotRouted(e.to_string());
    }
    let host = format!("{label}.{}:0", dns::ZONE);
    let got = tokio::time::timeout(timeout, tokio::net::lookup_host(host.clone())).await;
    records.remove(&label);
    match got {
        Err(_) => ProbeResult::NotRouted(format!("looking up {label}.vm timed out")),
        Ok(Err(e)) => ProbeResult::NotRouted(format!("{label}.vm: {e}")),
        Ok(Ok(addrs)) => {
            let addrs: Vec<_> = addrs.map(|a| a.ip()).collect();
            if addrs.contains(&std::net::IpAddr::V4(expect)) {
                ProbeResult::Routed
            } else {
                ProbeResult::NotRouted(format!("{label}.vm resolved to {addrs:?}, not via banger"))
            }
        }
    }
}

fn short_recipe(dns: SocketAddr) -> String {
    format!(
        "route .vm to {dns} in your resolver (dnsmasq: server=/vm/{}#{}), see docs/dns-routing.md",
        dns.ip(),
        dns.port()
    )
}

/// What to configure by hand on hosts without systemd-resolved (or to make
/// the routing permanent), for `dns` (normally 127.0.0.1:42069).
pub fn manual_recipe(dns: SocketAddr) -> String {
    let (ip, port) = (dns.ip(), dns.port());
    format!(
        "\
banger answers <name>.vm on {dns} (UDP and TCP). Send only the vm zone there:

systemd-resolved, permanent (does not depend on the bridge having carrier):
  /etc/systemd/resolved.conf.d/banger.conf:
    [Resolve]
    DNS={dns}
    Domains=~vm
  then: systemctl restart systemd-resolved

dnsmasq (also NetworkManager with dns=dnsmasq, file in /etc/NetworkManager/dnsmasq.d/):
  server=/vm/{ip}#{port}

unbound:
  server:
    do-not-query-localhost: no
    domain-insecure: \"vm\"
  stub-zone:
    name: \"vm\"
    stub-addr: {ip}@{port}

Check: dig @{ip} -p {port} NAME.vm   (banger's server directly)
       getent hosts NAME.vm          (through the host resolver)
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_vectors() {
        let link = IfName::new("banger0").expect("name");
        let cmds = wire_commands(&link, dns::DEFAULT_LISTEN);
        assert_eq!(
            cmds,
            vec![
                vec!["resolvectl", "dns", "banger0", "127.0.0.1:42069"],
                vec!["resolvectl", "domain", "banger0", "~vm"],
                vec!["resolvectl", "default-route", "banger0", "false"],
            ]
        );
        assert_eq!(
            unwire_command(&link),
            vec!["resolvectl", "revert", "banger0"]
        );
    }

    #[test]
    fn parses_resolvectl_output() {
        assert_eq!(
            parse_link_values("Link 5 (banger0): 127.0.0.1:42069\n"),
            vec!["127.0.0.1:42069"]
        );
        assert_eq!(
            parse_link_values("Link 5 (banger0): ~vm example.com\n"),
            vec!["~vm", "example.com"]
        );
        assert!(parse_link_values("Link 5 (banger0):\n").is_empty());
    }

    #[test]
    fn resolv_conf_stub() {
        assert!(resolv_conf_uses_stub(
            "# x\nnameserver 127.0.0.53\noptions edns0\n"
        ));
        assert!(!resolv_conf_uses_stub("nameserver 10.0.0.1\n"));
        assert!(!resolv_conf_uses_stub("# nameserver 127.0.0.53\n"));
    }

    #[test]
    fn recipe_names_the_address() {
        let r = manual_recipe(dns::DEFAULT_LISTEN);
        assert!(r.contains("server=/vm/127.0.0.1#42069"), "{r}");
        assert!(r.contains("stub-addr: 127.0.0.1@42069"), "{r}");
        assert!(r.contains("DNS=127.0.0.1:42069"), "{r}");
    }

    #[tokio::test]
    async fn wire_without_resolvectl_says_what_to_do() {
        if which("resolvectl") {
            return;
        }
        let link = IfName::new("banger0").expect("name");
        let e = wire(&link, dns::DEFAULT_LISTEN)
            .await
            .expect_err("no resolvectl");
        assert!(matches!(e, ResolvedError::Missing));
        assert!(e.to_string().contains("docs/dns-routing.md"));
        let c = check(&link, dns::DEFAULT_LISTEN).await;
        assert!(!c.ok());
        assert!(
            c.detail.contains("server=/vm/127.0.0.1#42069"),
            "{}",
            c.detail
        );
    }

    fn which(prog: &str) -> bool {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false)
    }
}
