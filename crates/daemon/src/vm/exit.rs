//! A VMM's exit: watching it, ending it, and keeping its logs small.

use crate::Daemon;
use anyhow::Context;
use banger_model::{VmId, VmRecord, VmState};
use banger_vmm::VmPaths;
use std::path::PathBuf;
use std::sync::Arc;

impl Daemon {
    /// Watches VMM `pid` of VM `id`; when it exits, signals waiters and
    /// records the VM stopped (unless an operation already moved it on).
    pub(crate) fn watch_exit(
        self: &Arc<Self>,
        id: VmId,
        pid: u32,
        exited: tokio::task::JoinHandle<()>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let tx = self.vms.handle(&id).new_exit();
        tokio::spawn(async move {
            let _ = exited.await;
            // Before taking the VM lock: a stop holding it waits for this.
            let _ = tx.send(true);
            this.on_vmm_exit(&id, pid).await;
        })
    }

    async fn on_vmm_exit(self: &Arc<Self>, id: &VmId, pid: u32) {
        // A deleted VM has no handle: nothing to record, and none is made.
        let Some(handle) = self.vms.existing(id) else {
            return;
        };
        // Whoever holds the lock (delete, stop) records the state itself; a
        // VM already restarted has another pid and is left alone.
        let _g = handle.lock_op().await;
        let Ok(mut vm) = self.store.get_vm(id) else {
            return;
        };
        if vm.pid != Some(pid) {
            return;
        }
        handle.set_agent(None);
        handle.set_boot_facts(None);
        self.net_down(&vm).await;
        if matches!(
            vm.state,
            VmState::Running | VmState::Starting | VmState::Stopping
        ) {
            tracing::info!(vm = %vm.name, "VMM exited; marking VM stopped");
            let _ = self.set_state(&mut vm, VmState::Stopped, None, None);
        }
    }

    /// Ends a VM's VMM, through the backend when there is one, else by
    /// SIGKILL (waiting for its exit).
    pub(crate) async fn terminate_vmm(&self, vm: &VmRecord, pid: u32) -> anyhow::Result<()> {
        match self.vmm() {
            Ok(vmm) => vmm
                .terminate(&vm.dir, pid)
                .await
                .context("stopping the VMM"),
            Err(_) => banger_vmm::kill_vmm(pid, &vm.dir)
                .await
                .context("killing the VMM"),
        }
    }
}

/// Keeps the console and VMM logs of the VM in `dir` under
/// [`banger_vmm::logcap::LOG_CAP`] (rotating them) while its VMM `pid`
/// runs: whatever the guest prints, the VM's directory stays bounded.
pub(crate) fn cap_logs(dir: PathBuf, pid: u32) {
    let paths = VmPaths::new(&dir);
    let logs = [paths.console_log(), paths.vmm_log()];
    tokio::spawn(async move {
        use banger_vmm::logcap::{CHECK_EVERY, LOG_CAP, rotate_if_over};
        let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        while alive() && dir.is_dir() {
            for log in &logs {
                if let Err(e) = rotate_if_over(log, LOG_CAP) {
                    tracing::warn!(log = %log.display(), error = %e, "cannot rotate the log");
                }
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    });
}
