//! Admission of a new VM: its name, address, directory and record.

use crate::Daemon;
use crate::steps::{Steps, UndoSlot};
use crate::vm::CreateError;
use crate::vm::registry::VmHandle;
use anyhow::Context;
use banger_model::{InitramfsMode, StartInfo, VmId, VmName, VmRecord, VmSpec, VmState};
use std::sync::Arc;

/// What a new VM is made of; admission chooses the rest (id, directory,
/// address, backend, creation time).
pub(crate) struct NewVm {
    pub(crate) name: VmName,
    pub(crate) image: String,
    pub(crate) spec: VmSpec,
    pub(crate) nat: bool,
    pub(crate) initramfs: InitramfsMode,
    pub(crate) start: StartInfo,
}

/// The operation lock of a VM being created, taken before its record
/// exists. Dropped with no record (a failed create rolled it back), it
/// removes the VM's handle too, still under the lock.
pub(crate) struct CreatingVm<'a> {
    d: &'a Daemon,
    handle: Arc<VmHandle>,
    _op: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for CreatingVm<'_> {
    fn drop(&mut self) {
        if matches!(
            self.d.store.get_vm(self.handle.id()),
            Err(banger_store::StoreError::NotFound(_))
        ) {
            self.d.vms.remove(&self.handle);
        }
    }
}

impl Daemon {
    /// No VM is named `name` yet.
    pub(crate) fn check_name_free(&self, name: &VmName) -> Result<(), CreateError> {
        if self.store.list_vms()?.iter().any(|v| v.name == *name) {
            return Err(CreateError::NameTaken(name.clone()));
        }
        Ok(())
    }

    /// Admits a new VM: under the admission lock, so that no other VM
    /// takes its name or address meanwhile, checks that its name is free,
    /// allocates its address, then makes its directory and records it
    /// (state creating) as steps of `steps`, which a later failure rolls
    /// back. The VM's operation lock is held from before its record
    /// exists and is handed back with the record.
    pub(crate) async fn admit<'d>(
        &'d self,
        new: NewVm,
        steps: &mut Steps<'_>,
    ) -> Result<(VmRecord, CreatingVm<'d>), CreateError> {
        let backend = self.vmm()?.backend();
        let id = VmId::random();
        let dir = self.paths.vms_dir.join(id.as_str());
        let admission = self.alloc_lock.lock().await;
        // Again under the lock every create records under: a create of the
        // same name that started meanwhile must not get as far as disks.
        self.check_name_free(&new.name)?;
        let ip = self.allocate_ip()?;
        let vm = VmRecord {
            id: id.clone(),
            name: new.name,
            image: new.image,
            state: VmState::Creating,
            backend,
            spec: new.spec,
            dir: dir.clone(),
            pid: None,
            created_at: crate::vm::now_rfc3339(),
            last_error: None,
            start: new.start,
            nat: new.nat,
            ip: Some(ip),
            tap: None,
            ssh_port: None,
            initramfs: new.initramfs,
        };
        let handle = self.vms.handle(&id);
        let held = CreatingVm {
            d: self,
            _op: handle.lock_op().await,
            handle,
        };
        steps
            .run(
                "dir",
                "preparing VM directory",
                |u: UndoSlot<'_>| async move {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    u.set(move || async move {
                        tokio::fs::remove_dir_all(&dir)
                            .await
                            .with_context(|| format!("removing {}", dir.display()))
                    });
                    Ok(())
                },
            )
            .await
            .map_err(|e| CreateError::Failed(e.into()))?;
        let store = self.store.clone();
        let rec = vm.clone();
        steps
            .run("record", "recording VM", |u: UndoSlot<'_>| async move {
                store.insert_vm(&rec)?;
                let (s, id) = (store.clone(), rec.id.clone());
                u.set(move || async move { s.delete_vm(&id).map_err(Into::into) });
                Ok(())
            })
            .await
            .map_err(|e| match e.cause.downcast::<banger_store::StoreError>() {
                Ok(se) => se.into(),
                Err(other) => CreateError::Failed(other),
            })?;
        drop(admission);
        Ok((vm, held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_config::{Config, Paths, VmmChoice};
    use banger_model::{Provenance, SpecValue};

    fn new_vm(name: &str) -> NewVm {
        NewVm {
            name: VmName::parse(name).expect("name"),
            image: "img".into(),
            spec: VmSpec {
                vcpu: SpecValue::new(1, Provenance::Flag),
                memory_mib: SpecValue::new(256, Provenance::Flag),
                disk_bytes: SpecValue::new(1 << 30, Provenance::Flag),
            },
            nat: false,
            initramfs: Default::default(),
            start: Default::default(),
        }
    }

    #[tokio::test]
    async fn admission_records_under_the_lock_and_a_rollback_leaves_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        // A backend to name in records; admission never launches it.
        let config = Config {
            vmm: VmmChoice::Qemu,
            qemu_bin: Some("/bin/true".into()),
            ..Config::default()
        };
        let d = Daemon::new(config, Paths::under(t.path())).expect("daemon");
        crate::vm::tests::add_image(&d);

        let mut steps = Steps::new(&banger_api::ProgressSink::discard());
        let (vm, held) = d
            .admit(new_vm("calm-otter"), &mut steps)
            .await
            .expect("admit");
        steps.commit();
        assert_eq!(vm.state, VmState::Creating);
        assert!(vm.dir.is_dir() && vm.ip.is_some());
        assert_eq!(d.store.get_vm(&vm.id).expect("recorded").name, vm.name);
        let handle = d.vms.existing(&vm.id).expect("a handle");
        assert!(handle.is_busy(), "held until handed over");
        drop(held);
        assert!(!handle.is_busy());
        assert!(d.vms.existing(&vm.id).is_some(), "a recorded VM keeps it");

        let mut steps = Steps::new(&banger_api::ProgressSink::discard());
        match d.admit(new_vm("calm-otter"), &mut steps).await {
            Err(e @ CreateError::NameTaken(_)) => {
                assert_eq!(e.kind(), crate::ErrorKind::Conflict);
                assert_eq!(
                    e.to_string(),
                    "a VM named calm-otter already exists: pick another --name or `banger vm delete calm-otter`"
                );
            }
            other => panic!("expected a name clash: {:?}", other.map(|(v, _)| v)),
        }

        let mut steps = Steps::new(&banger_api::ProgressSink::discard());
        let (other, held) = d
            .admit(new_vm("bold-heron"), &mut steps)
            .await
            .expect("admit");
        assert_ne!(other.ip, vm.ip, "each VM its own address");
        assert!(steps.rollback().await.is_empty());
        assert!(!other.dir.exists());
        drop(held);
        assert!(d.vms.existing(&other.id).is_none(), "no record, no handle");
        assert_eq!(d.store.list_vms().expect("list").len(), 1);
        assert_eq!(d.vms.len(), 1);
    }
}
