//! [`IdentitySys`] on the real guest: ioctls, `/proc`, `systemctl`.

use super::{FsSize, IdentitySys, SshdProcess};
use banger_agent_proto::GuestNetConfig;
use banger_agent_proto::boot::OVERLAY_PARAM;
use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `_IOW('R', 0x03, int[2])`, linux/random.h.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`, linux/random.h.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
/// `_IOR(0x12, 114, size_t)`, linux/fs.h.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
/// `_IOW('f', 16, __u64)`, fs/ext4/ext4.h.
const EXT4_IOC_RESIZE_FS: libc::Ioctl = 0x4008_6610;

/// ACPI ids of VM generation id devices (generic, QEMU's, Firecracker's).
const VMGENID_IDS: &[&str] = &["VMGENID", "QEMUVGID", "FCVMGID"];
const ACPI_DEVICES: &str = "/sys/bus/acpi/devices";

/// The agent may start with no PATH at all (as early init's child).
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a stopped sshd gets to exit after SIGTERM (then SIGKILL).
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Where a file system with no mount point of its own (the overlay's
/// upper disk) is mounted for a moment to be grown.
const GROW_MOUNT: &str = "/run/banger-agent-grow";

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemIdentity;

impl IdentitySys for SystemIdentity {
    fn add_entropy(&self, request: &[u8]) -> std::io::Result<()> {
        let f = File::open("/dev/urandom")?;
        // SAFETY: `request` is a complete rand_pool_info (header and the
        // bytes it announces) and outlives the call.
        check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, request.as_ptr()) })
    }

    fn reseed_crng(&self) -> std::io::Result<()> {
        let f = File::open("/dev/urandom")?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG, 0) })
    }

    fn vmgenid(&self) -> bool {
        std::fs::read_dir(ACPI_DEVICES).is_ok_and(|d| {
            d.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                VMGENID_IDS.iter().any(|id| name.starts_with(id))
            })
        })
    }

    fn realtime(&self) -> (i64, u32) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        (ts.tv_sec, u32::try_from(ts.tv_nsec).unwrap_or(0))
    }

    fn set_realtime(&self, t: (i64, u32)) -> std::io::Result<()> {
        let ts = libc::timespec {
            tv_sec: t.0,
            tv_nsec: libc::c_long::from(t.1),
        };
        // SAFETY: `ts` is a valid timespec (nanoseconds checked < 1e9 by
        // RestoreIdentity::validate).
        check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
    }

    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        nix::unistd::sethostname(name).map_err(Error::from)
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn replace_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no parent directory"))?;
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no file name"))?;
        let tmp = dir.join(format!(".{}.banger-new", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        let written = f
            .write_all(data)
            .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn overwrite_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        f.write_all(data)
    }

    fn remove_files(&self, dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut removed = Vec::new();
        for e in entries {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(prefix) {
                std::fs::remove_file(e.path())?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    fn sync(&self) {
        nix::unistd::sync();
    }

    fn apply_net(&self, net: &GuestNetConfig) -> std::io::Result<()> {
        crate::netconf::apply_net(net)
    }

    fn fs_size(&self, mount: &str) -> std::io::Result<FsSize> {
        let (dev, _) = backing_device(mount)?;
        let f = File::open(&dev)?;
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given.
        check(unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut bytes as *mut u64) })?;
        let mut sb = [0u8; 1024];
        f.read_exact_at(&mut sb, 1024)?;
        let (blocks, block_size) = ext4_size(&sb).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidData,
                format!("{} holds no ext4 file system", dev.display()),
            )
        })?;
        Ok(FsSize {
            blocks,
            block_size,
            device_bytes: bytes,
        })
    }

    fn resize_fs(&self, mount: &str, blocks: u64) -> std::io::Result<()> {
        let (dev, mounted_here) = backing_device(mount)?;
        if mounted_here {
            return resize_at(Path::new(mount), blocks);
        }
        // The overlay's upper disk is mounted nowhere the agent can reach
        // (its staging mount went with the old root): mount the same file
        // system once more, for the ioctl.
        let dir = Path::new(GROW_MOUNT);
        std::fs::create_dir_all(dir)?;
        nix::mount::mount(
            Some(&dev),
            dir,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::other(format!("mounting {} again: {e}", dev.display())))?;
        let resized = resize_at(dir, blocks);
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(dir);
        resized
    }

    fn systemd(&self) -> bool {
        Path::new("/run/systemd/system").is_dir()
    }

    fn unit_active(&self, unit: &str) -> bool {
        Command::new("systemctl")
            .args(["is-active", "--quiet", unit])
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn systemctl(&self, args: &[&str]) -> std::io::Result<()> {
        let out = Command::new("systemctl")
            .args(args)
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(Error::other(format!(
            "systemctl {}: {}: {}",
            args.join(" "),
            out.status,
            err.trim()
        )))
    }

    fn sshd_processes(&self) -> Vec<SshdProcess> {
        let proc = Path::new("/proc");
        let Ok(listeners) = crate::listeners::list(proc) else {
            return Vec::new();
        };
        let mut found: Vec<SshdProcess> = Vec::new();
        for pid in listeners.iter().filter_map(|l| l.pid) {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            if found.iter().any(|p| p.pid == pid) {
                continue;
            }
            let Ok(raw) = std::fs::read(proc.join(pid.to_string()).join("cmdline")) else {
                continue;
            };
            let cmdline: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if let Some(argv) = sshd_argv(&cmdline) {
                found.push(SshdProcess { pid, argv });
            }
        }
        found
    }

    fn terminate(&self, pid: i32) -> std::io::Result<()> {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(pid);
        for (sig, grace) in [
            (Signal::SIGTERM, TERM_GRACE),
            (Signal::SIGKILL, Duration::from_secs(1)),
        ] {
            match kill(pid, sig) {
                Ok(()) => {}
                Err(nix::errno::Errno::ESRCH) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let started = Instant::now();
            while started.elapsed() < grace {
                if !alive(pid.as_raw()) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(Error::other("still running after SIGKILL"))
    }

    fn spawn(&self, argv: &[String]) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "empty argv"))?;
        let mut child = Command::new(prog)
            .args(args)
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        // A daemonizing sshd exits at once, one run with -D stays: either
        // way it is reaped.
        std::thread::Builder::new()
            .name("sshd-reaper".into())
            .spawn(move || {
                let _ = child.wait();
            })?;
        Ok(())
    }
}

/// The argv that starts a listening sshd again, from its `/proc` command
/// line: the plain argv, or (OpenSSH 9.8 and later retitle the listener)
/// what follows `sshd: ` up to ` [listener]`. `None` when it is no sshd.
pub fn sshd_argv(cmdline: &[String]) -> Option<Vec<String>> {
    let first = cmdline.first()?;
    let is_sshd = |p: &str| Path::new(p).file_name().is_some_and(|n| n == "sshd");
    if let Some(rest) = first.strip_prefix("sshd: ") {
        let cmd = rest.split(" [listener]").next().unwrap_or(rest);
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        return argv.first().is_some_and(|a| is_sshd(a)).then_some(argv);
    }
    is_sshd(first).then(|| cmdline.to_vec())
}

/// Blocks and block size of an ext4 superblock (the 1024 bytes at offset 1024).
pub fn ext4_size(sb: &[u8]) -> Option<(u64, u64)> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(sb.get(o..o + 4)?.try_into().ok()?)) };
    let magic = u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?);
    if magic != 0xef53 {
        return None;
    }
    let log = u32_at(0x18)?;
    if log > 6 {
        return None;
    }
    let block_size = 1024u64 << log;
    let incompat = u32_at(0x60)?;
    let hi = if incompat & 0x80 != 0 {
        u64::from(u32_at(0x150)?)
    } else {
        0
    };
    Some(((hi << 32) | u64::from(u32_at(0x04)?), block_size))
}

/// The block device under `mount` and whether it is mounted right there
/// (an ext4 mount), or only under the overlay at `/` (banger's upper disk,
/// named by [`OVERLAY_PARAM`] on the kernel command line).
fn backing_device(mount: &str) -> std::io::Result<(PathBuf, bool)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let (fstype, source) = mount_entry(&info, mount).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("nothing is mounted at {mount}"),
        )
    })?;
    match fstype.as_str() {
        "ext4" if source.starts_with("/dev/") => Ok((PathBuf::from(source), true)),
        "overlay" if mount == "/" => {
            let cmdline = std::fs::read_to_string("/proc/cmdline")?;
            let dev = kernel_param(&cmdline, OVERLAY_PARAM).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("the root overlay's disk is not on the kernel command line ({OVERLAY_PARAM}=)"),
                )
            })?;
            Ok((PathBuf::from(dev), false))
        }
        _ => Err(Error::new(
            ErrorKind::Unsupported,
            format!("{mount} is {fstype} from {source}: only ext4 disks are grown"),
        )),
    }
}

/// The file system type and source of the last mount at `mount` in a
/// `/proc/self/mountinfo` text (the one visible there).
pub fn mount_entry(mountinfo: &str, mount: &str) -> Option<(String, String)> {
    mountinfo.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if left.split(' ').nth(4)? != mount {
            return None;
        }
        let mut r = right.split(' ');
        Some((r.next()?.to_string(), r.next()?.to_string()))
    })
}

/// The value of `name=` on a kernel command line (the last one wins).
fn kernel_param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .rfind(|v| !v.is_empty())
}

fn resize_at(dir: &Path, blocks: u64) -> std::io::Result<()> {
    let f = File::open(dir)?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 from the pointer given.
    check(unsafe { libc::ioctl(f.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) })
}

/// A process that still runs (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn sshd_argv_from_plain_and_retitled_command_lines() {
        assert_eq!(
            sshd_argv(&words("/usr/sbin/sshd -D -e")),
            Some(words("/usr/sbin/sshd -D -e"))
        );
        assert_eq!(
            sshd_argv(&["sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups".into()]),
            Some(words("/usr/sbin/sshd -D"))
        );
        assert_eq!(sshd_argv(&["sshd: root@pts/0".into()]), None);
        assert_eq!(sshd_argv(&words("/usr/bin/python3 -m http.server")), None);
        assert_eq!(sshd_argv(&[]), None);
    }

    #[test]
    fn ext4_superblock_sizes() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&262_144u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some((262_144, 4096)));
        // 64-bit: the high word counts.
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some(((1 << 32) + 262_144, 4096)));
        sb[0x38] = 0;
        assert_eq!(ext4_size(&sb), None);
        assert_eq!(ext4_size(&[0; 10]), None);
    }

    #[test]
    fn mount_entries_and_kernel_params() {
        let info = "\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/x,upperdir=/y/upper
25 22 254:32 / /root rw,relatime - ext4 /dev/vdc rw
30 22 254:32 / /root rw,relatime - ext4 /dev/vdd rw
";
        assert_eq!(
            mount_entry(info, "/"),
            Some(("overlay".into(), "overlay".into()))
        );
        assert_eq!(
            mount_entry(info, "/root"),
            Some(("ext4".into(), "/dev/vdd".into()))
        );
        assert_eq!(mount_entry(info, "/srv"), None);
        let cmdline = "console=ttyS0 banger.overlay=/dev/vdb banger.overlayx=1 root=/dev/vda";
        assert_eq!(kernel_param(cmdline, OVERLAY_PARAM), Some("/dev/vdb"));
        assert_eq!(kernel_param("ro", OVERLAY_PARAM), None);
    }

    #[test]
    fn replace_file_sets_mode_and_replaces_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "old").expect("write");
        let link = dir.path().join("sub/resolv.conf");
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        SystemIdentity
            .replace_file(&link, b"nameserver 1.1.1.1\n", 0o600)
            .expect("replace");
        let md = std::fs::symlink_metadata(&link).expect("stat");
        assert!(md.is_file());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "old");
        // Missing parents are made private.
        let deep = dir.path().join("a/.ssh/authorized_keys");
        SystemIdentity
            .replace_file(&deep, b"k\n", 0o600)
            .expect("replace");
        let parent = std::fs::metadata(dir.path().join("a/.ssh")).expect("stat");
        assert_eq!(parent.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn remove_files_by_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ssh_host_rsa_key", "ssh_host_rsa_key.pub", "sshd_config"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let mut removed = SystemIdentity
            .remove_files(dir.path(), "ssh_host_")
            .expect("remove");
        removed.sort();
        assert_eq!(removed.len(), 2);
        assert!(dir.path().join("sshd_config").exists());
        assert!(
            SystemIdentity
                .remove_files(&dir.path().join("missing"), "x")
                .expect("missing dir")
                .is_empty()
        );
    }
}
