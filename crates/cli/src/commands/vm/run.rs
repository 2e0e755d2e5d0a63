//! `banger vm run`: create a VM, boot it, then run a command in it (exiting
//! with its status) or open an interactive ssh session. With `--rm` the VM
//! is deleted when the command or session ends, whatever its status, also
//! on SIGINT, SIGTERM or SIGHUP; the create request is made ephemeral too,
//! so the daemon deletes the VM if this process dies without doing it.
//!
//! Progress: the `spec:` line first, then one line per phase on stderr
//! (image, create, boot, ready, run or session, delete) when stderr is a
//! terminal and `--json` is not given. With `--json` stdout carries only
//! the final record ([`RunRecord`]); the command's own stdout (or the
//! session's) is written to stderr instead.

use super::exec::{ExecMode, Interrupts, exec_with};
use super::flags::CreateFlags;
use crate::connect;
use crate::output;
use anyhow::Context;
use banger_api::exec::ExecStart;
use banger_api::{Client, CreateVmEvent, CreateVmRequest, Step};
use banger_model::{VmRecord, VmState};
use banger_transfer::workspace::Workspace;
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateFlags,
    /// Delete the VM when the command or session ends (any exit status, also
    /// on Ctrl-C or SIGTERM). A VM that never becomes ready is kept for
    /// `banger vm logs`.
    #[arg(long)]
    pub rm: bool,
    /// Print one JSON record on stdout at the end (name, exit status,
    /// timings); the command's own output then goes to stderr.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub workspace: super::workspace::RunWorkspaceArgs,
    /// Command to run in the guest, after `--`; without one, an interactive
    /// ssh session (once the guest's sshd answers).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The `--json` record, printed as one line on stdout.
#[derive(Debug, Default, Serialize)]
pub struct RunRecord {
    /// The VM's name, once the daemon chose it.
    pub name: Option<String>,
    pub id: Option<String>,
    /// `command` or `session`.
    pub mode: &'static str,
    /// banger's own exit status: the command's or session's, 128 + signal
    /// when interrupted, 125 when banger failed.
    pub exit_status: i32,
    /// Whether the VM was deleted (`--rm`).
    pub deleted: bool,
    /// How the VM started: `cold` or `warm` (restored from a template),
    /// with the template or why it was cold.
    pub start: Option<banger_model::StartInfo>,
    pub error: Option<String>,
    /// Paths skipped by `[[file_sync]]` or credential sync.
    pub warnings: Vec<String>,
    /// Milliseconds per phase (`image`, `create`, `boot`, `command` or
    /// `session`, `delete`), plus `ready` (from start to a ready guest)
    /// and `total`.
    pub timings_ms: BTreeMap<String, u64>,
}

/// Phase lines, timings and warnings of one run.
struct Phases {
    started: Instant,
    quiet: bool,
    /// (phase, when it began), in order.
    marks: Vec<(String, Instant)>,
    ready_at: Option<Instant>,
    warnings: Vec<String>,
    name: Option<String>,
}

impl Phases {
    fn new(quiet: bool) -> Self {
        Self {
            started: Instant::now(),
            quiet,
            marks: Vec::new(),
            ready_at: None,
            warnings: Vec::new(),
            name: None,
        }
    }

    fn current(&self) -> Option<&str> {
        self.marks.last().map(|(p, _)| p.as_str())
    }

    /// Enters `phase` (a no-op if already in it), printing its line.
    fn enter(&mut self, phase: &str, message: &str) {
        if self.current() != Some(phase) {
            self.marks.push((phase.to_string(), Instant::now()));
            self.line(phase, message);
        }
    }

    fn line(&self, phase: &str, message: &str) {
        if !self.quiet {
            eprintln!(
                "[{:>5.1}s] {phase}: {message}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn on_event(&mut self, ev: &CreateVmEvent) {
        match ev {
            CreateVmEvent::Planned(banger_api::PlannedVm { name, spec }) => {
                self.name = Some(name.clone());
                // Always printed, and first: says what the VM will get.
                eprintln!("{}", spec.summary());
            }
            // Always printed, right after the spec: warm or cold, and why.
            CreateVmEvent::Progress(p) if p.phase == Step::Start => {
                eprintln!("start: {}", p.message);
            }
            // Always printed, and kept for `--json`.
            CreateVmEvent::Warning(w) => {
                eprintln!("{}", warning_line(w));
                self.warnings.push(w.message.clone());
            }
            CreateVmEvent::Progress(p) => match p.phase.group() {
                Some(group) => self.enter(group.as_str(), &p.message),
                // The agent's and sshd's "ready" notes; ready is shown once
                // the create is done.
                None if matches!(p.phase, Step::Ready | Step::Note) => {}
                // Anything before the VM's own steps is getting its image,
                // which may take long: each of its steps gets a line.
                None if matches!(self.current(), None | Some("image")) => {
                    if self.current().is_none() {
                        self.marks.push(("image".into(), Instant::now()));
                    }
                    self.line("image", &p.message);
                }
                None => {}
            },
            _ => {}
        }
    }

    fn ready(&mut self, vm: &VmRecord) {
        self.ready_at = Some(Instant::now());
        let addr = match (vm.ip, vm.ssh_port) {
            (_, Some(port)) => format!(" (ssh on 127.0.0.1:{port})"),
            (Some(ip), None) => format!(" ({ip})"),
            _ => String::new(),
        };
        self.line("ready", &format!("{} is running{addr}", vm.name));
    }

    fn timings(&self) -> BTreeMap<String, u64> {
        let end = Instant::now();
        let mut t = BTreeMap::new();
        for (i, (phase, at)) in self.marks.iter().enumerate() {
            let until = self.marks.get(i + 1).map_or(end, |(_, next)| *next);
            // Boot ends when the guest is ready, not when the next phase starts.
            let until = match (phase.as_str(), self.ready_at) {
                ("boot", Some(r)) if r < until => r,
                _ => until,
            };
            *t.entry(phase.clone()).or_insert(0) += until.duration_since(*at).as_millis() as u64;
        }
        if let Some(r) = self.ready_at {
            t.insert(
                "ready".into(),
                r.duration_since(self.started).as_millis() as u64,
            );
        }
        t.insert(
            "total".into(),
            end.duration_since(self.started).as_millis() as u64,
        );
        t
    }
}

/// How `vm run` shows a warning of its create.
fn warning_line(w: &banger_api::Warning) -> String {
    format!("banger: warning: {}", w.message)
}

pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    // The workspace is chosen before anything is created: a bad path or
    // ref fails early, and --dry-run stops here.
    let ws = super::workspace::for_run(&a.workspace).await?;
    if a.workspace.dry_run {
        return Ok(0);
    }
    let mut sig = Interrupts::new()?;
    let quiet = a.json || !output::chatty();
    let mut phases = Phases::new(quiet);
    let mut record = RunRecord {
        mode: if a.command.is_empty() {
            "session"
        } else {
            "command"
        },
        ..Default::default()
    };
    let result = run_inner(&a, ws.as_ref(), &mut sig, &mut phases, &mut record).await;
    record.name = phases.name.clone().or(record.name);
    record.warnings = std::mem::take(&mut phases.warnings);
    record.timings_ms = phases.timings();
    match &result {
        Ok(code) => record.exit_status = *code,
        Err(e) => {
            record.exit_status = output::EXIT_BANGER_FAILED;
            record.error = Some(output::error_chain(e));
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&record)?);
    }
    result
}

async fn run_inner(
    a: &RunArgs,
    ws: Option<&Workspace>,
    sig: &mut Interrupts,
    phases: &mut Phases,
    record: &mut RunRecord,
) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    let session = a.command.is_empty();
    let req = CreateVmRequest {
        ephemeral: a.rm,
        wait_ssh: session,
        ..a.create.request(true)
    };
    let created = tokio::select! {
        r = client.create_vm_held(&req, |ev| phases.on_event(ev)) => Ok(r),
        s = sig.recv() => Err(s),
    };
    let name = phases.name.clone();
    let (vm, hold) = match created {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            // A create the daemon reports as failed has rolled itself back,
            // except when the guest never became ready: that VM is kept for
            // inspection, even with --rm. When the daemon itself went away
            // mid-create, nobody rolled back: with --rm, delete what exists.
            let daemon_answered = e.code().is_some();
            if let Some(n) = name.as_deref() {
                if a.rm && !daemon_answered {
                    record.deleted = cleanup(&client, n, phases).await;
                } else if daemon_answered
                    && let Ok(vm) = client.get_vm(n).await
                    && vm.state == VmState::Error
                {
                    eprintln!(
                        "banger: {n} is kept{} so you can see why: `banger vm logs {n}`, then `banger vm delete {n}`",
                        if a.rm { " despite --rm" } else { "" }
                    );
                }
            }
            return Err(e.into());
        }
        Err(s) => {
            // Dropping the create closed its connection: the daemon rolls
            // the VM back. With --rm, wait until it is gone.
            eprintln!("banger: interrupted while creating the VM; rolling it back");
            if let Some(n) = name.as_deref().filter(|_| a.rm) {
                record.deleted = cleanup(&client, n, phases).await;
            }
            return Ok(128 + s);
        }
    };
    record.id = Some(vm.id.to_string());
    record.start = Some(vm.start.clone());
    phases.ready(&vm);
    let code = match ws {
        Some(ws) => copy_workspace(&client, &vm, ws, phases, sig).await,
        None => Ok(None),
    };
    let code = match code {
        Err(e) => Err(e),
        Ok(cwd) if session => {
            phases.enter(
                "session",
                &format!(
                    "ssh root@{}{}",
                    vm.name,
                    if a.rm {
                        " (the VM is deleted when the session ends)"
                    } else {
                        ""
                    }
                ),
            );
            run_session(&client, &vm, cwd.as_deref(), a.json, sig).await
        }
        Ok(cwd) => {
            phases.enter("command", &a.command.join(" "));
            let start = ExecStart {
                argv: a.command.clone(),
                cwd,
                ..Default::default()
            };
            // Stdin is forwarded when it is not a terminal (a command
            // run never gets a tty: its output may be piped or --json).
            let mode = ExecMode {
                tty: false,
                stdin: !std::io::stdin().is_terminal(),
            };
            exec_with(&client, vm.name.as_str(), start, mode, a.json, sig).await
        }
    };
    if a.rm {
        record.deleted = cleanup(&client, vm.name.as_str(), phases).await;
    } else if session && let Ok(v) = client.get_vm(vm.id.as_str()).await {
        // The guest may have been powered off from inside the session.
        if v.state == VmState::Running {
            eprintln!(
                "banger: {} is still running; `banger vm stop {}` or `banger vm delete {}` when you are done",
                v.name, v.name, v.name
            );
        }
    }
    // Only now may the daemon's own clean-up fire (it finds nothing left).
    drop(hold);
    code
}

/// Copies the workspace to /root/<repo name> and returns that directory.
/// A signal during the copy abandons it (the agent discards a partial
/// copy) and is reported as 128 + the signal.
async fn copy_workspace(
    client: &Client,
    vm: &VmRecord,
    ws: &Workspace,
    phases: &mut Phases,
    sig: &mut Interrupts,
) -> anyhow::Result<Option<String>> {
    let guest = super::workspace::default_guest_path(ws);
    phases.enter(
        "copy",
        &format!(
            "{} files from {} to {guest}",
            ws.files.len(),
            ws.root.display()
        ),
    );
    tokio::select! {
        r = super::workspace::prepare(client, vm.name.as_str(), ws, &guest) => r.map(|()| Some(guest)),
        s = sig.recv() => Err(anyhow::anyhow!("interrupted (signal {s}) while copying the workspace")),
    }
}

/// Deletes VM `name`, retrying through a daemon restart; says why on
/// failure. Returns whether the VM is gone.
async fn cleanup(client: &Client, name: &str, phases: &mut Phases) -> bool {
    phases.enter("delete", &format!("deleting {name}"));
    let mut last = None;
    // The daemon may have died meanwhile: reconnect (restarting it) and try
    // again for a while, as a daemon killed a moment ago may still be exiting.
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let result = match client.delete_vm(name).await {
            Err(
                banger_api::ClientError::Unreachable { .. } | banger_api::ClientError::Protocol(_),
            ) => match connect::client().await {
                Ok(c) => c.delete_vm(name).await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            },
            other => other.map_err(anyhow::Error::from),
        };
        match result {
            Ok(_) => return true,
            Err(e)
                if e.downcast_ref::<banger_api::ClientError>()
                    .and_then(|c| c.code())
                    == Some("not_found") =>
            {
                return true;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        eprintln!(
            "banger: could not delete VM {name}: {}; delete it with `banger vm delete {name}`",
            output::error_chain(&e)
        );
    }
    false
}

/// Runs the system `ssh` into the VM (its stdout to stderr with `--json`)
/// and returns its exit status. A signal to banger ends ssh (TERM, then
/// KILL after 5s) and returns 128 + the signal; the VM going down ends
/// it too, said on stderr, with ssh's status for a lost connection (255).
async fn run_session(
    client: &Client,
    vm: &VmRecord,
    dir: Option<&str>,
    json: bool,
    sig: &mut Interrupts,
) -> anyhow::Result<i32> {
    let (key, known_hosts) = super::ssh::key_and_known_hosts()?;
    let command = dir
        .map(super::workspace::login_shell_in)
        .unwrap_or_default();
    let mut args = super::ssh::ssh_args(vm, &key, &known_hosts, &command)?;
    if dir.is_some() && std::io::stdin().is_terminal() {
        args.insert(0, "-t".into());
    }
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(&args).kill_on_drop(true);
    if json {
        use std::os::fd::AsFd;
        let fd = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?;
        cmd.stdout(std::process::Stdio::from(fd));
    }
    let mut child = cmd
        .spawn()
        .context("running ssh (apt-get install openssh-client)")?;
    tokio::select! {
        status = child.wait() => {
            let status = status.context("waiting for ssh")?;
            Ok(status.code().unwrap_or(super::ssh::SSH_LOST))
        }
        down = super::ssh::went_down(client, vm) => {
            super::ssh::end_ssh(&mut child).await;
            super::ssh::report_down(client, vm, down).await;
            Ok(super::ssh::SSH_LOST)
        }
        s = sig.recv() => {
            super::ssh::end_ssh(&mut child).await;
            Ok(128 + s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::Progress;

    fn progress(phase: &str, message: &str) -> CreateVmEvent {
        CreateVmEvent::Progress(Progress {
            phase: phase.into(),
            message: message.into(),
            elapsed_ms: 0,
        })
    }

    fn warning(message: &str) -> CreateVmEvent {
        CreateVmEvent::Warning(banger_api::Warning {
            message: message.into(),
            elapsed_ms: 0,
        })
    }

    #[test]
    fn a_warning_is_shown_as_a_banger_warning() {
        let CreateVmEvent::Warning(w) = warning("file_sync[0]: ~/x does not exist; skipped") else {
            unreachable!()
        };
        assert_eq!(
            warning_line(&w),
            "banger: warning: file_sync[0]: ~/x does not exist; skipped"
        );
    }

    #[test]
    fn daemon_steps_fold_into_phases_with_timings() {
        let mut p = Phases::new(true);
        for (ph, m) in [
            ("image", "pulling"),
            ("download", "fetching rootfs"),
            ("dir", "preparing VM directory"),
            ("record", "recording VM"),
            ("files", "copying"),
            ("network", "net"),
            ("boot", "starting"),
            ("agent", "waiting"),
            ("ready", "agent up"),
            ("sshd", "waiting for sshd"),
        ] {
            p.on_event(&progress(ph, m));
            if ph == "record" {
                p.on_event(&warning("file_sync[0]: ~/x does not exist; skipped"));
            }
        }
        let names: Vec<&str> = p.marks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["image", "create", "boot"]);
        assert_eq!(p.warnings, ["file_sync[0]: ~/x does not exist; skipped"]);
        p.enter("command", "true");
        p.enter("delete", "deleting");
        let t = p.timings();
        let keys: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["boot", "command", "create", "delete", "image", "total"]
        );
    }

    #[test]
    fn record_serialises_with_its_keys() {
        let r = RunRecord {
            name: Some("calm-otter".into()),
            mode: "command",
            exit_status: 42,
            deleted: true,
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(v["name"], "calm-otter");
        assert_eq!(v["exit_status"], 42);
        assert_eq!(v["deleted"], true);
        assert!(v["timings_ms"].is_object());
    }
}
