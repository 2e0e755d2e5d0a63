//! banger's host networking against the real kernel, each test in network
//! namespaces of its own (needs root). Nothing leaves those namespaces.

mod common;

use banger_net::firewall::Repaired;
use banger_net::host::BridgeSpec;
use banger_net::link::LinkError;
use banger_net::{
    HostNet, HostNetError, IfName, LocalHostNet, PoolConfig, Subnet, TapName, TapPool, guard, nat,
};
use common::NetNs;
use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

const OWNER: u32 = 1000;

fn subnet() -> Subnet {
    Subnet::new(
        "172.16.0.0/24".parse().expect("cidr"),
        Ipv4Addr::new(172, 16, 0, 1),
    )
    .expect("subnet")
}

fn spec() -> BridgeSpec {
    BridgeSpec {
        name: IfName::new("banger0").expect("name"),
        subnet: subnet(),
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, last)
}

/// A bridge made by an earlier banger had no address of its own and
/// followed the lowest of its ports'; `ensure_bridge` pins the address it
/// has, so a port leaving no longer changes it.
#[test]
fn an_earlier_bridge_keeps_its_address_once_ensured() {
    let ns = NetNs::new("brpin");
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        let mac = || {
            let json: serde_json::Value =
                serde_json::from_str(&ns.ip(&["-j", "link", "show", "banger0"])).expect("json");
            json[0]["address"].as_str().expect("address").to_string()
        };
        ns.ip(&["link", "add", "banger0", "type", "bridge"]);
        for (port, addr) in [
            ("port1", "00:00:00:00:00:01"),
            ("port2", "00:00:00:00:00:02"),
        ] {
            let peer = format!("{port}p");
            ns.ip(&[
                "link", "add", port, "address", addr, "type", "veth", "peer", "name", &peer,
            ]);
            ns.ip(&["link", "set", port, "master", "banger0", "up"]);
        }
        assert_eq!(mac(), "00:00:00:00:00:01", "the lowest port's, as before");

        let c = host.ensure_bridge(&spec()).await.expect("ensure");
        assert!(!c.created, "{c:?}");
        assert_eq!(mac(), "00:00:00:00:00:01", "pinning changes nothing");
        ns.ip(&["link", "del", "port1"]);
        assert_eq!(mac(), "00:00:00:00:00:01", "kept after its port left");
    });
}

#[test]
fn bridge_is_created_once_and_repaired() {
    let ns = NetNs::new("br");
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        let nl = host.netlink();
        let c = host.ensure_bridge(&spec()).await.expect("create");
        assert!(c.created && c.address_added, "{c:?}");

        let br = nl.link("banger0").await.expect("get").expect("exists");
        assert_eq!(br.kind, "bridge");
        assert!(br.up);
        assert_eq!(
            nl.ipv4_addresses(br.index).await.expect("addrs"),
            vec![(ip(1), 24)]
        );

        // Its address is its own: ports with lower addresses joining and
        // leaving do not change it (its guests' ARP entry for the gateway
        // stays right).
        let mac = || {
            let json: serde_json::Value =
                serde_json::from_str(&ns.ip(&["-j", "link", "show", "banger0"])).expect("json");
            json[0]["address"].as_str().expect("address").to_string()
        };
        let first = mac();
        assert!(!first.is_empty() && first != "00:00:00:00:00:00", "{first}");
        ns.ip(&[
            "link",
            "add",
            "lowport",
            "address",
            "00:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "lowpeer",
        ]);
        ns.ip(&["link", "set", "lowport", "master", "banger0", "up"]);
        assert_eq!(mac(), first, "a port with a lower address joined");
        ns.ip(&["link", "del", "lowport"]);
        assert_eq!(mac(), first, "that port left");

        // Second call: nothing to do.
        let c = host.ensure_bridge(&spec()).await.expect("again");
        assert_eq!(c, Default::default());
        assert_eq!(
            nl.link("banger0").await.expect("get").map(|l| l.index),
            Some(br.index)
        );

        // Someone removed the address and took the bridge down: fixed.
        ns.ip(&["addr", "flush", "dev", "banger0"]);
        ns.ip(&["link", "set", "banger0", "down"]);
        let c = host.ensure_bridge(&spec()).await.expect("repair");
        assert!(!c.created && c.address_added && c.brought_up, "{c:?}");
        assert_eq!(
            nl.ipv4_addresses(br.index).await.expect("addrs"),
            vec![(ip(1), 24)]
        );

        // A same-named link of another kind is refused, not taken over.
        ns.ip(&[
            "link",
            "add",
            "notabridge",
            "type",
            "veth",
            "peer",
            "name",
            "nabpeer",
        ]);
        let other = BridgeSpec {
            name: IfName::new("notabridge").expect("name"),
            subnet: subnet(),
        };
        let e = host.ensure_bridge(&other).await.expect_err("veth");
        assert!(
            matches!(e, HostNetError::Link(LinkError::NotABridge { .. })),
            "{e}"
        );
        assert!(
            nl.ipv4_addresses(nl.link("notabridge").await.expect("get").expect("x").index)
                .await
                .expect("addrs")
                .is_empty()
        );
    });
}

#[test]
fn tap_create_attach_delete() {
    let ns = NetNs::new("tap");
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        let nl = host.netlink();
        let bridge = spec().name;
        let tap = TapName::new("bgtaptest0").expect("name");

        // No bridge yet: a clear error and no TAP left behind.
        let e = host
            .create_tap(&tap, OWNER, &bridge)
            .await
            .expect_err("no bridge");
        assert!(
            e.to_string().contains("bridge banger0 does not exist"),
            "{e}"
        );
        assert!(nl.link(tap.as_str()).await.expect("get").is_none());

        host.ensure_bridge(&spec()).await.expect("bridge");
        let br = nl.link("banger0").await.expect("get").expect("bridge");
        host.create_tap(&tap, OWNER, &bridge).await.expect("create");

        let l = nl
            .link(tap.as_str())
            .await
            .expect("get")
            .expect("tap exists");
        assert_eq!(l.kind, "tun");
        assert!(l.is_tap, "{l:?}");
        assert!(l.persistent, "{l:?}");
        assert_eq!(l.tun_owner, Some(OWNER));
        assert_eq!(l.controller, Some(br.index));
        assert!(l.up);

        let taps = host.list_taps().await.expect("list");
        assert_eq!(taps.len(), 1);
        assert_eq!(taps[0].name, tap);
        assert_eq!(taps[0].owner, Some(OWNER));

        // Creating it again does not take the existing one over.
        let e = host.create_tap(&tap, 0, &bridge).await.expect_err("exists");
        assert!(e.to_string().contains("already exists"), "{e}");
        let l = nl
            .link(tap.as_str())
            .await
            .expect("get")
            .expect("still there");
        assert_eq!(l.tun_owner, Some(OWNER));

        host.delete_tap(&tap).await.expect("delete");
        assert!(nl.link(tap.as_str()).await.expect("get").is_none());
        host.delete_tap(&tap)
            .await
            .expect("deleting a missing TAP is fine");
        assert!(host.list_taps().await.expect("list").is_empty());

        // A non-TAP link that merely carries the prefix is never deleted.
        ns.ip(&["link", "add", "bgtapfake", "type", "bridge"]);
        let fake = TapName::new("bgtapfake").expect("name");
        let e = host.delete_tap(&fake).await.expect_err("bridge");
        assert!(matches!(e, HostNetError::Refused(_)), "{e}");
        assert!(nl.link("bgtapfake").await.expect("get").is_some());
        assert!(host.list_taps().await.expect("list").is_empty());
    });
}

#[test]
fn pool_deletes_leftovers_refills_and_hands_out() {
    let ns = NetNs::new("pool");
    ns.run(|| async {
        let host = Arc::new(LocalHostNet::connect().expect("netlink"));
        let bridge = spec().name;
        host.ensure_bridge(&spec()).await.expect("bridge");

        // Leftovers of an earlier daemon: one that looks idle (it may be one
        // whose deletion that daemon did not finish), one owned by someone
        // else, and one a running VM still uses.
        let reusable = TapName::new("bgtapold1").expect("n");
        let foreign = TapName::new("bgtapold2").expect("n");
        let busy = TapName::new("bgtapbusy").expect("n");
        host.create_tap(&reusable, OWNER, &bridge).await.expect("c");
        host.create_tap(&foreign, OWNER + 1, &bridge)
            .await
            .expect("c");
        host.create_tap(&busy, OWNER, &bridge).await.expect("c");
        let in_use: HashSet<TapName> = [busy.clone()].into();

        let cfg = PoolConfig {
            bridge: bridge.clone(),
            owner_uid: OWNER,
            size: 2,
        };
        let pool = TapPool::start(host.clone(), cfg.clone(), &in_use)
            .await
            .expect("pool");
        pool.released().await;
        let names = |taps: Vec<banger_net::host::TapInfo>| -> BTreeSet<String> {
            taps.into_iter().map(|t| t.name.to_string()).collect()
        };
        let now = names(host.list_taps().await.expect("list"));
        assert!(
            !now.contains("bgtapold1") && !now.contains("bgtapold2"),
            "leftovers deleted: {now:?}"
        );
        assert!(now.contains("bgtapbusy"), "{now:?}");

        assert!(
            pool.wait_idle(2, Duration::from_secs(10)).await,
            "pool filled"
        );
        let first = pool.acquire().await.expect("acquire");
        assert!(first.warm);
        assert_ne!(first.name, reusable, "a leftover is never handed out");
        let second = pool.acquire().await.expect("acquire");
        assert!(second.warm);

        // Refilled in the background after use.
        assert!(
            pool.wait_idle(2, Duration::from_secs(10)).await,
            "pool refilled"
        );
        let all = names(host.list_taps().await.expect("list"));
        assert_eq!(all.len(), 5, "busy + 2 handed out + 2 idle: {all:?}");

        pool.release(&first.name);
        pool.release(&second.name);

        // The refill timed the TAPs it made.
        let made = pool.last_create().expect("refill creations are timed");
        assert!(made > Duration::ZERO, "{made:?}");

        pool.shutdown().await.expect("shutdown");
        let left = names(host.list_taps().await.expect("list"));
        assert_eq!(left, BTreeSet::from(["bgtapbusy".to_string()]));

        // A pool of size 0 creates on demand.
        let empty = TapPool::start(host.clone(), PoolConfig { size: 0, ..cfg }, &in_use)
            .await
            .expect("pool");
        assert_eq!(empty.last_create(), None, "nothing made yet");
        let cold = empty.acquire().await.expect("acquire");
        assert!(!cold.warm);
        assert!(
            first.took < cold.took,
            "a TAP from the pool ({:?}) is handed out faster than one made on demand ({:?})",
            first.took,
            cold.took
        );
        assert!(empty.last_create().is_some_and(|d| d <= cold.took));
        assert_eq!(empty.idle_count(), 0);
        empty.release(&cold.name);
        empty.shutdown().await.expect("shutdown");
        let left = names(host.list_taps().await.expect("list"));
        assert_eq!(
            left,
            BTreeSet::from(["bgtapbusy".to_string()]),
            "shutdown waits for the released TAP's deletion"
        );
    });
}

#[test]
fn pool_needs_the_bridge() {
    let ns = NetNs::new("nobr");
    ns.run(|| async {
        let host = Arc::new(LocalHostNet::connect().expect("netlink"));
        let cfg = PoolConfig {
            bridge: spec().name,
            owner_uid: OWNER,
            size: 1,
        };
        let e = TapPool::start(host, cfg, &HashSet::new())
            .await
            .err()
            .expect("no bridge");
        assert!(e.to_string().contains("banger0 does not exist"), "{e}");
    });
}

/// Loads `ruleset` (nft's own syntax) into `ns`.
fn load_nft(ns: &NetNs, ruleset: &str) {
    let path = std::env::temp_dir().join(format!("{}.nft", ns.name));
    std::fs::write(&path, ruleset).expect("write");
    let out = ns.exec(&["nft", "-f", path.to_str().expect("utf8")]);
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rules in an `nft -j` listing.
fn rules(listing: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    listing["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("rule"))
}

/// (chain, comment) of the per-VM rules of a table listing (not the guard).
fn rule_comments(table: &serde_json::Value) -> Vec<(String, String)> {
    rules(table)
        .filter(|r| r["comment"] != "banger guard")
        .map(|r| {
            (
                r["chain"].as_str().unwrap_or_default().to_string(),
                r["comment"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn nat_rules_live_only_in_bangers_table() {
    let ns = NetNs::new("nat");
    // Another table that must never change.
    load_nft(
        &ns,
        "table ip other {\n chain other_forward {\n  type filter hook forward priority 10; policy accept;\n  ip saddr 172.16.0.2 counter accept\n }\n}\n",
    );
    let before = ns.nft_table("other").expect("other table");
    assert_eq!(ns.nft_table("banger"), None);

    let s = subnet();
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        assert!(!nat::ip_forward().expect("read"));
        assert!(nat::current().await.expect("current").is_empty());

        host.nat_enable(&s, ip(2)).await.expect("enable");
        assert!(nat::ip_forward().expect("read"), "ip_forward turned on");
        let t = ns.nft_table("banger").expect("table");
        let c = rule_comments(&t);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(
            c.iter().all(|(_, cm)| cm == "banger vm 172.16.0.2"),
            "{c:?}"
        );
        assert_eq!(c.iter().filter(|(ch, _)| ch == "postrouting").count(), 1);
        assert_eq!(c.iter().filter(|(ch, _)| ch == "forward").count(), 2);

        // Idempotent.
        host.nat_enable(&s, ip(2)).await.expect("enable again");
        assert_eq!(rule_comments(&ns.nft_table("banger").expect("t")).len(), 3);

        host.nat_enable(&s, ip(3)).await.expect("enable .3");
        assert_eq!(rule_comments(&ns.nft_table("banger").expect("t")).len(), 6);
        assert_eq!(
            nat::current().await.expect("current"),
            BTreeSet::from([ip(2), ip(3)])
        );

        host.nat_disable(&s, ip(2)).await.expect("disable");
        let c = rule_comments(&ns.nft_table("banger").expect("t"));
        assert_eq!(c.len(), 3);
        assert!(
            c.iter().all(|(_, cm)| cm == "banger vm 172.16.0.3"),
            "{c:?}"
        );
        host.nat_disable(&s, ip(2)).await.expect("disable again");

        // Bad input never reaches nft.
        for bad in [ip(1), ip(0), ip(255), Ipv4Addr::new(10, 0, 0, 2)] {
            let e = host.nat_enable(&s, bad).await.expect_err("not a guest");
            assert!(e.to_string().contains("not a guest address"), "{e}");
        }

        host.nat_rebuild(&s, &BTreeSet::from([ip(5), ip(6)]))
            .await
            .expect("rebuild");
        assert_eq!(
            nat::current().await.expect("current"),
            BTreeSet::from([ip(5), ip(6)])
        );

        let st = nat::status().await;
        assert!(st.nft_version.is_some(), "{st:?}");
        assert_eq!(st.ip_forward, Some(true));
        assert_eq!(st.nat_vms, Some(vec![ip(5), ip(6)]));

        host.nat_rebuild(&s, &BTreeSet::new()).await.expect("clear");
        let t = ns.nft_table("banger").expect("the guard stays");
        assert!(rule_comments(&t).is_empty(), "{t}");
        assert!(t.to_string().contains("banger guard"), "{t}");
        host.nat_disable(&s, ip(5))
            .await
            .expect("disable without a table");
    });
    assert_eq!(ns.nft_table("other"), Some(before), "other table untouched");
}

/// The names of the tables in `ns`, as `family name`.
fn nft_tables(ns: &NetNs) -> Vec<String> {
    let out = ns.exec(&["nft", "list", "tables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table "))
        .map(str::to_string)
        .collect()
}

/// The comments of the rules in Docker's `DOCKER-USER` chain in `ns`
/// (`-` for a rule without one).
fn docker_user_comments(ns: &NetNs) -> Vec<String> {
    let out = ns.exec(&["nft", "-j", "list", "chain", "ip", "filter", "DOCKER-USER"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
    rules(&v)
        .map(|r| r["comment"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[test]
fn removal_takes_bangers_tables_and_rules_only() {
    let ns = NetNs::new("rmall");
    // Docker's chain for its users' rules, with a rule of the admin's.
    load_nft(
        &ns,
        "table ip filter {\n chain DOCKER-USER {\n  counter return\n }\n}\n",
    );

    let s = subnet();
    let tap = TapName::new("bgtap00000003").expect("tap");
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_enable(&s, ip(2)).await.expect("enable");
        host.guard_rebuild(&s, &[(tap, ip(2))].into())
            .await
            .expect("guard");
    });
    let mut tables = nft_tables(&ns);
    tables.sort();
    assert_eq!(
        tables,
        ["bridge banger", "inet banger", "ip banger", "ip filter"],
        "banger's three tables beside Docker's"
    );
    assert!(
        docker_user_comments(&ns)
            .iter()
            .any(|c| c.starts_with("banger")),
        "NAT is mirrored into DOCKER-USER"
    );

    ns.run(|| async {
        assert!(nat::remove_all().await.expect("remove"), "removed");
        assert!(
            !nat::remove_all().await.expect("again"),
            "nothing left to remove"
        );
    });
    assert_eq!(nft_tables(&ns), ["ip filter"]);
    assert_eq!(docker_user_comments(&ns), ["-"], "only the admin's rule");

    // Only some of the tables there (the others are never named: a
    // kernel without the bridge family refuses even their deletion).
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_enable(&s, ip(2)).await.expect("enable");
        assert!(nat::remove_all().await.expect("remove"), "removed");
    });
    assert_eq!(nft_tables(&ns), ["ip filter"]);
}

#[test]
fn tables_someone_else_changed_are_made_again_from_the_kept_state() {
    let ns = NetNs::new("heal");
    let s = subnet();
    let (a, b) = (
        TapName::new("bgtap00000002").expect("tap"),
        TapName::new("bgtap00000003").expect("tap"),
    );
    let bindings: guard::Bindings = [(a.clone(), ip(2)), (b.clone(), ip(3))].into();
    let nat = BTreeSet::from([ip(2)]);
    let ensure = || async {
        LocalHostNet::connect()
            .expect("netlink")
            .firewall_ensure(&s, Some(&bindings), &nat)
            .await
            .expect("ensure")
    };
    let made_again = |guard, nat| Repaired { guard, nat };
    // The tables as the daemon's start makes them, and as `ensure` leaves
    // them: a listing to compare with after each repair.
    let canonical = |ns: &NetNs| {
        let mut tables = nft_tables(ns);
        tables.sort();
        tables
            .into_iter()
            .map(|t| {
                let mut args = vec!["nft", "list", "table"];
                args.extend(t.split(' '));
                let listing = ns.exec(&args);
                (t, String::from_utf8_lossy(&listing.stdout).into_owned())
            })
            .collect::<Vec<_>>()
    };
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_rebuild(&s, &nat).await.expect("nat");
        host.guard_rebuild(&s, &bindings).await.expect("guard");
        assert_eq!(ensure().await, Repaired::default(), "all in place");
    });
    let made = canonical(&ns);
    assert_eq!(
        made.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["bridge banger", "inet banger", "ip banger"]
    );

    // A flush, as a restart of the host's nftables service does.
    assert!(ns.exec(&["nft", "flush", "ruleset"]).status.success());
    assert!(nft_tables(&ns).is_empty());
    ns.run(|| async {
        assert_eq!(ensure().await, made_again(true, true));
        assert_eq!(ensure().await, Repaired::default(), "then in place");
    });
    assert_eq!(canonical(&ns), made, "the same tables again");

    // A flush and then a VM's start before the check: the allow makes the
    // bridge table's sets, not its rules.
    assert!(ns.exec(&["nft", "flush", "ruleset"]).status.success());
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.guard_allow(&s, &a, ip(2)).await.expect("allow");
        host.nat_enable(&s, ip(2)).await.expect("nat");
        assert_eq!(ensure().await, made_again(true, false));
    });
    assert_eq!(canonical(&ns), made);

    // A rule deleted, an element added or taken away, a chain that drops
    // everything, a NAT VM too many.
    // A rule is named by its chain and handle, read when it is deleted.
    let first_rule = |family: &str| {
        let out = ns.exec(&["nft", "-j", "list", "table", family, "banger"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        // In NAT's table the forward guard: no per-VM comment names it.
        let r = rules(&v)
            .find(|r| family != "ip" || r["comment"] == "banger guard")
            .expect("a rule");
        format!(
            "delete rule {family} banger {} handle {}",
            r["chain"].as_str().expect("chain"),
            r["handle"].as_u64().expect("handle")
        )
    };
    let drop_all =
        |family: &str, chain: &str| format!("chain {family} banger {chain} {{ policy drop; }}");
    let extra = "add element bridge banger guest_ips { \"bgtap00000009\" . 172.16.0.9 }";
    let missing =
        "delete element bridge banger guest_macs { \"bgtap00000003\" . 06:00:ac:10:00:03 }";
    for (edit, guard, nat) in [
        ("inet", true, false),
        ("ip", false, true),
        (extra, true, false),
        (missing, true, false),
        ("policy bridge guard", true, false),
        ("policy ip forward", false, true),
    ] {
        let line = match edit.split(' ').collect::<Vec<_>>()[..] {
            ["inet" | "ip"] => first_rule(edit),
            ["policy", family, chain] => drop_all(family, chain),
            _ => edit.to_string(),
        };
        let out = ns.exec(&["nft", &line]);
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns.run(|| async {
            assert_eq!(ensure().await, made_again(guard, nat), "after {line}");
        });
        assert_eq!(canonical(&ns), made, "after {line}");
    }
    ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_enable(&s, ip(4)).await.expect("nat");
        assert_eq!(ensure().await, made_again(false, true), "a NAT VM too many");
    });
    assert_eq!(canonical(&ns), made);

    // Docker's chain for its users' rules, which Docker restarted after a
    // flush makes empty: banger's rules there are part of NAT's state.
    load_nft(
        &ns,
        "table ip filter {\n chain DOCKER-USER {\n  counter return\n }\n}\n",
    );
    let ours = |ns: &NetNs| {
        docker_user_comments(ns)
            .into_iter()
            .filter(|c| c.starts_with("banger"))
            .count()
    };
    ns.run(|| async {
        assert_eq!(ensure().await, made_again(false, true), "Docker's chain");
    });
    assert_eq!(ours(&ns), 3, "the bridge's rule and the NAT VM's two");
    assert!(
        ns.exec(&["nft", "flush", "chain", "ip", "filter", "DOCKER-USER"])
            .status
            .success()
    );
    ns.run(|| async {
        assert_eq!(
            ensure().await,
            made_again(false, true),
            "Docker's chain emptied"
        );
        assert_eq!(ensure().await, Repaired::default(), "then in place");
    });
    assert_eq!(ours(&ns), 3);
}

/// An HTTP server in `ns` on `addr` that answers every request with
/// `hello` and reports each client's address.
struct Upstream {
    peers: mpsc::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let listener = ns.enter(|| TcpListener::bind(addr).expect("bind upstream"));
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, peers) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 512];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
                        let _ = tx.send(peer);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Self {
            peers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP GET from inside `ns`.
fn http_get(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    ns.enter(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

#[test]
fn guest_reaches_upstream_only_with_nat() {
    // upstream <-veth-> host (banger0 bridge) <-veth on the bridge-> guest
    let host_ns = NetNs::new("h");
    let up_ns = NetNs::new("u");
    let guest_ns = NetNs::new("g");
    let up_addr: SocketAddr = "10.200.0.2:8080".parse().expect("addr");

    host_ns.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &up_ns.name,
    ]);
    host_ns.ip(&["addr", "add", "10.200.0.1/24", "dev", "uplink"]);
    host_ns.ip(&["link", "set", "uplink", "up"]);
    up_ns.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
    up_ns.ip(&["link", "set", "eth0", "up"]);
    // The guest's side stands in for a VM's TAP.
    host_ns.ip(&[
        "link",
        "add",
        "bgvguest",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &guest_ns.name,
    ]);
    guest_ns.ip(&["addr", "add", "172.16.0.2/24", "dev", "eth0"]);
    guest_ns.ip(&["link", "set", "eth0", "up"]);

    let s = subnet();
    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.ensure_bridge(&spec()).await.expect("bridge");
        host.netlink()
            .attach_to_bridge("bgvguest", &spec().name)
            .await
            .expect("attach");
    });
    guest_ns.ip(&["route", "add", "default", "via", "172.16.0.1"]);
    let server = Upstream::start(&up_ns, up_addr);

    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_enable(&s, ip(2)).await.expect("nat on");
    });
    let body = http_get(&guest_ns, up_addr).expect("guest reaches upstream with NAT");
    assert!(body.ends_with("hello"), "{body}");
    let peer = server
        .peers
        .recv_timeout(Duration::from_secs(5))
        .expect("upstream saw the connection");
    assert_eq!(
        peer.ip(),
        Ipv4Addr::new(10, 200, 0, 1),
        "upstream sees the host's address, not the guest's"
    );

    // A LAN neighbour that routes the bridge's cidr through the host gets
    // no connection to a guest's port: forwarding is on (for NAT), but new
    // connections into the bridge from outside it are dropped.
    let guest_port: SocketAddr = "172.16.0.2:9000".parse().expect("addr");
    let _listener = guest_ns.enter(|| TcpListener::bind(guest_port).expect("bind in the guest"));
    up_ns.ip(&["route", "add", "172.16.0.0/24", "via", "10.200.0.1"]);
    let neighbour = |what: &str| {
        let r = up_ns.enter(|| TcpStream::connect_timeout(&guest_port, Duration::from_secs(2)));
        assert!(
            r.is_err(),
            "a LAN neighbour connected to a guest port {what}"
        );
    };
    neighbour("with NAT on");
    // The guest's own connections out still work after that.
    let body = http_get(&guest_ns, up_addr).expect("guest still reaches upstream");
    assert!(body.ends_with("hello"), "{body}");
    let _ = server.peers.recv_timeout(Duration::from_secs(5));

    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.nat_disable(&s, ip(2)).await.expect("nat off");
    });
    // Forwarding stays on after NAT: the guard stays too.
    neighbour("with NAT off");
    // Without that route the upstream has no way back to a guest address.
    up_ns.ip(&["route", "del", "172.16.0.0/24"]);
    let e = http_get(&guest_ns, up_addr).expect_err("no way back without NAT");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::ConnectionRefused
        ),
        "{e:?}"
    );
    assert!(
        server.peers.try_recv().is_err(),
        "no connection completed without NAT"
    );
}

const PROBE_CHILD_ENV: &str = "BANGER_NET_PROBE_CHILD";
const PROBE_MARKER: &str = "probe-child: routed and unrouted cases checked";

/// Removes a directory tree on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn host_resolver_probe() {
    // `ip netns exec` puts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf,
    // so the child's own resolver asks 127.0.0.1:53 inside the namespace.
    let ns = NetNs::new("probe");
    let dir = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let _cleanup = RemoveDir(dir.clone());
    std::fs::write(
        dir.join("resolv.conf"),
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .expect("resolv.conf");
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .args(["--exact", "probe_child", "--ignored", "--nocapture"])
        .env(PROBE_CHILD_ENV, "1")
        .output()
        .expect("run child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains(PROBE_MARKER), "{text}");
}

#[test]
#[ignore = "started by host_resolver_probe inside its namespace"]
fn probe_child() {
    use banger_net::dns::{DnsRecords, DnsServer};
    use banger_net::resolved::{ProbeResult, probe};
    // Outside the parent's namespace this would ask the host's real
    // resolver: do nothing (the parent looks for the marker printed below).
    if std::env::var(PROBE_CHILD_ENV).as_deref() != Ok("1") {
        eprintln!("probe_child only runs inside host_resolver_probe");
        return;
    }
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let records = DnsRecords::new();
            // Nothing answers on port 53 yet.
            let r = probe(&records, Duration::from_secs(5)).await;
            assert!(matches!(r, ProbeResult::NotRouted(_)), "{r:?}");
            let server = DnsServer::start("127.0.0.1:53".parse().expect("addr"), records.clone())
                .await
                .expect("dns on :53");
            let r = probe(&records, Duration::from_secs(5)).await;
            assert_eq!(r, ProbeResult::Routed);
            assert!(records.is_empty(), "the probe record is removed");
            server.shutdown().await.expect("shutdown");
        });
    println!("{PROBE_MARKER}");
}

/// A `cidr` the host already uses (as a nested banger's guest does with the
/// default range on its own eth0) is found, naming the interface; banger's
/// own bridge does not count.
#[test]
fn cidr_overlaps_with_the_hosts_addresses_and_routes_are_found() {
    let ns = NetNs::new("cidr");
    // Plays a guest's eth0 in the default range, and a LAN route.
    ns.ip(&[
        "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p",
    ]);
    ns.ip(&["addr", "add", "172.16.0.15/24", "dev", "eth9"]);
    ns.ip(&["link", "set", "eth9", "up"]);
    ns.ip(&["link", "set", "eth9p", "up"]);
    ns.ip(&["route", "add", "10.50.0.0/16", "dev", "eth9"]);
    let net = |s: &str| -> ipnet::Ipv4Net { s.parse().expect("cidr") };
    ns.run(|| async {
        let nl = banger_net::link::Netlink::connect().expect("netlink");
        let uses = nl
            .cidr_uses(net("172.16.0.0/24"), "banger0")
            .await
            .expect("uses");
        let shown: Vec<String> = uses.iter().map(ToString::to_string).collect();
        assert!(
            shown.contains(&"address 172.16.0.15/24 on eth9".to_string()),
            "{shown:?}"
        );
        assert!(uses.iter().all(|u| u.interface == "eth9"), "{shown:?}");
        // A wider range containing it, and a range inside a route.
        assert!(
            !nl.cidr_uses(net("172.16.0.0/16"), "banger0")
                .await
                .expect("uses")
                .is_empty()
        );
        let inside = nl
            .cidr_uses(net("10.50.3.0/24"), "banger0")
            .await
            .expect("uses");
        let shown: Vec<String> = inside.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["route 10.50.0.0/16 on eth9"]);
        // Free ranges, and the bridge's own address and route.
        assert_eq!(
            nl.cidr_uses(net("10.213.0.0/24"), "banger0")
                .await
                .expect("uses"),
            []
        );
        let own = Subnet::new(net("10.213.0.0/24"), Ipv4Addr::new(10, 213, 0, 1)).expect("subnet");
        let host = LocalHostNet::connect().expect("netlink");
        host.ensure_bridge(&BridgeSpec {
            name: IfName::new("banger0").expect("name"),
            subnet: own,
        })
        .await
        .expect("bridge");
        assert_eq!(
            nl.cidr_uses(net("10.213.0.0/24"), "banger0")
                .await
                .expect("uses"),
            []
        );
        let other = nl
            .cidr_uses(net("10.213.0.0/24"), "other0")
            .await
            .expect("uses");
        assert!(other.iter().any(|u| u.interface == "banger0"), "{other:?}");
    });
}

/// Every guest sends only as itself: a guest that takes another VM's
/// address or MAC reaches nothing through the bridge, a TAP the guard does
/// not know (an idle one) passes nothing, and the guests still reach the
/// host and each other as themselves.
#[test]
fn a_guest_cannot_send_as_another() {
    use banger_net::MacAddr;
    let host_ns = NetNs::new("gh");
    let guests: Vec<NetNs> = (0..3).map(|i| NetNs::new(&format!("g{i}"))).collect();
    let taps: Vec<TapName> = (0..3)
        .map(|i| TapName::new(format!("bgtapguard{i}")).expect("tap"))
        .collect();
    let s = subnet();
    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.ensure_bridge(&spec()).await.expect("bridge");
    });
    // Each guest's veth end stands in for a VM's TAP.
    for (i, (g, tap)) in guests.iter().zip(&taps).enumerate() {
        let me = ip(2 + i as u8);
        host_ns.ip(&[
            "link",
            "add",
            tap.as_str(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &g.name,
        ]);
        g.ip(&[
            "link",
            "set",
            "eth0",
            "address",
            &MacAddr::from_ip(me).to_string(),
        ]);
        g.ip(&["addr", "add", &format!("{me}/24"), "dev", "eth0"]);
        g.ip(&["link", "set", "eth0", "up"]);
        host_ns.ip(&["link", "set", tap.as_str(), "master", "banger0", "up"]);
    }
    let port = SocketAddr::from((s.bridge_ip(), 7000));
    let _host_listener = host_ns.enter(|| TcpListener::bind(port).expect("bind on the host"));
    let guest_port = SocketAddr::from((ip(3), 7001));
    let _guest_listener = guests[1].enter(|| TcpListener::bind(guest_port).expect("bind"));
    let reaches = |g: &NetNs, to: SocketAddr| {
        g.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
    };
    let forget_neighbours = || {
        host_ns.ip(&["neigh", "flush", "dev", "banger0"]);
        for g in &guests {
            g.ip(&["neigh", "flush", "dev", "eth0"]);
        }
    };

    let bindings: banger_net::guard::Bindings =
        [(taps[0].clone(), ip(2)), (taps[1].clone(), ip(3))].into();
    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.guard_rebuild(&s, &bindings).await.expect("guard");
    });
    assert!(
        reaches(&guests[0], port),
        "a guest reaches the host as itself"
    );
    assert!(reaches(&guests[0], guest_port), "and another guest");
    assert!(!reaches(&guests[2], port), "an unknown TAP passes nothing");

    // Guest 0 takes guest 1's address (guest 1 keeps it too).
    guests[0].ip(&["addr", "del", &format!("{}/24", ip(2)), "dev", "eth0"]);
    guests[0].ip(&["addr", "add", &format!("{}/24", ip(3)), "dev", "eth0"]);
    forget_neighbours();
    assert!(
        !reaches(&guests[0], port),
        "a guest sent as another's address"
    );
    guests[0].ip(&["addr", "del", &format!("{}/24", ip(3)), "dev", "eth0"]);
    guests[0].ip(&["addr", "add", &format!("{}/24", ip(2)), "dev", "eth0"]);
    // Its own address with guest 1's MAC.
    guests[0].ip(&[
        "link",
        "set",
        "eth0",
        "address",
        &MacAddr::from_ip(ip(3)).to_string(),
    ]);
    forget_neighbours();
    assert!(
        !reaches(&guests[0], port),
        "a guest sent with another's MAC"
    );
    guests[0].ip(&[
        "link",
        "set",
        "eth0",
        "address",
        &MacAddr::from_ip(ip(2)).to_string(),
    ]);
    forget_neighbours();
    assert!(reaches(&guests[0], port), "itself again, it is let through");

    // A VM starting behind the idle TAP, then stopping.
    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.guard_allow(&s, &taps[2], ip(4)).await.expect("allow");
        host.guard_allow(&s, &taps[2], ip(4))
            .await
            .expect("allow again");
    });
    assert!(reaches(&guests[2], port), "allowed, it reaches the host");
    host_ns.run(|| async {
        let host = LocalHostNet::connect().expect("netlink");
        host.guard_forget(&s, &taps[2], ip(4))
            .await
            .expect("forget");
        host.guard_forget(&s, &taps[2], ip(4))
            .await
            .expect("forget again");
        let e = host
            .guard_allow(&s, &taps[2], s.bridge_ip())
            .await
            .expect_err("the bridge's address is no guest's");
        assert!(e.to_string().contains("not a guest address"), "{e}");
    });
    forget_neighbours();
    assert!(!reaches(&guests[2], port), "forgotten, it passes nothing");
    assert!(reaches(&guests[1], port), "the others are untouched");

    // Frames to the reserved link-local group addresses skip the bridge's
    // prerouting hook: guest 0 sends one as guest 1 (its MAC and address)
    // to 01:80:c2:00:00:0e with a UDP datagram for the host inside.
    let fdb_port = |mac: &str| {
        let out = std::process::Command::new("bridge")
            .args(["-n", &host_ns.name, "fdb", "show", "br", "banger0"])
            .output()
            .expect("bridge fdb");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(mac))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    };
    let mac1 = MacAddr::from_ip(ip(3));
    assert_eq!(
        fdb_port(&mac1.to_string()).as_deref(),
        Some(taps[1].as_str())
    );
    host_ns.enter(|| {
        for knob in ["all", "default", taps[0].as_str()] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{knob}/rp_filter"), "0")
                .expect("rp_filter off, the kernel's default");
        }
    });
    let sink = SocketAddr::from((s.bridge_ip(), 7002));
    let sink_socket = host_ns.enter(|| {
        let u = std::net::UdpSocket::bind(sink).expect("bind the sink");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u
    });
    guests[0].enter(|| {
        send_raw(
            "eth0",
            [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e],
            mac1.0,
            ip(3),
            sink,
            b"spoofed",
        )
    });
    let mut buf = [0u8; 64];
    let got = host_ns.enter(|| sink_socket.recv_from(&mut buf));
    assert!(
        got.is_err(),
        "the host took a datagram sent as another guest: {got:?}"
    );
    assert_eq!(
        fdb_port(&mac1.to_string()).as_deref(),
        Some(taps[1].as_str()),
        "the bridge learnt guest 1's MAC from guest 0's frame"
    );
}

/// Sends one Ethernet frame out of `ifname` (in the calling thread's
/// namespace): `dst`, `src`, an IPv4/UDP datagram from `from` to `to`.
fn send_raw(
    ifname: &str,
    dst: [u8; 6],
    src: [u8; 6],
    from: Ipv4Addr,
    to: SocketAddr,
    payload: &[u8],
) {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut ip_hdr = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip_hdr[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip_hdr.extend_from_slice(&from.octets());
    ip_hdr.extend_from_slice(&to.ip().octets());
    let mut sum: u32 = ip_hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip_hdr[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip_hdr);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&to.port().to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // a sockaddr_ll that outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sending the frame: {err}");
    }
}
