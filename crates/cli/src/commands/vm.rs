//! `banger vm ...`

use crate::connect;
use crate::output;
use banger_api::exec::ExecStart;
use banger_api::{Client, CreateVmEvent, CreateVmRequest};
use banger_model::{ByteSize, InitramfsMode, VmName, VmRecord};
use clap::{Args, Subcommand};
use std::io::Write;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM, boot it, then run a command in it or open an ssh session.
    Run(super::vm_run::RunArgs),
    /// List VMs.
    List(JsonArg),
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
    },
    /// Boot stopped VMs.
    Start {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Power VMs off (their VMM is ended if the guest does not stop in 30s).
    Stop {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Stop, then start VMs.
    Restart {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Send a signal to the VMM of VMs.
    Kill {
        /// Signal name or number: TERM, KILL, SIGINT, 9, ...
        #[arg(long, short = 's', default_value = "KILL", value_parser = parse_signal)]
        signal: i32,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Change vcpu, memory, disk size (grow only) or NAT of stopped VMs.
    Set {
        /// Virtual CPUs.
        #[arg(long)]
        vcpu: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
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
    Ssh {
        vm: String,
        /// Command to run instead of a login shell, after `--`.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Run a command in a running VM through its agent; exits with its status.
    ///
    /// A pseudo-terminal is used when stdin and stdout are terminals (or
    /// with --tty); otherwise stdin is forwarded unless it is a terminal,
    /// and Ctrl-C / SIGTERM are forwarded to the guest process.
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
        env: Vec<(String, String)>,
        /// The command, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Long-lived guest processes supervised by the agent.
    #[command(subcommand)]
    Session(super::vm_session::SessionCommand),
    /// Bridge stdio to the guest's ACP agent (`acp_command` in config,
    /// default `opencode acp`) through the guest agent.
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
    },
    /// List a running VM's listening TCP ports; HTTP(S) ones with their URL.
    Ports {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy files and directories to or from a running VM
    /// (`vm cp ./dir box:/root/`, `vm cp box:/var/log/x.log .`).
    Cp(super::vm_cp::CpArgs),
    /// Copy git workspaces into a running VM.
    #[command(subcommand)]
    Workspace(super::vm_workspace::WorkspaceCommand),
    /// Stop and delete VMs with their disks.
    Delete {
        /// VM names or id prefixes.
        #[arg(required = true)]
        vms: Vec<String>,
    },
}

#[derive(Args)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Sizing and identity flags shared by run and create.
#[derive(Args, Clone, Default)]
pub struct CreateFlags {
    /// VM name (a DNS label); generated when omitted.
    #[arg(long, value_parser = parse_name)]
    pub name: Option<VmName>,
    /// Image to boot (default: default_image_name from config).
    #[arg(long)]
    pub image: Option<String>,
    /// Virtual CPUs.
    #[arg(long)]
    pub vcpu: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory: Option<u64>,
    /// Root disk size, e.g. 16G.
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<ByteSize>,
    /// Masquerade the VM's traffic out of the host (needs bridge networking).
    #[arg(long)]
    pub nat: bool,
    /// Initramfs its boots use: banger (the agent as /init, ready as soon
    /// as the root is assembled), distro (the kernel's own), or auto
    /// (banger's when the kernel has one). Default: `initramfs` in config.
    #[arg(long, value_name = "auto|banger|distro")]
    pub initramfs: Option<InitramfsMode>,
    /// Ready only once the guest's init has finished booting (systemd
    /// running or degraded), not as soon as the agent answers. Default:
    /// `wait_boot` in config.
    #[arg(long)]
    pub wait_boot: bool,
}

fn parse_name(s: &str) -> Result<VmName, String> {
    VmName::parse(s).map_err(|e| e.to_string())
}

/// `KEY=VALUE` with a shell-style variable name.
pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{k:?} is not a valid environment variable name"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| format!("{n} is not a signal"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("unknown signal {s:?}"))
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse::<ByteSize>().map_err(|e| e.to_string())
}

impl CreateFlags {
    pub fn request(&self, start: bool) -> CreateVmRequest {
        CreateVmRequest {
            name: self.name.as_ref().map(ToString::to_string),
            image: self.image.clone(),
            vcpu: self.vcpu,
            memory_mib: self.memory,
            disk_size: self.disk_size.map(|d| d.to_string()),
            start,
            nat: self.nat,
            initramfs: self.initramfs,
            wait_boot: self.wait_boot.then_some(true),
            ..Default::default()
        }
    }
}

pub async fn run(cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Run(a) => super::vm_run::run(a).await,
        VmCommand::List(a) => {
            let vms = connect::client().await?.list_vms().await?;
            if a.json {
                output::json(&vms)?;
            } else {
                print_vm_table(&vms);
            }
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
            for_each(vms, "changed", move |c, r| {
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
        VmCommand::Create { create, no_start } => {
            let client = connect::client().await?;
            let mut name = None;
            let vm = create_with_progress(&client, &create.request(!no_start), &mut name).await?;
            println!("{} {}", vm.name, vm.state);
            Ok(0)
        }
        VmCommand::Start { vms } => {
            for_each(vms, "started", |c, r| async move { c.start_vm(&r).await }).await
        }
        VmCommand::Stop { vms } => {
            for_each(vms, "stopped", |c, r| async move { c.stop_vm(&r).await }).await
        }
        VmCommand::Restart { vms } => {
            for_each(
                vms,
                "restarted",
                |c, r| async move { c.restart_vm(&r).await },
            )
            .await
        }
        VmCommand::Kill { signal, vms } => {
            for_each(vms, "signalled", move |c, r| async move {
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
            let mode = super::vm_exec::ExecMode::choose(tty, no_tty);
            super::vm_exec::exec(&connect::client().await?, &vm, start, mode).await
        }
        VmCommand::Session(c) => super::vm_session::run(c).await,
        VmCommand::Acp { vm } => super::vm_session::acp(&vm).await,
        VmCommand::Logs { vm, vmm, follow } => {
            let source = if vmm {
                banger_api::LogSource::Vmm
            } else {
                banger_api::LogSource::Console
            };
            let mut out = std::io::stdout();
            connect::client()
                .await?
                .logs(&vm, source, follow, |chunk| {
                    let _ = out.write_all(chunk);
                    let _ = out.flush();
                })
                .await?;
            Ok(0)
        }
        VmCommand::Ports { vm, json } => super::vm_ports::run(&vm, json).await,
        VmCommand::Ssh { vm, command } => super::vm_ssh::run(&vm, command).await,
        VmCommand::Cp(a) => super::vm_cp::run(a).await,
        VmCommand::Workspace(c) => super::vm_workspace::run(c).await,
        VmCommand::Delete { vms } => {
            for_each(vms, "deleted", |c, r| async move { c.delete_vm(&r).await }).await
        }
    }
}

/// Runs `op` on every VM ref concurrently; prints one line per VM and
/// exits non-zero if any failed.
async fn for_each<F, Fut>(refs: Vec<String>, done: &str, op: F) -> anyhow::Result<i32>
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
    for (r, res) in results {
        match res {
            Ok(vm) => println!("{done} {}", vm.name),
            Err(e) => {
                failed += 1;
                eprintln!("banger: {r}: {e}");
            }
        }
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

fn print_vm_table(vms: &[VmRecord]) {
    let mut rows = vec![
        [
            "NAME", "ID", "STATE", "IMAGE", "VCPU", "MEMORY", "DISK", "CREATED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in vms {
        rows.push(vec![
            v.name.to_string(),
            v.id.short().to_string(),
            v.state.to_string(),
            v.image.clone(),
            v.spec.vcpu.value.to_string(),
            ByteSize::mib(v.spec.memory_mib.value).to_string(),
            ByteSize(v.spec.disk_bytes.value).to_string(),
            v.created_at.clone(),
        ]);
    }
    output::table(&rows);
}

fn print_vm(v: &VmRecord) {
    let rows = vec![
        vec!["name".into(), v.name.to_string()],
        vec!["id".into(), v.id.to_string()],
        vec!["state".into(), v.state.to_string()],
        vec!["image".into(), v.image.clone()],
        vec!["backend".into(), v.backend.to_string()],
        vec![
            "spec".into(),
            v.spec.summary().trim_start_matches("spec: ").to_string(),
        ],
        vec![
            "pid".into(),
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ],
        vec!["dir".into(), v.dir.display().to_string()],
        vec!["initramfs".into(), v.initramfs.to_string()],
        vec!["created".into(), v.created_at.clone()],
    ];
    let rows = [rows, super::vm_ports::network_rows(v)].concat();
    output::table(&rows);
    if let Some(e) = &v.last_error {
        println!("error    {e}");
    }
}

/// `banger initramfs, kernel ran /init at 1.84 s, agent ready at 2.10 s
/// (1.14x); system running`.
fn boot_line(b: &banger_api::VmBoot) -> String {
    let secs = |ms: u64| format!("{:.2} s", ms as f64 / 1000.0);
    let mut parts = vec![format!(
        "{} initramfs",
        b.initramfs.as_deref().unwrap_or("unknown")
    )];
    if let Some(k) = b.kernel_init_ms {
        parts.push(format!("kernel ran its first process at {}", secs(k)));
    }
    if let Some(r) = b.agent_ready_ms {
        let ratio = b
            .ready_over_kernel_init
            .map(|x| format!(" ({x:.2}x)"))
            .unwrap_or_default();
        parts.push(format!("agent ready at {}{ratio}", secs(r)));
    }
    format!("{}; system {}", parts.join(", "), b.system)
}

fn print_disks(disks: &[banger_api::DiskStats]) {
    for d in disks {
        println!(
            "disk     {:<8} {} virtual, {} on host{}  {}",
            d.role,
            ByteSize(d.virtual_bytes).human(),
            ByteSize(d.allocated_bytes).human(),
            if d.shared { " (shared)" } else { "" },
            d.path
        );
    }
    let own: u64 = disks
        .iter()
        .filter(|d| !d.shared)
        .map(|d| d.allocated_bytes)
        .sum();
    println!("disk use {} on host for this VM", ByteSize(own).human());
}

fn print_stats(s: &banger_api::VmStats) {
    println!(
        "{} ({}): {} vcpu, {} memory",
        s.name,
        s.state,
        s.vcpu,
        ByteSize::mib(s.memory_mib)
    );
    match &s.vmm {
        Some(p) => println!(
            "vmm      pid {}, cpu {:.1}s ({:.1}% avg over {:.0}s), rss {}",
            p.pid,
            p.cpu_seconds,
            p.cpu_percent,
            p.uptime_seconds,
            ByteSize(p.rss_bytes).human()
        ),
        None => println!("vmm      not running"),
    }
    if let Some(g) = &s.guest {
        println!(
            "guest    memory {} of {} available, load {:.2}",
            ByteSize(g.mem_available_bytes).human(),
            ByteSize(g.mem_total_bytes).human(),
            g.load1
        );
        println!(
            "guest    / {} of {} used, /root {} of {} used",
            ByteSize(g.root_used_bytes).human(),
            ByteSize(g.root_total_bytes).human(),
            ByteSize(g.work_used_bytes).human(),
            ByteSize(g.work_total_bytes).human()
        );
    }
    print_disks(&s.disks);
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
            CreateVmEvent::Planned { name, spec } => {
                *name_out = Some(name.clone());
                eprintln!("{}", spec.summary());
                spec_printed = true;
            }
            CreateVmEvent::Progress(p) if chatty || p.phase == "image" => {
                eprintln!(
                    "[{:>5.1}s] {}: {}",
                    p.elapsed_ms as f64 / 1000.0,
                    p.phase,
                    p.message
                );
            }
            _ => {}
        })
        .await;
    let _ = spec_printed;
    Ok(res?)
}
