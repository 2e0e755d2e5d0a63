//! `banger vm ...`: the command tree and the small commands; the larger
//! ones each have a module here.

pub mod cp;
pub mod exec;
pub mod flags;
pub mod ports;
pub mod run;
pub mod session;
pub mod show;
pub mod ssh;
pub mod workspace;

use crate::connect;
use crate::output;
use crate::output::ListArgs;
use banger_api::exec::ExecStart;
use banger_api::{Client, CreateVmEvent, CreateVmRequest};
use banger_model::{ByteSize, VmRecord};
use clap::Subcommand;
pub use flags::JsonArg;
use flags::{CreateFlags, parse_env, parse_memory_mib, parse_signal, parse_since, parse_size};
use show::{boot_line, print_disks, print_stats, print_vm, print_vm_table};
use std::io::{IsTerminal, Write};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM, boot it, then run a command in it or open an ssh session.
    #[command(after_help = output::EXIT_STATUS_HELP)]
    Run(run::RunArgs),
    /// List VMs.
    List(ListArgs),
    /// Show one VM.
    Show {
        /// VM name or id prefix.
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a VM (and boot it unless --no-start).
    Create {
        #[command(flatten)]
        create: CreateFlags,
        /// Only create the disks and record; boot later with `vm start`.
        #[arg(long)]
        no_start: bool,
        /// Print the VM's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot stopped VMs.
    Start {
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Power VMs off (their VMM is ended if the guest does not stop in 30s).
    Stop {
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Stop, then start VMs.
    Restart {
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Send a signal to the VMM of VMs.
    Kill {
        /// Signal name or number: TERM, KILL, SIGINT, 9, ...
        #[arg(long, short = 's', default_value = "KILL", value_parser = parse_signal)]
        signal: i32,
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Change vcpu, memory, disk size (grow only) or NAT of stopped VMs.
    Set {
        /// Virtual CPUs.
        #[arg(long, visible_alias = "cpus")]
        vcpu: Option<u32>,
        /// Memory: 2G, 512M, or a plain number of MiB.
        #[arg(long, value_parser = parse_memory_mib, value_name = "SIZE")]
        memory: Option<u64>,
        /// New size of the /root work disk and system overlay, e.g. 32G; disks only grow.
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<ByteSize>,
        /// Masquerade the VM's traffic out of the host.
        #[arg(long, overrides_with = "no_nat")]
        nat: bool,
        /// Stop masquerading the VM's traffic.
        #[arg(long)]
        no_nat: bool,
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
    /// CPU, memory and disk use of VMs (host side, and the guest's own view when it runs).
    Stats {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Open an ssh session (or run CMD) in a running VM with banger's key;
    /// the host key is checked against banger's known_hosts.
    #[command(after_help = output::EXIT_STATUS_HELP)]
    Ssh {
        vm: String,
        /// Command to run instead of a login shell: `vm ssh box uname -a`,
        /// or after `--` when it starts with a dash.
        #[arg(trailing_var_arg = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Run a command in a running VM through its agent; exits with its status.
    ///
    /// A pseudo-terminal is used when stdin and stdout are terminals (or
    /// with --tty); otherwise stdin is forwarded unless it is a terminal,
    /// and Ctrl-C / SIGTERM are forwarded to the guest process.
    #[command(after_help = output::EXIT_STATUS_HELP)]
    Exec {
        vm: String,
        /// Run the command on a pseudo-terminal even when banger's stdio is not one.
        #[arg(long, short = 't', conflicts_with = "no_tty")]
        tty: bool,
        /// Never allocate a pseudo-terminal.
        #[arg(long, short = 'T')]
        no_tty: bool,
        /// Working directory in the guest (default: /root).
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment, KEY=VALUE; repeatable.
        #[arg(long = "env", short = 'e', value_parser = parse_env)]
        env: Vec<banger_api::exec::EnvVar>,
        /// The command: `vm exec box make test`, or after `--` (always
        /// unambiguous, and needed when CMD starts with a dash).
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Long-lived guest processes supervised by the agent.
    #[command(subcommand)]
    Session(session::SessionCommand),
    /// Bridge stdio to the guest's ACP agent (`acp_command` in config,
    /// default `opencode acp`) through the guest agent.
    #[command(after_help = output::EXIT_STATUS_HELP)]
    Acp { vm: String },
    /// Print a VM's serial console (or VMM) log.
    Logs {
        vm: String,
        /// The VMM's own log instead of the guest console.
        #[arg(long)]
        vmm: bool,
        /// Keep printing what is appended.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines (then what is appended, with --follow).
        #[arg(long, short = 'n', value_name = "N",
              value_parser = clap::value_parser!(u64).range(..=banger_api::rules::MAX_LOG_TAIL))]
        tail: Option<u64>,
        /// Only what was written since TIME: a duration ago (10m, 1h30m,
        /// 45s), an RFC 3339 time (2026-05-01T12:00:00Z) or Unix seconds.
        #[arg(long, value_name = "TIME", value_parser = parse_since)]
        since: Option<u64>,
        /// Print the log's bytes as they are. Without it, on a terminal,
        /// escape sequences other than colours and control characters
        /// other than line ends and tabs are shown escaped: the guest
        /// writes the log.
        #[arg(long)]
        raw: bool,
    },
    /// List a running VM's listening TCP ports; HTTP(S) ones with their URL.
    Ports {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy files and directories to or from a running VM
    /// (`vm cp ./dir box:/root/`, `vm cp box:/var/log/x.log .`).
    Cp(cp::CpArgs),
    /// Copy git workspaces into a running VM.
    #[command(subcommand)]
    Workspace(workspace::WorkspaceCommand),
    /// Stop and delete VMs with their disks.
    Delete {
        /// VM names or id prefixes.
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        out: JsonArg,
    },
}

impl VmCommand {
    /// Whether this command exits with a guest command's status, so that
    /// banger's own failures need a status of their own
    /// ([`output::EXIT_BANGER_FAILED`]).
    pub fn passes_exit_status(&self) -> bool {
        matches!(
            self,
            VmCommand::Run(_)
                | VmCommand::Exec { .. }
                | VmCommand::Ssh { .. }
                | VmCommand::Acp { .. }
        )
    }
}

pub async fn run(cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Run(a) => run::run(a).await,
        VmCommand::List(a) => {
            let vms = connect::client().await?.list_vms().await?;
            a.print(&vms, |v| v.name.to_string(), print_vm_table)?;
            Ok(0)
        }
        VmCommand::Show { vm, json } => {
            let client = connect::client().await?;
            let vm = client.get_vm(&vm).await?;
            // How it booted, while it runs (its agent answers).
            let boot = match vm.state {
                banger_model::VmState::Running => client.vm_boot(vm.id.as_str()).await.ok(),
                _ => None,
            };
            if json {
                let mut v = serde_json::to_value(&vm)?;
                if let (Some(b), Some(obj)) = (&boot, v.as_object_mut()) {
                    obj.insert("boot".into(), serde_json::to_value(b)?);
                }
                output::json(&v)?;
            } else {
                print_vm(&vm);
                if let Some(b) = &boot {
                    println!("boot     {}", boot_line(b));
                }
                let stats = client.vm_stats(vm.id.as_str(), false).await?;
                print_disks(&stats.disks);
            }
            Ok(0)
        }
        VmCommand::Set {
            vcpu,
            memory,
            disk_size,
            nat,
            no_nat,
            vms,
            out,
        } => {
            let req = banger_api::SetVmRequest {
                vcpu,
                memory_mib: memory,
                disk_size: disk_size.map(|d| d.to_string()),
                nat: match (nat, no_nat) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            if req.is_empty() {
                anyhow::bail!(
                    "nothing to change: pass --vcpu, --memory, --disk-size, --nat or --no-nat"
                );
            }
            for_each(vms, "changed", out, move |c, r| {
                let req = req.clone();
                async move { c.set_vm(&r, &req).await }
            })
            .await
        }
        VmCommand::Stats { vms, json } => {
            let client = connect::client().await?;
            let results = futures_join_all(vms.into_iter().map(|r| {
                let c = client.clone();
                async move {
                    let res = c.vm_stats(&r, true).await;
                    (r, res)
                }
            }))
            .await;
            let mut failed = 0;
            let mut all = Vec::new();
            for (r, res) in results {
                match res {
                    Ok(s) => all.push(s),
                    Err(e) => {
                        failed += 1;
                        eprintln!("banger: {r}: {e}");
                    }
                }
            }
            if json {
                output::json(&all)?;
            } else {
                for s in &all {
                    print_stats(s);
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        VmCommand::Create {
            create,
            no_start,
            json,
        } => {
            let client = connect::client().await?;
            let mut name = None;
            let vm = create_with_progress(&client, &create.request(!no_start), &mut name).await?;
            if json {
                output::json(&vm)?;
            } else {
                println!("{} {}", vm.name, vm.state);
            }
            Ok(0)
        }
        VmCommand::Start { vms, out } => {
            for_each(
                vms,
                "started",
                out,
                |c, r| async move { c.start_vm(&r).await },
            )
            .await
        }
        VmCommand::Stop { vms, out } => {
            for_each(
                vms,
                "stopped",
                out,
                |c, r| async move { c.stop_vm(&r).await },
            )
            .await
        }
        VmCommand::Restart { vms, out } => {
            for_each(vms, "restarted", out, |c, r| async move {
                c.restart_vm(&r).await
            })
            .await
        }
        VmCommand::Kill { signal, vms, out } => {
            for_each(vms, "signalled", out, move |c, r| async move {
                c.kill_vm(&r, signal).await
            })
            .await
        }
        VmCommand::Exec {
            vm,
            tty,
            no_tty,
            cwd,
            env,
            command,
        } => {
            let start = ExecStart {
                argv: command,
                env,
                cwd,
                ..Default::default()
            };
            let mode = exec::ExecMode::choose(tty, no_tty);
            exec::exec(&connect::client().await?, &vm, start, mode).await
        }
        VmCommand::Session(c) => session::run(c).await,
        VmCommand::Acp { vm } => session::acp(&vm).await,
        VmCommand::Logs {
            vm,
            vmm,
            follow,
            tail,
            since,
            raw,
        } => {
            let query = banger_api::LogsQuery {
                source: if vmm {
                    banger_api::LogSource::Vmm
                } else {
                    banger_api::LogSource::Console
                },
                follow,
                tail,
                since_ms: since,
            };
            let mut out = std::io::stdout();
            let mut filter = (!raw && out.is_terminal()).then(output::TerminalFilter::default);
            connect::client()
                .await?
                .logs(&vm, &query, |chunk| {
                    let _ = match filter.as_mut() {
                        Some(f) => out.write_all(&f.push(chunk)),
                        None => out.write_all(chunk),
                    };
                    let _ = out.flush();
                })
                .await?;
            if let Some(f) = filter.as_mut() {
                let _ = out.write_all(&f.finish());
            }
            Ok(0)
        }
        VmCommand::Ports { vm, json } => ports::run(&vm, json).await,
        VmCommand::Ssh { vm, command } => ssh::run(&vm, command).await,
        VmCommand::Cp(a) => cp::run(a).await,
        VmCommand::Workspace(c) => workspace::run(c).await,
        VmCommand::Delete { vms, out } => {
            for_each(
                vms,
                "deleted",
                out,
                |c, r| async move { c.delete_vm(&r).await },
            )
            .await
        }
    }
}

/// Runs `op` on every VM ref concurrently; prints one line per VM (with
/// `--json`, an array of the records of the VMs it succeeded on) and exits
/// non-zero if any failed.
async fn for_each<F, Fut>(refs: Vec<String>, done: &str, out: JsonArg, op: F) -> anyhow::Result<i32>
where
    F: Fn(Client, String) -> Fut,
    Fut: std::future::Future<Output = Result<VmRecord, banger_api::ClientError>> + Send + 'static,
{
    let client = connect::client().await?;
    let results = futures_join_all(refs.iter().map(|r| {
        let fut = op(client.clone(), r.clone());
        let r = r.clone();
        async move { (r, fut.await) }
    }))
    .await;
    let mut failed = 0;
    let mut records = Vec::new();
    for (r, res) in results {
        match res {
            Ok(vm) if out.json => records.push(vm),
            Ok(vm) => println!("{done} {}", vm.name),
            Err(e) => {
                failed += 1;
                eprintln!("banger: {r}: {e}");
            }
        }
    }
    if out.json {
        output::json(&records)?;
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// Runs futures concurrently on the current-thread runtime, keeping order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

/// Creates a VM, streaming progress to stderr. Returns the VM, or the error
/// plus the VM's name if it got as far as being named.
pub async fn create_with_progress(
    client: &Client,
    req: &CreateVmRequest,
    name_out: &mut Option<String>,
) -> anyhow::Result<VmRecord> {
    let chatty = output::chatty();
    let mut spec_printed = false;
    let res = client
        .create_vm(req, |ev| match ev {
            CreateVmEvent::Planned(banger_api::PlannedVm { name, spec }) => {
                *name_out = Some(name.clone());
                eprintln!("{}", spec.summary());
                spec_printed = true;
            }
            CreateVmEvent::Progress(p) if chatty || p.phase == banger_api::Step::Image => {
                eprintln!("{}", output::progress_event(p));
            }
            CreateVmEvent::Warning(w) if chatty => eprintln!("{}", output::warning_event(w)),
            _ => {}
        })
        .await;
    let _ = spec_printed;
    Ok(res?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Vm {
        #[command(subcommand)]
        cmd: VmCommand,
    }

    fn vm(args: &[&str]) -> Result<VmCommand, clap::Error> {
        let mut argv = vec!["vm"];
        argv.extend_from_slice(args);
        Vm::try_parse_from(argv).map(|v| v.cmd)
    }

    #[test]
    fn exec_takes_its_command_with_or_without_dashes() {
        let argv = |args: &[&str]| match vm(args).expect("parse") {
            VmCommand::Exec { command, cwd, .. } => (command, cwd),
            _ => panic!("not exec"),
        };
        let ls = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(argv(&["exec", "box", "ls", "-la"]).0, ls(&["ls", "-la"]));
        assert_eq!(
            argv(&["exec", "box", "--", "ls", "-la"]).0,
            ls(&["ls", "-la"])
        );
        // Flags before CMD are banger's, after it the command's.
        let (cmd, cwd) = argv(&["exec", "box", "--cwd", "/tmp", "grep", "--cwd", "x"]);
        assert_eq!(cmd, ls(&["grep", "--cwd", "x"]));
        assert_eq!(cwd.as_deref(), Some("/tmp"));
        assert_eq!(argv(&["exec", "box", "--", "--weird"]).0, ls(&["--weird"]));
        assert!(vm(&["exec", "box"]).is_err());
        match vm(&["ssh", "box", "uname", "-a"]).expect("parse") {
            VmCommand::Ssh { command, .. } => assert_eq!(command, ls(&["uname", "-a"])),
            _ => panic!("not ssh"),
        }
    }

    #[test]
    fn logs_since_takes_durations_times_and_unix_seconds() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        assert_eq!(flags::since_ms("10m", now), Ok(1_800_000_000_000 - 600_000));
        assert_eq!(
            flags::since_ms("1h30m", now),
            Ok(1_800_000_000_000 - 5_400_000)
        );
        assert_eq!(flags::since_ms("1700000000", now), Ok(1_700_000_000_000));
        assert_eq!(flags::since_ms("1700000000.5", now), Ok(1_700_000_000_500));
        assert_eq!(
            flags::since_ms("2026-05-01T12:00:00Z", now),
            Ok(1_777_636_800_000)
        );
        assert!(flags::since_ms("yesterday", now).is_err());
        match vm(&["logs", "box", "--tail", "5", "--since", "1m"]).expect("parse") {
            VmCommand::Logs { tail, since, .. } => {
                assert_eq!(tail, Some(5));
                assert!(since.is_some());
            }
            _ => panic!("not logs"),
        }
    }
}
