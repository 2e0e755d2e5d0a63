//! `banger system install` for real: inside a guest (which runs systemd as
//! PID 1, unlike the build machines), with the freshly built binaries.
//! The guest has no QEMU, but it has nested KVM (a TCG guest with `-cpu
//! max` can load kvm_amd): the installed daemon boots VMs there with the
//! real Firecracker (`../shared/firecracker/`, sha256-checked) from the
//! guest's own root file system, and the owner uses them as a user would:
//! `vm run` (session), `vm ssh`, `ssh <name>.vm`, `vm acp`.

use banger_e2e::kvm_host::nested_guest_reset;
use banger_e2e::{Banger, shared, text};
use banger_root_client::proto::PROTOCOL_VERSION;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

const VM: &str = "e2e-system";
const OWNER: &str = "bgowner";
const OTHER: &str = "bgother";
/// The VM the system daemon boots inside the guest.
const INNER: &str = "inner";

/// The Firecracker the tests use, and its sha256 (`SHA256SUMS` there).
const FIRECRACKER: &str = "shared/firecracker/firecracker-v1.14.1-x86_64";
const FIRECRACKER_SHA256: &str = "ce39ca94c18eb7bb20dd5b55c56cfa1e5f1cd4f8497418760a020580bbf47791";

/// The system daemon's config: Firecracker on the guest's nested KVM, a
/// bridge range apart from the guest's own eth0 (172.16.0.0/24), small
/// inner VMs, and an ACP command that only this file sets (so `vm acp`
/// proves the CLI read the system config, not the owner's). No template
/// builds in the background (`warm_start = "manual"`): one would boot a
/// second nested guest beside the session's for minutes (in one CI run
/// the session's guest went down 13 s after such a build began; warm
/// starts are the kvm lane's to test).
const SYSTEM_CONFIG: &str = r#"vmm = "firecracker"
firecracker_bin = "/usr/local/bin/firecracker"
cidr = "10.99.0.0/24"
acp_command = ["cat"]
ready_timeout_secs = 600
warm_start = "manual"

[vm_defaults]
vcpu = 1
memory_mib = 512
disk_size = "2G"
"#;

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

/// Set when a failing run found the guest gone down by itself (asked
/// before [`DeleteVm`] deletes it).
static WENT_DOWN: AtomicBool = AtomicBool::new(false);

struct DeleteVm<'a>(&'a Banger);

impl Drop for DeleteVm<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            WENT_DOWN.store(self.0.went_down(VM), Ordering::SeqCst);
        }
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
    banger_e2e::once_more_if_outer_went_down(
        "system",
        || WENT_DOWN.load(Ordering::SeqCst),
        || {},
        || system_install_in_a_guest(b),
    );
}

fn system_install_in_a_guest(b: &Banger) {
    let _ = b.run(&["vm", "delete", VM]);
    // Two vCPUs and room for a nested guest.
    let out = b.run(&[
        "vm",
        "create",
        "--name",
        VM,
        "--cpus",
        "2",
        "--memory",
        "3G",
        "--disk-size",
        "8G",
    ]);
    assert!(out.status.success(), "vm create: {}", text(&out).1);
    let _cleanup = DeleteVm(b);

    // The binaries under test, world-readable so the owner can run them.
    sh(b, "mkdir -p /opt/bin && chmod 755 /opt /opt/bin");
    for bin in ["banger", "bangerd", "banger-agent"] {
        let data = std::fs::read(b.bin_dir.join(bin)).expect("built binary");
        put(b, &format!("/opt/bin/{bin}"), &data, "755");
    }
    put(b, "/opt/bin/helper.py", HELPER_PY.as_bytes(), "644");
    // Nested KVM for the system daemon's VMs (before the install, which
    // gives the service the kvm group), and Firecracker.
    sh(
        b,
        &format!(
            "{}; test -c /dev/kvm && getent group kvm",
            banger_e2e::kvm_host::LOAD_KVM
        ),
    );
    put(b, "/usr/local/bin/firecracker", &firecracker(), "755");
    sh(b, "mkdir -p /etc/banger");
    put(
        b,
        "/etc/banger/config.toml",
        SYSTEM_CONFIG.as_bytes(),
        "644",
    );
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

    vms_under_the_system_install(b);
    setid_image_under_the_system_install(b);

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

/// The Firecracker binary from `../shared/firecracker/` (the nearest
/// ancestor of this crate that has it), checked against its sha256.
fn firecracker() -> Vec<u8> {
    use sha2::Digest;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join(FIRECRACKER))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{FIRECRACKER} not found above {}",
                env!("CARGO_MANIFEST_DIR")
            )
        });
    let data = std::fs::read(&path).expect("read firecracker");
    assert_eq!(
        format!("{:x}", sha2::Sha256::digest(&data)),
        FIRECRACKER_SHA256,
        "{} is not the tested Firecracker",
        path.display()
    );
    data
}

/// [`owner_sh`] of a boot (`vm run`) of the inner VM `name`: one more
/// try when that nested guest went down by itself, after printing the
/// first failure whole. Either while it booted ([`nested_guest_reset`];
/// its create was rolled back), or later, while `script` used it (a
/// session): its VMM exited and the inner daemon marked it stopped.
fn owner_boot(b: &Banger, name: &str, script: &str, stdin: &[u8]) -> Output {
    let stops_before = inner_stops(b, name);
    let out = owner_sh(b, script, stdin);
    if out.status.success() {
        return out;
    }
    let why = if nested_guest_reset(&out) {
        "went down while it booted"
    } else if inner_stops(b, name) > stops_before && !text(&out).1.contains("Kernel panic") {
        "went down after it booted"
    } else {
        return out;
    };
    eprintln!(
        "[system] nested guest {name} {why}; trying `{script}` once more. First failure:\n{}\n--- inner daemon ---\n{}",
        text(&out).1,
        inner_diagnostics(b)
    );
    // A VM that stopped is still there (unless `--rm` deleted it).
    let _ = owner_sh(b, &format!("/usr/local/bin/banger vm delete {name}"), b"");
    owner_sh(b, script, stdin)
}

/// How often the inner daemon has marked the VM `name` stopped because
/// its VMM exited (not by `vm stop` or `vm delete`): the line its exit
/// watch logs.
fn inner_stops(b: &Banger, name: &str) -> usize {
    let pattern = format!(r#""VMM exited; marking VM stopped","vm":"{name}""#);
    let out = exec(b, &["grep", "-cF", &pattern, "/var/lib/banger/bangerd.log"]);
    text(&out).0.trim().parse().unwrap_or(0)
}

/// `script` run by the owner (`sh -c`), with `stdin` as its input.
fn owner_sh(b: &Banger, script: &str, stdin: &[u8]) -> Output {
    let mut child = b
        .cmd(&[
            "vm", "exec", VM, "--", "runuser", "-u", OWNER, "--", "sh", "-c", script,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn banger vm exec");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("stdin to the guest");
    drop(input);
    child.wait_with_output().expect("wait")
}

/// What to look at when a step with the inner VM fails. Never panics: when
/// the outer guest itself is gone, its console and the host daemon's view
/// of it are what tell why.
fn inner_diagnostics(b: &Banger) -> String {
    let script = format!(
        "tail -n 30 /var/lib/banger/bangerd.log; echo; \
         runuser -u {OWNER} -- /usr/local/bin/banger vm logs {INNER} --tail 40 2>&1 || true; \
         journalctl --no-pager -n 20 -u bangerd-root.service || true"
    );
    let out = exec(b, &["sh", "-c", &script]);
    let (o, e) = text(&out);
    if out.status.success() {
        return o;
    }
    let show = b.run(&["vm", "show", VM]);
    let logs = b.run(&["vm", "logs", VM, "--tail", "60"]);
    let vmm = b.run(&["vm", "logs", VM, "--vmm", "--tail", "30"]);
    let daemon_log = std::fs::read_to_string(b.state_dir().join("bangerd.log")).unwrap_or_default();
    let tail: Vec<&str> = daemon_log.lines().rev().take(30).collect();
    format!(
        "(the outer guest did not answer: {e})\n--- vm show {VM} ---\n{}{}\n--- vm logs {VM} ---\n{}{}\n--- vm logs --vmm {VM} ---\n{}{}\n--- host bangerd.log ---\n{}",
        text(&show).0,
        text(&show).1,
        text(&logs).0,
        text(&logs).1,
        text(&vmm).0,
        text(&vmm).1,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Asserts `out` succeeded and returns its stdout.
fn owner_ok(b: &Banger, what: &str, out: Output) -> String {
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "{what} failed: {o}\n{e}\n--- inner daemon ---\n{}",
        inner_diagnostics(b)
    );
    o
}

/// The owner's daily use of VMs under the system install: every command
/// finds the system daemon's key, known_hosts, ssh_config and config
/// (`/var/lib/banger/ssh/`, `/etc/banger/config.toml`), not the user-mode
/// ones under its home.
fn vms_under_the_system_install(b: &Banger) {
    // The guest's own root file system (the default image) and kernel
    // become the system daemon's default image.
    sh(
        b,
        "mkdir -p /opt/img && chmod 755 /opt/img \
         && dd if=/dev/vda of=/opt/img/rootfs.ext4 bs=1M conv=sparse status=none \
         && cp /boot/vmlinuz-* /opt/img/vmlinuz && cp /boot/initrd.img-* /opt/img/initrd.img \
         && chmod 644 /opt/img/*",
    );
    let out = owner_sh(
        b,
        "/usr/local/bin/banger image register --name debian-bookworm --rootfs /opt/img/rootfs.ext4 \
         --kernel /opt/img/vmlinuz --initrd /opt/img/initrd.img",
        b"",
    );
    owner_ok(b, "image register", out);

    // Session mode of `vm run`: ssh with the system install's key, once
    // the inner sshd answers; its shell reads our stdin.
    let out = owner_boot(
        b,
        INNER,
        &format!("/usr/local/bin/banger vm run --name {INNER}"),
        b"echo session-on-$(hostname)\n",
    );
    let session = owner_ok(b, "vm run (session)", out);
    assert!(
        session.contains(&format!("session-on-{INNER}")),
        "{session}"
    );
    sh(
        b,
        "test -f /var/lib/banger/ssh/id_ed25519 && test -f /var/lib/banger/ssh/known_hosts \
         && grep -q 'Host inner.vm' /var/lib/banger/ssh/ssh_config",
    );
    sh(
        b,
        &format!("test ! -e /home/{OWNER}/.config/banger/ssh_config"),
    );

    let out = owner_sh(
        b,
        &format!("/usr/local/bin/banger vm ssh {INNER} hostname"),
        b"",
    );
    assert_eq!(owner_ok(b, "vm ssh", out), format!("{INNER}\n"));

    // `ssh <name>.vm` through the Include `ssh-config --install` adds.
    let out = owner_sh(b, "/usr/local/bin/banger ssh-config --install", b"");
    let installed = owner_ok(b, "ssh-config --install", out);
    assert!(
        installed.contains("/var/lib/banger/ssh/ssh_config"),
        "{installed}"
    );
    let out = owner_sh(b, &format!("ssh -o BatchMode=yes {INNER}.vm hostname"), b"");
    assert_eq!(owner_ok(b, "ssh <name>.vm", out), format!("{INNER}\n"));

    // `vm acp` runs the system config's acp_command (`cat`).
    let out = owner_sh(
        b,
        &format!("/usr/local/bin/banger vm acp {INNER}"),
        b"acp-round-trip\n",
    );
    assert_eq!(owner_ok(b, "vm acp", out), "acp-round-trip\n");

    let out = owner_sh(b, &format!("/usr/local/bin/banger vm delete {INNER}"), b"");
    owner_ok(b, "vm delete", out);
}

/// An OCI image with setuid and setgid entries, pulled by the system daemon
/// (which runs with `RestrictSUIDSGID=yes`: it may not make such files on
/// the host) and booted: the guest sees the image's modes, the host keeps
/// no setuid or setgid file. The image is written and pushed on the test
/// host; the registry's storage and binary are carried into the guest,
/// which serves them on its own loopback.
fn setid_image_under_the_system_install(b: &Banger) {
    let work = std::env::temp_dir().join(format!("banger-e2e-setid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let (registry, busybox) = banger_e2e::registry::registry_with_busybox(b, &work);
    let reference = banger_e2e::registry::push_setid(b, &work, &busybox);
    drop(registry);
    let repo_path = reference
        .split_once('/')
        .map(|(_, p)| p.to_string())
        .expect("reference");

    let mut tar = Command::new("tar")
        .args(["-c", "-f", "-", "-C"])
        .arg(work.join("registry"))
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tar");
    let out = b
        .cmd(&[
            "vm",
            "exec",
            VM,
            "--",
            "sh",
            "-c",
            "rm -rf /opt/registry && mkdir -p /opt/registry && tar -x -f - -C /opt/registry",
        ])
        .stdin(Stdio::from(tar.stdout.take().expect("tar stdout")))
        .output()
        .expect("spawn banger vm exec");
    assert!(
        tar.wait().expect("wait tar").success(),
        "tar of the registry"
    );
    assert!(
        out.status.success(),
        "registry into the guest: {}",
        text(&out).1
    );
    let _ = std::fs::remove_dir_all(&work);
    let registry_bin = std::fs::read("/usr/bin/docker-registry")
        .expect("docker-registry (apt-get install docker-registry)");
    put(b, "/opt/bin/docker-registry", &registry_bin, "755");
    put(
        b,
        "/opt/registry.yml",
        b"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /opt/registry\nhttp:\n  addr: 127.0.0.1:5055\n",
        "644",
    );
    sh(
        b,
        "systemd-run --quiet --unit=e2e-registry /opt/bin/docker-registry serve /opt/registry.yml \
         && for i in $(seq 60); do curl -fsS --max-time 5 -o /dev/null http://127.0.0.1:5055/v2/ && exit 0; sleep 1; done; exit 1",
    );

    let out = owner_sh(
        b,
        &format!(
            "/usr/local/bin/banger image pull 127.0.0.1:5055/{repo_path} --name setid --kernel-ref debian-bookworm"
        ),
        b"",
    );
    owner_ok(b, "image pull (setuid/setgid entries)", out);
    let out = owner_boot(
        b,
        "setid",
        "/usr/local/bin/banger vm run --rm --name setid --image setid -- stat -c '%a %n' /bin/suid /bin/sgid /var/mail",
        b"",
    );
    assert_eq!(
        owner_ok(b, "vm run on the setuid image", out),
        "4755 /bin/suid\n2755 /bin/sgid\n2775 /var/mail\n"
    );
    assert_eq!(
        sh(b, "find /var/lib/banger /var/cache/banger -perm /6000"),
        "",
        "setuid/setgid files on the host"
    );
    let out = owner_sh(b, "/usr/local/bin/banger image delete setid", b"");
    owner_ok(b, "image delete", out);
    sh(b, "systemctl stop e2e-registry.service");
}
