//! Watching and killing a VMM process that may not be our child (after a
//! daemon restart), through a pidfd so a reused pid is never signalled and
//! exit is awaited as an event rather than polled.

use crate::VmmError;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// A handle on one process that stays valid even if its pid is reused.
pub(crate) struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd for `pid`; `Ok(None)` when no such process exists.
    pub(crate) fn open(pid: u32) -> io::Result<Option<Self>> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("pid {pid} out of range"),
            )
        })?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(err),
            };
        }
        let raw =
            i32::try_from(raw).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved in and never replaced or closed while
        // the AsyncFd lives.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Some(Self { fd }))
    }

    /// A pidfd for the VMM `pid` of the VM in `dir`, `None` when it is not
    /// running. Checked after opening the pidfd, so a signal sent through
    /// it cannot reach a process that took over a reused pid.
    pub(crate) fn open_vmm(pid: u32, dir: &std::path::Path) -> Result<Option<Self>, VmmError> {
        let pidfd = Self::open(pid).map_err(|e| VmmError::io(format!("pidfd_open {pid}"), e))?;
        Ok(pidfd.filter(|_| crate::vmm_process_alive(pid, dir)))
    }

    /// SIGKILL, then waits [`KILL_GRACE`] for the exit of `what`.
    pub(crate) async fn kill_and_wait(&self, what: &str) -> Result<(), VmmError> {
        self.kill()
            .map_err(|e| VmmError::io(format!("kill {what}"), e))?;
        if self.wait_exit(KILL_GRACE).await {
            Ok(())
        } else {
            Err(VmmError::Timeout {
                what: format!("{what} to exit after SIGKILL"),
                secs: KILL_GRACE.as_secs(),
            })
        }
    }

    /// Waits until the process has exited (a zombie counts); false on timeout.
    pub(crate) async fn wait_exit(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            // A pidfd never stops being readable once the process exited,
            // so readiness alone is the answer; errors end the wait too.
            let _ = self.fd.readable().await;
        })
        .await
        .is_ok()
    }

    /// Sends SIGKILL; a process that already exited is fine.
    pub(crate) fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// How long a SIGKILLed process may take to disappear.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);

/// Kills a freshly spawned VMM's whole session if launch is abandoned
/// (error or cancelled future) before it is disarmed.
pub(crate) struct KillOnDrop {
    pgid: Option<libc::pid_t>,
}

impl KillOnDrop {
    /// Arms the guard for the session led by `pid` (spawned with setsid).
    pub(crate) fn new(pid: u32) -> Self {
        Self {
            pgid: libc::pid_t::try_from(pid).ok(),
        }
    }

    pub(crate) fn disarm(mut self) {
        self.pgid = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Armed only while the child is unreaped (launch has no await point
        // between reaping and disarming), so the id cannot be reused yet.
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals that process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Kills (with its session) and reaps a child that failed to start, and
/// waits until no process of its group is left (a helper it was forking,
/// say), bounded in time, so nothing of a failed launch is left running.
pub(crate) async fn kill_and_reap(child: &mut tokio::process::Child) {
    // An id means not yet reaped, so the group id is still ours.
    if let Some(pgid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let gone = tokio::time::timeout(KILL_GRACE, async {
            let _ = child.wait().await;
            // The other members die on their own time (and are reaped,
            // later, by whoever inherits them).
            while group_alive(pgid) {
                tokio::time::sleep(GROUP_POLL).await;
            }
        })
        .await;
        if gone.is_err() {
            tracing::warn!(pid = pgid, "killed VMM did not exit in time");
        }
    }
}

/// How often [`kill_and_reap`] looks whether a killed group is gone: there
/// is no event for the last member's exit.
const GROUP_POLL: Duration = Duration::from_millis(5);

/// Whether a process of group `pgid` is still alive (not a zombie).
fn group_alive(pgid: libc::pid_t) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| stat_alive_in_group(&stat, pgid))
}

/// From a `/proc/PID/stat` line: the process is in group `pgid` and has
/// not exited (state other than zombie or dead).
fn stat_alive_in_group(stat: &str, pgid: libc::pid_t) -> bool {
    // The command name is in parentheses and may hold anything, so the
    // fields are counted from its closing one: state, ppid, pgrp, ...
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|f| f.parse::<libc::pid_t>().ok());
    pgrp == Some(pgid) && !matches!(state, Some("Z" | "X" | "x"))
}

/// The last `lines` non-empty lines of a log, joined into one line.
pub(crate) fn log_tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut tail: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(lines)
        .collect();
    tail.reverse();
    tail.join("; ")
}

/// Own session for a VMM child: a Ctrl-C or hang-up in the daemon's
/// terminal must not reach guests, and the VMM outlives a daemon restart.
pub(crate) fn new_session(cmd: &mut tokio::process::Command) {
    // SAFETY: setsid is async-signal-safe and touches no parent state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How waiting for a freshly spawned VMM's control socket ended.
pub(crate) enum Startup<E> {
    /// The process exited first.
    Exited(io::Result<std::process::ExitStatus>),
    /// The readiness probe finished (answered, or failed for good).
    Ready(Result<(), E>),
    TimedOut,
}

/// Races the child's exit against `ready` bounded by `timeout`; both
/// backends wait on their control socket this way.
pub(crate) async fn wait_startup<E>(
    child: &mut tokio::process::Child,
    timeout: Duration,
    ready: impl std::future::Future<Output = Result<(), E>>,
) -> Startup<E> {
    tokio::select! {
        status = child.wait() => Startup::Exited(status),
        r = tokio::time::timeout(timeout, ready) => match r {
            Ok(r) => Startup::Ready(r),
            Err(_) => Startup::TimedOut,
        },
    }
}

/// Spawns `cmd` (in a session of its own, never killed when dropped) as
/// VMM `vmm`; `Err` carries how it ended when it exited before it had a
/// pid. Then runs `ready`, its start-up checks, with the process killed
/// should they fail or be abandoned; on failure it is also reaped.
pub(crate) async fn spawn_checked(
    vmm: &'static str,
    name: &str,
    binary: String,
    mut cmd: tokio::process::Command,
    ready: impl AsyncFnOnce(&mut tokio::process::Child, u32) -> Result<(), crate::VmmError>,
) -> Result<Spawned, SpawnFailure> {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(false);
    new_session(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|source| SpawnFailure::Vmm(crate::VmmError::Spawn { binary, source }))?;
    let Some(pid) = child.id() else {
        return Err(SpawnFailure::Exited(child.wait().await));
    };
    let guard = KillOnDrop::new(pid);
    tracing::debug!(vm = %name, pid, "spawned {vmm}");
    let checked = ready(&mut child, pid).await;
    guard.disarm();
    if let Err(e) = checked {
        kill_and_reap(&mut child).await;
        return Err(SpawnFailure::Vmm(e));
    }
    Ok(Spawned { child, pid })
}

/// A VMM process that passed its start-up checks.
pub(crate) struct Spawned {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
}

/// Why [`spawn_checked`] failed.
pub(crate) enum SpawnFailure {
    /// It exited before it had a pid: how (for the backend to explain).
    Exited(io::Result<std::process::ExitStatus>),
    Vmm(crate::VmmError),
}

/// The task that reaps VMM `vmm` (pid `pid`, of VM `name`) and logs how it
/// ended.
pub(crate) fn reaper(
    vmm: &'static str,
    name: &str,
    pid: u32,
    mut child: tokio::process::Child,
) -> tokio::task::JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::info!(vm = %name, pid, %status, "{vmm} exited"),
            Err(e) => tracing::warn!(vm = %name, pid, error = %e, "waiting for {vmm} failed"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::stat_alive_in_group;

    #[test]
    fn a_group_member_is_alive_until_it_exits() {
        let line = |state: &str| format!("4242 (qemu) odd) name) {state} 1 4200 4200 0 -1 4194560");
        assert!(stat_alive_in_group(&line("S"), 4200));
        assert!(stat_alive_in_group(&line("R"), 4200));
        assert!(!stat_alive_in_group(&line("Z"), 4200));
        assert!(!stat_alive_in_group(&line("S"), 4201));
        assert!(!stat_alive_in_group("garbage", 4200));
    }
}
