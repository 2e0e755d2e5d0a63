//! Early-init mode: the agent as the guest's first process.
//!
//! The image's root file system is shared by every VM made from it and is
//! mounted read-only. Before the image's own init runs, this mode stacks an
//! overlayfs on it whose upper layer lives on the VM's own overlay disk,
//! mounts the VM's work disk at `/root` and switches root to the result.
//! Nothing here needs device-mapper, and the host needs no root: both disks
//! are plain ext4 files.
//!
//! It starts in one of two places (see [`banger_agent_proto::boot`]):
//! - as `/init` of banger's initramfs: it loads the kernel modules the
//!   initramfs carries (`finit_module`, in the listed order), mounts the
//!   root device itself, assembles the root and switches to it (the
//!   initramfs's files are deleted, as `switch_root` does, later, when the
//!   CPU is idle);
//! - as `init=` after the distribution's initramfs (or the kernel) mounted
//!   the root: it assembles the overlay in a tmpfs and `pivot_root`s.
//!
//! Then it forks: PID 1 execs the image's init (systemd, busybox, ...),
//! and the child goes on as the agent, answering the host at once, while
//! that init boots ([`Early`]). An image with nothing at all at its init's
//! path (one that is a static binary or two) has the agent as its init:
//! PID 1 stays, reaps orphans and starts the serving child again should it
//! exit.
//!
//! Failures before the fork are fatal and reported in one line starting
//! with [`BOOT_FAILURE_PREFIX`] on the console, after which the guest
//! reboots, which ends the VM (QEMU `-no-reboot`, Firecracker `reboot=k`):
//! the host quotes that line instead of waiting for an agent that will
//! never come.

use banger_agent_proto::AgentStart;
use banger_agent_proto::boot::{BOOT_FAILURE_PREFIX, BootArgs, INITRAMFS_MODULES_LIST};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod modules;
mod root;

pub use modules::module_params;
use modules::{ModuleFile, load_module, load_modules};
use root::{OldRoot, assemble_from_initramfs, ensure_mounted, finish_root, prepare, switch_root};

/// Why early init could not hand over to the image's init. Messages are
/// one line and name what is missing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel has no overlay file system and `modprobe overlay` failed: {0}")]
    NoOverlay(String),
    #[error("none of {0:?} exists to stage the new root under")]
    NoStagingDir(&'static [&'static str]),
    #[error("bad init path {0:?}")]
    BadInit(String),
    #[error("kernel module {name} is missing from the initramfs ({path})")]
    ModuleMissing { name: String, path: String },
    #[error("loading kernel module {name}: {source}{hint}")]
    ModuleLoad {
        name: String,
        source: nix::Error,
        hint: &'static str,
    },
    #[error("no disk at {device} after {}s: the VM's root disk did not appear", .waited.as_secs())]
    NoRootDisk { device: String, waited: Duration },
    #[error("{0} failed unexpectedly (a bug in banger-agent)")]
    Panicked(&'static str),
    #[error("the image has no init at {path}{target}: it cannot boot")]
    NoInit { path: String, target: String },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

/// What the process that goes on serving knows about the boot.
#[derive(Debug)]
pub struct Early {
    /// How the agent started: from banger's initramfs or as `init=`.
    pub start: AgentStart,
    /// The image's init as PID 1 execs it; `None` when the image has none
    /// and the agent is the init.
    pub init: Option<String>,
    /// That init, symlinks resolved, is systemd.
    pub init_is_systemd: bool,
    /// Written to (or closed) once the agent has greeted the host: PID 1
    /// waits for it before it execs the image's init.
    pub greeted: Option<std::os::fd::OwnedFd>,
    /// Closed when PID 1 execs the image's init, after preparing the guest
    /// for commands (see [`crate::prepared`]); `None` when it already is.
    pub prepared: Option<std::os::fd::OwnedFd>,
    /// The initramfs's files, left to delete (banger's initramfs only).
    pub initramfs: Option<Initramfs>,
}

/// The file system of banger's initramfs after the switch to the VM's
/// root: its files still take memory until they are deleted.
#[derive(Debug)]
pub struct Initramfs(OldRoot);

impl Initramfs {
    /// Deletes its files in a thread of their own that runs only when the
    /// CPU is otherwise idle: nothing of the boot, the greeting or the
    /// first command waits for it.
    pub fn delete_when_idle(self) {
        std::thread::spawn(move || {
            set_idle(true);
            self.0.delete();
        });
    }
}

/// Assembles the VM's root and hands PID 1 to the image's init. Returns
/// `Ok` in the forked child only (which then serves the host); PID 1 never
/// returns unless something failed before the fork.
pub fn run() -> Result<Early, InitError> {
    let initramfs = Path::new(INITRAMFS_MODULES_LIST).exists();
    for d in ["/proc", "/sys", "/dev"] {
        if initramfs {
            let _ = std::fs::create_dir(d);
        }
    }
    ensure_mounted("proc", "/proc", "proc")?;
    ensure_mounted("devtmpfs", "/dev", "devtmpfs")?;
    ensure_mounted("sysfs", "/sys", "sysfs")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(io("reading /proc/cmdline"))?;
    let args = BootArgs::parse(&cmdline);
    let mut timings = format!(
        "started at {:.2} s",
        crate::bootinfo::uptime_ms() as f64 / 1000.0
    );
    let (mut network, mut after) = (Vec::new(), Vec::new());
    let mut old_root = None;
    let start = if initramfs {
        let t = Instant::now();
        let loaded = load_modules(Path::new(INITRAMFS_MODULES_LIST), &cmdline)?;
        timings.push_str(&format!(
            ", {} modules in {} ms",
            loaded.now,
            t.elapsed().as_millis()
        ));
        (network, after) = (loaded.network, loaded.after);
        let t = Instant::now();
        let filesystems = loaded.filesystems;
        let newroot = assemble_from_initramfs(&args, || filesystems.wait())?;
        old_root = Some(switch_root(&newroot)?);
        timings.push_str(&format!(", root in {} ms", t.elapsed().as_millis()));
        let t = Instant::now();
        let d = loaded.channel.wait()?;
        timings.push_str(&format!(
            ", {d} channel modules alongside (waited {} ms)",
            t.elapsed().as_millis()
        ));
        AgentStart::Initramfs
    } else {
        let t = Instant::now();
        prepare(&args)?;
        timings.push_str(&format!(", root in {} ms", t.elapsed().as_millis()));
        AgentStart::InitParam
    };
    finish_root()?;
    let checked = check_init(&args.init)?;
    let Some((init, target)) = checked else {
        // The agent is the init and serves from the start: prepare first.
        let prepared = prepare_for_commands(&cmdline, &network);
        load_each(&after, &cmdline);
        if let Some(r) = old_root {
            r.delete();
        }
        eprintln!(
            "banger-agent: {timings}, {prepared}; the image has nothing at {}: the agent is its init ({}= names another)",
            args.init,
            banger_agent_proto::boot::INIT_PARAM
        );
        return be_init(start);
    };
    // One line for `vm logs`: where early boot's time went (the second,
    // below, says what PID 1 did while the agent greeted).
    eprintln!("banger-agent: {timings}; greeting the host, then starting {init}");
    // The child says when it has greeted the host (or gives up): the
    // image's init, which takes the CPU for seconds, starts after that.
    let (handover_rd, handover_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("creating a pipe"))?;
    // Closed by PID 1's exec of the image's init: the guest is prepared
    // for commands then.
    let (prepared_rd, prepared_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("creating a pipe"))?;
    let early = Early {
        start,
        init_is_systemd: target.file_name().is_some_and(|n| n == "systemd"),
        init: Some(init.clone()),
        greeted: Some(handover_wr),
        prepared: Some(prepared_rd),
        initramfs: None,
    };
    // SAFETY: the process is single-threaded here (no runtime yet, the
    // module thread joined), so the child may do anything.
    match unsafe { nix::unistd::fork() }.map_err(sys("forking the agent off PID 1"))? {
        nix::unistd::ForkResult::Child => {
            drop(handover_rd);
            drop(prepared_wr);
            let _ = nix::unistd::setsid();
            let _ = nix::sys::prctl::set_name(c"banger-agent");
            // Like the unit's OOMScoreAdjust: the agent is the way in.
            let _ = std::fs::write("/proc/self/oom_score_adj", "-900");
            Ok(Early {
                initramfs: old_root.map(Initramfs),
                ..early
            })
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(early.greeted);
            drop(early.prepared);
            // On one vCPU the two compete: the greeting goes first, the
            // preparing takes the time the agent waits for the host.
            let idle = set_idle(true);
            let prepared = prepare_for_commands(&cmdline, &network);
            load_each(&after, &cmdline);
            drop(old_root);
            if idle {
                set_idle(false);
            }
            eprintln!("banger-agent: {prepared} while the agent greeted");
            wait_for_greeting(handover_rd, HANDOVER_WAIT);
            // Close-on-exec: the pipe closes, and the agent's commands
            // start, when the image's init has replaced this process (so
            // a command never sees PID 1 before the handover).
            let _until_exec = prepared_wr;
            fail(&exec_init(&init))
        }
    }
}

/// Puts the calling process in (or back out of) the idle scheduling
/// class, where it runs only when nothing else wants the CPU. PID 1 leaves
/// it before it execs the image's init, which inherits the class. Whether
/// the switch happened.
fn set_idle(idle: bool) -> bool {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain sched_setscheduler(2) on this process with a valid,
    // initialised parameter.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r != 0 {
        eprintln!(
            "banger-agent: setting the scheduling class: {}",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}

/// What the host's commands expect and the agent's greeting does not:
/// the network card's modules, `/tmp` cleaned as the image's init would at
/// boot, the network and the resolver, all before the image's init starts
/// (its services find them ready). Problems are printed, not fatal: by now
/// the agent may already serve. Returns a line for the console.
fn prepare_for_commands(cmdline: &str, network: &[ModuleFile]) -> String {
    let t = Instant::now();
    // In a thread, while the network is set up: both wait on the guest's
    // devices much of the time. Joined before anything forks or execs.
    let settle = std::thread::spawn(|| crate::boot_tmp::settle(Path::new("/")));
    load_each(network, cmdline);
    for p in crate::netconf::apply(cmdline, Path::new("/etc")) {
        eprintln!("banger-agent: network: {p}");
    }
    match settle.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("banger-agent: settling /tmp: {e}"),
        Err(_) => eprintln!("banger-agent: settling /tmp failed unexpectedly"),
    }
    format!(
        "{} network modules, /tmp and network in {} ms",
        network.len(),
        t.elapsed().as_millis()
    )
}

/// Loads `modules` in order; a failure is printed, not fatal (the agent
/// may already serve).
fn load_each(modules: &[ModuleFile], cmdline: &str) {
    for m in modules {
        if let Err(e) = load_module(m, cmdline) {
            eprintln!("banger-agent: {e}");
        }
    }
}

/// The agent as the image's init: PID 1 stays and reaps every orphan (the
/// kernel gives them to it), and a forked child serves, started again
/// should it exit. Returns in each such child only.
fn be_init(start: AgentStart) -> Result<Early, InitError> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    loop {
        // SAFETY: PID 1 is single-threaded (no runtime has started), so
        // the child may do anything.
        let child = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let _ = nix::sys::prctl::set_name(c"banger-agent");
                return Ok(Early {
                    start,
                    init: None,
                    init_is_systemd: false,
                    greeted: None,
                    prepared: None,
                    initramfs: None,
                });
            }
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => {
                eprintln!("banger-agent (init): fork failed: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))
                    if pid == child =>
                {
                    eprintln!("banger-agent (init): the agent exited; starting it again");
                    break;
                }
                Err(nix::errno::Errno::ECHILD) => break,
                _ => {}
            }
        }
        // A crash loop must not spin the CPU.
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How long PID 1 waits for the agent's greeting before starting the
/// image's init anyway (the host may not be listening yet).
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Returns when the agent wrote to (or closed) its end of the handover
/// pipe, or after `timeout`.
fn wait_for_greeting(rd: std::os::fd::OwnedFd, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Reports why the guest cannot boot (one console line) and reboots it,
/// which ends the VM. For PID 1 only.
pub fn fail(err: &InitError) -> ! {
    eprintln!("{BOOT_FAILURE_PREFIX}{err}");
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) does not fail for PID 1 with CAP_SYS_BOOT; should it, the
    // kernel panics when PID 1 exits, which ends the VM all the same.
    std::process::exit(1)
}

/// The image's init must be there, executable: `(path, resolved target)`;
/// `None` when there is nothing at all at its path (not even a dangling
/// link): the agent is the init then.
fn check_init(init: &str) -> Result<Option<(String, PathBuf)>, InitError> {
    if std::fs::symlink_metadata(init).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(None);
    }
    let missing = |target: String| InitError::NoInit {
        path: init.to_string(),
        target,
    };
    let target = match std::fs::canonicalize(init) {
        Ok(t) => t,
        Err(_) => {
            // A dangling link says where it points.
            let t = std::fs::read_link(init)
                .map(|t| format!(" (a link to {}, which does not exist)", t.display()))
                .unwrap_or_default();
            return Err(missing(t));
        }
    };
    let md = std::fs::metadata(&target).map_err(|_| missing(String::new()))?;
    if !md.is_file() || md.mode() & 0o111 == 0 {
        return Err(missing(format!(
            " ({} is not an executable file)",
            target.display()
        )));
    }
    Ok(Some((init.to_string(), target)))
}

fn exec_init(init: &str) -> InitError {
    let Ok(path) = CString::new(init) else {
        return InitError::BadInit(init.into());
    };
    match nix::unistd::execv(&path, std::slice::from_ref(&path)) {
        Err(e) => InitError::Sys {
            what: format!("exec {init}"),
            source: e,
        },
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_init_is_named_with_its_link_target() {
        let t = tempfile::tempdir().expect("tmp");
        let missing = t.path().join("sbin-init");
        // Nothing at all there: the agent is the init.
        assert!(
            check_init(missing.to_str().expect("utf8"))
                .expect("absent")
                .is_none()
        );
        std::os::unix::fs::symlink("/nonexistent/systemd", &missing).expect("link");
        let e = check_init(missing.to_str().expect("utf8")).expect_err("dangling");
        assert_eq!(
            e.to_string(),
            format!(
                "the image has no init at {} (a link to /nonexistent/systemd, which does not exist): it cannot boot",
                missing.display()
            )
        );
        let plain = t.path().join("notexec");
        std::fs::write(&plain, "").expect("w");
        let e = check_init(plain.to_str().expect("utf8")).expect_err("not executable");
        assert!(e.to_string().contains("is not an executable file"), "{e}");
        let (path, target) = check_init("/bin/sh").expect("sh").expect("there");
        assert_eq!(path, "/bin/sh");
        assert!(target.is_absolute());
    }
}
