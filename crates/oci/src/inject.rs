//! What banger adds to an imported image: its guest agent, and for images
//! without sshd a first-boot script that installs it with the guest's own
//! package manager. Writes go through the image crate's helpers, which
//! never follow a symlink of the tree.

use crate::OciError;
use banger_image::customize::{
    AGENT_BINARY_PATH, GuestPayload, install_agent, make_dir, rel, write_file, write_symlink,
};
use std::path::{Component, Path, PathBuf};

/// Where the sshd installer goes in the image.
pub const INSTALL_SSHD_PATH: &str = "/usr/local/sbin/banger-install-sshd";

/// systemd unit running the installer once, at the first boot with network.
pub const INSTALL_SSHD_UNIT: &str = "\
[Unit]
Description=banger: install openssh-server with the guest's package manager
Wants=network-online.target
After=network-online.target
ConditionPathExists=!/var/lib/banger/sshd-installed

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/banger-install-sshd
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

const INSTALL_SSHD_UNIT_NAME: &str = "banger-install-sshd.service";

/// The first-boot sshd installer (POSIX sh, runs in the guest): finds the
/// package manager (from /etc/os-release, else whichever tool exists),
/// installs OpenSSH, applies banger's sshd settings (keys only), generates
/// host keys missing, starts sshd and leaves a marker so it runs once.
pub const FIRST_BOOT_SSHD_SCRIPT: &str = r#"#!/bin/sh
# Installed by banger: this image had no sshd. Runs once, at first boot.
set -eu
done_marker=/var/lib/banger/sshd-installed
[ -e "$done_marker" ] && exit 0
log() { echo "banger-install-sshd: $*" >&2; }

id=""; like=""
if [ -r /etc/os-release ]; then
    id=$(. /etc/os-release; echo "${ID:-}")
    like=$(. /etc/os-release; echo "${ID_LIKE:-}")
fi
has() { command -v "$1" >/dev/null 2>&1; }

pm=""
case " $id $like " in
    *" alpine "*) pm=apk ;;
    *" debian "*|*" ubuntu "*) pm=apt-get ;;
    *" fedora "*|*" rhel "*|*" centos "*) pm=dnf ;;
esac
if [ -z "$pm" ] || ! has "$pm"; then
    for t in apt-get apk dnf yum microdnf; do
        if has "$t"; then pm=$t; break; fi
    done
fi

case "$pm" in
    apt-get)
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends openssh-server
        ;;
    apk) apk add --no-cache openssh-server ;;
    dnf|yum|microdnf) "$pm" install -y openssh-server ;;
    *) log "no known package manager (apt-get, apk, dnf, yum); install openssh-server yourself"; exit 1 ;;
esac

sshd=$(command -v sshd || echo /usr/sbin/sshd)
conf=/etc/ssh/sshd_config
mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/banger.conf <<'EOF'
# Installed by banger. Guests are single-user sandboxes reached by key only.
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /root/.ssh/authorized_keys
HostKey /etc/ssh/ssh_host_ed25519_key
EOF
if [ -f "$conf" ] && ! grep -Eiq '^[[:space:]]*include[[:space:]].*sshd_config\.d' "$conf"; then
    # sshd keeps the first value it reads: the settings go first.
    tmp="$conf.banger.$$"
    { echo 'Include /etc/ssh/sshd_config.d/*.conf'; cat "$conf"; } > "$tmp"
    mv "$tmp" "$conf"
fi
mkdir -p /root/.ssh /run/sshd /var/empty
chmod 700 /root /root/.ssh
ssh-keygen -A

if has systemctl && [ -d /run/systemd/system ]; then
    for unit in ssh sshd; do
        if systemctl enable --now "$unit" 2>/dev/null; then break; fi
    done
elif has rc-update; then
    rc-update add sshd default && rc-service sshd start
else
    "$sshd"
fi
mkdir -p "$(dirname "$done_marker")"
: > "$done_marker"
log "openssh-server installed with $pm"
"#;

/// What was found in (and added to) an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// `ID=` of /etc/os-release (e.g. `debian`, `alpine`), if any.
    pub os_id: Option<String>,
    /// The image boots systemd (its init is, or it ships, systemd).
    pub has_systemd: bool,
    /// The image has `/usr/sbin/sshd` (before banger's first-boot install).
    pub has_sshd: bool,
    /// The image has a busybox/sysvinit `/etc/inittab` banger hooked into.
    pub uses_inittab: bool,
}

/// Resolves `rel` inside `root` for reading, following symlinks as the
/// guest would but never above the tree's root (an absolute link target is
/// taken relative to the root). `None` if it does not exist.
fn resolve_in_tree(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut todo: Vec<PathBuf> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == Path::new("..") {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let md = std::fs::symlink_metadata(root.join(&next)).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(root.join(&next)).ok()?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for t in target.components().rev() {
                match t {
                    Component::Normal(n) => todo.push(PathBuf::from(n)),
                    Component::ParentDir => todo.push(PathBuf::from("..")),
                    _ => {}
                }
            }
        } else {
            cur = next;
        }
    }
    Some(root.join(cur))
}

/// Reads the image's file `rel` the way the guest would find it
/// ([`resolve_in_tree`]), as text of at most `cap` bytes. Only a regular
/// file is read: it is opened without following a link and without
/// blocking (a FIFO planted by a layer never hangs the pull), and checked
/// before reading. `None` when it is missing or not a regular file.
fn read_image_file(root: &Path, rel: &str, cap: u64) -> Option<String> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, SFlag, fstat};
    use std::io::Read;
    let path = resolve_in_tree(root, Path::new(rel))?;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = open(&path, flags, Mode::empty()).ok()?;
    let st = fstat(&fd).ok()?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        tracing::warn!(path = %path.display(), "not a regular file in the image; ignored");
        return None;
    }
    let mut text = Vec::new();
    std::fs::File::from(fd)
        .take(cap)
        .read_to_end(&mut text)
        .ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// Most bytes read of an image's os-release.
const OS_RELEASE_CAP: u64 = 64 * 1024;

/// Most bytes read of an image's inittab.
const INITTAB_CAP: u64 = 1 << 20;

fn exists_in_tree(root: &Path, rel: &str) -> bool {
    resolve_in_tree(root, Path::new(rel)).is_some()
}

/// `ID=` of an os-release text.
fn os_release_id(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("ID=")?;
        let v = v.trim().trim_matches('"').trim_matches('\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// Looks at the unpacked image at `root`.
pub fn inspect(root: &Path) -> GuestInfo {
    let os_id = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .filter_map(|p| read_image_file(root, p, OS_RELEASE_CAP))
        .find_map(|t| os_release_id(&t));
    let init_is_systemd = resolve_in_tree(root, Path::new("sbin/init"))
        .and_then(|p| p.strip_prefix(root).ok().map(Path::to_path_buf))
        .is_some_and(|p| p.ends_with("systemd/systemd"));
    let has_systemd = init_is_systemd
        || exists_in_tree(root, "usr/lib/systemd/systemd")
        || exists_in_tree(root, "lib/systemd/systemd");
    let has_sshd = exists_in_tree(root, "usr/sbin/sshd");
    GuestInfo {
        os_id,
        has_systemd,
        has_sshd,
        uses_inittab: false,
    }
}

fn image_err(e: banger_image::ImageError) -> OciError {
    OciError::Image(e)
}

/// The default busybox inittab, plus banger's lines: used when an image
/// without systemd has none (busybox init then behaves as without one).
const BUSYBOX_INITTAB: &str = "\
::sysinit:/etc/init.d/rcS
::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/sbin/swapoff -a
::shutdown:/bin/umount -a -r
::restart:/sbin/init
";

/// Directories every root needs, with their modes: the mount points the
/// boot moves /dev, /proc, /sys and /run onto, /tmp and /root. Made (owned
/// by root) when no layer has them, as a container runtime would, so an
/// image that is only a static binary or two boots.
pub const ROOT_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
];

/// Adds the agent and, without sshd, the first-boot installer, and the
/// [`ROOT_DIRS`] missing. Returns what the image has.
pub fn inject(root: &Path, c: &GuestPayload) -> Result<GuestInfo, OciError> {
    for (d, mode) in ROOT_DIRS {
        // Whatever a layer put there (a directory, a symlink) stays.
        if std::fs::symlink_metadata(root.join(d)).is_err() {
            make_dir(root, Path::new(d), *mode).map_err(image_err)?;
        }
    }
    let mut info = inspect(root);
    install_agent(root, c, info.has_systemd).map_err(image_err)?;
    if !info.has_sshd {
        write_file(
            root,
            rel(INSTALL_SSHD_PATH),
            FIRST_BOOT_SSHD_SCRIPT.as_bytes(),
            0o755,
        )
        .map_err(image_err)?;
    }
    if info.has_systemd {
        if !info.has_sshd {
            let unit = Path::new("etc/systemd/system").join(INSTALL_SSHD_UNIT_NAME);
            write_file(root, &unit, INSTALL_SSHD_UNIT.as_bytes(), 0o644).map_err(image_err)?;
            write_symlink(
                root,
                &Path::new("etc/systemd/system/multi-user.target.wants")
                    .join(INSTALL_SSHD_UNIT_NAME),
                &Path::new("..").join(INSTALL_SSHD_UNIT_NAME),
            )
            .map_err(image_err)?;
        }
    } else {
        // busybox or sysvinit: the agent respawns, the installer runs once.
        let inittab = root.join("etc/inittab");
        let md = std::fs::symlink_metadata(&inittab).ok();
        let mut text = match md {
            Some(m) if m.is_file() => {
                if m.len() > INITTAB_CAP {
                    return Err(OciError::BadImageFile(format!(
                        "the image's /etc/inittab is {} bytes; an inittab over {INITTAB_CAP} is refused",
                        m.len()
                    )));
                }
                read_image_file(root, "etc/inittab", INITTAB_CAP).ok_or_else(|| {
                    OciError::BadImageFile(format!("cannot read the image's {}", inittab.display()))
                })?
            }
            _ => BUSYBOX_INITTAB.to_string(),
        };
        let mut lines = vec![format!("::respawn:{AGENT_BINARY_PATH}")];
        if !info.has_sshd {
            lines.push(format!("::once:{INSTALL_SSHD_PATH}"));
        }
        for l in lines {
            if !text.lines().any(|x| x.trim() == l) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&l);
                text.push('\n');
            }
        }
        write_file(root, "etc/inittab", text.as_bytes(), 0o644).map_err(image_err)?;
        info.uses_inittab = true;
    }
    make_dir(root, Path::new("var/lib/banger"), 0o755).map_err(image_err)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    const UNIT: &str =
        "[Service]\nExecStart=/usr/local/bin/banger-agent\n[Install]\nWantedBy=sysinit.target\n";

    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        let agent = t.path().join("agent");
        std::fs::write(&agent, "agent").expect("agent");
        (t, root, agent)
    }

    fn c(agent: &Path) -> GuestPayload {
        GuestPayload {
            agent_binary: agent.to_path_buf(),
            agent_unit: UNIT.into(),
            agent_modules_conf: "vsock\n".into(),
        }
    }

    #[test]
    fn systemd_debian_with_sshd() {
        let (_t, root, agent) = tree();
        std::fs::create_dir_all(root.join("usr/lib/systemd")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/sbin")).expect("mkdir");
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").expect("w");
        std::fs::write(root.join("usr/sbin/sshd"), "").expect("w");
        std::fs::write(
            root.join("usr/lib/os-release"),
            "NAME=\"Debian\"\nID=debian\n",
        )
        .expect("w");
        // etc/os-release is usually a relative link; an absolute one must not reach the host.
        symlink("../usr/lib/os-release", root.join("etc/os-release")).expect("ln");
        symlink("usr/lib", root.join("lib")).expect("ln");
        let info = inject(&root, &c(&agent)).expect("inject");
        assert_eq!(info.os_id.as_deref(), Some("debian"));
        assert!(info.has_systemd && info.has_sshd && !info.uses_inittab);
        let a = root.join("usr/local/bin/banger-agent");
        assert_eq!(
            std::fs::metadata(&a).expect("agent").permissions().mode() & 0o7777,
            0o755
        );
        assert!(
            root.join("etc/systemd/system/banger-agent.service")
                .is_file()
        );
        assert!(
            std::fs::symlink_metadata(
                root.join("etc/systemd/system/sysinit.target.wants/banger-agent.service")
            )
            .is_ok()
        );
        assert!(!root.join("usr/local/sbin/banger-install-sshd").exists());
    }

    /// A layer's FIFO or device where banger reads a file must not hang
    /// the pull: only regular files are read, without blocking.
    #[test]
    fn a_fifo_or_an_escaping_link_where_os_release_should_be_is_skipped() {
        let (_t, root, agent) = tree();
        nix::unistd::mkfifo(
            &root.join("etc/os-release"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        // An absolute link resolves inside the image, never on the host.
        symlink("/etc/hostname", root.join("usr/lib/os-release")).expect("ln");
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, a) = (root.clone(), agent.clone());
        std::thread::spawn(move || {
            let _ = tx.send(inject(&r, &c(&a)).map(|i| i.os_id));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("inject returned instead of blocking on the FIFO");
        assert_eq!(got.expect("inject"), None);
        // A huge file is read only up to its cap.
        std::fs::remove_file(root.join("etc/os-release")).expect("rm");
        let mut big = "ID=alpine\n".to_string();
        big.push_str(&"#".repeat(200_000));
        std::fs::write(root.join("etc/os-release"), &big).expect("w");
        let text = read_image_file(&root, "etc/os-release", OS_RELEASE_CAP).expect("read");
        assert_eq!(text.len() as u64, OS_RELEASE_CAP);
        assert_eq!(inspect(&root).os_id.as_deref(), Some("alpine"));
        // An inittab that is a FIFO is not read either.
        std::fs::remove_file(root.join("etc/inittab")).expect("rm");
        nix::unistd::mkfifo(
            &root.join("etc/inittab"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        assert_eq!(read_image_file(&root, "etc/inittab", INITTAB_CAP), None);
    }

    #[test]
    fn busybox_without_sshd_gets_the_installer_in_inittab() {
        let (_t, root, agent) = tree();
        std::fs::write(root.join("etc/os-release"), "ID=alpine\n").expect("w");
        std::fs::write(root.join("etc/inittab"), "::sysinit:/sbin/openrc sysinit").expect("w");
        // An absolute link resolves inside the tree, never on the host.
        std::fs::create_dir_all(root.join("sbin")).expect("mkdir");
        symlink("/bin/busybox", root.join("sbin/init")).expect("ln");
        let info = inject(&root, &c(&agent)).expect("inject");
        assert_eq!(info.os_id.as_deref(), Some("alpine"));
        assert!(!info.has_systemd && !info.has_sshd && info.uses_inittab);
        let tab = std::fs::read_to_string(root.join("etc/inittab")).expect("tab");
        assert_eq!(
            tab,
            "::sysinit:/sbin/openrc sysinit\n::respawn:/usr/local/bin/banger-agent\n::once:/usr/local/sbin/banger-install-sshd\n"
        );
        let script = root.join("usr/local/sbin/banger-install-sshd");
        assert_eq!(
            std::fs::read_to_string(&script).expect("s"),
            FIRST_BOOT_SSHD_SCRIPT
        );
        assert!(!root.join("etc/systemd").exists());
        // Twice: nothing added again.
        inject(&root, &c(&agent)).expect("again");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/inittab")).expect("tab"),
            tab
        );
    }

    #[test]
    fn a_root_of_one_binary_gets_its_mount_points_and_keeps_its_own() {
        let (_t, root, agent) = tree();
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::write(root.join("bin/busybox"), "static").expect("w");
        // The image's own /run is a symlink and /tmp has its own mode.
        symlink("var/run", root.join("run")).expect("ln");
        std::fs::create_dir(root.join("tmp")).expect("mkdir");
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        inject(&root, &c(&agent)).expect("inject");
        let mode = |d: &str| {
            std::fs::symlink_metadata(root.join(d))
                .expect(d)
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("dev"), 0o755);
        assert_eq!(mode("proc"), 0o555);
        assert_eq!(mode("sys"), 0o555);
        assert_eq!(mode("root"), 0o700);
        assert_eq!(mode("tmp"), 0o700, "an existing directory keeps its mode");
        assert!(
            std::fs::symlink_metadata(root.join("run"))
                .expect("run")
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn systemd_without_sshd_gets_the_unit() {
        let (_t, root, agent) = tree();
        std::fs::create_dir_all(root.join("sbin")).expect("mkdir");
        std::fs::create_dir_all(root.join("lib/systemd")).expect("mkdir");
        std::fs::write(root.join("lib/systemd/systemd"), "").expect("w");
        symlink("/lib/systemd/systemd", root.join("sbin/init")).expect("ln");
        let info = inject(&root, &c(&agent)).expect("inject");
        assert!(info.has_systemd && !info.has_sshd);
        assert_eq!(
            std::fs::read_link(
                root.join("etc/systemd/system/multi-user.target.wants/banger-install-sshd.service")
            )
            .expect("link"),
            Path::new("../banger-install-sshd.service")
        );
    }

    #[test]
    fn the_installer_script_is_valid_sh() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("s.sh");
        std::fs::write(&p, FIRST_BOOT_SSHD_SCRIPT).expect("w");
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&p)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
