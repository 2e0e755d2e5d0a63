//! VM networking in the daemon: the bridge and TAP pool, NAT, the `.vm`
//! DNS zone, and QEMU user-mode networking when the daemon may not manage
//! host links.
//!
//! Everything privileged goes through [`banger_net::HostNet`]. Addresses
//! are allocated from `cidr` at create and stored with the VM; the host
//! side (TAP or forwarded ssh port, NAT rules, DNS record) exists only
//! while the VM runs and is rebuilt from the store at daemon start.

use crate::steps::{Steps, UndoSlot};
use crate::{Daemon, DaemonError};
use anyhow::{Context, anyhow};
use banger_api::{NetworkBench, NetworkStatus, PortInfo};
use banger_config::{Config, InstallRecord, NetworkMode};
use banger_model::{VmRecord, VmState};
use banger_net::host::BridgeSpec;
use banger_net::nat::NatError;
use banger_net::{
    DnsRecords, DnsServer, GuestNet, HostNet, HostNetError, LocalHostNet, MacAddr, NetSettings,
    PoolConfig, Subnet, TapName, TapPool,
};
use banger_root_client::HelperClient;
use banger_vmm::{HostForward, NetBackend, NetSpec};
use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// QEMU user-mode network every user-mode VM gets (QEMU's defaults).
const USER_NET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
const USER_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const USER_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const USER_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// How VMs are networked, decided once at daemon start.
pub(crate) enum Mode {
    /// A TAP on the host bridge per VM.
    Bridge {
        host: Arc<dyn HostNet>,
        pool: Arc<TapPool>,
    },
    /// QEMU's user-mode stack with host port forwards on 127.0.0.1.
    User { reason: String },
    /// The bridge was required but could not be set up: boots fail with
    /// this reason.
    Unavailable { reason: String },
}

/// The daemon's networking state.
pub(crate) struct Network {
    pub(crate) settings: NetSettings,
    pub(crate) mode: Mode,
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
}

/// The network settings of `config` (the DNS address from the config too).
pub(crate) fn settings(config: &Config) -> anyhow::Result<NetSettings> {
    let mut s = NetSettings::from_config(config).context("network settings in config.toml")?;
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
        let mode = match config.network {
            NetworkMode::User => Mode::User {
                reason: "network = \"user\" in config.toml".into(),
            },
            NetworkMode::Auto if !has_net_admin() && host.is_none() => Mode::User {
                reason: "bangerd has no CAP_NET_ADMIN (not root) and no root helper (no system install): QEMU user-mode networking with ssh forwarded on 127.0.0.1".into(),
            },
            choice => match Self::bridge(&settings, vms, host).await {
                Ok((host, pool)) => Mode::Bridge {
                    host,
                    pool: Arc::new(pool),
                },
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
    ) -> anyhow::Result<(Arc<dyn HostNet>, TapPool)> {
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
        Ok((host, pool))
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

/// A free TCP port on 127.0.0.1 (QEMU binds it right after).
fn free_local_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// How long the agent has to list a VM's listening ports.
const PORTS_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    pub(crate) fn network(&self) -> Option<&Network> {
        self.network.get()
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
        Ok(())
    }

    /// A guest address for a new VM: the lowest free one of `cidr`.
    /// Precondition: the caller holds `alloc_lock` until the VM is stored.
    pub(crate) fn allocate_ip(&self) -> Result<Ipv4Addr, DaemonError> {
        let subnet: Subnet = match self.network() {
            Some(n) => n.settings.subnet,
            None => settings(&self.config)?.subnet,
        };
        let in_use = self.store.list_vms()?.into_iter().filter_map(|v| v.ip);
        subnet
            .allocate(in_use)
            .map_err(|e| DaemonError::Conflict(e.to_string()))
    }

    /// Brings up the host side of `vm`'s network for a boot, registering
    /// undos in `steps`. `None` when networking was never initialised
    /// (a daemon not started through `serve`).
    pub(crate) async fn net_up(
        &self,
        vm: &mut VmRecord,
        steps: &mut Steps<'_>,
    ) -> anyhow::Result<Option<BootNet>> {
        let Some(net) = self.network() else {
            return Ok(None);
        };
        let settings = &net.settings;
        match &net.mode {
            Mode::Unavailable { reason } => Err(anyhow!("{reason}")),
            Mode::User { .. } => {
                let port = free_local_port()?;
                self.store.set_vm_net(&vm.id, None, Some(port))?;
                vm.ssh_port = Some(port);
                let mut guest = GuestNet {
                    ip: USER_GUEST,
                    gateway: USER_HOST,
                    netmask: Ipv4Addr::new(255, 255, 255, 0),
                    prefix: 24,
                    mac: MacAddr::from_ip(USER_GUEST),
                    dns: vec![settings.default_dns.unwrap_or(USER_DNS)],
                };
                guest.dns.dedup();
                Ok(Some(BootNet {
                    nets: vec![NetSpec {
                        backend: NetBackend::User {
                            net: USER_NET,
                            prefix: 24,
                            host: USER_HOST,
                            dns: USER_DNS,
                            guest: USER_GUEST,
                            forwards: vec![HostForward {
                                host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                                guest_port: 22,
                            }],
                        },
                        mac: guest.mac.to_string(),
                    }],
                    cmdline: guest_cmdline(&guest),
                    guest,
                }))
            }
            Mode::Bridge { host, pool } => {
                let ip = vm.ip.ok_or_else(|| {
                    anyhow!(
                        "VM {} has no address (made before networking existed): recreate it",
                        vm.name
                    )
                })?;
                let mut guest = GuestNet::new(&settings.subnet, ip, settings.default_dns);
                if guest.dns.is_empty() {
                    // Without default_dns the guest would keep whatever
                    // resolv.conf its image was built with.
                    guest.dns = banger_net::guest::host_upstream_resolvers();
                }
                let (store, id, pool) = (self.store.clone(), vm.id.clone(), pool.clone());
                let tap = steps
                    .run(
                        "tap",
                        "attaching a TAP device",
                        |u: UndoSlot<'_>| async move {
                            let tap = pool.acquire().await?;
                            let name = tap.name.clone();
                            u.set(move || async move {
                                store.set_vm_net(&id, None, None)?;
                                pool.release(&name).await.map_err(Into::into)
                            });
                            Ok(tap)
                        },
                    )
                    .await?;
                self.store
                    .set_vm_net(&vm.id, Some(tap.name.as_str()), None)?;
                vm.tap = Some(tap.name.to_string());
                if vm.nat {
                    let (subnet, host) = (settings.subnet, host.clone());
                    steps
                        .run("nat", "enabling NAT", |u: UndoSlot<'_>| async move {
                            host.nat_enable(&subnet, ip).await?;
                            u.set(move || async move {
                                host.nat_disable(&subnet, ip).await.map_err(Into::into)
                            });
                            Ok(())
                        })
                        .await?;
                }
                Ok(Some(BootNet {
                    nets: vec![NetSpec::tap(tap.name.as_str(), guest.mac.to_string())],
                    cmdline: guest_cmdline(&guest),
                    guest,
                }))
            }
        }
    }

    /// Publishes a VM that just became ready (its `.vm` record).
    pub(crate) fn net_ready(&self, vm: &VmRecord) {
        if let Some(net) = self.network()
            && let Mode::Bridge { .. } = net.mode
            && let Some(ip) = vm.ip
            && let Err(e) = net.records.set(vm.name.as_str(), ip)
        {
            tracing::warn!(vm = %vm.name, error = %e, "no DNS record");
        }
    }

    /// Removes the host side of a stopped (or deleted) VM's network: DNS
    /// record, NAT rules, TAP. Idempotent; problems are logged, not
    /// returned, so stopping never fails on them.
    pub(crate) async fn net_down(&self, vm: &VmRecord) {
        if let Some(net) = self.network() {
            net.records.remove(vm.name.as_str());
            if let Mode::Bridge { host, pool } = &net.mode {
                if vm.nat
                    && let Some(ip) = vm.ip
                    && let Err(e) = host.nat_disable(&net.settings.subnet, ip).await
                {
                    tracing::warn!(vm = %vm.name, error = %e, "removing NAT rules");
                }
                if let Some(tap) = vm.tap.as_deref().and_then(|t| TapName::new(t).ok())
                    && let Err(e) = pool.release(&tap).await
                {
                    tracing::warn!(vm = %vm.name, %tap, error = %e, "deleting the TAP");
                }
            }
        }
        if (vm.tap.is_some() || vm.ssh_port.is_some())
            && let Err(e) = self.store.set_vm_net(&vm.id, None, None)
        {
            tracing::debug!(vm = %vm.name, error = %e, "clearing network fields");
        }
    }

    /// Turns NAT on or off for a VM; on a running VM the rules change at
    /// once.
    pub async fn set_vm_nat(self: &Arc<Self>, r: &str, nat: bool) -> Result<VmRecord, DaemonError> {
        let mut cx = self.lock_vm(r).await?;
        let vm = &mut cx.vm;
        if vm.nat == nat {
            return Ok(vm.clone());
        }
        if vm.state == VmState::Running
            && let Some(net) = self.network()
        {
            match (&net.mode, vm.ip) {
                (Mode::Bridge { host, .. }, Some(ip)) => {
                    let subnet = &net.settings.subnet;
                    let r = if nat {
                        host.nat_enable(subnet, ip).await
                    } else {
                        host.nat_disable(subnet, ip).await
                    };
                    r.with_context(|| format!("changing NAT of {}", vm.name))?;
                }
                (Mode::Bridge { .. }, None) => {}
                _ if nat => {
                    return Err(DaemonError::Conflict(format!(
                        "NAT needs bridge networking; this daemon uses {} networking (see banger doctor)",
                        net.mode_name()
                    )));
                }
                _ => {}
            }
        }
        self.store.set_vm_nat(&vm.id, nat)?;
        vm.nat = nat;
        tracing::info!(vm = %vm.name, nat, "NAT changed");
        Ok(vm.clone())
    }

    /// Listening ports of a running VM, probed from the host.
    ///
    /// The agent walks the guest's /proc for the listeners' processes; right
    /// after boot (ready at init) that competes with the image's init for an
    /// emulated CPU, hence [`PORTS_TIMEOUT`].
    pub async fn vm_ports(self: &Arc<Self>, r: &str) -> Result<Vec<PortInfo>, DaemonError> {
        let (vm, agent) = self.running_agent(r)?;
        let listeners = tokio::time::timeout(PORTS_TIMEOUT, agent.list_listeners())
            .await
            .map_err(|_| {
                anyhow!(
                    "the agent of {} did not list its ports within {}s",
                    vm.name,
                    PORTS_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| anyhow!("listing ports of {}: {e}", vm.name))?;
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

    /// Networking facts for `doctor`.
    pub async fn network_status(&self) -> Result<NetworkStatus, DaemonError> {
        let (tun_ok, tun_detail) = tun_access();
        let nat = banger_net::nat::status().await;
        let Some(net) = self.network() else {
            return Err(DaemonError::Conflict(
                "networking is not initialised yet".into(),
            ));
        };
        let s = &net.settings;
        let (reason, tap_pool) = match &net.mode {
            Mode::Bridge { pool, .. } => (
                format!("bangerd manages bridge {}", s.bridge),
                Some(banger_api::TapPool {
                    idle: pool.idle_count() as u64,
                    configured: pool.size() as u64,
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
        Ok(NetworkStatus {
            mode: net.mode_name().into(),
            reason,
            bridge: s.bridge.to_string(),
            cidr: s.subnet.cidr().to_string(),
            bridge_ip: s.subnet.bridge_ip().to_string(),
            tap_pool,
            dns_listen: s.dns_listen.to_string(),
            dns_error: net.dns_error.clone(),
            nft_version: nat.nft_version,
            ip_forward: nat.ip_forward,
            nat_error: nat.error,
            resolver_ok,
            resolver_detail,
            tun_ok,
            tun_detail,
        })
    }

    /// TAP acquisition warm vs cold and `.vm` query latency.
    pub async fn network_bench(&self) -> Result<NetworkBench, DaemonError> {
        let net = self
            .network()
            .ok_or_else(|| DaemonError::Conflict("networking is not initialised yet".into()))?;
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

/// Kernel parameters for the guest side: `ip=` and `banger.dns=`.
fn guest_cmdline(g: &GuestNet) -> String {
    let mut s = g.kernel_ip_arg();
    if !g.dns.is_empty() {
        let list: Vec<String> = g.dns.iter().map(ToString::to_string).collect();
        s.push_str(&format!(
            " {}={}",
            banger_agent_proto::boot::DNS_PARAM,
            list.join(",")
        ));
    }
    s
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// `http` or `https` when the service at `addr` speaks it.
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

    #[test]
    fn guest_cmdline_carries_address_and_resolver() {
        let subnet = Subnet::new(
            "172.16.0.0/24".parse().expect("cidr"),
            Ipv4Addr::new(172, 16, 0, 1),
        )
        .expect("subnet");
        let g = GuestNet::new(
            &subnet,
            Ipv4Addr::new(172, 16, 0, 5),
            Some(Ipv4Addr::new(9, 9, 9, 9)),
        );
        let line = guest_cmdline(&g);
        assert_eq!(
            line,
            "ip=172.16.0.5::172.16.0.1:255.255.255.0::eth0:off:9.9.9.9 banger.dns=9.9.9.9"
        );
        let parsed = banger_agent_proto::boot::NetArgs::parse(&line);
        assert_eq!(
            parsed.ip.map(|i| i.addr),
            Some(Ipv4Addr::new(172, 16, 0, 5))
        );
        assert_eq!(parsed.dns, [Ipv4Addr::new(9, 9, 9, 9)]);
    }
}
