//! `banger vm run` against a real daemon and a real guest.

use banger_e2e::{processes_mentioning, shared, text, wait_until};
use std::time::Duration;

#[test]
fn run_rm_streams_output_and_propagates_exit_status() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "e2e-exit",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout={stdout} stderr={stderr}"
    );
    assert_eq!(stdout, "hi\n");
    assert!(stderr.contains("oops"), "{stderr}");
    let spec_line = stderr
        .lines()
        .find(|l| l.starts_with("spec: "))
        .unwrap_or_else(|| panic!("no spec line in {stderr}"));
    assert!(
        spec_line.contains("vcpu=") && spec_line.contains("memory=") && spec_line.contains("disk="),
        "{spec_line}"
    );
    assert!(!b.vm_names().contains(&"e2e-exit".to_string()));
    assert_eq!(b.vm_dirs(), dirs_before, "VM files left behind");
}

#[test]
fn vm_without_rm_survives_and_delete_removes_it() {
    let b = shared();
    let out = b.run(&[
        "vm",
        "run",
        "--name",
        "e2e-keep",
        "--",
        "sh",
        "-c",
        "echo kept > /root/marker; uname -r; hostname",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("cloud-amd64"), "{stdout}");
    // The command runs before systemd would set the host name: the agent
    // set it already.
    assert_eq!(stdout.lines().nth(1), Some("e2e-keep"), "{stdout}");

    let list = b.json(&["vm", "list"]);
    let vm = list
        .as_array()
        .expect("list")
        .iter()
        .find(|v| v["name"] == "e2e-keep")
        .expect("listed")
        .clone();
    assert_eq!(vm["state"], "running");
    let dir = vm["dir"].as_str().expect("dir").to_string();
    assert!(std::path::Path::new(&dir).is_dir());
    assert_eq!(
        processes_mentioning(&dir).len(),
        1,
        "exactly one VMM for the VM"
    );

    let show = b.json(&["vm", "show", "e2e-keep"]);
    assert_eq!(show["id"], vm["id"]);

    let del = b.run(&["vm", "delete", "e2e-keep"]);
    assert!(del.status.success(), "{}", text(&del).1);
    assert!(!std::path::Path::new(&dir).exists(), "VM dir left behind");
    assert!(processes_mentioning(&dir).is_empty(), "VMM left running");
    assert!(!b.vm_names().contains(&"e2e-keep".to_string()));
}

#[test]
fn daemon_killed_mid_run_leaves_no_orphan_vmm() {
    let b = shared();
    let run = b.spawn_running(&["--rm", "--name", "e2e-orphan"], "sleep 300");
    let vm = b.json(&["vm", "show", "e2e-orphan"]);
    let dir = vm["dir"].as_str().expect("dir").to_string();
    b.kill_daemon();

    // The CLI loses its stream, restarts the daemon (which re-adopts the VM)
    // and deletes the VM because of --rm.
    let out = run.wait_with_output().expect("wait run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    wait_until(
        &format!("the VMM to be gone (banger said: {stderr})"),
        Duration::from_secs(30),
        || processes_mentioning(&dir).is_empty(),
    );
    assert!(!b.vm_names().contains(&"e2e-orphan".to_string()));
    assert!(!std::path::Path::new(&dir).exists());
}

#[test]
fn daemon_restart_readopts_running_vms() {
    let b = shared();
    let out = b.run(&["vm", "run", "--name", "e2e-adopt", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let vm = b.json(&["vm", "show", "e2e-adopt"]);
    let dir = vm["dir"].as_str().expect("dir").to_string();
    b.kill_daemon();

    // Any command restarts the daemon; the VM must still be there and usable.
    let vm2 = b.json(&["vm", "show", "e2e-adopt"]);
    assert_eq!(vm2["state"], "running", "{vm2}");
    assert_eq!(vm2["pid"], vm["pid"]);
    assert_eq!(processes_mentioning(&dir).len(), 1);
    let del = b.run(&["vm", "delete", "e2e-adopt"]);
    assert!(del.status.success(), "{}", text(&del).1);
    assert!(processes_mentioning(&dir).is_empty());
}

#[test]
fn ctrl_c_during_a_rm_run_still_deletes_the_vm() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let run = b.spawn_running(&["--rm", "--name", "e2e-sigint"], "sleep 300");
    // SAFETY: plain kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(run.id() as i32, libc::SIGINT) }, 0);
    let status = run.wait_with_output().expect("wait").status;
    assert_eq!(
        status.code(),
        Some(130),
        "SIGINT ends the guest command: 128 + 2"
    );
    assert!(!b.vm_names().contains(&"e2e-sigint".to_string()));
    assert_eq!(b.vm_dirs(), dirs_before, "VM files left behind");
}

#[test]
fn stdin_is_forwarded_and_sizing_flags_apply() {
    use std::io::Write;
    let b = shared();
    let mut child = b
        .cmd(&[
            "vm",
            "run",
            "--rm",
            "--vcpu",
            "2",
            "--memory",
            "1536",
            "--",
            "sh",
            "-c",
            "cat; echo; nproc; grep MemTotal /proc/meminfo",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"payload from the host")
        .expect("write stdin");
    drop(stdin); // EOF ends `cat` in the guest
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("payload from the host"));
    assert_eq!(lines.next(), Some("2"), "{stdout}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {stdout}"));
    // The guest kernel keeps some memory for itself.
    assert!(
        (1200 * 1024..=1536 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
    assert!(
        stderr.contains("vcpu=2 (flag)") && stderr.contains("memory=1536M (flag)"),
        "{stderr}"
    );
}

#[test]
fn lifecycle_create_start_exec_restart_kill() {
    let b = shared();
    let ok = |args: &[&str]| {
        let out = b.run(args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "banger {args:?}: {stderr}");
        stdout
    };
    let state = || {
        b.json(&["vm", "show", "e2e-life"])["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    ok(&["vm", "create", "--name", "e2e-life", "--no-start"]);
    assert_eq!(state(), "stopped");
    let dir = b.json(&["vm", "show", "e2e-life"])["dir"]
        .as_str()
        .expect("dir")
        .to_string();
    assert!(
        processes_mentioning(&dir).is_empty(),
        "a --no-start VM has no VMM"
    );

    ok(&["vm", "start", "e2e-life"]);
    assert_eq!(state(), "running");
    // The host key was made on the host and is the one the guest's sshd
    // uses; banger's known_hosts pins it; banger's key is authorised.
    let host_pub = std::fs::read_to_string(format!("{dir}/ssh_host_ed25519_key.pub"))
        .expect("host public key in the VM dir");
    assert_eq!(
        ok(&[
            "vm",
            "exec",
            "e2e-life",
            "--",
            "cat",
            "/etc/ssh/ssh_host_ed25519_key.pub"
        ]),
        host_pub
    );
    assert_eq!(
        ok(&[
            "vm",
            "exec",
            "e2e-life",
            "--",
            "stat",
            "-c",
            "%a %U",
            "/etc/ssh/ssh_host_ed25519_key",
            "/root/.ssh/authorized_keys"
        ]),
        "600 root\n600 root\n"
    );
    let user_pub =
        std::fs::read_to_string(b.state_dir().join("ssh/id_ed25519.pub")).expect("user key");
    assert!(
        ok(&[
            "vm",
            "exec",
            "e2e-life",
            "--",
            "cat",
            "/root/.ssh/authorized_keys"
        ])
        .contains(user_pub.trim())
    );
    let known =
        std::fs::read_to_string(b.state_dir().join("ssh/known_hosts")).expect("known_hosts");
    let key_b64 = host_pub.split_whitespace().nth(1).expect("b64");
    assert!(
        known
            .lines()
            .any(|l| l.starts_with("e2e-life.vm ssh-ed25519 ") && l.contains(key_b64)),
        "{known}"
    );
    // sshd really serves that key (it starts after the agent: wait for it).
    let scanned = ok(&[
        "vm",
        "exec",
        "e2e-life",
        "--",
        "sh",
        "-c",
        "for i in $(seq 120); do ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | grep . && exit 0; sleep 1; done; exit 1",
    ]);
    assert!(scanned.contains(key_b64), "sshd offers {scanned}");
    ok(&[
        "vm",
        "exec",
        "e2e-life",
        "--",
        "sh",
        "-c",
        "echo kept > /root/marker; echo sys > /etc/marker; sync",
    ]);

    // What was written in /root (work disk) and /etc (overlay).
    let markers = || {
        ok(&[
            "vm",
            "exec",
            "e2e-life",
            "--",
            "cat",
            "/root/marker",
            "/etc/marker",
        ])
    };
    // Restart = graceful stop (guest powers off) + start on the same disks.
    ok(&["vm", "restart", "e2e-life"]);
    assert_eq!(state(), "running");
    assert_eq!(markers(), "kept\nsys\n");
    let out = b.run(&["vm", "exec", "e2e-life", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        ok(&[
            "vm",
            "exec",
            "e2e-life",
            "--cwd",
            "/etc",
            "--env",
            "GREETING=hi there",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd"
        ]),
        "hi there\n/etc\n"
    );
    let out = b.run(&["vm", "exec", "e2e-life", "--env", "1BAD=x", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(ok(&["vm", "logs", "e2e-life"]).contains("Linux version"));

    ok(&["vm", "kill", "--signal", "KILL", "e2e-life"]);
    wait_until(
        "the killed VM to be recorded stopped",
        Duration::from_secs(30),
        || state() == "stopped",
    );
    assert!(processes_mentioning(&dir).is_empty());
    assert!(std::path::Path::new(&dir).is_dir(), "kill keeps the disks");

    // After a kill -9 the disks still boot, with what was written before.
    ok(&["vm", "start", "e2e-life"]);
    assert_eq!(markers(), "kept\nsys\n");

    // Resources change only on a stopped VM, with a message saying so.
    let out = b.run(&["vm", "set", "e2e-life", "--memory", "512"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out).1;
    assert!(
        err.contains("is running") && err.contains("banger vm stop e2e-life"),
        "{err}"
    );
    let stats = b.json(&["vm", "stats", "e2e-life"]);
    let s = &stats[0];
    assert!(
        s["vmm"]["rss_bytes"].as_u64().unwrap_or(0) > 10 << 20,
        "{stats}"
    );
    assert!(
        s["guest"]["mem_total_bytes"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    let roles: Vec<&str> = s["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .filter_map(|d| d["role"].as_str())
        .collect();
    assert_eq!(roles, ["base", "overlay", "work"], "{stats}");

    ok(&["vm", "stop", "e2e-life"]);
    ok(&[
        "vm",
        "set",
        "e2e-life",
        "--memory",
        "512",
        "--disk-size",
        "9G",
    ]);
    let out = b.run(&["vm", "set", "e2e-life", "--disk-size", "8G"]);
    assert!(text(&out).1.contains("only grow"), "{}", text(&out).1);
    let vm = b.json(&["vm", "show", "e2e-life"]);
    assert_eq!(vm["spec"]["memory_mib"]["value"], 512, "{vm}");
    assert_eq!(vm["spec"]["memory_mib"]["source"], "flag", "{vm}");
    ok(&["vm", "start", "e2e-life"]);
    let mem_kib: u64 = ok(&[
        "vm",
        "exec",
        "e2e-life",
        "--",
        "awk",
        "/MemTotal/ {print $2}",
        "/proc/meminfo",
    ])
    .trim()
    .parse()
    .expect("MemTotal");
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kib),
        "guest sees {mem_kib} KiB, wanted about 512 MiB"
    );
    // The work disk was grown to the new size while stopped.
    let root_kib: u64 = ok(&[
        "vm",
        "exec",
        "e2e-life",
        "--",
        "sh",
        "-c",
        "df -P -k /root | awk 'NR==2 {print $2}'",
    ])
    .trim()
    .parse()
    .expect("df");
    assert!(root_kib > 8 * 1024 * 1024, "/root is {root_kib} KiB");

    ok(&["vm", "delete", "e2e-life"]);
    assert!(!std::path::Path::new(&dir).exists());
}

#[test]
fn three_concurrent_creates_succeed() {
    let b = shared();
    let names = ["e2e-con-a", "e2e-con-b", "e2e-con-c"];
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            b.cmd(&["vm", "create", "--name", n])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn banger")
        })
        .collect();
    for (n, c) in names.iter().zip(children) {
        let out = c.wait_with_output().expect("wait");
        assert!(out.status.success(), "create {n}: {}", text(&out).1);
    }
    let vms = b.json(&["vm", "list"]);
    for n in names {
        let vm = vms
            .as_array()
            .expect("list")
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {vms}"));
        assert_eq!(vm["state"], "running", "{vm}");
    }
    let mut args = vec!["vm", "delete"];
    args.extend(names);
    let out = b.run(&args);
    assert!(out.status.success(), "{}", text(&out).1);
    for n in names {
        assert!(!b.vm_names().iter().any(|v| v == n));
    }
}

/// A VMM that dies during start-up makes the boot step fail after the
/// directory, record and disks were made: all of it is rolled back.
#[test]
fn a_failing_boot_step_leaves_no_file_process_or_record() {
    let b = shared();
    // Make sure the image exists before breaking the VMM.
    let out = b.run(&["vm", "create", "--name", "e2e-pre", "--no-start"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(b.run(&["vm", "delete", "e2e-pre"]).status.success());
    let dirs_before = b.vm_dirs();

    let fake = b.root.join("failing-qemu");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'qemu: simulated start-up failure' >&2\nexit 1\n",
    )
    .expect("write fake");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = b.config_dir().join("config.toml");
    let saved = std::fs::read_to_string(&config).ok();
    struct Restore<'a>(&'a banger_e2e::Banger, std::path::PathBuf, Option<String>);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["daemon", "stop"]);
            match &self.2 {
                Some(t) => {
                    let _ = std::fs::write(&self.1, t);
                }
                None => {
                    let _ = std::fs::remove_file(&self.1);
                }
            }
        }
    }
    let _restore = Restore(b, config.clone(), saved.clone());
    let _ = b.run(&["daemon", "stop"]);
    b.write_config(&format!(
        "{}qemu_bin = \"{}\"\n",
        saved.unwrap_or_default(),
        fake.display()
    ));

    let out = b.run(&["vm", "create", "--name", "e2e-fault"]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("simulated start-up failure"), "{err}");
    assert!(
        !b.vm_names().iter().any(|n| n == "e2e-fault"),
        "record left"
    );
    assert_eq!(b.vm_dirs(), dirs_before, "VM directory left");
    assert!(processes_mentioning("e2e-fault").is_empty(), "process left");
}

/// `vm ssh` uses the system ssh with banger's key and its exact
/// known_hosts; plain `ssh <name>.vm` works through banger's ssh_config;
/// a swapped host key is refused.
#[test]
fn vm_ssh_checks_the_pinned_host_key() {
    let b = shared();
    let out = b.run(&["vm", "create", "--name", "e2e-ssh"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let ssh = |extra: &[&str]| {
        let mut args = vec!["vm", "ssh", "e2e-ssh", "--"];
        args.extend(extra);
        b.run(&args)
    };
    // sshd comes up seconds after the agent answers: `vm ssh` waits for
    // it, so the first login works.
    let out = ssh(&["hostname"]);
    assert_eq!(text(&out).0.trim(), "e2e-ssh", "{}", text(&out).1);
    assert_eq!(ssh(&["exit", "3"]).status.code(), Some(3));

    // Through the ssh_config banger keeps (run inside the VMs' namespace).
    let cfg = b.config_dir().join("ssh_config");
    let out = b
        .in_netns(
            "ssh",
            &[
                "-F",
                &cfg.to_string_lossy(),
                "e2e-ssh.vm",
                "echo",
                "via-config",
            ],
        )
        .output()
        .expect("ssh");
    assert_eq!(text(&out).0.trim(), "via-config", "{}", text(&out).1);

    // Another key under the VM's alias: ssh must refuse the real one.
    let kh = b.state_dir().join("ssh/known_hosts");
    let saved = std::fs::read_to_string(&kh).expect("known_hosts");
    let keyfile = b.root.join("other-host-key");
    let _ = std::fs::remove_file(&keyfile);
    let _ = std::fs::remove_file(keyfile.with_extension("pub"));
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&keyfile)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let other_pub = std::fs::read_to_string(keyfile.with_extension("pub")).expect("pub");
    let mut parts = other_pub.split_whitespace();
    let other = format!(
        "e2e-ssh.vm {} {}",
        parts.next().expect("type"),
        parts.next().expect("key")
    );
    let swapped: String = saved
        .lines()
        .map(|l| {
            if l.starts_with("e2e-ssh.vm ") {
                other.as_str()
            } else {
                l
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&kh, swapped).expect("swap");
    let out = ssh(&["true"]);
    std::fs::write(&kh, saved).expect("restore");
    assert_eq!(out.status.code(), Some(255), "a swapped host key must fail");
    assert!(
        text(&out).1.to_lowercase().contains("host key"),
        "{}",
        text(&out).1
    );

    assert!(b.run(&["vm", "delete", "e2e-ssh"]).status.success());
    let after = std::fs::read_to_string(&kh).expect("known_hosts");
    assert!(!after.contains("e2e-ssh.vm"), "{after}");
}

/// The default image is the seed's golden image: Docker (its data on the
/// /root disk, overlay2) and mise are there. Nothing outside is reachable,
/// so the container image is made in the guest from its own /bin/echo and
/// loaded with `docker import`, then run with `docker run` on the default
/// bridge network, once the guest's systemd has booted (`--wait-boot`).
#[test]
fn the_default_image_runs_containers_and_has_mise() {
    let b = shared();
    let script = r#"set -eu
mise --version
docker info --format 'driver={{.Driver}} root={{.DockerRootDir}}'
r=$(mktemp -d)
for f in /bin/echo $(ldd /bin/echo | grep -o '/[^ ]*'); do
  mkdir -p "$r$(dirname "$f")"
  cp "$f" "$r$f"
done
tar -C "$r" -c . | docker import - banger-e2e/echo:1 >/dev/null
docker run --rm banger-e2e/echo:1 /bin/echo hello-from-a-container
"#;
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "e2e-docker",
        // The command runs as soon as the agent is up, before systemd has
        // started dockerd: --wait-boot waits for the image's services.
        "--wait-boot",
        "--",
        "bash",
        "-c",
        script,
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout={stdout} stderr={stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with(banger_image::derive::MISE_VERSION),
        "mise --version: {stdout}"
    );
    assert_eq!(
        lines[1], "driver=overlay2 root=/root/.local/share/docker",
        "{stdout}"
    );
    assert_eq!(lines.last(), Some(&"hello-from-a-container"), "{stdout}");
    assert!(!b.vm_names().contains(&"e2e-docker".to_string()));
}
