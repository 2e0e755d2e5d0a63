//! A VM's network: its address, the host side while it runs (its
//! [`NetLease`]), and NAT.

use crate::Daemon;
use crate::steps::{Steps, UndoSlot};
use crate::vm::SetError;
use banger_model::{VmName, VmRecord, VmState};
use banger_net::{GuestNet, MacAddr, Subnet, TapName};
use banger_vmm::{HostForward, NetBackend, NetSpec};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use super::*;

/// What a VM holds of the host's network while it runs: what `net_up` and
/// `net_ready` set up, so that `net_down` undoes exactly that. It lives in
/// the VM's handle. A VM re-adopted after a daemon restart has none:
/// `net_down` then goes by its record, which `net_up` keeps up to date for
/// that reason (and `Network::start` rebuilds NAT and the TAP pool from it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NetLease {
    /// Its TAP on the bridge, back to the pool at the end.
    pub(crate) tap: Option<TapName>,
    /// The guest address whose NAT rules are on.
    pub(crate) nat: Option<Ipv4Addr>,
    /// The address its TAP may send as (the bridge's address checks).
    pub(crate) guard: Option<Ipv4Addr>,
    /// Its ssh forward on 127.0.0.1 (user-mode networking).
    pub(crate) ssh_port: Option<u16>,
    /// The name its `.vm` record is published under (once ready).
    pub(crate) dns: Option<VmName>,
}

impl NetLease {
    /// What `vm`'s record says it holds: for a VM this daemon did not bring
    /// up (re-adopted, or reconciled before networking starts).
    pub(crate) fn from_record(vm: &VmRecord) -> Self {
        Self {
            tap: vm.tap.as_deref().and_then(|t| TapName::new(t).ok()),
            nat: vm.ip.filter(|_| vm.nat),
            guard: vm.ip.filter(|_| vm.tap.is_some()),
            ssh_port: vm.ssh_port,
            dns: Some(vm.name.clone()),
        }
    }
}

/// The guest's address checks being added ([`Daemon::net_up`]): the boot
/// waits for them before it reaches the guest.
pub(crate) struct GuardPending(tokio::task::JoinHandle<Result<(), banger_net::HostNetError>>);

impl GuardPending {
    /// Waits until the checks are in place.
    pub(crate) async fn wait(self) -> Result<(), NetError> {
        match self.0.await {
            Ok(r) => r.map_err(NetError::Guard),
            Err(e) => Err(NetError::Guard(banger_net::HostNetError::Helper(format!(
                "the address checks' task failed: {e}"
            )))),
        }
    }
}

/// A free TCP port on 127.0.0.1 (QEMU binds it right after).
fn free_local_port() -> Result<u16, NetError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(NetError::LocalPort)
}

impl Daemon {
    /// A guest address for a new VM: the lowest free one of `cidr`.
    /// Precondition: the caller holds `alloc_lock` until the VM is stored.
    pub(crate) fn allocate_ip(&self) -> Result<Ipv4Addr, NetError> {
        let subnet: Subnet = match self.network() {
            Some(n) => n.settings.subnet,
            None => settings(&self.config)?.subnet,
        };
        let in_use = self.store.list_vms()?.into_iter().filter_map(|v| v.ip);
        subnet.allocate(in_use).map_err(NetError::NoFreeAddress)
    }

    /// Brings up the host side of `vm`'s network for a boot, registering
    /// undos in `steps`, and records it as the VM's [`NetLease`] (the undos
    /// take it back). `None` when networking was never initialised (a
    /// daemon not started through `serve`).
    /// Precondition: the caller holds the VM's operation lock.
    pub(crate) async fn net_up(
        &self,
        vm: &mut VmRecord,
        steps: &mut Steps<'_>,
    ) -> Result<Option<BootNet>, NetError> {
        let Some(net) = self.network() else {
            return Ok(None);
        };
        let settings = &net.settings;
        let handle = self.vms.handle(&vm.id);
        let lease = |lease: NetLease| {
            if let Some(old) = handle.set_net(lease)
                && (old.tap.is_some() || old.nat.is_some())
            {
                tracing::warn!(vm = %vm.name, ?old, "a network lease was still held at boot");
            }
        };
        match &net.mode {
            Mode::Unavailable { reason } => Err(NetError::Unavailable(reason.clone())),
            Mode::User { .. } => {
                let port = free_local_port()?;
                self.store.set_vm_net(&vm.id, None, Some(port))?;
                vm.ssh_port = Some(port);
                lease(NetLease {
                    ssh_port: Some(port),
                    ..NetLease::default()
                });
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
                    tap: None,
                    guard: None,
                }))
            }
            Mode::Bridge { pool, firewall, .. } => {
                let ip = vm.ip.ok_or_else(|| NetError::NoAddress {
                    name: vm.name.clone(),
                })?;
                let mut guest = GuestNet::new(&settings.subnet, ip, settings.default_dns);
                if guest.dns.is_empty() {
                    // Without default_dns the guest would keep whatever
                    // resolv.conf its image was built with.
                    guest.dns = banger_net::guest::host_upstream_resolvers();
                }
                let (store, id, pool, h) = (
                    self.store.clone(),
                    vm.id.clone(),
                    pool.clone(),
                    handle.clone(),
                );
                let tap = steps
                    .run(
                        "tap",
                        "attaching a TAP device",
                        |u: UndoSlot<'_>| async move {
                            let tap = pool.acquire().await?;
                            let name = tap.name.clone();
                            u.set(move || async move {
                                h.take_net();
                                store.set_vm_net(&id, None, None)?;
                                pool.release(&name);
                                Ok(())
                            });
                            Ok(tap)
                        },
                    )
                    .await?;
                self.store
                    .set_vm_net(&vm.id, Some(tap.name.as_str()), None)?;
                vm.tap = Some(tap.name.to_string());
                // The checks are added while the VMM starts (a guest's
                // frames are dropped until they are; the boot waits for
                // them before the guest is reached: `GuardPending`).
                let guard = if net.guard.is_on() {
                    let (firewall, h, name) = (firewall.clone(), handle.clone(), tap.name.clone());
                    let pending = steps
                        .run(
                            "guard",
                            "letting the guest send as its own address only",
                            |u: UndoSlot<'_>| async move {
                                // A forget waits for the allow it undoes.
                                let order = Arc::new(tokio::sync::Mutex::new(()));
                                let held = order.clone().lock_owned().await;
                                let (firewall2, name2) = (firewall.clone(), name.clone());
                                let task = tokio::spawn(async move {
                                    let _held = held;
                                    firewall2.allow(&name2, ip).await
                                });
                                u.set(move || async move {
                                    h.update_net(|l| l.guard = None);
                                    let _after = order.lock().await;
                                    firewall.forget(&name, ip).await.map_err(Into::into)
                                });
                                Ok(GuardPending(task))
                            },
                        )
                        .await?;
                    Some(pending)
                } else {
                    None
                };
                if vm.nat {
                    let (firewall, h) = (firewall.clone(), handle.clone());
                    steps
                        .run("nat", "enabling NAT", |u: UndoSlot<'_>| async move {
                            firewall.nat(ip, true).await?;
                            u.set(move || async move {
                                h.update_net(|l| l.nat = None);
                                firewall.nat(ip, false).await.map_err(Into::into)
                            });
                            Ok(())
                        })
                        .await?;
                }
                lease(NetLease {
                    tap: Some(tap.name.clone()),
                    nat: vm.nat.then_some(ip),
                    guard: net.guard.is_on().then_some(ip),
                    ..NetLease::default()
                });
                Ok(Some(BootNet {
                    nets: vec![NetSpec::tap(tap.name.as_str(), guest.mac.to_string())],
                    cmdline: guest_cmdline(&guest),
                    guest,
                    tap: Some(banger_api::TapAcquisition {
                        from_pool: tap.warm,
                        took_us: u64::try_from(tap.took.as_micros()).unwrap_or(u64::MAX),
                    }),
                    guard,
                }))
            }
        }
    }

    /// Publishes a VM that just became ready (its `.vm` record), in its
    /// lease.
    pub(crate) fn net_ready(&self, vm: &VmRecord) {
        if let Some(net) = self.network()
            && let Mode::Bridge { .. } = net.mode
            && let Some(ip) = vm.ip
        {
            match net.records.set(vm.name.as_str(), ip) {
                Ok(()) => {
                    let named = self
                        .vms
                        .handle(&vm.id)
                        .update_net(|l| l.dns = Some(vm.name.clone()));
                    if !named {
                        // net_up made one; without it net_down goes by the
                        // record, which names this record too.
                        tracing::warn!(vm = %vm.name, "DNS record of a VM without a network lease");
                    }
                }
                Err(e) => tracing::warn!(vm = %vm.name, error = %e, "no DNS record"),
            }
        }
    }

    /// Removes the host side of a stopped (or deleted) VM's network: what
    /// its lease holds, or what its record says when it has none (a VM
    /// re-adopted after a daemon restart): DNS record, NAT rules, TAP.
    /// Idempotent; problems are logged, not returned, so stopping never
    /// fails on them.
    pub(crate) async fn net_down(&self, vm: &VmRecord) {
        let lease = self
            .vms
            .existing(&vm.id)
            .and_then(|h| h.take_net())
            .unwrap_or_else(|| NetLease::from_record(vm));
        if let Some(net) = self.network() {
            if let Some(name) = &lease.dns {
                net.records.remove(name.as_str());
            }
            if let Mode::Bridge { pool, firewall, .. } = &net.mode {
                if let Some(ip) = lease.nat
                    && let Err(e) = firewall.nat(ip, false).await
                {
                    tracing::warn!(vm = %vm.name, error = %e, "removing NAT rules");
                }
                // After the answer, like the TAP's deletion (which follows
                // it): nothing can use the checks of a TAP that goes.
                match (&lease.tap, lease.guard) {
                    (Some(tap), Some(ip)) if net.guard.is_on() => {
                        let (firewall, t, name) = (firewall.clone(), tap.clone(), vm.name.clone());
                        pool.release_after(tap, async move {
                            if let Err(e) = firewall.forget(&t, ip).await {
                                tracing::warn!(vm = %name, error = %e, "removing the guest's address checks");
                            }
                        });
                    }
                    (Some(tap), _) => pool.release(tap),
                    (None, _) => {}
                }
            }
        }
        let recorded = vm.tap.is_some() || vm.ssh_port.is_some();
        if (recorded || lease.tap.is_some() || lease.ssh_port.is_some())
            && let Err(e) = self.store.set_vm_net(&vm.id, None, None)
        {
            tracing::debug!(vm = %vm.name, error = %e, "clearing network fields");
        }
    }

    /// Turns NAT on or off for a VM; on a running VM the rules change at
    /// once.
    pub async fn set_vm_nat(self: &Arc<Self>, r: &str, nat: bool) -> Result<VmRecord, SetError> {
        let mut cx = self.lock_vm(r).await?;
        let vm = &mut cx.vm;
        if vm.nat == nat {
            return Ok(vm.clone());
        }
        if vm.state == VmState::Running
            && let Some(net) = self.network()
        {
            match (&net.mode, vm.ip) {
                (Mode::Bridge { firewall, .. }, Some(ip)) => {
                    firewall.nat(ip, nat).await.map_err(|cause| NetError::Nat {
                        name: vm.name.clone(),
                        cause,
                    })?;
                    // What net_down undoes changes with the rules.
                    cx.handle.update_net(|l| l.nat = nat.then_some(ip));
                }
                (Mode::Bridge { .. }, None) => {}
                _ if nat => {
                    return Err(NetError::NatNeedsBridge {
                        mode: net.mode_name(),
                    }
                    .into());
                }
                _ => {}
            }
        }
        self.store.set_vm_nat(&vm.id, nat)?;
        vm.nat = nat;
        tracing::info!(vm = %vm.name, nat, "NAT changed");
        Ok(vm.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};
    use banger_api::ProgressSink;
    use banger_net::host::{BridgeSpec, TapInfo};
    use banger_net::link::BridgeChange;
    use banger_net::{DnsRecords, HostNet, HostNetError, IfName, PoolConfig, TapPool};
    use std::collections::{BTreeSet, HashSet};
    use std::net::SocketAddr;
    use std::sync::Mutex;

    /// A [`HostNet`] that only notes what it is asked to do: the daemon's
    /// side of the host network under test, without a host.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>, Mutex<FirewallAnswer>);

    /// What the recorder's check of the tables answers.
    #[derive(Default, Clone)]
    enum FirewallAnswer {
        #[default]
        InPlace,
        Repaired,
        Fails,
    }

    impl Recorder {
        fn note(&self, s: String) -> Result<(), HostNetError> {
            self.0.lock().expect("lock").push(s);
            Ok(())
        }
        /// What was asked since the last call.
        fn asked(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().expect("lock"))
        }
    }

    #[async_trait::async_trait]
    impl HostNet for Recorder {
        async fn ensure_bridge(&self, _: &BridgeSpec) -> Result<BridgeChange, HostNetError> {
            Ok(BridgeChange::default())
        }
        async fn bridge_index(&self, _: &IfName) -> Result<Option<u32>, HostNetError> {
            Ok(Some(7))
        }
        async fn create_tap(&self, t: &TapName, _: u32, _: &IfName) -> Result<(), HostNetError> {
            self.note(format!("create_tap {t}"))
        }
        async fn delete_tap(&self, t: &TapName) -> Result<(), HostNetError> {
            self.note(format!("delete_tap {t}"))
        }
        async fn list_taps(&self) -> Result<Vec<TapInfo>, HostNetError> {
            Ok(vec![])
        }
        async fn nat_enable(&self, _: &Subnet, ip: Ipv4Addr) -> Result<(), HostNetError> {
            self.note(format!("nat_enable {ip}"))
        }
        async fn nat_disable(&self, _: &Subnet, ip: Ipv4Addr) -> Result<(), HostNetError> {
            self.note(format!("nat_disable {ip}"))
        }
        async fn nat_rebuild(
            &self,
            _: &Subnet,
            _: &BTreeSet<Ipv4Addr>,
        ) -> Result<(), HostNetError> {
            Ok(())
        }
        async fn guard_rebuild(
            &self,
            _: &Subnet,
            bindings: &banger_net::guard::Bindings,
        ) -> Result<(), HostNetError> {
            self.note(format!("guard_rebuild {}", bindings.len()))
        }
        async fn firewall_ensure(
            &self,
            _: &Subnet,
            guard: Option<&banger_net::guard::Bindings>,
            nat: &BTreeSet<Ipv4Addr>,
        ) -> Result<banger_net::firewall::Repaired, HostNetError> {
            let list = |v: Vec<String>| v.join(",");
            let guard = guard.map(|g| list(g.iter().map(|(t, ip)| format!("{t}={ip}")).collect()));
            let nat = list(nat.iter().map(|ip| ip.to_string()).collect());
            self.note(format!(
                "firewall_ensure {} {nat}",
                guard.unwrap_or("off".into())
            ))?;
            let answer = self.1.lock().expect("lock").clone();
            match answer {
                FirewallAnswer::InPlace => Ok(banger_net::firewall::Repaired::default()),
                FirewallAnswer::Repaired => Ok(banger_net::firewall::Repaired {
                    guard: true,
                    nat: false,
                }),
                FirewallAnswer::Fails => Err(HostNetError::Helper("nft exploded".into())),
            }
        }
        async fn guard_allow(
            &self,
            _: &Subnet,
            t: &TapName,
            ip: Ipv4Addr,
        ) -> Result<(), HostNetError> {
            // Slower than the rest, as an nft run is: what waits for it
            // shows.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            self.note(format!("guard_allow {t} {ip}"))
        }
        async fn guard_forget(
            &self,
            _: &Subnet,
            t: &TapName,
            ip: Ipv4Addr,
        ) -> Result<(), HostNetError> {
            self.note(format!("guard_forget {t} {ip}"))
        }
        async fn resolved_wire(&self, _: &IfName, _: SocketAddr) -> Result<(), HostNetError> {
            Ok(())
        }
        async fn resolved_unwire(&self, _: &IfName) -> Result<(), HostNetError> {
            Ok(())
        }
    }

    /// A daemon with bridge networking over a [`Recorder`] (an empty TAP
    /// pool: every TAP is made on acquire).
    async fn bridged(t: &tempfile::TempDir) -> (Arc<Daemon>, Arc<Recorder>) {
        bridged_with(t, 0, Guard::On).await
    }

    /// [`bridged`] with a pool that keeps `size` TAPs ready.
    async fn bridged_with_pool(t: &tempfile::TempDir, size: usize) -> (Arc<Daemon>, Arc<Recorder>) {
        bridged_with(t, size, Guard::On).await
    }

    async fn bridged_with(
        t: &tempfile::TempDir,
        size: usize,
        guard: Guard,
    ) -> (Arc<Daemon>, Arc<Recorder>) {
        let d = daemon(t);
        let host = Arc::new(Recorder::default());
        let settings = settings(&d.config).expect("settings");
        let pool = TapPool::start(
            host.clone(),
            PoolConfig {
                bridge: settings.bridge.clone(),
                owner_uid: 1000,
                size,
            },
            &HashSet::new(),
        )
        .await
        .expect("pool");
        let subnet = settings.subnet;
        let net = Network {
            settings,
            mode: Mode::Bridge {
                host: host.clone(),
                pool: Arc::new(pool),
                firewall: Arc::new(Firewall::new(
                    host.clone(),
                    subnet,
                    guard.is_on(),
                    Default::default(),
                    Default::default(),
                )),
            },
            guard,
            records: DnsRecords::new(),
            dns: None,
            dns_error: None,
        };
        assert!(d.network.set(net).is_ok());
        (d, host)
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    /// Waits for the TAP deletions the pool runs after a release.
    async fn released(d: &Daemon) {
        if let Some(Mode::Bridge { pool, .. }) = d.network().map(|n| &n.mode) {
            pool.released().await;
        }
    }

    /// Has the daemon check its nftables tables against what it keeps.
    async fn heal(d: &Daemon) {
        let Some(Mode::Bridge { firewall, .. }) = d.network().map(|n| &n.mode) else {
            panic!("bridge networking");
        };
        firewall.heal().await.expect("heal");
    }

    /// A VM recorded in `state` with an address and NAT.
    fn nat_vm(d: &Daemon, name: &str, state: VmState) -> VmRecord {
        let mut vm = record(d, name, state);
        vm.ip = Some(d.allocate_ip().expect("an address"));
        vm.nat = true;
        d.store.update_vm(&vm).expect("update");
        vm
    }

    #[tokio::test]
    async fn net_down_undoes_the_lease_not_the_record() {
        let t = tempfile::tempdir().expect("tmp");
        let (d, host) = bridged(&t).await;
        let mut vm = nat_vm(&d, "calm-otter", VmState::Starting);
        let ip = vm.ip.expect("ip");
        let mut steps = Steps::new(&ProgressSink::discard());
        let mut boot = d
            .net_up(&mut vm, &mut steps)
            .await
            .expect("up")
            .expect("networking");
        boot.guard
            .take()
            .expect("checks")
            .wait()
            .await
            .expect("checks added");
        steps.commit();
        // The pool is empty: the TAP was made on the spot, and both the boot
        // (`vm show`) and the pool (`doctor`) say how long that took.
        let got = boot.tap.expect("how the TAP was got");
        assert!(!got.from_pool, "{got:?}");
        let status = d.network_status().await.expect("status");
        let pool = status.tap_pool.expect("bridge mode has a pool");
        assert_eq!((pool.idle, pool.configured), (0, 0));
        assert!(pool.last_create_us.is_some(), "{pool:?}");
        let tap = TapName::new(vm.tap.clone().expect("tap in the record")).expect("tap");
        assert_eq!(
            d.store.get_vm(&vm.id).expect("get").tap,
            Some(tap.to_string()),
            "recorded for a daemon restart"
        );
        // The checks are added alongside the NAT rules, and what they hold
        // is kept: doctor's check of the tables asks for it.
        assert_eq!(
            sorted(host.asked()),
            sorted(vec![
                format!("create_tap {tap}"),
                format!("guard_allow {tap} {ip}"),
                format!("nat_enable {ip}"),
                format!("firewall_ensure {tap}={ip} {ip}"),
            ])
        );
        let h = d.vms.existing(&vm.id).expect("a handle");
        d.set_state(&mut vm, VmState::Running, Some(1), None)
            .expect("running");
        d.net_ready(&vm);
        let records = &d.network().expect("net").records;
        assert_eq!(records.get("calm-otter"), Some(ip));
        assert_eq!(
            h.net(),
            Some(NetLease {
                tap: Some(tap.clone()),
                nat: Some(ip),
                guard: Some(ip),
                ssh_port: None,
                dns: Some(vm.name.clone()),
            })
        );

        // NAT off while it runs: the rules go, and the lease and the kept
        // state say so.
        d.set_vm_nat("calm-otter", false).await.expect("nat off");
        assert_eq!(host.asked(), [format!("nat_disable {ip}")]);
        assert_eq!(h.net().and_then(|l| l.nat), None);
        heal(&d).await;
        assert_eq!(host.asked(), [format!("firewall_ensure {tap}={ip} ")]);

        // A record that says otherwise (NAT on, no TAP) changes nothing:
        // the lease is what is released.
        let mut stale = vm.clone();
        stale.tap = None;
        stale.nat = true;
        d.net_down(&stale).await;
        released(&d).await;
        assert_eq!(
            host.asked(),
            [
                format!("guard_forget {tap} {ip}"),
                format!("delete_tap {tap}")
            ]
        );
        assert_eq!(h.net(), None);
        assert_eq!(records.get("calm-otter"), None);
        assert_eq!(d.store.get_vm(&vm.id).expect("get").tap, None);
        heal(&d).await;
        assert_eq!(host.asked(), ["firewall_ensure  "]);

        // Without a lease (a VM re-adopted after a restart) the record is.
        d.net_down(&stale).await;
        assert_eq!(host.asked(), [format!("nat_disable {ip}")]);
    }

    #[tokio::test]
    async fn a_rolled_back_network_leaves_no_lease() {
        let t = tempfile::tempdir().expect("tmp");
        let (d, host) = bridged(&t).await;
        let mut vm = nat_vm(&d, "calm-otter", VmState::Starting);
        let ip = vm.ip.expect("ip");
        let mut steps = Steps::new(&ProgressSink::discard());
        // Rolled back before the checks' task ran: the forget waits for
        // the allow it undoes.
        let boot = d
            .net_up(&mut vm, &mut steps)
            .await
            .expect("up")
            .expect("networking");
        let tap = vm.tap.clone().expect("tap");
        assert!(steps.rollback().await.is_empty());
        released(&d).await;
        let asked = host.asked();
        let at = |what: String| asked.iter().position(|a| *a == what).expect(&what);
        assert_eq!(asked.len(), 6, "{asked:?}");
        assert!(at(format!("create_tap {tap}")) < at(format!("guard_allow {tap} {ip}")));
        assert!(at(format!("guard_allow {tap} {ip}")) < at(format!("guard_forget {tap} {ip}")));
        assert!(at(format!("nat_enable {ip}")) < at(format!("nat_disable {ip}")));
        assert!(at(format!("guard_forget {tap} {ip}")) < at(format!("delete_tap {tap}")));
        boot.guard
            .expect("checks")
            .wait()
            .await
            .expect("the allow ran");
        let h = d.vms.existing(&vm.id).expect("a handle");
        assert_eq!(h.net(), None);
        // By what the store says now, the TAP is not released a second
        // time (NAT off is idempotent).
        let vm = d.store.get_vm(&vm.id).expect("get");
        assert_eq!(vm.tap, None);
        d.net_down(&vm).await;
        assert_eq!(host.asked(), [format!("nat_disable {ip}")]);
    }

    #[tokio::test]
    async fn a_daemon_stop_deletes_the_idle_taps_not_a_running_vms() {
        let t = tempfile::tempdir().expect("tmp");
        let (d, host) = bridged_with_pool(&t, 2).await;
        let pool = match d.network().map(|n| &n.mode) {
            Some(Mode::Bridge { pool, .. }) => pool.clone(),
            _ => panic!("bridge mode"),
        };
        let wait = std::time::Duration::from_secs(10);
        assert!(pool.wait_idle(2, wait).await, "the pool filled");
        let mut vm = nat_vm(&d, "calm-otter", VmState::Starting);
        let mut steps = Steps::new(&ProgressSink::discard());
        d.net_up(&mut vm, &mut steps)
            .await
            .expect("up")
            .expect("networking");
        steps.commit();
        let in_use = vm.tap.clone().expect("tap");
        assert!(pool.wait_idle(2, wait).await, "the pool refilled");
        let made: Vec<String> = host
            .asked()
            .into_iter()
            .filter_map(|a| a.strip_prefix("create_tap ").map(str::to_string))
            .collect();
        assert_eq!(made.len(), 3, "two to fill, one to refill: {made:?}");
        assert!(made.contains(&in_use), "{made:?}");

        d.stop_network().await;
        let mut deleted: Vec<String> = host
            .asked()
            .into_iter()
            .filter_map(|a| a.strip_prefix("delete_tap ").map(str::to_string))
            .collect();
        deleted.sort();
        let mut idle: Vec<String> = made.into_iter().filter(|t| *t != in_use).collect();
        idle.sort();
        assert_eq!(deleted, idle, "the idle TAPs go, the running VM's stays");
        assert_eq!(pool.idle_count(), 0);
        // Stopped, the pool makes no more; the VM's TAP is still released
        // when its VMM exits.
        d.net_down(&d.store.get_vm(&vm.id).expect("get")).await;
        released(&d).await;
        let asked = host.asked();
        assert!(
            asked.contains(&format!("delete_tap {in_use}"))
                && !asked.iter().any(|a| a.starts_with("create_tap")),
            "{asked:?}"
        );
    }

    /// Without the checks (no nft on the host) a VM's network comes up
    /// all the same, and doctor says what is missing.
    #[tokio::test]
    async fn without_address_checks_the_network_still_comes_up() {
        let t = tempfile::tempdir().expect("tmp");
        let why = "the guests' address checks are not in place: nft not found";
        let (d, host) = bridged_with(&t, 0, Guard::Off(why.into())).await;
        let mut vm = nat_vm(&d, "calm-otter", VmState::Starting);
        let ip = vm.ip.expect("ip");
        let mut steps = Steps::new(&ProgressSink::discard());
        d.net_up(&mut vm, &mut steps)
            .await
            .expect("up")
            .expect("networking");
        steps.commit();
        let tap = vm.tap.clone().expect("tap");
        assert_eq!(
            host.asked(),
            [format!("create_tap {tap}"), format!("nat_enable {ip}")]
        );
        let status = d.network_status().await.expect("status");
        assert!(!status.guard_ok);
        assert_eq!(status.guard_detail, why);
        // The check of the tables leaves the checks out; NAT it keeps.
        assert_eq!(host.asked(), [format!("firewall_ensure off {ip}")]);
        d.net_down(&vm).await;
        released(&d).await;
        assert_eq!(
            host.asked(),
            [format!("nat_disable {ip}"), format!("delete_tap {tap}")]
        );
    }

    #[tokio::test]
    async fn doctor_checks_the_tables_now() {
        let t = tempfile::tempdir().expect("tmp");
        let (d, host) = bridged(&t).await;
        let status = d.network_status().await.expect("status");
        assert!(status.guard_ok, "{}", status.guard_detail);
        assert!(
            !status.guard_detail.contains("again"),
            "{}",
            status.guard_detail
        );

        *host.1.lock().expect("lock") = FirewallAnswer::Repaired;
        let status = d.network_status().await.expect("status");
        assert!(status.guard_ok, "{}", status.guard_detail);
        assert!(
            status.guard_detail.contains("made again just now"),
            "{}",
            status.guard_detail
        );

        *host.1.lock().expect("lock") = FirewallAnswer::Fails;
        let status = d.network_status().await.expect("status");
        assert!(!status.guard_ok, "{}", status.guard_detail);
        assert!(
            status
                .guard_detail
                .contains("could not be checked: nft exploded"),
            "{}",
            status.guard_detail
        );
        assert_eq!(host.asked(), vec!["firewall_ensure  ".to_string(); 3]);
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
