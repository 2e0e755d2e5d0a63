//! Per-VM NAT with nftables, in a table banger owns (`table ip banger`).
//!
//! The whole table is rewritten in one `nft` transaction on every change,
//! from the set of NAT-enabled guest addresses: so every operation is
//! atomic and idempotent, and nothing outside banger's table is ever read
//! or written. Each VM gets three rules, all commented `banger vm <ip>`:
//!
//! - postrouting: `ip saddr <vm> ip daddr != <cidr> masquerade`
//! - forward: `ip saddr <vm> ip daddr != <cidr> accept`
//! - forward: `ip daddr <vm> ct state established,related accept`
//!
//! Chains have policy accept: banger adds permission, it never takes any
//! away from other traffic, with one exception for its own guests. Forwarding
//! is a host-wide switch, so once it is on (for NAT) a LAN neighbour that
//! routes the bridge's cidr through the host could reach every guest's
//! ports, NAT or not. The forward chain therefore starts with a guard
//! (commented `banger guard`), present whenever the table is, even without
//! NAT VMs:
//!
//! - forward: `ip daddr <cidr> ip saddr != <cidr> ct state { new, invalid,
//!   untracked } drop`
//!
//! Guests still reach each other (same bridge) and the host (not forwarded),
//! and their own NATed connections get their replies (established).
//!
//! A packet passes the forward hook only when no base chain of any table
//! drops it, and Docker sets its `ip filter` FORWARD chain's policy to drop.
//! On a host with Docker, NAT therefore also needs the two forward rules of
//! each NAT VM in `DOCKER-USER`, the chain Docker keeps for its users' own
//! rules (as LXD and Incus document): banger mirrors them there, with the
//! same comments, on every change, and touches no other rule of that table.
//! Docker also loads `br_netfilter`, which sends traffic between two guests
//! on the bridge through that chain too: one more rule (`banger bridge`)
//! accepts traffic from the cidr to the cidr.

use crate::alloc::Subnet;
use nftables::batch::Batch;
use nftables::expr::{CT, Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::{self, DEFAULT_NFT, NftablesError};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The nftables table banger owns (family `ip`).
pub const TABLE: &str = "banger";
const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";
const COMMENT_PREFIX: &str = "banger vm ";
const GUARD_COMMENT: &str = "banger guard";
const BRIDGE_COMMENT: &str = "banger bridge";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// An nftables change (NAT, or the guests' address checks) that could not
/// be made.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("{ip} is not a guest address of {cidr}: refused")]
    NotGuestIp { ip: Ipv4Addr, cidr: ipnet::Ipv4Net },
    #[error("nft not found: install nftables (apt-get install nftables)")]
    NftMissing,
    #[error("nft failed {action}: {stderr}")]
    Nft {
        action: &'static str,
        stderr: String,
    },
    #[error("reading nft output while {action}: {message}")]
    NftOutput {
        action: &'static str,
        message: String,
    },
    #[error("{IP_FORWARD}: {0}")]
    IpForward(#[source] std::io::Error),
}

pub(crate) fn nft_err(action: &'static str) -> impl FnOnce(NftablesError) -> NatError {
    move |e| match e {
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            NatError::NftMissing
        }
        NftablesError::NftFailed { stderr, .. } => NatError::Nft {
            action,
            stderr: stderr.trim().to_string(),
        },
        other => NatError::NftOutput {
            action,
            message: other.to_string(),
        },
    }
}

/// `ip` is a guest address of `subnet` (not its network, bridge or
/// broadcast address), or the error saying so.
pub(crate) fn check(subnet: &Subnet, ip: Ipv4Addr) -> Result<(), NatError> {
    if subnet.is_guest_ip(ip) {
        Ok(())
    } else {
        Err(NatError::NotGuestIp {
            ip,
            cidr: subnet.cidr(),
        })
    }
}

/// Turns NAT on for `vm_ip` (and `ip_forward` on if it is off). Idempotent.
pub async fn enable(subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), NatError> {
    check(subnet, vm_ip)?;
    let mut vms = current().await?;
    if vms.insert(vm_ip) {
        apply(&ruleset(subnet, &vms), "enabling NAT").await?;
    }
    sync_docker_user(subnet, &vms).await?;
    set_ip_forward(true)
}

/// Turns NAT off for `vm_ip`. Idempotent. `ip_forward` is left as it is:
/// other software on the host may rely on it.
pub async fn disable(subnet: &Subnet, vm_ip: Ipv4Addr) -> Result<(), NatError> {
    check(subnet, vm_ip)?;
    let mut vms = current().await?;
    if vms.remove(&vm_ip) {
        apply(&ruleset(subnet, &vms), "disabling NAT").await?;
    }
    sync_docker_user(subnet, &vms).await
}

/// Makes banger's table hold exactly `vm_ips` (reconcile). With an empty
/// set the table keeps only the guard (see the module docs); without nft
/// there is no table to guard, so that is done too (bridge networking needs
/// nft only for NAT, also through the root helper).
pub async fn rebuild(subnet: &Subnet, vm_ips: &BTreeSet<Ipv4Addr>) -> Result<(), NatError> {
    for ip in vm_ips {
        check(subnet, *ip)?;
    }
    match apply(&ruleset(subnet, vm_ips), "rebuilding NAT").await {
        Err(NatError::NftMissing) if vm_ips.is_empty() => return Ok(()),
        r => r?,
    }
    sync_docker_user(subnet, vm_ips).await?;
    if !vm_ips.is_empty() {
        set_ip_forward(true)?;
    }
    Ok(())
}

/// Guest addresses that currently have NAT rules in banger's table.
pub async fn current() -> Result<BTreeSet<Ipv4Addr>, NatError> {
    Ok(listing("ip", TABLE)
        .await?
        .map(|rs| vms_in(&rs))
        .unwrap_or_default())
}

/// Whether banger's table holds what [`ruleset`] makes for `vms`: NAT
/// rules for exactly those addresses, as many rules in all (the guard's
/// among them) and the same chains, and Docker's `DOCKER-USER` chain, where there is
/// one, as many of banger's rules as [`rebuild`] puts there. `false` when
/// the table is gone, as after `nft flush ruleset`.
pub async fn in_place(subnet: &Subnet, vms: &BTreeSet<Ipv4Addr>) -> Result<bool, NatError> {
    let wanted = ruleset(subnet, vms);
    let table = listing("ip", TABLE).await?.is_some_and(|rs| {
        vms_in(&rs) == *vms
            && rules_of(&rs, NfFamily::IP) == rules_of(&wanted, NfFamily::IP)
            && chains_of(&rs, NfFamily::IP) == chains_of(&wanted, NfFamily::IP)
    });
    if !table {
        return Ok(false);
    }
    Ok(match docker_user_rules().await? {
        None => true,
        Some(ours) => ours.len() == rules_of(&docker_user_batch(subnet, vms, &[]), NfFamily::IP),
    })
}

/// The table `family` `name` as nft lists it; `None` when there is none.
pub(crate) async fn listing(
    family: &str,
    name: &str,
) -> Result<Option<Nftables<'static>>, NatError> {
    let args = ["list", "table", family, name];
    match helper::get_current_ruleset_with_args_async(DEFAULT_NFT, &args).await {
        Ok(rs) => Ok(Some(rs)),
        Err(NftablesError::NftFailed { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(None)
        }
        Err(e) => Err(nft_err("listing banger's tables")(e)),
    }
}

/// The chains of `family` in `rs` (listed, or added by a batch) with
/// their type, hook, priority and policy, in order: `policy drop` on one
/// of banger's chains would cut the guests off.
pub(crate) fn chains_of(rs: &Nftables<'_>, family: NfFamily) -> Vec<String> {
    let mut chains: Vec<String> = rs
        .objects
        .iter()
        .filter_map(|o| match o {
            NfObject::ListObject(NfListObject::Chain(c))
            | NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(c)))
                if c.family == family =>
            {
                Some(format!(
                    "{} {:?} {:?} {:?} {:?}",
                    c.name, c._type, c.hook, c.prio, c.policy
                ))
            }
            _ => None,
        })
        .collect();
    chains.sort();
    chains
}

/// How many rules of `family` `rs` holds: those nft listed, or those a
/// batch adds.
pub(crate) fn rules_of(rs: &Nftables<'_>, family: NfFamily) -> usize {
    rs.objects
        .iter()
        .filter(|o| match o {
            NfObject::ListObject(NfListObject::Rule(r))
            | NfObject::CmdObject(
                NfCmd::Add(NfListObject::Rule(r)) | NfCmd::Insert(NfListObject::Rule(r)),
            ) => r.family == family,
            _ => false,
        })
        .count()
}

/// Applies `rs` in one nft transaction; `action` names it in errors.
pub(crate) async fn apply(rs: &Nftables<'_>, action: &'static str) -> Result<(), NatError> {
    helper::apply_ruleset_async(rs)
        .await
        .map_err(nft_err(action))
}

/// The guest addresses named by rule comments in a listing of banger's table.
fn vms_in(rs: &Nftables<'_>) -> BTreeSet<Ipv4Addr> {
    rs.objects
        .iter()
        .filter_map(|o| match o {
            NfObject::ListObject(NfListObject::Rule(r))
                if r.table == TABLE && r.chain == POSTROUTING =>
            {
                r.comment
                    .as_deref()
                    .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
                    .and_then(|ip| ip.parse().ok())
            }
            _ => None,
        })
        .collect()
}

pub(crate) fn field(proto: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(proto),
            field: Cow::Borrowed(name),
        },
    )))
}

pub(crate) fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

pub(crate) fn addr(ip: Ipv4Addr) -> Expression<'static> {
    Expression::String(Cow::Owned(ip.to_string()))
}

/// The one transaction that makes banger's table hold exactly the guard
/// and the rules of `vms`: `add table` (so the `delete` cannot fail),
/// `delete table`, then the table again with its chains and rules.
pub fn ruleset(subnet: &Subnet, vms: &BTreeSet<Ipv4Addr>) -> Nftables<'static> {
    let table = || Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        handle: None,
    };
    let mut b = Batch::new();
    b.add(NfListObject::Table(table()));
    b.delete(NfListObject::Table(table()));
    b.add(NfListObject::Table(table()));
    for (name, ty, hook, prio) in [
        (POSTROUTING, NfChainType::NAT, NfHook::Postrouting, 100),
        (FORWARD, NfChainType::Filter, NfHook::Forward, 0),
    ] {
        b.add(NfListObject::Chain(Chain {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(name),
            _type: Some(ty),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }
    let cidr = || {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr(subnet.network())),
            len: u32::from(subnet.prefix()),
        }))
    };
    let ct_state = || {
        Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("state"),
            family: None,
            dir: None,
        }))
    };
    let states = |names: &[&'static str]| {
        Expression::List(
            names
                .iter()
                .map(|n| Expression::String(Cow::Borrowed(*n)))
                .collect(),
        )
    };
    b.add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(FORWARD),
        expr: Cow::Owned(vec![
            matches(field("ip", "daddr"), Operator::EQ, cidr()),
            matches(field("ip", "saddr"), Operator::NEQ, cidr()),
            matches(
                ct_state(),
                Operator::IN,
                states(&["new", "invalid", "untracked"]),
            ),
            Statement::Drop(None),
        ]),
        handle: None,
        index: None,
        comment: Some(Cow::Borrowed(GUARD_COMMENT)),
    }));
    for ip in vms {
        let rule = |chain: &'static str, expr: Vec<Statement<'static>>| {
            NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Borrowed(chain),
                expr: Cow::Owned(expr),
                handle: None,
                index: None,
                comment: Some(Cow::Owned(format!("{COMMENT_PREFIX}{ip}"))),
            })
        };
        b.add(rule(
            POSTROUTING,
            vec![
                matches(field("ip", "saddr"), Operator::EQ, addr(*ip)),
                matches(field("ip", "daddr"), Operator::NEQ, cidr()),
                Statement::Masquerade(None),
            ],
        ));
        for r in forward_rules(TABLE, FORWARD, subnet, *ip) {
            b.add(r);
        }
    }
    b.to_nftables()
}

/// The forward rules of NAT VM `ip` in `table`'s `chain`: its outbound
/// traffic and the replies to it are accepted.
fn forward_rules(
    table: &'static str,
    chain: &'static str,
    subnet: &Subnet,
    ip: Ipv4Addr,
) -> [NfListObject<'static>; 2] {
    let cidr = Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(addr(subnet.network())),
        len: u32::from(subnet.prefix()),
    }));
    let ct_state = Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("state"),
        family: None,
        dir: None,
    }));
    let replies = Expression::List(vec![
        Expression::String(Cow::Borrowed("established")),
        Expression::String(Cow::Borrowed("related")),
    ]);
    let rule = |expr: Vec<Statement<'static>>| {
        NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: Cow::Borrowed(table),
            chain: Cow::Borrowed(chain),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(format!("{COMMENT_PREFIX}{ip}"))),
        })
    };
    [
        rule(vec![
            matches(field("ip", "saddr"), Operator::EQ, addr(ip)),
            matches(field("ip", "daddr"), Operator::NEQ, cidr),
            Statement::Accept(None),
        ]),
        rule(vec![
            matches(field("ip", "daddr"), Operator::EQ, addr(ip)),
            matches(ct_state, Operator::IN, replies),
            Statement::Accept(None),
        ]),
    ]
}

/// Docker's table and the chain it leaves to its users.
const DOCKER_TABLE: &str = "filter";
const DOCKER_USER: &str = "DOCKER-USER";

/// Makes Docker's `DOCKER-USER` chain hold exactly banger's rules: the
/// bridge rule and the forward rules of `vms`, before any other rule;
/// nothing when Docker has no such chain.
async fn sync_docker_user(subnet: &Subnet, vms: &BTreeSet<Ipv4Addr>) -> Result<(), NatError> {
    // No Docker (or not its iptables-nft tables): nothing to do.
    let Some(ours) = docker_user_rules().await? else {
        return Ok(());
    };
    apply(
        &docker_user_batch(subnet, vms, &ours),
        "updating Docker's DOCKER-USER chain",
    )
    .await
}

/// The handles of banger's rules in Docker's `DOCKER-USER` chain; `None`
/// without that chain, or without nft (then there is no NAT either:
/// enabling it fails before this).
async fn docker_user_rules() -> Result<Option<Vec<u32>>, NatError> {
    let args = ["list", "chain", "ip", DOCKER_TABLE, DOCKER_USER];
    let listed = match helper::get_current_ruleset_with_args_async(DEFAULT_NFT, &args).await {
        Ok(rs) => rs,
        Err(NftablesError::NftFailed { .. }) => return Ok(None),
        Err(NftablesError::NftExecution { inner, .. })
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None);
        }
        Err(e) => return Err(nft_err("listing Docker's DOCKER-USER chain")(e)),
    };
    Ok(Some(
        listed
            .objects
            .iter()
            .filter_map(|o| match o {
                NfObject::ListObject(NfListObject::Rule(r))
                    if r.table == DOCKER_TABLE
                        && r.chain == DOCKER_USER
                        && r.comment.as_deref().is_some_and(|c| {
                            c.starts_with(COMMENT_PREFIX) || c == BRIDGE_COMMENT
                        }) =>
                {
                    r.handle
                }
                _ => None,
            })
            .collect(),
    ))
}

/// Deletes the rule with `handle` from `DOCKER-USER`.
fn delete_docker_user_rule(b: &mut Batch<'static>, handle: u32) {
    b.delete(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(DOCKER_TABLE),
        chain: Cow::Borrowed(DOCKER_USER),
        expr: Cow::Owned(Vec::new()),
        handle: Some(handle),
        index: None,
        comment: None,
    }));
}

/// Removes everything banger keeps in nftables: `table ip banger` (NAT),
/// the guests' address checks (`table bridge banger`, `table inet
/// banger`) and banger's rules in Docker's `DOCKER-USER` chain. For
/// `system uninstall`: a daemon makes them again when it starts. `false`
/// when there was nothing to remove (or no nft).
///
/// The tables go in one transaction naming only those that exist (a
/// kernel without nftables' bridge family refuses even a table of it).
/// Docker's rules go in a second: a chain Docker rewrote in between must
/// not keep the tables.
pub async fn remove_all() -> Result<bool, NatError> {
    let listed =
        match helper::get_current_ruleset_with_args_async(DEFAULT_NFT, &["list", "tables"]).await {
            Ok(rs) => rs,
            Err(e) => match nft_err("listing tables")(e) {
                NatError::NftMissing => return Ok(false),
                e => return Err(e),
            },
        };
    let ours: Vec<NfListObject<'static>> = listed
        .objects
        .iter()
        .filter_map(|o| match o {
            NfObject::ListObject(NfListObject::Table(t)) if is_ours(t) => {
                Some(NfListObject::Table(Table {
                    family: t.family,
                    name: Cow::Owned(t.name.to_string()),
                    handle: None,
                }))
            }
            _ => None,
        })
        .collect();
    let any_table = !ours.is_empty();
    if any_table {
        apply(&table_removal(ours), "removing banger's nftables tables").await?;
    }
    let docker = docker_user_rules().await?.unwrap_or_default();
    if !docker.is_empty() {
        apply(
            &docker_user_removal(&docker),
            "removing banger's rules from Docker's DOCKER-USER chain",
        )
        .await?;
    }
    Ok(any_table || !docker.is_empty())
}

/// A table banger makes: `ip banger`, `bridge banger` or `inet banger`.
fn is_ours(t: &Table<'_>) -> bool {
    match t.family {
        NfFamily::IP => t.name == TABLE,
        NfFamily::Bridge | NfFamily::INet => t.name == crate::guard::TABLE,
        _ => false,
    }
}

/// Deletes `tables`.
fn table_removal(tables: Vec<NfListObject<'static>>) -> Nftables<'static> {
    let mut b = Batch::new();
    for t in tables {
        b.delete(t);
    }
    b.to_nftables()
}

/// Deletes the `DOCKER-USER` rules with `handles`.
fn docker_user_removal(handles: &[u32]) -> Nftables<'static> {
    let mut b = Batch::new();
    for h in handles {
        delete_docker_user_rule(&mut b, *h);
    }
    b.to_nftables()
}

/// The transaction that replaces the rules with `handles` in
/// `DOCKER-USER` by the bridge rule and the forward rules of `vms`,
/// inserted first.
fn docker_user_batch(
    subnet: &Subnet,
    vms: &BTreeSet<Ipv4Addr>,
    handles: &[u32],
) -> Nftables<'static> {
    let mut b = Batch::new();
    for h in handles {
        delete_docker_user_rule(&mut b, *h);
    }
    let cidr = || {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr(subnet.network())),
            len: u32::from(subnet.prefix()),
        }))
    };
    b.add_cmd(nftables::schema::NfCmd::Insert(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(DOCKER_TABLE),
        chain: Cow::Borrowed(DOCKER_USER),
        expr: Cow::Owned(vec![
            matches(field("ip", "saddr"), Operator::EQ, cidr()),
            matches(field("ip", "daddr"), Operator::EQ, cidr()),
            Statement::Accept(None),
        ]),
        handle: None,
        index: None,
        comment: Some(Cow::Borrowed(BRIDGE_COMMENT)),
    })));
    for ip in vms {
        for rule in forward_rules(DOCKER_TABLE, DOCKER_USER, subnet, *ip) {
            b.add_cmd(nftables::schema::NfCmd::Insert(rule));
        }
    }
    b.to_nftables()
}

/// The current `net.ipv4.ip_forward` of the caller's network namespace.
///
/// Plain blocking file I/O on purpose: `/proc/sys/net` answers for the
/// network namespace of the calling thread.
pub fn ip_forward() -> Result<bool, NatError> {
    let v = std::fs::read_to_string(IP_FORWARD).map_err(NatError::IpForward)?;
    Ok(v.trim() == "1")
}

/// Sets `net.ipv4.ip_forward`; writes only when the value changes.
pub fn set_ip_forward(on: bool) -> Result<(), NatError> {
    if ip_forward()? == on {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).map_err(NatError::IpForward)?;
    tracing::info!(on, "set net.ipv4.ip_forward");
    Ok(())
}

/// NAT facts for `banger doctor`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NatStatus {
    /// `nft --version` output, `None` when nft is not installed.
    pub nft_version: Option<String>,
    /// `net.ipv4.ip_forward`, `None` when unreadable.
    pub ip_forward: Option<bool>,
    /// Guests with NAT rules; `None` when the table could not be read
    /// (not root, or nft missing), with the reason in `error`.
    pub nat_vms: Option<Vec<Ipv4Addr>>,
    pub error: Option<String>,
}

/// Collects [`NatStatus`]; never fails, problems are reported in the value.
pub async fn status() -> NatStatus {
    let nft_version = match tokio::process::Command::new("nft")
        .arg("--version")
        .output()
        .await
    {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        _ => None,
    };
    let (nat_vms, error) = if nft_version.is_none() {
        (None, Some(NatError::NftMissing.to_string()))
    } else {
        match current().await {
            Ok(v) => (Some(v.into_iter().collect()), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    NatStatus {
        nft_version,
        ip_forward: ip_forward().ok(),
        nat_vms,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet::new(
            "172.16.0.0/24".parse().expect("cidr"),
            Ipv4Addr::new(172, 16, 0, 1),
        )
        .expect("subnet")
    }

    #[test]
    fn ruleset_json() {
        let vms: BTreeSet<_> = [Ipv4Addr::new(172, 16, 0, 2)].into();
        let json = serde_json::to_value(ruleset(&subnet(), &vms)).expect("json");
        let objs = json["nftables"].as_array().expect("array");
        // add, delete, add table; two chains; the guard; three rules.
        assert_eq!(objs.len(), 9, "{json}");
        assert_eq!(objs[1]["delete"]["table"]["name"], "banger");
        let guard = &objs[5]["add"]["rule"];
        assert_eq!(guard["chain"], "forward");
        assert_eq!(guard["comment"], "banger guard");
        assert!(guard["expr"][3].get("drop").is_some(), "{guard}");
        let masq = &objs[6]["add"]["rule"];
        assert_eq!(masq["chain"], "postrouting");
        assert_eq!(masq["comment"], "banger vm 172.16.0.2");
        assert_eq!(masq["expr"][0]["match"]["right"], "172.16.0.2");
        assert_eq!(masq["expr"][1]["match"]["op"], "!=");
        assert_eq!(
            masq["expr"][1]["match"]["right"]["prefix"]["addr"],
            "172.16.0.0"
        );
        assert_eq!(masq["expr"][1]["match"]["right"]["prefix"]["len"], 24);
        assert!(masq["expr"][2].get("masquerade").is_some(), "{masq}");
        // Every object stays inside banger's table.
        for o in objs {
            let inner = o.as_object().and_then(|m| m.values().next()).expect("cmd");
            let obj = inner
                .as_object()
                .and_then(|m| m.values().next())
                .expect("obj");
            let table = obj.get("table").or_else(|| obj.get("name"));
            assert_eq!(table.and_then(|t| t.as_str()), Some("banger"), "{o}");
        }
    }

    #[test]
    fn docker_user_gets_the_bridge_rule_and_each_vms_forward_rules_only() {
        let vms: BTreeSet<_> = [Ipv4Addr::new(172, 16, 0, 2)].into();
        let json = serde_json::to_value(docker_user_batch(&subnet(), &vms, &[7, 9])).expect("json");
        let objs = json["nftables"].as_array().expect("array");
        // Two deletes by handle, then three inserts.
        assert_eq!(objs.len(), 5, "{json}");
        for (o, h) in objs[..2].iter().zip([7, 9]) {
            assert_eq!(o["delete"]["rule"]["handle"], h, "{o}");
        }
        let comments: Vec<_> = objs[2..]
            .iter()
            .map(|o| o["insert"]["rule"]["comment"].as_str().expect("comment"))
            .collect();
        assert_eq!(
            comments,
            [
                "banger bridge",
                "banger vm 172.16.0.2",
                "banger vm 172.16.0.2"
            ]
        );
        for o in objs {
            let rule = o
                .as_object()
                .and_then(|m| m.values().next())
                .map(|c| &c["rule"])
                .expect("rule");
            assert_eq!(rule["table"], "filter", "{o}");
            assert_eq!(rule["chain"], "DOCKER-USER", "{o}");
        }
        assert!(objs[3]["insert"]["rule"]["expr"][2].get("accept").is_some());
    }

    #[test]
    fn without_nat_vms_only_the_guard_stays() {
        let json = serde_json::to_value(ruleset(&subnet(), &BTreeSet::new())).expect("json");
        let objs = json["nftables"].as_array().expect("array");
        let rules: Vec<_> = objs.iter().filter_map(|o| o["add"].get("rule")).collect();
        assert_eq!(rules.len(), 1, "{json}");
        assert_eq!(rules[0]["comment"], "banger guard");
    }

    #[test]
    fn comments_are_read_back() {
        let vms: BTreeSet<_> = [Ipv4Addr::new(172, 16, 0, 2), Ipv4Addr::new(172, 16, 0, 9)].into();
        let text = serde_json::to_string(&ruleset(&subnet(), &vms)).expect("json");
        // A listing has list objects, not commands: strip the "add" wrappers.
        let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
        let listed: Vec<serde_json::Value> = v["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|o| o.get("add").cloned())
            .collect();
        let rs: Nftables =
            serde_json::from_value(serde_json::json!({ "nftables": listed })).expect("listing");
        assert_eq!(vms_in(&rs), vms);
    }

    #[test]
    fn refuses_non_guest_addresses() {
        let s = subnet();
        for ip in [
            Ipv4Addr::new(172, 16, 0, 1),
            Ipv4Addr::new(172, 16, 0, 255),
            Ipv4Addr::new(10, 0, 0, 2),
        ] {
            assert!(
                matches!(check(&s, ip), Err(NatError::NotGuestIp { .. })),
                "{ip}"
            );
        }
    }
}
