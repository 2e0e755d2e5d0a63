//! VM lifecycle: create (+ boot), delete, exec, exit watching.

use crate::boot_path::{BootFacts, BootInitrd};
use crate::steps::{Steps, UndoSlot};
use crate::vm::admit::NewVm;
use crate::warm::plan::{ColdReason, StartPlan};
use crate::{Daemon, DaemonError};
use anyhow::{Context, anyhow};
use banger_agent_proto::boot::BootArgs;
use banger_agent_proto::client::AgentClient;
use banger_api::{CreateVmEvent, CreateVmRequest, Progress};
use banger_config::{Config, HostResources, apply_flags, effective_defaults};
use banger_model::{
    ImageRecord, KernelRecord, StartInfo, TemplateShape, VmBackend, VmId, VmName, VmRecord,
    VmState, WarmMode, WarmSetting, generate_name,
};
use banger_storage::{VmDisks, WorkSource};
use banger_vmm::{DiskFormat, DiskSpec, HostFacts, LaunchSpec, VmPaths, Vmm, select_backend};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// Sends progress events of one operation.
pub(crate) struct Reporter {
    tx: mpsc::UnboundedSender<CreateVmEvent>,
    started: Instant,
}

impl Reporter {
    pub(crate) fn new(tx: mpsc::UnboundedSender<CreateVmEvent>) -> Self {
        Self {
            tx,
            started: Instant::now(),
        }
    }
    pub(crate) fn progress(&self, phase: &str, message: &str) {
        let _ = self.tx.send(CreateVmEvent::Progress(Progress {
            phase: phase.into(),
            message: message.to_string(),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }));
    }
    fn send(&self, ev: CreateVmEvent) {
        let _ = self.tx.send(ev);
    }
}

impl Daemon {
    /// `--nat` needs bridge networking.
    fn check_nat_mode(&self, nat: bool) -> Result<(), DaemonError> {
        if nat
            && let Some(net) = self.network()
            && net.mode_name() != "bridge"
        {
            return Err(DaemonError::Conflict(format!(
                "--nat needs bridge networking; this daemon uses {} networking (see banger doctor)",
                net.mode_name()
            )));
        }
        Ok(())
    }

    /// The checks of a create request that need no lock and change nothing,
    /// so a bad request is answered with its error before the operation's
    /// stream starts. [`Daemon::create_vm`] checks again where it matters.
    pub(crate) fn check_create(&self, req: &CreateVmRequest) -> Result<(), DaemonError> {
        if let Some(n) = &req.name {
            let name = VmName::parse(n).map_err(|e| DaemonError::Invalid(e.to_string()))?;
            self.check_name_free(&name)?;
        }
        crate::settings::check_resources(req.vcpu, req.memory_mib, req.disk_size.as_deref())?;
        if let Some(image) = &req.image {
            crate::images::check_name("image", image)?;
            if *image != self.config.default_image_name {
                self.store.get_image(image).map_err(|_| {
                    DaemonError::NotFound(format!(
                        "no image named {image}: see `banger image list`"
                    ))
                })?;
            }
        }
        self.check_nat_mode(req.nat)?;
        if req.warm == WarmMode::Require {
            if !req.start {
                return Err(DaemonError::Invalid(
                    "--warm restores a running VM: it cannot go with --no-start".into(),
                ));
            }
            if self.config.warm_start == WarmSetting::Off {
                return Err(DaemonError::Conflict(
                    "--warm: warm starts are off (warm_start = \"off\" in config.toml)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Creates a VM and, unless `req.start` is false, boots it and waits for
    /// its agent. Emits `Planned`, then progress; the caller sends `Done`/`Error`.
    /// Cancelling `cancel` (the client went away) before the VM is ready
    /// rolls everything back.
    pub async fn create_vm(
        self: &Arc<Self>,
        req: CreateVmRequest,
        tx: mpsc::UnboundedSender<CreateVmEvent>,
        cancel: CancellationToken,
    ) -> Result<VmRecord, DaemonError> {
        let rep = Reporter::new(tx);
        let vmm = self.vmm()?.clone();
        let _in_flight = CreateGuard::new(self);
        let name = match &req.name {
            Some(n) => VmName::parse(n).map_err(|e| DaemonError::Invalid(e.to_string()))?,
            None => self.unused_name()?,
        };
        self.check_name_free(&name)?;
        let disk =
            crate::settings::check_resources(req.vcpu, req.memory_mib, req.disk_size.as_deref())?;
        let defaults = effective_defaults(&self.config.vm_defaults, &HostResources::detect());
        let spec = apply_flags(defaults, req.vcpu, req.memory_mib, disk);
        rep.send(CreateVmEvent::Planned(banger_api::PlannedVm {
            name: name.to_string(),
            spec,
        }));

        let image_name = req
            .image
            .clone()
            .unwrap_or_else(|| self.config.default_image_name.clone());
        let image = self
            .ensure_image(&image_name, &|phase, msg| rep.progress(phase, msg), &cancel)
            .await?;
        if cancel.is_cancelled() {
            return Err(DaemonError::Failed(anyhow!(self.cancel_reason())));
        }
        let kernel = self.store.get_kernel(&image.kernel)?;

        self.check_nat_mode(req.nat)?;
        let initramfs = req.initramfs.unwrap_or(self.config.initramfs);
        let shape = TemplateShape {
            vcpu: spec.vcpu.value,
            memory_mib: spec.memory_mib.value,
        };
        // Warm or cold, decided before anything is made: `--warm` without
        // a usable template fails here, leaving nothing behind.
        let plan = if req.start {
            self.plan_start(
                req.warm,
                &image,
                &kernel,
                initramfs,
                shape,
                spec.disk_bytes.value,
            )
            .await
        } else {
            StartPlan::Cold(ColdReason::NotAsked)
        };
        let mut cold_note = None;
        let warm_template = match plan {
            StartPlan::Warm(t) => Some(t),
            StartPlan::Cold(reason) => {
                if req.warm == WarmMode::Require {
                    return Err(DaemonError::Conflict(format!("--warm: {reason}")));
                }
                if req.start {
                    rep.progress("start", &format!("cold ({reason})"));
                    if reason.wants_template() && self.config.warm_start == WarmSetting::Auto {
                        self.queue_template_build(&image.name, shape);
                    }
                    cold_note = Some(reason.to_string());
                }
                None
            }
        };
        let progress = |phase: &str, msg: &str| rep.progress(phase, msg);
        let mut steps = Steps::new(|phase, msg| rep.progress(phase, msg));
        let new = NewVm {
            name,
            image: image.name.clone(),
            spec,
            nat: req.nat,
            initramfs,
            start: StartInfo::cold(cold_note),
        };
        // Its lock is held from before the record exists; a failed create
        // removes the VM's handle with the record.
        let (mut vm, _held) = self.admit(new, &mut steps).await?;
        let (id, dir) = (vm.id.clone(), vm.dir.clone());
        let this = self.clone();
        let mut warmed = false;
        if let Some(template) = &warm_template {
            rep.progress(
                "start",
                &format!("warm (restoring template {})", template.header.id),
            );
            match this
                .try_warm(&mut vm, &image, template, &mut steps, &progress, &cancel)
                .await
            {
                Ok(_) => warmed = true,
                Err(e) => {
                    let why = format!("{:#}", e.cause);
                    if req.warm == WarmMode::Require {
                        let rollback_errors = steps.rollback().await;
                        return Err(DaemonError::Failed(
                            crate::steps::StepError {
                                step: e.step,
                                cause: anyhow!("--warm: warm start failed: {why}"),
                                rollback_errors,
                            }
                            .into(),
                        ));
                    }
                    tracing::warn!(vm = %vm.name, template = %template.header.id, step = e.step, error = %why, "warm start failed; booting cold");
                    rep.progress("start", &format!("cold (warm start failed: {why})"));
                    if e.blames_template()
                        && let Ok(Some((row, _))) = this.store.get_template(&template.header.id)
                    {
                        this.remove_template(&row);
                    }
                    vm.start = StartInfo::cold(Some(format!("warm start failed: {why}")));
                    vm.state = VmState::Creating;
                    this.store.set_vm_start(&id, &vm.start)?;
                }
            }
        }
        let disks = VmDisks::in_dir(&dir);
        let size = spec.disk_bytes.value;
        if !warmed {
            let (overlay, work, seed) = (
                disks.overlay.clone(),
                disks.work.clone(),
                image.work_seed.clone(),
            );
            steps
                .run(
                    "disks",
                    "creating the system overlay and /root work disk",
                    |u: UndoSlot<'_>| async move {
                        let source = match &seed {
                            Some(s) => WorkSource::Seed(s),
                            None => WorkSource::Empty,
                        };
                        // Independent files, each made by a few e2fsprogs runs:
                        // side by side. Each removes its own file on failure.
                        let (o, w) = tokio::join!(
                            banger_storage::create_overlay_disk(&overlay, size),
                            banger_storage::create_work_disk(source, &work, size),
                        );
                        let made = |r: &Result<(), _>, p: &std::path::Path| {
                            r.is_ok().then(|| p.to_path_buf())
                        };
                        let undo: Vec<_> = [made(&o, &overlay), made(&w, &work)]
                            .into_iter()
                            .flatten()
                            .collect();
                        u.set(move || async move {
                            for p in undo {
                                tokio::fs::remove_file(&p)
                                    .await
                                    .with_context(|| format!("removing {}", p.display()))?;
                            }
                            Ok(())
                        });
                        o.context("creating the system overlay disk")?;
                        w.context("creating the /root work disk")?;
                        Ok(())
                    },
                )
                .await
                .map_err(|e| DaemonError::Failed(e.into()))?;
            let (this2, rec) = (self.clone(), vm.clone());
            steps
                .run("ssh", "giving the VM its ssh host key", |_| async move {
                    this2.provision_ssh(&rec).await?;
                    if let Err(e) = this2.refresh_known_hosts() {
                        tracing::warn!(error = %format!("{e:#}"), "known_hosts not updated");
                    }
                    Ok(())
                })
                .await
                .map_err(|e| DaemonError::Failed(e.into()))?;
            if !self.config.file_sync.is_empty() {
                let (this2, rec, rep) = (self.clone(), vm.clone(), &rep);
                steps
                    .run(
                        "files",
                        "copying [[file_sync]] files into /root",
                        |_| async move {
                            this2
                                .sync_files(&rec, &|w| rep.progress("warning", w))
                                .await
                        },
                    )
                    .await
                    .map_err(|e| DaemonError::Failed(e.into()))?;
            }
        }
        if !req.start {
            this.set_state(&mut vm, VmState::Stopped, None, None)?;
            steps.commit();
            return Ok(vm);
        }
        let ctx = BootCtx {
            vmm: &vmm,
            kernel: &kernel,
            image: &image,
            progress: &progress,
            cancel: &cancel,
            writable_root: None,
            purpose: BootPurpose::Vm,
        };
        let mut booted = if warmed {
            Ok(())
        } else {
            this.boot(ctx, &mut vm, &mut steps).await.map(|_| ())
        };
        if booted.is_ok() && req.wait_boot.unwrap_or(self.config.wait_boot) {
            booted = match this.wait_system(&vm, &progress, &cancel).await {
                crate::boot_path::SystemWait::Booted => Ok(()),
                crate::boot_path::SystemWait::TimedOut(msg) => Err(BootError::NotReady(msg)),
                crate::boot_path::SystemWait::Cancelled => {
                    this.set_agent(&id, None);
                    Err(fail(&mut steps, anyhow!(this.cancel_reason())).await)
                }
            };
        }
        if booted.is_ok() && req.wait_ssh {
            booted = match this.wait_sshd(&vm, &progress, &cancel).await {
                crate::run_mode::SshWait::Up => Ok(()),
                // Kept like a guest whose agent never greeted.
                crate::run_mode::SshWait::TimedOut(msg) => Err(BootError::NotReady(format!(
                    "{msg}; the VM is kept running for inspection: `banger vm logs {name}` shows its console, `banger vm delete {name}` removes it",
                    name = vm.name
                ))),
                crate::run_mode::SshWait::Cancelled => {
                    this.set_agent(&id, None);
                    Err(fail(&mut steps, anyhow!(this.cancel_reason())).await)
                }
            };
        }
        match booted {
            Ok(()) => {
                steps.commit();
                if let Err(e) = this.refresh_known_hosts() {
                    tracing::warn!(error = %format!("{e:#}"), "ssh files not updated");
                }
                Ok(vm)
            }
            Err(BootError::NotReady(msg)) => {
                // Keep the VM for post-mortem: its console log says why.
                steps.commit();
                let pid = vm.pid;
                this.set_state(&mut vm, VmState::Error, pid, Some(&msg))?;
                Err(DaemonError::Failed(anyhow!(msg)))
            }
            Err(BootError::Failed(e)) => Err(DaemonError::Failed(e)),
        }
    }

    /// Why an operation's cancellation token fired.
    pub(crate) fn cancel_reason(&self) -> &'static str {
        if self.shutdown.is_cancelled() {
            "cancelled: the daemon is shutting down"
        } else {
            "cancelled: the client went away"
        }
    }

    fn unused_name(&self) -> Result<VmName, DaemonError> {
        let taken: Vec<VmName> = self.store.list_vms()?.into_iter().map(|v| v.name).collect();
        for _ in 0..100 {
            let n = generate_name();
            if !taken.contains(&n) {
                return Ok(n);
            }
        }
        Err(DaemonError::Failed(anyhow!(
            "could not find a free VM name; pass --name"
        )))
    }

    /// Boots `vm` (state must be creating or stopped) and waits for its agent.
    pub(crate) async fn boot(
        self: &Arc<Self>,
        ctx: BootCtx<'_>,
        vm: &mut VmRecord,
        steps: &mut Steps<'_>,
    ) -> Result<LaunchSpec, BootError> {
        let BootCtx {
            vmm,
            kernel,
            image,
            progress,
            cancel,
            writable_root,
            purpose,
        } = ctx;
        let template = purpose == BootPurpose::Template;
        let paths = VmPaths::new(&vm.dir);
        let disks = VmDisks::in_dir(&vm.dir);
        if let Err(e) = self.set_state(vm, VmState::Starting, None, None) {
            return Err(fail(steps, e.into()).await);
        }
        // The VM is not running: its work disk may be written. Never into
        // a template, which every VM of every user of this host restores.
        if !template && let Err(e) = self.sync_credentials(vm, &|w| progress("warning", w)).await {
            return Err(fail(steps, e).await);
        }
        // Firecracker boots an uncompressed ELF; QEMU the bzImage.
        let kernel_file = match vmm.backend() {
            VmBackend::Firecracker => match &kernel.vmlinux {
                Some(v) => v.clone(),
                None => {
                    let err = anyhow!(
                        "kernel {} has no vmlinux, which Firecracker needs: re-pull or rebuild image {}, or set vmm = \"qemu\"",
                        kernel.name,
                        image.name
                    );
                    return Err(fail(steps, err).await);
                }
            },
            VmBackend::Qemu => kernel.kernel.clone(),
        };
        progress("network", "setting up the VM's network");
        let boot_net = match self.net_up(vm, steps).await {
            Ok(n) => n,
            Err(e) => return Err(fail(steps, e).await),
        };
        let (boot_args, disk_specs) = boot_layout(image, &disks, writable_root);
        let hostname = if template {
            TEMPLATE_HOSTNAME
        } else {
            vm.name.as_str()
        };
        let mut extra_cmdline = format!("{boot_args} systemd.hostname={hostname}");
        let mut nets = Vec::new();
        if let Some(n) = boot_net {
            if template {
                // Attached but never configured: no address or connection
                // is frozen into the snapshot.
                nets = n.nets;
                for net in &mut nets {
                    net.mac = TEMPLATE_MAC.to_string();
                }
            } else {
                extra_cmdline.push(' ');
                extra_cmdline.push_str(&n.cmdline);
                nets = n.nets;
            }
        }
        let (initrd, initrd_kind) = match self.boot_initrd(vm, kernel, image).await {
            Ok(x) => x,
            Err(e) => return Err(fail(steps, e).await),
        };
        let spec = LaunchSpec {
            name: vm.name.to_string(),
            dir: vm.dir.clone(),
            kernel: kernel_file,
            initrd,
            extra_cmdline,
            disks: disk_specs,
            nets,
            vcpu: vm.spec.vcpu.value,
            memory_mib: vm.spec.memory_mib.value,
        };
        let launch_vmm = vmm.clone();
        let launch_spec = spec.clone();
        let launched = steps
            .run("boot", "starting the VMM", |u: UndoSlot<'_>| async move {
                let vmm = launch_vmm;
                let l = vmm.launch(&launch_spec).await?;
                let (v, d, pid) = (vmm.clone(), launch_spec.dir.clone(), l.pid);
                u.set(move || async move { v.terminate(&d, pid).await.map_err(Into::into) });
                Ok(l)
            })
            .await;
        if initrd_kind == BootInitrd::Banger && !template {
            // The VMM has read it into the guest's memory (QEMU at start-up,
            // Firecracker at InstanceStart).
            let _ = tokio::fs::remove_file(vm.dir.join(crate::boot_path::BOOT_INITRD_FILE)).await;
        }
        let launched = launched.map_err(|e| BootError::Failed(e.into()))?;
        let launched_pid = launched.pid;
        cap_logs(spec.dir.clone(), launched_pid);
        // The console starts over at each launch: so does its time index.
        crate::log_index::spawn_sampler(
            vec![paths.console_log(), paths.vmm_log()],
            launched_pid,
            true,
            self.shutdown.clone(),
        );
        let mut exited = launched.exited;
        let agent_ep = launched.agent;
        if let Err(e) = self.set_state(vm, VmState::Starting, Some(launched_pid), None) {
            return Err(fail(steps, e.into()).await);
        }

        let console = paths.console_log();
        let ready_by = Instant::now() + self.ready_timeout();
        // Firecracker's guest connects to us: a VMM that exits first (a
        // failed boot) or a guest that never connects must not hang this.
        let opened = steps
            .run("agent", "waiting for the guest agent", |_| async {
                tokio::select! {
                    r = tokio::time::timeout_at(ready_by.into(), agent_ep.open()) => match r {
                        Ok(stream) => Ok(Some(AgentClient::spawn(
                            stream.context("connecting to the agent channel")?,
                        ))),
                        Err(_) => Ok(None),
                    },
                    _ = &mut exited => Err(crate::boot_path::stopped_before_agent(vm.name.as_str(), &console)),
                }
            })
            .await
            .map_err(|e| BootError::Failed(e.into()))?;
        let Some(agent) = opened else {
            self.watch_exit(vm.id.clone(), launched_pid, exited);
            return Err(BootError::NotReady(format!(
                "VM {name}'s agent did not connect within {}s (ready_timeout_secs); it is kept running for inspection: `banger vm logs {name}` shows its console ({}), `banger vm delete {name}` removes it",
                self.ready_timeout().as_secs(),
                console.display(),
                name = vm.name,
            )));
        };
        let hello = tokio::select! {
            r = tokio::time::timeout_at(ready_by.into(), agent.wait_hello()) => r,
            _ = cancel.cancelled() => {
                return Err(fail(steps, anyhow!(self.cancel_reason())).await);
            }
        };
        match hello {
            Ok(Ok(hello)) => {
                tracing::info!(vm = %vm.name, agent = %hello.agent_version, guest_uptime_ms = hello.uptime_ms, initramfs = initrd_kind.as_str(), "agent ready");
                self.set_boot_facts(
                    &vm.id,
                    Some(BootFacts {
                        initrd: initrd_kind,
                        hello_ms: hello.uptime_ms,
                    }),
                );
                progress(
                    "ready",
                    &format!(
                        "guest agent is up ({} ms after the guest kernel started; {} initramfs)",
                        hello.uptime_ms,
                        initrd_kind.as_str()
                    ),
                );
            }
            Ok(Err(banger_agent_proto::client::ClientError::Disconnected)) => {
                let err = crate::boot_path::stopped_before_agent(vm.name.as_str(), &console);
                return Err(fail(steps, err).await);
            }
            Ok(Err(e)) => return Err(fail(steps, e.into()).await),
            Err(_) => {
                self.set_agent(&vm.id, Some(agent));
                self.watch_exit(vm.id.clone(), launched_pid, exited);
                return Err(BootError::NotReady(format!(
                    "VM {name} did not signal readiness within {}s (ready_timeout_secs); it is kept running for inspection: `banger vm logs {name}` shows its console ({}), `banger vm delete {name}` removes it",
                    self.ready_timeout().as_secs(),
                    console.display(),
                    name = vm.name,
                )));
            }
        }
        self.set_agent(&vm.id, Some(agent.clone()));
        if let Err(e) = self.set_state(vm, VmState::Running, Some(launched_pid), None) {
            return Err(fail(steps, e.into()).await);
        }
        self.net_ready(vm);
        self.watch_exit(vm.id.clone(), launched_pid, exited);
        Ok(spec)
    }

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

    pub fn list_vms(&self) -> Result<Vec<VmRecord>, DaemonError> {
        Ok(self.store.list_vms()?)
    }

    pub fn get_vm(&self, r: &str) -> Result<VmRecord, DaemonError> {
        Ok(self.store.resolve_vm(r)?)
    }

    /// Stops the VM if it runs, then removes its disks, directory and record.
    pub async fn delete_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord, DaemonError> {
        // Re-read under the lock: a concurrent delete may have won.
        let cx = self.lock_vm(r).await?;
        let vm = &cx.vm;
        cx.handle.set_agent(None);
        cx.handle.set_boot_facts(None);
        if let Some(pid) = vm.pid {
            self.terminate_vmm(vm, pid).await?;
        }
        self.net_down(vm).await;
        match tokio::fs::remove_dir_all(&vm.dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("removing {}", vm.dir.display()))
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

    /// Ends a VM's VMM, through the backend when there is one, else by signal.
    pub(crate) async fn terminate_vmm(&self, vm: &VmRecord, pid: u32) -> Result<(), DaemonError> {
        match self.vmm() {
            Ok(vmm) => vmm
                .terminate(&vm.dir, pid)
                .await
                .context("stopping the VMM")
                .map_err(Into::into),
            Err(_) => {
                if banger_vmm::vmm_process_alive(pid, &vm.dir) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Ok(())
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

/// Counts one create in flight while it lives (background template
/// builds wait for none).
struct CreateGuard<'a>(&'a Daemon);

impl<'a> CreateGuard<'a> {
    fn new(d: &'a Daemon) -> Self {
        d.creates.send_modify(|n| *n += 1);
        Self(d)
    }
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        self.0.creates.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What a boot needs besides the VM and its steps.
pub(crate) struct BootCtx<'a> {
    pub(crate) vmm: &'a Arc<dyn Vmm>,
    pub(crate) kernel: &'a KernelRecord,
    pub(crate) image: &'a ImageRecord,
    pub(crate) progress: &'a (dyn Fn(&str, &str) + Sync),
    pub(crate) cancel: &'a CancellationToken,
    /// Boot this writable root file system instead of the image's shared
    /// one under an overlay (the transient VM of `image build
    /// --from-image`, whose writes must land in the new image's file).
    pub(crate) writable_root: Option<&'a std::path::Path>,
    pub(crate) purpose: BootPurpose,
}

/// What a boot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BootPurpose {
    /// A VM of its own: its name, address and the owner's credentials.
    Vm,
    /// A warm-start template's guest: nothing per-VM or per-user enters it
    /// (neutral host name, NIC attached but never configured, no
    /// credentials), and banger's initrd is kept for the restores.
    Template,
}

/// Host name of every template guest (clones get their own at restore).
pub(crate) const TEMPLATE_HOSTNAME: &str = "banger";
/// MAC of every template guest's NIC (clones set their own at restore).
pub(crate) const TEMPLATE_MAC: &str = "06:00:00:00:00:01";

/// Kernel parameters and disks of a boot.
///
/// The standard layout is the boot contract's: the image's root
/// (read-only), the VM's overlay, its work disk. With a writable root there
/// is no overlay: early init boots that root as it is, mounted `rw` (by
/// banger's initramfs, the distribution's or the kernel), and the work disk
/// comes second.
fn boot_layout(
    image: &ImageRecord,
    disks: &VmDisks,
    writable_root: Option<&std::path::Path>,
) -> (String, Vec<DiskSpec>) {
    let disk = |path: &std::path::Path, read_only: bool| DiskSpec {
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
        read_only,
    };
    match writable_root {
        None => (
            BootArgs::standard().kernel_params(banger_agent_proto::install::BINARY_PATH),
            vec![
                disk(&image.rootfs, true),
                disk(&disks.overlay, false),
                disk(&disks.work, false),
            ],
        ),
        Some(root) => {
            let args = BootArgs {
                root_writable: true,
                overlay: None,
                work: None,
                ..BootArgs::standard()
            };
            (
                args.kernel_params(banger_agent_proto::install::BINARY_PATH),
                vec![disk(root, false), disk(&disks.work, false)],
            )
        }
    }
}

/// Guest device of the work disk in the writable-root layout of
/// [`boot_layout`].
pub(crate) const WRITABLE_ROOT_WORK_DEVICE: &str = "/dev/vdb";

/// Why a boot did not end with a ready VM.
pub(crate) enum BootError {
    /// The guest did not greet in time; the VM is kept for inspection.
    NotReady(String),
    /// Boot failed and everything the operation made was rolled back.
    Failed(anyhow::Error),
}

/// Rolls back every step so far and reports `cause` with any undo failures.
async fn fail(steps: &mut Steps<'_>, cause: anyhow::Error) -> BootError {
    let rollback_errors = steps.rollback().await;
    BootError::Failed(
        crate::steps::StepError {
            step: "boot",
            cause,
            rollback_errors,
        }
        .into(),
    )
}

/// The last lines of a console log, for error messages.
pub(crate) fn console_tail(path: &std::path::Path) -> String {
    // The last 64 KiB hold the last 15 lines of any console worth reading.
    let tail = |path: &std::path::Path| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut b = Vec::new();
        f.take(64 * 1024).read_to_end(&mut b)?;
        Ok(b)
    };
    let text = tail(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A kernel panic's stack dump says nothing to a user; what led to it does.
    if let Some(i) = lines.iter().position(|l| l.contains("Kernel panic")) {
        lines.truncate(i + 1);
    }
    lines[lines.len().saturating_sub(15)..].join("\n")
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn boot_layouts() {
        let image = ImageRecord {
            name: "img".into(),
            rootfs: "/images/img/rootfs.ext4".into(),
            work_seed: None,
            kernel: "k".into(),
            managed: true,
            size_bytes: 0,
            created_at: String::new(),
        };
        let disks = VmDisks::in_dir(Path::new("/vms/x"));
        let paths = |d: &[DiskSpec]| -> Vec<(PathBuf, bool)> {
            d.iter().map(|s| (s.path.clone(), s.read_only)).collect()
        };

        let (params, d) = boot_layout(&image, &disks, None);
        assert!(params.contains("root=/dev/vda ro "), "{params}");
        // What the guest kernel gets under Firecracker names one root.
        let fc = banger_vmm::firecracker::boot_args(&params);
        assert_eq!(fc.matches("root=").count(), 1, "{fc}");
        assert_eq!(
            fc.split(' ').filter(|a| *a == "rw" || *a == "ro").count(),
            1,
            "{fc}"
        );
        assert!(params.contains("banger.overlay=/dev/vdb"), "{params}");
        assert_eq!(
            paths(&d),
            [
                (PathBuf::from("/images/img/rootfs.ext4"), true),
                (PathBuf::from("/vms/x/overlay.ext4"), false),
                (PathBuf::from("/vms/x/work.ext4"), false),
            ]
        );

        let root = Path::new("/vms/x/rootfs.ext4");
        let (params, d) = boot_layout(&image, &disks, Some(root));
        assert!(params.starts_with("root=/dev/vda rw "), "{params}");
        assert!(BootArgs::parse(&params).root_writable);
        let fc = banger_vmm::firecracker::boot_args(&params);
        assert_eq!(
            fc.split(' ').filter(|a| *a == "rw" || *a == "ro").count(),
            1,
            "{fc}"
        );
        assert!(!params.contains("banger.overlay"), "{params}");
        assert_eq!(
            BootArgs::parse(&params).overlay,
            None,
            "early init must boot the root as it is"
        );
        assert_eq!(
            paths(&d),
            [
                (root.to_path_buf(), false),
                (PathBuf::from("/vms/x/work.ext4"), false),
            ]
        );
        assert_eq!(WRITABLE_ROOT_WORK_DEVICE, "/dev/vdb");
    }
}
