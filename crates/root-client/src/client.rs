//! The owner daemon's side: [`HelperClient`] sends operations to the root
//! helper and implements [`HostNet`] with them, so networking code runs
//! unchanged whether the daemon holds CAP_NET_ADMIN or not.

use crate::proto::{
    ErrorKind, GuardBinding, MAX_LINE, Op, PROTOCOL_VERSION, Reply, Request, Response,
};
use banger_net::firewall::Repaired;
use banger_net::host::{BridgeSpec, HostNetError, TapInfo};
use banger_net::link::BridgeChange;
use banger_net::{HostNet, IfName, Subnet, TapName, guard};
use banger_version::BuildInfo;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest a helper operation may take (nft and resolvectl included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest an image build may take: mmdebstrap downloads and installs a
/// few hundred packages, which takes minutes on a slow mirror or disk.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A helper call that failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error(
        "cannot reach the root helper at {socket}: {source} (is bangerd-root.service running? see `banger system status`)"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the root helper at {socket}: {message}")]
    Protocol { socket: PathBuf, message: String },
    #[error("the root helper did not answer {op} within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("root helper, {op}: {message}")]
    Remote {
        op: &'static str,
        kind: ErrorKind,
        message: String,
    },
}

/// What `hello` tells about the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperInfo {
    pub protocol: u32,
    pub build: BuildInfo,
    pub owner_uid: u32,
}

/// A client of the root helper's socket. Each call opens its own
/// connection, so a restarted helper is picked up without reconnect logic.
#[derive(Debug, Clone)]
pub struct HelperClient {
    socket: PathBuf,
}

impl HelperClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `op` and returns the helper's reply.
    pub async fn call(&self, op: Op) -> Result<Reply, HelperError> {
        let after = match op {
            Op::BuildDebianImage { .. } => BUILD_TIMEOUT,
            _ => CALL_TIMEOUT,
        };
        let name = op.name();
        tokio::time::timeout(after, self.call_inner(op))
            .await
            .map_err(|_| HelperError::Timeout { op: name, after })?
    }

    async fn call_inner(&self, op: Op) -> Result<Reply, HelperError> {
        let name = op.name();
        let proto = |message: String| HelperError::Protocol {
            socket: self.socket.clone(),
            message,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| HelperError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let mut line = serde_json::to_vec(&Request {
            version: PROTOCOL_VERSION,
            op,
        })
        .map_err(|e| proto(e.to_string()))?;
        line.push(b'\n');
        let (rd, mut wr) = stream.into_split();
        wr.write_all(&line)
            .await
            .map_err(|e| proto(format!("sending {name}: {e}")))?;
        let mut answer = Vec::new();
        BufReader::new(rd)
            .take(MAX_LINE as u64 * 16)
            .read_until(b'\n', &mut answer)
            .await
            .map_err(|e| proto(format!("reading the answer to {name}: {e}")))?;
        if answer.is_empty() {
            return Err(proto(format!("the helper closed the connection on {name}")));
        }
        match serde_json::from_slice::<Response>(&answer) {
            Ok(Response::Ok(reply)) => Ok(reply),
            Ok(Response::Error { kind, message }) => Err(HelperError::Remote {
                op: name,
                kind,
                message,
            }),
            Err(e) => Err(proto(format!("unreadable answer to {name}: {e}"))),
        }
    }

    /// The helper's build and protocol.
    pub async fn hello(&self) -> Result<HelperInfo, HelperError> {
        match self.call(Op::Hello).await? {
            Reply::Hello {
                protocol,
                build,
                owner_uid,
            } => Ok(HelperInfo {
                protocol,
                build,
                owner_uid,
            }),
            other => Err(self.unexpected("hello", &other)),
        }
    }

    /// Gives `path` (inside banger's directories) to the install owner.
    pub async fn chown_to_owner(&self, path: &Path) -> Result<(), HelperError> {
        self.done(
            "chown_to_owner",
            Op::ChownToOwner {
                path: path.to_path_buf(),
            },
        )
        .await
    }

    /// Has the helper build (or find) the Debian image `image` of `suite`
    /// in banger's image store, owned by the install owner afterwards.
    /// Takes minutes; the helper logs progress to its journal.
    pub async fn build_debian_image(
        &self,
        image: &str,
        suite: &str,
    ) -> Result<banger_image::BuiltImage, HelperError> {
        let op = Op::BuildDebianImage {
            image: image.to_string(),
            suite: suite.to_string(),
        };
        match self.call(op).await? {
            Reply::Image(i) => Ok(i),
            other => Err(self.unexpected("build_debian_image", &other)),
        }
    }

    fn unexpected(&self, op: &str, reply: &Reply) -> HelperError {
        HelperError::Protocol {
            socket: self.socket.clone(),
            message: format!("unexpected answer to {op}: {reply:?}"),
        }
    }

    async fn done(&self, name: &str, op: Op) -> Result<(), HelperError> {
        match self.call(op).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(name, &other)),
        }
    }
}

impl From<HelperError> for HostNetError {
    fn from(e: HelperError) -> Self {
        HostNetError::Helper(e.to_string())
    }
}

fn cidr(subnet: &Subnet) -> String {
    subnet.cidr().to_string()
}

fn wire_bindings(bindings: &guard::Bindings) -> Vec<GuardBinding> {
    bindings
        .iter()
        .map(|(tap, ip)| GuardBinding {
            tap: tap.to_string(),
            ip: *ip,
        })
        .collect()
}

#[async_trait::async_trait]
impl HostNet for HelperClient {
    async fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<BridgeChange, HostNetError> {
        let op = Op::EnsureBridge {
            bridge: bridge.name.to_string(),
            cidr: cidr(&bridge.subnet),
            bridge_ip: bridge.subnet.bridge_ip(),
        };
        match self.call(op).await? {
            Reply::Bridge {
                created,
                address_added,
                brought_up,
            } => Ok(BridgeChange {
                created,
                address_added,
                brought_up,
            }),
            other => Err(self.unexpected("ensure_bridge", &other).into()),
        }
    }

    async fn bridge_index(&self, bridge: &IfName) -> Result<Option<u32>, HostNetError> {
        let op = Op::BridgeIndex {
            bridge: bridge.to_string(),
        };
        match self.call(op).await? {
            Reply::BridgeIndex(i) => Ok(i),
            other => Err(self.unexpected("bridge_index", &other).into()),
        }
    }

    /// The helper always makes the TAP the install owner's; `owner_uid`
    /// must be that owner (the daemon's own uid).
    async fn create_tap(
        &self,
        tap: &TapName,
        _owner_uid: u32,
        bridge: &IfName,
    ) -> Result<(), HostNetError> {
        let op = Op::CreateTap {
            tap: tap.to_string(),
            bridge: bridge.to_string(),
        };
        Ok(self.done("create_tap", op).await?)
    }

    async fn delete_tap(&self, tap: &TapName) -> Result<(), HostNetError> {
        let op = Op::DeleteTap {
            tap: tap.to_string(),
        };
        Ok(self.done("delete_tap", op).await?)
    }

    async fn list_taps(&self) -> Result<Vec<TapInfo>, HostNetError> {
        match self.call(Op::ListTaps).await? {
            Reply::Taps(taps) => Ok(taps
                .into_iter()
                .filter_map(|t| {
                    Some(TapInfo {
                        name: TapName::new(t.name).ok()?,
                        controller: t.controller,
                        owner: t.owner,
                        up: t.up,
                    })
                })
                .collect()),
            other => Err(self.unexpected("list_taps", &other).into()),
        }
    }

    async fn nat_enable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError> {
        let op = Op::NatEnable {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            ip: vm_ip,
        };
        Ok(self.done("nat_enable", op).await?)
    }

    async fn nat_disable(&self, subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), HostNetError> {
        let op = Op::NatDisable {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            ip: vm_ip,
        };
        Ok(self.done("nat_disable", op).await?)
    }

    async fn nat_rebuild(
        &self,
        subnet: &Subnet,
        vm_ips: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), HostNetError> {
        let op = Op::NatRebuild {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            ips: vm_ips.iter().copied().collect(),
        };
        Ok(self.done("nat_rebuild", op).await?)
    }

    async fn guard_rebuild(
        &self,
        subnet: &Subnet,
        bindings: &guard::Bindings,
    ) -> Result<(), HostNetError> {
        let op = Op::GuardRebuild {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            bindings: wire_bindings(bindings),
        };
        Ok(self.done("guard_rebuild", op).await?)
    }

    async fn firewall_ensure(
        &self,
        subnet: &Subnet,
        guard: Option<&guard::Bindings>,
        nat: &BTreeSet<Ipv4Addr>,
    ) -> Result<Repaired, HostNetError> {
        let op = Op::FirewallEnsure {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            guard: guard.map(wire_bindings),
            nat: nat.iter().copied().collect(),
        };
        match self.call(op).await? {
            Reply::Repaired { guard, nat } => Ok(Repaired { guard, nat }),
            other => Err(self.unexpected("firewall_ensure", &other).into()),
        }
    }

    async fn guard_allow(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError> {
        let op = Op::GuardAllow {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            tap: tap.to_string(),
            ip,
        };
        Ok(self.done("guard_allow", op).await?)
    }

    async fn guard_forget(
        &self,
        subnet: &Subnet,
        tap: &TapName,
        ip: Ipv4Addr,
    ) -> Result<(), HostNetError> {
        let op = Op::GuardForget {
            cidr: cidr(subnet),
            bridge_ip: subnet.bridge_ip(),
            tap: tap.to_string(),
            ip,
        };
        Ok(self.done("guard_forget", op).await?)
    }

    async fn resolved_wire(&self, bridge: &IfName, dns: SocketAddr) -> Result<(), HostNetError> {
        let op = Op::ResolvedWire {
            bridge: bridge.to_string(),
            dns,
        };
        Ok(self.done("resolved_wire", op).await?)
    }

    async fn resolved_unwire(&self, bridge: &IfName) -> Result<(), HostNetError> {
        let op = Op::ResolvedUnwire {
            bridge: bridge.to_string(),
        };
        Ok(self.done("resolved_unwire", op).await?)
    }
}
