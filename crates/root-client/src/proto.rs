//! The wire protocol between the owner daemon and the root helper: one
//! JSON object per line each way, one answer per request.
//!
//! Every request carries [`PROTOCOL_VERSION`]; the helper refuses any other
//! version before looking at the operation, so a mismatched client gets a
//! clear "restart the services" error instead of a confusing parse error.
//! Arguments travel as plain strings and are validated by the helper
//! (`banger_root_helper::policy`), never trusted because of their type on the client.

use banger_version::BuildInfo;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// The protocol version this build speaks.
/// 2 added [`Op::BuildDebianImage`]; 3 dropped `set_ip_forward` (NAT
/// switches forwarding on by itself, and nothing may switch it off); 4
/// added the guests' address checks ([`Op::GuardRebuild`] and the two
/// after it); 5 added [`Op::FirewallEnsure`].
pub const PROTOCOL_VERSION: u32 = 5;

/// Longest request or reply line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// One request: `{"version":1,"op":{"name":"create_tap",...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub op: Op,
}

/// Everything the helper will do. Nothing else is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// The helper's build and protocol; the only operation root may ask.
    Hello,
    /// Create the configured bridge with the configured address.
    EnsureBridge {
        bridge: String,
        cidr: String,
        bridge_ip: Ipv4Addr,
    },
    BridgeIndex {
        bridge: String,
    },
    /// A TAP owned by the install owner, attached to the bridge.
    CreateTap {
        tap: String,
        bridge: String,
    },
    DeleteTap {
        tap: String,
    },
    ListTaps,
    NatEnable {
        cidr: String,
        bridge_ip: Ipv4Addr,
        ip: Ipv4Addr,
    },
    NatDisable {
        cidr: String,
        bridge_ip: Ipv4Addr,
        ip: Ipv4Addr,
    },
    NatRebuild {
        cidr: String,
        bridge_ip: Ipv4Addr,
        ips: Vec<Ipv4Addr>,
    },
    /// The guests' address checks on the bridge for exactly `bindings`.
    GuardRebuild {
        cidr: String,
        bridge_ip: Ipv4Addr,
        bindings: Vec<GuardBinding>,
    },
    /// Check banger's nftables tables against the address checks for
    /// exactly `guard` (`None`: the checks are off) and NAT for exactly
    /// `nat`; rebuild those someone else changed.
    FirewallEnsure {
        cidr: String,
        bridge_ip: Ipv4Addr,
        guard: Option<Vec<GuardBinding>>,
        nat: Vec<Ipv4Addr>,
    },
    /// Let the guest behind `tap` send as `ip`.
    GuardAllow {
        cidr: String,
        bridge_ip: Ipv4Addr,
        tap: String,
        ip: Ipv4Addr,
    },
    /// Take that away again.
    GuardForget {
        cidr: String,
        bridge_ip: Ipv4Addr,
        tap: String,
        ip: Ipv4Addr,
    },
    ResolvedWire {
        bridge: String,
        dns: SocketAddr,
    },
    ResolvedUnwire {
        bridge: String,
    },
    /// Give a path inside banger's state, cache or runtime directory to the
    /// install owner (repairs files a root-run banger left behind).
    ChownToOwner {
        path: PathBuf,
    },
    /// Build (or find) the Debian image `image` of `suite` in banger's image
    /// store, then give its files to the install owner. Where it goes, the
    /// mirror and the agent baked in are the helper's choice, not the
    /// client's.
    BuildDebianImage {
        image: String,
        suite: String,
    },
}

/// A running VM's TAP and address ([`Op::GuardRebuild`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardBinding {
    pub tap: String,
    pub ip: Ipv4Addr,
}

impl Op {
    /// The operation's wire name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::EnsureBridge { .. } => "ensure_bridge",
            Op::BridgeIndex { .. } => "bridge_index",
            Op::CreateTap { .. } => "create_tap",
            Op::DeleteTap { .. } => "delete_tap",
            Op::ListTaps => "list_taps",
            Op::NatEnable { .. } => "nat_enable",
            Op::NatDisable { .. } => "nat_disable",
            Op::NatRebuild { .. } => "nat_rebuild",
            Op::GuardRebuild { .. } => "guard_rebuild",
            Op::FirewallEnsure { .. } => "firewall_ensure",
            Op::GuardAllow { .. } => "guard_allow",
            Op::GuardForget { .. } => "guard_forget",
            Op::ResolvedWire { .. } => "resolved_wire",
            Op::ResolvedUnwire { .. } => "resolved_unwire",
            Op::ChownToOwner { .. } => "chown_to_owner",
            Op::BuildDebianImage { .. } => "build_debian_image",
        }
    }
}

/// The helper's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error { kind: ErrorKind, message: String },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request's protocol version is not [`PROTOCOL_VERSION`].
    Version,
    /// The peer is not allowed to ask this.
    Unauthorized,
    /// Not a request, or an operation the helper does not offer.
    Malformed,
    /// An argument failed validation.
    Refused,
    /// The operation was allowed but failed.
    Failed,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Hello {
        protocol: u32,
        build: BuildInfo,
        owner_uid: u32,
    },
    Done,
    Bridge {
        created: bool,
        address_added: bool,
        brought_up: bool,
    },
    BridgeIndex(Option<u32>),
    Taps(Vec<Tap>),
    Image(Image),
    /// What [`Op::FirewallEnsure`] made again.
    Repaired {
        guard: bool,
        nat: bool,
    },
}

/// A built Debian image: the image crate's own record travels as is.
pub type Image = banger_image::BuiltImage;

/// A banger TAP as listed by the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tap {
    pub name: String,
    pub controller: Option<u32>,
    pub owner: Option<u32>,
    pub up: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request {
            version: 3,
            op: Op::CreateTap {
                tap: "bgtap1".into(),
                bridge: "banger0".into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"version":3,"op":{"name":"create_tap","tap":"bgtap1","bridge":"banger0"}}"#
        );
        let hello = serde_json::to_string(&Request {
            version: 3,
            op: Op::Hello,
        })
        .expect("json");
        assert_eq!(hello, r#"{"version":3,"op":{"name":"hello"}}"#);
        let e = Response::Error {
            kind: ErrorKind::Refused,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"error":{"kind":"refused","message":"x"}}"#
        );
    }

    #[test]
    fn guard_operations_roundtrip() {
        let r = Request {
            version: PROTOCOL_VERSION,
            op: Op::GuardRebuild {
                cidr: "172.16.0.0/24".into(),
                bridge_ip: Ipv4Addr::new(172, 16, 0, 1),
                bindings: vec![GuardBinding {
                    tap: "bgtap1".into(),
                    ip: Ipv4Addr::new(172, 16, 0, 2),
                }],
            },
        };
        let line = serde_json::to_string(&r).expect("json");
        assert_eq!(
            line,
            r#"{"version":5,"op":{"name":"guard_rebuild","cidr":"172.16.0.0/24","bridge_ip":"172.16.0.1","bindings":[{"tap":"bgtap1","ip":"172.16.0.2"}]}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).expect("parse"), r);
        let ensure = Request {
            version: PROTOCOL_VERSION,
            op: Op::FirewallEnsure {
                cidr: "172.16.0.0/24".into(),
                bridge_ip: Ipv4Addr::new(172, 16, 0, 1),
                guard: None,
                nat: vec![Ipv4Addr::new(172, 16, 0, 2)],
            },
        };
        let line = serde_json::to_string(&ensure).expect("json");
        assert_eq!(
            line,
            r#"{"version":5,"op":{"name":"firewall_ensure","cidr":"172.16.0.0/24","bridge_ip":"172.16.0.1","guard":null,"nat":["172.16.0.2"]}}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&line).expect("parse"),
            ensure
        );
        assert_eq!(
            serde_json::to_string(&Response::Ok(Reply::Repaired {
                guard: true,
                nat: false
            }))
            .expect("json"),
            r#"{"ok":{"repaired":{"guard":true,"nat":false}}}"#
        );
        let bad = r#"{"version":4,"op":{"name":"guard_allow","cidr":"172.16.0.0/24","bridge_ip":"172.16.0.1","tap":"bgtap1","ip":"172.16.0.2","mac":"00:00:00:00:00:01"}}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }

    #[test]
    fn build_debian_image_roundtrips() {
        let r = Request {
            version: PROTOCOL_VERSION,
            op: Op::BuildDebianImage {
                image: "default".into(),
                suite: "bookworm".into(),
            },
        };
        let line = serde_json::to_string(&r).expect("json");
        assert_eq!(
            line,
            r#"{"version":5,"op":{"name":"build_debian_image","image":"default","suite":"bookworm"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).expect("parse"), r);
        // No paths, mirror or agent from the client.
        for bad in [
            r#"{"version":4,"op":{"name":"build_debian_image","image":"d","suite":"bookworm","images_dir":"/etc"}}"#,
            r#"{"version":4,"op":{"name":"build_debian_image","image":"d","suite":"bookworm","mirror":"http://x"}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let reply = Response::Ok(Reply::Image(Image {
            dir: "/var/lib/banger/images/default".into(),
            rootfs: "/var/lib/banger/images/default/rootfs.ext4".into(),
            size_bytes: 1 << 30,
            work_seed: "/var/lib/banger/images/default/work-seed.ext4".into(),
            kernel_name: "debian-bookworm-6.1.0-50-cloud-amd64".into(),
            kernel: "/var/lib/banger/kernels/k/vmlinuz".into(),
            initrd: "/var/lib/banger/kernels/k/initrd.img".into(),
            vmlinux: None,
            kernel_release: "6.1.0-50-cloud-amd64".into(),
            already_existed: false,
        }));
        let text = serde_json::to_string(&reply).expect("json");
        assert_eq!(
            serde_json::from_str::<Response>(&text).expect("parse"),
            reply
        );
    }

    #[test]
    fn unknown_fields_and_operations_do_not_parse() {
        for bad in [
            r#"{"version":1,"op":{"name":"exec","argv":["sh"]}}"#,
            r#"{"version":1,"op":{"name":"delete_tap","tap":"bgtap1","extra":1}}"#,
            r#"{"version":1,"op":{"name":"hello"},"uid":0}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
