//! Finding the daemon, and starting it when it is not running.

use anyhow::{Context, bail};
use banger_api::{Client, ClientError};
use banger_config::{InstallRecord, Paths, SYSTEM_ENV};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The fd number the daemon's readiness pipe gets in the child.
const READY_FD: i32 = 3;

/// The system install this CLI talks to, if any. `BANGER_SYSTEM=0` forces
/// user mode even on a host with a system install.
pub fn system_install() -> anyhow::Result<Option<InstallRecord>> {
    if std::env::var(SYSTEM_ENV).as_deref() == Ok("0") {
        return Ok(None);
    }
    Ok(InstallRecord::load_system()?)
}

/// The directories of the daemon this CLI talks to, where its config, ssh
/// key, known_hosts and ssh_config are: the system install's (`/etc/banger`,
/// `/var/lib/banger`, ...) when there is one, else the user's (XDG).
pub fn daemon_paths() -> anyhow::Result<Paths> {
    if let Some(record) = system_install()? {
        return Ok(Paths::system(record.owner_home));
    }
    Paths::from_env().context("resolving banger's directories")
}

/// The daemon socket: `BANGER_SOCKET`, else the system install's
/// (`/run/banger/bangerd.sock`), else the user-mode default.
pub fn socket_path() -> anyhow::Result<PathBuf> {
    if let Some(s) = std::env::var_os("BANGER_SOCKET") {
        return Ok(PathBuf::from(s));
    }
    if let Some(record) = system_install()? {
        return Ok(record.paths.socket);
    }
    Ok(Paths::from_env()
        .context("resolving banger's directories")?
        .socket)
}

/// A client for a daemon that answers, or `None`.
pub async fn running_client() -> anyhow::Result<Option<Client>> {
    let client = Client::new(socket_path()?);
    match client.info().await {
        Ok(_) => Ok(Some(client)),
        Err(ClientError::Unreachable { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A client for the daemon, starting the daemon first if it is not running
/// (user mode only: a system install's daemon is systemd's to start).
pub async fn client() -> anyhow::Result<Client> {
    if let Some(c) = running_client().await? {
        return Ok(c);
    }
    if std::env::var_os("BANGER_SOCKET").is_some() {
        bail!("no daemon answers on $BANGER_SOCKET; start it or unset BANGER_SOCKET");
    }
    if let Some(record) = system_install()? {
        let socket = record.paths.socket.display();
        let me = nix::unistd::geteuid().as_raw();
        if me != record.owner_uid && me != 0 {
            bail!(
                "banger is installed for user {} (uid {}), not for you (uid {me}): only the owner can use {socket}",
                record.owner,
                record.owner_uid
            );
        }
        bail!(
            "bangerd.service does not answer on {socket}: see `banger system status`, start it with `sudo systemctl start bangerd.service`"
        );
    }
    start_daemon()?;
    Ok(Client::new(socket_path()?))
}

fn bangerd_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating banger")?;
    let beside = exe.with_file_name("bangerd");
    if beside.is_file() {
        return Ok(beside);
    }
    banger_vmm::host::find_binary("bangerd", None)
        .ok_or_else(|| anyhow::anyhow!("bangerd not found next to {} nor on PATH", exe.display()))
}

/// Starts bangerd detached and waits until it says it is listening.
fn start_daemon() -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    // The daemon's state is the owner's only (bangerd closes what an older
    // install left open when it starts).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.state_dir)
        .with_context(|| format!("creating {}", paths.state_dir.display()))?;
    let stderr_path = paths.state_dir.join("bangerd.stderr");
    let stderr = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let (rd, wr): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let bin = bangerd_binary()?;
    let wr_raw = wr.as_raw_fd();
    let mut cmd = Command::new(&bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .env("BANGER_READY_FD", READY_FD.to_string());
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: a Ctrl-C in this terminal must not reach the daemon.
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::dup2(wr_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    drop(wr);
    // One line: what is being done now, then (below) how it went.
    eprint!(
        "banger: daemon was not running; starting bangerd (pid {}, log {}) ... ",
        child.id(),
        paths.log_file.display()
    );

    // Wait for "ready" on the pipe; EOF first means the daemon died.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(rd);
        // Up to the first newline: a child of the daemon that inherited the
        // pipe must not keep us waiting for EOF.
        let mut buf = String::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = f.read(&mut byte) {
            if byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0] as char);
        }
        let _ = tx.send(buf);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(msg) if msg.starts_with("ready") => {
            eprintln!("started");
            Ok(())
        }
        Ok(_) => {
            eprintln!("failed");
            let _ = child.wait();
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let err = err.trim();
            let err = err.strip_prefix("bangerd: ").unwrap_or(err);
            bail!(
                "the daemon failed to start: {}",
                if err.is_empty() {
                    "no error output"
                } else {
                    err
                }
            )
        }
        Err(_) => {
            eprintln!("no answer");
            bail!(
                "the daemon did not come up within 30s; see {}",
                paths.log_file.display()
            )
        }
    }
}
