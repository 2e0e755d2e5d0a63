//! `banger-agent`: the guest agent (see the library docs). Finds its channel
//! to the host and serves host connections on it, forever.

use banger_agent::transport::virtio::VirtioPort;
use banger_agent::transport::{self, Transport, vsock};
use banger_agent::{Agent, SystemPower};
use banger_agent_proto::{PROTO_VERSION, VSOCK_PORT};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::level_filters::LevelFilter;

/// How long to wait for the channel's device to appear at boot.
const DISCOVERY_WAIT: Duration = Duration::from_secs(30);

/// Environment variable holding the log level (error, warn, info, debug, trace).
const LOG_ENV: &str = "BANGER_AGENT_LOG";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        // Started as the kernel's init=: assemble the root and hand over to
        // the image's init. Reaching the next line means that failed.
        match banger_agent::init::run() {
            banger_agent::init::InitError::NoInit(init) => {
                eprintln!(
                    "banger-agent (init): the image has no {init}: the agent is its init (banger.init= names another)"
                );
                banger_agent::init::be_init(serve_main);
            }
            err => {
                eprintln!("banger-agent (init): {err}; the VM cannot boot");
                return ExitCode::FAILURE;
            }
        }
    }
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--version") => {
            println!(
                "banger-agent {} (protocol v{PROTO_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("banger-agent: unexpected argument {other:?}; it takes none but --version");
            return ExitCode::from(2);
        }
    }
    serve_main()
}

/// The agent's service: logging, the runtime, the host channel.
fn serve_main() -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let agent = Agent::new(Arc::new(SystemPower));
    let transport = match transport::discover(DISCOVERY_WAIT).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(?transport, "agent {} starting", env!("CARGO_PKG_VERSION"));
    match transport {
        Transport::VirtioSerial(path) => {
            let mut port = match VirtioPort::open(&path) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            while let Some(conn) = port.accept().await {
                agent.serve(conn).await;
            }
            tracing::error!("the virtio-serial port reader stopped");
            ExitCode::FAILURE
        }
        Transport::Vsock => loop {
            let stream = vsock::connect_host(VSOCK_PORT).await;
            agent.serve(stream).await;
        },
    }
}

/// Logs to stderr (the journal and the console, per the unit), at `info`
/// unless [`LOG_ENV`] says otherwise. Lines carry a UTC timestamp: the
/// console has none of its own.
fn init_logging() {
    let level = match std::env::var(LOG_ENV) {
        Ok(v) => v.parse::<LevelFilter>().unwrap_or_else(|_| {
            eprintln!("banger-agent: ignoring {LOG_ENV}={v:?}: not a log level");
            LevelFilter::INFO
        }),
        Err(_) => LevelFilter::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(level)
        .init();
}
