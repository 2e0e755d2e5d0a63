//! What the Debian build installs and how mmdebstrap is asked for it:
//! the package list, its checks, backports pins and mmdebstrap's arguments.

use super::DebianBuild;
use crate::ImageError;
use std::ffi::OsString;
use std::path::Path;

/// Packages of the default image on top of mmdebstrap's minbase variant:
/// an init, sshd, the Debian cloud kernel (virtio drivers, small) and its
/// initramfs, the usual tools of a development sandbox, and Docker (the
/// seed's golden image; Debian's `docker.io` with containerd, enabled).
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "openssh-server",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "iproute2",
    "git",
    "curl",
    "ca-certificates",
    "jq",
    "tmux",
    "kmod",
    "udev",
    "dbus",
    "procps",
    "less",
    // `python3 -m http.server` is the quickest web server to try `vm ports` with.
    "python3",
    "docker.io",
    "containerd",
    // apparmor_parser: the guest kernel has AppArmor on, and Docker refuses
    // to start containers unless it can load its profile.
    "apparmor",
];

/// Checks the parts of the spec that end up on command lines and in paths.
pub(super) fn validate(spec: &DebianBuild) -> Result<(), ImageError> {
    let label = |s: &str| {
        (1..=63).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !label(&spec.name) {
        return Err(ImageError::BadName(spec.name.clone()));
    }
    if !label(&spec.suite) {
        return Err(ImageError::BadSuite(spec.suite.clone()));
    }
    if let Some(m) = &spec.mirror
        && (!m.contains("://") || m.starts_with('-') || m.chars().any(char::is_whitespace))
    {
        return Err(ImageError::BadMirror(m.clone()));
    }
    for p in &spec.extra_packages {
        if !is_package_name(p) {
            return Err(ImageError::BadPackage(p.clone()));
        }
    }
    Ok(())
}

/// A Debian package name, optionally pinned with `=version` or `/suite`.
/// mmdebstrap splits `--include` on commas and spaces and treats a leading
/// `?`, `!`, `~`, `(`, `/` or `.` as an apt pattern or a path, so plain names
/// are all that is accepted.
pub(crate) fn is_package_name(p: &str) -> bool {
    let (name, pin) = match p.find(['=', '/']) {
        Some(i) => (&p[..i], Some(&p[i + 1..])),
        None => (p, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let pin_ok = pin.is_none_or(|v| {
        !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.~:".contains(&b))
    });
    name_ok && pin_ok
}

/// mmdebstrap's mirror when none is configured.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The `*-backports` releases `packages` are pinned to (`name/release`),
/// each once. Release names are checked by [`is_package_name`]: letters,
/// digits and `+-.~:` only.
pub(super) fn backports_releases(packages: &[String]) -> Vec<&str> {
    let mut releases: Vec<&str> = packages
        .iter()
        .filter_map(|p| p.split_once('/').map(|(_, release)| release))
        .filter(|r| r.ends_with("-backports"))
        .collect();
    releases.sort_unstable();
    releases.dedup();
    releases
}

pub(super) fn package_list(spec: &DebianBuild) -> Vec<String> {
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    for p in &spec.extra_packages {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    packages
}

pub(super) fn mmdebstrap_args(
    spec: &DebianBuild,
    packages: &[String],
    tree: &Path,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        // apt and dpkg output as lines instead of progress bars.
        "--verbose",
        "--aptopt=Acquire::Retries \"3\"",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(format!("--include={}", packages.join(",")).into());
    // A package pinned to a backports release (`qemu-system-x86/bookworm-
    // backports`) needs that release in apt's sources, which mmdebstrap's
    // defaults (the suite, its updates and security) lack: a setup hook
    // adds it before apt's first update.
    for release in backports_releases(packages) {
        let mirror = spec
            .mirror
            .as_deref()
            .unwrap_or(DEFAULT_MIRROR)
            .replace('\'', "'\\''");
        args.push(
            format!(
                "--setup-hook=echo 'deb {mirror} {release} main' > \"$1/etc/apt/sources.list.d/{release}.list\""
            )
            .into(),
        );
    }
    args.push("--".into());
    args.push(spec.suite.clone().into());
    args.push(tree.into());
    if let Some(m) = &spec.mirror {
        args.push(m.into());
    }
    args
}
