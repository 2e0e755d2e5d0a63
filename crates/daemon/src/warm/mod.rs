//! Warm starts: templates (a paused, sealed guest of an image in one shape,
//! saved once) and VMs restored from them instead of booted.
//!
//! - [`key`]: what a template depends on, computed from file metadata.
//! - [`header`]: `template.json` and the check every use makes.
//! - [`plan`]: the pure warm-or-cold decision.
//! - [`build`]: making a template from a transient VM.
//! - [`restore`]: a create that restores one, falling back to a cold boot.

pub(crate) mod build;
mod error;
pub(crate) mod header;
pub(crate) mod key;
pub(crate) mod plan;
pub(crate) mod restore;

pub use error::TemplateError;

use crate::Daemon;
use banger_model::{
    ImageRecord, InitramfsMode, KernelRecord, NicKind, TemplateKey, TemplateRecord, TemplateShape,
    TemplateState,
};
use header::{Template, describe_diff};
use key::{KeyInput, key_id};
use plan::Lookup;
use std::path::{Path, PathBuf};

/// Most templates kept per image; the least recently used goes first.
pub(crate) const MAX_PER_IMAGE: usize = 4;

/// What a lookup found.
pub(crate) struct Looked {
    pub(crate) lookup: Lookup<Template>,
}

/// A background template build (`warm_start = "auto"`), queued or running.
pub(crate) struct BackgroundBuild {
    /// Cancels it (image delete, daemon stop).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Turns true when it has ended, its transient VM rolled back.
    pub(crate) done: tokio::sync::watch::Receiver<bool>,
}

/// How long deleting an image waits for its cancelled background template
/// builds to roll back.
const BUILD_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Daemon {
    /// `<state_dir>/templates`: on the same file system as `vms/`, so a
    /// template's files move in by rename and clone by reflink.
    pub(crate) fn templates_dir(&self) -> PathBuf {
        self.paths.state_dir.join("templates")
    }

    /// The backend's answer to "can you restore?": `Ok(id)` naming the VMM
    /// build, or why not.
    pub(crate) async fn warm_backend(&self) -> Result<String, String> {
        let vmm = self.vmm().map_err(|e| e.to_string())?;
        match vmm.warm_support().await {
            banger_vmm::WarmSupport::Supported { id } => Ok(id),
            banger_vmm::WarmSupport::Unsupported(why) => Err(why),
        }
    }

    /// Warm-start facts for `doctor` (`GET /v1/info`).
    pub(crate) async fn warm_info(&self) -> banger_api::WarmInfo {
        let (supported, detail) = match self.warm_backend().await {
            Ok(id) => (true, id),
            Err(why) => (false, why),
        };
        let list = self.store.list_templates(None).unwrap_or_default();
        let dir = self.templates_dir();
        let probe_dir = if dir.is_dir() {
            dir
        } else {
            self.paths.vms_dir.clone()
        };
        banger_api::WarmInfo {
            setting: self.config.warm_start.as_str().to_string(),
            supported,
            detail,
            templates: list.len() as u64,
            template_bytes: list.iter().map(|t| t.size_bytes).sum(),
            reflink: tokio::task::spawn_blocking(move || {
                banger_storage::reflink_supported(&probe_dir)
            })
            .await
            .unwrap_or(false),
        }
    }

    /// The kind of NIC VMs get from this daemon's networking.
    pub(crate) fn nic_kind(&self) -> NicKind {
        match self.network().map(|n| n.mode_name()) {
            Some("bridge") => NicKind::Tap,
            Some("user") => NicKind::User,
            _ => NicKind::None,
        }
    }

    /// Finds the current template of `image` in `shape`. A damaged one is
    /// removed (and reported `Refused`); templates of this image and shape
    /// made for anything else are removed (and reported `Stale`).
    pub(crate) fn lookup_template(
        &self,
        image: &ImageRecord,
        kernel: &KernelRecord,
        initramfs: InitramfsMode,
        backend_id: &str,
        shape: TemplateShape,
    ) -> Looked {
        let Ok(vmm) = self.vmm() else {
            return Looked {
                lookup: Lookup::Refused("no VMM backend".into()),
            };
        };
        let input = KeyInput {
            image,
            kernel,
            initramfs,
            backend: vmm.backend(),
            backend_id,
            shape,
            nic: self.nic_kind(),
        };
        let key = match self.template_key(&input) {
            Ok(k) => k,
            Err(e) => {
                return Looked {
                    lookup: Lookup::Refused(format!("{e:#}")),
                };
            }
        };
        let id = key_id(&key);
        let rows = match self.store.find_templates(&image.name, vmm.backend(), shape) {
            Ok(r) => r,
            Err(e) => {
                return Looked {
                    lookup: Lookup::Refused(e.to_string()),
                };
            }
        };
        let mut stale = None;
        let mut found = None;
        for (row, row_key) in rows {
            if row.id == id {
                if row.state == TemplateState::Ready {
                    found = Some(row);
                }
                continue;
            }
            if row.state == TemplateState::Building {
                continue;
            }
            let why = serde_json::from_str::<TemplateKey>(&row_key)
                .map(|theirs| describe_diff(&theirs, &key))
                .unwrap_or_else(|_| "its key cannot be read".into());
            tracing::info!(template = %row.id, image = %image.name, reason = %why, "removing an out-of-date template");
            self.remove_template(&row);
            stale.get_or_insert(why);
        }
        let lookup = match found {
            Some(row) => match Template::open(&row.dir, &key) {
                Ok(t) => Lookup::Found {
                    disk_bytes: t.header.disk_bytes,
                    template: t,
                },
                Err(e) => {
                    tracing::warn!(template = %row.id, error = %e, "removing a template that cannot be used");
                    self.remove_template(&row);
                    Lookup::Refused(e.to_string())
                }
            },
            None => match stale {
                Some(why) => Lookup::Stale(why),
                None => Lookup::Missing,
            },
        };
        Looked { lookup }
    }

    /// Warm or cold for a create of `image` in `shape` asking `mode`.
    pub(crate) async fn plan_start(
        &self,
        mode: banger_model::WarmMode,
        image: &ImageRecord,
        kernel: &KernelRecord,
        initramfs: InitramfsMode,
        shape: TemplateShape,
        disk_bytes: u64,
    ) -> plan::StartPlan<Template> {
        let support = if mode == banger_model::WarmMode::Off
            || self.config.warm_start == banger_model::WarmSetting::Off
        {
            Err(String::new())
        } else {
            self.warm_backend().await
        };
        plan::choose_start(
            self.config.warm_start,
            mode,
            support.as_ref().map(|_| ()).map_err(String::as_str),
            || {
                let id = support.as_deref().unwrap_or_default();
                self.lookup_template(image, kernel, initramfs, id, shape)
                    .lookup
            },
            disk_bytes,
        )
    }

    /// Queues a background build of the template of `image` in `shape`
    /// (`warm_start = "auto"`): it starts once no create is in flight, one
    /// build at a time, and gives up quietly when the daemon stops.
    pub(crate) fn queue_template_build(
        self: &std::sync::Arc<Self>,
        image: &str,
        shape: TemplateShape,
    ) {
        let job = (image.to_string(), shape);
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        {
            let mut queued = self.queued_builds.lock().unwrap_or_else(|p| p.into_inner());
            if queued.contains_key(&job) {
                return;
            }
            queued.insert(
                job.clone(),
                BackgroundBuild {
                    cancel: cancel.clone(),
                    done,
                },
            );
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut creates = this.creates.subscribe();
            let idle = tokio::select! {
                r = creates.wait_for(|n| *n == 0) => r.is_ok(),
                _ = cancel.cancelled() => false,
            };
            if idle {
                tracing::info!(image = %job.0, vcpu = shape.vcpu, memory_mib = shape.memory_mib, "building a template in the background");
                let quiet = banger_api::ProgressSink::discard();
                match this.build_template(&job.0, shape, &quiet, &cancel).await {
                    Ok(t) => {
                        tracing::info!(template = %t.id, image = %job.0, "background template ready")
                    }
                    Err(e) => {
                        tracing::warn!(image = %job.0, error = %e, "background template build failed")
                    }
                }
            }
            this.queued_builds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job);
            let _ = done_tx.send(true);
        });
    }

    /// Cancels the background template builds of `image`, queued or
    /// running, and waits (at most [`BUILD_CANCEL_WAIT`]) until they have
    /// ended: a running build rolls its transient VM back, so deleting the
    /// image does not find a VM the user never made.
    pub(crate) async fn cancel_background_builds(&self, image: &str) {
        let waits: Vec<_> = self
            .queued_builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((i, _), _)| i == image)
            .map(|(_, b)| {
                b.cancel.cancel();
                b.done.clone()
            })
            .collect();
        for mut done in waits {
            if tokio::time::timeout(BUILD_CANCEL_WAIT, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!(
                    image,
                    "a cancelled background template build did not end in time"
                );
            }
        }
    }

    /// Removes a template's directory and row. VMs restored from it keep
    /// running (their disks are copies; Firecracker's private mapping of
    /// the memory file outlives the unlink).
    pub(crate) fn remove_template(&self, t: &TemplateRecord) {
        remove_dir_logged(&t.dir);
        if let Err(e) = self.store.delete_template(&t.id) {
            tracing::warn!(template = %t.id, error = %e, "template row not removed");
        }
    }

    /// Removes every template of `image` (it was rebuilt or deleted).
    pub(crate) fn remove_image_templates(&self, image: &str) -> Vec<TemplateRecord> {
        let list = self.store.list_templates(Some(image)).unwrap_or_default();
        for t in &list {
            self.remove_template(t);
        }
        if !list.is_empty() {
            tracing::info!(image, removed = list.len(), "removed the image's templates");
        }
        list
    }

    /// `GET /v1/images/{image}/templates`.
    pub fn list_templates(&self, image: &str) -> Result<Vec<TemplateRecord>, TemplateError> {
        self.store.get_image(image)?;
        Ok(self.store.list_templates(Some(image))?)
    }

    /// `DELETE /v1/images/{image}/templates`: waits for a build in progress.
    pub async fn drop_templates(&self, image: &str) -> Result<Vec<TemplateRecord>, TemplateError> {
        self.store.get_image(image)?;
        let _build = self.template_build.lock().await;
        Ok(self.remove_image_templates(image))
    }

    /// Keeps at most [`MAX_PER_IMAGE`] templates of `image`, dropping the
    /// least recently used (never `keep`).
    pub(crate) fn evict_templates(&self, image: &str, keep: &str) {
        let Ok(mut list) = self.store.list_templates(Some(image)) else {
            return;
        };
        if list.len() <= MAX_PER_IMAGE {
            return;
        }
        list.retain(|t| t.id != keep && t.state == TemplateState::Ready);
        list.sort_by(|a, b| {
            let used = |t: &TemplateRecord| t.last_used_at.clone().unwrap_or(t.created_at.clone());
            used(a).cmp(&used(b))
        });
        let excess = list.len() + 1 - MAX_PER_IMAGE;
        for t in list.into_iter().take(excess) {
            tracing::info!(template = %t.id, image, "evicting the least recently used template");
            self.remove_template(&t);
        }
    }

    /// Re-hashes every ready template's files once, one template at a time
    /// at the lowest CPU priority, and removes any whose contents changed
    /// since its seal (every use checks only sizes, inodes and times).
    pub(crate) fn verify_templates_later(self: &std::sync::Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let list = this.store.list_templates(None).unwrap_or_default();
            for t in list.into_iter().filter(|t| t.state == TemplateState::Ready) {
                if this.shutdown.is_cancelled() {
                    return;
                }
                // Not while a build may be replacing this very directory.
                let _build = this.template_build.lock().await;
                let dir = t.dir.clone();
                let stop = this.shutdown.clone();
                // A thread of its own: its lowered priority cannot be raised
                // back without privilege, so no pooled thread may get it.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("template-verify".into())
                    .spawn(move || {
                        // SAFETY: setpriority of this thread only (PRIO_PROCESS
                        // with a thread id is per-thread on Linux).
                        unsafe {
                            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                        }
                        let _ = tx.send(header::verify_contents(&dir, &|| stop.is_cancelled()));
                    });
                let checked = match spawned {
                    Ok(_) => rx.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match checked {
                    Ok(Ok(())) => tracing::debug!(template = %t.id, "template contents verified"),
                    Ok(Err(header::TemplateError::Stopped)) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(template = %t.id, error = %e, "removing a template whose contents changed");
                        this.remove_template(&t);
                    }
                    Err(e) => {
                        tracing::warn!(template = %t.id, error = %e, "template verification worker failed")
                    }
                }
            }
        });
    }

    /// Daemon start: template directories without a row, rows without a
    /// directory, half-built ones (`*.partial`, rows `building`).
    pub(crate) fn reconcile_templates(&self) {
        let dir = self.templates_dir();
        let rows = self.store.list_templates(None).unwrap_or_default();
        for t in &rows {
            if t.state == TemplateState::Building || !t.dir.join(header::HEADER_FILE).is_file() {
                tracing::info!(template = %t.id, "removing an unfinished or missing template");
                self.remove_template(t);
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let known = rows
                .iter()
                .any(|t| t.dir == path && t.state == TemplateState::Ready);
            if !known {
                tracing::info!(dir = %path.display(), "removing a template directory without a record");
                remove_dir_logged(&path);
            }
        }
    }
}

fn remove_dir_logged(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a template directory")
        }
    }
}

#[cfg(test)]
mod tests {
    use banger_model::TemplateShape;

    #[tokio::test]
    async fn deleting_an_image_cancels_its_queued_background_build() {
        let t = tempfile::tempdir().expect("tmp");
        let d = crate::vm::tests::daemon(&t);
        // A create in flight keeps the build queued (it never boots here).
        d.creates.send_modify(|n| *n += 1);
        let shape = TemplateShape {
            vcpu: 1,
            memory_mib: 512,
        };
        d.queue_template_build("img", shape);
        assert_eq!(d.queued_builds.lock().expect("lock").len(), 1);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            d.delete_image("img", false),
        )
        .await
        .expect("delete in time")
        .expect("deleted");
        assert!(
            d.queued_builds.lock().expect("lock").is_empty(),
            "the image's background build is still queued"
        );
    }
}
