//! A create that restores a template: clone its disks, give the VM its own
//! host key and network, start the VMM from the snapshot, reconnect to the
//! sealed agent and hand it a fresh identity, then push the files a cold
//! create would have written into the disks. Every step registers its undo
//! in the create's own [`Steps`], so a failure rolls back exactly the warm
//! part (the caller then boots cold, or with `--warm` fails).

use super::header::{CONSOLE_FILE, MEMORY_FILE, Template, VMSTATE_FILE};
use crate::guest::file_sync::{SyncPlan, plan_credentials, plan_file_sync};
use crate::steps::{Steps, UndoSlot};
use crate::vm::cap_logs;
use crate::{Daemon, guest::ssh::HOST_PUBLIC_KEY};
use anyhow::{Context, anyhow};
use banger_agent_proto::client::AgentClient;
use banger_agent_proto::{GuestNetConfig, RestoreIdentity, RestoreReport, SshHostKey, SshdStart};
use banger_api::{ProgressSink, Step};
use banger_model::{ImageRecord, StartInfo, StartKind, VmRecord, VmState};
use banger_net::guest::GuestNet;
use banger_ssh::{HostKey, UserKey};
use banger_storage::{EntryKind, VmDisks};
use banger_vmm::{DiskFormat, DiskSpec, LaunchSpec, RestoreSpec, SnapshotFiles, VmPaths};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a restored guest's agent has to greet: it is running already,
/// so this is about reconnecting, not booting.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a warm start failed: the step, so the caller knows whether the
/// template itself is to blame, and its cause.
#[derive(Debug, thiserror::Error)]
#[error("{cause:#}")]
pub(crate) struct RestoreError {
    pub(crate) step: &'static str,
    pub(crate) cause: anyhow::Error,
}

/// Why the restored guest's agent was not reached, or was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentRestoreError {
    #[error("the restored guest's agent channel did not open within {}s", AGENT_TIMEOUT.as_secs())]
    ChannelTimeout,
    #[error("the VMM exited right after the restore; see `banger vm logs {name}`")]
    VmmExited { name: String },
    #[error("the restored guest's agent did not greet within {}s", AGENT_TIMEOUT.as_secs())]
    GreetTimeout,
    /// A guest that was not sealed would keep the template's identity.
    #[error("the template's agent was not sealed: refusing a guest with another VM's identity")]
    NotSealed,
    /// The client went away or the daemon is shutting down.
    #[error("{0}")]
    Cancelled(&'static str),
}

impl RestoreError {
    /// Failures of the snapshot load or of the restored guest point at
    /// the template; a full disk or a missing TAP do not.
    pub(crate) fn blames_template(&self) -> bool {
        matches!(self.step, "restore" | "agent" | "identity")
    }
}

/// A fresh identity for one restored VM: every value is new (host key made
/// by the caller, random machine-id and entropy, the clock just now).
pub(crate) fn identity_for(
    hostname: &str,
    host_key: &HostKey,
    authorized_key: &str,
    net: Option<&GuestNet>,
    grow: bool,
    sshd: SshdStart,
) -> RestoreIdentity {
    let machine: [u8; 16] = rand::random();
    let mut entropy = vec![0u8; banger_agent_proto::identity::ENTROPY_BYTES];
    rand::fill(&mut entropy[..]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    RestoreIdentity {
        hostname: hostname.to_string(),
        machine_id: super::key::hex(&machine),
        host_key: SshHostKey {
            private_openssh: host_key.private_openssh.clone(),
            public: host_key.public.clone(),
        },
        authorized_keys: format!("{authorized_key}\n"),
        net: net.map(|g| GuestNetConfig {
            device: "eth0".into(),
            mac: g.mac.0,
            addr: g.ip,
            prefix: g.prefix,
            gateway: Some(g.gateway),
            dns: g.dns.clone(),
        }),
        entropy,
        realtime: (
            i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            now.subsec_nanos(),
        ),
        grow: if grow {
            vec!["/".into(), "/root".into()]
        } else {
            Vec::new()
        },
        sshd,
    }
}

/// The restore's disks: the image's shared root, then the VM's clones of
/// the template's overlay and work disks, in the order of a cold boot.
fn restore_disks(image: &ImageRecord, disks: &VmDisks) -> Vec<DiskSpec> {
    let disk = |path: &std::path::Path, read_only: bool| DiskSpec {
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
        read_only,
    };
    vec![
        disk(&image.rootfs, true),
        disk(&disks.overlay, false),
        disk(&disks.work, false),
    ]
}

/// What a warm start restores, and how.
pub(crate) struct WarmFrom<'a> {
    pub(crate) image: &'a ImageRecord,
    pub(crate) template: &'a Template,
    /// When the guest starts sshd: at once when the create waits for it,
    /// else after the first command, which it would slow.
    pub(crate) sshd: SshdStart,
}

impl Daemon {
    /// Restores `from.template` as the VM `vm` (recorded, state creating,
    /// its directory made), registering undos in `steps`. On success the VM
    /// runs with its own identity and agent connection; returns its
    /// [`StartInfo`].
    pub(crate) async fn try_warm<'a>(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        from: WarmFrom<'_>,
        steps: &mut Steps<'a>,
        progress: &'a ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<StartInfo, RestoreError> {
        // Its own runner: a failed step rolls back the warm attempt only,
        // never the create's directory and record.
        let mut warm = Steps::new(progress);
        match self
            .restore_into(vm, from, &mut warm, progress, cancel)
            .await
        {
            Ok(info) => {
                steps.absorb(warm);
                Ok(info)
            }
            Err(e) => {
                for (step, err) in warm.rollback().await {
                    tracing::warn!(vm = %vm.name, step, error = %format!("{err:#}"), "undoing a warm start step failed");
                }
                vm.pid = None;
                vm.tap = None;
                vm.ssh_port = None;
                Err(e)
            }
        }
    }

    async fn restore_into(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        from: WarmFrom<'_>,
        steps: &mut Steps<'_>,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<StartInfo, RestoreError> {
        let WarmFrom {
            image,
            template,
            sshd,
        } = from;
        let fail = |step: &'static str| move |e: anyhow::Error| RestoreError { step, cause: e };
        let started = Instant::now();
        let vmm = self.vmm().map_err(|e| fail("restore")(e.into()))?.clone();
        let h = &template.header;
        let disks = VmDisks::in_dir(&vm.dir);

        // 1. The disks: made at their full size now (the VMM opens them as
        // it starts), filled meanwhile (reflink where the file system can):
        // the VMM reads them once `filled` says so.
        let (t_overlay, t_work) = (
            template.file(&file_name(&disks.overlay)),
            template.file(&file_name(&disks.work)),
        );
        let (overlay, work) = (disks.overlay.clone(), disks.work.clone());
        let (r_overlay, r_work) = steps
            .run(
                "clone-disks",
                &format!("cloning the disks of template {}", h.id),
                |u: UndoSlot<'_>| async move {
                    let undo = vec![overlay.clone(), work.clone()];
                    u.set(move || async move {
                        for p in undo {
                            match tokio::fs::remove_file(&p).await {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                                Err(e) => {
                                    return Err(e)
                                        .with_context(|| format!("removing {}", p.display()));
                                }
                            }
                        }
                        Ok(())
                    });
                    let a = banger_storage::reserve_clone(&t_overlay, &overlay)
                        .context("the overlay disk's clone")?;
                    let b = banger_storage::reserve_clone(&t_work, &work)
                        .context("the work disk's clone")?;
                    Ok((a, b))
                },
            )
            .await
            .map_err(|e| fail("clone-disks")(e.into()))?;
        let (filled, disks_ready) = tokio::sync::oneshot::channel::<bool>();
        let clones = tokio::spawn(fill_clones(r_overlay, r_work, filled));

        // 2. Its own host key (pinned in known_hosts), never the template's.
        let host_key = HostKey::generate(vm.name.as_str())
            .context("the VM's ssh host key")
            .map_err(fail("ssh"))?;
        let user = UserKey::ensure(&self.ssh_key_path())
            .context("banger's ssh key")
            .map_err(fail("ssh"))?;
        let pub_path = vm.dir.join(HOST_PUBLIC_KEY);
        std::fs::write(&pub_path, format!("{}\n", host_key.public))
            .with_context(|| format!("writing {}", pub_path.display()))
            .map_err(fail("ssh"))?;

        // 3. The host side of its network.
        self.set_state(vm, VmState::Starting, None, None)
            .map_err(|e| fail("network")(e.into()))?;
        progress.phase(Step::Network, "setting up the VM's network");
        let boot_net = self
            .net_up(vm, steps)
            .await
            .map_err(|e| fail("network")(e.into()))?;
        let (nets, guest, guard) = match boot_net {
            Some(n) => (n.nets, Some(n.guest), n.guard),
            None => (Vec::new(), None, None),
        };
        let template_nets = nets
            .iter()
            .cloned()
            .map(|mut n| {
                n.mac = h.template_mac.clone();
                n
            })
            .collect();

        // 4. The VMM, from the snapshot.
        let initrd = h.initrd.as_ref().map(|i| {
            if i.starts_with('/') {
                std::path::PathBuf::from(i)
            } else {
                template.file(i)
            }
        });
        let spec = RestoreSpec {
            launch: LaunchSpec {
                name: vm.name.to_string(),
                dir: vm.dir.clone(),
                kernel: h.kernel.clone(),
                initrd,
                extra_cmdline: h.cmdline.clone(),
                disks: restore_disks(image, &disks),
                nets,
                vcpu: h.key.vcpu,
                memory_mib: h.key.memory_mib,
                memory_file: None,
            },
            from: SnapshotFiles {
                memory: template.file(MEMORY_FILE),
                vmstate: template.file(VMSTATE_FILE),
            },
            template_nets,
        };
        let restore_started = Instant::now();
        let v = vmm.clone();
        let launched = steps
            .run(
                "restore",
                &format!("restoring template {}", h.id),
                |u: UndoSlot<'_>| async move {
                    let ready = Box::pin(async move { disks_ready.await.unwrap_or(false) });
                    let l = v.restore(&spec, ready).await?;
                    let (v2, d, pid) = (v.clone(), spec.launch.dir.clone(), l.pid);
                    u.set(move || async move { v2.terminate(&d, pid).await.map_err(Into::into) });
                    Ok(l)
                },
            )
            .await;
        let launched = match launched {
            Ok(l) => l,
            // The copies failed: say why, not that the VMM waited in vain.
            Err(e) if is_disks_unavailable(&e.cause) => {
                let cause = match clones.await {
                    Ok(Err(why)) => why,
                    Ok(Ok(())) => e.into(),
                    Err(join) => anyhow!("disk clone worker: {join}"),
                };
                return Err(fail("clone-disks")(cause));
            }
            Err(e) => return Err(fail("restore")(e.into())),
        };
        let restore_ms = restore_started.elapsed().as_millis() as u64;
        let pid = launched.pid;
        vm.pid = Some(pid);
        cap_logs(vm.dir.clone(), pid);
        let paths = VmPaths::new(&vm.dir);
        // The guest's boot happened in the template: say so where its
        // console log would have shown it.
        let banner = restored_banner(&h.id, &template.file(CONSOLE_FILE));
        if let Err(e) = append_line(&paths.console_log(), &banner) {
            tracing::warn!(vm = %vm.name, error = %e, "cannot note the restore in the console log");
        }
        crate::vm::log_index::spawn_sampler(
            vec![paths.console_log(), paths.vmm_log()],
            pid,
            true,
            self.shutdown.clone(),
        );
        self.set_state(vm, VmState::Starting, Some(pid), None)
            .map_err(|e| fail("restore")(e.into()))?;
        let mut exited = launched.exited;

        // 5. The sealed agent, over a new connection.
        let endpoint = launched.agent;
        let (this, id, name, exited_ref) = (
            self.clone(),
            vm.id.clone(),
            vm.name.to_string(),
            &mut exited,
        );
        let agent = steps
            .run("agent", "reconnecting to the guest agent", |u: UndoSlot<'_>| async move {
                let (t2, id2) = (this.clone(), id.clone());
                u.set(move || async move {
                    t2.set_agent(&id2, None);
                    Ok(())
                });
                let stream = tokio::select! {
                    r = tokio::time::timeout(AGENT_TIMEOUT, endpoint.open()) => r
                        .map_err(|_| AgentRestoreError::ChannelTimeout)?
                        .context("connecting to the agent channel")?,
                    _ = exited_ref => return Err(AgentRestoreError::VmmExited { name }.into()),
                    _ = cancel.cancelled() => return Err(AgentRestoreError::Cancelled(this.cancel_reason()).into()),
                };
                let agent = AgentClient::spawn(stream);
                // The guest may be mid-stream (virtio-serial) or reconnecting
                // (vsock): a ping makes either side speak first.
                let _ = agent.ping();
                let hello = tokio::select! {
                    r = tokio::time::timeout(AGENT_TIMEOUT, agent.wait_hello()) => r
                        .map_err(|_| AgentRestoreError::GreetTimeout)?
                        .context("the restored guest's agent")?,
                    _ = cancel.cancelled() => return Err(AgentRestoreError::Cancelled(this.cancel_reason()).into()),
                };
                if !hello.sealed {
                    return Err(AgentRestoreError::NotSealed.into());
                }
                this.set_agent(&id, Some(agent.clone()));
                Ok(agent)
            })
            .await
            .map_err(|e| fail("agent")(e.into()))?;

        // 6. Bigger disks than the template's: grow them now, the guest's
        // file systems follow in the identity step.
        let want = vm.spec.disk_bytes.value;
        let grow = want > h.disk_bytes;
        if grow {
            let (v, dir) = (vmm.clone(), vm.dir.clone());
            steps
                .run(
                    "grow",
                    &format!("growing the disks to {}", banger_model::ByteSize(want)),
                    |_| async move {
                        // Disk 1 is the overlay, 2 the work disk (restore_disks).
                        v.grow_disk(&dir, 1, want)
                            .await
                            .context("growing the overlay disk")?;
                        v.grow_disk(&dir, 2, want)
                            .await
                            .context("growing the work disk")?;
                        Ok(())
                    },
                )
                .await
                .map_err(|e| fail("grow")(e.into()))?;
        }

        // Until the address checks are in place the bridge drops what the
        // guest sends; its identity (its own MAC and address) comes next.
        if let Some(g) = guard {
            g.wait().await.map_err(|e| fail("network")(e.into()))?;
        }

        // 7. Its own identity.
        let identity = identity_for(
            vm.name.as_str(),
            &host_key,
            &user.public,
            guest.as_ref(),
            grow,
            sshd,
        );
        let report: RestoreReport = steps
            .run("identity", "giving the guest its own identity", |_| async {
                agent
                    .restore(identity)
                    .await
                    .context("the guest refused its identity")
            })
            .await
            .map_err(|e| fail("identity")(e.into()))?;
        tracing::info!(vm = %vm.name, template = %h.id, restore_ms, steps = ?report.steps_ms, vmgenid = report.vmgenid, clock_step_ms = report.clock_step_ms, sshd = %report.sshd, "restored from template");

        // 8. What a cold create writes into the disks, live.
        let (home, syncs) = (self.paths.home.clone(), self.config.file_sync.clone());
        let plan = tokio::task::spawn_blocking(move || {
            let mut plan = plan_credentials(&home);
            let files = plan_file_sync(&home, &syncs);
            plan.entries.extend(files.entries);
            plan.warnings.extend(files.warnings);
            plan
        })
        .await
        .map_err(|e| fail("files")(anyhow!("file sync worker: {e}")))?;
        if !plan.entries.is_empty() || !plan.warnings.is_empty() {
            let n = plan.entries.len();
            steps
                .run(
                    "files",
                    &format!("copying {n} credential and [[file_sync]] entries into /root"),
                    |_| async { push_plan_live(&agent, plan, progress).await },
                )
                .await
                .map_err(|e| fail("files")(e.into()))?;
        }

        // 9. Running, once its disks' clones are on the host's disk (a host
        // crash then leaves a VM that ran with whole disks).
        clones
            .await
            .map_err(|e| anyhow!("disk clone worker: {e}"))
            .and_then(|r| r)
            .map_err(fail("clone-disks"))?;
        let info = StartInfo {
            kind: StartKind::Warm,
            template: Some(h.id.clone()),
            note: None,
            restore_ms: Some(restore_ms),
        };
        self.set_state(vm, VmState::Running, Some(pid), None)
            .and_then(|()| Ok(self.store.set_vm_start(&vm.id, &info)?))
            .map_err(|e| fail("record")(e.into()))?;
        if let Err(e) = self.store.touch_template(&h.id, &crate::vm::now_rfc3339()) {
            tracing::warn!(template = %h.id, error = %e, "template use not recorded");
        }
        vm.start = info.clone();
        self.net_ready(vm);
        self.watch_exit(vm.id.clone(), pid, exited);
        progress.phase(
            Step::Ready,
            format!(
                "restored from template {} in {} ms ({} ms in all)",
                h.id,
                restore_ms,
                started.elapsed().as_millis()
            ),
        );
        Ok(info)
    }
}

/// Fills the two reserved clones side by side, tells `filled` whether
/// they are whole (the VMM waits for that), then syncs them: a restored VM
/// counts as running only once its disks are on the host's disk.
async fn fill_clones(
    overlay: banger_storage::Reserved,
    work: banger_storage::Reserved,
    filled: tokio::sync::oneshot::Sender<bool>,
) -> anyhow::Result<()> {
    let fill = |r: banger_storage::Reserved, what: &'static str| {
        tokio::task::spawn_blocking(move || {
            r.fill()
                .with_context(|| format!("cloning the template's {what} disk"))
        })
    };
    let (a, b) = tokio::join!(fill(overlay, "overlay"), fill(work, "work"));
    let worker = |e: tokio::task::JoinError| anyhow!("disk clone worker: {e}");
    let whole = a
        .map_err(worker)
        .and_then(|r| r)
        .and_then(|a| Ok((a, b.map_err(worker)??)));
    let _ = filled.send(whole.is_ok());
    let (a, b) = whole?;
    tracing::debug!(
        overlay = a.kind().as_str(),
        work = b.kind().as_str(),
        "template disks cloned"
    );
    tokio::task::spawn_blocking(move || {
        a.sync().context("syncing the overlay disk's clone")?;
        b.sync().context("syncing the work disk's clone")?;
        Ok(())
    })
    .await
    .map_err(|e| anyhow!("disk sync worker: {e}"))?
}

/// Whether a restore failed because the disks it waited for were not made.
fn is_disks_unavailable(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<banger_vmm::VmmError>(),
        Some(banger_vmm::VmmError::DisksUnavailable)
    )
}

/// The line a restored VM's console log starts with: the template it
/// continues and where that template's boot log is.
fn restored_banner(id: &str, template_console: &std::path::Path) -> String {
    format!(
        "banger: restored from template {id} (template boot log: {})\n",
        template_console.display()
    )
}

/// Appends `line` to the log at `path` (opened in append mode, as the VMM
/// has it, so neither writes over the other).
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes `plan`'s entries (guest paths relative to `/root`) into the
/// running guest's `/root` as one tar stream through the agent.
async fn push_plan_live(
    agent: &AgentClient,
    plan: SyncPlan,
    progress: &ProgressSink,
) -> anyhow::Result<()> {
    for w in &plan.warnings {
        tracing::warn!("{w}");
        progress.warn(w);
    }
    if plan.entries.is_empty() {
        return Ok(());
    }
    let tar = tokio::task::spawn_blocking(move || tar_of(&plan))
        .await
        .map_err(|e| anyhow!("tar worker: {e}"))??;
    let mut upload = agent
        .put_archive(banger_agent_proto::PutArchive {
            dest: "/root".into(),
            replace: false,
        })
        .context("opening a transfer to the guest")?;
    for chunk in tar.chunks(banger_agent_proto::MAX_CHUNK) {
        upload
            .write(chunk)
            .await
            .context("sending files to the guest")?;
    }
    upload
        .finish()
        .await
        .context("writing files in the guest")?;
    Ok(())
}

/// A tar of the plan: directories and files under their guest paths
/// (without the leading `/`), owned by root, with the plan's modes.
fn tar_of(plan: &SyncPlan) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut made = std::collections::BTreeSet::new();
    let mut dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| -> anyhow::Result<()> {
        if !made.insert(path.to_string()) {
            return Ok(());
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, format!("{path}/"), std::io::empty())
            .with_context(|| format!("adding {path} to the transfer"))
    };
    for e in &plan.entries {
        let rel = e.path.trim_start_matches('/');
        // Parents first, 0700 like the disk path makes them.
        let mut parent = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(p);
            dir(&mut b, &parent, 0o700)?;
        }
        match &e.kind {
            EntryKind::Dir => dir(&mut b, rel, e.mode)?,
            EntryKind::HostFile(src) => {
                // Not following a last-component symlink, like the disk
                // path: a file swapped for a link after planning is refused.
                let data = {
                    use std::io::Read;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(src)
                        .with_context(|| format!("reading {}", src.display()))?;
                    let mut d = Vec::new();
                    f.read_to_end(&mut d)
                        .with_context(|| format!("reading {}", src.display()))?;
                    d
                };
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(e.mode);
                h.set_size(data.len() as u64);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                b.append_data(&mut h, rel, data.as_slice())
                    .with_context(|| format!("adding {rel} to the transfer"))?;
            }
        }
    }
    b.into_inner().context("finishing the transfer")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vm::TEMPLATE_MAC;

    #[test]
    fn agent_refusals_keep_todays_messages() {
        let timeout = AGENT_TIMEOUT.as_secs();
        let cases = [
            (
                AgentRestoreError::ChannelTimeout,
                format!("the restored guest's agent channel did not open within {timeout}s"),
            ),
            (
                AgentRestoreError::GreetTimeout,
                format!("the restored guest's agent did not greet within {timeout}s"),
            ),
            (
                AgentRestoreError::VmmExited {
                    name: "calm-otter".into(),
                },
                "the VMM exited right after the restore; see `banger vm logs calm-otter`".into(),
            ),
            (
                AgentRestoreError::NotSealed,
                "the template's agent was not sealed: refusing a guest with another VM's identity"
                    .into(),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        let e = RestoreError {
            step: "agent",
            cause: anyhow::Error::from(AgentRestoreError::NotSealed).context("reconnecting"),
        };
        assert!(e.blames_template());
        assert_eq!(
            e.to_string(),
            "reconnecting: the template's agent was not sealed: refusing a guest with another VM's identity"
        );
    }

    #[test]
    fn the_restore_is_noted_after_what_the_vmm_wrote() {
        let t = tempfile::tempdir().expect("tmp");
        let log = t.path().join("console.log");
        std::fs::write(&log, "vmm line\n").expect("log");
        let banner = restored_banner(
            "3f2a9c1e00112233",
            std::path::Path::new("/t/3f2a/console.log"),
        );
        assert_eq!(
            banner,
            "banger: restored from template 3f2a9c1e00112233 (template boot log: /t/3f2a/console.log)\n"
        );
        append_line(&log, &banner).expect("append");
        assert_eq!(
            std::fs::read_to_string(&log).expect("read"),
            format!("vmm line\n{banner}")
        );
        // A VM directory without a console log is an error, not a new file.
        assert!(append_line(&t.path().join("gone.log"), "x\n").is_err());
        assert!(!t.path().join("gone.log").exists());
    }

    #[test]
    fn identities_never_repeat() {
        let key = HostKey::generate("a").expect("key");
        let g = GuestNet {
            ip: "172.16.0.5".parse().expect("ip"),
            gateway: "172.16.0.1".parse().expect("gw"),
            netmask: "255.255.255.0".parse().expect("mask"),
            prefix: 24,
            mac: banger_net::MacAddr::from_ip("172.16.0.5".parse().expect("ip")),
            dns: vec!["172.16.0.1".parse().expect("dns")],
        };
        let a = identity_for(
            "a",
            &key,
            "ssh-ed25519 AAAA u",
            Some(&g),
            true,
            SshdStart::Now,
        );
        let b = identity_for(
            "a",
            &key,
            "ssh-ed25519 AAAA u",
            Some(&g),
            false,
            SshdStart::AfterFirstCommand,
        );
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.machine_id.len(), 32);
        assert_eq!(a.entropy.len(), banger_agent_proto::identity::ENTROPY_BYTES);
        assert!(a.validate().is_ok(), "{:?}", a.validate());
        let net = a.net.as_ref().expect("net");
        assert_eq!(net.mac, [0x06, 0, 172, 16, 0, 5]);
        assert_ne!(
            banger_agent_proto::identity::format_mac(&net.mac),
            TEMPLATE_MAC
        );
        assert_eq!(a.grow, ["/", "/root"]);
        assert!(b.grow.is_empty());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_secs() as i64;
        assert!((a.realtime.0 - now).abs() < 5);
    }

    #[test]
    fn live_file_push_is_a_tar_of_the_plan() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("auth.json");
        std::fs::write(&src, b"secret").expect("w");
        let plan = SyncPlan {
            entries: vec![
                banger_storage::GuestEntry {
                    path: "/.aws".into(),
                    kind: EntryKind::Dir,
                    mode: 0o700,
                },
                banger_storage::GuestEntry {
                    path: "/.local/share/opencode/auth.json".into(),
                    kind: EntryKind::HostFile(src),
                    mode: 0o600,
                },
            ],
            warnings: vec![],
        };
        let bytes = tar_of(&plan).expect("tar");
        let mut a = tar::Archive::new(bytes.as_slice());
        let got: Vec<(String, u32)> = a
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().mode().expect("mode"),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (".aws/".into(), 0o700),
                (".local/".into(), 0o700),
                (".local/share/".into(), 0o700),
                (".local/share/opencode/".into(), 0o700),
                (".local/share/opencode/auth.json".into(), 0o600),
            ]
        );
    }
}
