//! Links through netlink (bridge, addresses, TAP attachment) and TAP
//! creation through `/dev/net/tun`.
//!
//! A [`Netlink`] handle talks to the network namespace of the thread that
//! created it; TAP devices are created in the namespace of the calling
//! thread. Callers outside this crate reach these operations through
//! [`crate::HostNet`].

use crate::alloc::MacAddr;
use crate::ifname::{IfName, TAP_PREFIX, TapName};
use futures::TryStreamExt;
use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoTun, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use std::net::{IpAddr, Ipv4Addr};

/// An address or route of the host inside a range banger wants for its
/// guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrUse {
    /// `address 172.16.0.15/24` or `route 172.16.0.0/16`.
    pub what: String,
    /// The interface it is on.
    pub interface: String,
}

impl std::fmt::Display for CidrUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.what, self.interface)
    }
}

/// Whether two IPv4 networks share any address.
pub fn overlaps(a: ipnet::Ipv4Net, b: ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A netlink or `/dev/net/tun` operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{op} {link}: {source}")]
    Netlink {
        op: &'static str,
        link: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{link} exists but is a {kind}, not a bridge: remove it or set another bridge_name")]
    NotABridge { link: String, kind: String },
    #[error("bridge {0} does not exist: it must be set up before TAPs are attached")]
    NoBridge(String),
    #[error("TAP {0} already exists")]
    TapExists(String),
    #[error("creating TAP {tap} through /dev/net/tun: {source}")]
    Tun {
        tap: String,
        #[source]
        source: std::io::Error,
    },
}

fn nl_err(op: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let link = link.to_string();
    move |e| LinkError::Netlink {
        op,
        link,
        source: to_io(e),
    }
}

fn to_io(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// What one link looks like, as far as banger cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    /// `bridge`, `tun`, `veth`, ...; empty for links without a kind.
    pub kind: String,
    /// Index of the bridge the link is attached to.
    pub controller: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// For TUN/TAP devices: the owning uid (`None`: any user with
    /// CAP_NET_ADMIN only).
    pub tun_owner: Option<u32>,
    /// For TUN/TAP devices: whether it is a TAP (Ethernet frames).
    pub is_tap: bool,
    /// For TUN/TAP devices: persistent (outlives the process that made it).
    pub persistent: bool,
    /// Its hardware address, when it has one.
    pub mac: Option<Vec<u8>>,
}

/// What [`Netlink::ensure_bridge`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BridgeChange {
    pub created: bool,
    pub address_added: bool,
    pub brought_up: bool,
}

/// A netlink connection bound to the network namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace and
    /// drives it on the current tokio runtime.
    pub fn connect() -> Result<Self, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        let mut req = self.handle.link().get().match_name(name).execute();
        match req.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_state(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err("looking up", name)(e)),
        }
    }

    /// All links of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkState>, LinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing", "links"))?;
        Ok(msgs.iter().map(link_state).collect())
    }

    /// IPv4 addresses (with prefix length) of the link with index `index`.
    pub async fn ipv4_addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing addresses of", &format!("link #{index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// IPv4 addresses and routes of this network namespace that overlap
    /// `cidr`, except those of the link `own_bridge` (banger's bridge, which
    /// carries `cidr` on purpose). Default routes and the kernel's local and
    /// broadcast routes do not count.
    pub async fn cidr_uses(
        &self,
        cidr: ipnet::Ipv4Net,
        own_bridge: &str,
    ) -> Result<Vec<CidrUse>, LinkError> {
        use rtnetlink::packet_route::route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteType,
        };
        let links = self.links().await?;
        let name_of = |index: u32| {
            links
                .iter()
                .find(|l| l.index == index)
                .map(|l| l.name.clone())
        };
        let mut uses = Vec::new();
        for l in links.iter().filter(|l| l.name != own_bridge) {
            for (ip, prefix) in self.ipv4_addresses(l.index).await? {
                let Ok(net) = ipnet::Ipv4Net::new(ip, prefix) else {
                    continue;
                };
                if overlaps(net.trunc(), cidr) {
                    uses.push(CidrUse {
                        what: format!("address {ip}/{prefix}"),
                        interface: l.name.clone(),
                    });
                }
            }
        }
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing", "routes"))?;
        for r in &routes {
            if !matches!(
                r.header.kind,
                RouteType::Unicast
                    | RouteType::Unreachable
                    | RouteType::BlackHole
                    | RouteType::Prohibit
            ) || r.header.destination_prefix_length == 0
            {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let Some(dst) = dst else { continue };
            let interface = oif
                .and_then(name_of)
                .unwrap_or_else(|| "no interface".into());
            if interface == own_bridge {
                continue;
            }
            let Ok(net) = ipnet::Ipv4Net::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            let what = format!("route {}", net.trunc());
            if overlaps(net.trunc(), cidr)
                && !uses
                    .iter()
                    .any(|u| u.interface == interface && u.what == what)
            {
                uses.push(CidrUse { what, interface });
            }
        }
        Ok(uses)
    }

    /// Makes sure bridge `name` exists, carries `ip/prefix` and is up.
    /// Idempotent; other addresses on the bridge are left alone. Refuses to
    /// touch an existing link of another kind.
    pub async fn ensure_bridge(
        &self,
        name: &IfName,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<BridgeChange, LinkError> {
        let mut change = BridgeChange::default();
        let link = match self.link(name.as_str()).await? {
            Some(l) => {
                if l.kind == "bridge"
                    && let Err(e) = self.pin_mac(&l).await
                {
                    // The bridge works without it; only a port leaving
                    // may then change its address, as before.
                    tracing::warn!(bridge = %name, error = %e, "cannot pin the bridge's address");
                }
                l
            }
            None => {
                // Its own address, set: a bridge without one takes the
                // lowest of its ports' addresses, so a TAP joining or
                // leaving would change it under its guests, whose ARP
                // entry for their gateway would then point nowhere.
                let bridge = LinkBridge::new(name.as_str())
                    .address(MacAddr::random().0.to_vec())
                    .build();
                match self.handle.link().add(bridge).execute().await {
                    Ok(()) => change.created = true,
                    // Someone else made it in between: fine, check it below.
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(nl_err("creating bridge", name.as_str())(e)),
                }
                self.link(name.as_str())
                    .await?
                    .ok_or_else(|| LinkError::NoBridge(name.to_string()))?
            }
        };
        if link.kind != "bridge" {
            return Err(LinkError::NotABridge {
                link: name.to_string(),
                kind: if link.kind.is_empty() {
                    "link of unknown kind".into()
                } else {
                    link.kind
                },
            });
        }
        if let Err(e) = self.no_link_local_learning(&link).await {
            // Kernels before 5.2 lack the option; the checks still hold
            // for everything a guest sends to other addresses.
            tracing::warn!(bridge = %name, error = %e, "the bridge learns from link-local frames");
        }
        let addrs = self.ipv4_addresses(link.index).await?;
        if !addrs.contains(&(ip, prefix)) {
            match self
                .handle
                .address()
                .add(link.index, IpAddr::V4(ip), prefix)
                .execute()
                .await
            {
                Ok(()) => change.address_added = true,
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(nl_err("adding address to", name.as_str())(e)),
            }
        }
        if !link.up {
            self.set_up(name.as_str(), link.index).await?;
            change.brought_up = true;
        }
        Ok(change)
    }

    /// Sets the hardware address of `link` to the one it has: the kernel
    /// then counts it as chosen, and a bridge keeps it from then on instead
    /// of taking the lowest of its ports' (a bridge made by an earlier
    /// banger, without an address of its own). Nothing changes for the
    /// guests behind it.
    async fn pin_mac(&self, link: &LinkState) -> Result<(), LinkError> {
        let Some(mac) = link.mac.clone().filter(|m| m.len() == 6) else {
            return Ok(());
        };
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).address(mac).build())
            .execute()
            .await
            .map_err(nl_err("pinning the address of", &link.name))
    }

    /// Frames to the reserved link-local group addresses
    /// (`01:80:c2:00:00:0X`) reach the bridge's ports' own stacks without
    /// passing its prerouting hook, where the guests' address checks sit;
    /// the bridge must not learn where a MAC is from them, or a guest could
    /// claim another VM's MAC (and so its traffic) with one such frame.
    async fn no_link_local_learning(&self, link: &LinkState) -> Result<(), LinkError> {
        use rtnetlink::LinkMessageBuilder;
        use rtnetlink::packet_route::link::BridgeBooleanOptionFlags;
        let msg = LinkMessageBuilder::<LinkBridge>::new(&link.name)
            .index(link.index)
            .set_boolean_opt(BridgeBooleanOptionFlags::NoLinkLocalLearn, true)
            .build();
        // RTM_NEWLINK on the existing link: RTM_SETLINK ignores a kind's
        // own options.
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(nl_err("turning off link-local learning on", &link.name))
    }

    async fn set_up(&self, name: &str, index: u32) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl_err("bringing up", name))
    }

    /// Attaches link `name` to `bridge` and brings it up.
    pub async fn attach_to_bridge(&self, name: &str, bridge: &IfName) -> Result<(), LinkError> {
        let br = self
            .link(bridge.as_str())
            .await?
            .ok_or_else(|| LinkError::NoBridge(bridge.to_string()))?;
        let link = self.link(name).await?.ok_or_else(|| LinkError::Netlink {
            op: "attaching",
            link: name.to_string(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .controller(br.index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("attaching to bridge", name))
    }

    /// Creates a persistent TAP owned by `owner_uid` (so an unprivileged VMM
    /// running as that user can open it), attaches it to `bridge` and brings
    /// it up. On failure nothing is left behind.
    pub async fn create_tap(
        &self,
        tap: &TapName,
        owner_uid: u32,
        bridge: &IfName,
    ) -> Result<(), LinkError> {
        if self.link(bridge.as_str()).await?.is_none() {
            return Err(LinkError::NoBridge(bridge.to_string()));
        }
        // TUNSETIFF on an existing persistent TAP would silently take it over.
        if self.link(tap.as_str()).await?.is_some() {
            return Err(LinkError::TapExists(tap.to_string()));
        }
        tun::create_persistent_tap(tap.as_str(), owner_uid).map_err(|source| LinkError::Tun {
            tap: tap.to_string(),
            source,
        })?;
        if let Err(e) = self.attach_to_bridge(tap.as_str(), bridge).await {
            if let Err(undo) = self.delete_link(tap.as_str()).await {
                tracing::warn!(tap = %tap, error = %undo, "removing a TAP that could not be attached");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Deletes link `name`; a link that does not exist is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err("deleting", name)(e)),
        }
    }

    /// banger's TAP devices: TUN/TAP links whose name carries [`TAP_PREFIX`].
    pub async fn list_taps(&self) -> Result<Vec<LinkState>, LinkError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.kind == "tun" && l.name.starts_with(TAP_PREFIX))
            .collect())
    }
}

// IFLA_TUN_* attribute numbers (linux/if_link.h).
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PERSIST: u16 = 6;

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut s = LinkState {
        name: String::new(),
        index: msg.header.index,
        kind: String::new(),
        controller: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        tun_owner: None,
        is_tap: false,
        persistent: false,
        mac: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => s.name = n.clone(),
            LinkAttribute::Address(a) => s.mac = Some(a.clone()),
            LinkAttribute::Controller(c) => s.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => s.kind = kind_name(k),
                        LinkInfo::Data(InfoData::Tun(tun)) => {
                            for t in tun {
                                let InfoTun::Other(nla) = t else { continue };
                                let mut v = vec![0u8; nla.value_len()];
                                nla.emit_value(&mut v);
                                match nla.kind() {
                                    IFLA_TUN_OWNER if v.len() == 4 => {
                                        let uid = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
                                        s.tun_owner = (uid != u32::MAX).then_some(uid);
                                    }
                                    IFLA_TUN_TYPE if !v.is_empty() => {
                                        s.is_tap = u32::from(v[0]) == tun::IFF_TAP_TYPE;
                                    }
                                    IFLA_TUN_PERSIST if !v.is_empty() => s.persistent = v[0] != 0,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    s
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `/dev/net/tun` ioctls.
mod tun {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    use std::os::fd::{AsRawFd, OwnedFd};

    // linux/if_tun.h
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    /// Value of IFLA_TUN_TYPE for a TAP.
    pub(super) const IFF_TAP_TYPE: u32 = 2;

    nix::ioctl_write_ptr_bad!(
        tunsetiff,
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
        libc::ifreq
    );
    nix::ioctl_write_int!(tunsetpersist, b'T', 203);
    nix::ioctl_write_int!(tunsetowner, b'T', 204);

    /// Creates TAP `name` in the calling thread's network namespace, owned by
    /// `owner_uid` and persistent. If any step fails the device goes away
    /// with the file descriptor.
    pub(super) fn create_persistent_tap(name: &str, owner_uid: u32) -> std::io::Result<()> {
        let fd: OwnedFd = open(
            "/dev/net/tun",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: ifreq is a plain C struct for which all-zero bytes are valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: fd is an open /dev/net/tun descriptor and req a valid,
        // NUL-terminated ifreq that outlives the call.
        unsafe { tunsetiff(fd.as_raw_fd(), &req) }?;
        // SAFETY: fd is attached to the TAP above; the argument is a value.
        unsafe {
            tunsetowner(
                fd.as_raw_fd(),
                owner_uid as nix::sys::ioctl::ioctl_param_type,
            )
        }?;
        // SAFETY: as above.
        unsafe { tunsetpersist(fd.as_raw_fd(), 1) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_overlap_when_either_contains_the_other() {
        let n = |s: &str| -> ipnet::Ipv4Net { s.parse().expect("net") };
        assert!(overlaps(n("172.16.0.0/24"), n("172.16.0.0/24")));
        assert!(overlaps(n("172.16.0.0/16"), n("172.16.0.0/24")));
        assert!(overlaps(n("172.16.0.0/24"), n("172.16.0.128/25")));
        assert!(overlaps(n("172.16.0.15/32"), n("172.16.0.0/24")));
        assert!(!overlaps(n("172.16.1.0/24"), n("172.16.0.0/24")));
        assert!(!overlaps(n("10.213.0.0/24"), n("172.16.0.0/24")));
    }
}
