//! What the helper accepts: who may ask, and which arguments are allowed.
//!
//! Every request is turned into a [`Checked`] operation here or refused
//! with a reason; the executor only ever sees checked operations. The
//! bridge and subnet must be exactly the ones in the root-owned system
//! config, TAPs must carry banger's prefix, DNS must be on loopback, and
//! paths must lie inside banger's own directories without `..` or symlinks.

use crate::proto::{ErrorKind, GuardBinding, Op};
use banger_net::{IfName, Subnet, TapName, guard};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};

/// A refused request, with the kind sent back to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Refused,
            message: message.into(),
        }
    }
}

/// The helper's rules, from the install record and the system config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The only uid whose requests are served (root may only say hello).
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The configured bridge; no other bridge is created or used.
    pub bridge: IfName,
    /// The configured subnet; NAT rules only for guests inside it.
    pub subnet: Subnet,
    /// banger's own directories (state, cache, runtime), canonical.
    pub dirs: Vec<PathBuf>,
}

/// An operation whose arguments passed [`Policy::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Hello,
    EnsureBridge,
    BridgeIndex,
    CreateTap(TapName),
    DeleteTap(TapName),
    ListTaps,
    NatEnable(Ipv4Addr),
    NatDisable(Ipv4Addr),
    NatRebuild(Vec<Ipv4Addr>),
    GuardRebuild(guard::Bindings),
    FirewallEnsure {
        guard: Option<guard::Bindings>,
        nat: BTreeSet<Ipv4Addr>,
    },
    GuardAllow(TapName, Ipv4Addr),
    GuardForget(TapName, Ipv4Addr),
    ResolvedWire(SocketAddr),
    ResolvedUnwire,
    /// `dir` is one of [`Policy::dirs`], `rel` a plain relative path in it.
    ChownToOwner {
        dir: PathBuf,
        rel: PathBuf,
    },
    /// `image` is a DNS label, `suite` a plain lowercase word.
    BuildDebianImage {
        image: String,
        suite: String,
    },
}

impl Policy {
    /// Checks that `peer_uid` may ask `op` and that its arguments are
    /// within banger's own things.
    pub fn check(&self, peer_uid: u32, op: Op) -> Result<Checked, Refusal> {
        if peer_uid != self.owner_uid && !(peer_uid == 0 && op == Op::Hello) {
            return Err(Refusal {
                kind: ErrorKind::Unauthorized,
                message: format!(
                    "uid {peer_uid} is not the install owner (uid {}): only bangerd.service may use the root helper",
                    self.owner_uid
                ),
            });
        }
        Ok(match op {
            Op::Hello => Checked::Hello,
            Op::EnsureBridge {
                bridge,
                cidr,
                bridge_ip,
            } => {
                self.bridge(&bridge)?;
                self.subnet(&cidr, bridge_ip)?;
                Checked::EnsureBridge
            }
            Op::BridgeIndex { bridge } => {
                self.bridge(&bridge)?;
                Checked::BridgeIndex
            }
            Op::CreateTap { tap, bridge } => {
                self.bridge(&bridge)?;
                Checked::CreateTap(tap_name(&tap)?)
            }
            Op::DeleteTap { tap } => Checked::DeleteTap(tap_name(&tap)?),
            Op::ListTaps => Checked::ListTaps,
            Op::NatEnable {
                cidr,
                bridge_ip,
                ip,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::NatEnable(self.guest(ip)?)
            }
            Op::NatDisable {
                cidr,
                bridge_ip,
                ip,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::NatDisable(self.guest(ip)?)
            }
            Op::NatRebuild {
                cidr,
                bridge_ip,
                ips,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::NatRebuild(self.guests(ips)?)
            }
            Op::GuardRebuild {
                cidr,
                bridge_ip,
                bindings,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::GuardRebuild(self.bindings(bindings)?)
            }
            Op::FirewallEnsure {
                cidr,
                bridge_ip,
                guard,
                nat,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::FirewallEnsure {
                    guard: guard.map(|b| self.bindings(b)).transpose()?,
                    nat: self.guests(nat)?.into_iter().collect(),
                }
            }
            Op::GuardAllow {
                cidr,
                bridge_ip,
                tap,
                ip,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::GuardAllow(tap_name(&tap)?, self.guest(ip)?)
            }
            Op::GuardForget {
                cidr,
                bridge_ip,
                tap,
                ip,
            } => {
                self.subnet(&cidr, bridge_ip)?;
                Checked::GuardForget(tap_name(&tap)?, self.guest(ip)?)
            }
            Op::ResolvedWire { bridge, dns } => {
                self.bridge(&bridge)?;
                if !dns.ip().is_loopback() {
                    return Err(Refusal::refused(format!(
                        "DNS address {dns} is not on loopback: the host resolver is only pointed at banger's own DNS server"
                    )));
                }
                Checked::ResolvedWire(dns)
            }
            Op::ResolvedUnwire { bridge } => {
                self.bridge(&bridge)?;
                Checked::ResolvedUnwire
            }
            Op::ChownToOwner { path } => {
                let (dir, rel) = self.inside_dirs(&path)?;
                Checked::ChownToOwner { dir, rel }
            }
            Op::BuildDebianImage { image, suite } => Checked::BuildDebianImage {
                image: image_name(&image)?,
                suite: suite_name(&suite)?,
            },
        })
    }

    fn bridge(&self, name: &str) -> Result<(), Refusal> {
        let name = IfName::new(name).map_err(|e| Refusal::refused(e.to_string()))?;
        if name != self.bridge {
            return Err(Refusal::refused(format!(
                "interface {name} is not banger's bridge {} (bridge_name in /etc/banger/config.toml)",
                self.bridge
            )));
        }
        Ok(())
    }

    fn subnet(&self, cidr: &str, bridge_ip: Ipv4Addr) -> Result<(), Refusal> {
        if cidr != self.subnet.cidr().to_string() || bridge_ip != self.subnet.bridge_ip() {
            return Err(Refusal::refused(format!(
                "network {cidr} (bridge {bridge_ip}) is not banger's {} (bridge {}) from /etc/banger/config.toml",
                self.subnet.cidr(),
                self.subnet.bridge_ip()
            )));
        }
        Ok(())
    }

    fn guests(&self, ips: Vec<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, Refusal> {
        ips.into_iter().map(|ip| self.guest(ip)).collect()
    }

    /// One guest address per TAP.
    fn bindings(&self, bindings: Vec<GuardBinding>) -> Result<guard::Bindings, Refusal> {
        let mut checked = guard::Bindings::new();
        for b in bindings {
            if checked
                .insert(tap_name(&b.tap)?, self.guest(b.ip)?)
                .is_some()
            {
                return Err(Refusal::refused(format!("TAP {} is listed twice", b.tap)));
            }
        }
        Ok(checked)
    }

    fn guest(&self, ip: Ipv4Addr) -> Result<Ipv4Addr, Refusal> {
        if self.subnet.is_guest_ip(ip) {
            Ok(ip)
        } else {
            Err(Refusal::refused(format!(
                "{ip} is not a guest address of {}",
                self.subnet.cidr()
            )))
        }
    }

    /// Splits `path` into one of banger's directories and a relative path
    /// of plain names. Refuses relative paths, `.` and `..`, paths outside
    /// the directories, and paths that do not resolve to themselves (a
    /// symlink somewhere). The executor walks the result again name by
    /// name with `O_NOFOLLOW`, so a symlink swapped in after this check is
    /// refused too.
    pub fn inside_dirs(&self, path: &Path) -> Result<(PathBuf, PathBuf), Refusal> {
        let shown = path.display();
        if !path.is_absolute() {
            return Err(Refusal::refused(format!("{shown}: not an absolute path")));
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(Refusal::refused(format!(
                "{shown}: '..' and '.' are not allowed"
            )));
        }
        let Some((dir, rel)) = self.dirs.iter().find_map(|d| {
            path.strip_prefix(d)
                .ok()
                .map(|r| (d.clone(), r.to_path_buf()))
        }) else {
            return Err(Refusal::refused(format!(
                "{shown} is outside banger's directories ({})",
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        match std::fs::canonicalize(path) {
            Ok(real) if real == path => Ok((dir, rel)),
            Ok(real) => Err(Refusal::refused(format!(
                "{shown} goes through a symlink (to {}): refused",
                real.display()
            ))),
            Err(e) => Err(Refusal::refused(format!("{shown}: {e}"))),
        }
    }
}

/// An image name is a DNS label: it becomes a directory name in the image
/// store, so nothing else (no `/`, no `..`) gets through.
fn image_name(name: &str) -> Result<String, Refusal> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(name.to_string())
    } else {
        Err(Refusal::refused(format!(
            "image name {name:?} must be a DNS label (1-63 of a-z, 0-9, -)"
        )))
    }
}

/// A Debian suite is a plain lowercase word (`bookworm`, `trixie`, `sid`).
fn suite_name(suite: &str) -> Result<String, Refusal> {
    if (1..=32).contains(&suite.len()) && suite.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(suite.to_string())
    } else {
        Err(Refusal::refused(format!(
            "Debian suite {suite:?} must be a lowercase word such as bookworm"
        )))
    }
}

fn tap_name(name: &str) -> Result<TapName, Refusal> {
    TapName::new(name).map_err(|e| Refusal::refused(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn policy(dir: &Path) -> Policy {
        Policy {
            owner_uid: 1000,
            owner_gid: 1000,
            bridge: IfName::new("banger0").expect("name"),
            subnet: Subnet::new(
                "172.16.0.0/24".parse().expect("cidr"),
                Ipv4Addr::new(172, 16, 0, 1),
            )
            .expect("subnet"),
            dirs: vec![std::fs::canonicalize(dir).expect("canonical")],
        }
    }

    fn refused(p: &Policy, uid: u32, op: Op) -> Refusal {
        p.check(uid, op).expect_err("must be refused")
    }

    #[test]
    fn only_the_owner_is_served_and_root_may_only_say_hello() {
        let t = tempfile::tempdir().expect("tmp");
        let p = policy(t.path());
        assert_eq!(p.check(1000, Op::Hello), Ok(Checked::Hello));
        assert_eq!(p.check(0, Op::Hello), Ok(Checked::Hello));
        for uid in [0, 1001, 65534] {
            let r = refused(&p, uid, Op::ListTaps);
            assert_eq!(r.kind, ErrorKind::Unauthorized);
            assert!(r.message.contains("not the install owner"), "{r}");
        }
        assert_eq!(refused(&p, 1001, Op::Hello).kind, ErrorKind::Unauthorized);
    }

    #[test]
    fn interface_names_must_be_banger_s() {
        let t = tempfile::tempdir().expect("tmp");
        let p = policy(t.path());
        assert_eq!(
            p.check(
                1000,
                Op::CreateTap {
                    tap: "bgtap1a2b".into(),
                    bridge: "banger0".into()
                }
            ),
            Ok(Checked::CreateTap(TapName::new("bgtap1a2b").expect("tap")))
        );
        for tap in [
            "eth0",
            "bgtap",
            "lo",
            "bgtap/../x",
            "BGTAP1",
            "bgtap0123456789a",
            "",
        ] {
            let r = refused(&p, 1000, Op::DeleteTap { tap: tap.into() });
            assert_eq!(r.kind, ErrorKind::Refused, "{tap}");
        }
        for bridge in ["eth0", "docker0", "banger1", "br x", "../banger0"] {
            let r = refused(
                &p,
                1000,
                Op::CreateTap {
                    tap: "bgtap1".into(),
                    bridge: bridge.into(),
                },
            );
            assert_eq!(r.kind, ErrorKind::Refused, "{bridge}");
            let r = refused(
                &p,
                1000,
                Op::ResolvedUnwire {
                    bridge: bridge.into(),
                },
            );
            assert_eq!(r.kind, ErrorKind::Refused, "{bridge}");
        }
        let r = refused(
            &p,
            1000,
            Op::BridgeIndex {
                bridge: "eth0".into(),
            },
        );
        assert!(r.message.contains("not banger's bridge banger0"), "{r}");
    }

    #[test]
    fn networks_and_addresses_must_be_banger_s() {
        let t = tempfile::tempdir().expect("tmp");
        let p = policy(t.path());
        let gw = Ipv4Addr::new(172, 16, 0, 1);
        assert!(
            p.check(
                1000,
                Op::EnsureBridge {
                    bridge: "banger0".into(),
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw
                }
            )
            .is_ok()
        );
        let r = refused(
            &p,
            1000,
            Op::EnsureBridge {
                bridge: "banger0".into(),
                cidr: "10.0.0.0/8".into(),
                bridge_ip: Ipv4Addr::new(10, 0, 0, 1),
            },
        );
        assert!(r.message.contains("is not banger's 172.16.0.0/24"), "{r}");
        for ip in [
            Ipv4Addr::new(8, 8, 8, 8),
            gw,
            Ipv4Addr::new(172, 16, 0, 0),
            Ipv4Addr::new(172, 16, 0, 255),
        ] {
            let r = refused(
                &p,
                1000,
                Op::NatEnable {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    ip,
                },
            );
            assert_eq!(r.kind, ErrorKind::Refused, "{ip}");
            let r = refused(
                &p,
                1000,
                Op::NatRebuild {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    ips: vec![Ipv4Addr::new(172, 16, 0, 5), ip],
                },
            );
            assert_eq!(r.kind, ErrorKind::Refused, "{ip}");
            for op in [
                Op::GuardAllow {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    tap: "bgtap1".into(),
                    ip,
                },
                Op::GuardForget {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    tap: "bgtap1".into(),
                    ip,
                },
                Op::GuardRebuild {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    bindings: vec![GuardBinding {
                        tap: "bgtap1".into(),
                        ip,
                    }],
                },
                Op::FirewallEnsure {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    guard: Some(vec![GuardBinding {
                        tap: "bgtap1".into(),
                        ip,
                    }]),
                    nat: vec![],
                },
                Op::FirewallEnsure {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    guard: None,
                    nat: vec![ip],
                },
            ] {
                assert_eq!(refused(&p, 1000, op).kind, ErrorKind::Refused, "{ip}");
            }
        }
        // The checks are for banger's TAPs only, one address each.
        let guest = Ipv4Addr::new(172, 16, 0, 5);
        let r = refused(
            &p,
            1000,
            Op::GuardAllow {
                cidr: "172.16.0.0/24".into(),
                bridge_ip: gw,
                tap: "eth0".into(),
                ip: guest,
            },
        );
        assert_eq!(r.kind, ErrorKind::Refused, "{r}");
        let twice = |tap: &str| GuardBinding {
            tap: tap.into(),
            ip: guest,
        };
        let r = refused(
            &p,
            1000,
            Op::GuardRebuild {
                cidr: "172.16.0.0/24".into(),
                bridge_ip: gw,
                bindings: vec![twice("bgtap1"), twice("bgtap1")],
            },
        );
        assert!(r.message.contains("listed twice"), "{r}");
        assert_eq!(
            p.check(
                1000,
                Op::GuardRebuild {
                    cidr: "172.16.0.0/24".into(),
                    bridge_ip: gw,
                    bindings: vec![
                        twice("bgtap1"),
                        GuardBinding {
                            tap: "bgtap2".into(),
                            ip: Ipv4Addr::new(172, 16, 0, 6),
                        },
                    ],
                },
            )
            .map_err(|r| r.message),
            Ok(Checked::GuardRebuild(
                [
                    (TapName::new("bgtap1").expect("tap"), guest),
                    (
                        TapName::new("bgtap2").expect("tap"),
                        Ipv4Addr::new(172, 16, 0, 6)
                    ),
                ]
                .into()
            ))
        );
        // The check of the tables: the same rules for what it is told.
        let ensure = |guard, nat| Op::FirewallEnsure {
            cidr: "172.16.0.0/24".into(),
            bridge_ip: gw,
            guard,
            nat,
        };
        let r = refused(
            &p,
            1000,
            ensure(Some(vec![twice("bgtap1"), twice("bgtap1")]), vec![]),
        );
        assert!(r.message.contains("listed twice"), "{r}");
        let r = refused(&p, 1000, ensure(Some(vec![twice("eth0")]), vec![]));
        assert_eq!(r.kind, ErrorKind::Refused, "{r}");
        assert_eq!(
            p.check(
                1000,
                ensure(Some(vec![twice("bgtap1")]), vec![guest, guest])
            )
            .map_err(|r| r.message),
            Ok(Checked::FirewallEnsure {
                guard: Some([(TapName::new("bgtap1").expect("tap"), guest)].into()),
                nat: [guest].into(),
            })
        );
        assert_eq!(
            p.check(1000, ensure(None, vec![])).map_err(|r| r.message),
            Ok(Checked::FirewallEnsure {
                guard: None,
                nat: BTreeSet::new(),
            })
        );
        assert_eq!(
            refused(&p, 1001, ensure(None, vec![])).kind,
            ErrorKind::Unauthorized
        );
        let r = refused(
            &p,
            1000,
            Op::ResolvedWire {
                bridge: "banger0".into(),
                dns: "1.1.1.1:53".parse().expect("addr"),
            },
        );
        assert!(r.message.contains("not on loopback"), "{r}");
    }

    #[test]
    fn paths_must_stay_inside_banger_s_directories() {
        let t = tempfile::tempdir().expect("tmp");
        let state = t.path().join("state");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(state.join("vms")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, state.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("secret"), state.join("vms/file-link"))
            .expect("symlink");
        let p = policy(&state);
        let state = &p.dirs[0];
        let chown = |path: PathBuf| Op::ChownToOwner { path };

        assert_eq!(
            p.check(1000, chown(state.join("vms"))),
            Ok(Checked::ChownToOwner {
                dir: state.clone(),
                rel: PathBuf::from("vms")
            })
        );
        let cases: Vec<(PathBuf, &str)> = vec![
            (state.join("../outside/secret"), "'..'"),
            (state.join("vms/../../outside"), "'..'"),
            (PathBuf::from("vms"), "not an absolute path"),
            (PathBuf::from("/etc/shadow"), "outside banger's directories"),
            (
                PathBuf::from(format!("{}-sibling/x", state.display())),
                "outside banger's directories",
            ),
            (state.join("link/secret"), "symlink"),
            (state.join("link"), "symlink"),
            (state.join("vms/file-link"), "symlink"),
            (state.join("missing"), "No such file"),
        ];
        for (path, why) in cases {
            let r = refused(&p, 1000, chown(path.clone()));
            assert_eq!(r.kind, ErrorKind::Refused, "{}", path.display());
            assert!(r.message.contains(why), "{}: {r}", path.display());
        }
        // A non-owner is refused before the path is even looked at.
        let r = refused(&p, 1001, chown(state.join("vms")));
        assert_eq!(r.kind, ErrorKind::Unauthorized);
    }

    #[test]
    fn image_builds_take_only_plain_names() {
        let t = tempfile::tempdir().expect("tmp");
        let p = policy(t.path());
        let build = |image: &str, suite: &str| Op::BuildDebianImage {
            image: image.into(),
            suite: suite.into(),
        };
        assert_eq!(
            p.check(1000, build("default", "bookworm")),
            Ok(Checked::BuildDebianImage {
                image: "default".into(),
                suite: "bookworm".into()
            })
        );
        assert!(p.check(1000, build("dev-2", "trixie")).is_ok());
        let long = "a".repeat(64);
        for image in [
            "", "../x", "a/b", "..", ".", "-a", "a-", "A", "a b", "a\0", &long,
        ] {
            let r = refused(&p, 1000, build(image, "bookworm"));
            assert_eq!(r.kind, ErrorKind::Refused, "{image:?}");
        }
        for suite in [
            "",
            "..",
            "../sid",
            "bookworm;rm",
            "sid`x`",
            "$(id)",
            "a b",
            "Sid",
            "b2",
        ] {
            let r = refused(&p, 1000, build("default", suite));
            assert_eq!(r.kind, ErrorKind::Refused, "{suite:?}");
        }
        assert_eq!(
            refused(&p, 1001, build("default", "bookworm")).kind,
            ErrorKind::Unauthorized
        );
        assert_eq!(
            refused(&p, 0, build("default", "bookworm")).kind,
            ErrorKind::Unauthorized
        );
    }
}
