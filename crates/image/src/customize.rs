//! Prepares an unpacked Debian tree for banger: the guest agent and its
//! unit, sshd hardening, per-VM identity, a quieter boot. Plain file
//! operations on the tree, never through a symlink of the tree (an absolute
//! link in a chroot points into the host), so it is unit-tested on a fake
//! tree.

use crate::ImageError;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

/// Where the agent binary is installed in every image.
pub const AGENT_BINARY_PATH: &str = banger_agent_proto::install::BINARY_PATH;

/// Name of the agent's systemd unit, installed in `/etc/systemd/system/`.
pub const AGENT_UNIT_NAME: &str = banger_agent_proto::install::UNIT_NAME;

/// Where the agent's kernel module list is installed.
pub const AGENT_MODULES_CONF_PATH: &str = banger_agent_proto::install::MODULES_LOAD_PATH;

/// Host name of every guest until banger names it.
pub const HOSTNAME: &str = "banger";

/// sshd settings (the seed's "Security" section): keys only, root by key only.
/// Debian's `sshd_config` includes `sshd_config.d/*.conf` first, and the first
/// value sshd reads wins, so these override the stock file.
pub const SSHD_CONFIG: &str = "\
# Installed by banger. Guests are single-user sandboxes reached by key only.
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /root/.ssh/authorized_keys
HostKey /etc/ssh/ssh_host_ed25519_key
";

/// ssh.service drop-in. The image ships no host keys: banger gives each VM
/// its own ed25519 key, the only one sshd is told to use. Should a VM boot
/// without it, it is generated first. Only that one: `ssh-keygen -A` would
/// also make RSA and ECDSA keys at every boot, which takes seconds of an
/// emulated CPU before sshd listens. Debian's `sshd -t` pre-check goes too
/// (`ExecStartPre=` is reset): banger wrote the configuration, and the
/// check cost seconds of emulated CPU at every boot before sshd listened
/// (a broken configuration still fails the service, in sshd itself).
pub const SSH_HOST_KEYS_DROPIN: &str = "\
# Installed by banger: generate the host key the VM was not given.
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || exec /usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key'
";

/// Units masked because they only cost a sandbox boot time, CPU and I/O:
/// background apt updates and upgrades, the daily dpkg database backup,
/// ext4 scrubbing (needs LVM, and its reaper runs at every boot), weekly
/// TRIM (the disk is a host-side overlay), man-db's index rebuild, and the
/// early module loads of hardware a microVM does not have (DRM graphics,
/// EFI pstore, device-mapper), each seconds of emulated CPU at every boot.
/// Masked rather than only disabled, so that a package upgrade in the guest
/// does not bring them back.
pub const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    // Loads every AppArmor profile at each boot (seconds under TCG); Docker
    // loads its own docker-default profile with apparmor_parser when it
    // starts a container.
    "apparmor.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@dm_mod.service",
];

const HOSTS: &str = "\
127.0.0.1\tlocalhost
127.0.1.1\tbanger
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
";

const FSTAB: &str = "\
# Installed by banger. The root is assembled before init runs: the image's
# shared file system (read-only) under an overlay on the VM's own disk, and
# the VM's work disk at /root (see banger-agent's early-init mode). Neither
# belongs here: remounting them by this file would fail.
";

/// What banger puts into every image it makes (the Debian build, OCI
/// pulls, derived images, the bench's imports) besides [`customize`]'s
/// fixed files: the agent, its unit and its module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPayload {
    /// The guest agent binary (static), installed at [`AGENT_BINARY_PATH`].
    pub agent_binary: PathBuf,
    /// The agent's unit file; enabled according to its `[Install]` section.
    pub agent_unit: String,
    /// `modules-load.d` list of the modules the agent's channels need.
    pub agent_modules_conf: String,
}

impl GuestPayload {
    /// The agent at `agent_binary`, with the unit and module list it is
    /// installed with ([`banger_agent_proto::install`]).
    pub fn new(agent_binary: PathBuf) -> Self {
        GuestPayload {
            agent_binary,
            agent_unit: banger_agent_proto::install::SYSTEMD_UNIT.to_string(),
            agent_modules_conf: banger_agent_proto::install::MODULES_LOAD.to_string(),
        }
    }
}

/// Where a unit's `[Install]` section asks to be enabled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallSection {
    /// Targets whose `.wants/` directory links the unit.
    pub wanted_by: Vec<String>,
    /// Targets whose `.requires/` directory links the unit.
    pub required_by: Vec<String>,
}

impl InstallSection {
    /// Parses the `[Install]` section of a unit file. Keys banger does not
    /// act on (`Alias=`, `Also=`, ...) are errors rather than silently
    /// ignored, and so is a unit nothing would start.
    pub fn parse(unit: &str) -> Result<InstallSection, ImageError> {
        let bad = |m: String| Err(ImageError::BadUnit(m));
        let mut section = String::new();
        let mut install = InstallSection::default();
        let mut logical = String::new();
        for raw in unit.lines() {
            // A trailing backslash continues the line.
            if let Some(part) = raw.strip_suffix('\\') {
                logical.push_str(part);
                logical.push(' ');
                continue;
            }
            logical.push_str(raw);
            let line = std::mem::take(&mut logical);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            if section != "[Install]" {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return bad(format!("[Install] line {line:?} is not key=value"));
            };
            let list = match key.trim() {
                "WantedBy" => &mut install.wanted_by,
                "RequiredBy" => &mut install.required_by,
                other => {
                    return bad(format!(
                        "[Install] key {other}= is not supported: use WantedBy= or RequiredBy="
                    ));
                }
            };
            let value = value.trim();
            if value.is_empty() {
                // systemd semantics: an empty assignment resets the list.
                list.clear();
            }
            for target in value.split_whitespace() {
                if target.contains('/') || target.starts_with('.') || !target.contains('.') {
                    return bad(format!(
                        "[Install] {} target {target:?} is not a unit name",
                        key.trim()
                    ));
                }
                if !list.iter().any(|t| t == target) {
                    list.push(target.to_string());
                }
            }
        }
        if install.wanted_by.is_empty() && install.required_by.is_empty() {
            return bad(
                "no WantedBy= or RequiredBy= in [Install]: nothing would start the agent".into(),
            );
        }
        Ok(install)
    }

    /// Enablement links relative to the tree root, with their targets, as
    /// `systemctl enable` would make them.
    pub fn links(&self, unit_name: &str) -> Vec<(PathBuf, PathBuf)> {
        let dirs = self
            .wanted_by
            .iter()
            .map(|t| format!("{t}.wants"))
            .chain(self.required_by.iter().map(|t| format!("{t}.requires")));
        dirs.map(|d| {
            (
                Path::new("etc/systemd/system").join(d).join(unit_name),
                Path::new("..").join(unit_name),
            )
        })
        .collect()
    }
}

/// The kernel of a tree: its release and where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFiles {
    /// e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// The bzImage, `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `boot/initrd.img-<release>`.
    pub initrd: PathBuf,
}

/// The one kernel installed in the tree at `root`, with its initrd.
pub fn find_kernel(root: &Path) -> Result<KernelFiles, ImageError> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(|_| ImageError::NoKernel(boot.clone()))?;
    let mut releases: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .collect();
    releases.sort();
    let release = match releases.as_slice() {
        [] => return Err(ImageError::NoKernel(boot)),
        [one] => one.clone(),
        several => return Err(ImageError::SeveralKernels(several.join(", "))),
    };
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    let initrd = boot.join(format!("initrd.img-{release}"));
    if !initrd.is_file() {
        return Err(ImageError::NoInitrd(initrd));
    }
    Ok(KernelFiles {
        release,
        vmlinuz,
        initrd,
    })
}

/// Applies banger's changes to the Debian tree at `root`. Everything is
/// checked before the first change, and running it twice gives the same tree.
pub fn customize(root: &Path, c: &GuestPayload) -> Result<(), ImageError> {
    InstallSection::parse(&c.agent_unit)?;
    if !c.agent_binary.is_file() {
        return Err(ImageError::AgentMissing(c.agent_binary.clone()));
    }
    let sshd_config = root.join("etc/ssh/sshd_config");
    let stock = std::fs::read_to_string(&sshd_config)
        .map_err(ImageError::io(format!("reading {}", sshd_config.display())))?;
    if !includes_dropins(&stock) {
        return Err(ImageError::SshdNoInclude(sshd_config));
    }

    // Identity: each VM gets its own machine-id at first boot (an empty file
    // means "not yet"), and ssh host keys from banger.
    write_file(
        root,
        "etc/hostname",
        format!("{HOSTNAME}\n").as_bytes(),
        0o644,
    )?;
    write_file(root, "etc/hosts", HOSTS.as_bytes(), 0o644)?;
    write_file(root, "etc/machine-id", b"", 0o444)?;
    remove_file_if(root, "var/lib/dbus/machine-id", |m| m.is_file())?;
    write_file(root, "etc/fstab", FSTAB.as_bytes(), 0o644)?;

    // The agent, started by its own unit.
    install_agent(root, c, true)?;

    // sshd: hardened, keys per VM.
    write_file(
        root,
        "etc/ssh/sshd_config.d/banger.conf",
        SSHD_CONFIG.as_bytes(),
        0o644,
    )?;
    write_file(
        root,
        "etc/systemd/system/ssh.service.d/banger-host-keys.conf",
        SSH_HOST_KEYS_DROPIN.as_bytes(),
        0o644,
    )?;
    let ssh_dir = root.join("etc/ssh");
    let entries = std::fs::read_dir(&ssh_dir)
        .map_err(ImageError::io(format!("listing {}", ssh_dir.display())))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            let p = entry.path();
            std::fs::remove_file(&p)
                .map_err(ImageError::io(format!("removing {}", p.display())))?;
        }
    }
    // StrictModes wants root's home and .ssh private.
    for dir in ["root", "root/.ssh"] {
        make_dir(root, Path::new(dir), 0o700)?;
    }

    // A quieter boot.
    let system = Path::new("etc/systemd/system");
    for unit in MASKED_UNITS {
        write_symlink(root, &system.join(unit), Path::new("/dev/null"))?;
        let wants_dirs = std::fs::read_dir(root.join(system)).map_err(ImageError::io(format!(
            "listing {}",
            root.join(system).display()
        )))?;
        for dir in wants_dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if name.ends_with(".wants") || name.ends_with(".requires") {
                remove_file_if(root, system.join(&name).join(unit), |m| {
                    m.file_type().is_symlink()
                })?;
            }
        }
    }
    Ok(())
}

/// Installs the agent binary at [`AGENT_BINARY_PATH`] and its module list;
/// with `systemd`, also its unit, enabled per the unit's `[Install]` section.
/// Shared by the Debian build and OCI imports.
pub fn install_agent(root: &Path, c: &GuestPayload, systemd: bool) -> Result<(), ImageError> {
    let install = InstallSection::parse(&c.agent_unit)?;
    let agent = std::fs::read(&c.agent_binary).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::AgentMissing(c.agent_binary.clone()),
        _ => ImageError::Io {
            context: format!("reading {}", c.agent_binary.display()),
            source: e,
        },
    })?;
    write_file(root, rel(AGENT_BINARY_PATH), &agent, 0o755)?;
    if systemd {
        let unit_rel = Path::new("etc/systemd/system").join(AGENT_UNIT_NAME);
        write_file(root, &unit_rel, c.agent_unit.as_bytes(), 0o644)?;
        for (link, target) in install.links(AGENT_UNIT_NAME) {
            write_symlink(root, &link, &target)?;
        }
    }
    write_file(
        root,
        rel(AGENT_MODULES_CONF_PATH),
        c.agent_modules_conf.as_bytes(),
        0o644,
    )
}

/// Whether an sshd_config includes `sshd_config.d/*.conf`.
fn includes_dropins(config: &str) -> bool {
    config.lines().map(str::trim).any(|l| {
        let mut words = l.split_whitespace();
        words
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case("include"))
            && words.any(|w| w.contains("sshd_config.d/"))
    })
}

/// An absolute guest path as a path relative to the tree root.
pub fn rel(guest_path: &str) -> &Path {
    Path::new(guest_path.trim_start_matches('/'))
}

/// `root/rel`, after checking that `rel` stays inside the tree and that no
/// existing directory on the way is a symlink.
pub fn inside(root: &Path, rel: &Path) -> Result<PathBuf, ImageError> {
    let mut p = root.to_path_buf();
    let comps: Vec<Component<'_>> = rel.components().collect();
    for (i, comp) in comps.iter().enumerate() {
        let Component::Normal(c) = comp else {
            return Err(escape(root, rel, "is not a plain relative path"));
        };
        p.push(c);
        if i + 1 < comps.len()
            && std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(escape(root, rel, "goes through a symlink"));
        }
    }
    Ok(p)
}

fn escape(root: &Path, rel: &Path, why: &str) -> ImageError {
    ImageError::Io {
        context: format!("refusing to write {} in {}", rel.display(), root.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("the path {why}")),
    }
}

/// Creates the missing directories of `rel` with mode 0755 whatever the
/// umask, leaving existing ones as they are.
fn create_dirs(root: &Path, rel: &Path) -> Result<(), ImageError> {
    inside(root, rel)?;
    let mut p = root.to_path_buf();
    for comp in rel.components() {
        p.push(comp);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(escape(root, rel, "has a non-directory on the way")),
            Err(_) => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&p)
                    .map_err(ImageError::io(format!("creating {}", p.display())))?;
                set_mode(&p, 0o755)?;
            }
        }
    }
    Ok(())
}

/// Creates directory `rel` (and missing parents) and gives it `mode`.
pub fn make_dir(root: &Path, rel: &Path, mode: u32) -> Result<(), ImageError> {
    create_dirs(root, rel)?;
    set_mode(&inside(root, rel)?, mode)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ImageError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io(format!("chmod {}", p.display())))
}

/// Replaces whatever is at `rel` (a symlink is replaced, never followed)
/// with a file holding `content`.
pub fn write_file(
    root: &Path,
    rel: impl AsRef<Path>,
    content: &[u8],
    mode: u32,
) -> Result<(), ImageError> {
    let rel = rel.as_ref();
    let p = inside(root, rel)?;
    if let Some(parent) = rel.parent() {
        create_dirs(root, parent)?;
    }
    remove_file_if(root, rel, |m| !m.is_dir())?;
    let ctx = || format!("writing {}", p.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&p)
        .map_err(ImageError::io(ctx()))?;
    f.write_all(content).map_err(ImageError::io(ctx()))?;
    set_mode(&p, mode)
}

/// Replaces whatever is at `rel` with a symlink to `target`.
pub fn write_symlink(root: &Path, rel: &Path, target: &Path) -> Result<(), ImageError> {
    let p = inside(root, rel)?;
    if let Some(parent) = rel.parent() {
        create_dirs(root, parent)?;
    }
    remove_file_if(root, rel, |m| !m.is_dir())?;
    symlink(target, &p).map_err(ImageError::io(format!("linking {}", p.display())))
}

/// Removes `rel` if it exists and `pred` holds for its (not followed) metadata.
pub fn remove_file_if(
    root: &Path,
    rel: impl AsRef<Path>,
    pred: impl Fn(&std::fs::Metadata) -> bool,
) -> Result<(), ImageError> {
    let p = inside(root, rel.as_ref())?;
    match std::fs::symlink_metadata(&p) {
        Ok(m) if pred(&m) => {
            std::fs::remove_file(&p).map_err(ImageError::io(format!("removing {}", p.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    const UNIT: &str = "\
[Unit]
Description=test agent
# WantedBy=not-this.target
DefaultDependencies=no

[Service]
ExecStart=/usr/local/bin/banger-agent

[Install]
WantedBy=sysinit.target
";

    const MODULES: &str = "virtio_console\nvsock\n";

    /// What a node of the tree is, for before/after comparisons.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        Dir(u32),
        File(u32, Vec<u8>),
        Link(PathBuf),
    }

    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("ls").flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).expect("stat");
                let node = if m.file_type().is_symlink() {
                    Node::Link(std::fs::read_link(&p).expect("readlink"))
                } else if m.is_dir() {
                    stack.push(p.clone());
                    Node::Dir(m.mode() & 0o7777)
                } else {
                    Node::File(m.mode() & 0o7777, std::fs::read(&p).expect("read"))
                };
                out.insert(p.strip_prefix(root).expect("prefix").to_path_buf(), node);
            }
        }
        out
    }

    /// A Debian-shaped tree: what the customisation reads, touches or must
    /// leave alone.
    fn fake_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        for d in [
            "boot",
            "etc/ssh/sshd_config.d",
            "etc/systemd/system/timers.target.wants",
            "etc/systemd/system/multi-user.target.wants",
            "root",
            "usr/local/bin",
            "var/lib/dbus",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let files: &[(&str, &str)] = &[
            ("boot/vmlinuz-6.1.0-9-cloud-amd64", "kernel"),
            ("boot/initrd.img-6.1.0-9-cloud-amd64", "initrd"),
            ("etc/hostname", "builder-host\n"),
            ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
            (
                "var/lib/dbus/machine-id",
                "0123456789abcdef0123456789abcdef\n",
            ),
            ("etc/fstab", "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"),
            (
                "etc/ssh/sshd_config",
                "Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\n",
            ),
            ("etc/ssh/ssh_host_ed25519_key", "secret"),
            ("etc/ssh/ssh_host_ed25519_key.pub", "public"),
            ("etc/ssh/ssh_host_rsa_key", "secret"),
            ("etc/ssh/moduli", "moduli"),
        ];
        for (p, c) in files {
            std::fs::write(root.join(p), c).expect("write");
        }
        std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        for (link, target) in [
            (
                "etc/systemd/system/timers.target.wants/apt-daily.timer",
                "/lib/systemd/system/apt-daily.timer",
            ),
            (
                "etc/systemd/system/timers.target.wants/fstrim.timer",
                "/lib/systemd/system/fstrim.timer",
            ),
            (
                "etc/systemd/system/multi-user.target.wants/e2scrub_reap.service",
                "/lib/systemd/system/e2scrub_reap.service",
            ),
            (
                "etc/systemd/system/multi-user.target.wants/ssh.service",
                "/lib/systemd/system/ssh.service",
            ),
        ] {
            symlink(target, root.join(link)).expect("symlink");
        }
        let agent = t.path().join("agent");
        std::fs::write(&agent, "#!agent binary").expect("agent");
        (t, root, agent)
    }

    fn file(mode: u32, content: &str) -> Node {
        Node::File(mode, content.as_bytes().to_vec())
    }

    fn link(target: &str) -> Node {
        Node::Link(PathBuf::from(target))
    }

    #[test]
    fn install_section_lists_targets_and_rejects_what_banger_would_ignore() {
        let i = InstallSection::parse(UNIT).expect("parse");
        assert_eq!(i.wanted_by, ["sysinit.target"]);
        assert!(i.required_by.is_empty());

        let i = InstallSection::parse(
            "[Install]\nWantedBy = a.target \\\n  b.target\nWantedBy=a.target\nRequiredBy=c.target\n; WantedBy=x.target\n",
        )
        .expect("parse");
        assert_eq!(i.wanted_by, ["a.target", "b.target"]);
        assert_eq!(i.required_by, ["c.target"]);

        let reset =
            InstallSection::parse("[Install]\nWantedBy=a.target\nWantedBy=\nWantedBy=b.target\n")
                .expect("parse");
        assert_eq!(reset.wanted_by, ["b.target"]);

        for bad in [
            "[Unit]\nWantedBy=a.target\n[Service]\nExecStart=/x\n",
            "[Install]\nWantedBy=a.target\nAlias=agent.service\n",
            "[Install]\nWantedBy=../../etc/passwd\n",
            "[Install]\nWantedBy=multi-user\n",
            "[Install]\nWantedBy\n",
        ] {
            assert!(
                matches!(InstallSection::parse(bad), Err(ImageError::BadUnit(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn customize_makes_exactly_the_expected_changes() {
        let (_t, root, agent) = fake_tree();
        let before = snapshot(&root);
        let c = GuestPayload {
            agent_binary: agent.clone(),
            agent_unit: UNIT.into(),
            agent_modules_conf: MODULES.into(),
        };
        customize(&root, &c).expect("customize");
        let after = snapshot(&root);

        let mut expected = before.clone();
        for gone in [
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "etc/ssh/ssh_host_rsa_key",
            "var/lib/dbus/machine-id",
            "etc/systemd/system/timers.target.wants/apt-daily.timer",
            "etc/systemd/system/timers.target.wants/fstrim.timer",
            "etc/systemd/system/multi-user.target.wants/e2scrub_reap.service",
        ] {
            assert!(
                expected.remove(Path::new(gone)).is_some(),
                "{gone} was in the fake tree"
            );
        }
        let mut set = |p: &str, n: Node| {
            expected.insert(PathBuf::from(p), n);
        };
        set("etc/hostname", file(0o644, "banger\n"));
        set("etc/hosts", file(0o644, HOSTS));
        set("etc/machine-id", file(0o444, ""));
        set("etc/fstab", file(0o644, FSTAB));
        set("usr/local/bin/banger-agent", file(0o755, "#!agent binary"));
        set("etc/systemd/system/banger-agent.service", file(0o644, UNIT));
        set("etc/systemd/system/sysinit.target.wants", Node::Dir(0o755));
        set(
            "etc/systemd/system/sysinit.target.wants/banger-agent.service",
            link("../banger-agent.service"),
        );
        set("etc/modules-load.d", Node::Dir(0o755));
        set("etc/modules-load.d/banger.conf", file(0o644, MODULES));
        set(
            "etc/ssh/sshd_config.d/banger.conf",
            file(0o644, SSHD_CONFIG),
        );
        set("etc/systemd/system/ssh.service.d", Node::Dir(0o755));
        set(
            "etc/systemd/system/ssh.service.d/banger-host-keys.conf",
            file(0o644, SSH_HOST_KEYS_DROPIN),
        );
        set("root", Node::Dir(0o700));
        set("root/.ssh", Node::Dir(0o700));
        for unit in MASKED_UNITS {
            set(&format!("etc/systemd/system/{unit}"), link("/dev/null"));
        }
        for (path, node) in &after {
            assert_eq!(
                expected.get(path),
                Some(node),
                "unexpected state of {}",
                path.display()
            );
        }
        for path in expected.keys() {
            assert!(after.contains_key(path), "{} is missing", path.display());
        }

        // Idempotent: a second run changes nothing.
        customize(&root, &c).expect("again");
        assert_eq!(snapshot(&root), after);
    }

    #[test]
    fn customize_checks_everything_before_changing_anything() {
        let (t, root, agent) = fake_tree();
        let before = snapshot(&root);
        let c = GuestPayload {
            agent_binary: agent.clone(),
            agent_unit: "[Install]\nAlias=x.service\n".into(),
            agent_modules_conf: MODULES.into(),
        };
        assert!(matches!(customize(&root, &c), Err(ImageError::BadUnit(_))));
        let missing = t.path().join("no-agent");
        let c = GuestPayload {
            agent_binary: missing.clone(),
            agent_unit: UNIT.into(),
            agent_modules_conf: MODULES.into(),
        };
        assert!(matches!(
            customize(&root, &c),
            Err(ImageError::AgentMissing(_))
        ));
        std::fs::write(root.join("etc/ssh/sshd_config"), "UsePAM yes\n").expect("write");
        let c = GuestPayload {
            agent_binary: agent.clone(),
            agent_unit: UNIT.into(),
            agent_modules_conf: MODULES.into(),
        };
        assert!(matches!(
            customize(&root, &c),
            Err(ImageError::SshdNoInclude(_))
        ));
        let mut now = snapshot(&root);
        now.insert(
            "etc/ssh/sshd_config".into(),
            before[Path::new("etc/ssh/sshd_config")].clone(),
        );
        assert_eq!(now, before);
    }

    #[test]
    fn customize_never_writes_through_a_symlink_of_the_tree() {
        let (t, root, agent) = fake_tree();
        // In a chroot, /etc/hostname -> /etc/hostname style links point at the host.
        let host_file = t.path().join("host-hostname");
        std::fs::write(&host_file, "host\n").expect("write");
        std::fs::remove_file(root.join("etc/hostname")).expect("rm");
        symlink(&host_file, root.join("etc/hostname")).expect("symlink");
        // A directory on the way that is a symlink out of the tree is refused.
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        symlink(&outside, root.join("etc/modules-load.d")).expect("symlink");

        let c = GuestPayload {
            agent_binary: agent.clone(),
            agent_unit: UNIT.into(),
            agent_modules_conf: MODULES.into(),
        };
        let err = customize(&root, &c).expect_err("refused");
        assert!(err.to_string().contains("modules-load.d"), "{err}");
        assert_eq!(std::fs::read_to_string(&host_file).expect("read"), "host\n");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).expect("read"),
            "banger\n"
        );
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
    }

    #[test]
    fn finds_the_one_kernel_and_its_initrd() {
        let (_t, root, _) = fake_tree();
        let k = find_kernel(&root).expect("kernel");
        assert_eq!(k.release, "6.1.0-9-cloud-amd64");
        assert_eq!(k.vmlinuz, root.join("boot/vmlinuz-6.1.0-9-cloud-amd64"));
        assert_eq!(k.initrd, root.join("boot/initrd.img-6.1.0-9-cloud-amd64"));

        std::fs::write(root.join("boot/vmlinuz-6.1.0-10-cloud-amd64"), "k2").expect("write");
        assert!(
            matches!(find_kernel(&root), Err(ImageError::SeveralKernels(list)) if list == "6.1.0-10-cloud-amd64, 6.1.0-9-cloud-amd64")
        );
        std::fs::remove_file(root.join("boot/vmlinuz-6.1.0-9-cloud-amd64")).expect("rm");
        assert!(matches!(find_kernel(&root), Err(ImageError::NoInitrd(_))));
        std::fs::remove_dir_all(root.join("boot")).expect("rm");
        assert!(matches!(find_kernel(&root), Err(ImageError::NoKernel(_))));
    }

    #[test]
    fn sshd_include_detection() {
        assert!(includes_dropins(
            "# comment\nInclude /etc/ssh/sshd_config.d/*.conf\n"
        ));
        assert!(includes_dropins("include   /etc/ssh/sshd_config.d/*.conf"));
        assert!(!includes_dropins(
            "#Include /etc/ssh/sshd_config.d/*.conf\n"
        ));
        assert!(!includes_dropins("Include /etc/other/*.conf\n"));
    }
}
