//! `banger system install|status|restart|uninstall`: banger as two systemd
//! services, the owner daemon (`bangerd.service`, unprivileged) and the
//! root helper (`bangerd-root.service`).

use crate::output;
use anyhow::{Context, bail};
use banger_config::install::{DAEMON_UNIT, HELPER_SOCKET, HELPER_UNIT, SYSTEM_SOCKET};
use banger_config::{InstallPaths, InstallRecord};
use banger_version::BuildInfo;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Subcommand)]
pub enum SystemCommand {
    /// Install banger as systemd services for USER (as root): copies the
    /// binaries to /usr/local, writes /etc/banger/install.toml, installs
    /// and (re)starts bangerd.service and bangerd-root.service.
    Install {
        /// The user the daemon runs as and works for.
        #[arg(long)]
        owner: String,
    },
    /// Show the services, the installed and running versions, and drift.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Restart both services (as root).
    Restart,
    /// Stop and remove the services and binaries (as root). Running VMs are
    /// stopped. User config and keys in the owner's home stay.
    Uninstall {
        /// Also delete /var/lib/banger, /var/cache/banger, /run/banger,
        /// /run/banger-root and /var/lib/banger-root (VMs, images, kernels,
        /// caches).
        #[arg(long)]
        purge: bool,
    },
}

/// The capabilities `bangerd-root.service` may ever hold.
pub const HELPER_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    // dpkg keeps setuid bits and file capabilities when the helper builds
    // an image (mmdebstrap).
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETFCAP",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_SYS_CHROOT",
];

/// Where a system install puts things, under `root` (`/` for real).
#[derive(Debug, Clone)]
pub struct Layout {
    pub lib_dir: PathBuf,
    pub etc_dir: PathBuf,
    /// The system paths `uninstall --purge` deletes, and nothing else.
    pub purge: Vec<PathBuf>,
    pub paths: InstallPaths,
}

impl Layout {
    pub fn under(root: &Path) -> Self {
        let p = |s: &str| root.join(s.trim_start_matches('/'));
        let bin_dir = p("/usr/local/bin");
        let lib_dir = p("/usr/local/lib/banger");
        let unit_dir = p("/etc/systemd/system");
        let paths = InstallPaths {
            banger: bin_dir.join("banger"),
            bangerd: bin_dir.join("bangerd"),
            agent: lib_dir.join("banger-agent"),
            daemon_unit: unit_dir.join(DAEMON_UNIT),
            helper_unit: unit_dir.join(HELPER_UNIT),
            socket: p(SYSTEM_SOCKET),
            helper_socket: p(HELPER_SOCKET),
            state_dir: p("/var/lib/banger"),
            cache_dir: p("/var/cache/banger"),
            runtime_dir: p("/run/banger"),
            helper_runtime_dir: p("/run/banger-root"),
            helper_state_dir: p("/var/lib/banger-root"),
        };
        Self {
            purge: vec![
                paths.state_dir.clone(),
                paths.cache_dir.clone(),
                paths.runtime_dir.clone(),
                paths.helper_runtime_dir.clone(),
                paths.helper_state_dir.clone(),
            ],
            lib_dir,
            etc_dir: p("/etc/banger"),
            paths,
        }
    }

    pub fn record_file(&self) -> PathBuf {
        self.etc_dir.join("install.toml")
    }
}

pub async fn run(cmd: SystemCommand) -> anyhow::Result<i32> {
    let layout = Layout::under(Path::new("/"));
    match cmd {
        SystemCommand::Install { owner } => install(&layout, &owner),
        SystemCommand::Status { json } => status(&layout, json).await,
        SystemCommand::Restart => {
            need_root("system restart")?;
            if InstallRecord::load(&layout.record_file())?.is_none() {
                bail!(
                    "banger is not installed as a system service: run `sudo banger system install --owner USER`"
                );
            }
            systemctl(&["restart", HELPER_UNIT, DAEMON_UNIT])?;
            println!("restarted {HELPER_UNIT} and {DAEMON_UNIT}");
            Ok(0)
        }
        SystemCommand::Uninstall { purge } => uninstall(&layout, purge).await,
    }
}

fn need_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`banger {what}` needs root: run it with sudo");
    }
    Ok(())
}

/// Runs `systemctl args...`; fails with its stderr.
fn systemctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("running systemctl (is systemd installed?)")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `systemctl <verb> unit` output, whatever the exit status
/// (`is-active` says `inactive` with status 3).
fn unit_state(verb: &str, unit: &str) -> String {
    match Command::new("systemctl").args([verb, unit]).output() {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() { "unknown".into() } else { s }
        }
        Err(e) => format!("unknown (systemctl: {e})"),
    }
}

/// Copies `from` to `to` (mode 0755) through a temporary file and a
/// rename, so a running binary is replaced, not overwritten.
fn install_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().context("destination without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = to.with_extension("banger-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(&tmp, Some(0), Some(0))
        .with_context(|| format!("chown {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("moving {} into place", to.display()))?;
    Ok(())
}

/// Quotes a value for a unit file: double quotes, escaped `"`/`\`, and
/// `%` doubled so systemd does not expand specifiers.
fn unit_quote(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

/// `bangerd.service`: the owner daemon, unprivileged, with its state in
/// the system directories and the owner's home read-only.
pub fn daemon_unit(record: &InstallRecord, kvm_group: bool) -> String {
    let p = &record.paths;
    let groups = if kvm_group {
        "SupplementaryGroups=kvm\n"
    } else {
        ""
    };
    format!(
        "# Written by `banger system install` ({version}); re-run it to change.
[Unit]
Description=banger owner daemon (VMs, images, API socket {socket})
Wants={HELPER_UNIT}
After=network.target {HELPER_UNIT}

[Service]
Type=notify
NotifyAccess=main
User={owner}
Group={gid}
{groups}Environment=BANGER_SYSTEM=1
Environment={home}
Environment={agent}
ExecStart={bangerd}
Restart=on-failure
RestartSec=2
# VMs are the daemon's children and keep running across restarts.
KillMode=process
StateDirectory=banger
StateDirectoryMode=0700
CacheDirectory=banger
CacheDirectoryMode=0700
RuntimeDirectory=banger
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectControlGroups=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
",
        version = record.version,
        socket = p.socket.display(),
        owner = record.owner,
        gid = record.owner_gid,
        home = unit_quote(&format!("HOME={}", record.owner_home.display())),
        agent = unit_quote(&format!("BANGER_AGENT={}", p.agent.display())),
        bangerd = unit_quote(&p.bangerd.display().to_string()),
    )
}

/// `bangerd-root.service`: the root helper, with the capability bounding
/// set limited to [`HELPER_CAPABILITIES`].
pub fn helper_unit(record: &InstallRecord) -> String {
    let p = &record.paths;
    let rw = [&p.state_dir, &p.cache_dir, &p.runtime_dir]
        .iter()
        .map(|d| format!("-{}", d.display()))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Written by `banger system install` ({version}); re-run it to change.
[Unit]
Description=banger root helper (privileged host operations for bangerd, socket {socket})
Before={DAEMON_UNIT}
After=network.target

[Service]
Type=notify
NotifyAccess=main
User=root
ExecStart={bangerd} root-helper
Restart=on-failure
RestartSec=2
RuntimeDirectory=banger-root
RuntimeDirectoryMode=0711
StateDirectory=banger-root
StateDirectoryMode=0700
CapabilityBoundingSet={caps}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={rw}
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
",
        version = record.version,
        socket = p.helper_socket.display(),
        bangerd = unit_quote(&p.bangerd.display().to_string()),
        caps = HELPER_CAPABILITIES.join(" "),
    )
}

/// The binaries to install: this `banger` and its siblings.
fn sources() -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let banger = std::env::current_exe().context("locating banger")?;
    let bangerd = banger.with_file_name("bangerd");
    let agent = banger.with_file_name("banger-agent");
    for b in [&bangerd, &agent] {
        if !b.is_file() {
            bail!(
                "{} not found next to {}: build all three binaries (scripts/build.sh) and run the banger from that directory",
                b.display(),
                banger.display()
            );
        }
    }
    Ok((banger, bangerd, agent))
}

fn install(layout: &Layout, owner: &str) -> anyhow::Result<i32> {
    need_root("system install")?;
    if !Path::new("/run/systemd/system").is_dir() {
        bail!(
            "systemd is not running on this host (no /run/systemd/system): the system install needs it; use user mode instead (run banger without installing)"
        );
    }
    let user = nix::unistd::User::from_name(owner)
        .with_context(|| format!("looking up user {owner}"))?
        .with_context(|| format!("no user named {owner:?}: pass an existing login with --owner"))?;
    if user.uid.is_root() {
        bail!(
            "--owner must be an unprivileged user, not root: the point of the install is that bangerd runs without privileges"
        );
    }
    let (banger, bangerd, agent) = sources()?;
    let b = BuildInfo::current();
    let record = InstallRecord {
        version: b.version.clone(),
        commit: b.commit.clone(),
        built_at: b.built_at.clone(),
        installed_at: banger_version::rfc3339_utc(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
        owner: user.name.clone(),
        owner_uid: user.uid.as_raw(),
        owner_gid: user.gid.as_raw(),
        owner_home: user.dir.clone(),
        paths: layout.paths.clone(),
    };
    let previous = InstallRecord::load(&layout.record_file()).ok().flatten();

    install_file(&banger, &record.paths.banger)?;
    install_file(&bangerd, &record.paths.bangerd)?;
    install_file(&agent, &record.paths.agent)?;
    write_state_dirs(&record)?;
    std::fs::create_dir_all(&layout.etc_dir)
        .with_context(|| format!("creating {}", layout.etc_dir.display()))?;
    record.save(&layout.record_file())?;
    let kvm = nix::unistd::Group::from_name("kvm")
        .ok()
        .flatten()
        .is_some();
    write_unit(&record.paths.daemon_unit, &daemon_unit(&record, kvm))?;
    write_unit(&record.paths.helper_unit, &helper_unit(&record))?;

    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "--quiet", HELPER_UNIT, DAEMON_UNIT])?;
    // restart = start when stopped; an upgrade in place picks up the new
    // binaries. The helper first: the daemon asks it for the bridge.
    systemctl(&["restart", HELPER_UNIT])?;
    systemctl(&["restart", DAEMON_UNIT])?;

    match previous {
        Some(p) if p.commit != record.commit || p.version != record.version => println!(
            "upgraded banger {} (commit {}) to {}",
            p.version,
            &p.commit[..p.commit.len().min(8)],
            b.line("banger").trim_start_matches("banger ")
        ),
        Some(_) => println!("reinstalled {}", b.line("banger")),
        None => println!("installed {}", b.line("banger")),
    }
    println!(
        "{DAEMON_UNIT} runs as {} (socket {}); {HELPER_UNIT} runs as root (socket {})",
        record.owner,
        record.paths.socket.display(),
        record.paths.helper_socket.display()
    );
    println!(
        "daily commands (banger vm run, ...) now work as {} without sudo",
        record.owner
    );
    Ok(0)
}

fn write_unit(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("service.banger-new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Creates the state and cache directories for the owner before the
/// services start, so the helper's sandbox can make them writable.
fn write_state_dirs(record: &InstallRecord) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [&record.paths.state_dir, &record.paths.cache_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        std::os::unix::fs::chown(d, Some(record.owner_uid), Some(record.owner_gid))
            .with_context(|| format!("chown {}", d.display()))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

async fn uninstall(layout: &Layout, purge: bool) -> anyhow::Result<i32> {
    need_root("system uninstall")?;
    let record = InstallRecord::load(&layout.record_file()).ok().flatten();
    let paths = record
        .as_ref()
        .map(|r| r.paths.clone())
        .unwrap_or_else(|| layout.paths.clone());
    let units_present = paths.daemon_unit.exists() || paths.helper_unit.exists();
    if units_present && Path::new("/run/systemd/system").is_dir() {
        if unit_state("is-active", DAEMON_UNIT) == "active" {
            // SIGTERM to everything in the unit: the daemon and its VMs.
            let _ = systemctl(&["kill", "--kill-whom=all", DAEMON_UNIT]);
        }
        let _ = systemctl(&["disable", "--quiet", DAEMON_UNIT, HELPER_UNIT]);
        systemctl(&["stop", DAEMON_UNIT, HELPER_UNIT])?;
    }
    let mut removed = Vec::new();
    // The daemon's nftables state (NAT, the guests' address checks) goes
    // with it, unless a daemon in this network namespace still runs (a
    // user-mode one): it would lose its own.
    match daemon_in_this_netns() {
        Some(pid) => println!(
            "kept banger's nftables tables: bangerd (pid {pid}) still runs in this network namespace"
        ),
        None => match banger_net::nat::remove_all().await {
            Ok(true) => removed.push("banger's nftables tables".to_string()),
            Ok(false) => {}
            Err(e) => eprintln!("warning: cannot remove banger's nftables tables: {e}"),
        },
    }
    for f in [
        &paths.daemon_unit,
        &paths.helper_unit,
        &paths.banger,
        &paths.bangerd,
        &paths.agent,
        &layout.record_file(),
    ] {
        match std::fs::remove_file(f) {
            Ok(()) => removed.push(f.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
        }
    }
    // Only if empty: an admin's /etc/banger/config.toml stays.
    let _ = std::fs::remove_dir(&layout.lib_dir);
    let _ = std::fs::remove_dir(&layout.etc_dir);
    if units_present && Path::new("/run/systemd/system").is_dir() {
        systemctl(&["daemon-reload"])?;
    }
    if purge {
        for d in &layout.purge {
            match std::fs::remove_dir_all(d) {
                Ok(()) => removed.push(d.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
            }
        }
    }
    if removed.is_empty() && record.is_none() {
        println!("banger is not installed as a system service; nothing to remove");
        return Ok(0);
    }
    for r in &removed {
        println!("removed {r}");
    }
    // Said only where there is such state: a host that never had a system
    // install (only banger's nftables tables to remove) has none.
    if !purge && (record.is_some() || paths.state_dir.exists() || paths.cache_dir.exists()) {
        println!(
            "kept VM, image and cache state in {} and {} (--purge removes them)",
            paths.state_dir.display(),
            paths.cache_dir.display()
        );
    }
    if let Some(r) = record {
        println!(
            "kept {}'s config and keys under {}",
            r.owner,
            r.owner_home.display()
        );
    }
    Ok(0)
}

/// A `bangerd` process in the caller's network namespace, by pid.
fn daemon_in_this_netns() -> Option<u32> {
    let ours = std::fs::read_link("/proc/self/ns/net").ok()?;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == "bangerd")
                && std::fs::read_link(dir.join("ns/net")).is_ok_and(|ns| ns == ours)
        })
}

/// A warning when `running` is not the build `installed` recorded;
/// `None` when they match or either is a dev/unknown build (a developer's
/// machine, not version skew).
pub fn drift(what: &str, running: &BuildInfo, installed: &BuildInfo) -> Option<String> {
    let dev = |b: &BuildInfo| b.version.ends_with("-dev") || b.commit == "unknown";
    if dev(running) || dev(installed) {
        return None;
    }
    if running.version == installed.version && running.commit == installed.commit {
        return None;
    }
    Some(format!(
        "{what} is {} (commit {}) but the install record says {} (commit {}): re-run `sudo banger system install` or `sudo banger system restart`",
        running.version,
        running.short_commit(),
        installed.version,
        installed.short_commit()
    ))
}

async fn status(layout: &Layout, json: bool) -> anyhow::Result<i32> {
    let Some(record) = InstallRecord::load(&layout.record_file())? else {
        if json {
            output::json(&serde_json::json!({ "installed": false }))?;
        } else {
            println!(
                "banger is not installed as a system service (user mode; `sudo banger system install --owner USER` installs it)"
            );
        }
        return Ok(3);
    };
    let installed = BuildInfo {
        version: record.version.clone(),
        commit: record.commit.clone(),
        built_at: record.built_at.clone(),
    };
    let cli = BuildInfo::current();
    let daemon = banger_api::Client::new(&record.paths.socket)
        .info()
        .await
        .map(|i| i.build)
        .map_err(|e| e.to_string());
    let helper = banger_root_client::HelperClient::new(&record.paths.helper_socket)
        .hello()
        .await
        .map(|h| h.build)
        .map_err(|e| e.to_string());
    let units: Vec<(&str, String, String)> = [DAEMON_UNIT, HELPER_UNIT]
        .into_iter()
        .map(|u| (u, unit_state("is-active", u), unit_state("is-enabled", u)))
        .collect();
    let mut warnings: Vec<String> = Vec::new();
    warnings.extend(drift("the CLI", &cli, &installed));
    if let Ok(d) = &daemon {
        warnings.extend(drift("bangerd", d, &installed));
    }
    if let Ok(h) = &helper {
        warnings.extend(drift("bangerd-root", h, &installed));
    }
    let all_active = units.iter().all(|(_, a, _)| a == "active");
    if json {
        let b = |r: &Result<BuildInfo, String>| match r {
            Ok(b) => serde_json::to_value(b).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": e }),
        };
        output::json(&serde_json::json!({
            "installed": true,
            "owner": record.owner,
            "owner_uid": record.owner_uid,
            "units": units.iter().map(|(u, a, e)| serde_json::json!({"unit": u, "active": a, "enabled": e})).collect::<Vec<_>>(),
            "socket": record.paths.socket,
            "helper_socket": record.paths.helper_socket,
            "install": installed,
            "installed_at": record.installed_at,
            "cli": cli,
            "daemon": b(&daemon),
            "helper": b(&helper),
            "warnings": warnings,
        }))?;
    } else {
        let line = |prog: &str, r: &Result<BuildInfo, String>| match r {
            Ok(b) => b.line(prog),
            Err(e) => format!("not answering: {e}"),
        };
        let mut rows: Vec<Vec<String>> = units
            .iter()
            .map(|(u, a, e)| vec![u.to_string(), format!("{a} ({e})")])
            .collect();
        rows.extend([
            vec![
                "owner".into(),
                format!("{} (uid {})", record.owner, record.owner_uid),
            ],
            vec!["socket".into(), record.paths.socket.display().to_string()],
            vec![
                "helper socket".into(),
                record.paths.helper_socket.display().to_string(),
            ],
            vec![
                "install record".into(),
                format!(
                    "{} (installed {})",
                    installed.line("banger"),
                    record.installed_at
                ),
            ],
            vec!["cli".into(), cli.line("banger")],
            vec!["daemon".into(), line("bangerd", &daemon)],
            vec!["helper".into(), line("bangerd-root", &helper)],
        ]);
        output::table(&rows);
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(if all_active { 0 } else { 3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_in_this_network_namespace_is_found() {
        // A process named bangerd: `sleep` through a link of that name
        // (the name is the exec'd path's).
        let dir = tempfile::tempdir().expect("tmp");
        let fake = dir.path().join("bangerd");
        std::os::unix::fs::symlink("/bin/sleep", &fake).expect("link");
        let mut child = Command::new(&fake).arg("30").spawn().expect("spawn");
        let pid = child.id();
        // `spawn` returns once the exec has replaced the child's memory,
        // and the kernel sets the new name a moment after that.
        let comm = format!("/proc/{pid}/comm");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() != "bangerd") {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never took its name"
            );
            std::thread::yield_now();
        }
        let found = daemon_in_this_netns();
        let _ = child.kill();
        let _ = child.wait();
        // Another bangerd of this namespace (a developer's) would do too.
        let found = found.expect("the fake bangerd");
        assert!(
            found == pid
                || std::fs::read_to_string(format!("/proc/{found}/comm"))
                    .is_ok_and(|c| c.trim_end() == "bangerd"),
            "{found}"
        );
    }

    fn record(layout: &Layout) -> InstallRecord {
        InstallRecord {
            version: "v0.1.0".into(),
            commit: "abcdef0123".into(),
            built_at: "2026-04-28T20:45:50Z".into(),
            installed_at: "2026-04-29T00:00:00Z".into(),
            owner: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            owner_home: "/home/al%ice \"x\"".into(),
            paths: layout.paths.clone(),
        }
    }

    fn build(version: &str, commit: &str) -> BuildInfo {
        BuildInfo {
            version: version.into(),
            commit: commit.into(),
            built_at: "t".into(),
        }
    }

    #[test]
    fn layout_is_the_seed_s() {
        let l = Layout::under(Path::new("/"));
        assert_eq!(l.paths.banger, Path::new("/usr/local/bin/banger"));
        assert_eq!(l.paths.bangerd, Path::new("/usr/local/bin/bangerd"));
        assert_eq!(
            l.paths.agent,
            Path::new("/usr/local/lib/banger/banger-agent")
        );
        assert_eq!(l.paths.socket, Path::new("/run/banger/bangerd.sock"));
        assert_eq!(
            l.paths.helper_socket,
            Path::new("/run/banger-root/bangerd-root.sock")
        );
        assert_eq!(l.record_file(), Path::new("/etc/banger/install.toml"));
        assert_eq!(
            l.purge,
            [
                "/var/lib/banger",
                "/var/cache/banger",
                "/run/banger",
                "/run/banger-root",
                "/var/lib/banger-root"
            ]
            .map(PathBuf::from)
        );
        let t = Layout::under(Path::new("/tmp/x"));
        assert_eq!(t.paths.state_dir, Path::new("/tmp/x/var/lib/banger"));
    }

    #[test]
    fn units_run_the_daemon_unprivileged_and_bound_the_helper() {
        let l = Layout::under(Path::new("/"));
        let r = record(&l);
        let d = daemon_unit(&r, true);
        for line in [
            "User=alice",
            "Group=1000",
            "SupplementaryGroups=kvm",
            "Environment=BANGER_SYSTEM=1",
            "Environment=\"HOME=/home/al%%ice \\\"x\\\"\"",
            "Environment=\"BANGER_AGENT=/usr/local/lib/banger/banger-agent\"",
            "ExecStart=\"/usr/local/bin/bangerd\"",
            "StateDirectory=banger",
            "CacheDirectory=banger",
            "RuntimeDirectory=banger",
            "ProtectHome=read-only",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "Type=notify",
        ] {
            assert!(d.lines().any(|l| l == line), "missing {line:?} in\n{d}");
        }
        assert!(!daemon_unit(&r, false).contains("SupplementaryGroups"));
        let h = helper_unit(&r);
        let caps = h
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("bounding set");
        assert_eq!(
            caps,
            "CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_KILL CAP_MKNOD CAP_NET_ADMIN CAP_NET_RAW CAP_SETGID CAP_SETFCAP CAP_SETUID CAP_SYS_ADMIN CAP_SYS_CHROOT"
        );
        // Image builds install setuid programs into the image.
        assert!(!h.contains("RestrictSUIDSGID"));
        assert!(h.contains("ExecStart=\"/usr/local/bin/bangerd\" root-helper\n"));
        assert!(h.contains("RuntimeDirectory=banger-root\n"));
        assert!(h.contains("User=root\n"));
    }

    #[test]
    fn drift_is_reported_except_for_dev_builds() {
        let a = build("v0.1.0", "aaaaaaaaaa");
        assert_eq!(drift("cli", &a, &a), None);
        let w = drift("the CLI", &build("v0.1.1", "aaaaaaaaaa"), &a).expect("version drift");
        assert!(w.contains("v0.1.1") && w.contains("v0.1.0"), "{w}");
        assert!(drift("bangerd", &build("v0.1.0", "bbbbbbbb"), &a).is_some());
        assert_eq!(drift("cli", &build("v0.1.0-dev", "bbbb"), &a), None);
        assert_eq!(drift("cli", &a, &build("v0.1.0", "unknown")), None);
    }

    #[test]
    fn install_file_replaces_atomically_with_mode_0755() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        std::fs::write(&src, b"new").expect("write");
        let dst = t.path().join("usr/local/bin/banger");
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::write(&dst, b"old").expect("write");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown to root needs root");
            return;
        }
        install_file(&src, &dst).expect("install");
        assert_eq!(std::fs::read(&dst).expect("read"), b"new");
        let mode = std::fs::metadata(&dst).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(!dst.with_extension("banger-new").exists());
    }
}
