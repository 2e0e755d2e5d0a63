//! Start-up reconciliation: make the store agree with the processes that
//! actually exist. Never deletes a VM's disks.

use crate::Daemon;
use banger_agent_proto::client::AgentClient;
use banger_model::{VmRecord, VmState};
use banger_vmm::{VmPaths, vmm_process_alive};
use std::sync::Arc;
use std::time::Duration;

impl Daemon {
    /// Re-adopts running VMs whose VMM survived a daemon restart, stops VMs
    /// caught half-way through booting, and marks VMs whose VMM died stopped.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        for vm in self.store.list_vms()? {
            let alive = vm.pid.is_some_and(|pid| vmm_process_alive(pid, &vm.dir));
            match (vm.state, alive) {
                (VmState::Running, true) => {
                    if let Err(e) = self.adopt(&vm).await {
                        tracing::warn!(vm = %vm.name, error = %format!("{e:#}"), "could not re-adopt VM; stopping it");
                        self.stop_leftover(
                            vm,
                            VmState::Error,
                            Some(&format!("lost after daemon restart: {e:#}")),
                        )
                        .await;
                    }
                }
                (VmState::Creating | VmState::Starting | VmState::Stopping, _) => {
                    // The operation that owned it died with the old daemon.
                    let msg = format!("interrupted while {}: the daemon restarted", vm.state);
                    self.stop_leftover(vm, VmState::Error, Some(&msg)).await;
                }
                (VmState::Running, false) => self.stop_leftover(vm, VmState::Stopped, None).await,
                (VmState::Error, true) => {} // kept on purpose for inspection
                (VmState::Stopped | VmState::Error, false) => {}
                (VmState::Stopped, true) => self.stop_leftover(vm, VmState::Stopped, None).await,
            }
        }
        self.remove_deleted_leftovers();
        self.reconcile_templates();
        self.verify_templates_later();
        Ok(())
    }

    async fn adopt(self: &Arc<Self>, vm: &VmRecord) -> anyhow::Result<()> {
        let pid = vm.pid.ok_or_else(|| anyhow::anyhow!("no pid recorded"))?;
        let exited =
            banger_vmm::watch_exit(pid)?.ok_or_else(|| anyhow::anyhow!("the VMM exited"))?;
        let ep = self.vmm()?.reattach_agent(&vm.dir)?;
        let stream = tokio::time::timeout(Duration::from_secs(5), ep.open()).await??;
        let client = AgentClient::spawn(stream);
        client.ping()?;
        tokio::time::timeout(Duration::from_secs(10), client.wait_hello()).await??;
        self.set_agent(&vm.id, Some(client));
        crate::vm::cap_logs(vm.dir.clone(), pid);
        self.watch_exit(vm.id.clone(), pid, exited);
        let paths = banger_vmm::VmPaths::new(&vm.dir);
        crate::vm::log_index::spawn_sampler(
            vec![paths.console_log(), paths.vmm_log()],
            pid,
            false,
            self.shutdown.clone(),
        );
        tracing::info!(vm = %vm.name, pid, "re-adopted running VM");
        Ok(())
    }

    /// Ends whatever is left of a VM's VMM and records `state`. Disks stay.
    async fn stop_leftover(&self, mut vm: VmRecord, state: VmState, error: Option<&str>) {
        if let Some(pid) = vm.pid
            && let Err(e) = self.terminate_vmm(&vm, pid).await
        {
            tracing::warn!(vm = %vm.name, error = %format!("{e:#}"), "could not end leftover VMM");
        }
        // Networking starts after reconcile: this clears the record, and
        // the TAP pool then deletes TAPs no running VM holds.
        self.net_down(&vm).await;
        let p = VmPaths::new(&vm.dir);
        for f in p.runtime_files() {
            let _ = std::fs::remove_file(f);
        }
        if let Err(e) = self.set_state(&mut vm, state, None, error) {
            tracing::warn!(vm = %vm.name, error = %e, "could not record VM state");
        }
        tracing::info!(vm = %vm.name, state = %state, "reconciled VM");
    }
}
