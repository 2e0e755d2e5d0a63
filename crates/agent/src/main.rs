//! `banger-agent`: the guest agent (see the library docs). Finds its channel
//! to the host and serves host connections on it, forever.
//!
//! As the guest's first process (PID 1: `/init` of banger's initramfs, or
//! `init=`) it first assembles the root and forks: PID 1 becomes the
//! image's init, the child serves the host.

use banger_agent::bootinfo::{BootInfo, uptime_ms};
use banger_agent::prepared::{PREPARE_WAIT, Prepared};
use banger_agent::transport::virtio::VirtioPort;
use banger_agent::transport::{self, Transport, vsock};
use banger_agent::{Agent, SystemPower, init, singleton};
use banger_agent_proto::{PROTO_VERSION, VSOCK_PORT};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::level_filters::LevelFilter;

/// How long to wait for the channel's device to appear at boot.
const DISCOVERY_WAIT: Duration = Duration::from_secs(30);

/// Environment variable holding the log level (error, warn, info, debug, trace).
const LOG_ENV: &str = "BANGER_AGENT_LOG";

fn main() -> ExitCode {
    let started_ms = uptime_ms();
    let (boot, greeted, prepared) = if std::process::id() == 1 {
        // The guest's first process: assemble the root, hand PID 1 over to
        // the image's init; only the forked child gets here.
        match init::run() {
            Ok(mut early) => {
                if let Some(initramfs) = early.initramfs.take() {
                    initramfs.delete_when_idle();
                }
                (
                    BootInfo {
                        start: early.start,
                        started_ms,
                        init: early.init.map(|i| (i, early.init_is_systemd)),
                    },
                    early.greeted,
                    early.prepared,
                )
            }
            Err(e) => init::fail(&e),
        }
    } else {
        match service_args() {
            Ok(()) => (BootInfo::service(), None, None),
            Err(code) => return code,
        }
    };
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
    runtime.block_on(run(boot, greeted, prepared))
}

/// The command line of an agent started by the image's init: nothing, or
/// `--version` (answered here).
fn service_args() -> Result<(), ExitCode> {
    match std::env::args().nth(1).as_deref() {
        None => Ok(()),
        Some("--version") => {
            println!(
                "banger-agent {} (protocol v{PROTO_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            Err(ExitCode::SUCCESS)
        }
        Some(other) => {
            eprintln!("banger-agent: unexpected argument {other:?}; it takes none but --version");
            Err(ExitCode::from(2))
        }
    }
}

/// `greeted`: told (written to, then closed) once the host has the first
/// greeting; PID 1 waits for that before it starts the image's init.
/// `prepared`: closed by PID 1 once the guest is ready for commands.
async fn run(boot: BootInfo, greeted: Option<OwnedFd>, prepared: Option<OwnedFd>) -> ExitCode {
    // One agent serves; one started later by the image's init stands by.
    match singleton::acquire(singleton::NAME).await {
        Ok(l) => {
            if let Err(e) = singleton::keep(l) {
                tracing::warn!(error = %e, "cannot keep the agent lock");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot take the agent lock; serving anyway"),
    }
    let start = boot.start;
    let mut agent = Agent::with_boot(Arc::new(SystemPower), boot).stamp_first_greeting();
    if let Some(fd) = prepared {
        agent = agent.with_prepared(Prepared::from_pipe(fd, PREPARE_WAIT));
    }
    if let Some(fd) = greeted {
        agent.on_first_greeting(move || {
            let _ = std::fs::File::from(fd).write_all(b"1");
        });
    }
    let transport = match transport::discover(DISCOVERY_WAIT).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        ?transport,
        started = start.as_str(),
        "agent {} starting",
        env!("CARGO_PKG_VERSION")
    );
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
