//! What `image build --from-image` runs inside its transient VM: the guest
//! side of a derived image, as a list of commands for the agent's exec.
//!
//! Downloads the guest would make over HTTPS (mise) are made by the host
//! instead and streamed in on the step's stdin ([`HostFile`]): the host's
//! trust store is the one its owner configured (proxies, private CAs), the
//! guest needs no route to the npm registry, and the digest is checked on
//! both sides.
//!
//! Each step is one `sh -c SCRIPT sh ARGS...` run: the scripts are fixed
//! text and everything that varies (device, package names, URL, digest)
//! travels as positional arguments, so nothing a user passes is ever parsed
//! by the guest's shell.

use crate::ImageError;
use crate::build::is_package_name;

/// mise version installed in derived images. mise's own releases live on
/// GitHub, which build hosts may not reach; npm publishes the same static
/// binary as `@jdxcode/mise-linux-x64`, pinned here with npm's integrity
/// digest.
pub const MISE_VERSION: &str = "2026.9.15";
/// npm tarball of [`MISE_VERSION`].
pub const MISE_URL: &str =
    "https://registry.npmjs.org/@jdxcode/mise-linux-x64/-/mise-linux-x64-2026.9.15.tgz";
/// sha512 of [`MISE_URL`] (npm's `dist.integrity`, in hex).
pub const MISE_SHA512: &str = "06eb4f146cb3b4dd1193f1ce1ef1ee7fe5bcd0292f4110236c3587be11897373e72f77b62a10986483b28f1f303e486bf5525affbb09657a71b6de492e3b1f69";

/// Debian package that provides Docker with `--docker`.
pub const DOCKER_PACKAGE: &str = "docker.io";

/// Packages every derived image gets.
pub const DERIVED_PACKAGES: &[&str] = &["tmux"];

/// root's tmux defaults. The seed's tmux-resurrect/continuum plugins are
/// only published on GitHub, so they are not installed.
pub const TMUX_CONF: &str = "\
# Installed by banger (image build --from-image).
set -g mouse on
set -g history-limit 50000
set -g default-terminal \"tmux-256color\"
set -g base-index 1
setw -g pane-base-index 1
set -g renumber-windows on
set -sg escape-time 10
";

/// What to put in a derived image besides banger's fixed customisation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeriveOptions {
    /// Install Docker (`docker.io`) with containerd and docker enabled.
    pub docker: bool,
    /// More Debian packages.
    pub packages: Vec<String>,
    /// Guest device of the transient VM's work disk, mounted at `/root`.
    pub work_device: String,
}

/// A file the host fetches and feeds to a step's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFile {
    /// [`MISE_URL`], whose sha512 must be [`MISE_SHA512`].
    MiseTarball,
}

impl HostFile {
    /// Where the host downloads it from, and its sha512 (hex).
    pub fn source(self) -> (&'static str, &'static str) {
        match self {
            HostFile::MiseTarball => (MISE_URL, MISE_SHA512),
        }
    }
}

/// One command run in the transient VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStep {
    /// Progress phase name.
    pub name: &'static str,
    /// Progress line.
    pub message: String,
    /// The command (`sh -c SCRIPT sh ARGS...`).
    pub argv: Vec<String>,
    /// A host file streamed to its stdin (else stdin is /dev/null).
    pub stdin: Option<HostFile>,
}

fn sh(script: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut argv = vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()];
    argv.extend(args);
    argv
}

/// Mounts the work disk on `/root`, giving an empty one the image's own
/// `/root` first (as early init does for VMs without a work seed).
const WORK_SCRIPT: &str = r#"set -eu
dev="$1"
mkdir -p /run/banger-work
mount -t ext4 "$dev" /run/banger-work
if [ -z "$(ls -A /run/banger-work | grep -vx 'lost+found' || true)" ]; then
  cp -a /root/. /run/banger-work/
fi
umount /run/banger-work
mount -t ext4 "$dev" /root
"#;

const PACKAGES_SCRIPT: &str = r#"set -eu
if ! command -v apt-get >/dev/null 2>&1; then
  echo "the base image has no apt-get: derived images need a Debian-based base image" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o Acquire::Retries=3 update
apt-get -o Acquire::Retries=3 -o Dpkg::Options::=--force-confold install -y --no-install-recommends "$@"
"#;

const DOCKER_SCRIPT: &str = r#"set -eu
systemctl enable containerd.service docker.service
systemctl is-enabled containerd.service docker.service
"#;

/// Installs mise in the guest from the tarball on stdin (its sha512 is
/// `$1`): the same files the default image gets at build time
/// ([`crate::mise`]).
pub(crate) fn mise_script() -> String {
    use crate::mise::{MISE_BASHRC_LINE, MISE_PATH, MISE_PROFILE};
    format!(
        r#"set -eu
sha512="$1"
tmp=$(mktemp -d /var/tmp/banger-mise.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/mise.tgz"
echo "$sha512  $tmp/mise.tgz" | sha512sum -c --quiet -
tar -xzf "$tmp/mise.tgz" -C "$tmp" package/bin/mise
install -m 0755 "$tmp/package/bin/mise" {MISE_PATH}
{MISE_PATH} --version
cat > /etc/profile.d/mise.sh <<'EOF'
{MISE_PROFILE}EOF
line='{MISE_BASHRC_LINE}'
touch /root/.bashrc
grep -qxF "$line" /root/.bashrc || printf '%s\n' "$line" >> /root/.bashrc
"#
    )
}

const TMUX_SCRIPT: &str = r#"set -eu
[ -e /root/.tmux.conf ] || printf '%s' "$1" > /root/.tmux.conf
"#;

/// Leaves nothing of the transient VM's identity in the image: host keys and
/// machine-id are made per VM, apt's lists and caches are only weight.
const SEAL_SCRIPT: &str = r#"set -eu
apt-get clean
rm -rf /var/lib/apt/lists/*
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /root/.bash_history
sync
"#;

/// The Debian packages a derived image installs.
pub fn derived_packages(o: &DeriveOptions) -> Vec<String> {
    let mut packages: Vec<String> = DERIVED_PACKAGES.iter().map(|s| s.to_string()).collect();
    if o.docker {
        packages.push(DOCKER_PACKAGE.into());
    }
    for p in &o.packages {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    packages
}

/// Checks package names (plain Debian names, optionally pinned).
pub fn check_packages(packages: &[String]) -> Result<(), ImageError> {
    match packages.iter().find(|p| !is_package_name(p)) {
        Some(bad) => Err(ImageError::BadPackage(bad.clone())),
        None => Ok(()),
    }
}

/// The commands that turn a booted base image into the derived one, in
/// order; the last one seals the image for power-off.
pub fn provisioning_steps(o: &DeriveOptions) -> Result<Vec<GuestStep>, ImageError> {
    check_packages(&o.packages)?;
    if !o.work_device.starts_with("/dev/") || o.work_device.contains(char::is_whitespace) {
        return Err(ImageError::Io {
            context: format!("work device {:?}", o.work_device),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a /dev path"),
        });
    }
    let packages = derived_packages(o);
    let mut steps = vec![
        GuestStep {
            name: "work",
            message: "mounting the work disk on /root".into(),
            argv: sh(WORK_SCRIPT, [o.work_device.clone()]),
            stdin: None,
        },
        GuestStep {
            name: "packages",
            message: format!(
                "apt-get install {} (downloads from the image's Debian mirror)",
                packages.join(" ")
            ),
            argv: sh(PACKAGES_SCRIPT, packages),
            stdin: None,
        },
    ];
    if o.docker {
        steps.push(GuestStep {
            name: "docker",
            message: "enabling containerd and docker".into(),
            argv: sh(DOCKER_SCRIPT, []),
            stdin: None,
        });
    }
    steps.push(GuestStep {
        name: "mise",
        message: format!(
            "installing mise {MISE_VERSION} at /usr/local/bin/mise (downloaded by the host from npm)"
        ),
        argv: sh(&mise_script(), [MISE_SHA512.to_string()]),
        stdin: Some(HostFile::MiseTarball),
    });
    steps.push(GuestStep {
        name: "tmux",
        message: "writing root's tmux defaults".into(),
        argv: sh(TMUX_SCRIPT, [TMUX_CONF.to_string()]),
        stdin: None,
    });
    steps.push(GuestStep {
        name: "seal",
        message: "removing host keys, machine-id and apt caches".into(),
        argv: sh(SEAL_SCRIPT, []),
        stdin: None,
    });
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DeriveOptions {
        DeriveOptions {
            docker: false,
            packages: vec![],
            work_device: "/dev/vdb".into(),
        }
    }

    fn names(steps: &[GuestStep]) -> Vec<&'static str> {
        steps.iter().map(|s| s.name).collect()
    }

    #[test]
    fn plain_and_docker_plans() {
        let plain = provisioning_steps(&opts()).expect("plan");
        assert_eq!(names(&plain), ["work", "packages", "mise", "tmux", "seal"]);
        assert_eq!(&plain[1].argv[4..], ["tmux"]);
        let docker = provisioning_steps(&DeriveOptions {
            docker: true,
            packages: vec!["vim".into(), "tmux".into()],
            ..opts()
        })
        .expect("plan");
        assert_eq!(
            names(&docker),
            ["work", "packages", "docker", "mise", "tmux", "seal"]
        );
        assert_eq!(&docker[1].argv[4..], ["tmux", "docker.io", "vim"]);
        assert_eq!(docker[0].argv[4..], ["/dev/vdb"]);
    }

    #[test]
    fn user_input_only_travels_as_arguments() {
        for s in provisioning_steps(&DeriveOptions {
            docker: true,
            packages: vec!["jq".into()],
            ..opts()
        })
        .expect("plan")
        {
            assert_eq!(&s.argv[..2], ["/bin/sh", "-c"], "{}", s.name);
            assert_eq!(s.argv[3], "sh");
            assert!(s.argv[2].starts_with("set -eu\n"), "{}", s.name);
            assert!(!s.argv[2].contains("jq"));
        }
    }

    #[test]
    fn bad_packages_and_devices_are_refused() {
        for bad in ["", "-x", "a;b", "$(reboot)", "Vim", "x y"] {
            let o = DeriveOptions {
                packages: vec![bad.into()],
                ..opts()
            };
            assert!(
                matches!(provisioning_steps(&o), Err(ImageError::BadPackage(_))),
                "{bad:?}"
            );
        }
        for dev in ["vdb", "/dev/vd b", ""] {
            let o = DeriveOptions {
                work_device: dev.into(),
                ..opts()
            };
            assert!(provisioning_steps(&o).is_err(), "{dev:?}");
        }
    }

    #[test]
    fn only_mise_reads_a_host_file() {
        let steps = provisioning_steps(&opts()).expect("plan");
        let with_stdin: Vec<_> = steps
            .iter()
            .filter(|s| s.stdin.is_some())
            .map(|s| s.name)
            .collect();
        assert_eq!(with_stdin, ["mise"]);
        assert_eq!(HostFile::MiseTarball.source(), (MISE_URL, MISE_SHA512));
    }

    #[test]
    fn mise_pin_is_consistent() {
        assert!(MISE_URL.contains(MISE_VERSION));
        assert_eq!(MISE_SHA512.len(), 128);
        assert!(MISE_SHA512.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
