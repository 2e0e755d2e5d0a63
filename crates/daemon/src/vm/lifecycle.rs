//! Start, stop, restart and kill of existing VMs. Each holds the VM's lock,
//! so operations on one VM are serialised; different VMs run in parallel.

use crate::error::{Chain, NoBackend, store_kind};
use crate::steps::Steps;
use crate::vm::power::{Ask, PowerOff};
use crate::vm::ready::{OnFailure, Readiness, Unready};
use crate::vm::{BootCtx, BootError, BootPurpose, LookupError, StateError};
use crate::{Daemon, ErrorKind};
use banger_api::rules::{MAX_SIGNAL, MIN_SIGNAL};
use banger_model::{VmName, VmRecord, VmState};
use banger_store::StoreError;
use banger_vmm::vmm_process_alive;
use std::sync::Arc;
use std::time::Duration;

/// How long a guest gets to power off before its VMM is ended.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Boots a stopped VM from its existing disks and waits for its agent.
    /// Precondition: the VM is stopped (or in error); a running VM is left as is.
    pub async fn start_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, StartError> {
        let mut cx = self.lock_vm(r).await?;
        let vm = &mut cx.vm;
        match vm.state {
            VmState::Running => return Ok(vm.clone()),
            VmState::Stopped | VmState::Error => {}
            other => {
                return Err(StartError::Busy {
                    name: vm.name.clone(),
                    state: other,
                });
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
        if booted.is_ok() {
            let want = Readiness {
                system: self.config.wait_boot,
                sshd: false,
            };
            booted = match self.wait_ready(vm, want, &quiet, &cancel).await {
                Ok(()) => Ok(()),
                // Only a daemon shutdown cancels a start: the VM is kept,
                // in error, as if it were not ready in time.
                Err(Unready::Cancelled(why)) => Err(BootError::NotReady(why.to_string())),
                // Its guest went down: what the boot made is undone and the
                // record kept, in error, saying how the guest ended.
                Err(Unready::Stopped(e)) => Err(self.abandon_boot(&vm.id, &mut steps, e).await),
                Err(timed_out) => Err(timed_out.into_boot()),
            };
        }
        self.finish_boot(vm, steps, booted, OnFailure::KeepRecord)?;
        // A VM restored from a template boots its own disks from now on:
        // every later start is cold.
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

    /// Powers the guest off (agent, else ACPI), and ends the VMM if it has
    /// not exited within [`STOP_TIMEOUT`]. Disks are kept.
    pub async fn stop_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, StopError> {
        let mut cx = self.lock_vm(r).await?;
        if cx.vm.state == VmState::Creating {
            return Err(StopError::Creating {
                name: cx.vm.name.clone(),
            });
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
    pub async fn restart_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, RestartError> {
        let vm = self.stop_vm(r).await?;
        Ok(self.start_vm(vm.id.as_str()).await?)
    }

    /// Sends `signal` to the VM's VMM process (KILL ends it at once; the exit
    /// watcher then records the VM as stopped).
    pub async fn kill_vm(self: &Arc<Self>, r: &str, signal: i32) -> Result<VmRecord, KillError> {
        if !(MIN_SIGNAL..=MAX_SIGNAL).contains(&signal) {
            return Err(KillError::OutOfRange { signal });
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| KillError::NotASignal { signal })?;
        let cx = self.lock_vm(r).await?;
        let vm = &cx.vm;
        let Some(pid) = vm.pid.filter(|p| vmm_process_alive(*p, &vm.dir)) else {
            return Err(KillError::NotRunning {
                name: vm.name.clone(),
            });
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(|errno| {
            KillError::Signal {
                name: vm.name.clone(),
                errno,
            }
        })?;
        tracing::info!(vm = %vm.name, pid, signal = %sig, "signalled VMM");
        Ok(vm.clone())
    }
}

/// Why a VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// Another operation (create, stop) is under way.
    #[error("VM {name} is {state}: wait for that to finish")]
    Busy { name: VmName, state: VmState },
    /// No VMM backend on this host.
    #[error(transparent)]
    NoBackend(#[from] NoBackend),
    /// The boot failed (rolled back) or the guest was not ready in time
    /// (kept for inspection); either way the VM is in error.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Ending an errored VM's leftover VMM failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    /// Reading the VM's image or kernel failed.
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
    /// Recording the VM's state failed or was refused.
    #[error(transparent)]
    State(#[from] StateError),
}

impl StartError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StartError::Lookup(e) => e.kind(),
            StartError::Busy { .. } => ErrorKind::Conflict,
            StartError::Store(e) => store_kind(e),
            StartError::State(e) => e.kind(),
            StartError::Boot(e) => e.kind(),
            StartError::NoBackend(_) | StartError::Failed(_) => ErrorKind::Failed,
        }
    }
}

/// Why a VM did not stop.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// A VM being created has nothing to stop yet.
    #[error("VM {name} is being created: wait for that to finish")]
    Creating { name: VmName },
    /// Ending the VMM failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    /// Recording the VM's state failed or was refused.
    #[error(transparent)]
    State(#[from] StateError),
}

impl StopError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StopError::Lookup(e) => e.kind(),
            StopError::Creating { .. } => ErrorKind::Conflict,
            StopError::Failed(_) => ErrorKind::Failed,
            StopError::State(e) => e.kind(),
        }
    }
}

/// Why a restart failed: its stop or its start.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error(transparent)]
    Start(#[from] StartError),
}

impl RestartError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RestartError::Stop(e) => e.kind(),
            RestartError::Start(e) => e.kind(),
        }
    }
}

/// Why a VM's VMM was not signalled.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error(
        "signal {signal} is not between {} and {}: give a standard signal number, e.g. 15 (TERM) or 9 (KILL)",
        MIN_SIGNAL,
        MAX_SIGNAL
    )]
    OutOfRange { signal: i32 },
    #[error("{signal} is not a signal number")]
    NotASignal { signal: i32 },
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// The VM has no live VMM.
    #[error("VM {name} is not running")]
    NotRunning { name: VmName },
    #[error("signalling the VMM of {name}: {errno}")]
    Signal { name: VmName, errno: nix::Error },
}

impl KillError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KillError::OutOfRange { .. } | KillError::NotASignal { .. } => ErrorKind::Invalid,
            KillError::Lookup(e) => e.kind(),
            KillError::NotRunning { .. } => ErrorKind::Conflict,
            KillError::Signal { .. } => ErrorKind::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};

    fn name() -> VmName {
        VmName::parse("calm-otter").expect("name")
    }

    #[test]
    fn messages_and_kinds_are_todays() {
        let e = StartError::Busy {
            name: name(),
            state: VmState::Creating,
        };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter is creating: wait for that to finish"
        );
        let e = StartError::from(BootError::NotReady("the guest did not boot".into()));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Failed, "the guest did not boot")
        );
        let e = StartError::from(BootError::Failed(anyhow::anyhow!("disk").context("boot")));
        assert_eq!(e.to_string(), "boot: disk");
        let e = StopError::Creating { name: name() };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter is being created: wait for that to finish"
        );
        let e = KillError::OutOfRange { signal: 99 };
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            format!(
                "signal 99 is not between {MIN_SIGNAL} and {MAX_SIGNAL}: give a standard signal number, e.g. 15 (TERM) or 9 (KILL)"
            )
        );
        let e = KillError::Signal {
            name: name(),
            errno: nix::Error::ESRCH,
        };
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert_eq!(
            e.to_string(),
            format!("signalling the VMM of calm-otter: {}", nix::Error::ESRCH)
        );
        let e = crate::DaemonError::from(RestartError::Stop(StopError::Creating { name: name() }));
        assert_eq!(e.kind(), ErrorKind::Conflict);
    }

    #[tokio::test]
    async fn refusals_carry_the_vm() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        record(&d, "calm-otter", VmState::Creating);
        let e = d.start_vm("calm-otter").await.expect_err("busy");
        assert!(
            matches!(
                e,
                StartError::Busy {
                    state: VmState::Creating,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = d.stop_vm("calm-otter").await.expect_err("creating");
        assert!(matches!(e, StopError::Creating { .. }), "{e:?}");
        let e = d.kill_vm("calm-otter", 9).await.expect_err("no VMM");
        assert_eq!(e.to_string(), "VM calm-otter is not running");
        let e = d.start_vm("no-such-vm").await.expect_err("unknown");
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
