//! The real system calls of a restore that the test machine can run
//! without harm: a NIC configured in a network namespace made here, and an
//! ext4 file system on a loop device grown while mounted. (Entropy, clock
//! and host name are the machine's own: those run in guests only.)
//! These tests need root, as the agent has in a guest.

use banger_agent::IdentitySys;
use banger_agent::SystemIdentity;
use banger_agent::netconf::apply_net;
use banger_agent_proto::GuestNetConfig;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests configure a NIC and mount a file system: they need root"
    );
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        let name = format!("bgt-agent-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        Self(name)
    }

    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.0).args(args))
    }

    /// Runs `f` on a thread inside the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: plain setns(2) on an open namespace file, for
                // this thread only.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn apply_net_gives_the_nic_its_mac_address_and_route() {
    require_root();
    let ns = NetNs::new();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["link", "set", "peer0", "up"]);
    // Up with another MAC first, as a template's NIC could be.
    ns.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:01", "up"]);
    let net = GuestNetConfig {
        device: "eth0".into(),
        mac: [0x02, 0xba, 0x0a, 0x1e, 0x00, 0x07],
        addr: Ipv4Addr::new(172, 30, 0, 7),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(172, 30, 0, 1)),
        dns: vec![],
    };
    ns.enter(|| apply_net(&net)).expect("apply_net");
    let link = ns.ip(&["-o", "link", "show", "eth0"]);
    assert!(link.contains("link/ether 02:ba:0a:1e:00:07"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addr = ns.ip(&["-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains("inet 172.30.0.7/24"), "{addr}");
    let route = ns.ip(&["-4", "route", "show", "default"]);
    assert!(route.contains("default via 172.30.0.1 dev eth0"), "{route}");
    // Again (a retried restore): same result, no error.
    ns.enter(|| apply_net(&net)).expect("apply_net again");
}

/// Whether this process may resize file systems (CAP_SYS_RESOURCE, bit 24
/// of the effective set).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff");
    eff & (1 << 24) != 0
}

/// A loop device with an ext4 file system mounted, undone on drop.
struct LoopFs {
    _dir: tempfile::TempDir,
    image: PathBuf,
    dev: String,
    mount: PathBuf,
}

impl LoopFs {
    fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.ext4");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(bytes))
            .expect("image");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&image));
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image))
        .trim()
        .to_string();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mkdir");
        let fs = Self {
            _dir: dir,
            image,
            dev,
            mount,
        };
        run(Command::new("mount")
            .args(["-t", "ext4", &fs.dev])
            .arg(&fs.mount));
        fs
    }

    fn mount(&self) -> &str {
        self.mount.to_str().expect("utf-8 path")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_mounted_ext4_grows_to_its_grown_device() {
    require_root();
    let fs = LoopFs::new(64 << 20);
    let sys = SystemIdentity;
    let before = sys.fs_size(fs.mount()).expect("size");
    assert_eq!(before.block_size, 4096);
    assert_eq!(before.blocks, (64 << 20) / 4096);
    assert_eq!(before.device_bytes, 64 << 20);
    assert_eq!(before.grown_blocks(), None, "nothing to grow yet");

    // The host grows the disk; the guest's device shows the new size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fs.image)
        .and_then(|f| f.set_len(128 << 20))
        .expect("grow the image");
    run(Command::new("losetup").args(["-c", &fs.dev]));
    let grown = sys.fs_size(fs.mount()).expect("size");
    assert_eq!(grown.device_bytes, 128 << 20);
    let blocks = grown.grown_blocks().expect("room to grow");
    assert_eq!(blocks, (128 << 20) / 4096);

    if !has_cap_sys_resource() {
        // Some sandboxes drop CAP_SYS_RESOURCE even for root (a guest's
        // agent has it). ext4 checks it first thing in the resize ioctl: an
        // EPERM (not ENOTTY) still shows the request reached ext4's resize.
        let err = sys
            .resize_fs(fs.mount(), blocks)
            .expect_err("no capability");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        eprintln!("no CAP_SYS_RESOURCE here: the resize itself was not exercised");
        return;
    }
    sys.resize_fs(fs.mount(), blocks).expect("resize");
    let after = sys.fs_size(fs.mount()).expect("size");
    assert_eq!(after.blocks, blocks);
    assert_eq!(after.grown_blocks(), None);
    let st = nix::sys::statvfs::statvfs(Path::new(fs.mount())).expect("statvfs");
    assert!(
        st.blocks() * st.fragment_size() > 100 << 20,
        "the mounted file system sees its new size: {} blocks of {}",
        st.blocks(),
        st.fragment_size()
    );
}
