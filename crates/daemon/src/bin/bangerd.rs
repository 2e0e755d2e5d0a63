//! bangerd: the banger daemon. Normally started by `banger` on demand.

use anyhow::Context;
use banger_config::{Config, Paths};
use banger_version::BuildInfo;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bangerd",
    about = "The banger daemon: owns VMs, images and the API socket."
)]
struct Args {
    /// Print the version and exit.
    #[arg(long, short = 'V')]
    version: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.version {
        println!("{}", BuildInfo::current().line("bangerd"));
        return std::process::ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "bangerd failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    banger_daemon::protect_ready_fd();
    let paths = Paths::from_env().context("resolving banger's directories")?;
    let config = Config::load(&paths)?;
    banger_daemon::init_logging(&paths.log_file, config.log_level.as_str())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let daemon = banger_daemon::Daemon::new(config, paths)?;
        banger_daemon::serve(daemon).await
    })
}
