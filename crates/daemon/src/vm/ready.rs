//! Readiness beyond the agent: the guest's init finished booting, and
//! its sshd (interactive sessions; `vm ssh` waits the same way). One wait
//! ([`Daemon::wait_ready`]) and one ending ([`Daemon::finish_boot`]) for
//! every boot: start, create, the transient VMs of image and template
//! builds.

use crate::error::{Chain, store_kind};
use crate::steps::Steps;
use crate::vm::{AgentError, BootError};
use crate::{Daemon, ErrorKind};
use anyhow::anyhow;
use banger_agent_proto::client::AgentClient;
use banger_api::WaitFor;
use banger_api::{ProgressSink, Step};
use banger_model::{VmName, VmRecord, VmState};
use banger_store::StoreError;
use banger_vmm::VmPaths;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// The first pause between sshd probes: a warm VM's sshd starts right
/// after its restore, within tens of milliseconds.
const SSHD_POLL_FIRST: Duration = Duration::from_millis(20);
/// The longest pause between sshd probes (a cold boot's sshd comes with
/// systemd, seconds later).
const SSHD_POLL_MAX: Duration = Duration::from_millis(500);

/// What a boot waits for beyond its agent's greeting.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Readiness {
    /// The guest's init finished booting (`wait_boot`).
    pub(crate) system: bool,
    /// The guest's sshd greets (`--wait-ssh`).
    pub(crate) sshd: bool,
}

impl Readiness {
    /// The guest's init only (the transient VMs of image and template
    /// builds: provisioning and sealing want a booted system).
    pub(crate) const SYSTEM: Readiness = Readiness {
        system: true,
        sshd: false,
    };
}

/// Why a running guest was not found ready.
#[derive(Debug)]
pub(crate) enum Unready {
    /// Not in time, or its agent could not say; the message says which.
    TimedOut(String),
    /// The client went away or the daemon is stopping: the reason.
    Cancelled(&'static str),
    /// The VM's VMM exited while it was waited for: how the guest ended.
    Stopped(anyhow::Error),
}

impl Unready {
    /// As a boot's outcome: a guest not ready in time is kept
    /// ([`BootError::NotReady`]); a cancelled wait fails the boot.
    pub(crate) fn into_boot(self) -> BootError {
        match self {
            Unready::TimedOut(m) => BootError::NotReady(m),
            Unready::Cancelled(why) => BootError::Failed(anyhow!(why)),
            Unready::Stopped(e) => BootError::Failed(e),
        }
    }
}

/// What a failed boot leaves of its VM's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// The record stays, in error (start: the VM existed before).
    KeepRecord,
    /// The rollback removed the record with everything else (create).
    RolledBack,
}

/// Where the daemon reaches a VM's sshd.
fn ssh_target(vm: &VmRecord) -> Option<SocketAddr> {
    match (vm.ssh_port, vm.ip) {
        (Some(port), _) => Some(SocketAddr::from(([127, 0, 0, 1], port))),
        (None, Some(ip)) => Some(SocketAddr::from((ip, 22))),
        (None, None) => None,
    }
}

/// One probe: an `SSH-` banner, not just a connect (user-mode networking
/// accepts connections before the guest listens).
async fn ssh_banner(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"SSH-")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), probe).await,
        Ok(Some(true))
    )
}

impl Daemon {
    /// Resolves when the VM's current VMM has exited (at once if it already
    /// has), with how its guest ended; never when its exit is not watched.
    async fn vmm_exit(&self, vm: &VmRecord, waiting_for: &str) -> anyhow::Error {
        let exited = match self.vms.existing(&vm.id).and_then(|h| h.subscribe_exit()) {
            Some(mut rx) => rx.wait_for(|exited| *exited).await.is_ok(),
            None => false,
        };
        if !exited {
            // Not watched, or a dropped sender: a relaunch, not this exit.
            std::future::pending::<()>().await;
        }
        stopped_during(vm.name.as_str(), &VmPaths::new(&vm.dir), waiting_for)
    }

    /// How long a starting VM may take to signal readiness.
    pub(crate) fn ready_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.ready_timeout_secs))
    }

    /// Waits until the guest's sshd greets (an `SSH-` banner, probed from
    /// the host), for at most [`Self::ready_timeout`]. Says `sshd` progress
    /// only when the first probe finds no sshd, i.e. when it waits.
    pub(crate) async fn wait_sshd(
        &self,
        vm: &VmRecord,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<(), Unready> {
        let Some(addr) = ssh_target(vm) else {
            return Err(Unready::TimedOut(format!(
                "VM {} has no network address to reach its sshd",
                vm.name
            )));
        };
        let started = Instant::now();
        let mut waited = false;
        let mut pause = SSHD_POLL_FIRST;
        let exited = self.vmm_exit(vm, "before its sshd answered");
        tokio::pin!(exited);
        loop {
            let greeted = tokio::select! {
                up = ssh_banner(addr) => up,
                e = &mut exited => return Err(Unready::Stopped(e)),
            };
            if greeted {
                if waited {
                    progress.phase(
                        Step::Ready,
                        format!("sshd is up (after {} ms)", started.elapsed().as_millis()),
                    );
                }
                return Ok(());
            }
            if started.elapsed() >= self.ready_timeout() {
                return Err(Unready::TimedOut(format!(
                    "VM {}'s sshd did not answer on {addr} within {}s (ready_timeout_secs)",
                    vm.name,
                    self.ready_timeout().as_secs(),
                )));
            }
            if !waited {
                waited = true;
                progress.phase(
                    Step::Sshd,
                    format!(
                        "waiting for {}'s sshd on {addr} (up to {}s)",
                        vm.name,
                        self.ready_timeout().as_secs()
                    ),
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => return Err(Unready::Cancelled(self.cancel_reason())),
                e = &mut exited => return Err(Unready::Stopped(e)),
            }
            pause = (pause * 2).min(SSHD_POLL_MAX);
        }
    }

    /// Waits until the guest's init has finished booting (at once without
    /// systemd), for at most the ready timeout.
    pub(crate) async fn wait_system(
        &self,
        vm: &VmRecord,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<(), Unready> {
        let Some(agent) = self.agent(&vm.id) else {
            return Err(Unready::TimedOut(format!(
                "VM {} has no agent connection",
                vm.name
            )));
        };
        progress.phase(
            Step::System,
            "waiting for the guest's init to finish booting",
        );
        let started = Instant::now();
        let timeout = self.ready_timeout();
        let exited = self.vmm_exit(vm, "before its init finished booting");
        tokio::pin!(exited);
        let report = tokio::select! {
            r = tokio::time::timeout(timeout, agent.boot_status(true)) => r,
            _ = cancel.cancelled() => return Err(Unready::Cancelled(self.cancel_reason())),
            e = &mut exited => return Err(Unready::Stopped(e)),
        };
        match report {
            Ok(Ok(r)) => {
                let state = r.system.describe().to_string();
                progress.phase(
                    Step::System,
                    format!(
                        "the guest's init is up: {state} ({} ms after the agent)",
                        started.elapsed().as_millis()
                    ),
                );
                Ok(())
            }
            Ok(Err(e)) => {
                // A guest that went down takes its agent's connection with
                // it, a moment before its VMM's exit is seen.
                if let Ok(stopped) = tokio::time::timeout(EXIT_GRACE, &mut exited).await {
                    return Err(Unready::Stopped(stopped));
                }
                Err(Unready::TimedOut(format!(
                    "VM {}'s agent could not say how its boot went: {e}",
                    vm.name
                )))
            }
            Err(_) => Err(Unready::TimedOut(format!(
                "VM {name}'s init did not finish booting within {}s (ready_timeout_secs){}; the VM is kept running for inspection: `banger vm logs {name}` shows its console, `banger vm delete {name}` removes it",
                timeout.as_secs(),
                still_booting(&agent).await,
                name = vm.name
            ))),
        }
    }

    /// The readiness wait of a boot, after its agent greeted: the guest's
    /// init (`want.system`), then its sshd (`want.sshd`), each for at most
    /// the ready timeout. A timeout keeps the VM running, and every
    /// message says so.
    pub(crate) async fn wait_ready(
        &self,
        vm: &VmRecord,
        want: Readiness,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<(), Unready> {
        if want.system {
            self.wait_system(vm, progress, cancel).await?;
        }
        if want.sshd {
            self.wait_sshd(vm, progress, cancel)
                .await
                .map_err(|u| match u {
                    // Kept like a guest whose agent never greeted.
                    Unready::TimedOut(msg) => Unready::TimedOut(format!(
                        "{msg}; the VM is kept running for inspection: `banger vm logs {name}` shows its console, `banger vm delete {name}` removes it",
                        name = vm.name
                    )),
                    cancelled => cancelled,
                })?;
        }
        Ok(())
    }

    /// Ends a boot (with its readiness wait) whose steps ran in `steps`:
    /// a ready VM commits them; a VM not ready in time commits them too
    /// (it is kept for post-mortem: its console log says why) and is
    /// recorded in error; a failed boot (rolled back by then) is recorded
    /// in error if its record is kept.
    pub(crate) fn finish_boot(
        &self,
        vm: &mut VmRecord,
        steps: Steps<'_>,
        outcome: Result<(), BootError>,
        on_failure: OnFailure,
    ) -> Result<(), BootError> {
        match outcome {
            Ok(()) => {
                steps.commit();
                Ok(())
            }
            Err(BootError::NotReady(msg)) => {
                steps.commit();
                let pid = vm.pid;
                self.set_state(vm, VmState::Error, pid, Some(&msg))?;
                Err(BootError::NotReady(msg))
            }
            Err(BootError::Failed(e)) => {
                if on_failure == OnFailure::KeepRecord {
                    let msg = format!("{e:#}");
                    self.set_state(vm, VmState::Error, None, Some(&msg))?;
                }
                Err(BootError::Failed(e))
            }
            Err(e @ (BootError::Store(_) | BootError::State(_))) => Err(e),
        }
    }

    /// `POST /v1/vms/{vm}/wait`: until its sshd greets (as session mode of
    /// `vm run` waits: same probe, same timeout) or its init has booted,
    /// with progress notes while it waits; a conflict when it is not
    /// running, a failure on timeout.
    pub async fn wait_vm(
        self: &Arc<Self>,
        r: &str,
        until: WaitFor,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<VmRecord, WaitError> {
        let (vm, _) = self.running_agent(r)?;
        let waited = match until {
            WaitFor::Sshd => self.wait_sshd(&vm, progress, cancel).await,
            WaitFor::System => self.wait_system(&vm, progress, cancel).await,
        };
        match waited {
            Ok(()) => {}
            Err(Unready::Cancelled(why)) => return Err(WaitError::Cancelled(why)),
            Err(Unready::Stopped(e)) => return Err(WaitError::Stopped(e)),
            Err(Unready::TimedOut(message)) => {
                return Err(match until {
                    WaitFor::Sshd => WaitError::Sshd {
                        message,
                        name: vm.name,
                    },
                    WaitFor::System => WaitError::System(message),
                });
            }
        }
        let vm = self.store.get_vm(&vm.id)?;
        if vm.state != VmState::Running {
            return Err(WaitError::NotRunning {
                name: vm.name,
                state: vm.state,
            });
        }
        Ok(vm)
    }
}

/// How long a guest whose init is late may take to say what it is doing.
const PENDING_WAIT: Duration = Duration::from_secs(10);

/// `: still <state>: <what the init is doing>` from the agent of a guest
/// whose init is late, bounded (the guest is not trusted); empty when the
/// agent does not say.
async fn still_booting(agent: &AgentClient) -> String {
    match tokio::time::timeout(PENDING_WAIT, agent.boot_status_explained()).await {
        Ok(Ok(r)) => describe_pending(r.system.describe(), &r.pending),
        _ => String::new(),
    }
}

/// At most this many of the init's pending jobs are quoted, each cut to
/// [`PENDING_CHARS`].
const PENDING_LINES: usize = 10;
const PENDING_CHARS: usize = 160;

pub(crate) fn describe_pending(state: &str, pending: &[String]) -> String {
    let clean = |s: &str, n: usize| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(n)
            .collect()
    };
    let mut out = format!(": still {}", clean(state, 32));
    if !pending.is_empty() {
        let shown: Vec<String> = pending
            .iter()
            .take(PENDING_LINES)
            .map(|p| clean(p, PENDING_CHARS))
            .collect();
        out.push_str(": ");
        out.push_str(&shown.join("; "));
        if pending.len() > PENDING_LINES {
            out.push_str(&format!("; and {} more", pending.len() - PENDING_LINES));
        }
    }
    out
}

/// Why `POST /v1/vms/{vm}/wait` did not see the VM ready.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Its sshd did not answer in time.
    #[error("{message}: `banger vm logs {name}` shows its console")]
    Sshd { message: String, name: VmName },
    /// Its init did not finish booting in time (or its agent could not say).
    #[error("{0}")]
    System(String),
    /// The client went away or the daemon is stopping.
    #[error("{0}")]
    Cancelled(&'static str),
    /// The VM stopped while it was waited for.
    #[error("VM {name} is {state} now")]
    NotRunning { name: VmName, state: VmState },
    /// Its VMM exited while it was waited for: how the guest ended.
    #[error("{0:#}")]
    Stopped(anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl WaitError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WaitError::Agent(e) => e.kind(),
            WaitError::Sshd { .. }
            | WaitError::System(_)
            | WaitError::Cancelled(_)
            | WaitError::Stopped(_) => ErrorKind::Failed,
            WaitError::NotRunning { .. } => ErrorKind::Conflict,
            WaitError::Store(e) => store_kind(e),
        }
    }
}

/// How long a lost agent connection waits for its VMM's exit to be seen.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// [`stopped_during`] of a guest whose agent never greeted.
pub(crate) fn stopped_before_agent(vm: &str, paths: &VmPaths) -> anyhow::Error {
    stopped_during(vm, paths, "before its agent came up")
}

/// The one line a failed boot leaves on the console, as an error; else
/// that the VM stopped `when` ("before its agent came up"), with the
/// console's last lines and the VMM's (which say how the guest ended:
/// Firecracker logs a triple fault apart from a reset the guest asked for).
pub(crate) fn stopped_during(vm: &str, paths: &VmPaths, when: &str) -> anyhow::Error {
    let console = paths.console_log();
    // The failure line is among the last the guest printed before it
    // ended; the console may hold megabytes the guest wrote before that.
    let text = crate::vm::boot::read_tail(&console, FAILURE_SEARCH_BYTES)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if let Some(reason) = banger_agent_proto::boot::boot_failure(&text) {
        return anyhow!("VM {vm} cannot boot: {reason}");
    }
    let tail = crate::vm::console_tail(&console, CONSOLE_LINES);
    let vmm = crate::vm::console_tail(&paths.vmm_log(), VMM_LOG_LINES);
    if vmm.is_empty() {
        anyhow!("the VM stopped {when}; last console lines:\n{tail}")
    } else {
        anyhow!(
            "the VM stopped {when}; last console lines:\n{tail}\nthe VMM's last log lines:\n{vmm}"
        )
    }
}

/// Console lines quoted by a failed boot.
pub(crate) const CONSOLE_LINES: usize = 15;
/// How much of the console's end is searched for a boot failure's line.
const FAILURE_SEARCH_BYTES: u64 = 1 << 20;
/// VMM log lines quoted by a failed boot: its exit reason is in the last few.
const VMM_LOG_LINES: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use banger_config::{Config, Paths};

    /// An agent whose image's init never finishes booting: a waiting
    /// `BootStatus` is never answered, an explaining one says what is
    /// pending.
    fn late_init_agent(guest: tokio::io::DuplexStream) {
        use banger_agent_proto::{AgentStart, Body, BootReport, Frame, FrameCodec, SystemState};
        use futures::{SinkExt, StreamExt};
        tokio::spawn(async move {
            let mut io = tokio_util::codec::Framed::new(guest, FrameCodec);
            while let Some(Ok(Ok(frame))) = io.next().await {
                if let Body::BootStatus {
                    wait: false,
                    explain: true,
                } = frame.body
                {
                    let report = BootReport {
                        agent: AgentStart::Initramfs,
                        kernel_init_ms: Some(1500),
                        agent_start_ms: 1600,
                        system: SystemState::Systemd {
                            state: "starting".into(),
                        },
                        pending: vec!["docker.service (start, running)".into()],
                    };
                    let _ = io.send(Frame::new(frame.channel, Body::Boot(report))).await;
                }
            }
        });
    }

    #[tokio::test]
    async fn a_late_init_times_out_saying_what_it_still_does() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t, 1);
        crate::vm::tests::add_image(&d);
        let vm = crate::vm::tests::record(&d, "calm-otter", VmState::Running);
        let (host, guest) = tokio::io::duplex(64 * 1024);
        late_init_agent(guest);
        let cx = d.lock_vm("calm-otter").await.expect("lock");
        cx.handle.set_agent(Some(AgentClient::spawn(host)));
        drop(cx);
        match d
            .wait_system(&vm, &ProgressSink::discard(), &CancellationToken::new())
            .await
        {
            Err(Unready::TimedOut(m)) => assert!(
                m.contains("within 1s (ready_timeout_secs): still starting: docker.service (start, running); the VM is kept running"),
                "{m}"
            ),
            other => panic!("expected a timeout: {other:?}"),
        }
    }

    #[test]
    fn a_late_init_is_described_bounded_and_on_one_line() {
        assert_eq!(describe_pending("starting", &[]), ": still starting");
        let jobs: Vec<String> = (0..13)
            .map(|i| format!("u{i}.service (start, waiting)"))
            .collect();
        let d = describe_pending("starting", &jobs);
        assert!(
            d.starts_with(": still starting: u0.service (start, waiting); u1.service"),
            "{d}"
        );
        assert!(
            d.ends_with("u9.service (start, waiting); and 3 more"),
            "{d}"
        );
        let hostile = ["x\ny".repeat(500)];
        let d = describe_pending("st\rate", &hostile);
        assert!(!d.contains('\n') && !d.contains('\r'), "{d}");
        assert!(d.len() < 200, "{}", d.len());
    }
    use banger_model::{Provenance, SpecValue, VmBackend, VmId, VmName, VmSpec, VmState};
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    fn vm(port: u16) -> VmRecord {
        VmRecord {
            id: VmId("0".repeat(32)),
            name: VmName::parse("calm-otter").expect("name"),
            image: "debian-bookworm".into(),
            state: VmState::Running,
            backend: VmBackend::Qemu,
            spec: VmSpec {
                vcpu: SpecValue::new(1, Provenance::Flag),
                memory_mib: SpecValue::new(512, Provenance::Flag),
                disk_bytes: SpecValue::new(1 << 30, Provenance::Flag),
            },
            dir: "/nonexistent".into(),
            pid: None,
            nat: false,
            ip: None,
            tap: None,
            ssh_port: Some(port),
            initramfs: Default::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            last_error: None,
            start: Default::default(),
        }
    }

    fn daemon(t: &tempfile::TempDir, timeout_secs: u32) -> Arc<Daemon> {
        let config = Config {
            ready_timeout_secs: timeout_secs,
            ..Config::default()
        };
        Daemon::new(config, Paths::under(t.path())).expect("daemon")
    }

    /// Like user-mode networking before the guest listens: connections are
    /// accepted and closed without a banner; after `greet` is set, a banner.
    async fn fake_sshd() -> (u16, Arc<std::sync::atomic::AtomicBool>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let greet = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = greet.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                if g.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
                }
            }
        });
        (port, greet)
    }

    #[tokio::test]
    async fn waits_for_the_banner_and_says_so_once() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t, 60);
        let (port, greet) = fake_sshd().await;
        let notes = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let n = notes.clone();
        let progress = ProgressSink::new(move |ev| {
            let banger_api::Event::Phase { step, message } = ev else {
                panic!("not a phase: {ev:?}");
            };
            if step == Step::Sshd {
                // The waiting note came: now let sshd answer.
                greet.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            n.lock().expect("lock").push((step.to_string(), message));
        });
        let r = d
            .wait_sshd(&vm(port), &progress, &CancellationToken::new())
            .await;
        assert!(r.is_ok(), "{r:?}");
        let notes = notes.lock().expect("lock").clone();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(notes[0].0, "sshd");
        assert!(
            notes[0].1.starts_with(&format!(
                "waiting for calm-otter's sshd on 127.0.0.1:{port} (up to 60s)"
            )),
            "{notes:?}"
        );
        assert_eq!(notes[1].0, "ready");
    }

    #[tokio::test]
    async fn an_sshd_already_up_needs_no_note_and_none_times_out() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t, 1);
        let (port, greet) = fake_sshd().await;
        greet.store(true, std::sync::atomic::Ordering::SeqCst);
        let notes = Arc::new(Mutex::new(0));
        let n = notes.clone();
        let progress = ProgressSink::new(move |_| *n.lock().expect("lock") += 1);
        let r = d
            .wait_sshd(&vm(port), &progress, &CancellationToken::new())
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(*notes.lock().expect("lock"), 0);

        let (port, _never) = fake_sshd().await;
        match d
            .wait_sshd(
                &vm(port),
                &ProgressSink::discard(),
                &CancellationToken::new(),
            )
            .await
        {
            Err(Unready::TimedOut(m)) => {
                assert!(m.contains("within 1s (ready_timeout_secs)"), "{m}")
            }
            _ => panic!("expected a timeout"),
        }
    }

    #[tokio::test]
    async fn a_boot_kept_for_sshd_says_so_and_a_cancel_gives_the_reason() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t, 1);
        let (port, _never) = fake_sshd().await;
        let want = Readiness {
            system: false,
            sshd: true,
        };
        let quiet = ProgressSink::discard();
        let r = d
            .wait_ready(&vm(port), want, &quiet, &CancellationToken::new())
            .await;
        let Err(Unready::TimedOut(m)) = r else {
            panic!("expected a timeout: {r:?}");
        };
        assert!(
            m.ends_with("within 1s (ready_timeout_secs); the VM is kept running for inspection: `banger vm logs calm-otter` shows its console, `banger vm delete calm-otter` removes it"),
            "{m}"
        );
        assert!(matches!(
            Unready::TimedOut(m).into_boot(),
            BootError::NotReady(_)
        ));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r = d.wait_ready(&vm(port), want, &quiet, &cancel).await;
        let e = r.expect_err("cancelled").into_boot();
        assert!(matches!(e, BootError::Failed(_)), "{e:?}");
        assert_eq!(e.to_string(), "cancelled: the client went away");
        // Nothing asked: ready at once, even without an agent or address.
        let mut no_net = vm(port);
        no_net.ssh_port = None;
        let r = d
            .wait_ready(&no_net, Readiness::default(), &quiet, &cancel)
            .await;
        assert!(r.is_ok(), "{r:?}");
        // The guest's init without an agent connection: not ready, kept.
        let r = d
            .wait_ready(
                &no_net,
                Readiness::SYSTEM,
                &quiet,
                &CancellationToken::new(),
            )
            .await;
        let e = r.expect_err("no agent").into_boot();
        assert_eq!(e.to_string(), "VM calm-otter has no agent connection");
    }

    #[tokio::test]
    async fn a_guest_that_goes_down_ends_the_wait_at_once_saying_how() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t, 600);
        let (port, _never) = fake_sshd().await;
        let dir = tempfile::tempdir().expect("vm dir");
        let mut vm = vm(port);
        vm.dir = dir.path().to_path_buf();
        std::fs::write(
            VmPaths::new(dir.path()).console_log(),
            "[   19.0] systemd[1]: Starting ssh.service\n[   19.1] reboot: Restarting system\n",
        )
        .expect("console");
        let exit = d.vms.handle(&vm.id).new_exit();
        let quiet = ProgressSink::discard();
        let cancel = CancellationToken::new();
        let waited = async {
            tokio::join!(d.wait_sshd(&vm, &quiet, &cancel), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                exit.send(true).expect("a waiter");
            })
        };
        let (r, _) = tokio::time::timeout(Duration::from_secs(20), waited)
            .await
            .expect("the wait ended with the VM, not with its 600 s timeout");
        let Err(Unready::Stopped(e)) = r else {
            panic!("expected the VM's stop: {r:?}");
        };
        let m = e.to_string();
        assert!(
            m.starts_with("the VM stopped before its sshd answered; last console lines:"),
            "{m}"
        );
        assert!(m.contains("reboot: Restarting system"), "{m}");
        assert!(matches!(
            Unready::Stopped(e).into_boot(),
            BootError::Failed(_)
        ));

        // The guest's init: its agent never answers; the VM is gone already.
        let (host, guest) = tokio::io::duplex(64 * 1024);
        late_init_agent(guest);
        d.vms
            .handle(&vm.id)
            .set_agent(Some(AgentClient::spawn(host)));
        let r = tokio::time::timeout(Duration::from_secs(20), d.wait_system(&vm, &quiet, &cancel))
            .await
            .expect("the wait ended with the VM");
        let Err(Unready::Stopped(e)) = r else {
            panic!("expected the VM's stop: {r:?}");
        };
        assert!(
            e.to_string()
                .starts_with("the VM stopped before its init finished booting;"),
            "{e}"
        );
        // Through the API's wait: a failure, not a conflict.
        let w = WaitError::Stopped(e);
        assert_eq!(w.kind(), ErrorKind::Failed);
    }

    #[test]
    fn finishing_a_boot_records_what_each_outcome_keeps() {
        let t = tempfile::tempdir().expect("tmp");
        let d = crate::vm::tests::daemon(&t);
        let quiet = ProgressSink::discard();
        let state = |vm: &VmRecord| d.store.get_vm(&vm.id).expect("vm");

        let mut vm = crate::vm::tests::record(&d, "calm-otter", VmState::Starting);
        let e = d
            .finish_boot(
                &mut vm,
                Steps::new(&quiet),
                Err(BootError::NotReady("slow guest".into())),
                OnFailure::RolledBack,
            )
            .expect_err("not ready");
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Failed, "slow guest")
        );
        let stored = state(&vm);
        assert_eq!(stored.state, VmState::Error);
        assert_eq!(stored.last_error.as_deref(), Some("slow guest"));

        let mut vm = crate::vm::tests::record(&d, "brave-heron", VmState::Starting);
        let failed = || Err(BootError::Failed(anyhow!("disk").context("boot")));
        d.finish_boot(&mut vm, Steps::new(&quiet), failed(), OnFailure::RolledBack)
            .expect_err("failed");
        assert_eq!(
            state(&vm).state,
            VmState::Starting,
            "a rolled-back create records nothing"
        );
        let e = d
            .finish_boot(&mut vm, Steps::new(&quiet), failed(), OnFailure::KeepRecord)
            .expect_err("failed");
        assert_eq!(e.to_string(), "boot: disk");
        let stored = state(&vm);
        assert_eq!(stored.state, VmState::Error);
        assert_eq!(stored.last_error.as_deref(), Some("boot: disk"));

        let mut vm = crate::vm::tests::record(&d, "quiet-lynx", VmState::Starting);
        d.finish_boot(&mut vm, Steps::new(&quiet), Ok(()), OnFailure::KeepRecord)
            .expect("ready");
        assert_eq!(
            state(&vm).state,
            VmState::Starting,
            "a ready VM's state is its boot's"
        );
    }

    #[test]
    fn wait_errors_keep_todays_messages() {
        let e = WaitError::Sshd {
            message: "VM calm-otter's sshd did not answer".into(),
            name: VmName::parse("calm-otter").expect("name"),
        };
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (
                ErrorKind::Failed,
                "VM calm-otter's sshd did not answer: `banger vm logs calm-otter` shows its console"
            )
        );
        let e = WaitError::NotRunning {
            name: VmName::parse("calm-otter").expect("name"),
            state: VmState::Stopped,
        };
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Conflict, "VM calm-otter is stopped now")
        );
    }

    #[test]
    fn a_failed_boot_is_one_line() {
        let t = tempfile::tempdir().expect("tmp");
        let paths = VmPaths::new(t.path());
        let console = paths.console_log();
        std::fs::write(
            &console,
            "[    1.9] Run /init as init process\r\nbanger-agent: boot failed: the image has no init at /sbin/init: it cannot boot\r\n[    2.0] reboot: Restarting system\r\n",
        )
        .expect("w");
        let e = stopped_before_agent("calm-otter", &paths).to_string();
        assert_eq!(
            e,
            "VM calm-otter cannot boot: the image has no init at /sbin/init: it cannot boot"
        );
        std::fs::write(
            &console,
            "[ 1.0] something\n[ 2.0] Kernel panic - not syncing: x\n",
        )
        .expect("w");
        let e = stopped_before_agent("x", &paths).to_string();
        assert!(e.contains("Kernel panic"), "{e}");
        assert!(!e.contains("VMM"), "no VMM log, no VMM lines: {e}");
        std::fs::write(
            paths.vmm_log(),
            "2026-12-06T10:37:35 [fc:main] Running Firecracker\n2026-12-06T10:37:35 [fc:vcpu0] Received KVM_EXIT_SHUTDOWN signal\n2026-12-06T10:37:35 [fc:main] Vmm is stopping.\n",
        )
        .expect("w");
        let e = stopped_before_agent("x", &paths).to_string();
        let (console_part, vmm_part) = e
            .split_once("the VMM's last log lines:\n")
            .expect("VMM part");
        assert!(console_part.contains("Kernel panic"), "{e}");
        assert!(
            vmm_part.ends_with(
                "Received KVM_EXIT_SHUTDOWN signal\n2026-12-06T10:37:35 [fc:main] Vmm is stopping."
            ),
            "{e}"
        );
    }
}
