//! The real build: mmdebstrap from the Debian mirror, customisation, kernel,
//! mkfs; then the same build again, which must find the image and do nothing.

mod common;

use banger_image::{
    BASE_PACKAGES, Manifest, Progress, build_debian, debian_image_exists, kernel_name, mounts_under,
};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `debugfs -R <request> <image>` output.
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value after `key` in debugfs `stat` output, e.g. `Mode:` -> `0755`.
fn stat_field<'a>(stat: &'a str, key: &str) -> &'a str {
    let at = stat
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {stat}"));
    stat[at + key.len()..]
        .split_whitespace()
        .next()
        .expect("value")
}

/// The initrd's main archive, decompressed (after any uncompressed early
/// cpio archive, e.g. microcode).
fn initrd_archive(initrd: &Path) -> Vec<u8> {
    let data = std::fs::read(initrd).expect("read initrd");
    let mut start = 0;
    if data.starts_with(b"070701") {
        let trailer = data
            .windows(10)
            .rposition(|w| w == b"TRAILER!!!")
            .expect("early cpio trailer");
        start = trailer + 10;
        while data.get(start) == Some(&0) {
            start += 1;
        }
    }
    let rest = &data[start..];
    let tool: &[&str] = match rest {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        _ if rest.starts_with(b"070701") => return rest.to_vec(),
        _ => panic!(
            "unknown initrd compression: {:02x?}",
            &rest[..rest.len().min(8)]
        ),
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("decompressor");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = rest.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("decompress");
    writer.join().expect("writer").expect("feed decompressor");
    assert!(out.status.success(), "{} failed", tool[0]);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_the_debian_image_then_finds_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let spec = common::spec(t.path(), "debian-test");
    let phases = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::new(Mutex::new(0usize));
    let (p2, l2) = (phases.clone(), lines.clone());
    let started = Instant::now();
    let built = build_debian(
        &spec,
        move |p| match p {
            Progress::Phase { name, .. } => p2.lock().expect("lock").push(name),
            Progress::Line(_) => *l2.lock().expect("lock") += 1,
        },
        CancellationToken::new(),
    )
    .await
    .expect("build");
    eprintln!("built in {:?}: {built:?}", started.elapsed());
    assert!(!built.already_existed);
    assert_eq!(
        *phases.lock().expect("lock"),
        [
            "packages",
            "customize",
            "mise",
            "initramfs",
            "kernel",
            "work-seed",
            "mkfs",
            "done"
        ]
    );
    assert!(
        *lines.lock().expect("lock") > 100,
        "mmdebstrap --verbose output should reach the log"
    );

    let m = Manifest::read(&built.dir).expect("manifest");
    // Only the image (and the build lock) is left; nothing mounted, no process inside.
    assert_eq!(
        common::names_in(&spec.images_dir),
        [".build.lock", "debian-test"]
    );
    assert_eq!(
        common::names_in(&built.dir),
        ["manifest.json", "rootfs.ext4", "work-seed.ext4"]
    );
    // The work seed is /root of the image, private to root.
    assert_eq!(built.work_seed, built.dir.join("work-seed.ext4"));
    assert_eq!(m.work_seed.as_deref(), Some("work-seed.ext4"));
    let stat = Command::new("debugfs")
        .args(["-R", "stat /"])
        .arg(&built.work_seed)
        .output()
        .expect("debugfs");
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(
        stat.contains("Mode:  0700") && stat.contains("User:     0"),
        "{stat}"
    );
    let ls = Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&built.work_seed)
        .output()
        .expect("debugfs");
    assert!(String::from_utf8_lossy(&ls.stdout).contains(".bashrc"));
    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );
    assert!(
        common::processes_inside(t.path()).is_empty(),
        "{:?}",
        common::processes_inside(t.path())
    );

    // The manifest.
    assert_eq!(
        (m.name.as_str(), m.suite.as_str()),
        ("debian-test", "bookworm")
    );
    assert!(
        m.kernel_release.starts_with("6.") && m.kernel_release.ends_with("-cloud-amd64"),
        "{}",
        m.kernel_release
    );
    assert_eq!(m.kernel_name, kernel_name("bookworm", &m.kernel_release));
    assert_eq!(
        (built.kernel_name.as_str(), built.kernel_release.as_str()),
        (m.kernel_name.as_str(), m.kernel_release.as_str())
    );
    assert_eq!(
        m.rootfs_bytes,
        std::fs::metadata(&built.rootfs).expect("rootfs").len()
    );
    assert_eq!(m.rootfs_bytes, built.size_bytes);
    assert_eq!(m.rootfs_bytes, banger_ext4::rootfs_size(m.tree_bytes));
    assert!(
        m.tree_bytes > 200 << 20,
        "a Debian tree with a kernel is a few hundred MiB, got {}",
        m.tree_bytes
    );
    for p in BASE_PACKAGES {
        assert!(
            m.packages.iter().any(|q| q == p),
            "{p} missing from {:?}",
            m.packages
        );
    }
    let true_sha = Command::new("sha256sum")
        .arg("/bin/true")
        .output()
        .expect("sha256sum");
    assert!(String::from_utf8_lossy(&true_sha.stdout).starts_with(&m.agent_sha256));

    // The kernel: a bzImage, and an initrd that can mount /dev/vda.
    assert_eq!(
        built.kernel,
        spec.kernels_dir.join(&m.kernel_name).join("vmlinuz")
    );
    let kernel = std::fs::read(&built.kernel).expect("kernel");
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "not a bzImage");
    let archive = initrd_archive(&built.initrd);
    for module in [
        "virtio_blk.ko",
        "virtio_mmio.ko",
        "virtio_console.ko",
        "vmw_vsock_virtio_transport.ko",
    ] {
        assert!(
            archive
                .windows(module.len())
                .any(|w| w == module.as_bytes()),
            "initrd lacks {module}"
        );
    }

    // The file system: consistent, and customised.
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&built.rootfs)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let agent = debugfs(&built.rootfs, "stat /usr/local/bin/banger-agent");
    assert_eq!(stat_field(&agent, "Type:"), "regular");
    assert_eq!(stat_field(&agent, "Mode:"), "0755");
    assert_eq!(
        (stat_field(&agent, "User:"), stat_field(&agent, "Group:")),
        ("0", "0")
    );
    let link = debugfs(
        &built.rootfs,
        "stat /etc/systemd/system/sysinit.target.wants/banger-agent.service",
    );
    assert_eq!(stat_field(&link, "Type:"), "symlink");
    assert!(link.contains("\"../banger-agent.service\""), "{link}");
    assert_eq!(
        debugfs(
            &built.rootfs,
            "cat /etc/systemd/system/banger-agent.service"
        ),
        common::UNIT
    );
    assert_eq!(
        debugfs(&built.rootfs, "cat /etc/modules-load.d/banger.conf"),
        common::MODULES
    );
    assert_eq!(debugfs(&built.rootfs, "cat /etc/hostname"), "banger\n");
    assert_eq!(debugfs(&built.rootfs, "cat /etc/machine-id"), "");
    assert!(
        debugfs(&built.rootfs, "cat /etc/ssh/sshd_config.d/banger.conf")
            .contains("PasswordAuthentication no")
    );
    let ssh = debugfs(&built.rootfs, "ls /etc/ssh");
    assert!(
        ssh.contains("sshd_config") && !ssh.contains("ssh_host_"),
        "{ssh}"
    );
    for dir in ["/root", "/root/.ssh"] {
        assert_eq!(
            stat_field(&debugfs(&built.rootfs, &format!("stat {dir}")), "Mode:"),
            "0700",
            "{dir}"
        );
    }
    // The seed's golden image: Docker enabled, its data on the /root disk,
    // and mise from the pinned tarball, activated for root's bash.
    assert!(debugfs(&built.rootfs, "stat /usr/sbin/dockerd").contains("Type: regular"));
    for unit in ["docker.service", "containerd.service"] {
        let wants = debugfs(
            &built.rootfs,
            &format!("stat /etc/systemd/system/multi-user.target.wants/{unit}"),
        );
        assert_eq!(stat_field(&wants, "Type:"), "symlink", "{unit}: {wants}");
    }
    assert_eq!(
        debugfs(&built.rootfs, "cat /etc/docker/daemon.json"),
        banger_image::DOCKER_DAEMON_JSON
    );
    let mise = debugfs(&built.rootfs, "stat /usr/local/bin/mise");
    assert_eq!(stat_field(&mise, "Mode:"), "0755");
    assert_eq!(
        debugfs(&built.rootfs, "cat /etc/profile.d/mise.sh"),
        banger_image::mise::MISE_PROFILE
    );
    let seed_bashrc = Command::new("debugfs")
        .args(["-R", "cat /.bashrc"])
        .arg(&built.work_seed)
        .output()
        .expect("debugfs");
    assert!(
        String::from_utf8_lossy(&seed_bashrc.stdout)
            .lines()
            .any(|l| l == banger_image::mise::MISE_BASHRC_LINE),
        "root's .bashrc does not activate mise"
    );
    let timer = debugfs(&built.rootfs, "stat /etc/systemd/system/apt-daily.timer");
    assert!(
        timer.contains("\"/dev/null\""),
        "apt-daily.timer should be masked: {timer}"
    );
    // /proc, /sys and /dev/pts were unmounted before mkfs: empty directories.
    for dir in ["/proc", "/sys", "/dev/pts"] {
        let entries = debugfs(&built.rootfs, &format!("ls -p {dir}"));
        let names: Vec<&str> = entries
            .lines()
            .filter_map(|l| l.split('/').nth(5))
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names, [".", ".."], "{dir} should be empty in the image");
    }

    // Building again finds the image and does nothing.
    let phases2 = Arc::new(Mutex::new(Vec::new()));
    let p3 = phases2.clone();
    let started = Instant::now();
    let again = build_debian(
        &spec,
        move |p| p3.lock().expect("lock").push(p),
        CancellationToken::new(),
    )
    .await
    .expect("again");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(again.already_existed);
    assert!(phases2.lock().expect("lock").is_empty());
    assert_eq!(BuiltImageView::from(&again), BuiltImageView::from(&built));
    assert_eq!(
        debian_image_exists(&spec.images_dir, &spec.kernels_dir, "debian-test"),
        Some(again)
    );
}

/// A built image without its `already_existed` flag.
#[derive(Debug, PartialEq)]
struct BuiltImageView {
    rootfs: std::path::PathBuf,
    size_bytes: u64,
    kernel: std::path::PathBuf,
    initrd: std::path::PathBuf,
    release: String,
}

impl From<&banger_image::BuiltImage> for BuiltImageView {
    fn from(b: &banger_image::BuiltImage) -> Self {
        BuiltImageView {
            rootfs: b.rootfs.clone(),
            size_bytes: b.size_bytes,
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            release: b.kernel_release.clone(),
        }
    }
}
