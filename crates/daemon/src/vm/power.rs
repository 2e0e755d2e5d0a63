//! Powering a guest off: ask it, then wait for its VMM to exit.

use super::VmCtx;
use crate::Daemon;
use banger_agent_proto::client::AgentClient;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How to ask a guest to power off.
pub(crate) enum Ask<'a> {
    /// Through this agent connection.
    Agent(&'a AgentClient),
    /// Through the VM's recorded agent, else by ACPI through the VMM.
    AgentElseAcpi,
}

/// How a power-off ended. Each caller decides what the other outcomes
/// mean (end the VMM, or fail with its own message).
pub(crate) enum PowerOff {
    /// The VMM exited within the wait.
    Exited,
    /// The VMM did not exit within the wait.
    TimedOut,
    /// The operation was cancelled while waiting.
    Cancelled,
    /// The VMM's exit is not watched: there is no telling when it ends.
    Unwatched,
    /// The guest could not be asked.
    NotAsked(anyhow::Error),
}

impl Daemon {
    /// Asks the guest of `cx` to power off (see [`Ask`]) and waits up to
    /// `wait`, or until `cancel`, for its VMM to exit. The VM's recorded
    /// agent is forgotten first: its connection ending is then no loss.
    pub(crate) async fn power_off(
        &self,
        cx: &VmCtx,
        ask: Ask<'_>,
        wait: Duration,
        cancel: Option<&CancellationToken>,
    ) -> PowerOff {
        let exited = cx.handle.subscribe_exit();
        let recorded = cx.handle.take_agent();
        let reboot = self.guest_exits_by_reboot();
        let asked: anyhow::Result<()> = match (ask, recorded.as_ref()) {
            (Ask::Agent(agent), _) | (Ask::AgentElseAcpi, Some(agent)) => {
                agent.shutdown(reboot).map_err(Into::into)
            }
            (Ask::AgentElseAcpi, None) => match self.vmm() {
                Ok(v) => v.request_shutdown(&cx.vm.dir).await.map_err(Into::into),
                Err(e) => Err(e.into()),
            },
        };
        let Some(mut exited) = exited else {
            return PowerOff::Unwatched;
        };
        if let Err(e) = asked {
            return PowerOff::NotAsked(e);
        }
        let gone = tokio::time::timeout(wait, exited.wait_for(|gone| *gone));
        let gone = match cancel {
            Some(c) => tokio::select! {
                r = gone => r,
                _ = c.cancelled() => return PowerOff::Cancelled,
            },
            None => gone.await,
        };
        if gone.is_ok_and(|r| r.is_ok()) {
            PowerOff::Exited
        } else {
            PowerOff::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};
    use banger_model::VmState;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn asks_then_waits_for_the_exit_or_says_why_not() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let vm = record(&d, "calm-otter", VmState::Running);
        let cx = d.lock_vm("calm-otter").await.expect("lock");
        let (host, mut guest) = tokio::io::duplex(64 * 1024);
        let agent = AgentClient::spawn(host);
        cx.handle.set_agent(Some(agent.clone()));
        let never = CancellationToken::new();

        let off = d
            .power_off(&cx, Ask::Agent(&agent), Duration::from_secs(10), None)
            .await;
        assert!(matches!(off, PowerOff::Unwatched), "no exit watch yet");
        assert!(
            cx.handle.agent().is_none(),
            "the recorded agent is forgotten"
        );

        let exit = cx.handle.new_exit();
        let off = d
            .power_off(
                &cx,
                Ask::Agent(&agent),
                Duration::from_millis(50),
                Some(&never),
            )
            .await;
        assert!(matches!(off, PowerOff::TimedOut));

        let cancelled = CancellationToken::new();
        cancelled.cancel();
        let off = d
            .power_off(
                &cx,
                Ask::Agent(&agent),
                Duration::from_secs(10),
                Some(&cancelled),
            )
            .await;
        assert!(matches!(off, PowerOff::Cancelled));

        // The guest powers off once the request has reached it.
        let guest_side = tokio::spawn(async move {
            let mut b = [0u8; 1];
            guest.read_exact(&mut b).await.expect("a request");
            exit.send(true).expect("watched");
            guest
        });
        let off = d
            .power_off(&cx, Ask::Agent(&agent), Duration::from_secs(10), None)
            .await;
        assert!(matches!(off, PowerOff::Exited));
        drop(guest_side.await.expect("guest"));
        drop(cx);
        d.delete_vm(vm.id.as_str()).await.expect("delete");
    }
}
