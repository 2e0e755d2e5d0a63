//! Workspaces: a git repository's files copied into a VM
//! (`vm workspace prepare`, and the workspace mode of `vm run`).

use super::cp::{upload_bar, warn_skipped};
use crate::connect;
use banger_api::Client;
use banger_client::workspace;
pub use banger_client::workspace::{default_guest_path, login_shell_in};
use banger_transfer::workspace::{Options, Rev, Workspace};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// What to copy from the repository.
#[derive(Args, Clone, Default)]
pub struct SelectFlags {
    /// Copy this local branch's tree instead of the working tree; the guest
    /// checkout is on that branch and clean.
    #[arg(long, conflicts_with = "from", value_name = "B")]
    pub branch: Option<String>,
    /// Copy this commit's tree (tag, remote branch, sha); the guest checkout
    /// is detached there and clean.
    #[arg(long, value_name = "REF")]
    pub from: Option<String>,
    /// Also copy untracked files that are not ignored (ignored files never are).
    #[arg(long, conflicts_with_all = ["branch", "from"])]
    pub include_untracked: bool,
}

impl SelectFlags {
    fn options(&self) -> Options {
        Options {
            include_untracked: self.include_untracked,
            rev: match (&self.branch, &self.from) {
                (Some(b), _) => Some(Rev::Branch(b.clone())),
                (None, Some(r)) => Some(Rev::Commit(r.clone())),
                (None, None) => None,
            },
        }
    }

    fn any(&self) -> bool {
        self.branch.is_some() || self.from.is_some() || self.include_untracked
    }
}

#[derive(Subcommand)]
pub enum WorkspaceCommand {
    /// Copy a git repository's files (and its .git) into a running VM.
    Prepare {
        /// VM name or id prefix.
        vm: String,
        /// A directory inside the repository.
        path: PathBuf,
        /// Where in the guest (default: /root/<repository directory name>).
        #[arg(long, value_name = "P")]
        guest_path: Option<String>,
        #[command(flatten)]
        select: SelectFlags,
    },
}

pub async fn run(cmd: WorkspaceCommand) -> anyhow::Result<i32> {
    match cmd {
        WorkspaceCommand::Prepare {
            vm,
            path,
            guest_path,
            select,
        } => {
            let ws = select_workspace(&path, &select).await?;
            let guest = guest_path.unwrap_or_else(|| default_guest_path(&ws));
            if !guest.starts_with('/') {
                anyhow::bail!("--guest-path {guest:?} must be an absolute guest path");
            }
            let client = connect::client().await?;
            prepare(&client, &vm, &ws, &guest).await?;
            println!("{guest}");
            Ok(0)
        }
    }
}

async fn select_workspace(path: &Path, flags: &SelectFlags) -> anyhow::Result<Workspace> {
    let ws = workspace::select(path, flags.options()).await?;
    warn_skipped(&ws.plan.skipped);
    Ok(ws)
}

/// [`banger_client::workspace::prepare`] with a progress bar for a large
/// copy, printing its warnings.
pub async fn prepare(client: &Client, vm: &str, ws: &Workspace, guest: &str) -> anyhow::Result<()> {
    let bar = upload_bar(ws.plan.total_bytes());
    let warnings = workspace::prepare(client, vm, ws, guest, &mut |n| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for w in warnings? {
        eprintln!("banger: warning: {w}");
    }
    Ok(())
}

/// `vm run`'s workspace arguments.
#[derive(Args, Clone, Default)]
pub struct RunWorkspaceArgs {
    /// A git repository to copy into /root/<its name>; the command (or the
    /// ssh session) starts there.
    pub path: Option<PathBuf>,
    /// Print the files the workspace would copy, one per line, and exit
    /// without creating anything.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub select: SelectFlags,
}

/// Selects `vm run`'s workspace before anything is created: `Ok(None)` in
/// bare mode. With `--dry-run` the list is printed and the run must stop.
pub async fn for_run(a: &RunWorkspaceArgs) -> anyhow::Result<Option<Workspace>> {
    let Some(path) = &a.path else {
        if a.dry_run || a.select.any() {
            anyhow::bail!(
                "--dry-run, --branch, --from and --include-untracked need a workspace path: `banger vm run ./repo ...`"
            );
        }
        return Ok(None);
    };
    let ws = select_workspace(path, &a.select).await?;
    if a.dry_run {
        let mut out = String::new();
        for f in &ws.files {
            out.push_str(f);
            out.push('\n');
        }
        print!("{out}");
    }
    Ok(Some(ws))
}
