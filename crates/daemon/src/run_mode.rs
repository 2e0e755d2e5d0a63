//! What `banger vm run` asks of a create beyond `vm create`: readiness
//! that includes the guest's sshd (interactive sessions), and VMs owned by
//! the create request's connection (`--rm`), deleted by the daemon when
//! that connection closes, so a killed CLI cannot leak its VM.

use crate::Daemon;
use banger_api::CreateVmEvent;
use banger_model::VmRecord;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How the wait for a guest's sshd ended.
pub(crate) enum SshWait {
    Up,
    /// The client went away or the daemon is stopping.
    Cancelled,
    /// No ssh banner in time; the message says what to do.
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

    /// Waits until the guest's sshd greets, for at most [`Self::ready_timeout`].
    pub(crate) async fn wait_sshd(
        &self,
        vm: &VmRecord,
        progress: &(dyn Fn(&str, &str) + Sync),
        cancel: &CancellationToken,
    ) -> SshWait {
        let Some(addr) = ssh_target(vm) else {
            return SshWait::TimedOut(format!(
                "VM {name} has no network address to reach its sshd; it is kept for inspection: `banger vm logs {name}`",
                name = vm.name
            ));
        };
        progress("sshd", "waiting for the guest's sshd");
        let started = Instant::now();
        loop {
            if ssh_banner(addr).await {
                progress(
                    "ready",
                    &format!(
                        "sshd is up ({} ms after the agent)",
                        started.elapsed().as_millis()
                    ),
                );
                return SshWait::Up;
            }
            if started.elapsed() >= self.ready_timeout() {
                return SshWait::TimedOut(format!(
                    "VM {name}'s sshd did not answer on {addr} within {}s (ready_timeout_secs); the VM is kept running for inspection: `banger vm logs {name}` shows its console, `banger vm delete {name}` removes it",
                    self.ready_timeout().as_secs(),
                    name = vm.name
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => return SshWait::Cancelled,
            }
        }
    }

    /// Keeps an ephemeral VM (`vm run --rm`) alive while its create
    /// response is being read: when the client's connection closes (`tx`'s
    /// receiver, the response stream, is dropped), the VM is deleted. A
    /// daemon shutdown ends the hold and keeps the VM (it survives daemon
    /// restarts; the CLI deletes it itself when its run ends).
    pub async fn hold_ephemeral(
        self: &Arc<Self>,
        vm: VmRecord,
        tx: mpsc::UnboundedSender<CreateVmEvent>,
    ) {
        tokio::select! {
            _ = tx.closed() => {}
            _ = self.shutdown.cancelled() => return,
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        match self.delete_vm(vm.id.as_str()).await {
            Ok(_) => {
                tracing::info!(vm = %vm.name, "deleted ephemeral VM: its client went away")
            }
            // The client deleted it itself before closing: the usual case.
            Err(crate::DaemonError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "could not delete ephemeral VM")
            }
        }
    }
}
