//! bangerd: the banger daemon. Normally started by `banger` on demand.

use anyhow::Context;
use banger_config::{Config, Paths};
use banger_version::BuildInfo;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bangerd",
    about = "The banger daemon: owns VMs, images and the API socket."
)]
struct Args {
    /// Print the version and exit.
    #[arg(long, short = 'V')]
    version: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand)]
enum Sub {
    /// Run the privileged root helper of a system install
    /// (bangerd-root.service); serves only the install owner.
    RootHelper,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.version {
        println!("{}", BuildInfo::current().line("bangerd"));
        return std::process::ExitCode::SUCCESS;
    }
    let result = match args.command {
        None => run(),
        Some(Sub::RootHelper) => root_helper(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "bangerd failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Everything bangerd and its VMMs create (disks, logs, sockets, the
    // database) is the owner's only, as in the system unit (UMask=0077).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    banger_daemon::protect_ready_fd();
    let paths = Paths::from_env().context("resolving banger's directories")?;
    let config = Config::load(&paths)?;
    banger_daemon::init_logging(&paths.log_file, config.log_level.as_str())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        let daemon = banger_daemon::Daemon::new(config, paths)?;
        banger_daemon::serve(daemon).await
    });
    // Blocking work still running (a template being hashed, a copy) is
    // told to stop by the shutdown token; whatever does not stop in time
    // is left to the process's exit, which every step survives as it
    // survives a kill (reconcile tidies up at the next start).
    let start = std::time::Instant::now();
    rt.shutdown_timeout(SHUTDOWN_WAIT);
    if start.elapsed() >= SHUTDOWN_WAIT {
        tracing::warn!(
            waited_s = SHUTDOWN_WAIT.as_secs(),
            "blocking work did not end in time; exiting without it"
        );
    }
    served
}

/// How long a stopping daemon waits for its blocking work.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn root_helper() -> anyhow::Result<()> {
    // systemd's journal keeps stderr; every operation is logged there.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANGER_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("bangerd root-helper must run as root (it is bangerd-root.service)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(banger_root_helper::run())
        .context("bangerd-root")?;
    Ok(())
}
