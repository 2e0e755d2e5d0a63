//! banger: one-command development sandboxes on microVMs.

mod commands;
mod connect;
mod output;

use banger_version::BuildInfo;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "banger",
    about = "One-command development sandboxes on microVMs.",
    version = version_line(),
    disable_version_flag = false,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// banger's clap command: [`Cli`], where every command group run without
/// a subcommand (`banger`, `banger vm`, ...) prints its help.
fn command() -> clap::Command {
    help_on_bare_groups(Cli::command())
}

fn help_on_bare_groups(cmd: clap::Command) -> clap::Command {
    let has_subcommands = cmd.get_subcommands().next().is_some();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.arg_required_else_help(has_subcommands);
    for name in names {
        cmd = cmd.mut_subcommand(name, help_on_bare_groups);
    }
    cmd
}

fn version_line() -> &'static str {
    // clap prints "banger <version>"; give it everything after the name.
    let line = BuildInfo::current().line("banger");
    let rest = line.strip_prefix("banger ").unwrap_or(&line).to_string();
    Box::leak(rest.into_boxed_str())
}

#[derive(Subcommand)]
enum Command {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(commands::vm::VmCommand),
    /// Pull, build, register, list, delete and bundle images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Pull, list, delete and bundle kernels.
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// Inspect or stop the daemon.
    #[command(subcommand)]
    Daemon(commands::daemon::DaemonCommand),
    /// Install, inspect or remove banger's systemd services.
    #[command(subcommand)]
    System(commands::system::SystemCommand),
    /// Check that this host can run banger VMs.
    Doctor(commands::doctor::DoctorArgs),
    /// Print (or --install / --uninstall) the ssh_config Include for `ssh <vm>.vm`.
    SshConfig(commands::ssh_config::SshConfigArgs),
    /// The daemon's HTTP API: print its OpenAPI document.
    #[command(subcommand)]
    Api(commands::api::ApiCommand),
    /// Measure banger's orchestration overhead (JSON).
    Bench(banger_bench::BenchArgs),
    /// Terminal dashboard: VMs, stats, ports, logs and lifecycle actions.
    Tui,
    /// Print version, commit and build time.
    Version,
    /// Print the shell completion script (bash, zsh, fish, powershell).
    Completion(commands::completion::CompletionArgs),
}

/// `banger vm list | head -1`: once the reader has gone, printing more is
/// pointless. `println!` panics on a closed stdout; end quietly instead,
/// with the status a shell gives a process that SIGPIPE ended (128+13), as
/// coreutils do. Other panics are reported as before. (Restoring SIGPIPE's
/// default action instead would also end the CLI, without a word, when the
/// daemon closes its socket under a write.)
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        let epipe = format!("(os error {})", libc::EPIPE);
        if message.starts_with("failed printing to stdout") && message.contains(&epipe) {
            std::process::exit(128 + libc::SIGPIPE);
        }
        report(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    // A <TAB> in a shell with the completion script loaded: answer and exit.
    clap_complete::CompleteEnv::with_factory(|| commands::completion::with_completers(command()))
        .var(commands::completion::COMPLETE_VAR)
        .complete();
    let cli = match command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => {
            // --help, --version, a bare command group's help, usage errors:
            // whole, as clap renders them (usage line and tips included),
            // with clap's exit status (0 for help and version, 2 otherwise).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("banger: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let passes_exit_status = matches!(&cli.command, Command::Vm(c) if c.passes_exit_status());
    let result = rt.block_on(async {
        match cli.command {
            Command::Vm(c) => commands::vm::run(c).await,
            Command::Image(c) => commands::image::run(c).await,
            Command::Kernel(c) => commands::kernel::run(c).await,
            Command::Daemon(c) => commands::daemon::run(c).await,
            Command::System(c) => commands::system::run(c).await,
            Command::Doctor(a) => commands::doctor::run(a).await,
            Command::SshConfig(a) => commands::ssh_config::run(a).await,
            Command::Api(c) => commands::api::run(c).await,
            Command::Bench(a) => banger_bench::run(a).await,
            Command::Tui => commands::tui::run().await,
            Command::Completion(a) => commands::completion::run(a),
            Command::Version => {
                let b = BuildInfo::current();
                println!(
                    "banger {}\ncommit: {}\nbuilt: {}",
                    b.version, b.commit, b.built_at
                );
                Ok(0)
            }
        }
    });
    if let Err(e) = &result {
        eprintln!("banger: {}", output::error_chain(e));
    }
    ExitCode::from(output::exit_code(&result, passes_exit_status))
}
