//! `banger vm ssh`: the system `ssh` with banger's key and pinned host key.

use crate::connect;
use anyhow::Context;
pub use banger_client::ssh::{key_and_known_hosts, ssh_args};
use banger_model::VmState;
use std::io::IsTerminal;

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
    let status = tokio::process::Command::new("ssh")
        .args(&args)
        .status()
        .await
        .context("running ssh (apt-get install openssh-client)")?;
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
    Ok(status.code().unwrap_or(255))
}
