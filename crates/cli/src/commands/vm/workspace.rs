//! Workspaces: a git repository's files copied into a VM
//! (`vm workspace prepare`, and the workspace mode of `vm run`).

use super::cp::{upload, warn_skipped};
use crate::connect;
use anyhow::Context;
use banger_api::Client;
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::files::PutFilesStart;

use banger_transfer::workspace::{self, Options, Rev, Workspace};
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

pub(crate) fn default_guest_path(ws: &Workspace) -> String {
    format!("/root/{}", ws.name)
}

async fn select_workspace(path: &Path, flags: &SelectFlags) -> anyhow::Result<Workspace> {
    let path = path.to_path_buf();
    let opts = flags.options();
    let ws = tokio::task::spawn_blocking(move || workspace::select(&path, &opts)).await??;
    warn_skipped(&ws.plan.skipped);
    Ok(ws)
}

/// Copies `ws` to `guest` (replacing what was there once the copy is
/// complete), then starts the best-effort tooling bootstrap.
pub async fn prepare(client: &Client, vm: &str, ws: &Workspace, guest: &str) -> anyhow::Result<()> {
    let start = PutFilesStart {
        dest: guest.to_string(),
        replace: true,
    };
    upload(client, vm, ws.plan.clone(), ws.blob_repo.clone(), start)
        .await
        .with_context(|| format!("copying workspace {}", ws.root.display()))?;
    if ws.has_tool_config() {
        bootstrap_tooling(client, vm, guest, &ws.name).await;
    }
    Ok(())
}

/// Starts `mise install` in the background in the guest workspace when the
/// guest has mise; never fails the caller.
async fn bootstrap_tooling(client: &Client, vm: &str, dir: &str, repo: &str) {
    const SCRIPT: &str = r#"command -v mise >/dev/null 2>&1 || exit 0
mkdir -p "$(dirname "$2")" && cd "$1" || exit 0
nohup sh -c 'mise trust --yes . >/dev/null 2>&1; exec mise install' >"$2" 2>&1 </dev/null &
exit 0"#;
    let log = format!("/root/.cache/banger/vm-run-tooling-{repo}.log");
    let start = ExecStart {
        argv: vec![
            "sh".into(),
            "-c".into(),
            SCRIPT.into(),
            "sh".into(),
            dir.into(),
            log,
        ],
        ..Default::default()
    };
    let result = async {
        let (_w, mut r) = client.exec(vm, &start).await?;
        while let Some(ev) = r.next().await? {
            if let ExecOutput::Exit(_) | ExecOutput::Error(_) = ev {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("banger: warning: tooling bootstrap did not start: {e}");
    }
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

/// The remote command of an ssh session that starts a login shell in `dir`.
pub(crate) fn login_shell_in(dir: &str) -> Vec<String> {
    vec![format!(
        "cd {} && exec \"${{SHELL:-/bin/sh}}\" -l",
        shell_quote(dir)
    )]
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/root/my repo"), "'/root/my repo'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
