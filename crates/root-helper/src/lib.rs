//! The root helper of a system install (`bangerd root-helper`, run by
//! `bangerd-root.service`). Its protocol and the owner daemon's client for
//! it are `banger-root-client`.
//!
//! The owner daemon runs unprivileged; the few host operations it needs
//! (bridge, TAPs, banger's nftables table, resolved wiring on the bridge,
//! chown inside banger's own directories) are sent to this helper over a
//! private Unix socket. The helper serves only the install owner (checked
//! with `SO_PEERCRED`), accepts only the typed, versioned operations of
//! [`proto::Op`], validates every argument ([`policy`]) and logs each
//! operation.

pub mod policy;
pub mod server;

pub use banger_root_client::proto;
pub use policy::{Checked, Policy, Refusal};
pub use server::{ImageStore, Server};

use banger_config::install::{INSTALL_RECORD, InstallError};
use banger_config::{Config, ConfigError, InstallRecord, Paths};
use banger_net::{HostNetError, LocalHostNet, NetSettings};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the helper could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no install record at {INSTALL_RECORD}: run `sudo banger system install --owner USER` first"
    )]
    NotInstalled,
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("network settings in /etc/banger/config.toml: {0}")]
    Settings(String),
    #[error("opening netlink: {0}")]
    Netlink(#[from] HostNetError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The policy for the install in `record`, with the network settings of
/// the system config (`/etc/banger/config.toml`, root-owned).
pub fn policy_for(record: &InstallRecord, config: &Config) -> Result<Policy, StartError> {
    let settings =
        NetSettings::from_config(config).map_err(|e| StartError::Settings(e.to_string()))?;
    let dirs = [
        &record.paths.state_dir,
        &record.paths.cache_dir,
        &record.paths.runtime_dir,
    ]
    .into_iter()
    .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
    .collect();
    Ok(Policy {
        owner_uid: record.owner_uid,
        owner_gid: record.owner_gid,
        bridge: settings.bridge,
        subnet: settings.subnet,
        dirs,
    })
}

/// Runs the helper until SIGTERM or SIGINT: reads the install record,
/// binds the private socket (owner-only, mode 0600), tells systemd it is
/// ready and serves.
pub async fn run() -> Result<(), StartError> {
    let record = InstallRecord::load(Path::new(INSTALL_RECORD))?.ok_or(StartError::NotInstalled)?;
    let paths = Paths::system(record.owner_home.clone());
    let config = Config::load(&paths)?;
    let policy = policy_for(&record, &config)?;
    let host = Arc::new(LocalHostNet::connect()?);
    let socket = record.paths.helper_socket.clone();
    let listener = bind(&socket, record.owner_uid, record.owner_gid)?;
    tracing::info!(
        socket = %socket.display(),
        owner_uid = record.owner_uid,
        bridge = %policy.bridge,
        cidr = %policy.subnet.cidr(),
        "bangerd-root listening"
    );
    banger_config::sd::notify_ready();
    let images = ImageStore {
        images_dir: paths.images_dir.clone(),
        kernels_dir: paths.kernels_dir.clone(),
        staging_dir: record.paths.helper_state_dir.join("build"),
        mirror: config.debian_mirror.clone(),
        agent_binary: config
            .agent_path
            .clone()
            .unwrap_or_else(|| record.paths.agent.clone()),
    };
    tracing::info!(images = %images.images_dir.display(), agent = %images.agent_binary.display(), "image builds enabled");
    let server = Arc::new(Server::new(policy, host).with_images(images));
    server.serve(listener, shutdown_signal()).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("bangerd-root stopped");
    Ok(())
}

/// Binds `socket` so that only `uid` can connect: directory 0711 (root),
/// socket 0600 owned by `uid`.
fn bind(socket: &Path, uid: u32, gid: u32) -> Result<tokio::net::UnixListener, StartError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::Io { what, path, source }
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io("setting the mode of", dir))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing stale", socket)(e)),
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io("binding", socket))?;
    std::os::unix::fs::chown(socket, Some(uid), Some(gid)).map_err(io("chown", socket))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting the mode of", socket))?;
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
