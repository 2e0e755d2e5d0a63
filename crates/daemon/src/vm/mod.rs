//! What the daemon holds about each VM at run time, and the one way into
//! a VM for an operation.
//!
//! The VM operations live beside it: `create`, `boot` (with `initramfs` and
//! `ready`), `lifecycle` (start, stop, restart, kill), `settings`, `exit`
//! (the VMM's exit watch), `reconcile` (at daemon start), `logs`, and
//! `ephemeral` (`vm run --rm`).

pub(crate) mod admit;
pub(crate) mod boot;
mod create;
mod ephemeral;
mod error;
pub(crate) mod exit;
pub(crate) mod initramfs;
mod lifecycle;
pub(crate) mod log_index;
mod logs;
pub(crate) mod power;
pub(crate) mod ready;
mod reconcile;
pub(crate) mod registry;
pub(crate) mod settings;
mod state;

pub use boot::BootError;
pub(crate) use boot::{
    BootCtx, BootPurpose, TEMPLATE_MAC, WRITABLE_ROOT_WORK_DEVICE, console_tail,
};
pub use create::CreateError;
pub use error::{AgentError, DeleteError, LookupError};
pub(crate) use exit::cap_logs;
pub use initramfs::BootInfoError;
pub(crate) use initramfs::{BOOT_INITRD_FILE, BootFacts, BootInitrd};
pub use lifecycle::{KillError, RestartError, StartError, StopError};
pub use logs::LogsError;
pub use ready::WaitError;
pub(crate) use ready::{CONSOLE_LINES, Readiness, Unready, stopped_before_agent};
pub use settings::{ResourceError, SetError};
pub use state::StateError;

use crate::Daemon;
use banger_agent_proto::client::AgentClient;
use banger_config::Config;
use banger_model::{VmId, VmRecord, VmState};
use banger_store::StoreError;
use banger_vmm::{HostFacts, Vmm, select_backend};
use registry::VmHandle;
use std::sync::Arc;
use tokio::sync::OwnedMutexGuard;

/// A VM held for one operation: its operation lock is taken and `vm` was
/// read under it. The lock is released when this drops.
pub(crate) struct VmCtx {
    pub(crate) vm: VmRecord,
    pub(crate) handle: Arc<VmHandle>,
    _op: OwnedMutexGuard<()>,
}

impl Daemon {
    /// The one way into an existing VM: resolves `r` (name, id or id
    /// prefix), takes the VM's operation lock, then re-reads its record
    /// under the lock (an operation that held it may have changed or
    /// deleted the VM).
    pub(crate) async fn lock_vm(&self, r: &str) -> Result<VmCtx, LookupError> {
        let vm = self.store.resolve_vm(r)?;
        self.lock_vm_id(&vm.id).await
    }

    /// The agent of a running VM.
    pub fn running_agent(&self, r: &str) -> Result<(VmRecord, AgentClient), AgentError> {
        let vm = self.store.resolve_vm(r)?;
        if vm.state != VmState::Running {
            return Err(AgentError::NotRunning {
                name: vm.name,
                state: vm.state,
            });
        }
        match self.agent(&vm.id) {
            Some(a) if !a.is_closed() => Ok((vm, a)),
            _ => Err(AgentError::NotConnected { name: vm.name }),
        }
    }

    /// [`Daemon::lock_vm`] for a VM known by id.
    pub(crate) async fn lock_vm_id(&self, id: &VmId) -> Result<VmCtx, LookupError> {
        let handle = self.vms.handle(id);
        let op = handle.lock_op().await;
        match self.store.get_vm(id) {
            Ok(vm) => Ok(VmCtx {
                vm,
                handle,
                _op: op,
            }),
            Err(e) => {
                // Deleted while this waited: the handle this call found or
                // made belongs to no VM.
                if matches!(e, banger_store::StoreError::NotFound(_)) {
                    self.vms.remove(&handle);
                }
                Err(e.into())
            }
        }
    }
}

/// Prefix of a deleted VM's directory while its files are removed.
const DELETING: &str = ".deleting-";

fn remove_doomed(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a deleted VM's files");
    }
}

/// Picks the VMM backend from config and host facts.
pub(crate) fn choose_backend(cfg: &Config) -> anyhow::Result<(Arc<dyn Vmm>, String)> {
    let facts = HostFacts::probe(cfg.firecracker_bin.as_deref(), cfg.qemu_bin.as_deref());
    let selection = select_backend(cfg.vmm, &facts)?;
    let reason = selection.reason.clone();
    Ok((selection.into_vmm(), reason))
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

impl Daemon {
    /// Every VM's record.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.store.list_vms()
    }

    /// The record of VM ref `r` (name, id or id prefix).
    pub fn get_vm(&self, r: &str) -> Result<VmRecord, LookupError> {
        Ok(self.store.resolve_vm(r)?)
    }

    /// Stops the VM if it runs, then removes its disks, directory and record.
    pub async fn delete_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, DeleteError> {
        // Re-read under the lock: a concurrent delete may have won.
        let cx = self.lock_vm(r).await?;
        let vm = &cx.vm;
        cx.handle.set_agent(None);
        cx.handle.set_boot_facts(None);
        if let Some(pid) = vm.pid {
            // Its disks go next: no orderly quit that would flush them.
            banger_vmm::kill_vmm(pid, &vm.dir)
                .await
                .map_err(|e| anyhow::Error::from(e).context("stopping the VMM"))?;
        }
        // The directory leaves the VMs' folder at once (a failure keeps the
        // record, to try again); its files are removed after the answer.
        let doomed = self.paths.vms_dir.join(format!("{DELETING}{}", vm.id));
        let (_, moved) = tokio::join!(self.net_down(vm), tokio::fs::rename(&vm.dir, &doomed));
        match moved {
            Ok(()) => {
                tokio::task::spawn_blocking(move || remove_doomed(&doomed));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("moving {} away", vm.dir.display()))
                    .into());
            }
        }
        self.store.delete_vm(&vm.id)?;
        // Still under the VM's lock: a waiter on it re-reads, finds no VM.
        self.vms.remove(&cx.handle);
        tracing::info!(vm = %vm.name, id = %vm.id, "deleted VM");
        if let Err(e) = self.refresh_known_hosts() {
            tracing::warn!(error = %format!("{e:#}"), "known_hosts not updated");
        }
        Ok(cx.vm)
    }

    /// Removes what deletes left in the VMs' folder when the daemon ended
    /// before their files were gone.
    pub(crate) fn remove_deleted_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.paths.vms_dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(DELETING) {
                remove_doomed(&e.path());
            }
        }
    }

    pub fn backend(&self) -> String {
        match self.vmm() {
            Ok(v) => v.backend().to_string(),
            Err(_) => "none".into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::Daemon;
    use banger_config::{Config, Paths};
    use banger_model::{
        Provenance, SpecValue, VmBackend, VmId, VmName, VmRecord, VmSpec, VmState, fixtures,
    };
    use std::sync::Arc;

    /// A daemon over a fresh state directory, with one image to record
    /// VMs of. It never boots anything.
    pub(crate) fn daemon(t: &tempfile::TempDir) -> Arc<Daemon> {
        let d = Daemon::new(Config::default(), Paths::under(t.path())).expect("daemon");
        add_image(&d);
        d
    }

    /// Records image `img` (and its kernel `k`) for VMs to name.
    pub(crate) fn add_image(d: &Daemon) {
        d.store
            .upsert_kernel(&fixtures::kernel("k"))
            .expect("kernel");
        d.store
            .upsert_image(&fixtures::image("img", "k"))
            .expect("image");
    }

    /// Records a VM named `name` in `state`, with no VMM process.
    pub(crate) fn record(d: &Daemon, name: &str, state: VmState) -> VmRecord {
        let id = VmId::random();
        let vm = VmRecord {
            dir: d.paths.vms_dir.join(id.as_str()),
            id,
            name: VmName::parse(name).expect("name"),
            image: "img".into(),
            state,
            backend: VmBackend::Qemu,
            spec: VmSpec {
                vcpu: SpecValue::new(1, Provenance::Flag),
                memory_mib: SpecValue::new(256, Provenance::Flag),
                disk_bytes: SpecValue::new(1 << 30, Provenance::Flag),
            },
            pid: None,
            nat: false,
            ip: None,
            tap: None,
            ssh_port: None,
            initramfs: Default::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            last_error: None,
            start: Default::default(),
        };
        std::fs::create_dir_all(&vm.dir).expect("dir");
        d.store.insert_vm(&vm).expect("insert");
        vm
    }

    #[tokio::test]
    async fn delete_removes_the_handle_and_a_later_exit_makes_none() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let vm = record(&d, "calm-otter", VmState::Running);
        let (exit, exited) = tokio::sync::oneshot::channel::<()>();
        let vmm = tokio::spawn(async move {
            let _ = exited.await;
        });
        let watcher = d.watch_exit(vm.id.clone(), 4242, vmm);
        assert!(d.vms.existing(&vm.id).is_some(), "watching made the handle");

        d.delete_vm("calm-otter").await.expect("delete");
        assert!(
            d.vms.existing(&vm.id).is_none(),
            "delete removed the handle"
        );
        assert!(!vm.dir.exists());

        let _ = exit.send(());
        watcher.await.expect("watcher");
        assert!(
            d.vms.existing(&vm.id).is_none(),
            "the exit watcher brought no handle back"
        );
        assert_eq!(d.vms.len(), 0);
    }

    #[tokio::test]
    async fn a_deleted_vms_files_go_and_an_unfinished_deletes_at_the_next_start() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let vm = record(&d, "calm-otter", VmState::Stopped);
        std::fs::write(vm.dir.join("work.ext4"), b"disk").expect("disk");
        d.delete_vm("calm-otter").await.expect("delete");
        assert!(!vm.dir.exists(), "out of the VMs' folder at once");
        let vms_dir = d.paths.vms_dir.clone();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while std::fs::read_dir(&vms_dir).expect("vms").next().is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the files are removed after the answer");

        // The daemon ended before a delete's files were gone.
        let left = vms_dir.join(format!("{}0123", super::DELETING));
        std::fs::create_dir_all(left.join("sub")).expect("leftover");
        let kept = record(&d, "keen-fox", VmState::Stopped);
        d.remove_deleted_leftovers();
        assert!(!left.exists());
        assert!(kept.dir.is_dir(), "a VM's own directory stays");
    }

    #[tokio::test]
    async fn of_two_deletes_one_wins_and_the_other_finds_no_vm() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let vm = record(&d, "calm-otter", VmState::Stopped);
        // Both resolve the name before either holds the lock.
        let held = d.lock_vm("calm-otter").await.expect("lock");
        let (a, b) = (d.clone(), d.clone());
        let first = tokio::spawn(async move { a.delete_vm("calm-otter").await });
        let second = tokio::spawn(async move { b.delete_vm(vm.id.as_str()).await });
        // Each has resolved and waits on the lock once it holds a clone of
        // the handle (the registry's own reference is the third).
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while Arc::strong_count(&held.handle) < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both deletes wait on the lock");
        drop(held);
        let (first, second) = (first.await.expect("join"), second.await.expect("join"));
        let (ok, err) = match (first, second) {
            (Ok(v), Err(e)) | (Err(e), Ok(v)) => (v, e),
            other => panic!("expected one ok and one error: {other:?}"),
        };
        assert_eq!(ok.name.as_str(), "calm-otter");
        assert_eq!(err.kind(), crate::ErrorKind::NotFound, "{err:?}");
        assert_eq!(err.to_string(), format!("no VM with id {}", ok.id));
        assert!(d.store.list_vms().expect("list").is_empty());
        assert_eq!(d.vms.len(), 0, "no handle left behind");
    }
}
