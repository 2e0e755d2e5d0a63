//! `banger system install` for real: inside a guest (which runs systemd as
//! PID 1, unlike the build machines), with the freshly built binaries.
//! The guest has no QEMU, so the installed daemon cannot boot VMs; it must
//! still start, answer its socket and use the root helper.

use banger_e2e::{Banger, shared, text};
use banger_root_helper::proto::PROTOCOL_VERSION;
use std::io::Write;
use std::process::{Output, Stdio};

const VM: &str = "e2e-system";
const OWNER: &str = "bgowner";
const OTHER: &str = "bgother";

/// Talks the helper protocol raw, as any local process could.
const HELPER_PY: &str = r#"import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("/run/banger-root/bangerd-root.sock")
except OSError as e:
    print("connect failed:", e.strerror)
    sys.exit(0)
s.sendall(sys.argv[1].encode() + b"\n")
print(s.makefile().readline().strip())
"#;

struct DeleteVm<'a>(&'a Banger);

impl Drop for DeleteVm<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["vm", "delete", VM]);
    }
}

fn exec(b: &Banger, argv: &[&str]) -> Output {
    let mut args = vec!["vm", "exec", VM, "--"];
    args.extend_from_slice(argv);
    b.run(&args)
}

/// Runs `argv` in the guest, asserting success; returns stdout.
fn ok(b: &Banger, argv: &[&str]) -> String {
    let out = exec(b, argv);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{argv:?} failed: {o}\n{e}");
    o
}

fn sh(b: &Banger, script: &str) -> String {
    ok(b, &["sh", "-c", script])
}

/// Writes `data` to `path` in the guest with mode `mode`.
fn put(b: &Banger, path: &str, data: &[u8], mode: &str) {
    let script = format!("cat > {path} && chmod {mode} {path}");
    let mut child = b
        .cmd(&["vm", "exec", VM, "--", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn banger vm exec");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(data).expect("stream into the guest");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "writing {path}: {}", text(&out).1);
}

/// One raw helper request as `user`; the helper's answer line. `"version":V`
/// in `request` stands for the protocol version of the helper under test.
fn helper(b: &Banger, user: &str, request: &str) -> String {
    let request = request.replace(
        r#""version":V,"#,
        &format!(r#""version":{PROTOCOL_VERSION},"#),
    );
    let request = request.as_str();
    ok(
        b,
        &[
            "runuser",
            "-u",
            user,
            "--",
            "python3",
            "/opt/bin/helper.py",
            request,
        ],
    )
    .trim()
    .to_string()
}

fn as_owner(b: &Banger, argv: &[&str]) -> Output {
    let mut a = vec!["runuser", "-u", OWNER, "--"];
    a.extend_from_slice(argv);
    exec(b, &a)
}

fn both_active(b: &Banger) {
    assert_eq!(
        sh(
            b,
            "systemctl is-active bangerd.service bangerd-root.service || true"
        ),
        "active\nactive\n",
        "journal: {}",
        sh(
            b,
            "journalctl --no-pager -n 40 -u bangerd.service -u bangerd-root.service || true"
        )
    );
}

#[test]
fn install_status_helper_reinstall_and_uninstall_in_a_guest() {
    let b = shared();
    let _ = b.run(&["vm", "delete", VM]);
    let out = b.run(&["vm", "create", "--name", VM]);
    assert!(out.status.success(), "vm create: {}", text(&out).1);
    let _cleanup = DeleteVm(b);

    // The binaries under test, world-readable so the owner can run them.
    sh(b, "mkdir -p /opt/bin && chmod 755 /opt /opt/bin");
    for bin in ["banger", "bangerd", "banger-agent"] {
        let data = std::fs::read(b.bin_dir.join(bin)).expect("built binary");
        put(b, &format!("/opt/bin/{bin}"), &data, "755");
    }
    put(b, "/opt/bin/helper.py", HELPER_PY.as_bytes(), "644");
    // systemd's manager must answer before units can be installed (boot
    // jobs such as sshd may still run: the units do not wait for them).
    sh(
        b,
        "for i in $(seq 180); do case $(systemctl is-system-running) in running|degraded|starting) exit 0;; esac; sleep 1; done; exit 1",
    );
    // Two plain users: the owner (with config and a key in its home that
    // must survive everything) and another one.
    sh(
        b,
        &format!(
            "for u in {OWNER}:1500 {OTHER}:1501; do n=${{u%:*}}; i=${{u#*:}}; id $n >/dev/null 2>&1 && continue; \
             echo \"$n:x:$i:$i::/home/$n:/bin/sh\" >> /etc/passwd; echo \"$n:x:$i:\" >> /etc/group; \
             mkdir -p /home/$n; chown $i:$i /home/$n; done"
        ),
    );
    let owner_files = "mkdir -p ~/.config/banger ~/.local/state/banger/ssh && echo '# mine' > ~/.config/banger/config.toml && echo key > ~/.local/state/banger/ssh/id_ed25519";
    let out = as_owner(b, &["sh", "-c", owner_files]);
    assert!(out.status.success(), "{}", text(&out).1);

    // The guest's own eth0 is in the outer installation's cidr (the default
    // one), which the inner daemon refuses for its bridge: an admin's
    // config picks another range.
    sh(
        b,
        "mkdir -p /etc/banger && printf 'cidr = \"10.213.0.0/24\"\\n' > /etc/banger/config.toml",
    );
    // Install.
    let installed = ok(
        b,
        &["/opt/bin/banger", "system", "install", "--owner", OWNER],
    );
    assert!(installed.contains("installed banger v"), "{installed}");
    both_active(b);
    assert_eq!(
        sh(
            b,
            "stat -c '%n %U %a' /usr/local/bin/banger /usr/local/bin/bangerd /usr/local/lib/banger/banger-agent /etc/banger/install.toml"
        ),
        "/usr/local/bin/banger root 755\n/usr/local/bin/bangerd root 755\n\
         /usr/local/lib/banger/banger-agent root 755\n/etc/banger/install.toml root 644\n"
    );
    let record = sh(b, "cat /etc/banger/install.toml");
    for want in [
        &format!("owner = \"{OWNER}\""),
        "owner_uid = 1500",
        "version = \"v",
        "commit = ",
        "socket = \"/run/banger/bangerd.sock\"",
    ] {
        assert!(record.contains(want), "{want} not in {record}");
    }
    // Sockets: each private to the owner; the helper's directory is root's.
    assert_eq!(
        sh(
            b,
            "stat -c '%n %U %G %a' /run/banger/bangerd.sock /run/banger-root/bangerd-root.sock /run/banger-root /run/banger /var/lib/banger"
        ),
        format!(
            "/run/banger/bangerd.sock {OWNER} {OWNER} 600\n\
             /run/banger-root/bangerd-root.sock {OWNER} {OWNER} 600\n\
             /run/banger-root root root 711\n/run/banger {OWNER} {OWNER} 700\n\
             /var/lib/banger {OWNER} {OWNER} 700\n"
        )
    );
    // The daemon runs as the owner with no capabilities; the helper as
    // root with exactly the seed's bounding set.
    let proc = |unit: &str, field: &str| {
        sh(
            b,
            &format!(
                "grep '^{field}:' /proc/$(systemctl show -p MainPID --value {unit})/status | cut -f2"
            ),
        )
        .trim()
        .to_string()
    };
    assert!(proc("bangerd.service", "Uid").starts_with("1500"));
    assert_eq!(proc("bangerd.service", "CapEff"), "0000000000000000");
    assert!(proc("bangerd-root.service", "Uid").starts_with('0'));
    // The seed's list plus CAP_FSETID and CAP_SETFCAP, which the helper's
    // Debian image build needs for setgid and file-capability binaries.
    assert_eq!(proc("bangerd-root.service", "CapBnd"), "00000000882430fb");

    // Daily commands as the owner, unprivileged, against the system socket.
    let out = as_owner(b, &["/usr/local/bin/banger", "daemon", "status", "--json"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o} {e}");
    assert!(o.contains("/run/banger/bangerd.sock"), "{o}");
    assert!(o.contains("/var/lib/banger"), "{o}");
    let out = as_owner(b, &["/usr/local/bin/banger", "vm", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(text(&out).0.trim(), "[]");
    // The unprivileged daemon got its bridge through the helper.
    sh(b, "ip -o link show banger0");
    let journal = sh(b, "journalctl --no-pager -u bangerd-root.service");
    assert!(journal.contains("ensure_bridge"), "{journal}");

    // Status as the owner: units, every version, the record.
    let out = as_owner(b, &["/usr/local/bin/banger", "system", "status"]);
    let (status, err) = text(&out);
    assert!(out.status.success(), "{status} {err}");
    let status: Vec<String> = status
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let status = status.join("\n");
    for want in [
        "bangerd.service active (enabled)",
        "bangerd-root.service active (enabled)",
        &format!("owner {OWNER} (uid 1500)"),
        "install record banger v",
        "cli banger v",
        "daemon bangerd v",
        "helper bangerd-root v",
    ] {
        assert!(status.contains(want), "{want:?} not in\n{status}");
    }
    // Another user cannot use the owner's daemon, and is told why.
    let out = exec(
        b,
        &[
            "runuser",
            "-u",
            OTHER,
            "--",
            "/usr/local/bin/banger",
            "vm",
            "list",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains(&format!("installed for user {OWNER}")),
        "{}",
        text(&out).1
    );

    // The helper: only its operations, only banger's names, only the owner.
    let r = helper(b, OWNER, r#"{"version":V,"op":{"name":"hello"}}"#);
    assert!(
        r.contains(&format!(r#""protocol":{PROTOCOL_VERSION}"#)),
        "{r}"
    );
    let r = helper(
        b,
        OWNER,
        r#"{"version":V,"op":{"name":"exec","argv":["/bin/sh"]}}"#,
    );
    assert!(
        r.contains(r#""kind":"malformed""#) && r.contains("not an operation"),
        "{r}"
    );
    let r = helper(b, OWNER, r#"{"version":7,"op":{"name":"list_taps"}}"#);
    assert!(r.contains(r#""kind":"version""#), "{r}");
    let r = helper(
        b,
        OWNER,
        r#"{"version":V,"op":{"name":"delete_tap","tap":"eth0"}}"#,
    );
    assert!(r.contains(r#""kind":"refused""#), "{r}");
    let r = helper(
        b,
        OWNER,
        r#"{"version":V,"op":{"name":"chown_to_owner","path":"/var/lib/banger/../../../etc/shadow"}}"#,
    );
    assert!(r.contains(r#""kind":"refused""#), "{r}");
    sh(b, "ln -sfn /etc /var/lib/banger/escape");
    let r = helper(
        b,
        OWNER,
        r#"{"version":V,"op":{"name":"chown_to_owner","path":"/var/lib/banger/escape/shadow"}}"#,
    );
    assert!(
        r.contains(r#""kind":"refused""#) && r.contains("symlink"),
        "{r}"
    );
    assert_eq!(sh(b, "stat -c %U /etc/shadow"), "root\n");
    // Root is not the owner: SO_PEERCRED says so (root passes file modes).
    let r = helper(b, "root", r#"{"version":V,"op":{"name":"list_taps"}}"#);
    assert!(
        r.contains(r#""kind":"unauthorized""#) && r.contains("uid 0 is not the install owner"),
        "{r}"
    );
    // Another user cannot even connect.
    let r = helper(b, OTHER, r#"{"version":V,"op":{"name":"list_taps"}}"#);
    assert!(r.contains("connect failed: Permission denied"), "{r}");
    let journal = sh(b, "journalctl --no-pager -u bangerd-root.service");
    assert!(journal.contains("refused"), "{journal}");

    // A root-owned leftover in the state dir goes back to the owner at the
    // next daemon start (through the helper's chown).
    sh(
        b,
        "touch /var/lib/banger/stray && systemctl restart bangerd.service",
    );
    assert_eq!(
        sh(b, "stat -c %U /var/lib/banger/stray"),
        format!("{OWNER}\n"),
        "daemon log: {}\nhelper journal: {}",
        sh(
            b,
            "grep -i -E 'helper|owner|repair' /var/lib/banger/bangerd.log || true"
        ),
        sh(
            b,
            "journalctl --no-pager -u bangerd-root.service | tail -n 30"
        )
    );

    // Re-install in place: idempotent.
    let pid = sh(b, "systemctl show -p MainPID --value bangerd.service");
    let again = ok(
        b,
        &["/opt/bin/banger", "system", "install", "--owner", OWNER],
    );
    assert!(again.contains("reinstalled banger v"), "{again}");
    both_active(b);
    assert_ne!(
        sh(b, "systemctl show -p MainPID --value bangerd.service"),
        pid
    );
    let out = as_owner(b, &["/usr/local/bin/banger", "system", "status"]);
    assert!(out.status.success(), "{}", text(&out).0);

    // Uninstall keeps the state; --purge removes exactly the system paths.
    let out = ok(b, &["/opt/bin/banger", "system", "uninstall"]);
    assert!(out.contains("removed /usr/local/bin/bangerd"), "{out}");
    assert_eq!(
        sh(
            b,
            "systemctl is-active bangerd.service bangerd-root.service || true"
        ),
        "inactive\ninactive\n"
    );
    sh(
        b,
        "test ! -e /usr/local/bin/banger && test ! -e /usr/local/bin/bangerd && test ! -e /usr/local/lib/banger \
         && test ! -e /etc/banger/install.toml && test ! -e /etc/systemd/system/bangerd.service \
         && test ! -e /etc/systemd/system/bangerd-root.service && test -e /var/lib/banger/stray",
    );
    let out = ok(b, &["/opt/bin/banger", "system", "uninstall", "--purge"]);
    assert!(out.contains("removed /var/lib/banger"), "{out}");
    sh(
        b,
        "test ! -e /var/lib/banger && test ! -e /var/cache/banger && test ! -e /run/banger && test ! -e /run/banger-root",
    );
    assert_eq!(
        sh(
            b,
            &format!(
                "cat /home/{OWNER}/.config/banger/config.toml /home/{OWNER}/.local/state/banger/ssh/id_ed25519"
            )
        ),
        "# mine\nkey\n"
    );
    // Without an install, the owner's banger is back in user mode.
    let out = exec(
        b,
        &[
            "runuser",
            "-u",
            OWNER,
            "--",
            "/opt/bin/banger",
            "daemon",
            "socket",
        ],
    );
    assert!(
        !text(&out).0.contains("/run/banger/bangerd.sock"),
        "{}",
        text(&out).0
    );
}
