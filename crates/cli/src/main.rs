//! banger: one-command development sandboxes on microVMs.

mod commands;
mod connect;
mod output;

use banger_version::BuildInfo;
use clap::{CommandFactory, Parser, Subcommand};
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
    Bench(commands::bench::BenchArgs),
    /// Terminal dashboard: VMs, stats, ports, logs and lifecycle actions.
    Tui,
    /// Print version, commit and build time.
    Version,
    /// Print the shell completion script (bash, zsh, fish, powershell).
    Completion(commands::completion::CompletionArgs),
}

fn main() -> ExitCode {
    // A <TAB> in a shell with the completion script loaded: answer and exit.
    clap_complete::CompleteEnv::with_factory(|| {
        commands::completion::with_completers(Cli::command())
    })
    .var(commands::completion::COMPLETE_VAR)
    .complete();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: print as clap renders them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors in one line; `--help` has the details.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("banger: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
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
            Command::Bench(a) => commands::bench::run(a).await,
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
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("banger: {}", output::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
