//! VM networking in the daemon: the bridge and TAP pool, NAT, the `.vm`
//! DNS zone, and QEMU user-mode networking when the daemon may not manage
//! host links.
//!
//! Everything privileged goes through [`banger_net::HostNet`]. Addresses
//! are allocated from `cidr` at create and stored with the VM; the host
//! side (TAP or forwarded ssh port, NAT rules, DNS record) exists only
//! while the VM runs and is rebuilt from the store at daemon start.

mod error;
mod firewall;
mod ports;
mod status;
mod vm;

pub use error::NetError;
pub(crate) use firewall::Firewall;
pub(crate) use vm::{GuardPending, NetLease};

use crate::Daemon;
use anyhow::Context;
use banger_config::{Config, InstallRecord, NetworkMode};
use banger_model::{VmRecord, VmState};
use banger_net::host::BridgeSpec;
use banger_net::nat::NatError;
use banger_net::{
    DnsRecords, DnsServer, GuestNet, HostNet, HostNetError, LocalHostNet, NetSettings, PoolConfig,
    TapName, TapPool, guard,
};
use banger_root_client::HelperClient;
use banger_vmm::NetSpec;
use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// QEMU user-mode network every user-mode VM gets (QEMU's defaults).
const USER_NET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
const USER_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const USER_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const USER_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// How long a daemon stop waits for its TAP deletions.
const NET_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How VMs are networked, decided once at daemon start.
pub(crate) enum Mode {
    /// A TAP on the host bridge per VM.
    Bridge {
        host: Arc<dyn HostNet>,
        pool: Arc<TapPool>,
        /// The nftables changes, and what they must hold.
        firewall: Arc<Firewall>,
    },
    /// QEMU's user-mode stack with host port forwards on 127.0.0.1.
    User { reason: String },
    /// The bridge was required but could not be set up: boots fail with
    /// this reason.
    Unavailable { reason: String },
}

/// Whether the bridge checks that each guest sends only as its own
/// address ([`banger_net::guard`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Guard {
    On,
    /// Not in place, and why (user-mode networking needs none).
    Off(String),
}

impl Guard {
    pub(crate) fn is_on(&self) -> bool {
        *self == Guard::On
    }
}

/// The daemon's networking state.
pub(crate) struct Network {
    pub(crate) settings: NetSettings,
    pub(crate) mode: Mode,
    pub(crate) guard: Guard,
    pub(crate) records: DnsRecords,
    dns: Option<DnsServer>,
    dns_error: Option<String>,
}

/// What one boot needs on the host for its network, decided before launch.
pub(crate) struct BootNet {
    pub(crate) nets: Vec<NetSpec>,
    /// The guest side: what `cmdline` says, for a restore to apply live.
    pub(crate) guest: GuestNet,
    /// Kernel parameters configuring the guest side.
    pub(crate) cmdline: String,
    /// How its TAP was got (bridge networking).
    pub(crate) tap: Option<banger_api::TapAcquisition>,
    /// Its address checks, being added; waited for before the guest is
    /// reached.
    pub(crate) guard: Option<GuardPending>,
}

/// The network settings of `config` (the DNS address from the config too).
pub(crate) fn settings(config: &Config) -> Result<NetSettings, NetError> {
    let mut s = NetSettings::from_config(config).map_err(NetError::Settings)?;
    s.dns_listen = config.dns_listen_addr;
    Ok(s)
}

/// Whether this process holds CAP_NET_ADMIN in its user namespace.
pub(crate) fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The root helper of the system install this daemon belongs to: only
/// when an install record names this process's uid as the owner and the
/// helper answers with this build's protocol. Problems are logged and mean
/// "no helper".
pub(crate) async fn system_helper() -> Option<HelperClient> {
    let record = match InstallRecord::load_system() {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "install record unreadable: not using the root helper");
            return None;
        }
    };
    if record.owner_uid != nix::unistd::geteuid().as_raw() {
        return None;
    }
    let client = HelperClient::new(&record.paths.helper_socket);
    match client.hello().await {
        Ok(info) => {
            tracing::info!(socket = %client.socket().display(), helper = %info.build.line("bangerd-root"), "using the root helper");
            Some(client)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the root helper does not answer");
            None
        }
    }
}

/// Whether this process shares PID 1's network namespace. An unprivileged
/// daemon (the system install's, whose helper runs in the host namespace)
/// cannot look at PID 1's namespace and is taken to share it.
fn in_host_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata("/proc/self/ns/net"),
        std::fs::metadata("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        (Ok(_), Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => true,
        _ => false,
    }
}

/// Whether `/dev/net/tun` can be opened, with the reason when not.
fn tun_access() -> (bool, String) {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => (true, "/dev/net/tun opens read-write".into()),
        Err(e) => (
            false,
            format!("/dev/net/tun: {e} (modprobe tun; the daemon needs read-write access)"),
        ),
    }
}

fn running(vm: &VmRecord) -> bool {
    matches!(
        vm.state,
        VmState::Running | VmState::Starting | VmState::Error
    ) && vm.pid.is_some()
}

impl Network {
    /// Sets up networking for the VMs in `vms` (the store after reconcile):
    /// the bridge, NAT for running NAT VMs, the TAP pool (keeping running
    /// VMs' TAPs), the DNS server with their records, and resolved routing.
    ///
    /// Privileged steps are done by this process when it holds
    /// CAP_NET_ADMIN, else by the root helper of a system install (`helper`).
    pub(crate) async fn start(
        config: &Config,
        vms: &[VmRecord],
        helper: Option<HelperClient>,
    ) -> anyhow::Result<Self> {
        let settings = settings(config)?;
        let records = DnsRecords::new();
        let host: Option<Arc<dyn HostNet>> = if has_net_admin() {
            None
        } else {
            helper.map(|h| Arc::new(h) as Arc<dyn HostNet>)
        };
        let mut guard = Guard::Off("not bridge networking".into());
        let mode = match config.network {
            NetworkMode::User => Mode::User {
                reason: "network = \"user\" in config.toml".into(),
            },
            NetworkMode::Auto if !has_net_admin() && host.is_none() => Mode::User {
                reason: "bangerd has no CAP_NET_ADMIN (not root) and no root helper (no system install): QEMU user-mode networking with ssh forwarded on 127.0.0.1".into(),
            },
            choice => match Self::bridge(&settings, vms, host).await {
                Ok((host, pool, g, firewall)) => {
                    guard = g;
                    Mode::Bridge {
                        host,
                        pool: Arc::new(pool),
                        firewall: Arc::new(firewall),
                    }
                }
                Err(e) if choice == NetworkMode::Auto => {
                    let reason = format!("setting up bridge {} failed: {e:#}", settings.bridge);
                    tracing::warn!(%reason, "falling back to user-mode networking");
                    Mode::User { reason }
                }
                Err(e) => Mode::Unavailable {
                    reason: format!(
                        "network = \"bridge\" but bridge {} could not be set up: {e:#}",
                        settings.bridge
                    ),
                },
            },
        };
        if let Mode::Bridge { .. } = mode {
            for vm in vms.iter().filter(|v| v.state == VmState::Running) {
                if let Some(ip) = vm.ip
                    && let Err(e) = records.set(vm.name.as_str(), ip)
                {
                    tracing::warn!(vm = %vm.name, error = %e, "no DNS record");
                }
            }
        }
        let (dns, dns_error) = match DnsServer::start(settings.dns_listen, records.clone()).await {
            Ok(s) => (Some(s), None),
            Err(e) => {
                let msg = format!("{e}");
                tracing::warn!(error = %msg, "the .vm DNS server is not running");
                (None, Some(msg))
            }
        };
        // resolved runs in the host's namespace and takes links by index:
        // from another namespace the index would name some other link.
        if let (Mode::Bridge { host, .. }, Some(dns)) = (&mode, &dns) {
            if !in_host_netns() {
                tracing::info!(
                    "not in the host's network namespace: leaving the host resolver alone"
                );
            } else if let Err(e) = host.resolved_wire(&settings.bridge, dns.local_addr()).await {
                tracing::info!(error = %e, "host resolver not wired for .vm (see banger doctor)");
            }
        }
        match &mode {
            Mode::Bridge { .. } => {
                tracing::info!(bridge = %settings.bridge, cidr = %settings.subnet.cidr(), "bridge networking")
            }
            Mode::User { reason } => tracing::info!(%reason, "user-mode networking"),
            Mode::Unavailable { reason } => tracing::error!(%reason, "no networking"),
        }
        Ok(Self {
            settings,
            mode,
            guard,
            records,
            dns,
            dns_error,
        })
    }

    /// Sets up the bridge through `host` (the root helper), or directly
    /// when `None`.
    async fn bridge(
        settings: &NetSettings,
        vms: &[VmRecord],
        host: Option<Arc<dyn HostNet>>,
    ) -> anyhow::Result<(Arc<dyn HostNet>, TapPool, Guard, Firewall)> {
        let host: Arc<dyn HostNet> = match host {
            Some(h) => h,
            None => Arc::new(LocalHostNet::connect()?),
        };
        check_cidr_free(settings).await?;
        host.ensure_bridge(&BridgeSpec {
            name: settings.bridge.clone(),
            subnet: settings.subnet,
        })
        .await?;
        let nat: BTreeSet<Ipv4Addr> = vms
            .iter()
            .filter(|v| v.nat && running(v))
            .filter_map(|v| v.ip)
            .collect();
        // Bridge networking needs no nft: without it there can be no rules
        // of an earlier run to clear, and only a VM that asks for NAT needs
        // it (its start then fails, saying so). Running NAT VMs lose NAT
        // until nft is installed; the bridge still works for everyone.
        match host.nat_rebuild(&settings.subnet, &nat).await {
            Ok(()) => {}
            Err(HostNetError::Nat(NatError::NftMissing)) if nat.is_empty() => {
                tracing::debug!("nft not installed; no NAT rules to rebuild");
            }
            Err(e @ HostNetError::Nat(NatError::NftMissing)) => {
                tracing::warn!(error = %e, vms = nat.len(), "NAT of running VMs not restored");
            }
            Err(e) => return Err(anyhow::Error::from(e).context("rebuilding NAT rules")),
        }
        // Before any TAP can carry a guest's frames: a TAP the checks do
        // not know passes nothing.
        let bindings: guard::Bindings = vms
            .iter()
            .filter(|v| running(v))
            .filter_map(|v| Some((TapName::new(v.tap.as_deref()?).ok()?, v.ip?)))
            .collect();
        let guard = match host.guard_rebuild(&settings.subnet, &bindings).await {
            Ok(()) => Guard::On,
            Err(e) => {
                // A host without nft (or without nftables' bridge family)
                // still gets bridge networking; doctor says what is missing.
                let reason = format!(
                    "the guests' address checks are not in place, so a guest can send as another VM's address: {e}"
                );
                tracing::error!(%reason, "bridge without address checks");
                Guard::Off(reason)
            }
        };
        let in_use: HashSet<TapName> = vms
            .iter()
            .filter(|v| running(v))
            .filter_map(|v| v.tap.as_deref())
            .filter_map(|t| TapName::new(t).ok())
            .collect();
        let pool = TapPool::start(
            host.clone(),
            PoolConfig {
                bridge: settings.bridge.clone(),
                owner_uid: nix::unistd::geteuid().as_raw(),
                size: settings.tap_pool_size,
            },
            &in_use,
        )
        .await
        .context("starting the TAP pool")?;
        let firewall = Firewall::new(host.clone(), settings.subnet, guard.is_on(), bindings, nat);
        Ok((host, pool, guard, firewall))
    }

    /// The address the DNS server listens on, when it runs.
    pub(crate) fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(DnsServer::local_addr)
    }

    pub(crate) fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Bridge { .. } => "bridge",
            Mode::User { .. } => "user",
            Mode::Unavailable { .. } => "unavailable",
        }
    }
}

impl Daemon {
    pub(crate) fn network(&self) -> Option<&Network> {
        self.network.get()
    }

    /// At daemon stop: deletes the TAP pool's idle TAPs and waits for the
    /// deletion of released ones (bounded by [`NET_STOP_WAIT`]), so a
    /// stopped daemon leaves only the TAPs of VMs that keep running.
    pub async fn stop_network(&self) {
        let Some(Mode::Bridge { pool, .. }) = self.network().map(|n| &n.mode) else {
            return;
        };
        match tokio::time::timeout(NET_STOP_WAIT, pool.shutdown()).await {
            Ok(Ok(())) => tracing::debug!("TAP pool stopped; idle TAPs deleted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "deleting the idle TAPs at stop"),
            Err(_) => tracing::warn!(
                waited = ?NET_STOP_WAIT,
                "the TAP pool's deletions did not end in time; the next start deletes what is left"
            ),
        }
    }

    /// Starts networking (see [`Network::start`]); once, after reconcile.
    pub async fn init_network(&self) -> anyhow::Result<()> {
        let vms = self.store.list_vms()?;
        let helper = if has_net_admin() {
            None
        } else {
            system_helper().await
        };
        let net = Network::start(&self.config, &vms, helper).await?;
        if self.network.set(net).is_err() {
            anyhow::bail!("networking is already initialised");
        }
        if let Some(Mode::Bridge { firewall, .. }) = self.network().map(|n| &n.mode) {
            firewall.clone().watch(self.shutdown.clone());
        }
        Ok(())
    }
}

/// Refuses a `cidr` that the host already uses (an address or a route on
/// another interface): guests would get addresses of the host's own
/// network, as a nested banger inside a banger guest with the default
/// `cidr` did. Reading addresses and routes needs no privilege.
pub(crate) async fn check_cidr_free(settings: &NetSettings) -> anyhow::Result<()> {
    let cidr = settings.subnet.cidr();
    let uses = banger_net::link::Netlink::connect()
        .context("opening netlink")?
        .cidr_uses(cidr, settings.bridge.as_str())
        .await?;
    if let Some(first) = uses.first() {
        anyhow::bail!(
            "cidr {cidr} overlaps {first} (the host's own network): set cidr in config.toml to a \
             range this host does not use, e.g. cidr = \"10.213.0.0/24\""
        );
    }
    Ok(())
}
