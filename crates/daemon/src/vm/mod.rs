//! What the daemon holds about each VM at run time, and the one way into
//! a VM for an operation.

pub(crate) mod registry;

#[cfg(test)]
pub(crate) mod tests {
    use crate::Daemon;
    use banger_config::{Config, Paths};
    use banger_model::{
        ImageRecord, KernelRecord, Provenance, SpecValue, VmBackend, VmId, VmName, VmRecord,
        VmSpec, VmState,
    };
    use std::sync::Arc;

    /// A daemon over a fresh state directory, with one image to record
    /// VMs of. It never boots anything.
    pub(crate) fn daemon(t: &tempfile::TempDir) -> Arc<Daemon> {
        let d = Daemon::new(Config::default(), Paths::under(t.path())).expect("daemon");
        d.store
            .upsert_kernel(&KernelRecord {
                name: "k".into(),
                kernel: "/k/vmlinuz".into(),
                initrd: None,
                vmlinux: None,
                release: None,
                dir: None,
                banger_initramfs: None,
                created_at: "2026-01-01T00:00:00Z".into(),
            })
            .expect("kernel");
        d.store
            .upsert_image(&ImageRecord {
                name: "img".into(),
                rootfs: "/i/img/rootfs.ext4".into(),
                kernel: "k".into(),
                managed: true,
                work_seed: None,
                size_bytes: 0,
                created_at: "2026-01-01T00:00:00Z".into(),
            })
            .expect("image");
        d
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
}
