//! A repository's workspace in a VM: the tracked files (or a branch's, or
//! a commit's) copied to a directory of the guest, then its tools
//! installed in the background when the guest has mise.

use crate::files::upload;
use anyhow::Context;
use banger_api::Client;
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::files::PutFilesStart;
use banger_transfer::workspace::{self, Options, Workspace};
use std::path::Path;

/// Selects the workspace of the repository at `path` (off the async
/// threads: it reads git's index and objects).
pub async fn select(path: &Path, opts: Options) -> anyhow::Result<Workspace> {
    let path = path.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || workspace::select(&path, &opts)).await??)
}

/// Where a workspace goes in the guest when nothing else is asked for.
pub fn default_guest_path(ws: &Workspace) -> String {
    format!("/root/{}", ws.name)
}

/// Copies `ws` to `guest` (replacing what was there once the copy is
/// complete), then starts the best-effort tooling bootstrap. `on_bytes`
/// hears the copy's progress. Returns warnings for the user (a bootstrap
/// that did not start).
pub async fn prepare(
    client: &Client,
    vm: &str,
    ws: &Workspace,
    guest: &str,
    on_bytes: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<Vec<String>> {
    let start = PutFilesStart {
        dest: guest.to_string(),
        replace: true,
    };
    upload(
        client,
        vm,
        ws.plan.clone(),
        ws.blob_repo.clone(),
        start,
        on_bytes,
    )
    .await
    .with_context(|| format!("copying workspace {}", ws.root.display()))?;
    let mut warnings = Vec::new();
    if ws.has_tool_config()
        && let Err(e) = bootstrap_tooling(client, vm, guest, &ws.name).await
    {
        warnings.push(format!("tooling bootstrap did not start: {e}"));
    }
    Ok(warnings)
}

/// Starts `mise install` in the background in the guest workspace when the
/// guest has mise.
async fn bootstrap_tooling(client: &Client, vm: &str, dir: &str, repo: &str) -> anyhow::Result<()> {
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
    let (_w, mut r) = client.exec(vm, &start).await?;
    while let Some(ev) = r.next().await? {
        if let ExecOutput::Exit(_) | ExecOutput::Error(_) = ev {
            break;
        }
    }
    Ok(())
}

/// The remote command of an ssh session that starts a login shell in `dir`.
pub fn login_shell_in(dir: &str) -> Vec<String> {
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
