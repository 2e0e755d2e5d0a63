//! `banger ssh-config`: makes `ssh <name>.vm` work from any terminal.

use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SshConfigArgs {
    /// Put the Include block at the top of ~/.ssh/config (idempotent; the
    /// rest of the file is kept byte for byte).
    #[arg(long, conflicts_with = "uninstall")]
    install: bool,
    /// Remove banger's block from ~/.ssh/config, and nothing else.
    #[arg(long)]
    uninstall: bool,
}

fn user_ssh_config() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("HOME is not set: cannot find ~/.ssh/config"))?;
    Ok(PathBuf::from(home).join(".ssh/config"))
}

pub async fn run(a: SshConfigArgs) -> anyhow::Result<i32> {
    // banger's own ssh_config, kept current by the daemon (the system
    // install's under one).
    let ours = crate::connect::daemon_paths()?.ssh_config;
    if a.install {
        let user = user_ssh_config()?;
        let changed = banger_ssh::install_include(&user, &ours)?;
        println!(
            "{} {}: `ssh <vm>.vm` now uses {}",
            if changed {
                "updated"
            } else {
                "already set up:"
            },
            user.display(),
            ours.display()
        );
    } else if a.uninstall {
        let user = user_ssh_config()?;
        let changed = banger_ssh::uninstall_include(&user)?;
        println!(
            "{} {}",
            if changed {
                "removed banger's block from"
            } else {
                "no banger block in"
            },
            user.display()
        );
    } else {
        print!("{}", banger_ssh::include_block(&ours));
    }
    Ok(0)
}
