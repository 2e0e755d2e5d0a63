//! VM networking against real guests: addresses, guest-to-guest traffic,
//! `.vm` DNS, NAT to an "upstream" network, `vm ports`, and what survives a
//! daemon restart. Everything happens in the installation's network
//! namespace and a second namespace playing the upstream network, joined
//! by a veth pair; nothing touches the host's own namespace.

use banger_e2e::{Banger, run_ip, shared, text, wait_until};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const UPSTREAM_GW: &str = "198.51.100.1";
const UPSTREAM_SERVER: &str = "198.51.100.2";
const DNS: &str = "42069";

/// The upstream namespace with an HTTP server that logs client addresses.
struct Upstream {
    ns: String,
    server: Child,
    log: std::path::PathBuf,
}

impl Upstream {
    fn start(b: &Banger) -> Upstream {
        let ns = format!("{}-up", b.netns);
        let _ = quiet(&["netns", "delete", &ns]);
        run_ip(&["netns", "add", &ns]);
        // The daemon's namespace may keep the veth from an earlier run.
        let _ = quiet(&["-n", &b.netns, "link", "delete", "bge-up0"]);
        b.ip(&[
            "link", "add", "bge-up0", "type", "veth", "peer", "name", "bge-dn0", "netns", &ns,
        ]);
        b.ip(&[
            "addr",
            "add",
            &format!("{UPSTREAM_GW}/24"),
            "dev",
            "bge-up0",
        ]);
        b.ip(&["link", "set", "bge-up0", "up"]);
        let _ = quiet(&["-n", &b.netns, "route", "del", "default"]);
        b.ip(&["route", "add", "default", "via", UPSTREAM_SERVER]);
        run_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{UPSTREAM_SERVER}/24"),
            "dev",
            "bge-dn0",
        ]);
        run_ip(&["-n", &ns, "link", "set", "bge-dn0", "up"]);
        run_ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // No default route upstream: only masqueraded traffic (from the
        // daemon namespace's own address) can be answered.
        let log = b.root.join("upstream-http.log");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "/usr/bin/python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                UPSTREAM_SERVER,
            ])
            .current_dir(&b.root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn upstream http server");
        let probe_ns = ns.clone();
        wait_until("the upstream server", Duration::from_secs(20), || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &probe_ns,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "2",
                ])
                .arg(format!("http://{UPSTREAM_SERVER}:8000/"))
                .status()
                .is_ok_and(|s| s.success())
        });
        Upstream { ns, server, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
    }
}

/// `ip args...` whose failure is expected and uninteresting.
fn quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn dig(b: &Banger, name: &str) -> String {
    let out = b
        .in_netns(
            "dig",
            &["@127.0.0.1", "-p", DNS, "+tries=1", "+time=2", name, "A"],
        )
        .output()
        .expect("spawn dig");
    assert!(out.status.success(), "dig: {}", text(&out).1);
    text(&out).0
}

/// The A record of `name`, or the response status (`NXDOMAIN`, ...).
fn resolve(b: &Banger, name: &str) -> Result<String, String> {
    let answer = dig(b, name);
    let status = answer
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
        .to_string();
    if status != "NOERROR" {
        return Err(status);
    }
    answer
        .lines()
        .find(|l| !l.starts_with(';') && l.contains("\tA\t"))
        .and_then(|l| l.split_whitespace().last())
        .map(String::from)
        .ok_or(status)
}

/// The bridge's address (the default `cidr`'s first).
const BRIDGE_IP: &str = "172.16.0.1";
const SINK_PORT: u16 = 9999;

/// A UDP sink on the bridge's address in the daemon's namespace: prints
/// `SOURCE MESSAGE` per datagram until `end` (or 60 s without one). Returns
/// once it is bound.
fn spawn_sink(b: &Banger) -> Child {
    use std::io::BufRead;
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{BRIDGE_IP}', {SINK_PORT}))\n\
         s.settimeout(60)\n\
         print('ready', flush=True)\n\
         while True:\n    \
             data, (ip, _) = s.recvfrom(64)\n    \
             print(ip, data.decode(errors='replace'), flush=True)\n    \
             if data == b'end':\n        \
                 break\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &b.netns, "/usr/bin/python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the sink");
    let mut first = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = std::io::BufReader::new(stdout);
    reader.read_line(&mut first).expect("the sink's first line");
    assert_eq!(first.trim(), "ready", "the sink did not start");
    child.stdout = Some(reader.into_inner());
    child
}

/// Runs `script` with bash in the guest (`/dev/tcp` is a bash feature).
fn exec(b: &Banger, vm: &str, script: &str) -> (bool, String, String) {
    let out = b.run(&["vm", "exec", vm, "--", "bash", "-c", script]);
    let (o, e) = text(&out);
    (out.status.success(), o, e)
}

fn vm_ip(b: &Banger, vm: &str) -> String {
    b.json(&["vm", "show", vm])["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{vm} has no ip"))
        .to_string()
}

#[test]
fn bridge_dns_nat_ports_and_restart() {
    let b = shared();
    let up = Upstream::start(b);

    // Two VMs, booted concurrently: one with NAT, one without.
    let create = |args: &'static [&'static str]| {
        let out = b.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out).1);
    };
    std::thread::scope(|s| {
        s.spawn(|| create(&["vm", "create", "--name", "net-a", "--nat"]));
        s.spawn(|| create(&["vm", "create", "--name", "net-b"]));
    });
    let (ip_a, ip_b) = (vm_ip(b, "net-a"), vm_ip(b, "net-b"));
    assert_ne!(ip_a, ip_b);
    for ip in [&ip_a, &ip_b] {
        assert!(ip.starts_with("172.16.0."), "{ip}");
    }
    let show = b.json(&["vm", "show", "net-a"]);
    assert_eq!(show["nat"], true);
    assert!(
        show["tap"].as_str().is_some_and(|t| t.starts_with("bgtap")),
        "{show}"
    );

    // The guests carry their addresses and reach each other (sshd on b).
    let (ok, out, err) = exec(b, "net-b", "ip -4 -o addr show dev eth0");
    assert!(ok && out.contains(&format!("{ip_b}/24")), "{out} {err}");
    let (ok, out, err) = exec(
        b,
        "net-a",
        &format!(
            "for i in $(seq 90); do (echo > /dev/tcp/{ip_b}/22) 2>/dev/null && exit 0; sleep 1; done; exit 1"
        ),
    );
    assert!(ok, "net-a cannot reach net-b:22: {out} {err}");

    // .vm DNS in the daemon's namespace.
    assert_eq!(resolve(b, "net-a.vm"), Ok(ip_a.clone()));
    assert_eq!(resolve(b, "net-b.vm"), Ok(ip_b.clone()));
    assert_eq!(resolve(b, "nobody.vm"), Err("NXDOMAIN".into()));

    // NAT on: the upstream server sees the masqueraded address.
    let curl =
        format!("curl -s -o /dev/null -w '%{{http_code}}' -m 10 http://{UPSTREAM_SERVER}:8000/");
    let (ok, out, err) = exec(b, "net-a", &curl);
    assert!(
        ok && out == "200",
        "NAT VM could not fetch upstream: {out} {err}"
    );
    assert!(up.log().contains(UPSTREAM_GW), "upstream log: {}", up.log());
    assert!(!up.log().contains(&ip_a), "unmasqueraded: {}", up.log());
    // NAT off: no way back.
    let (ok, out, _) = exec(b, "net-b", &curl);
    assert!(!ok, "the VM without NAT reached upstream: {out}");
    // NAT on and off again while it runs: the rules follow at once.
    let set = |args: &[&str]| {
        let out = b.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out).1);
    };
    set(&["vm", "set", "net-b", "--nat"]);
    let (ok, out, err) = exec(b, "net-b", &curl);
    assert!(
        ok && out == "200",
        "NAT turned on did not work: {out} {err}"
    );
    set(&["vm", "set", "net-b", "--no-nat"]);
    let (ok, out, _) = exec(b, "net-b", &curl);
    assert!(!ok, "NAT turned off still works: {out}");

    // Root in a guest can take another VM's address; the bridge drops what
    // it sends as one. net-b sends three datagrams to the host: as itself,
    // as net-a (an address it added), as itself again.
    let spoof_is_dropped = |when: &str| {
        let sink = spawn_sink(b);
        let (ok, out, err) = exec(
            b,
            "net-b",
            &format!(
                "ip addr add {ip_a}/32 dev eth0 || exit 1; \
                 python3 -c \"
import socket
def send(src, msg):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.sendto(msg, ('{BRIDGE_IP}', {SINK_PORT}))
send('{ip_b}', b'own'); send('{ip_a}', b'spoofed'); send('{ip_b}', b'end')
\"; rc=$?; ip addr del {ip_a}/32 dev eth0; exit $rc"
            ),
        );
        assert!(ok, "sending from net-b {when}: {out} {err}");
        let seen = sink.wait_with_output().expect("the host's sink");
        let seen = text(&seen).0;
        assert!(
            seen.contains(&format!("{ip_b} own")) && seen.contains(&format!("{ip_b} end")),
            "the host did not get net-b's own datagrams {when}: {seen}"
        );
        assert!(
            !seen.contains("spoofed"),
            "a guest sent as another VM's address {when}: {seen}"
        );
    };
    spoof_is_dropped("");

    // Someone flushes the host's nftables (as a restart of its nftables
    // service does): the daemon makes its tables again from what it keeps,
    // the checks with both VMs' addresses and net-a's NAT.
    let flush = b
        .in_netns("nft", &["flush", "ruleset"])
        .output()
        .expect("nft");
    assert!(flush.status.success(), "{}", text(&flush).1);
    let listed = |family: &str| {
        let out = b
            .in_netns("nft", &["list", "table", family, "banger"])
            .output()
            .expect("nft");
        text(&out).0
    };
    wait_until(
        "the daemon to make its nftables tables again",
        Duration::from_secs(60),
        || {
            let (bridge, nat) = (listed("bridge"), listed("ip"));
            bridge.contains("chain guard")
                && bridge.contains(&ip_a)
                && bridge.contains(&ip_b)
                && !listed("inet").is_empty()
                && nat.contains(&format!("banger vm {ip_a}"))
                && nat.contains("banger guard")
        },
    );
    spoof_is_dropped("after a flush");
    let (ok, out, err) = exec(b, "net-a", &curl);
    assert!(ok && out == "200", "NAT lost after a flush: {out} {err}");

    // vm ports finds a web server started in the guest.
    let (ok, _, err) = exec(
        b,
        "net-a",
        "cd /tmp && setsid -f python3 -m http.server 8080 >/dev/null 2>&1",
    );
    assert!(ok, "{err}");
    let mut last = serde_json::Value::Null;
    wait_until(
        "vm ports to show the web server",
        Duration::from_secs(120),
        || {
            // A listing that fails (the guest still booting) is tried again.
            let out = b.run(&["vm", "ports", "net-a", "--json"]);
            let now = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if now != last || now.is_null() {
                // Shown only when the test fails: what the listing said.
                eprintln!(
                    "vm ports: {now} {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            last = now;
            last.as_array().is_some_and(|ports| {
                ports.iter().any(|p| {
                    p["port"] == 8080
                        && p["protocol"] == "http"
                        && p["url"] == "http://net-a.vm:8080/"
                        && p["command"]
                            .as_str()
                            .is_some_and(|c| c.contains("http.server"))
                })
            })
        },
    );
    let table = b.run(&["vm", "ports", "net-a"]);
    assert!(
        text(&table).0.contains("http://net-a.vm:8080/"),
        "{}",
        text(&table).0
    );

    // A daemon restart keeps addresses, DNS records and NAT.
    b.kill_daemon();
    assert_eq!(vm_ip(b, "net-a"), ip_a);
    assert_eq!(resolve(b, "net-b.vm"), Ok(ip_b.clone()));
    let (ok, out, err) = exec(b, "net-a", &curl);
    assert!(ok && out == "200", "NAT lost after restart: {out} {err}");

    // Stop removes the record; delete frees the name for good.
    let out = b.run(&["vm", "stop", "net-b"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(resolve(b, "net-b.vm"), Err("NXDOMAIN".into()));
    assert!(b.json(&["vm", "show", "net-b"])["tap"].is_null());
    let out = b.run(&["vm", "delete", "net-a", "net-b"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(resolve(b, "net-a.vm"), Err("NXDOMAIN".into()));
    let nat = b
        .in_netns("nft", &["list", "table", "ip", "banger"])
        .output()
        .expect("nft");
    for ip in [&ip_a, &ip_b] {
        assert!(
            !text(&nat).0.contains(ip.as_str()),
            "NAT rules left: {}",
            text(&nat).0
        );
    }
    // With no VM running, a daemon stop leaves no TAP: the deleted VMs'
    // (deleted in the background) and the pool's idle ones are gone.
    let out = b.run(&["daemon", "stop"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let links = b.ip(&["-o", "link", "show", "type", "tun"]);
    assert!(
        !links.contains("bgtap"),
        "TAPs left after daemon stop: {links}"
    );
}

/// A `cidr` the host already uses (here an interface of the daemon's
/// namespace in the default range, as a nested banger's guest has) is
/// refused for bridge networking, naming the interface and the key to
/// change; `doctor` shows it.
#[test]
fn a_cidr_the_host_uses_is_refused_naming_the_interface() {
    let b = Banger::isolated("cidr");
    b.write_config(
        "network = \"bridge\"\ndns_listen_addr = \"127.0.0.1:0\"\nweb_listen_addr = \"\"\n",
    );
    b.ip(&[
        "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p",
    ]);
    b.ip(&["addr", "add", "172.16.0.15/24", "dev", "eth9"]);
    b.ip(&["link", "set", "eth9", "up"]);
    // Starts the daemon.
    let out = b.run(&["vm", "list"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let out = b.run(&["doctor", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor json");
    let row = |name: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} row in {rows}"))
            .clone()
    };
    let network = row("network");
    let detail = network["detail"].as_str().unwrap_or_default();
    assert_eq!(network["status"], "fail", "{network}");
    for needle in [
        "172.16.0.0/24",
        "address 172.16.0.15/24 on eth9",
        "set cidr in config.toml",
    ] {
        assert!(detail.contains(needle), "{needle}: {detail}");
    }
    let cidr = row("cidr");
    assert_eq!(cidr["status"], "fail", "{cidr}");
    assert!(
        cidr["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("on eth9"),
        "{cidr}"
    );
    // No bridge was made with the host's addresses.
    let links = b.ip(&["-o", "link", "show"]);
    assert!(!links.contains("banger0"), "{links}");
}
