//! `banger vm ssh`: the system `ssh` with banger's key and pinned host key.

use crate::connect;
use anyhow::Context;
use banger_api::{Client, LogsQuery};
pub use banger_client::ssh::{key_and_known_hosts, ssh_args};
use banger_model::{VmRecord, VmState};
use std::io::IsTerminal;
use std::time::Duration;

/// How often the VM of a running ssh is checked: a session whose VM went
/// down ends within this, not when TCP gives up on the vanished guest
/// (about 15 minutes with Linux's defaults).
const VM_WATCH: Duration = Duration::from_secs(2);

/// Console lines quoted when a session's VM went down.
const DOWN_TAIL: u64 = 15;

pub async fn run(vm_ref: &str, command: Vec<String>) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    // A VM that has just booted may not run sshd yet (its agent is ready
    // first): wait for it like session mode of `vm run`, saying so once.
    let vm = client
        .wait_vm(vm_ref, banger_api::WaitFor::Sshd, |ev| {
            if let banger_api::WaitEvent::Progress(p) = ev
                && p.phase == banger_api::Step::Sshd
            {
                eprintln!("banger: {}", p.message);
            }
        })
        .await?;
    let (key, known_hosts) = key_and_known_hosts()?;
    let args = ssh_args(&vm, &key, &known_hosts, &command)?;
    let interactive = command.is_empty() && std::io::stdin().is_terminal();
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.args(&args).kill_on_drop(true);
    let mut child = ssh
        .spawn()
        .context("running ssh (apt-get install openssh-client)")?;
    let status = tokio::select! {
        status = child.wait() => status.context("waiting for ssh")?,
        down = went_down(&client, &vm) => {
            end_ssh(&mut child).await;
            report_down(&client, &vm, down).await;
            return Ok(SSH_LOST);
        }
    };
    if interactive {
        // The guest may have been powered off from inside the session.
        if let Ok(v) = client.get_vm(vm.id.as_str()).await
            && v.state == VmState::Running
        {
            eprintln!(
                "banger: {} is still running; `banger vm stop {}` when you are done",
                v.name, v.name
            );
        }
    }
    Ok(status.code().unwrap_or(SSH_LOST))
}

/// ssh's own exit status when it fails, a lost connection included.
pub const SSH_LOST: i32 = 255;

/// Resolves once `vm` no longer runs (stopped, stopping, gone: `None`),
/// checked every [`VM_WATCH`]; never while it runs or while the daemon
/// cannot be asked (it may be restarting).
pub async fn went_down(client: &Client, vm: &VmRecord) -> Option<VmState> {
    loop {
        tokio::time::sleep(VM_WATCH).await;
        match client.get_vm(vm.id.as_str()).await {
            Ok(v) if v.state == VmState::Running => {}
            Ok(v) => return Some(v.state),
            Err(e) if e.code() == Some("not_found") => return None,
            Err(_) => {}
        }
    }
}

/// Ends a running ssh: TERM, then KILL after 5 s.
pub async fn end_ssh(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Says on stderr that the session ended because `vm` went down, with the
/// end of its console (what a guest that reset or panicked printed last).
pub async fn report_down(client: &Client, vm: &VmRecord, state: Option<VmState>) {
    let Some(state) = state else {
        eprintln!(
            "banger: VM {} was deleted during the session; the session is ended",
            vm.name
        );
        return;
    };
    let query = LogsQuery {
        tail: Some(DOWN_TAIL),
        ..Default::default()
    };
    let mut tail = Vec::new();
    let logs = tokio::time::timeout(
        Duration::from_secs(5),
        client.logs(vm.id.as_str(), &query, |c| tail.extend_from_slice(c)),
    )
    .await;
    let console = match logs {
        Ok(Ok(())) if !tail.is_empty() => format!(
            "; the end of its console:\n{}",
            String::from_utf8_lossy(&tail).trim_end()
        ),
        _ => format!("; see `banger vm logs {}`", vm.name),
    };
    eprintln!(
        "banger: VM {} went down during the session (now {state}), so the session is ended{console}",
        vm.name
    );
}
