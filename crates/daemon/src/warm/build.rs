//! Making a template: a transient VM (so boot, reconcile and exit watching
//! are the ordinary ones) boots the image with nothing per-VM or per-user
//! in it, settles, is sealed by its agent and snapshotted; its memory,
//! state and disks move into `templates/<id>/` with a header.

use super::TemplateError;
use super::header::{self, FileEntry, Header, MEMORY_FILE, VMSTATE_FILE};
use super::key::{KeyInput, key_id};
use crate::Daemon;
use crate::vm::{BOOT_INITRD_FILE, BootInitrd};
use crate::vm::{BootCtx, BootError, BootPurpose, Readiness, TEMPLATE_MAC, Unready, now_rfc3339};
use anyhow::{Context, anyhow};
use banger_agent_proto::ExecRequest;
use banger_agent_proto::client::{AgentClient, ExecEvent};
use banger_api::{ProgressSink, Step};
use banger_config::{HostResources, apply_flags, effective_defaults};
use banger_model::{
    InitramfsMode, Provenance, SpecValue, TemplateRecord, TemplateShape, TemplateState, VmRecord,
};
use banger_storage::{VmDisks, WorkSource};
use banger_vmm::{SnapshotFiles, VmPaths};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Quiet time after the guest's init finished, so its last start-up
/// writes are done before the seal.
const SETTLE: Duration = Duration::from_millis(500);

/// How long the template's warm-up command may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(30);

/// Runs one command in the template's guest before the seal, as every
/// restored clone's first command would: what the guest sets up once for
/// its first process (the agent's child reaping, the loader's and libc's
/// pages in its cache) is then in the snapshot instead of in that
/// command's time. Best effort: an image without `true` is warmed less.
async fn warm_up(agent: &AgentClient) {
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let ran = async {
        let mut session = agent.exec(req)?;
        while let Some(ev) = session.next_event().await? {
            if let ExecEvent::Exited(status) = ev {
                return Ok(Some(status));
            }
        }
        Ok::<_, banger_agent_proto::client::ClientError>(None)
    };
    match tokio::time::timeout(WARM_UP_LIMIT, ran).await {
        Ok(Ok(Some(status))) if status.code == Some(0) => {}
        Ok(Ok(other)) => tracing::debug!(status = ?other, "the template's warm-up command failed"),
        Ok(Err(e)) => tracing::debug!(error = %e, "the template's warm-up command failed"),
        Err(_) => tracing::debug!("the template's warm-up command timed out"),
    }
}

/// The name of the transient VM of a template build: a DNS label.
fn transient_name(image: &str, shape: TemplateShape) -> String {
    let clean: String = image
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let suffix = format!("-{}c{}m", shape.vcpu, shape.memory_mib);
    let room = banger_model::VM_NAME_MAX_LEN - "warm-".len() - suffix.len();
    let head: String = clean.chars().take(room).collect();
    format!("warm-{}{suffix}", head.trim_matches('-'))
}

impl Daemon {
    /// The shape a create with these flags gets (the effective defaults).
    pub(crate) fn default_shape(
        &self,
        vcpu: Option<u32>,
        memory_mib: Option<u64>,
    ) -> TemplateShape {
        let defaults = effective_defaults(&self.config.vm_defaults, &HostResources::detect());
        let spec = apply_flags(defaults, vcpu, memory_mib, None);
        TemplateShape {
            vcpu: spec.vcpu.value,
            memory_mib: spec.memory_mib.value,
        }
    }

    /// Makes (or remakes) the template of `image` in `shape`. One build at
    /// a time; an up-to-date template is returned as it is.
    pub async fn build_template(
        self: &Arc<Self>,
        image_name: &str,
        shape: TemplateShape,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<TemplateRecord, TemplateError> {
        let backend_id = self
            .warm_backend()
            .await
            .map_err(TemplateError::Unsupported)?;
        let image = self.ensure_image(image_name, progress, cancel).await?;
        progress.phase(Step::Wait, "waiting for other template builds");
        let _one = tokio::select! {
            g = self.template_build.lock() => g,
            _ = cancel.cancelled() => return Err(TemplateError::Cancelled(self.cancel_reason())),
        };
        let kernel = self.store.get_kernel(&image.kernel)?;
        let looked =
            self.lookup_template(&image, &kernel, self.config.initramfs, &backend_id, shape);
        if let super::plan::Lookup::Found { template, .. } = looked.lookup
            && let Some((row, _)) = self.store.get_template(&template.header.id)?
        {
            progress.phase(Step::Done, format!("template {} is up to date", row.id));
            return Ok(row);
        }
        let started = Instant::now();
        let name = transient_name(&image.name, shape);
        if let Ok(old) = self.store.resolve_vm(&name) {
            progress.phase(
                Step::Cleanup,
                format!("removing a leftover transient VM {name}"),
            );
            self.delete_vm(old.id.as_str()).await?;
        }
        let vm = self.template_vm(&name, &image.name, shape).await?;
        progress.phase(
            Step::Vm,
            format!("transient VM {name} ({shape}; removed when the build ends)"),
        );
        let built = self
            .build_in(&vm, &image, &backend_id, started, progress, cancel)
            .await;
        let removed = self.delete_vm(vm.id.as_str()).await;
        match (built, removed) {
            (Ok(t), Ok(_)) => {
                progress.phase(
                    Step::Done,
                    format!(
                        "template {} of {} ({shape}) saved in {:.1}s",
                        t.id,
                        image.name,
                        started.elapsed().as_secs_f64()
                    ),
                );
                self.evict_templates(&image.name, &t.id);
                Ok(t)
            }
            (Ok(t), Err(e)) => {
                // The template itself is complete; only the leftover VM is not.
                tracing::warn!(vm = %name, error = %e, "transient VM not removed");
                Ok(t)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Records the transient VM of a build (state `creating`), with its
    /// directory and an address (its NIC exists but is never configured).
    async fn template_vm(
        &self,
        name: &str,
        image: &str,
        shape: TemplateShape,
    ) -> Result<VmRecord, TemplateError> {
        let defaults = effective_defaults(&self.config.vm_defaults, &HostResources::detect());
        let mut spec = apply_flags(defaults, None, None, None);
        spec.vcpu = SpecValue::new(shape.vcpu, Provenance::Flag);
        spec.memory_mib = SpecValue::new(shape.memory_mib, Provenance::Flag);
        Ok(self.record_transient_vm(name, image, spec, false).await?)
    }

    /// Disks, boot, settle, seal, snapshot and save of the transient VM.
    async fn build_in(
        self: &Arc<Self>,
        vm: &VmRecord,
        image: &banger_model::ImageRecord,
        backend_id: &str,
        started: Instant,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<TemplateRecord, TemplateError> {
        let guard = self.lock_vm_id(&vm.id).await?;
        let mut vm = guard.vm.clone();
        let vmm = self.vmm()?.clone();
        let kernel = self.store.get_kernel(&image.kernel)?;
        let disks = VmDisks::in_dir(&vm.dir);
        let disk_bytes = vm.spec.disk_bytes.value;
        progress.phase(
            Step::Disks,
            "creating the system overlay and /root work disk",
        );
        let source = match &image.work_seed {
            Some(s) => WorkSource::Seed(s),
            None => WorkSource::Empty,
        };
        let (o, w) = tokio::join!(
            banger_storage::create_overlay_disk(&disks.overlay, disk_bytes),
            banger_storage::create_work_disk(source, &disks.work, disk_bytes),
        );
        o.context("creating the system overlay disk")?;
        w.context("creating the /root work disk")?;

        let mut steps = crate::steps::Steps::new(progress);
        let ctx = BootCtx {
            vmm: &vmm,
            kernel: &kernel,
            image,
            progress,
            cancel,
            writable_root: None,
            purpose: BootPurpose::Template,
        };
        // Whatever happens, the transient VM is deleted after the build:
        // a guest not ready is kept only until then.
        let spec = match self.boot(ctx, &mut vm, &mut steps).await {
            Ok(spec) => spec,
            Err(BootError::NotReady(m)) => {
                steps.commit();
                return Err(TemplateError::NotUp(m));
            }
            Err(e) => return Err(e.into()),
        };
        steps.commit();
        // Sealing wants a booted system.
        match self
            .wait_ready(&vm, Readiness::SYSTEM, progress, cancel)
            .await
        {
            Ok(()) => {}
            Err(Unready::TimedOut(m)) => return Err(TemplateError::NotBooted(m)),
            Err(Unready::Cancelled(why)) => return Err(TemplateError::Cancelled(why)),
            Err(Unready::Stopped(e)) => {
                return Err(TemplateError::NotBooted(format!("{e:#}")));
            }
        }
        let agent = self
            .agent(&vm.id)
            .ok_or_else(|| anyhow!("the template's guest has no agent connection"))?;
        warm_up(&agent).await;
        tokio::time::sleep(SETTLE).await;
        let initrd_kind = self
            .boot_facts(&vm.id)
            .map(|f| f.initrd)
            .ok_or_else(|| anyhow!("the template's boot left no record of its initramfs"))?;
        progress.phase(
            Step::Seal,
            "sealing the guest (sshd stopped, host keys removed)",
        );
        let seal = agent.seal().await.context("sealing the template's guest")?;
        let pid = vm
            .pid
            .ok_or_else(|| anyhow!("the template's VMM has no pid"))?;
        let backend = vmm.backend();
        let snap = SnapshotFiles {
            memory: vm.dir.join(MEMORY_FILE),
            vmstate: vm.dir.join(VMSTATE_FILE),
        };
        progress.phase(
            Step::Snapshot,
            format!(
                "saving the guest's memory and state ({} MiB of memory)",
                vm.spec.memory_mib.value
            ),
        );
        if let Err(e) = vmm.snapshot(&vm.dir, pid, &snap).await {
            let _ = vmm.terminate(&vm.dir, pid).await;
            return Err(anyhow::Error::from(e).context("saving the template").into());
        }
        // The guest is gone for good; the exit watcher records it stopped.
        self.set_agent(&vm.id, None);
        drop(guard);

        // The key as this boot really was (the kernel record may have
        // gained banger's initramfs part during it).
        let kernel = self.store.get_kernel(&image.kernel)?;
        let initramfs = match initrd_kind {
            BootInitrd::Banger => InitramfsMode::Banger,
            BootInitrd::Distro | BootInitrd::None => InitramfsMode::Distro,
        };
        let shape = TemplateShape {
            vcpu: vm.spec.vcpu.value,
            memory_mib: vm.spec.memory_mib.value,
        };
        let key = self.template_key(&KeyInput {
            image,
            kernel: &kernel,
            initramfs,
            backend,
            backend_id,
            shape,
            nic: self.nic_kind(),
        })?;
        let id = key_id(&key);
        let final_dir = self.templates_dir().join(&id);
        let partial = self.templates_dir().join(format!("{id}.partial"));
        progress.phase(Step::Save, format!("saving template {id}"));
        let mut names = vec![
            MEMORY_FILE.to_string(),
            VMSTATE_FILE.to_string(),
            disks_name(&disks.overlay),
            disks_name(&disks.work),
        ];
        let initrd = match (initrd_kind, &spec.initrd) {
            (BootInitrd::Banger, _) => {
                names.push(BOOT_INITRD_FILE.into());
                Some(BOOT_INITRD_FILE.to_string())
            }
            (_, Some(p)) => Some(p.display().to_string()),
            (_, None) => None,
        };
        let mut header = Header {
            magic: header::MAGIC.into(),
            format: banger_model::TEMPLATE_FORMAT,
            id: id.clone(),
            key: key.clone(),
            disk_bytes: vm.spec.disk_bytes.value,
            template_mac: TEMPLATE_MAC.into(),
            cmdline: spec.extra_cmdline.clone(),
            kernel: spec.kernel.clone(),
            initrd,
            files: Vec::new(),
            seal,
            created_at: now_rfc3339(),
            build_ms: 0,
            banger: banger_version::BuildInfo::current().line("bangerd"),
        };
        let key_json = serde_json::to_string(&key).context("encoding the template key")?;
        let (vm_dir, templates) = (vm.dir.clone(), self.templates_dir());
        let (p2, f2) = (partial.clone(), final_dir.clone());
        let console = VmPaths::new(&vm.dir).console_log();
        // Hashing is stopped when the client goes or the daemon stops: the
        // runtime would otherwise wait for this thread before it exits.
        let stop = cancel.clone();
        let saved = tokio::task::spawn_blocking(move || -> anyhow::Result<(Header, u64)> {
            let stopped = || stop.is_cancelled();
            let files = publish(&templates, &vm_dir, &p2, &names, &console, &stopped)?;
            header.files = files;
            header.build_ms = started.elapsed().as_millis() as u64;
            header::write_header(&p2, &header)?;
            let size = allocated(&p2);
            match std::fs::remove_dir_all(&f2) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing the old {}", f2.display()));
                }
            }
            std::fs::rename(&p2, &f2).with_context(|| format!("renaming {}", p2.display()))?;
            Ok((header, size))
        })
        .await
        .map_err(|e| anyhow!("template save worker: {e}"))?;
        let (header, size) = match saved {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                if matches!(
                    e.downcast_ref::<banger_storage::DigestError>(),
                    Some(banger_storage::DigestError::Stopped { .. })
                ) {
                    return Err(TemplateError::Cancelled(self.cancel_reason()));
                }
                return Err(e.into());
            }
        };
        let record = TemplateRecord {
            id: id.clone(),
            image: image.name.clone(),
            backend,
            shape,
            disk_bytes: header.disk_bytes,
            dir: final_dir.clone(),
            state: TemplateState::Ready,
            size_bytes: size,
            build_ms: Some(header.build_ms),
            created_at: header.created_at.clone(),
            last_used_at: None,
            uses: 0,
        };
        if let Err(e) = self.store.upsert_template(&record, &key_json) {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e.into());
        }
        tracing::info!(template = %id, image = %image.name, vcpu = shape.vcpu, memory_mib = shape.memory_mib, build_ms = header.build_ms, size_bytes = size, "template saved");
        Ok(record)
    }
}

fn disks_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Moves `names` from the VM directory into a new private `partial`
/// directory (and the boot's console log, for clones' `vm logs`), each
/// file fsynced, made 0600 and hashed (until `stop` says otherwise).
fn publish(
    templates: &Path,
    vm_dir: &Path,
    partial: &Path,
    names: &[String],
    console: &Path,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<Vec<FileEntry>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(templates)
        .with_context(|| format!("creating {}", templates.display()))?;
    let _ = std::fs::remove_dir_all(partial);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut out = Vec::new();
    for name in names {
        let (from, to) = (vm_dir.join(name), partial.join(name));
        std::fs::rename(&from, &to)
            .with_context(|| format!("moving {} into the template", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", to.display()))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", to.display()))?;
        out.push(header::entry(partial, name, stop)?);
    }
    if console.is_file() {
        let to = partial.join(header::CONSOLE_FILE);
        if std::fs::rename(console, &to).is_ok() {
            let _ = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600));
        }
    }
    std::fs::File::open(partial)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing {}", partial.display()))?;
    Ok(out)
}

/// Bytes the files of `dir` take on disk.
pub(crate) fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::VmName;

    #[test]
    fn transient_names_are_dns_labels() {
        let shape = TemplateShape {
            vcpu: 2,
            memory_mib: 2048,
        };
        assert_eq!(
            transient_name("debian-bookworm", shape),
            "warm-debian-bookworm-2c2048m"
        );
        assert_eq!(transient_name("my_img.v2", shape), "warm-my-img-v2-2c2048m");
        let long = transient_name(&"x".repeat(100), shape);
        assert!(VmName::parse(&long).is_ok(), "{long}");
    }

    #[test]
    fn a_stopped_save_says_so_and_a_finished_one_hashes_only_data() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().expect("tmp");
        let (vm, templates) = (t.path().join("vm"), t.path().join("templates"));
        std::fs::create_dir(&vm).expect("vm dir");
        // A sparse 64 GiB disk: read whole, it would take minutes.
        let disk = std::fs::File::create(vm.join("work.ext4")).expect("disk");
        disk.set_len(64 << 30).expect("size");
        disk.write_all_at(b"data", 1 << 30).expect("write");
        let names = vec!["work.ext4".to_string()];
        let partial = templates.join("t.partial");
        let console = vm.join("console.log");
        let e =
            publish(&templates, &vm, &partial, &names, &console, &|| true).expect_err("stopped");
        assert!(
            matches!(
                e.downcast_ref::<banger_storage::DigestError>(),
                Some(banger_storage::DigestError::Stopped { .. })
            ),
            "{e:#}"
        );
        // Moved back for a second try, which finishes.
        std::fs::rename(partial.join("work.ext4"), vm.join("work.ext4")).expect("back");
        let files = publish(&templates, &vm, &partial, &names, &console, &|| false).expect("saved");
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].size, 64 << 30);
        assert_eq!(
            files[0].digest,
            banger_storage::content_digest(&partial.join("work.ext4"), &|| false).expect("d")
        );
    }
}
