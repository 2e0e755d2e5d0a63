//! Readiness beyond the agent: the guest's init finished booting, and
//! its sshd (interactive sessions; `vm ssh` waits the same way).

use crate::{Daemon, DaemonError};
use anyhow::anyhow;
use banger_api::WaitFor;
use banger_api::{ProgressSink, Step};
use banger_model::{VmRecord, VmState};
use banger_vmm::VmPaths;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// How a wait for the guest's init ended.
pub(crate) enum SystemWait {
    Booted,
    Cancelled,
    TimedOut(String),
}

/// How the wait for a guest's sshd ended.
pub(crate) enum SshWait {
    Up,
    /// The client went away or the daemon is stopping.
    Cancelled,
    /// No ssh banner in time; the message says so (callers add what to do).
    TimedOut(String),
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
    ) -> SshWait {
        let Some(addr) = ssh_target(vm) else {
            return SshWait::TimedOut(format!(
                "VM {} has no network address to reach its sshd",
                vm.name
            ));
        };
        let started = Instant::now();
        let mut waited = false;
        loop {
            if ssh_banner(addr).await {
                if waited {
                    progress.phase(
                        Step::Ready,
                        format!("sshd is up (after {} ms)", started.elapsed().as_millis()),
                    );
                }
                return SshWait::Up;
            }
            if started.elapsed() >= self.ready_timeout() {
                return SshWait::TimedOut(format!(
                    "VM {}'s sshd did not answer on {addr} within {}s (ready_timeout_secs)",
                    vm.name,
                    self.ready_timeout().as_secs(),
                ));
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
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => return SshWait::Cancelled,
            }
        }
    }

    /// Waits until the guest's init has finished booting (at once without
    /// systemd), for at most the ready timeout.
    pub(crate) async fn wait_system(
        &self,
        vm: &VmRecord,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> SystemWait {
        let Some(agent) = self.agent(&vm.id) else {
            return SystemWait::TimedOut(format!("VM {} has no agent connection", vm.name));
        };
        progress.phase(
            Step::System,
            "waiting for the guest's init to finish booting",
        );
        let started = Instant::now();
        let timeout = self.ready_timeout();
        let report = tokio::select! {
            r = tokio::time::timeout(timeout, agent.boot_status(true)) => r,
            _ = cancel.cancelled() => return SystemWait::Cancelled,
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
                SystemWait::Booted
            }
            Ok(Err(e)) => SystemWait::TimedOut(format!(
                "VM {}'s agent could not say how its boot went: {e}",
                vm.name
            )),
            Err(_) => SystemWait::TimedOut(format!(
                "VM {name}'s init did not finish booting within {}s (ready_timeout_secs); the VM is kept running for inspection: `banger vm logs {name}` shows its console, `banger vm delete {name}` removes it",
                timeout.as_secs(),
                name = vm.name
            )),
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
    ) -> Result<VmRecord, DaemonError> {
        let (vm, _) = self.running_agent(r)?;
        let hint = |m: String| {
            DaemonError::Failed(anyhow!(
                "{m}: `banger vm logs {}` shows its console",
                vm.name
            ))
        };
        match until {
            WaitFor::Sshd => match self.wait_sshd(&vm, progress, cancel).await {
                crate::vm::SshWait::Up => {}
                crate::vm::SshWait::Cancelled => {
                    return Err(DaemonError::Failed(anyhow!(self.cancel_reason())));
                }
                crate::vm::SshWait::TimedOut(m) => return Err(hint(m)),
            },
            WaitFor::System => match self.wait_system(&vm, progress, cancel).await {
                SystemWait::Booted => {}
                SystemWait::Cancelled => {
                    return Err(DaemonError::Failed(anyhow!(self.cancel_reason())));
                }
                SystemWait::TimedOut(m) => return Err(DaemonError::Failed(anyhow!(m))),
            },
        }
        let vm = self.store.get_vm(&vm.id)?;
        if vm.state != VmState::Running {
            return Err(DaemonError::Conflict(format!(
                "VM {} is {} now",
                vm.name, vm.state
            )));
        }
        Ok(vm)
    }
}

/// The one line a failed boot leaves on the console, as an error; else
/// the console's last lines and the VMM's (which say how the guest ended:
/// Firecracker logs a triple fault apart from a reset the guest asked for).
pub(crate) fn stopped_before_agent(vm: &str, paths: &VmPaths) -> anyhow::Error {
    let console = paths.console_log();
    let text = std::fs::read(&console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if let Some(reason) = banger_agent_proto::boot::boot_failure(&text) {
        return anyhow!("VM {vm} cannot boot: {reason}");
    }
    let tail = crate::vm::console_tail(&console, CONSOLE_LINES);
    let vmm = crate::vm::console_tail(&paths.vmm_log(), VMM_LOG_LINES);
    if vmm.is_empty() {
        anyhow!("the VM stopped before its agent came up; last console lines:\n{tail}")
    } else {
        anyhow!(
            "the VM stopped before its agent came up; last console lines:\n{tail}\nthe VMM's last log lines:\n{vmm}"
        )
    }
}

/// Console lines quoted by a failed boot.
pub(crate) const CONSOLE_LINES: usize = 15;
/// VMM log lines quoted by a failed boot: its exit reason is in the last few.
const VMM_LOG_LINES: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use banger_config::{Config, Paths};
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
        assert!(matches!(r, SshWait::Up));
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
        assert!(matches!(r, SshWait::Up));
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
            SshWait::TimedOut(m) => assert!(m.contains("within 1s (ready_timeout_secs)"), "{m}"),
            _ => panic!("expected a timeout"),
        }
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
