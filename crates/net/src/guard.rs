//! Each guest speaks only as itself on the bridge: nftables rules in a
//! `bridge`-family table banger owns (`table bridge banger`).
//!
//! Guests are not trusted, and root in one can set any address. Without a
//! check a guest could answer for another VM's address (and so its
//! `NAME.vm` name and ports), or send as a NAT-enabled VM's address to
//! reach the outside world when it has no NAT of its own. So every frame a
//! banger TAP (`bgtap*`) brings into the bridge, for other guests or for
//! the host, must carry that VM's own MAC (`06:00:` + its IPv4 address,
//! [`MacAddr::from_ip`]) as its Ethernet source, and its IPv4 source (or
//! ARP sender address) must be the VM's address; only IPv4 and ARP frames
//! pass (no VLAN tags around those checks, and no IPv6, whose router
//! advertisements and neighbour messages would let a guest redirect the
//! others' traffic; banger's guests are IPv4). ARP probes (sender 0.0.0.0)
//! are allowed.
//!
//! Frames to the reserved link-local group addresses (`01:80:c2:00:00:0X`)
//! skip the bridge's prerouting hook and go up the TAP's own stack: an
//! `inet` table of the same name drops whatever reaches the host's IP
//! layer on a TAP (bridged traffic arrives on the bridge), and the bridge
//! does not learn MACs from such frames (see `Netlink::ensure_bridge`).
//!
//! The VM addresses live in two sets keyed by TAP name
//! (`ifname . ether_addr`, `ifname . ipv4_addr`), so a VM's start and stop
//! add and remove its elements without rewriting the rules, and a TAP
//! with no elements (an idle one in the pool, or one whose VM is gone)
//! passes nothing. [`rebuild`] makes the tables at daemon start, and again
//! whenever [`in_place`] finds them changed by someone else (`nft flush
//! ruleset`; see [`crate::firewall`]).

use crate::alloc::{MacAddr, Subnet};
use crate::ifname::{TAP_PREFIX, TapName};
use crate::nat::{NatError, addr, apply, chains_of, check, field, listing, matches, rules_of};
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression};
use nftables::schema::{
    Chain, Element, NfListObject, NfObject, Nftables, Rule, Set, SetTypeValue, Table,
};
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The table's name (family `bridge`; the NAT table is family `ip`).
pub const TABLE: &str = "banger";
const CHAIN: &str = "guard";
const MACS: &str = "guest_macs";
const IPS: &str = "guest_ips";
/// Before the bridge's other filters (`filter` is -200).
const PRIORITY: i32 = -300;

/// The TAP each running VM's guest sits behind, and its address.
pub type Bindings = BTreeMap<TapName, Ipv4Addr>;

/// Makes the table hold the rules and exactly `bindings` (daemon start).
pub async fn rebuild(subnet: &Subnet, bindings: &Bindings) -> Result<(), NatError> {
    for ip in bindings.values() {
        check(subnet, *ip)?;
    }
    apply(&ruleset(bindings), "rebuilding the guests' address checks").await
}

/// Lets the guest behind `tap` send as `ip` (and its MAC). Idempotent.
pub async fn allow(subnet: &Subnet, tap: &TapName, ip: Ipv4Addr) -> Result<(), NatError> {
    check(subnet, ip)?;
    let b = with_elements(tap, ip);
    apply(&b.to_nftables(), "allowing a guest's addresses").await
}

/// Takes `tap`'s permission to send as `ip` away. Idempotent: the
/// elements are added before they are deleted, so a missing one is no
/// error.
pub async fn forget(subnet: &Subnet, tap: &TapName, ip: Ipv4Addr) -> Result<(), NatError> {
    check(subnet, ip)?;
    let mut b = with_elements(tap, ip);
    for e in elements(tap, ip) {
        b.delete(e);
    }
    apply(&b.to_nftables(), "removing a guest's addresses").await
}

/// Whether the tables hold what [`ruleset`] makes for `bindings`: both
/// families' chains and rules, and in the sets exactly the elements of
/// `bindings`.
/// `false` when a table is gone (`nft flush ruleset`), or holds only the
/// sets that an [`allow`] after such a flush makes.
pub async fn in_place(bindings: &Bindings) -> Result<bool, NatError> {
    let wanted = ruleset(bindings);
    for family in [NfFamily::Bridge, NfFamily::INet] {
        let name = if family == NfFamily::Bridge {
            "bridge"
        } else {
            "inet"
        };
        let Some(listed) = listing(name, TABLE).await? else {
            return Ok(false);
        };
        if rules_of(&listed, family) != rules_of(&wanted, family)
            || chains_of(&listed, family) != chains_of(&wanted, family)
        {
            return Ok(false);
        }
        if family == NfFamily::Bridge && elements_in(&listed) != elements_of(bindings) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The elements of the sets, as `(set, tap, value)`.
type Elements = BTreeSet<(String, String, String)>;

/// What the sets hold for `bindings`.
fn elements_of(bindings: &Bindings) -> Elements {
    bindings
        .iter()
        .flat_map(|(tap, ip)| {
            [
                (MACS, MacAddr::from_ip(*ip).to_string()),
                (IPS, ip.to_string()),
            ]
            .map(|(set, value)| (set.to_string(), tap.to_string(), value))
        })
        .collect()
}

/// What the sets of a listed table hold.
fn elements_in(listed: &Nftables<'_>) -> Elements {
    let mut found = Elements::new();
    for o in listed.objects.iter() {
        let NfObject::ListObject(NfListObject::Set(set)) = o else {
            continue;
        };
        for e in set.elem.iter().flat_map(|e| e.iter()) {
            if let Expression::Named(NamedExpression::Concat(parts)) = e
                && let [Expression::String(tap), Expression::String(value)] = parts.as_slice()
            {
                found.insert((set.name.to_string(), tap.to_string(), value.to_string()));
            } else {
                // Something banger does not add: never in place.
                found.insert((set.name.to_string(), format!("{e:?}"), String::new()));
            }
        }
    }
    found
}

/// A batch that makes sure of the table and its sets and adds the
/// elements of the guest behind `tap` at `ip`.
fn with_elements(tap: &TapName, ip: Ipv4Addr) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(table(NfFamily::Bridge));
    for set in sets() {
        b.add(set);
    }
    for e in elements(tap, ip) {
        b.add(e);
    }
    b
}

fn table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family,
        name: Cow::Borrowed(TABLE),
        handle: None,
    })
}

/// `family`'s table made afresh (`add`, so the `delete` cannot fail, then
/// `delete` and `add`), with its empty `guard` chain at prerouting.
fn fresh_table(b: &mut Batch<'static>, family: NfFamily) {
    b.add(table(family));
    b.delete(table(family));
    b.add(table(family));
    b.add(NfListObject::Chain(Chain {
        family,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(CHAIN),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
}

/// A rule of `family`'s `guard` chain.
fn rule(family: NfFamily, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: None,
    })
}

fn sets() -> [NfListObject<'static>; 2] {
    use nftables::schema::SetType;
    let set = |name: &'static str, second: SetType| {
        NfListObject::Set(Box::new(Set {
            family: NfFamily::Bridge,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(name),
            handle: None,
            set_type: SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ifname, second])),
            policy: None,
            flags: None,
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }))
    };
    [set(MACS, SetType::EtherAddr), set(IPS, SetType::Ipv4Addr)]
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

fn text(s: String) -> Expression<'static> {
    Expression::String(Cow::Owned(s))
}

/// The two elements of the guest behind `tap` at `ip`.
fn elements(tap: &TapName, ip: Ipv4Addr) -> [NfListObject<'static>; 2] {
    let element = |set: &'static str, value: String| {
        NfListObject::Element(Element {
            family: NfFamily::Bridge,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(set),
            elem: Cow::Owned(vec![concat(vec![text(tap.to_string()), text(value)])]),
        })
    };
    [
        element(MACS, MacAddr::from_ip(ip).to_string()),
        element(IPS, ip.to_string()),
    ]
}

fn iifname() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::Iifname,
    }))
}

fn in_set(name: &'static str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

fn ether_type(t: &'static str) -> Statement<'static> {
    matches(
        field("ether", "type"),
        Operator::EQ,
        Expression::String(Cow::Borrowed(t)),
    )
}

/// The one transaction that makes the table hold the rules and exactly
/// `bindings`: `add table` (so the `delete` cannot fail), `delete table`,
/// then the table, its chain, sets, rules and elements.
pub fn ruleset(bindings: &Bindings) -> Nftables<'static> {
    let mut b = Batch::new();
    fresh_table(&mut b, NfFamily::Bridge);
    for set in sets() {
        b.add(set);
    }
    let from_tap = || {
        matches(
            iifname(),
            Operator::EQ,
            Expression::String(Cow::Owned(format!("{TAP_PREFIX}*"))),
        )
    };
    // `iifname . <field>` not in `set`: the frame is not its TAP's own.
    let not_own = |f: Expression<'static>, set: &'static str| {
        matches(concat(vec![iifname(), f]), Operator::NEQ, in_set(set))
    };
    let only_these_types = matches(
        field("ether", "type"),
        Operator::NEQ,
        Expression::Named(NamedExpression::Set(
            ["ip", "arp"]
                .into_iter()
                .map(|t| nftables::expr::SetItem::Element(Expression::String(Cow::Borrowed(t))))
                .collect(),
        )),
    );
    let not_a_probe = matches(
        field("arp", "saddr ip"),
        Operator::NEQ,
        addr(Ipv4Addr::UNSPECIFIED),
    );
    // Each rule: a frame from a banger TAP matching all of these is dropped.
    let rules: Vec<Vec<Statement<'static>>> = vec![
        // Only what the checks below understand: IPv4 and ARP.
        vec![only_these_types],
        vec![not_own(field("ether", "saddr"), MACS)],
        vec![
            ether_type("arp"),
            not_own(field("arp", "saddr ether"), MACS),
        ],
        vec![
            ether_type("arp"),
            not_a_probe,
            not_own(field("arp", "saddr ip"), IPS),
        ],
        vec![ether_type("ip"), not_own(field("ip", "saddr"), IPS)],
    ];
    for checks in rules {
        let mut expr = vec![from_tap()];
        expr.extend(checks);
        expr.push(Statement::Drop(None));
        b.add(rule(NfFamily::Bridge, expr));
    }
    for (tap, ip) in bindings {
        for e in elements(tap, *ip) {
            b.add(e);
        }
    }
    // Frames to the reserved link-local group addresses skip the bridge's
    // prerouting hook and reach the TAP's own stack: nothing a TAP brings
    // to the host's IP layer that way is taken (what is bridged arrives on
    // the bridge, never on a port).
    fresh_table(&mut b, NfFamily::INet);
    b.add(rule(
        NfFamily::INet,
        vec![from_tap(), Statement::Drop(None)],
    ));
    b.to_nftables()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_json() {
        let tap = TapName::new("bgtap00000003").expect("tap");
        let bindings: Bindings = [(tap, Ipv4Addr::new(172, 16, 0, 5))].into();
        let json = serde_json::to_value(ruleset(&bindings)).expect("json");
        let objs = json["nftables"].as_array().expect("array");
        // add, delete, add table; the chain; two sets; five rules; two
        // elements; then the ports' table (add, delete, add), its chain
        // and rule.
        assert_eq!(objs.len(), 18, "{json}");
        assert_eq!(objs[1]["delete"]["table"]["family"], "bridge");
        assert_eq!(objs[3]["add"]["chain"]["hook"], "prerouting");
        let macs = &objs[11]["add"]["element"];
        assert_eq!(macs["name"], "guest_macs");
        assert_eq!(
            macs["elem"][0]["concat"],
            serde_json::json!(["bgtap00000003", "06:00:ac:10:00:05"])
        );
        assert_eq!(
            objs[12]["add"]["element"]["elem"][0]["concat"],
            serde_json::json!(["bgtap00000003", "172.16.0.5"])
        );
        for o in objs {
            let inner = o.as_object().and_then(|m| m.values().next()).expect("cmd");
            let obj = inner
                .as_object()
                .and_then(|m| m.values().next())
                .expect("obj");
            assert!(obj["family"] == "bridge" || obj["family"] == "inet", "{o}");
            let table = obj.get("table").unwrap_or(&obj["name"]);
            assert_eq!(table, "banger", "{o}");
        }
    }

    #[test]
    fn refuses_non_guest_addresses() {
        let subnet = Subnet::new(
            "172.16.0.0/24".parse().expect("cidr"),
            Ipv4Addr::new(172, 16, 0, 1),
        )
        .expect("subnet");
        assert!(check(&subnet, Ipv4Addr::new(172, 16, 0, 1)).is_err());
        assert!(check(&subnet, Ipv4Addr::new(10, 0, 0, 5)).is_err());
        assert!(check(&subnet, Ipv4Addr::new(172, 16, 0, 5)).is_ok());
    }
}
