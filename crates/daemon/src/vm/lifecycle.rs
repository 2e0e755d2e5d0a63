//! Start, stop, restart and kill of existing VMs. Each holds the VM's lock,
//! so operations on one VM are serialised; different VMs run in parallel.

use crate::steps::Steps;
use crate::vm::power::{Ask, PowerOff};
use crate::vm::{BootCtx, BootError, BootPurpose};
use crate::{Daemon, DaemonError};
use anyhow::anyhow;
use banger_model::{VmRecord, VmState};
use banger_vmm::vmm_process_alive;
use std::sync::Arc;
use std::time::Duration;

/// How long a guest gets to power off before its VMM is ended.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Boots a stopped VM from its existing disks and waits for its agent.
    /// Precondition: the VM is stopped (or in error); a running VM is left as is.
    pub async fn start_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, DaemonError> {
        let mut cx = self.lock_vm(r).await?;
        let vm = &mut cx.vm;
        match vm.state {
            VmState::Running => return Ok(vm.clone()),
            VmState::Stopped | VmState::Error => {}
            other => {
                return Err(DaemonError::Conflict(format!(
                    "VM {} is {other}: wait for that to finish",
                    vm.name
                )));
            }
        }
        // An errored VM may still have its VMM, kept for inspection.
        if let Some(pid) = vm.pid.filter(|p| vmm_process_alive(*p, &vm.dir)) {
            self.terminate_vmm(vm, pid).await?;
        }
        self.net_down(vm).await;
        let vmm = self.vmm()?.clone();
        let image = self.store.get_image(&vm.image)?;
        let kernel = self.store.get_kernel(&image.kernel)?;
        // Nobody watches a start: its steps are only logged on failure.
        let quiet = banger_api::ProgressSink::discard();
        let mut steps = Steps::new(&quiet);
        let cancel = self.shutdown.child_token();
        let ctx = BootCtx {
            vmm: &vmm,
            kernel: &kernel,
            image: &image,
            progress: &quiet,
            cancel: &cancel,
            writable_root: None,
            purpose: BootPurpose::Vm,
        };
        let mut booted = self.boot(ctx, vm, &mut steps).await.map(|_| ());
        if booted.is_ok() && self.config.wait_boot {
            booted = match self.wait_system(vm, &quiet, &cancel).await {
                crate::vm::SystemWait::Booted => Ok(()),
                crate::vm::SystemWait::TimedOut(m) => Err(BootError::NotReady(m)),
                crate::vm::SystemWait::Cancelled => {
                    Err(BootError::NotReady(self.cancel_reason().to_string()))
                }
            };
        }
        match booted {
            Ok(()) => {
                steps.commit();
                // A VM restored from a template boots its own disks from
                // now on: every later start is cold.
                vm.start = banger_model::StartInfo::cold(None);
                if let Err(e) = self.store.set_vm_start(&vm.id, &vm.start) {
                    tracing::warn!(vm = %vm.name, error = %e, "start kind not recorded");
                }
                if let Err(e) = self.refresh_known_hosts() {
                    tracing::warn!(error = %format!("{e:#}"), "ssh files not updated");
                }
                tracing::info!(vm = %vm.name, "started VM");
                Ok(vm.clone())
            }
            Err(BootError::NotReady(msg)) => {
                steps.commit();
                let pid = vm.pid;
                self.set_state(vm, VmState::Error, pid, Some(&msg))?;
                Err(DaemonError::Failed(anyhow!(msg)))
            }
            Err(BootError::Failed(e)) => {
                let msg = format!("{e:#}");
                self.set_state(vm, VmState::Error, None, Some(&msg))?;
                Err(DaemonError::Failed(e))
            }
        }
    }

    /// Powers the guest off (agent, else ACPI), and ends the VMM if it has
    /// not exited within [`STOP_TIMEOUT`]. Disks are kept.
    pub async fn stop_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, DaemonError> {
        let mut cx = self.lock_vm(r).await?;
        if cx.vm.state == VmState::Creating {
            return Err(DaemonError::Conflict(format!(
                "VM {} is being created: wait for that to finish",
                cx.vm.name
            )));
        }
        if let Some(pid) = cx.vm.pid.filter(|p| vmm_process_alive(*p, &cx.vm.dir)) {
            self.set_state(&mut cx.vm, VmState::Stopping, Some(pid), None)?;
            let off = self
                .power_off(&cx, Ask::AgentElseAcpi, STOP_TIMEOUT, None)
                .await;
            if !matches!(off, PowerOff::Exited) {
                tracing::warn!(vm = %cx.vm.name, "guest did not power off in time; ending its VMM");
            }
            self.terminate_vmm(&cx.vm, pid).await?;
        }
        let vm = &mut cx.vm;
        self.set_agent(&vm.id, None);
        self.net_down(vm).await;
        self.set_state(vm, VmState::Stopped, None, None)?;
        tracing::info!(vm = %vm.name, "stopped VM");
        Ok(cx.vm)
    }

    /// Stops, then starts.
    pub async fn restart_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, DaemonError> {
        let vm = self.stop_vm(r).await?;
        self.start_vm(vm.id.as_str()).await
    }

    /// Sends `signal` to the VM's VMM process (KILL ends it at once; the exit
    /// watcher then records the VM as stopped).
    pub async fn kill_vm(self: &Arc<Self>, r: &str, signal: i32) -> Result<VmRecord, DaemonError> {
        use banger_api::rules::{MAX_SIGNAL, MIN_SIGNAL};
        if !(MIN_SIGNAL..=MAX_SIGNAL).contains(&signal) {
            return Err(DaemonError::Invalid(format!(
                "signal {signal} is not between {MIN_SIGNAL} and {MAX_SIGNAL}: give a standard signal number, e.g. 15 (TERM) or 9 (KILL)"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| DaemonError::Invalid(format!("{signal} is not a signal number")))?;
        let cx = self.lock_vm(r).await?;
        let vm = &cx.vm;
        let Some(pid) = vm.pid.filter(|p| vmm_process_alive(*p, &vm.dir)) else {
            return Err(DaemonError::Conflict(format!(
                "VM {} is not running",
                vm.name
            )));
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| DaemonError::Failed(anyhow!("signalling the VMM of {}: {e}", vm.name)))?;
        tracing::info!(vm = %vm.name, pid, signal = %sig, "signalled VMM");
        Ok(vm.clone())
    }
}
