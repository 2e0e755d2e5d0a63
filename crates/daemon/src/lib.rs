//! bangerd: the daemon that owns VM lifecycle, images and the API.
//!
//! One [`Daemon`] value holds all state; the HTTP front end (`http`) turns
//! requests into calls on it. Operations on one VM are serialised by a
//! per-VM lock; different VMs proceed in parallel.
//!
//! Errors are typed per operation; each enum has a `kind()`
//! ([`ErrorKind`]) and converts into the edge type [`DaemonError`], whose
//! status and API `code` only `http::error` decides. The VM actions:
//!
//! | action | method | error | precondition |
//! |---|---|---|---|
//! | create | `create_vm` (`check_create` before the stream) | [`CreateError`] (its boot: [`BootError`]) | the name is free |
//! | start | `start_vm` | [`StartError`] (its boot: [`BootError`]) | stopped or in error (running: no-op) |
//! | stop | `stop_vm` | [`StopError`] | not being created |
//! | restart | `restart_vm` | [`RestartError`] | as stop, then start |
//! | kill | `kill_vm` | [`KillError`] | its VMM runs |
//! | set | `set_vm`, `set_vm_nat` | [`SetError`] | stopped (NAT alone: any state) |
//! | reach a VM | `lock_vm` / `lock_vm_id` | [`LookupError`] | the VM exists |
//! | reach its agent | `running_agent`, `list_sessions`, `start_session`, `stop_session`, `session_log_stream` | [`AgentError`] | running, agent connected |
//! | attach to a session | `attach_session` | [`SessionError`] | running, the session live |
//! | get a VM, its stats | `get_vm`, `vm_stats` | [`LookupError`] | the VM exists |
//! | a VM's logs | `log_stream` | [`LogsError`] | a valid query; the VM exists |
//! | list VMs, images, kernels; get an image | `list_vms`, `list_images`, `list_kernels`, `get_image` | `StoreError` | (the image exists) |
//! | the VMM backend | `vmm` | [`NoBackend`] | a VMM is installed |
//! | list its ports | `vm_ports` | [`NetError`] | running, agent connected |
//! | network facts | `network_status` | [`NetError`] | networking started (after reconcile) |
//! | wait for a VM | `wait_vm` | [`WaitError`] | running |
//! | its boot facts | `vm_boot` | [`BootInfoError`] | running, agent connected |
//! | make a template | `build_template` (`check_warm_image` before the stream), `list_templates`, `drop_templates` | [`TemplateError`] | the host can restore (build) |
//! | register an image | `register_image` | [`RegisterError`] | the name is not a managed image |
//! | delete an image | `delete_image` | [`DeleteImageError`] | no VM uses it (or `force`) |
//! | delete a kernel | `delete_kernel` | [`DeleteKernelError`] | no image uses it |
//! | delete a VM | `delete_vm` | [`DeleteError`] | the VM exists (a running one is stopped) |
//! | pull an image or kernel | `pull_image`, `pull_kernel` (`check_pull*` before the stream) | [`PullError`] | no image (kernel) of that name |
//! | build an image | `build_image` (`check_build_image` before the stream), `build_debian_image` | [`BuildError`] | a valid name; a Debian build of an existing name returns it |
//! | derive an image | `derive_image` (`build_image` with `from_image`) | [`DeriveError`] | no image of that name, none being built |
//! | bundle an image or kernel | `bundle_image`, `bundle_kernel` (`check_bundle_*`) | [`BundleError`] | it exists; absolute paths |
//! | the image a VM boots | `ensure_image` (create, derive, template builds, OCI pulls) | [`EnsureError`] | it exists, or it is the default image (pulled or built) |
//! | name a new image or kernel | `check_name`, `refuse_existing_image` | [`NameError`] | the name rule; not taken |
//! | get a kernel | `get_kernel` | [`Missing`] | it exists |
//!
//! Every VM state change goes through one writer, `set_state`, which
//! refuses a move `VmState::can_move_to` forbids ([`StateError`], a
//! conflict); create, start and stop carry it as their `State` variant.
//! Every boot (start, create, the transient VMs of image and template
//! builds) waits for readiness with `vm::ready::wait_ready` and start and
//! create end it with `finish_boot`.
//!
//! Only the HTTP front end builds [`DaemonError`] itself:
//! `Invalid` for its own request checks, `Failed` for the attach socket
//! bridge.

mod error;
mod guest;
mod http;
mod images;
mod logging;
mod net;
mod ownership;
mod private;
mod progress;
/// The HTTP front end's router under its old path, for the tests.
pub mod server {
    pub use crate::http::router;
}
mod sessions;
pub mod steps;
mod vm;
mod warm;
mod web;

pub use error::{DaemonError, ErrorKind, NoBackend};
pub use images::{
    BuildError, BundleError, DeleteImageError, DeleteKernelError, DeriveError, EnsureError,
    FileError, Missing, NameError, PullError, RegisterError,
};
pub use logging::init_logging;
pub use net::NetError;
pub use sessions::SessionError;
pub use vm::{
    AgentError, BootError, BootInfoError, CreateError, DeleteError, KillError, LogsError,
    LookupError, ResourceError, RestartError, SetError, StartError, StateError, StopError,
    WaitError,
};
pub use warm::TemplateError;

use anyhow::Context;
use banger_agent_proto::client::AgentClient;
use banger_config::{Config, Paths};
use banger_model::VmId;
use banger_store::Store;
use banger_vmm::Vmm;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The daemon's state. Cheap to share (`Arc<Daemon>`).
pub struct Daemon {
    pub config: Config,
    pub paths: Paths,
    pub store: Store,
    /// The VMM backend, or why there is none (e.g. qemu missing): the daemon
    /// still serves lists and deletes, and refuses to boot with that reason.
    vmm: Result<Arc<dyn Vmm>, String>,
    /// Why `vmm` was chosen, for `doctor` and `daemon status`.
    pub backend_reason: String,
    /// Per-VM run-time state: operation lock, agent, exit signal, boot
    /// facts, network lease.
    vms: vm::registry::VmRegistry,
    /// Serialises image builds (they are big and share a store).
    image_lock: tokio::sync::Mutex<()>,
    /// Networking, set up once by [`Daemon::init_network`].
    network: std::sync::OnceLock<net::Network>,
    /// Held from choosing a new VM's address until its record is stored.
    alloc_lock: tokio::sync::Mutex<()>,
    /// Serialises making kernels' initramfs parts.
    initramfs_lock: tokio::sync::Mutex<()>,
    /// Kernels this daemon already tried to give an initramfs at boot.
    initramfs_tried: Mutex<std::collections::HashSet<String>>,
    /// Serialises template builds (each boots a guest; hosts may have 2 cores).
    template_build: tokio::sync::Mutex<()>,
    /// Image and shape of template builds queued in the background.
    queued_builds: Mutex<
        std::collections::HashMap<(String, banger_model::TemplateShape), warm::BackgroundBuild>,
    >,
    /// Creates in progress; background template builds wait for zero.
    creates: tokio::sync::watch::Sender<usize>,
    /// sha256 of the agent binary, by its size/inode/mtime (template keys).
    agent_sha: Mutex<Option<(banger_model::FileFp, String)>>,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
}

impl Daemon {
    /// Opens the store and picks the VMM backend. Does not touch VMs yet.
    pub fn new(config: Config, paths: Paths) -> anyhow::Result<Arc<Self>> {
        for dir in [
            &paths.state_dir,
            &paths.vms_dir,
            &paths.images_dir,
            &paths.kernels_dir,
            &paths.cache_dir,
        ] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let store =
            Store::open(&paths.db).with_context(|| format!("opening {}", paths.db.display()))?;
        // Installs made before banger kept its files private (0755 dirs,
        // 0644 disks) are closed here; new files are private already
        // (SQLite gives its -wal and -shm files the database's mode).
        for dir in [&paths.state_dir, &paths.cache_dir] {
            let n = private::tighten(dir);
            if n > 0 {
                tracing::info!(dir = %dir.display(), changed = n, "made banger's files private to their owner");
            }
        }
        let (vmm, backend_reason) = match vm::choose_backend(&config) {
            Ok((v, why)) => (Ok(v), why),
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "no usable VMM backend");
                (Err(msg.clone()), msg)
            }
        };
        Ok(Arc::new(Self {
            config,
            paths,
            store,
            vmm,
            backend_reason,
            vms: Default::default(),
            image_lock: tokio::sync::Mutex::new(()),
            network: std::sync::OnceLock::new(),
            alloc_lock: tokio::sync::Mutex::new(()),
            initramfs_lock: tokio::sync::Mutex::new(()),
            initramfs_tried: Mutex::default(),
            template_build: tokio::sync::Mutex::new(()),
            queued_builds: Mutex::default(),
            creates: tokio::sync::watch::Sender::new(0),
            agent_sha: Mutex::default(),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The VMM backend; an error saying what to install when there is none.
    pub fn vmm(&self) -> Result<&Arc<dyn Vmm>, error::NoBackend> {
        self.vmm.as_ref().map_err(|e| error::NoBackend(e.clone()))
    }

    /// Whether the guest must reboot rather than power off for its VMM
    /// to exit (Firecracker; see [`banger_vmm::GuestExit`]).
    fn guest_exits_by_reboot(&self) -> bool {
        self.vmm
            .as_ref()
            .is_ok_and(|v| v.guest_exit() == banger_vmm::GuestExit::Reboot)
    }

    fn agent(&self, id: &VmId) -> Option<AgentClient> {
        self.vms.existing(id)?.agent()
    }

    fn set_agent(&self, id: &VmId, client: Option<AgentClient>) {
        match client {
            Some(c) => self.vms.handle(id).set_agent(Some(c)),
            None => {
                if let Some(h) = self.vms.existing(id) {
                    h.set_agent(None);
                }
            }
        }
    }

    /// The banger-agent binary injected into images.
    pub fn agent_binary(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.config.agent_path {
            return Ok(p.clone());
        }
        if let Ok(p) = std::env::var("BANGER_AGENT") {
            return Ok(PathBuf::from(p));
        }
        let exe = std::env::current_exe().context("locating bangerd")?;
        let beside = exe.with_file_name("banger-agent");
        if beside.is_file() {
            return Ok(beside);
        }
        anyhow::bail!(
            "banger-agent not found next to {}: build it (make build) or set agent_path in config.toml",
            exe.display()
        )
    }
}

/// Runs the daemon until SIGTERM/SIGINT or `POST /v1/shutdown`.
pub async fn serve(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let socket = daemon.paths.socket.clone();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ok();
    }
    // Only one daemon per state dir: hold an exclusive lock for our lifetime.
    let lock_path = daemon.paths.state_dir.join("bangerd.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| {
            anyhow::anyhow!(
                "another bangerd already runs for {}",
                daemon.paths.state_dir.display()
            )
        })?;

    if let Some(helper) = net::system_helper().await {
        let dirs = [
            daemon.paths.state_dir.clone(),
            daemon.paths.cache_dir.clone(),
        ];
        let n = ownership::repair(&helper, &dirs).await;
        if n > 0 {
            tracing::info!(repaired = n, "repaired ownership in banger's directories");
        }
    }
    daemon
        .record_legacy_kernel_dirs()
        .context("recording kernel directories")?;
    daemon.reconcile().await.context("reconciling VMs")?;
    daemon.init_network().await.context("starting networking")?;

    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    // Bind with a restrictive umask so the socket is never briefly world-usable.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(&socket);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let bound = file_identity(&socket);
    tracing::info!(socket = %socket.display(), pid = std::process::id(), backend = %daemon.backend_reason, "bangerd listening");
    let (router, _) = http::router(daemon.clone());
    web::start(&daemon, router.clone()).await;
    notify_ready();

    let token = daemon.shutdown.clone();
    let signals = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = signals.cancelled() => {}
        }
        signals.cancel();
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    daemon.stop_network().await;
    // Only our own socket: a daemon started since (for another state dir
    // with the same runtime dir, say) may have bound the path anew.
    if bound.is_some() && file_identity(&socket) == bound {
        let _ = std::fs::remove_file(&socket);
    }
    drop(lock);
    tracing::info!("bangerd stopped; VMs keep running");
    Ok(())
}

/// The device and inode of the file at `path`, if there is one.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Tells the `banger` that started us that the socket is live: it passes the
/// write end of a pipe as `BANGER_READY_FD`.
/// Marks the readiness pipe close-on-exec, so no process the daemon starts
/// (qemu, mmdebstrap) holds it open. Call first thing in `main`.
pub fn protect_ready_fd() {
    if let Some(fd) = std::env::var("BANGER_READY_FD")
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
    {
        // SAFETY: fcntl(F_SETFD) only changes the flags of the descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn notify_ready() {
    use std::io::Write;
    // bangerd.service is Type=notify: `systemctl start` returns once the
    // socket is live.
    banger_config::sd::notify_ready();
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var("BANGER_READY_FD")
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: the fd was handed to us by our parent for exactly this purpose
    // and nothing else in this process uses it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(b"ready\n");
    // Dropping `f` closes it so the parent sees EOF after the message.
}
