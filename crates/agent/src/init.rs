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
//!   root device itself, assembles the root and switches to it, deleting
//!   the initramfs's files as `switch_root` does;
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
use banger_agent_proto::boot::{
    BOOT_FAILURE_PREFIX, BootArgs, DEVICE_MODULES, INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_LIST,
    ModuleEntry, TRANSPORT_MODULE, WORK_MOUNT,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Directories of the base root, any of which can hold the staging tmpfs.
/// The tmpfs is detached with the old root, so which one does not matter.
const STAGING_CANDIDATES: &[&str] = &["/mnt", "/tmp", "/media", "/srv", "/opt", "/home", "/run"];

/// API file systems moved into the new root when the initramfs (or this
/// function) mounted them.
const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// Directories a root needs, made (in the VM's overlay) when the image has
/// none, as a container runtime would: mount points, and /tmp for programs.
const ROOT_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// How long banger's initramfs waits for the root disk to appear once
/// its driver is loaded (it is there at once in practice).
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// Where banger's initramfs assembles the new root and mounts the disks
/// under it (in the initramfs's own, writable, file system).
const INITRAMFS_NEWROOT: &str = "/newroot";
const INITRAMFS_BASE: &str = "/banger/base";
const INITRAMFS_DISK: &str = "/banger/disk";

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
    /// Closed by PID 1 once the guest is prepared for commands (see
    /// [`crate::prepared`]); `None` when it already is.
    pub prepared: Option<std::os::fd::OwnedFd>,
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
    let mut later = Vec::new();
    let start = if initramfs {
        let t = Instant::now();
        let loaded = load_modules(Path::new(INITRAMFS_MODULES_LIST), &cmdline)?;
        timings.push_str(&format!(
            ", {} modules in {} ms",
            loaded.now,
            t.elapsed().as_millis()
        ));
        later = loaded.later;
        let t = Instant::now();
        let newroot = assemble_from_initramfs(&args)?;
        switch_root(&newroot)?;
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
        let prepared = prepare_for_commands(&cmdline, &later);
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
    // PID 1 closes its end once the guest is prepared for commands.
    let (prepared_rd, prepared_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("creating a pipe"))?;
    let early = Early {
        start,
        init_is_systemd: target.file_name().is_some_and(|n| n == "systemd"),
        init: Some(init.clone()),
        greeted: Some(handover_wr),
        prepared: Some(prepared_rd),
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
            Ok(early)
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(early.greeted);
            drop(early.prepared);
            // On one vCPU the two compete: the greeting goes first, the
            // preparing takes the time the agent waits for the host.
            let idle = set_idle(true);
            let prepared = prepare_for_commands(&cmdline, &later);
            if idle {
                set_idle(false);
            }
            eprintln!("banger-agent: {prepared} while the agent greeted");
            drop(prepared_wr);
            wait_for_greeting(handover_rd, HANDOVER_WAIT);
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
/// the remaining device modules (the network card, the entropy source),
/// `/tmp` cleaned as the image's init would at boot, the network and the
/// resolver, all before the image's init starts (its services find them
/// ready). Problems are printed, not fatal: by now the agent may already
/// serve. Returns a line for the console.
fn prepare_for_commands(cmdline: &str, later: &[ModuleFile]) -> String {
    let t = Instant::now();
    // In a thread, while the network is set up: both wait on the guest's
    // devices much of the time. Joined before anything forks or execs.
    let settle = std::thread::spawn(|| crate::boot_tmp::settle(Path::new("/")));
    for m in later {
        if let Err(e) = load_module(m, cmdline) {
            eprintln!("banger-agent: {e}");
        }
    }
    for p in crate::netconf::apply(cmdline, Path::new("/etc")) {
        eprintln!("banger-agent: network: {p}");
    }
    match settle.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("banger-agent: settling /tmp: {e}"),
        Err(_) => eprintln!("banger-agent: settling /tmp failed unexpectedly"),
    }
    format!(
        "{} device modules, /tmp and network in {} ms",
        later.len(),
        t.elapsed().as_millis()
    )
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

/// The modules of banger's initramfs (see [`ModuleEntry`]): first those of
/// the virtio transport, then, in the listed order, those needed always
/// (the disks and their file systems) and those of the virtio devices the
/// guest has. The modules of the agent's channel to the host (the console
/// of QEMU's agent channel, Firecracker's vsock) load in a thread of their
/// own while the disks are probed and mounted (both wait on emulated I/O
/// much of the time); it is joined before the agent greets. The other
/// device modules (network card, entropy) are opened now and loaded after
/// the greeting ([`prepare_for_commands`]). Parameters given on the kernel
/// command line as `module.param=value` are passed on, as modprobe would.
/// A module already loaded (or built in) is fine.
fn load_modules(list: &Path, cmdline: &str) -> Result<LoadedModules, InitError> {
    let text = std::fs::read_to_string(list).map_err(io(format!("reading {}", list.display())))?;
    let entries = ModuleEntry::parse_list(&text);
    let is_transport = |e: &ModuleEntry| e.wanted_by.iter().any(|w| w == TRANSPORT_MODULE);
    for e in entries.iter().filter(|e| is_transport(e)) {
        load_module(&open_module(e)?, cmdline)?;
    }
    let ids = crate::transport::virtio_device_ids(Path::new(VIRTIO_DEVICES));
    let only_for_devices = |e: &ModuleEntry| {
        e.wanted_by
            .iter()
            .all(|w| DEVICE_MODULES.iter().any(|(m, _)| m == w))
    };
    let for_channel = |e: &ModuleEntry| {
        e.wanted_by
            .iter()
            .any(|w| CHANNEL_MODULES.contains(&w.as_str()))
    };
    let (devices, disks): (Vec<ModuleEntry>, Vec<ModuleEntry>) = entries
        .iter()
        .filter(|e| !is_transport(e) && e.needed(&ids))
        .cloned()
        .partition(|e| only_for_devices(e));
    let (channel, later): (Vec<ModuleEntry>, Vec<ModuleEntry>) =
        devices.into_iter().partition(|e| for_channel(e));
    // Opened here, before the thread starts: the root is switched (and the
    // initramfs's files deleted) while it may still be loading them, and
    // the later ones load after that.
    let open_all = |v: &[ModuleEntry]| v.iter().map(open_module).collect::<Result<Vec<_>, _>>();
    let (channel, later) = (open_all(&channel)?, open_all(&later)?);
    let line = cmdline.to_string();
    let thread = std::thread::spawn(move || {
        for m in &channel {
            load_module(m, &line)?;
        }
        Ok(channel.len())
    });
    for e in &disks {
        load_module(&open_module(e)?, cmdline)?;
    }
    Ok(LoadedModules {
        now: entries.iter().filter(|e| is_transport(e)).count() + disks.len(),
        channel: DeviceModules(thread),
        later,
    })
}

/// The device modules of the agent's channel to the host: loaded before it
/// greets. Other device modules wait until after the greeting.
const CHANNEL_MODULES: &[&str] = &["virtio_console", "vsock", "vmw_vsock_virtio_transport"];

/// What [`load_modules`] did and left to do.
struct LoadedModules {
    /// How many loaded before it returned.
    now: usize,
    /// The channel's modules, loading alongside.
    channel: DeviceModules,
    /// Opened, loaded after the greeting.
    later: Vec<ModuleFile>,
}

/// The device modules loading alongside ([`load_modules`]).
struct DeviceModules(std::thread::JoinHandle<Result<usize, InitError>>);

impl DeviceModules {
    /// Waits until they are loaded; how many.
    fn wait(self) -> Result<usize, InitError> {
        self.0
            .join()
            .map_err(|_| InitError::Panicked("loading the device modules"))?
    }
}

/// Where the kernel lists virtio devices (with their `device` ids).
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

/// A module file of the initramfs, open.
struct ModuleFile {
    name: String,
    file: std::fs::File,
}

fn open_module(e: &ModuleEntry) -> Result<ModuleFile, InitError> {
    let name = e.name().to_string();
    let path = Path::new(INITRAMFS_MODULES_DIR).join(&e.file);
    match std::fs::File::open(&path) {
        Ok(file) => Ok(ModuleFile { name, file }),
        Err(_) => Err(InitError::ModuleMissing {
            name,
            path: path.display().to_string(),
        }),
    }
}

fn load_module(m: &ModuleFile, cmdline: &str) -> Result<(), InitError> {
    let name = m.name.clone();
    let params = CString::new(module_params(cmdline, &name)).unwrap_or_default();
    match nix::kmod::finit_module(&m.file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(source) => {
            let hint = match source {
                nix::Error::ENOEXEC | nix::Error::EINVAL => {
                    " (not a module of this kernel: re-register or rebuild the image so banger remakes its initramfs)"
                }
                _ => "",
            };
            Err(InitError::ModuleLoad { name, source, hint })
        }
    }
}

/// `param=value ...` for module `name` from `name.param=value` words of the
/// kernel command line (`-` and `_` are the same in module names).
pub fn module_params(cmdline: &str, name: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let name = norm(name);
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| {
            let (module, param) = w.split_once('.')?;
            (norm(module) == name && param.contains('=')).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mounts the root device and the VM's disks under [`INITRAMFS_NEWROOT`]:
/// the base read-only under an overlay whose upper layer is on the overlay
/// disk, the work disk at `/root`. Without an overlay disk the root is
/// mounted as it is (read-write when asked).
fn assemble_from_initramfs(args: &BootArgs) -> Result<PathBuf, InitError> {
    wait_for_device(&args.root, ROOT_WAIT)?;
    let newroot = PathBuf::from(INITRAMFS_NEWROOT);
    mkdir(&newroot)?;
    match &args.overlay {
        None => {
            let flags = if args.root_writable {
                MsFlags::empty()
            } else {
                MsFlags::MS_RDONLY
            };
            mount_ext4(&args.root, &newroot, flags)?;
            if let Some(work_dev) = &args.work {
                mount_work(work_dev, &newroot, &newroot)?;
            }
        }
        Some(overlay_dev) => {
            let (base, disk) = (Path::new(INITRAMFS_BASE), Path::new(INITRAMFS_DISK));
            mkdir(base)?;
            mkdir(disk)?;
            mount_ext4(&args.root, base, MsFlags::MS_RDONLY)?;
            mount_overlay(overlay_dev, base, disk, &newroot)?;
            if let Some(work_dev) = &args.work {
                mount_work(work_dev, base, &newroot)?;
            }
        }
    }
    Ok(newroot)
}

/// Waits for a block device node to appear (devtmpfs makes it when the
/// driver finds the disk).
fn wait_for_device(dev: &str, timeout: Duration) -> Result<(), InitError> {
    use std::os::unix::fs::FileTypeExt;
    let started = Instant::now();
    loop {
        if std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device()) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(InitError::NoRootDisk {
                device: dev.to_string(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `switch_root`: moves the API file systems into `newroot`, deletes the
/// initramfs's files (freeing their memory), makes `newroot` the root.
fn switch_root(newroot: &Path) -> Result<(), InitError> {
    move_api_mounts(newroot)?;
    let root_dev = std::fs::metadata("/").map_err(io("reading /"))?.dev();
    delete_tree(Path::new("/"), root_dev, newroot);
    nix::unistd::chdir(newroot).map_err(sys("entering the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the new root onto /"))?;
    nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))
}

/// Removes what is under `dir` on the file system `dev`, skipping `keep`
/// and other file systems (the mounted disks). Best effort: what cannot be
/// removed only costs memory.
fn delete_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == keep {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            delete_tree(&p, dev, keep);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// After either path: `/run` is a tmpfs (systemd expects one, and the
/// agent's early children may write there), `/dev/pts` is mounted (the
/// agent's terminals need it before the image's init mounts anything).
fn finish_root() -> Result<(), InitError> {
    if Path::new("/run").is_dir() && !is_mount_point(Path::new("/run")) {
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=20%"),
        )
        .map_err(sys("mounting a tmpfs on /run"))?;
    }
    let pts = Path::new("/dev/pts");
    let _ = std::fs::create_dir(pts);
    if pts.is_dir() && !is_mount_point(pts) {
        mount(
            Some("devpts"),
            pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        )
        .map_err(sys("mounting devpts on /dev/pts"))?;
    }
    Ok(())
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

/// The `init=` path: the root is mounted at `/` (read-only); stack the
/// overlay in a staging tmpfs and pivot into it.
fn prepare(args: &BootArgs) -> Result<(), InitError> {
    let Some(overlay_dev) = args.overlay.clone() else {
        // No overlay disk: boot the base as it is.
        return Ok(());
    };
    ensure_overlayfs()?;

    // Nothing may propagate out of or into the mounts made here, and
    // pivot_root refuses shared mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;

    let staging = STAGING_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or(InitError::NoStagingDir(STAGING_CANDIDATES))?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", staging.display())))?;
    let disk = staging.join("disk");
    let newroot = staging.join("root");
    for d in [&disk, &newroot] {
        mkdir(d)?;
    }
    mount_overlay(&overlay_dev, Path::new("/"), &disk, &newroot)?;
    if let Some(work_dev) = &args.work {
        mount_work(work_dev, Path::new("/"), &newroot)?;
    }
    move_api_mounts(&newroot)?;
    // pivot_root(".", ".") stacks the old root under the new one at "/";
    // detaching it leaves only the new root (see pivot_root(2)).
    nix::unistd::chdir(&newroot).map_err(sys("entering the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the overlay"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}

/// Mounts the overlay disk at `disk` and an overlay of `base` (read-only
/// lower layer) with its upper layer on that disk at `newroot`.
fn mount_overlay(
    overlay_dev: &str,
    base: &Path,
    disk: &Path,
    newroot: &Path,
) -> Result<(), InitError> {
    mount_ext4_data(overlay_dev, disk, MsFlags::empty(), VM_DISK_OPTIONS)?;
    let (upper, work) = (disk.join("upper"), disk.join("work"));
    for d in [&upper, &work] {
        mkdir(d)?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        newroot,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(sys(format!("mounting the overlay root ({opts})")))
}

/// Mounts the work disk at `<newroot>/root`. A work disk made without a
/// seed starts empty: it gets the image's own /root, read from `base`.
fn mount_work(work_dev: &str, base: &Path, newroot: &Path) -> Result<(), InitError> {
    let target = newroot.join(&WORK_MOUNT[1..]);
    std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
    mount_ext4_data(work_dev, &target, MsFlags::empty(), VM_DISK_OPTIONS)?;
    fill_fresh_work(base, &target)
}

/// A work disk made without a seed starts empty: it gets the image's own
/// /root, read from `base`.
fn fill_fresh_work(base: &Path, target: &Path) -> Result<(), InitError> {
    if is_fresh_fs(target)? {
        copy_tree(&base.join(&WORK_MOUNT[1..]), target)?;
    }
    Ok(())
}

/// Moves the API file systems that are mounted into `newroot` (creating
/// their directories on a writable root when the image lacks them).
fn move_api_mounts(newroot: &Path) -> Result<(), InitError> {
    // A root made of a static binary or two has no mount points of its
    // own: make them in the overlay (the base stays read-only; a root
    // booted read-only without one keeps what it has).
    for (d, mode) in ROOT_DIRS {
        let p = newroot.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::create_dir(&p) {
                Ok(()) => std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                    .map_err(io(format!("setting the mode of {}", p.display())))?,
                Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => {}
                Err(e) => return Err(io(format!("creating {}", p.display()))(e)),
            }
        }
    }
    // Device nodes are reached through /dev until it moves; decide what
    // to move before moving /proc, which is where we look.
    let mounted = mount_points()?;
    for m in MOVED_MOUNTS {
        if mounted.iter().any(|p| p == Path::new(m)) {
            let target = newroot.join(&m[1..]);
            let _ = std::fs::create_dir(&target);
            mount(
                Some(*m),
                &target,
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(sys(format!("moving {m} into the new root")))?;
        }
    }
    Ok(())
}

fn mkdir(d: &Path) -> Result<(), InitError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(format!("creating {}", d.display()))(e)),
    }
}

/// Mounts `fstype` at `dir` unless something is mounted there already.
fn ensure_mounted(source: &str, dir: &str, fstype: &str) -> Result<(), InitError> {
    let d = Path::new(dir);
    if !d.is_dir() || is_mount_point(d) {
        return Ok(());
    }
    let flags = match fstype {
        "devtmpfs" => MsFlags::MS_NOSUID,
        _ => MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    };
    mount(Some(source), d, Some(fstype), flags, None::<&str>)
        .map_err(sys(format!("mounting {fstype} on {dir}")))
}

/// A directory is a mount point when its device differs from its parent's.
fn is_mount_point(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Mount points listed in /proc/self/mounts.
fn mount_points() -> Result<Vec<PathBuf>, InitError> {
    let text =
        std::fs::read_to_string("/proc/self/mounts").map_err(io("reading /proc/self/mounts"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(PathBuf::from)
        .collect())
}

/// True when `dir` holds nothing but ext4's `lost+found`.
fn is_fresh_fs(dir: &Path) -> Result<bool, InitError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        if e.file_name() != "lost+found" {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Copies the tree under `from` into the existing directory `to`, keeping
/// modes, owners and symlinks (never following them); other special files
/// are skipped, /root has none that matter.
fn copy_tree(from: &Path, to: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("listing {}", from.display()))(e)),
    };
    for e in entries {
        let e = e.map_err(io(format!("listing {}", from.display())))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let md =
            std::fs::symlink_metadata(&src).map_err(io(format!("reading {}", src.display())))?;
        let ft = md.file_type();
        let what = || format!("copying {} to {}", src.display(), dst.display());
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io(what()))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io(what()))?;
        } else if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(io(what()))?;
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(io(what()))?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(md.uid()), Some(md.gid())).map_err(io(what()))?;
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
                .map_err(io(what()))?;
        }
    }
    let md = std::fs::metadata(from).map_err(io(format!("reading {}", from.display())))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io(format!("setting the mode of {}", to.display())))
}

fn mount_ext4(dev: &str, dir: &Path, flags: MsFlags) -> Result<(), InitError> {
    mount(Some(dev), dir, Some("ext4"), flags, None::<&str>)
        .map_err(sys(format!("mounting {dev} on {}", dir.display())))
}

/// Mount options of the VM's own disks. They are made with lazily
/// initialised inode tables (a sparse file stays small); `noinit_itable`
/// keeps the kernel from zeroing those tables in the background at every
/// boot, which under emulation competes with the boot for the CPU.
const VM_DISK_OPTIONS: &str = "noinit_itable";

fn mount_ext4_data(dev: &str, dir: &Path, flags: MsFlags, data: &str) -> Result<(), InitError> {
    mount(Some(dev), dir, Some("ext4"), flags, Some(data))
        .map_err(sys(format!("mounting {dev} on {} ({data})", dir.display())))
}

/// Loads overlayfs when the kernel does not have it yet (the image's
/// initramfs usually loaded it already).
fn ensure_overlayfs() -> Result<(), InitError> {
    let has = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|t| t.lines().any(|l| l.trim_end().ends_with("\toverlay")))
            .unwrap_or(false)
    };
    if has() {
        return Ok(());
    }
    let out = std::process::Command::new("modprobe")
        .arg("overlay")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output();
    match out {
        Ok(o) if o.status.success() && has() => Ok(()),
        Ok(o) => Err(InitError::NoOverlay(
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        )),
        Err(e) => Err(InitError::NoOverlay(e.to_string())),
    }
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
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 \
                       virtio_mmio.force_legacy virtio_blk.queue_depth=64 vsock.x=1 root=/dev/vda";
        assert_eq!(
            module_params(cmdline, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(cmdline, "virtio_blk"), "queue_depth=64");
        assert_eq!(module_params(cmdline, "overlay"), "");
    }

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

    #[test]
    fn deleting_the_initramfs_keeps_the_new_root_and_other_file_systems() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path();
        for d in ["newroot/etc", "banger/modules", "dev"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("init"), "agent").expect("w");
        std::fs::write(root.join("banger/modules/a.ko"), "m").expect("w");
        std::fs::write(root.join("newroot/etc/os-release"), "ID=x").expect("w");
        let dev = std::fs::metadata(root).expect("md").dev();
        delete_tree(root, dev, &root.join("newroot"));
        let left: Vec<_> = std::fs::read_dir(root)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["newroot"]);
        assert!(root.join("newroot/etc/os-release").is_file());
    }
}
