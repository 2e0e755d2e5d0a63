//! banger on real KVM: inside an outer guest with nested virtualisation
//! (see `banger_e2e::kvm_host`), the real Firecracker v1.14.1 boots the
//! default image, registered from its files as a user of a KVM host would,
//! and QEMU boots it with `-accel kvm`. Every inner command is the inner
//! `banger` run as root of the outer guest.

use banger_e2e::kvm_host::{InnerVmm, InnerVms, KVM_DIR, KvmHost, nested_test};
use std::time::Duration;

/// Boots inside the outer guest are emulated twice over: minutes, not seconds.
const LONG: Duration = Duration::from_secs(600);
/// The inner daemon's log.
const INNER_LOG: &str = "/root/.local/state/banger/bangerd.log";

fn vms<'a>(host: &'a KvmHost, names: &[&str]) -> InnerVms<'a> {
    InnerVms {
        host,
        names: names.iter().map(|n| n.to_string()).collect(),
    }
}

/// Runs `sh -c script` in inner VM `vm`, asserting success; its stdout.
fn guest(h: &KvmHost, vm: &str, script: &str) -> String {
    h.banger_ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

fn use_backend(h: &KvmHost, vmm: InnerVmm) {
    if h.vmm() != vmm {
        h.set_vmm(vmm);
    }
}

/// The inner doctor's `backend` row.
fn backend_row(h: &KvmHost) -> String {
    let rows = h.banger_json(&["doctor"]);
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == "backend")
        .map(|r| format!("{} {}", r["status"], r["detail"]))
        .expect("backend row")
}

#[test]
fn firecracker_is_chosen_and_doctor_follows_it() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let rows = h.banger_json(&["doctor"]);
        let row = |name: &str| find_row(&rows, name);
        assert_eq!(row("kvm")["status"], "pass", "{}", row("kvm"));
        let fc = row("firecracker");
        assert_eq!(fc["status"], "pass", "{fc}");
        assert!(
            fc["detail"].as_str().unwrap_or("").contains("1.14.1"),
            "{fc}"
        );
        let backend = row("backend");
        assert!(
            backend["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("firecracker"),
            "{backend}"
        );
        // The registered image's kernel got its vmlinux at register.
        let k = h.banger_json(&["kernel", "show", "debian-bookworm"]);
        let vmlinux = k["vmlinux"].as_str().expect("vmlinux recorded");
        let magic = h.ok(&format!("head -c 4 {vmlinux} | od -An -c"));
        assert!(magic.contains("E   L   F"), "{magic}");
    });
}

/// A Firecracker older than v1.5.0: `doctor` fails its row and names the
/// version, and `vm run` is refused with that reason before anything is
/// made.
#[test]
fn firecracker_outside_the_supported_range_is_refused() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let cfg = "/root/old-fc/config";
        h.ok(&format!(
            "mkdir -p /root/old-fc {cfg}/banger \
         && printf '#!/bin/sh\\necho Firecracker v1.4.0\\n' > /root/old-fc/firecracker \
         && chmod +x /root/old-fc/firecracker \
         && sed 's|^firecracker_bin = .*|firecracker_bin = \"/root/old-fc/firecracker\"|' \
            /root/.config/banger/config.toml > {cfg}/banger/config.toml"
        ));
        let with_old = |args: &[&str]| {
            let mut argv = vec!["env".to_string(), format!("XDG_CONFIG_HOME={cfg}")];
            argv.extend(KvmHost::banger_argv(args));
            let mut a = vec!["vm", "exec", banger_e2e::kvm_host::OUTER_VM, "--"];
            a.extend(argv.iter().map(String::as_str));
            h.outer.run(&a)
        };
        let _ = h.banger(&["daemon", "stop"]);
        let doctor = with_old(&["doctor", "--json"]);
        let rows: serde_json::Value =
            serde_json::from_slice(&doctor.stdout).expect("doctor --json");
        let fc = rows
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["name"] == "firecracker")
            .cloned()
            .expect("firecracker row");
        assert_eq!(fc["status"], "fail", "{fc}");
        assert!(
            fc["detail"]
                .as_str()
                .unwrap_or("")
                .contains("v1.4.0 is too old"),
            "{fc}"
        );
        let before = h.vm_names();
        let _ = h.banger(&["daemon", "stop"]);
        let run = with_old(&["vm", "run", "--rm", "--name", "fc-old", "--", "true"]);
        let (_, stderr) = banger_e2e::text(&run);
        assert!(
            !run.status.success(),
            "vm run with Firecracker v1.4.0 succeeded"
        );
        let err = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            err.contains("v1.4.0 is too old") && err.contains("v1.5.0 or newer"),
            "{stderr}"
        );
        let _ = with_old(&["daemon", "stop"]);
        assert_eq!(h.vm_names(), before, "a VM was made");
    });
}

#[test]
fn firecracker_vm_run_rm_workspace_exit_status_and_nothing_left() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let _vms = vms(h, &["fc-run"]);
        h.ok(
            "rm -rf /root/repo && mkdir -p /root/repo && cd /root/repo && git init -q \
          && echo tracked-content > a.txt && git add a.txt \
          && git -c user.email=e2e@banger -c user.name=e2e commit -qm init \
          && echo secret > untracked.txt",
        );
        let out = h.banger(&[
            "vm",
            "run",
            "--rm",
            "--name",
            "fc-run",
            "/root/repo",
            "--",
            "sh",
            "-c",
            "cat /root/repo/a.txt; test -e /root/repo/untracked.txt || echo no-untracked; \
         systemd-detect-virt; test -c /dev/vsock && echo vsock; cat /proc/cmdline; exit 7",
        ]);
        let (stdout, stderr) = banger_e2e::text(&out);
        assert_eq!(
            out.status.code(),
            Some(7),
            "stdout={stdout}\nstderr={stderr}\n{}",
            h.diagnostics()
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines[..4],
            ["tracked-content", "no-untracked", "kvm", "vsock"],
            "{stdout}"
        );
        let cmdline = lines.get(4).copied().unwrap_or("");
        assert_eq!(cmdline.matches("root=").count(), 1, "{cmdline}");
        assert!(stderr.contains("spec: "), "{stderr}");
        nothing_left(h, "fc-run");
    });
}

#[test]
fn firecracker_persistent_vm_end_to_end() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let _vms = vms(h, &["fc"]);
        h.banger_ok(&["vm", "create", "--name", "fc"]);
        let show = h.banger_json(&["vm", "show", "fc"]);
        assert_eq!(show["backend"], "firecracker", "{show}");
        let ip = show["ip"].as_str().expect("bridge address").to_string();
        assert!(ip.starts_with("10.77.0."), "{ip}");

        // 50 MB of stdin through the agent, checked by sha256.
        let sums = h.ok(&format!(
            "head -c 50000000 /dev/urandom > {KVM_DIR}/blob && sha256sum < {KVM_DIR}/blob \
         && {} < {KVM_DIR}/blob",
            KvmHost::banger_argv(&["vm", "exec", "fc", "--", "sha256sum"]).join(" ")
        ));
        let sums: Vec<&str> = sums.lines().collect();
        assert_eq!(sums.len(), 2, "{sums:?}");
        assert_eq!(sums[0], sums[1], "stdin arrived changed");

        // vm cp both ways (a smaller file: nested virtio moves about 1 MB/s).
        h.ok(&format!(
            "head -c 4000000 {KVM_DIR}/blob > {KVM_DIR}/cp-blob"
        ));
        h.banger_ok(&["vm", "cp", &format!("{KVM_DIR}/cp-blob"), "fc:/root/blob"]);
        h.banger_ok(&[
            "vm",
            "cp",
            "fc:/root/blob",
            &format!("{KVM_DIR}/cp-blob.back"),
        ]);
        h.ok(&format!("cmp {KVM_DIR}/cp-blob {KVM_DIR}/cp-blob.back"));

        // ssh with the pinned host key, once sshd is up.
        ssh_reaches(h, "fc", "sshd in the Firecracker guest");
        let known = h.ok("cat /root/.local/state/banger/ssh/known_hosts");
        assert!(known.contains("ssh-ed25519"), "{known}");

        // A session serving HTTP; vm ports sees it and sshd; the inner DNS
        // server answers fc.vm with the VM's address, which serves the page.
        guest(
            h,
            "fc",
            "mkdir -p /root/www && echo page-from-fc > /root/www/index.html",
        );
        h.banger_ok(&[
            "vm",
            "session",
            "start",
            "fc",
            "--name",
            "web",
            "--cwd",
            "/root/www",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
        ]);
        let sessions = h.banger_json(&["vm", "session", "list", "fc"]);
        assert!(sessions.to_string().contains("\"web\""), "{sessions}");
        h.wait_for(
            "the session's HTTP server",
            LONG,
            &format!("curl -fsS --max-time 5 http://{ip}:8080/ | grep -q page-from-fc"),
        );
        let ports = h.banger_json(&["vm", "ports", "fc"]);
        let listed: Vec<u64> = ports
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        assert!(listed.contains(&22) && listed.contains(&8080), "{ports}");
        let answer = h.ok("dig +short @127.0.0.1 -p 42069 fc.vm A");
        assert_eq!(answer.trim(), ip, "fc.vm");
        let page = h.ok("curl -fsS --max-time 10 --resolve \
         fc.vm:8080:$(dig +short @127.0.0.1 -p 42069 fc.vm A) http://fc.vm:8080/");
        assert_eq!(page.trim(), "page-from-fc");
        h.banger_ok(&["vm", "session", "stop", "fc", "web"]);

        // The daemon is SIGKILLed; the next command re-adopts the running VM.
        let vmm_pid = show["pid"].as_u64().expect("pid");
        h.ok(
            "kill -9 $(pgrep -x bangerd) && while pgrep -x bangerd >/dev/null; do sleep 0.1; done",
        );
        assert_eq!(guest(h, "fc", "echo alive").trim(), "alive");
        let again = h.banger_json(&["vm", "show", "fc"]);
        assert_eq!(again["pid"].as_u64(), Some(vmm_pid), "the VMM was replaced");
        assert_eq!(again["state"], "running");

        // NAT: an upstream in a namespace of the outer guest (TEST-NET-2,
        // nowhere else) is unreachable without --nat, reachable with it.
        h.ok("ip netns del up 2>/dev/null; ip link del vup 2>/dev/null; \
          ip netns add up && ip link add vup type veth peer name vup-ns \
          && ip link set vup-ns netns up && ip addr add 198.51.100.1/30 dev vup \
          && ip link set vup up && ip -n up addr add 198.51.100.2/30 dev vup-ns \
          && ip -n up link set vup-ns up && ip -n up link set lo up \
          && mkdir -p /root/up && echo upstream-page > /root/up/index.html");
        h.outer_session(
            "upstream",
            &[
                "ip",
                "netns",
                "exec",
                "up",
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                "198.51.100.2",
                "--directory",
                "/root/up",
            ],
        );
        h.wait_for(
            "the upstream HTTP server",
            LONG,
            "ip netns exec up curl -fsS --max-time 5 http://198.51.100.2:8000/",
        );
        let upstream = [
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "http://198.51.100.2:8000/",
        ];
        let mut exec = vec!["vm", "exec", "fc", "--"];
        exec.extend(upstream);
        let blocked = h.banger(&exec);
        assert!(
            !blocked.status.success(),
            "upstream reachable without NAT: {}",
            banger_e2e::text(&blocked).0
        );

        // Stop; change memory, vCPUs, disk and NAT; start: everything applies
        // and the files in /root and / are kept.
        guest(
            h,
            "fc",
            "echo in-root > /root/marker && echo in-etc > /etc/banger-marker && sync",
        );
        // The agent answered long before systemd finished booting (dockerd and
        // containerd take minutes here, emulated twice over); a reboot queued
        // behind running start jobs can outlast the stop timeout, so the
        // graceful stop is checked on a booted guest.
        guest(
            h,
            "fc",
            "timeout 600 systemctl is-system-running --wait >/dev/null; true",
        );
        h.banger_ok(&["vm", "stop", "fc"]);
        // Firecracker has no power-off device: the guest was asked to reboot,
        // which ends Firecracker, so the stop did not wait out its timeout.
        let forced = h.ok(&format!(
            "grep -c 'did not power off in time' {INNER_LOG} || true"
        ));
        assert_eq!(forced.trim(), "0", "vm stop had to kill Firecracker");
        h.banger_ok(&[
            "vm",
            "set",
            "fc",
            "--memory",
            "1536",
            "--vcpu",
            "2",
            "--disk-size",
            "6G",
            "--nat",
        ]);
        h.banger_ok(&["vm", "start", "fc"]);
        let facts = guest(
            h,
            "fc",
            "cat /root/marker /etc/banger-marker; nproc; \
         awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo; \
         df -BM --output=size /root | tail -n1 | tr -dc 0-9; echo",
        );
        let facts: Vec<&str> = facts.lines().collect();
        assert_eq!(facts[..3], ["in-root", "in-etc", "2"], "{facts:?}");
        let mem: u64 = facts[3].parse().expect("MemTotal");
        assert!((1300..=1536).contains(&mem), "MemTotal {mem} MiB");
        let disk: u64 = facts[4].parse().expect("df size");
        assert!(disk > 5000, "/root is {disk} MiB");
        let page = h.banger_ok(&exec);
        assert_eq!(page.trim(), "upstream-page", "through NAT");
        // The outer guest runs Docker (the default image has it), whose FORWARD
        // policy drops what its DOCKER-USER chain does not accept: banger's
        // forward rules are mirrored there.
        let mirrored = h.ok("nft list chain ip filter DOCKER-USER | grep -c 'banger vm' || true");
        assert_eq!(mirrored.trim(), "2", "DOCKER-USER: {mirrored}");
        h.outer_session_stop("upstream");

        // kill -9 of the VMM: the daemon sees the VM stop; it starts again
        // with its files.
        let pid = h.banger_json(&["vm", "show", "fc"])["pid"]
            .as_u64()
            .expect("pid");
        h.ok(&format!("kill -9 {pid}"));
        h.wait_for(
            "the killed VM to be stopped",
            LONG,
            &format!(
                "{} | grep -q '\"state\": *\"stopped\"'",
                KvmHost::banger_argv(&["vm", "show", "fc", "--json"]).join(" ")
            ),
        );
        h.banger_ok(&["vm", "start", "fc"]);
        assert_eq!(
            guest(h, "fc", "cat /root/marker /etc/banger-marker"),
            "in-root\nin-etc\n"
        );
        h.banger_ok(&["vm", "delete", "fc"]);
        nothing_left(h, "fc");
    });
}

#[test]
fn firecracker_boots_an_oci_image_pulled_from_a_registry_on_loopback() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let _vms = vms(h, &["fc-oci"]);
        // The image is written and pushed on the test host, and the registry's
        // storage carried into the KVM host, where a registry serves it on its
        // own loopback.
        let work = std::env::temp_dir().join(format!("banger-e2e-kvm-oci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work dir");
        let (registry, reference) = banger_e2e::registry::registry_with_busybox(h.outer, &work);
        drop(registry);
        let repo_path = reference
            .split_once('/')
            .map(|(_, p)| p.to_string())
            .expect("reference");
        h.put_tree(&work.join("registry"), &format!("{KVM_DIR}/registry"));
        h.put(
        &format!("{KVM_DIR}/registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {KVM_DIR}/registry\nhttp:\n  addr: 127.0.0.1:5055\n"
        )
        .as_bytes(),
    );
        h.outer_session(
            "registry",
            &[
                "docker-registry",
                "serve",
                &format!("{KVM_DIR}/registry.yml"),
            ],
        );
        h.wait_for(
            "the registry in the KVM host",
            LONG,
            "curl -fsS --max-time 5 http://127.0.0.1:5055/v2/",
        );
        let inner_ref = format!("127.0.0.1:5055/{repo_path}");
        let _ = h.banger(&["image", "delete", "--force", "fc-bb"]);
        let img = h.banger_json(&[
            "image",
            "pull",
            &inner_ref,
            "--name",
            "fc-bb",
            "--kernel-ref",
            "debian-bookworm",
        ]);
        assert_eq!(img["name"], "fc-bb", "{img}");
        let out = h.banger(&[
            "vm",
            "run",
            "--rm",
            "--name",
            "fc-oci",
            "--image",
            "fc-bb",
            "--",
            "cat",
            "/etc/os-release",
        ]);
        h.assert_ok(&out, "vm run on the OCI image");
        assert!(banger_e2e::text(&out).0.contains("ID=bbtest"), "{:?}", out);
        h.banger_ok(&["image", "delete", "fc-bb"]);
        h.outer_session_stop("registry");
        let _ = std::fs::remove_dir_all(&work);
    });
}

/// The inner doctor's row `name`.
fn doctor_row(h: &KvmHost, name: &str) -> serde_json::Value {
    find_row(&h.banger_json(&["doctor"]), name)
}

/// The row `name` of doctor's JSON `rows`.
fn find_row(rows: &serde_json::Value, name: &str) -> serde_json::Value {
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} row in {rows}"))
}

/// QEMU with `-accel kvm`: a warm start from a template saved as QEMU's
/// migration file (the `start:` line says so, the console log names the
/// template), then stop/start boots the VM's own disks cold and keeps its
/// state. One VM serves both: the lane grows by the template build only.
#[test]
fn qemu_with_kvm_runs_stops_and_starts() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Qemu);
        let _vms = vms(h, &["q-kvm"]);
        let backend = backend_row(h);
        assert!(backend.contains("qemu (kvm)"), "{backend}");

        let t = h.banger_json(&["image", "warm", "debian-bookworm"]);
        assert_eq!(t["state"], "ready", "{t}\n{}", h.diagnostics());
        assert_eq!(t["backend"], "qemu", "{t}");
        // The row comes from the running daemon (started by `image warm`).
        let warm_row = doctor_row(h, "warm start");
        assert_eq!(warm_row["status"], "pass", "{warm_row}");
        assert!(
            warm_row["detail"].as_str().unwrap_or("").contains("QEMU"),
            "{warm_row}"
        );
        let out = h.banger(&[
            "vm",
            "run",
            "--warm",
            "--name",
            "q-kvm",
            "--",
            "sh",
            "-c",
            "systemd-detect-virt; hostname; echo kept > /root/marker",
        ]);
        h.assert_ok(&out, "warm vm run under QEMU-KVM");
        let (stdout, stderr) = banger_e2e::text(&out);
        assert_eq!(stdout, "kvm\nq-kvm\n", "{stderr}");
        let start = stderr
            .lines()
            .find(|l| l.starts_with("start: "))
            .unwrap_or_else(|| panic!("no start: line in {stderr}"));
        assert!(start.starts_with("start: warm"), "{start}");
        let show = h.banger_json(&["vm", "show", "q-kvm"]);
        assert_eq!(show["start"]["kind"], "warm", "{show}");
        assert_eq!(show["start"]["template"], t["id"], "{show}");
        let logs = h.banger_ok(&["vm", "logs", "q-kvm"]);
        assert!(
            logs.contains(&format!(
                "banger: restored from template {}",
                t["id"].as_str().expect("id")
            )),
            "{logs}"
        );
        let accel = h.ok("pgrep -a qemu-system");
        assert!(accel.contains("-accel kvm"), "{accel}");

        // Stop/start: a cold boot of its own disks under KVM, state kept.
        h.banger_ok(&["vm", "stop", "q-kvm"]);
        h.banger_ok(&["vm", "start", "q-kvm"]);
        let show = h.banger_json(&["vm", "show", "q-kvm"]);
        assert_eq!(show["start"]["kind"], "cold", "{show}");
        assert_eq!(
            guest(h, "q-kvm", "systemd-detect-virt; cat /root/marker"),
            "kvm\nkept\n"
        );
        let accel = h.ok("pgrep -a qemu-system");
        assert!(accel.contains("-accel kvm"), "{accel}");
        h.banger_ok(&["vm", "delete", "q-kvm"]);
        h.banger_ok(&["image", "warm", "debian-bookworm", "--drop"]);
        use_backend(h, InnerVmm::Firecracker);
    });
}

/// Warm starts on the real Firecracker: a template of the inner default
/// shape, two clones with identities of their own (the agent reconnects
/// after Firecracker's vsock reset), ssh with the pinned key, stop/start
/// boots cold, and a clone keeps running when its template is dropped
/// (Firecracker's private mapping of the memory file outlives the unlink).
#[test]
fn firecracker_warm_start_end_to_end() {
    nested_test(|h| {
        use_backend(h, InnerVmm::Firecracker);
        let _vms = vms(h, &["fw-a", "fw-b"]);
        let warm_row = doctor_row(h, "warm start");
        assert_eq!(warm_row["status"], "pass", "{warm_row}");
        assert!(
            warm_row["detail"]
                .as_str()
                .unwrap_or("")
                .contains("Firecracker"),
            "{warm_row}"
        );

        let t = h.banger_json(&["image", "warm", "debian-bookworm"]);
        assert_eq!(t["state"], "ready", "{t}\n{}", h.diagnostics());
        assert_eq!(t["backend"], "firecracker", "{t}");
        for name in ["fw-a", "fw-b"] {
            h.banger_ok(&["vm", "create", "--warm", "--name", name]);
            let show = h.banger_json(&["vm", "show", name]);
            assert_eq!(show["start"]["kind"], "warm", "{show}");
        }
        let id = |vm: &str| {
            guest(
                h,
                vm,
                "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; cat /sys/class/net/eth0/address; \
             cat /etc/machine-id; hostname; systemd-detect-virt",
            )
        };
        let (a, b) = (id("fw-a"), id("fw-b"));
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        assert_eq!(a.len(), 5, "{a:?}");
        for i in 0..3 {
            assert_ne!(a[i], b[i], "field {i} shared: {a:?} {b:?}");
        }
        assert_eq!((a[3], b[3]), ("fw-a", "fw-b"));
        assert_eq!(a[4], "kvm");

        ssh_reaches(h, "fw-a", "sshd in the warm Firecracker guest");

        // The template goes; its clone runs on.
        h.banger_ok(&["image", "warm", "debian-bookworm", "--drop"]);
        assert_eq!(guest(h, "fw-b", "echo alive"), "alive\n");

        // Stop/start: a cold boot of its own disks.
        guest(h, "fw-a", "echo kept > /root/marker; sync");
        h.banger_ok(&["vm", "stop", "fw-a"]);
        h.banger_ok(&["vm", "start", "fw-a"]);
        let show = h.banger_json(&["vm", "show", "fw-a"]);
        assert_eq!(show["start"]["kind"], "cold", "{show}");
        assert_eq!(
            guest(h, "fw-a", "cat /root/marker; hostname"),
            "kept\nfw-a\n"
        );
        h.banger_ok(&["vm", "delete", "fw-a", "fw-b"]);
    });
}

/// Waits (up to [`LONG`]) until sshd is active in the inner VM `vm`, then
/// checks that `vm ssh` reaches it: its host name comes back.
fn ssh_reaches(h: &KvmHost, vm: &str, what: &str) {
    h.wait_for(
        what,
        LONG,
        &KvmHost::banger_argv(&[
            "vm",
            "exec",
            vm,
            "--",
            "systemctl",
            "is-active",
            "--quiet",
            "ssh",
        ])
        .join(" "),
    );
    let ssh = h.banger_ok(&["vm", "ssh", vm, "--", "hostname"]);
    assert_eq!(ssh.trim(), vm);
}

/// Asserts the inner VM `vm` left nothing: no record, no VM directory,
/// no Firecracker process.
fn nothing_left(h: &KvmHost, vm: &str) {
    assert!(!h.vm_names().iter().any(|n| n == vm), "record of {vm} left");
    let left = h.ok("ls /root/.local/state/banger/vms | wc -l; pgrep -c -x firecracker || true");
    assert_eq!(
        left.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{left}"
    );
}
