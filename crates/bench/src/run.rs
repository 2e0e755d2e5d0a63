//! `banger bench run`: `vm run REPO -- true` on a generated git repository
//! (JSON): where its time goes, and its workspace copy against
//! `git archive HEAD | ssh VM tar -x` into the same VM in the same run.

use super::util::{exec_text, ms, run_ssh, xorshift};
use anyhow::Context;
use banger_client::connect;
use banger_client::ssh::{key_and_known_hosts, ssh_args};
use banger_client::workspace::{prepare, select};
use banger_model::VmRecord;
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// banger's ssh key and known_hosts.
type KeyFiles = (std::path::PathBuf, std::path::PathBuf);

#[derive(Args)]
pub struct RunBenchArgs {
    /// Files in the generated repository (100 per directory).
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Image to boot (default: the configured default image).
    #[arg(long)]
    image: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    files: usize,
    /// Bytes of the tracked files.
    bytes: u64,
    vm: String,
    /// Phases of `banger vm run --json REPO -- true` (its own record), plus
    /// `delete`: the VM is deleted right after the comparison below, which
    /// is what `--rm` would have done at the end of the run.
    phases_ms: BTreeMap<String, f64>,
    /// `vm run` up to its exit plus the delete.
    total_ms: f64,
    /// Everything but the guest's boot.
    overhead_outside_boot_ms: f64,
    /// The same without the workspace copy and without the exec round trip
    /// of `true` (whose time is the guest starting a process): banger's
    /// own work, target < 100 ms.
    overhead_beyond_copy_and_command_ms: f64,
    /// `vm run`'s copy phase: tar stream through daemon and agent, right
    /// after the agent's hello, so it shares the guest with the rest of its
    /// boot (sshd and other services still starting).
    copy_ms: f64,
    /// The same workspace copied again the same way (`vm workspace
    /// prepare`'s path) once sshd answers, beside the git archive below.
    copy_settled_ms: f64,
    /// `git archive HEAD | ssh VM 'mkdir -p D && tar -x -C D'`, connection
    /// set-up included, on the settled guest.
    git_archive_ssh_ms: f64,
    /// git archive's time over banger's settled copy: above 1.0 banger is
    /// faster.
    copy_speedup_banger_over_git_archive: f64,
}

pub async fn run(a: RunBenchArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.files >= 1, "--files must be at least 1");
    let dir = tempfile::tempdir().context("temporary directory")?;
    let repo = dir.path().join("bench-repo");
    let (files, bytes) = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || make_repo(&repo, a.files)).await??
    };
    eprintln!("bench: repository of {files} files ({bytes} bytes) committed");
    let name = format!("bench-run-{}", std::process::id());

    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["vm", "run", "--json", "--name", &name]);
    if let Some(i) = &a.image {
        cmd.args(["--image", i]);
    }
    cmd.arg(&repo).args(["--", "true"]);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("running banger vm run")?;
    let client = connect::client().await?;
    let record: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(r) if out.status.success() => r,
        _ => {
            let _ = client.delete_vm(&name).await;
            anyhow::bail!(
                "banger vm run exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    };
    let result = compare(&client, &name, &repo, (files, bytes), record).await;
    let t = Instant::now();
    client.delete_vm(&name).await?;
    let delete = t.elapsed();
    let mut report = result?;
    report.phases_ms.insert("delete".into(), ms(delete));
    report.total_ms += ms(delete);
    report.overhead_outside_boot_ms += ms(delete);
    report.overhead_beyond_copy_and_command_ms += ms(delete);
    eprintln!(
        "bench: copy {:.0} ms in the run, {:.0} ms settled (git archive | ssh tar x {:.0} ms); overhead beyond copy and command {:.0} ms",
        report.copy_ms,
        report.copy_settled_ms,
        report.git_archive_ssh_ms,
        report.overhead_beyond_copy_and_command_ms
    );
    crate::util::print_json(&report)?;
    Ok(0)
}

/// Reads `vm run`'s record, copies the repository again with git archive
/// over ssh, and checks both copies hold every file.
async fn compare(
    client: &banger_api::Client,
    name: &str,
    repo: &Path,
    (files, bytes): (usize, u64),
    record: serde_json::Value,
) -> anyhow::Result<Report> {
    let phases: BTreeMap<String, f64> = record["timings_ms"]
        .as_object()
        .context("vm run's record has no timings_ms")?
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
        .collect();
    let phase = |p: &str| {
        phases
            .get(p)
            .copied()
            .with_context(|| format!("vm run's record has no {p} timing: {record}"))
    };
    let (total, boot, copy, command) = (
        phase("total")?,
        phase("boot")?,
        phase("copy")?,
        phase("command")?,
    );
    let vm = client.get_vm(name).await?;
    let repo_name = repo
        .file_name()
        .and_then(|n| n.to_str())
        .context("repository name")?;
    let banger_dir = format!("/root/{repo_name}");
    let archive_dir = "/root/bench-git-archive";

    let ssh = key_and_known_hosts()?;
    wait_for_sshd(&vm, &ssh).await?;
    let t = Instant::now();
    git_archive_over_ssh(&vm, &ssh, repo, archive_dir).await?;
    let git_archive = t.elapsed();

    let ws = select(repo, Default::default())
        .await
        .context("the generated repository is not a workspace")?;
    let settled_dir = "/root/bench-banger-settled";
    let t = Instant::now();
    prepare(client, name, &ws, settled_dir, &mut |_| {}).await?;
    let settled = t.elapsed();

    for dir in [banger_dir.as_str(), archive_dir, settled_dir] {
        let script = format!("find {dir} -path {dir}/.git -prune -o -type f -print | wc -l");
        let (out, code) = exec_text(client, name, &["sh", "-c", &script]).await?;
        anyhow::ensure!(
            code == 0 && out.trim() == files.to_string(),
            "{name}:{dir} holds {} files, the repository {files}",
            out.trim()
        );
    }
    Ok(Report {
        files,
        bytes,
        vm: name.to_string(),
        phases_ms: phases.clone(),
        total_ms: total,
        overhead_outside_boot_ms: total - boot,
        overhead_beyond_copy_and_command_ms: total - boot - copy - command,
        copy_ms: copy,
        copy_settled_ms: ms(settled),
        git_archive_ssh_ms: ms(git_archive),
        copy_speedup_banger_over_git_archive: ms(git_archive) / ms(settled).max(1e-9),
    })
}

/// Waits until `ssh VM true` succeeds (sshd may start after the agent said
/// the guest was ready), for at most two minutes.
async fn wait_for_sshd(vm: &VmRecord, (key, known_hosts): &KeyFiles) -> anyhow::Result<()> {
    let args = ssh_args(vm, key, known_hosts, &["true".to_string()])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match run_ssh(&args, Stdio::null(), Stdio::null()).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{}'s sshd did not answer in 2 minutes", vm.name)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn git_archive_over_ssh(
    vm: &VmRecord,
    (key, known_hosts): &KeyFiles,
    repo: &Path,
    dest: &str,
) -> anyhow::Result<()> {
    let remote = format!("mkdir -p {dest} && tar -x -C {dest}");
    let args = ssh_args(vm, key, known_hosts, &[remote])?;
    let mut git = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", "HEAD"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let pipe = git.stdout.take().context("git archive's stdout")?;
    let sent = run_ssh(&args, Stdio::from(pipe), Stdio::null()).await;
    // ssh has read the archive to its end (or failed): git is done too.
    let git = git.wait()?;
    sent.context("ssh tar -x")?;
    anyhow::ensure!(git.success(), "git archive exited with {git}");
    Ok(())
}

/// Creates a git repository at `dir` with `files` files of 64 B to 8 KiB
/// (100 per directory), all committed; returns their count and bytes.
fn make_repo(dir: &Path, files: usize) -> anyhow::Result<(usize, u64)> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = 0u64;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        xorshift(&mut x);
        let len = 64 + (x % 8128) as usize;
        let line = format!("{x:016x} file {i}\n");
        let body: String = line.repeat(len / line.len() + 1)[..len].to_string();
        let mut f = std::fs::File::create(sub.join(format!("f{i:05}.txt")))?;
        f.write_all(body.as_bytes())?;
        bytes += len as u64;
    }
    git(dir, &["init", "-q"])?;
    git(dir, &["add", "-A"])?;
    git(
        dir,
        &[
            "-c",
            "user.name=banger bench",
            "-c",
            "user.email=bench@banger.invalid",
            "-c",
            "gc.auto=0",
            "commit",
            "-q",
            "-m",
            "bench",
        ],
    )?;
    Ok((files, bytes))
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .context("running git (apt-get install git)")?;
    anyhow::ensure!(
        out.status.success(),
        "git {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_repository_has_every_file_committed() {
        let dir = tempfile::tempdir().expect("test setup");
        let repo = dir.path().join("r");
        let (n, bytes) = super::make_repo(&repo, 250).expect("test setup");
        assert_eq!(n, 250);
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["ls-files", "-z"])
            .output()
            .expect("test setup");
        let listed = out
            .stdout
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .count();
        assert_eq!(listed, 250);
        let on_disk: u64 = walk(&repo);
        assert_eq!(on_disk, bytes);
    }

    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p)
            .expect("test setup")
            .flatten()
            .filter(|e| e.file_name() != ".git")
            .map(|e| {
                let t = e.file_type().expect("test setup");
                if t.is_dir() {
                    walk(&e.path())
                } else {
                    e.metadata().expect("test setup").len()
                }
            })
            .sum()
    }
}
