//! `vm create`: the checks, the new VM's record, disks and first boot.

use super::*;
use crate::error::{Chain, NoBackend, store_kind};
use crate::net::NetError;
use crate::steps::{Steps, UndoSlot};
use crate::vm::StateError;
use crate::vm::admit::NewVm;
use crate::vm::ready::{OnFailure, Readiness, Unready};
use crate::vm::settings::ResourceError;
use crate::warm::plan::{ColdReason, StartPlan};
use crate::warm::restore::WarmFrom;
use crate::{Daemon, ErrorKind};
use anyhow::{Context, anyhow};
use banger_agent_proto::SshdStart;
use banger_api::{CreateVmRequest, PlannedVm, ProgressSink, Step};
use banger_config::{HostResources, apply_flags, effective_defaults};
use banger_model::{
    NameError, StartInfo, TemplateShape, VmName, VmRecord, VmState, WarmMode, WarmSetting,
    generate_name,
};
use banger_storage::{VmDisks, WorkSource};
use banger_store::StoreError;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Daemon {
    /// `--nat` needs bridge networking.
    fn check_nat_mode(&self, nat: bool) -> Result<(), CreateError> {
        if nat
            && let Some(net) = self.network()
            && net.mode_name() != "bridge"
        {
            return Err(CreateError::NatNeedsBridge {
                mode: net.mode_name(),
            });
        }
        Ok(())
    }

    /// The checks of a create request that need no lock and change nothing,
    /// so a bad request is answered with its error before the operation's
    /// stream starts. [`Daemon::create_vm`] checks again where it matters.
    pub(crate) fn check_create(&self, req: &CreateVmRequest) -> Result<(), CreateError> {
        if let Some(n) = &req.name {
            let name = VmName::parse(n)?;
            self.check_name_free(&name)?;
        }
        crate::vm::settings::check_resources(req.vcpu, req.memory_mib, req.disk_size.as_deref())?;
        if let Some(image) = &req.image {
            crate::images::check_name("image", image)?;
            if *image != self.config.default_image_name {
                self.store
                    .get_image(image)
                    .map_err(|_| CreateError::NoImage(image.clone()))?;
            }
        }
        self.check_nat_mode(req.nat)?;
        if req.warm == WarmMode::Require {
            if !req.start {
                return Err(CreateError::WarmWithoutStart);
            }
            if self.config.warm_start == WarmSetting::Off {
                return Err(CreateError::WarmOff);
            }
        }
        Ok(())
    }

    /// Creates a VM and, unless `req.start` is false, boots it and waits for
    /// its agent. Calls `planned` with the name and spec, then reports to `progress`; the caller sends `Done`/`Error`.
    /// Cancelling `cancel` (the client went away) before the VM is ready
    /// rolls everything back.
    pub async fn create_vm(
        self: &Arc<Self>,
        req: CreateVmRequest,
        planned: impl FnOnce(PlannedVm),
        progress: &ProgressSink,
        cancel: CancellationToken,
    ) -> Result<VmRecord, CreateError> {
        let vmm = self.vmm()?.clone();
        let _in_flight = CreateGuard::new(self);
        let name = match &req.name {
            Some(n) => VmName::parse(n)?,
            None => self.unused_name()?,
        };
        self.check_name_free(&name)?;
        let disk = crate::vm::settings::check_resources(
            req.vcpu,
            req.memory_mib,
            req.disk_size.as_deref(),
        )?;
        let defaults = effective_defaults(&self.config.vm_defaults, &HostResources::detect());
        let spec = apply_flags(defaults, req.vcpu, req.memory_mib, disk);
        planned(PlannedVm {
            name: name.to_string(),
            spec,
        });

        let image_name = req
            .image
            .clone()
            .unwrap_or_else(|| self.config.default_image_name.clone());
        let image = self.ensure_image(&image_name, progress, &cancel).await?;
        if cancel.is_cancelled() {
            return Err(CreateError::Cancelled(self.cancel_reason()));
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
                    return Err(CreateError::NoTemplate(reason.to_string()));
                }
                if req.start {
                    progress.phase(Step::Start, format!("cold ({reason})"));
                    if reason.wants_template() && self.config.warm_start == WarmSetting::Auto {
                        self.queue_template_build(&image.name, shape);
                    }
                    cold_note = Some(reason.to_string());
                }
                None
            }
        };
        let mut steps = Steps::new(progress);
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
            progress.phase(
                Step::Start,
                format!("warm (restoring template {})", template.header.id),
            );
            match this
                .try_warm(
                    &mut vm,
                    WarmFrom {
                        image: &image,
                        template,
                        sshd: if req.wait_ssh {
                            SshdStart::Now
                        } else {
                            SshdStart::AfterFirstCommand
                        },
                    },
                    &mut steps,
                    progress,
                    &cancel,
                )
                .await
            {
                Ok(_) => warmed = true,
                Err(e) => {
                    let why = format!("{:#}", e.cause);
                    if req.warm == WarmMode::Require {
                        let rollback_errors = steps.rollback().await;
                        return Err(CreateError::WarmFailed(crate::steps::StepError {
                            step: e.step,
                            cause: anyhow!("--warm: warm start failed: {why}"),
                            rollback_errors,
                        }));
                    }
                    tracing::warn!(vm = %vm.name, template = %template.header.id, step = e.step, error = %why, "warm start failed; booting cold");
                    progress.phase(Step::Start, format!("cold (warm start failed: {why})"));
                    if e.blames_template()
                        && let Ok(Some((row, _))) = this.store.get_template(&template.header.id)
                    {
                        this.remove_template(&row);
                    }
                    vm.start = StartInfo::cold(Some(format!("warm start failed: {why}")));
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
                .map_err(|e| CreateError::Failed(e.into()))?;
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
                .map_err(|e| CreateError::Failed(e.into()))?;
            if !self.config.file_sync.is_empty() {
                let (this2, rec) = (self.clone(), vm.clone());
                steps
                    .run(
                        "files",
                        "copying [[file_sync]] files into /root",
                        |_| async move { this2.sync_files(&rec, progress).await },
                    )
                    .await
                    .map_err(|e| CreateError::Failed(e.into()))?;
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
            progress,
            cancel: &cancel,
            writable_root: None,
            purpose: BootPurpose::Vm,
        };
        let mut booted = if warmed {
            Ok(())
        } else {
            this.boot(ctx, &mut vm, &mut steps).await.map(|_| ())
        };
        if booted.is_ok() {
            let want = Readiness {
                system: req.wait_boot.unwrap_or(self.config.wait_boot),
                sshd: req.wait_ssh,
            };
            booted = match this.wait_ready(&vm, want, progress, &cancel).await {
                Ok(()) => Ok(()),
                // The client went away: nothing of the VM is kept.
                Err(Unready::Cancelled(why)) => {
                    Err(this.abandon_boot(&id, &mut steps, anyhow!(why)).await)
                }
                // Its guest went down: nothing of the VM is kept either.
                Err(Unready::Stopped(e)) => Err(this.abandon_boot(&id, &mut steps, e).await),
                Err(timed_out) => Err(timed_out.into_boot()),
            };
        }
        this.finish_boot(&mut vm, steps, booted, OnFailure::RolledBack)?;
        if let Err(e) = this.refresh_known_hosts() {
            tracing::warn!(error = %format!("{e:#}"), "ssh files not updated");
        }
        Ok(vm)
    }

    /// Why an operation's cancellation token fired.
    pub(crate) fn cancel_reason(&self) -> &'static str {
        if self.shutdown.is_cancelled() {
            "cancelled: the daemon is shutting down"
        } else {
            "cancelled: the client went away"
        }
    }

    fn unused_name(&self) -> Result<VmName, CreateError> {
        let taken: Vec<VmName> = self.store.list_vms()?.into_iter().map(|v| v.name).collect();
        for _ in 0..100 {
            let n = generate_name();
            if !taken.contains(&n) {
                return Ok(n);
            }
        }
        Err(CreateError::NoFreeName)
    }
}

/// Why a VM was not created (or, created, did not start).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Name(#[from] NameError),
    /// `name` is taken by another VM.
    #[error("a VM named {0} already exists: pick another --name or `banger vm delete {0}`")]
    NameTaken(VmName),
    #[error("could not find a free VM name; pass --name")]
    NoFreeName,
    #[error(transparent)]
    Resources(#[from] ResourceError),
    /// The named image is not recorded.
    #[error("no image named {0}: see `banger image list`")]
    NoImage(String),
    /// `--nat` with `mode` networking.
    #[error(
        "--nat needs bridge networking; this daemon uses {mode} networking (see banger doctor)"
    )]
    NatNeedsBridge { mode: &'static str },
    #[error("--warm restores a running VM: it cannot go with --no-start")]
    WarmWithoutStart,
    #[error("--warm: warm starts are off (warm_start = \"off\" in config.toml)")]
    WarmOff,
    /// `--warm` and no usable template, for this reason.
    #[error("--warm: {0}")]
    NoTemplate(String),
    /// `--warm` and the restore failed (rolled back).
    #[error("{0}")]
    WarmFailed(crate::steps::StepError),
    #[error(transparent)]
    NoBackend(#[from] NoBackend),
    /// The client went away or the daemon is shutting down.
    #[error("{0}")]
    Cancelled(&'static str),
    /// The boot failed (everything rolled back) or the guest was not
    /// ready in time (the VM is kept, in error, for inspection).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Making the VM's directory, disks or files failed (rolled back).
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
    /// No address for the VM.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Recording the VM's state failed or was refused.
    #[error(transparent)]
    State(#[from] StateError),
    /// The image name breaks its rule.
    #[error(transparent)]
    ImageName(#[from] crate::images::NameError),
    /// The image is missing, or making the default image failed.
    #[error(transparent)]
    Image(#[from] crate::images::EnsureError),
}

impl CreateError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use CreateError as E;
        match self {
            E::Name(_) | E::Resources(_) | E::WarmWithoutStart => ErrorKind::Invalid,
            E::NameTaken(_) | E::NatNeedsBridge { .. } | E::WarmOff | E::NoTemplate(_) => {
                ErrorKind::Conflict
            }
            E::NoImage(_) => ErrorKind::NotFound,
            E::NoFreeName | E::WarmFailed(_) | E::NoBackend(_) | E::Cancelled(_) | E::Failed(_) => {
                ErrorKind::Failed
            }
            E::Boot(e) => e.kind(),
            E::Store(e) => store_kind(e),
            E::Net(e) => e.kind(),
            E::State(e) => e.kind(),
            E::ImageName(e) => e.kind(),
            E::Image(e) => e.kind(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};

    fn check(d: &Daemon, req: CreateVmRequest) -> CreateError {
        d.check_create(&req).expect_err("refused")
    }

    #[test]
    fn refused_creates_keep_their_kind_and_text() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        record(&d, "calm-otter", VmState::Stopped);
        let e = check(
            &d,
            CreateVmRequest {
                name: Some("calm-otter".into()),
                ..Default::default()
            },
        );
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "a VM named calm-otter already exists: pick another --name or `banger vm delete calm-otter`"
        );
        let e = check(
            &d,
            CreateVmRequest {
                name: Some(String::new()),
                ..Default::default()
            },
        );
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Invalid, "VM name is empty")
        );
        let e = check(
            &d,
            CreateVmRequest {
                image: Some("nope".into()),
                ..Default::default()
            },
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "no image named nope: see `banger image list`"
        );
        let e = check(
            &d,
            CreateVmRequest {
                start: false,
                warm: WarmMode::Require,
                ..Default::default()
            },
        );
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            "--warm restores a running VM: it cannot go with --no-start"
        );
        let e = check(
            &d,
            CreateVmRequest {
                vcpu: Some(0),
                ..Default::default()
            },
        );
        assert!(
            matches!(e, CreateError::Resources(ResourceError::Vcpu)),
            "{e:?}"
        );
        // The network's error keeps its own kind through the edge type.
        let e = CreateError::from(crate::net::NetError::NotInitialised);
        let kind = crate::net::NetError::NotInitialised.kind();
        assert_eq!(crate::DaemonError::from(e).kind(), kind);
    }
}
