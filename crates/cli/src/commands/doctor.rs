//! `banger doctor`: can this host run banger VMs, and with what defaults?

use crate::connect;
use crate::output;
use banger_config::{Config, HostResources, effective_defaults};
use banger_version::BuildInfo;
use banger_vmm::{BackendKind, host};
use clap::Args;
use serde::Serialize;
use std::path::Path;

#[derive(Args)]
pub struct DoctorArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pass,
    /// Not needed by this setup; says what would need it.
    Note,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    status: Status,
    detail: String,
}

/// The `warm start` row, from the running daemon's answer.
fn warm_check(w: &banger_api::WarmInfo) -> Check {
    if w.setting == "off" {
        return check(
            "warm start",
            Status::Warn,
            "warm_start = \"off\": VMs always boot cold",
        );
    }
    if !w.supported {
        return check(
            "warm start",
            Status::Warn,
            format!("{}: VMs boot cold", w.detail),
        );
    }
    let disks = if w.reflink {
        "disks reflinked".to_string()
    } else {
        "no reflink on this file system: each warm VM copies the template's disks".to_string()
    };
    check(
        "warm start",
        Status::Pass,
        format!(
            "{}: snapshot/restore ({}); {} template(s), {}; {disks}",
            w.detail,
            w.setting,
            w.templates,
            banger_model::ByteSize(w.template_bytes).human()
        ),
    )
}

fn check(name: &str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        status,
        detail: detail.into(),
    }
}

/// Lowest QEMU with a usable `microvm` machine and ACPI device discovery.
const QEMU_MIN: (u32, u32, u32) = (7, 2, 0);

fn triple(v: &host::Version) -> (u32, u32, u32) {
    (v.major, v.minor, v.patch)
}

pub async fn run(a: DoctorArgs) -> anyhow::Result<i32> {
    let mut checks = Vec::new();
    let paths = crate::connect::daemon_paths();
    let config = match &paths {
        Ok(p) => match Config::load(p) {
            Ok(c) => {
                checks.push(check(
                    "config",
                    Status::Pass,
                    format!("{}", p.config_file.display()),
                ));
                Some(c)
            }
            Err(e) => {
                checks.push(check("config", Status::Fail, e.to_string()));
                None
            }
        },
        Err(e) => {
            checks.push(check("config", Status::Fail, format!("{e:#}")));
            None
        }
    };
    let config = config.unwrap_or_default();

    if std::env::consts::ARCH == "x86_64" {
        checks.push(check("architecture", Status::Pass, "x86_64"));
    } else {
        checks.push(check(
            "architecture",
            Status::Fail,
            format!(
                "{}: banger supports x86_64 hosts only",
                std::env::consts::ARCH
            ),
        ));
    }

    let kvm = host::kvm_status();
    checks.push(check(
        "kvm",
        if kvm.is_usable() {
            Status::Pass
        } else {
            Status::Warn
        },
        kvm.to_string(),
    ));

    let (vmm_rows, backend) = vmm_checks(&config);
    checks.extend(vmm_rows);
    let qemu_chosen = matches!(backend, Some(BackendKind::Qemu(_)));
    checks.extend(qemu_checks(&config, qemu_chosen));
    for (tool, pkg, why) in [
        (
            "mkfs.ext4",
            "e2fsprogs",
            "image builds, OCI pulls and work disks",
        ),
        ("ssh", "openssh-client", "vm ssh"),
    ] {
        checks.push(match host::find_binary(tool, None) {
            Some(p) => check(tool, Status::Pass, p.display().to_string()),
            None => check(
                tool,
                Status::Fail,
                format!("not found (needed for {why}): {}", install_hint(pkg)),
            ),
        });
    }
    let running = connect::running_client().await;
    let image_names: Option<Vec<String>> = match &running {
        Ok(Some(c)) => c
            .list_images()
            .await
            .ok()
            .map(|v| v.into_iter().map(|i| i.name).collect()),
        _ => None,
    };
    checks.push(mmdebstrap_check(
        host::find_binary("mmdebstrap", None).as_deref(),
        &config.default_image_name,
        image_names.as_deref(),
    ));

    let d = effective_defaults(&config.vm_defaults, &HostResources::detect());
    let summary = d.summary();
    let mut detail = summary.trim_start_matches("spec: ").to_string();
    if let Some(note) = memory_cost_note(d.memory_mib, !kvm.is_usable()) {
        detail.push_str("; ");
        detail.push_str(&note);
    }
    checks.push(check("vm_defaults", Status::Pass, detail));

    let cli = BuildInfo::current();
    let mut net_status = None;
    let mut daemon_up = false;
    match &running {
        Ok(Some(c)) => match c.info().await {
            Ok(info) => {
                daemon_up = true;
                net_status = Some(c.network().await.map_err(|e| e.to_string()));
                let drift = info.build.commit != cli.commit || info.build.version != cli.version;
                checks.push(check(
                    "daemon",
                    if drift { Status::Warn } else { Status::Pass },
                    if drift {
                        format!(
                            "bangerd {} ({}) differs from this banger {} ({}): restart it with `banger daemon stop`",
                            info.build.version,
                            info.build.short_commit(),
                            cli.version,
                            cli.short_commit()
                        )
                    } else {
                        format!("pid {}, {}; backend {}", info.pid, info.build.line("bangerd"), info.backend_reason)
                    },
                ));
                checks.push(warm_check(&info.warm));
            }
            Err(e) => checks.push(check("daemon", Status::Warn, e.to_string())),
        },
        Ok(None) => checks.push(check(
            "daemon",
            Status::Pass,
            "not running (banger starts it on demand)",
        )),
        Err(e) => checks.push(check("daemon", Status::Warn, e.to_string())),
    }

    match connect::system_install() {
        Ok(Some(r)) => {
            let installed = BuildInfo {
                version: r.version.clone(),
                commit: r.commit.clone(),
                built_at: r.built_at.clone(),
            };
            checks.push(
                match super::system::drift("this banger", &cli, &installed) {
                    Some(w) => check("install", Status::Warn, w),
                    None => check(
                        "install",
                        Status::Pass,
                        format!(
                            "system install {} for {} (installed {}); see `banger system status`",
                            installed.line("banger"),
                            r.owner,
                            r.installed_at
                        ),
                    ),
                },
            );
        }
        Ok(None) => {}
        Err(e) => checks.push(check("install", Status::Warn, format!("{e:#}"))),
    }

    checks.extend(network_checks(net_status));
    checks.push(cidr_check(&config).await);
    checks.push(web_check(config.web_listen_addr, daemon_up).await);

    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if a.json {
        output::json(&checks)?;
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                let s = match c.status {
                    Status::Pass => "pass",
                    Status::Note => "note",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                };
                vec![s.to_string(), c.name.clone(), c.detail.clone()]
            })
            .collect();
        output::table(&rows);
    }
    Ok(if failed { 1 } else { 0 })
}

/// Networking rows: what the daemon reports when it runs, else what can be
/// seen from here.
fn network_checks(daemon: Option<Result<banger_api::NetworkStatus, String>>) -> Vec<Check> {
    let mut out = Vec::new();
    let n = match daemon {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            out.push(check(
                "network",
                Status::Warn,
                format!("asking the daemon: {e}"),
            ));
            return out;
        }
        None => {
            out.push(check(
                "network",
                Status::Pass,
                "daemon not running: networking is checked once it runs",
            ));
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun");
            out.push(match tun {
                Ok(_) => check("tun", Status::Pass, "/dev/net/tun opens read-write"),
                Err(e) => check("tun", Status::Warn, format!("/dev/net/tun: {e}")),
            });
            return out;
        }
    };
    out.push(match n.mode.as_str() {
        "bridge" => check(
            "network",
            Status::Pass,
            format!(
                "bridge {} on {} (gateway {}), TAP pool {}",
                n.bridge,
                n.cidr,
                n.bridge_ip,
                n.tap_pool
                    .map(|p| {
                        let made = p
                            .last_create_us
                            .map(|us| format!(", a TAP takes {:.1} ms to make", us as f64 / 1000.0))
                            .unwrap_or_default();
                        format!("{}/{} ready{made}", p.idle, p.configured)
                    })
                    .unwrap_or_else(|| "-".into())
            ),
        ),
        "user" => check(
            "network",
            Status::Warn,
            format!(
                "user-mode (QEMU slirp; VMs not reachable by address, ssh forwarded on 127.0.0.1): {}",
                n.reason
            ),
        ),
        _ => check("network", Status::Fail, n.reason.clone()),
    });
    let bridge = n.mode == "bridge";
    out.push(match &n.nft_version {
        Some(v) => check("nft", Status::Pass, v.clone()),
        None => check(
            "nft",
            if bridge { Status::Fail } else { Status::Warn },
            format!("nft not found (NAT needs it): {}", install_hint("nftables")),
        ),
    });
    out.push(match n.ip_forward {
        Some(true) => check("ip_forward", Status::Pass, "net.ipv4.ip_forward = 1"),
        Some(false) => check(
            "ip_forward",
            Status::Pass,
            "net.ipv4.ip_forward = 0 (banger turns it on when a VM gets NAT)",
        ),
        None => check(
            "ip_forward",
            Status::Warn,
            "net.ipv4.ip_forward is unreadable",
        ),
    });
    out.push(match &n.dns_error {
        None => check(
            "dns",
            Status::Pass,
            format!(".vm zone served on {}", n.dns_listen),
        ),
        Some(e) => check(
            "dns",
            Status::Warn,
            format!(
                "no .vm DNS server on {}: {e} (set dns_listen_addr)",
                n.dns_listen
            ),
        ),
    });
    out.push(check(
        "dns_routing",
        if n.resolver_ok {
            Status::Pass
        } else {
            Status::Warn
        },
        n.resolver_detail.clone(),
    ));
    out.push(check(
        "guest_addresses",
        if n.guard_ok {
            Status::Pass
        } else {
            Status::Warn
        },
        n.guard_detail.clone(),
    ));
    out.push(check(
        "tun",
        if n.tun_ok {
            Status::Pass
        } else if bridge {
            Status::Fail
        } else {
            Status::Warn
        },
        n.tun_detail.clone(),
    ));
    out
}

/// QEMU and its firmware: failures when QEMU is the backend, notes when
/// another backend is chosen (`vmm = "qemu"` would need them).
fn qemu_checks(config: &Config, chosen: bool) -> Vec<Check> {
    let missing = |name: &str, what: String| {
        if chosen {
            check(name, Status::Fail, what)
        } else {
            check(
                name,
                Status::Note,
                format!("{what} (not needed: QEMU is not the backend here)"),
            )
        }
    };
    let hint = install_hint("qemu-system-x86");
    let qemu = match host::find_binary("qemu-system-x86_64", config.qemu_bin.as_deref()) {
        Some(bin) => match host::qemu_version(&bin) {
            Ok(v) if triple(&v) >= QEMU_MIN => {
                check("qemu", Status::Pass, format!("{} {v}", bin.display()))
            }
            Ok(v) => missing(
                "qemu",
                format!(
                    "{} is {v}; banger needs ≥ {}.{}.{}",
                    bin.display(),
                    QEMU_MIN.0,
                    QEMU_MIN.1,
                    QEMU_MIN.2
                ),
            ),
            Err(e) => missing("qemu", format!("{}: {e}", bin.display())),
        },
        None => missing("qemu", format!("qemu-system-x86_64 not found: {hint}")),
    };
    let rom = Path::new(QBOOT_ROM);
    let qboot = if rom.is_file() {
        check("qboot", Status::Pass, rom.display().to_string())
    } else {
        missing("qboot", format!("{} missing: {hint}", rom.display()))
    };
    vec![qemu, qboot]
}

/// QEMU's firmware for the microvm machine.
const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";

/// mmdebstrap builds the default image: a failure only when that image
/// must still be built (`images`: the daemon's image names, when it runs).
fn mmdebstrap_check(found: Option<&Path>, default_image: &str, images: Option<&[String]>) -> Check {
    let have_default = images.map(|names| names.iter().any(|n| n == default_image));
    match (found, have_default) {
        (Some(p), _) => check("mmdebstrap", Status::Pass, p.display().to_string()),
        (None, Some(true)) => check(
            "mmdebstrap",
            Status::Note,
            format!(
                "not found; not needed while image {default_image} exists (building images needs it: {})",
                install_hint("mmdebstrap")
            ),
        ),
        (None, Some(false)) => check(
            "mmdebstrap",
            Status::Fail,
            format!(
                "not found, and image {default_image} must be built with it: {} (or register an image: banger image register)",
                install_hint("mmdebstrap")
            ),
        ),
        (None, None) => check(
            "mmdebstrap",
            Status::Warn,
            format!(
                "not found: building the default image {default_image} needs it: {}",
                install_hint("mmdebstrap")
            ),
        ),
    }
}

/// The Firecracker binary and its version, then the backend `vmm` picks
/// here and why (and which, when one can be chosen).
fn vmm_checks(config: &Config) -> (Vec<Check>, Option<BackendKind>) {
    use banger_vmm::firecracker::{self, VersionVerdict};
    let explicit = config.vmm.as_str() == "firecracker";
    let facts = banger_vmm::HostFacts::probe(
        config.firecracker_bin.as_deref(),
        config.qemu_bin.as_deref(),
    );
    let fc = match &facts.firecracker {
        Some(found) => {
            let status = match found.version {
                VersionVerdict::Supported(_) => Status::Pass,
                _ if explicit && !found.version.is_usable() => Status::Fail,
                _ => Status::Warn,
            };
            check(
                "firecracker",
                status,
                format!("{} {}", found.binary.display(), found.version),
            )
        }
        None => check(
            "firecracker",
            if explicit { Status::Fail } else { Status::Pass },
            format!(
                "not found (optional; needs working KVM): install v{} from its GitHub release or set firecracker_bin",
                firecracker::TESTED
            ),
        ),
    };
    let (backend, kind) = match banger_vmm::select_backend(config.vmm, &facts) {
        Ok(sel) => (
            check(
                "backend",
                Status::Pass,
                format!("{}: {}", sel.kind, sel.reason),
            ),
            Some(sel.kind),
        ),
        Err(e) => (check("backend", Status::Fail, e.to_string()), None),
    };
    (vec![fc, backend], kind)
}

/// Whether `cidr` is free on this host: bridge networking is refused when
/// an address or route of another interface overlaps it.
async fn cidr_check(config: &Config) -> Check {
    let settings = match banger_net::NetSettings::from_config(config) {
        Ok(s) => s,
        Err(e) => return check("cidr", Status::Fail, e.to_string()),
    };
    let cidr = settings.subnet.cidr();
    let uses = match banger_net::link::Netlink::connect() {
        Ok(nl) => nl.cidr_uses(cidr, settings.bridge.as_str()).await,
        Err(e) => {
            return check(
                "cidr",
                Status::Warn,
                format!("cannot read the host's routes: {e}"),
            );
        }
    };
    cidr_row(cidr, uses.map_err(|e| e.to_string()))
}

fn cidr_row(
    cidr: impl std::fmt::Display,
    uses: Result<Vec<banger_net::link::CidrUse>, String>,
) -> Check {
    match uses {
        Ok(u) if u.is_empty() => check(
            "cidr",
            Status::Pass,
            format!("{cidr} is not used by this host"),
        ),
        Ok(u) => check(
            "cidr",
            Status::Fail,
            format!(
                "{cidr} overlaps {}: bridge networking is refused; set cidr in config.toml to a \
                 range this host does not use, e.g. cidr = \"10.213.0.0/24\"",
                u.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => check(
            "cidr",
            Status::Warn,
            format!("cannot read the host's routes: {e}"),
        ),
    }
}

/// The web UI: off, loopback-only (and answering, when the daemon runs), or
/// exposed beyond this machine, which only an explicit `web_listen_addr`
/// does and which deserves a warning.
async fn web_check(addr: Option<std::net::SocketAddr>, daemon_up: bool) -> Check {
    let Some(addr) = addr else {
        return check("web_ui", Status::Pass, "disabled (web_listen_addr = \"\")");
    };
    if !addr.ip().to_canonical().is_loopback() {
        return check(
            "web_ui",
            Status::Warn,
            format!(
                "listens on {addr}, beyond loopback: it still serves only your own \
                 connections from this machine (others get 403), so other machines cannot \
                 use it; set web_listen_addr = \"127.0.0.1:{}\" and use ssh -L from elsewhere",
                addr.port()
            ),
        );
    }
    if !daemon_up {
        return check(
            "web_ui",
            Status::Pass,
            format!("http://{addr}/ once the daemon runs"),
        );
    }
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    match probe {
        Ok(Ok(_)) => check("web_ui", Status::Pass, format!("http://{addr}/")),
        _ => check(
            "web_ui",
            Status::Warn,
            format!(
                "nothing answers on {addr}: another program may hold the port (see \
                 bangerd.log); set web_listen_addr to a free address, or \"\" to disable it"
            ),
        ),
    }
}

/// An install hint for the host's distribution.
fn install_hint(pkg: &str) -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let like = |id: &str| {
        os.lines()
            .any(|l| (l.starts_with("ID=") || l.starts_with("ID_LIKE=")) && l.contains(id))
    };
    if like("debian") || like("ubuntu") {
        format!("apt-get install {pkg}")
    } else if like("fedora") || like("rhel") {
        format!("dnf install {pkg}")
    } else if like("arch") {
        format!("pacman -S {pkg}")
    } else {
        format!("install {pkg} with your package manager")
    }
}

/// Seconds an emulated (TCG) guest kernel spends per GiB of memory at every
/// boot, initialising its page structures before it starts userspace
/// (measured with the Debian cloud kernel under QEMU 10 TCG: `Run /init`
/// 0.9 s later with 4 GiB than with 1 GiB).
const TCG_BOOT_SECS_PER_GIB: f64 = 0.3;

/// What the default memory costs every boot, when the host heuristic (not
/// the user) chose more than the floor and guests are emulated.
fn memory_cost_note(memory: banger_model::SpecValue<u64>, tcg: bool) -> Option<String> {
    let extra_gib = memory
        .value
        .saturating_sub(banger_config::BUILTIN_MEMORY_MIB) as f64
        / 1024.0;
    if !tcg || memory.source != banger_model::Provenance::Host || extra_gib < 0.5 {
        return None;
    }
    Some(format!(
        "each boot spends about {:.1} s setting up the {:.1} GiB above 1 GiB under emulation \
         (~{TCG_BOOT_SECS_PER_GIB} s per GiB): set [vm_defaults] memory_mib to what your guests need",
        extra_gib * TCG_BOOT_SECS_PER_GIB,
        extra_gib
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_cidr_fails_naming_the_interface_and_the_key() {
        let used = vec![banger_net::link::CidrUse {
            what: "address 172.16.0.2/24".into(),
            interface: "eth0".into(),
        }];
        let c = cidr_row("172.16.0.0/24", Ok(used));
        assert_eq!(c.status, Status::Fail);
        for needle in [
            "172.16.0.0/24 overlaps address 172.16.0.2/24 on eth0",
            "set cidr in config.toml",
        ] {
            assert!(c.detail.contains(needle), "{}", c.detail);
        }
        assert_eq!(cidr_row("10.213.0.0/24", Ok(vec![])).status, Status::Pass);
        assert_eq!(
            cidr_row("10.213.0.0/24", Err("x".into())).status,
            Status::Warn
        );
    }

    #[test]
    fn the_memory_a_boot_pays_for_is_said_under_emulation_only() {
        use banger_model::{Provenance, SpecValue};
        let host = |m| SpecValue::new(m, Provenance::Host);
        let note = memory_cost_note(host(3072), true).expect("note");
        assert!(note.starts_with("each boot spends about 0.6 s"), "{note}");
        assert!(note.contains("memory_mib"), "{note}");
        assert_eq!(memory_cost_note(host(3072), false), None);
        assert_eq!(memory_cost_note(host(1024), true), None);
        assert_eq!(
            memory_cost_note(SpecValue::new(4096, Provenance::Config), true),
            None
        );
    }

    fn addr(s: &str) -> Option<std::net::SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    #[test]
    fn mmdebstrap_fails_only_when_the_default_image_must_be_built() {
        let img = "debian-bookworm";
        let have = vec![img.to_string()];
        let other = vec!["alpine".to_string()];
        let found = Path::new("/usr/bin/mmdebstrap");
        assert_eq!(
            mmdebstrap_check(Some(found), img, None).status,
            Status::Pass
        );
        assert_eq!(
            mmdebstrap_check(None, img, Some(&have)).status,
            Status::Note
        );
        let c = mmdebstrap_check(None, img, Some(&other));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("image register"), "{}", c.detail);
        assert_eq!(mmdebstrap_check(None, img, None).status, Status::Warn);
    }

    #[test]
    fn missing_qemu_is_a_note_unless_it_is_the_backend() {
        let config = Config {
            qemu_bin: Some("/nonexistent/qemu-system-x86_64".into()),
            ..Config::default()
        };
        // A configured absolute path is used as it is: here, a missing one.
        let rows = qemu_checks(&config, false);
        let qemu = rows.iter().find(|c| c.name == "qemu").expect("qemu row");
        assert_eq!(qemu.status, Status::Note, "{}", qemu.detail);
        assert!(qemu.detail.contains("not needed"), "{}", qemu.detail);
        assert!(rows.iter().all(|c| c.status != Status::Fail));
        let chosen = qemu_checks(&config, true);
        let qemu = chosen.iter().find(|c| c.name == "qemu").expect("qemu row");
        assert_eq!(qemu.status, Status::Fail, "{}", qemu.detail);
    }

    #[tokio::test]
    async fn web_ui_row_warns_about_exposure_and_silence() {
        let off = web_check(None, true).await;
        assert_eq!(off.status, Status::Pass);
        assert!(off.detail.contains("disabled"), "{}", off.detail);

        for exposed in ["0.0.0.0:7777", "[::]:7777", "192.168.1.5:7777"] {
            let c = web_check(addr(exposed), false).await;
            assert_eq!(c.status, Status::Warn, "{exposed}");
            assert!(c.detail.contains("127.0.0.1:7777"), "{}", c.detail);
        }

        let idle = web_check(addr("127.0.0.1:7777"), false).await;
        assert_eq!(idle.status, Status::Pass);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let live = listener.local_addr().expect("addr");
        let c = web_check(Some(live), true).await;
        assert_eq!(c.status, Status::Pass, "{}", c.detail);
        assert_eq!(c.detail, format!("http://{live}/"));
        drop(listener);
        // A bound socket that does not listen keeps its port from every other
        // program and refuses connections: silence that no parallel test can
        // fill, unlike a port left free after a listener is dropped.
        let silent = tokio::net::TcpSocket::new_v4().expect("socket");
        silent
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let quiet = silent.local_addr().expect("addr");
        let c = web_check(Some(quiet), true).await;
        assert_eq!(c.status, Status::Warn, "{}", c.detail);
        assert!(c.detail.contains("nothing answers"), "{}", c.detail);
    }
}
