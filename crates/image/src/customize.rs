//! Prepares an unpacked Debian tree for banger. Pure file operations on the
//! tree, so it is unit-tested on a fake tree.

use crate::ImageError;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// Where the agent binary lives in every image.
pub const AGENT_INSTALL_PATH: &str = "usr/local/bin/banger-agent";

/// `banger-agent.service`. It starts with the earliest units (no default
/// dependencies, pulled in by sysinit.target) so the host learns the guest
/// is up seconds before the rest of the boot finishes; the agent loads the
/// virtio console module itself rather than waiting for udev.
pub const AGENT_UNIT: &str = "\
[Unit]
Description=banger guest agent
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
";

/// Modules the agent's transports need; the Debian cloud kernel builds them
/// as modules and its initramfs does not load them.
pub const AGENT_MODULES_CONF: &str = "virtio_console\nvsock\nvmw_vsock_virtio_transport\n";

/// sshd hardening (newest seed): keys only, root by key only.
pub const SSHD_CONFIG: &str = "\
# Installed by banger. Guests are single-user sandboxes reached by key only.
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /root/.ssh/authorized_keys
";

/// Images are built once and booted many times: each VM makes its own ssh
/// host keys at first boot instead of sharing the image's.
pub const SSH_HOSTKEYS_DROPIN: &str = "\
[Service]
ExecStartPre=/usr/bin/ssh-keygen -A
";

/// Timers that only cost a sandbox boot time and I/O.
const DISABLED_UNITS: &[&str] = &[
    "timers.target.wants/apt-daily.timer",
    "timers.target.wants/apt-daily-upgrade.timer",
    "timers.target.wants/e2scrub_all.timer",
    "timers.target.wants/fstrim.timer",
    "timers.target.wants/man-db.timer",
    "multi-user.target.wants/e2scrub_reap.service",
];

/// Inputs of [`customize`].
pub struct Customization<'a> {
    pub agent_binary: &'a Path,
    pub agent_unit: &'a str,
    pub modules_conf: &'a str,
}

fn io(ctx: String) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(ctx)
}

fn write(root: &Path, rel: &str, content: &str, mode: u32) -> Result<(), ImageError> {
    let p = root.join(rel);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // Replace symlinks (e.g. /etc/hostname) rather than writing through them.
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, content).map_err(io(format!("writing {}", p.display())))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", p.display())))
}

/// The `WantedBy=` targets of a unit's `[Install]` section.
pub fn wanted_by(unit: &str) -> Vec<String> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
        } else if let Some(v) = line.strip_prefix("WantedBy=").filter(|_| in_install) {
            out.extend(v.split_whitespace().map(String::from));
        }
    }
    out
}

/// Applies banger's changes to the tree at `root`.
pub fn customize(root: &Path, c: &Customization<'_>) -> Result<(), ImageError> {
    write(root, "etc/hostname", "banger\n", 0o644)?;
    write(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 banger\n::1 localhost ip6-localhost ip6-loopback\n", 0o644)?;
    // Empty machine-id: systemd makes a fresh one on each VM's first boot.
    write(root, "etc/machine-id", "", 0o444)?;
    let _ = std::fs::remove_file(root.join("var/lib/dbus/machine-id"));
    write(root, "etc/fstab", "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n", 0o644)?;

    // The agent, its unit (enabled) and its modules.
    let agent_dst = root.join(AGENT_INSTALL_PATH);
    if let Some(dir) = agent_dst.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    std::fs::copy(c.agent_binary, &agent_dst).map_err(io(format!("copying {}", c.agent_binary.display())))?;
    std::fs::set_permissions(&agent_dst, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("chmod {}", agent_dst.display())))?;
    write(root, "etc/systemd/system/banger-agent.service", c.agent_unit, 0o644)?;
    for target in wanted_by(c.agent_unit) {
        let dir = root.join("etc/systemd/system").join(format!("{target}.wants"));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let link = dir.join("banger-agent.service");
        let _ = std::fs::remove_file(&link);
        symlink("/etc/systemd/system/banger-agent.service", &link).map_err(io(format!("linking {}", link.display())))?;
    }
    write(root, "etc/modules-load.d/banger.conf", c.modules_conf, 0o644)?;

    // sshd: hardened, per-VM host keys.
    write(root, "etc/ssh/sshd_config.d/banger.conf", SSHD_CONFIG, 0o644)?;
    write(root, "etc/systemd/system/ssh.service.d/banger-hostkeys.conf", SSH_HOSTKEYS_DROPIN, 0o644)?;
    if let Ok(rd) = std::fs::read_dir(root.join("etc/ssh")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                std::fs::remove_file(e.path()).map_err(io(format!("removing {}", e.path().display())))?;
            }
        }
    }
    for (dir, mode) in [("root", 0o700), ("root/.ssh", 0o700)] {
        let p = root.join(dir);
        std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", p.display())))?;
    }

    for unit in DISABLED_UNITS {
        let _ = std::fs::remove_file(root.join("etc/systemd/system").join(unit));
    }
    Ok(())
}

/// The kernel and initrd of the tree: `(release, vmlinuz, initrd)`.
pub fn find_kernel(root: &Path) -> Result<(String, PathBuf, PathBuf), ImageError> {
    let boot = root.join("boot");
    let mut releases: Vec<String> = std::fs::read_dir(&boot)
        .map_err(|_| ImageError::NoKernel)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(String::from))
        .filter(|r| boot.join(format!("initrd.img-{r}")).is_file())
        .collect();
    releases.sort();
    let release = releases.pop().ok_or(ImageError::NoKernel)?;
    Ok((release.clone(), boot.join(format!("vmlinuz-{release}")), boot.join(format!("initrd.img-{release}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn fake_tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        for d in ["boot", "etc/ssh", "etc/systemd/system/timers.target.wants", "root"] {
            std::fs::create_dir_all(root.join(d)).expect("dir");
        }
        std::fs::write(root.join("boot/vmlinuz-6.1.0-9-cloud-amd64"), "k").expect("k");
        std::fs::write(root.join("boot/initrd.img-6.1.0-9-cloud-amd64"), "i").expect("i");
        std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "secret").expect("key");
        std::fs::write(root.join("etc/ssh/sshd_config"), "stock").expect("cfg");
        std::fs::write(root.join("etc/systemd/system/timers.target.wants/apt-daily.timer"), "").expect("t");
        let agent = t.path().join("agent");
        std::fs::write(&agent, "#!agent").expect("agent");
        (t, root)
    }

    #[test]
    fn wanted_by_reads_only_the_install_section() {
        assert_eq!(wanted_by(AGENT_UNIT), ["sysinit.target"]);
        assert_eq!(wanted_by("[Unit]\nWantedBy=x\n[Install]\nWantedBy=a.target b.target\n"), ["a.target", "b.target"]);
        assert!(wanted_by("[Service]\nExecStart=/x\n").is_empty());
    }

    #[test]
    fn customize_writes_exactly_what_banger_needs() {
        let (t, root) = fake_tree();
        let agent = t.path().join("agent");
        customize(&root, &Customization { agent_binary: &agent, agent_unit: AGENT_UNIT, modules_conf: AGENT_MODULES_CONF })
            .expect("customize");
        let md = std::fs::metadata(root.join(AGENT_INSTALL_PATH)).expect("agent installed");
        assert_eq!(md.mode() & 0o7777, 0o755);
        let link = std::fs::read_link(root.join("etc/systemd/system/sysinit.target.wants/banger-agent.service")).expect("enabled");
        assert_eq!(link, Path::new("/etc/systemd/system/banger-agent.service"));
        assert_eq!(std::fs::read_to_string(root.join("etc/machine-id")).expect("mid"), "");
        assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists(), "shared host key must go");
        assert_eq!(std::fs::read_to_string(root.join("etc/ssh/sshd_config")).expect("cfg"), "stock");
        let sshd = std::fs::read_to_string(root.join("etc/ssh/sshd_config.d/banger.conf")).expect("sshd");
        assert!(sshd.contains("PermitRootLogin prohibit-password") && sshd.contains("PasswordAuthentication no"));
        assert_eq!(std::fs::metadata(root.join("root")).expect("root").mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(root.join("root/.ssh")).expect("ssh").mode() & 0o777, 0o700);
        assert!(!root.join("etc/systemd/system/timers.target.wants/apt-daily.timer").exists());
        assert_eq!(std::fs::read_to_string(root.join("etc/modules-load.d/banger.conf")).expect("m"), AGENT_MODULES_CONF);
        // Running it twice is harmless.
        customize(&root, &Customization { agent_binary: &agent, agent_unit: AGENT_UNIT, modules_conf: AGENT_MODULES_CONF })
            .expect("again");
    }

    #[test]
    fn finds_the_newest_kernel_with_an_initrd() {
        let (_t, root) = fake_tree();
        std::fs::write(root.join("boot/vmlinuz-6.1.0-10-cloud-amd64"), "k2").expect("k2"); // no initrd
        let (rel, k, i) = find_kernel(&root).expect("kernel");
        assert_eq!(rel, "6.1.0-9-cloud-amd64");
        assert!(k.ends_with("vmlinuz-6.1.0-9-cloud-amd64") && i.ends_with("initrd.img-6.1.0-9-cloud-amd64"));
        std::fs::remove_dir_all(root.join("boot")).expect("rm");
        assert!(matches!(find_kernel(&root), Err(ImageError::NoKernel)));
    }
}
