//! A VM's network: its address, the host side while it runs, and NAT.

use crate::Daemon;
use crate::steps::{Steps, UndoSlot};
use crate::vm::SetError;
use banger_model::{VmRecord, VmState};
use banger_net::{GuestNet, MacAddr, Subnet, TapName};
use banger_vmm::{HostForward, NetBackend, NetSpec};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use super::*;

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
    /// undos in `steps`. `None` when networking was never initialised
    /// (a daemon not started through `serve`).
    pub(crate) async fn net_up(
        &self,
        vm: &mut VmRecord,
        steps: &mut Steps<'_>,
    ) -> Result<Option<BootNet>, NetError> {
        let Some(net) = self.network() else {
            return Ok(None);
        };
        let settings = &net.settings;
        match &net.mode {
            Mode::Unavailable { reason } => Err(NetError::Unavailable(reason.clone())),
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
                let ip = vm.ip.ok_or_else(|| NetError::NoAddress {
                    name: vm.name.clone(),
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
                (Mode::Bridge { host, .. }, Some(ip)) => {
                    let subnet = &net.settings.subnet;
                    let r = if nat {
                        host.nat_enable(subnet, ip).await
                    } else {
                        host.nat_disable(subnet, ip).await
                    };
                    r.map_err(|cause| NetError::Nat {
                        name: vm.name.clone(),
                        cause,
                    })?;
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
