//! CLI behaviour that needs no guest: versions, bad input, doctor, daemon.

use banger_e2e::{Banger, text};

fn one_line_error(out: &std::process::Output) -> String {
    let (_, stderr) = text(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr={stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("banger: daemon was not running"))
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {stderr}");
    lines[0].to_string()
}

#[test]
fn version_is_one_line_for_both_binaries() {
    let b = Banger::isolated("version");
    for (bin, name) in [("banger", "banger"), ("bangerd", "bangerd")] {
        let out = std::process::Command::new(b.bin_dir.join(bin))
            .arg("--version")
            .output()
            .expect("run");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert_eq!(s.lines().count(), 1, "{s}");
        assert!(s.starts_with(&format!("{name} v")), "{s}");
        assert!(s.contains("(commit ") && s.contains(", built "), "{s}");
    }
}

#[test]
fn unknown_config_key_is_a_one_line_error_naming_it() {
    let b = Banger::isolated("badcfg");
    b.write_config("bogus_key = 1\n");
    let line = one_line_error(&b.run(&["vm", "list"]));
    assert!(line.contains("bogus_key"), "{line}");
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn bad_config_value_names_the_key() {
    let b = Banger::isolated("badval");
    b.write_config("[vm_defaults]\ndisk_size = \"lots\"\n");
    let line = one_line_error(&b.run(&["vm", "list"]));
    assert!(line.contains("disk_size"), "{line}");
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn invalid_vm_name_is_refused_before_anything_happens() {
    let b = Banger::isolated("badname");
    // A usage error, printed as clap renders it: the error line first, then
    // where to find help.
    let out = b.run(&["vm", "run", "--rm", "--name", "Not_A_Label", "--", "true"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = stderr.lines().next().unwrap_or_default();
    assert!(line.contains("'Not_A_Label'"), "{stderr}");
    assert!(line.contains("DNS label"), "{stderr}");
    assert!(stderr.contains("--help"), "{stderr}");
    assert!(
        !b.root.join("state").exists(),
        "state created for a refused command"
    );
}

#[test]
fn missing_qemu_is_a_clear_error_and_leaves_nothing() {
    let b = Banger::isolated("noqemu");
    b.write_config("qemu_bin = \"/nonexistent/qemu-system-x86_64\"\n");
    let out = b.run(&["vm", "run", "--rm", "--name", "no-qemu", "--", "true"]);
    let (_, stderr) = text(&out);
    let line = one_line_error(&out);
    assert!(line.contains("qemu"), "{stderr}");
    assert!(b.vm_names().is_empty());
    assert!(b.vm_dirs().is_empty());
    let _ = b.run(&["daemon", "stop"]);
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn daemon_status_socket_stop() {
    let b = Banger::isolated("daemon");
    let out = b.run(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(3), "not running yet");
    let sock = text(&b.run(&["daemon", "socket"])).0;
    assert!(sock.trim().ends_with("banger/bangerd.sock"), "{sock}");
    let info = b.json(&["vm", "list"]); // auto-starts
    assert!(info.as_array().is_some_and(|a| a.is_empty()));
    let st = b.json(&["daemon", "status"]);
    assert!(st["pid"].as_u64().is_some());
    assert_eq!(st["socket"].as_str().map(str::trim), Some(sock.trim()));
    let meta = std::fs::metadata(sock.trim()).expect("socket exists");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let stop = b.run(&["daemon", "stop"]);
    assert!(stop.status.success(), "{}", text(&stop).1);
    assert_eq!(b.run(&["daemon", "status"]).status.code(), Some(3));

    // A daemon that stops removes only its own socket: a socket bound at
    // the path since (by whoever) stays.
    b.json(&["vm", "list"]); // starts it again
    let st = b.json(&["daemon", "status"]);
    let pid = st["pid"].as_i64().expect("pid") as i32;
    let path = std::path::Path::new(sock.trim());
    std::fs::rename(path, path.with_extension("old")).expect("move the socket aside");
    let other = std::os::unix::net::UnixListener::bind(path).expect("bind another socket");
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("the other socket").ino();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    banger_e2e::wait_until(
        "the daemon exits",
        std::time::Duration::from_secs(30),
        || {
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            !alive
        },
    );
    let after = std::fs::metadata(path).expect("the other socket is still there");
    assert_eq!(
        after.ino(),
        ino,
        "the stopping daemon removed a socket not its own"
    );
    drop(other);
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn doctor_reports_kvm_and_qemu() {
    let b = Banger::isolated("doctor");
    let v = b.json(&["doctor"]);
    let rows = v.as_array().expect("rows");
    let row = |n: &str| {
        rows.iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("no {n} row: {v}"))
            .clone()
    };
    assert_eq!(row("qemu")["status"], "pass", "{v}");
    assert_eq!(row("mkfs.ext4")["status"], "pass");
    let kvm = row("kvm");
    if kvm["status"] != "pass" {
        assert!(
            kvm["detail"].as_str().unwrap_or("").contains("TCG"),
            "{kvm}"
        );
    }
    assert!(
        row("vm_defaults")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("vcpu=")
    );
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn sigterm_stops_the_daemon_gracefully() {
    let b = Banger::isolated("sigterm");
    let _ = b.json(&["vm", "list"]); // auto-starts the daemon
    let st = b.json(&["daemon", "status"]);
    let pid = st["pid"].as_u64().expect("pid") as i32;
    let sock = std::path::PathBuf::from(st["socket"].as_str().expect("socket"));
    assert!(sock.exists());
    // SAFETY: plain kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    banger_e2e::wait_until(
        "the daemon to exit",
        std::time::Duration::from_secs(15),
        || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
    );
    assert!(!sock.exists(), "socket left behind after SIGTERM");
    let log = std::fs::read_to_string(b.state_dir().join("bangerd.log")).expect("log");
    let last: serde_json::Value =
        serde_json::from_str(log.lines().last().expect("a log line")).expect("JSON log lines");
    assert!(
        last["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped")),
        "{last}"
    );
    let _ = std::fs::remove_dir_all(&b.root);
}

#[test]
fn ssh_config_install_is_idempotent_and_uninstall_restores_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let b = Banger::isolated("sshcfg");
    let user_cfg = b.root.join("home/.ssh/config");
    std::fs::create_dir_all(user_cfg.parent().expect("dir")).expect("mkdir");
    let original = "Host work\n  HostName example.invalid\n";
    std::fs::write(&user_cfg, original).expect("write");
    std::fs::set_permissions(&user_cfg, std::fs::Permissions::from_mode(0o640)).expect("chmod");

    let printed = text(&b.run(&["ssh-config"])).0;
    assert!(printed.contains("Include \""), "{printed}");
    assert!(printed.contains("banger/ssh_config\""), "{printed}");

    let out = b.run(&["ssh-config", "--install"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let installed = std::fs::read_to_string(&user_cfg).expect("read");
    assert!(installed.starts_with(&printed), "{installed}");
    assert!(installed.ends_with(original));
    assert!(b.run(&["ssh-config", "--install"]).status.success());
    assert_eq!(std::fs::read_to_string(&user_cfg).expect("read"), installed);

    let out = b.run(&["ssh-config", "--uninstall"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(std::fs::read_to_string(&user_cfg).expect("read"), original);
    let mode = std::fs::metadata(&user_cfg)
        .expect("md")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);
    let _ = std::fs::remove_dir_all(&b.root);
}

/// `banger ARGS` outside any daemon (parse-level behaviour).
fn banger_bare(b: &Banger, args: &[&str]) -> std::process::Output {
    std::process::Command::new(b.bin_dir.join("banger"))
        .args(args)
        .envs(b.env_vars())
        .env_remove("BANGER_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run banger")
}

#[test]
fn bare_command_groups_print_their_help() {
    let b = Banger::isolated("barehelp");
    for (args, commands) in [
        (&[][..], &["vm", "image", "kernel", "doctor"][..]),
        (&["vm"][..], &["run", "exec", "ssh", "logs"][..]),
        (&["vm", "session"][..], &["start", "attach"][..]),
        (&["image"][..], &["pull", "build", "register"][..]),
    ] {
        let out = banger_bare(&b, args);
        let (stdout, stderr) = text(&out);
        let help = format!("{stdout}{stderr}");
        assert_eq!(out.status.code(), Some(2), "banger {args:?}: {help}");
        assert!(help.contains("Usage: banger"), "banger {args:?}: {help}");
        assert!(help.contains("Commands:"), "banger {args:?}: {help}");
        for c in commands {
            assert!(
                help.lines().any(|l| l.trim_start().starts_with(c)),
                "banger {args:?}: no {c} in {help}"
            );
        }
    }
    let out = banger_bare(&b, &["vm", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).0.contains("Commands:"));
}

#[test]
fn usage_errors_are_printed_whole() {
    let b = Banger::isolated("usage");
    // A missing argument: which one, and the usage line.
    let out = banger_bare(&b, &["vm", "exec"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the following required arguments were not provided"),
        "{stderr}"
    );
    assert!(stderr.contains("<VM>"), "{stderr}");
    assert!(stderr.contains("Usage: banger vm exec"), "{stderr}");
    assert!(stderr.contains("--help"), "{stderr}");
    // A misspelt flag: clap's tip is kept.
    let out = banger_bare(&b, &["vm", "list", "--jsn"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unexpected argument '--jsn'"), "{stderr}");
    assert!(
        stderr.contains("tip: a similar argument exists: '--json'"),
        "{stderr}"
    );
    assert!(stderr.contains("Usage: banger vm list"), "{stderr}");
}

#[test]
fn daemon_start_says_starting_then_the_outcome() {
    let b = Banger::isolated("startmsg");
    b.write_config("bogus_key = 1\n");
    let out = b.run(&["vm", "list"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("banger: daemon was not running; starting bangerd"),
        "{stderr}"
    );
    assert!(lines[0].ends_with("... failed"), "{stderr}");
    assert!(lines[1].contains("bogus_key"), "{stderr}");
    assert!(!stderr.contains("started"), "{stderr}");

    b.write_config("web_listen_addr = \"\"\n");
    let out = b.run(&["vm", "list"]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("banger: daemon was not running; starting bangerd"),
        "{stderr}"
    );
    assert!(stderr.trim_end().ends_with("... started"), "{stderr}");
    let _ = b.run(&["daemon", "stop"]);
}

/// Item by item of what docker and limactl users bring: sizes with units,
/// `--cpus`, `--json` on changing commands, `-q` on lists. No guest boots
/// (`--no-start`), but the VM's disks are made from the shared image.
#[test]
fn changing_commands_print_json_records_and_lists_print_names() {
    let b = banger_e2e::shared();
    let name = "e2e-json";
    let _ = b.run(&["vm", "delete", name]);
    let vm = b.json(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        name,
        "--memory",
        "1G",
        "--cpus",
        "3",
    ]);
    assert_eq!(vm["name"], name, "{vm}");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["spec"]["memory_mib"]["value"], 1024, "{vm}");
    assert_eq!(vm["spec"]["vcpu"]["value"], 3, "{vm}");

    let set = b.json(&["vm", "set", name, "--memory", "1536M", "--cpus", "2"]);
    let set = set.as_array().expect("an array of records");
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0]["name"], name);
    assert_eq!(set[0]["spec"]["memory_mib"]["value"], 1536);
    assert_eq!(set[0]["spec"]["vcpu"]["value"], 2);
    // A plain number is still MiB.
    let set = b.json(&["vm", "set", name, "--memory", "768"]);
    assert_eq!(set[0]["spec"]["memory_mib"]["value"], 768);

    // Names only, no header.
    let quiet = |args: &[&str]| {
        let out = b.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out).1);
        text(&out).0
    };
    let vms = quiet(&["vm", "list", "-q"]);
    assert!(vms.lines().any(|l| l == name), "{vms}");
    assert!(!vms.contains("NAME"), "{vms}");
    let images = quiet(&["image", "list", "--quiet"]);
    assert!(images.lines().any(|l| l == "debian-bookworm"), "{images}");
    let kernels = quiet(&["kernel", "list", "-q"]);
    assert!(
        !kernels.is_empty() && kernels.lines().all(|l| !l.contains(' ')),
        "{kernels}"
    );

    // A delete of a VM and a missing one: the record of the one deleted on
    // stdout, the other's error on stderr, and a failure status.
    let out = b.run(&["vm", "delete", "--json", name, "no-such-vm"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    let deleted: serde_json::Value = serde_json::from_str(&stdout).expect("json array");
    let deleted = deleted.as_array().expect("array");
    assert_eq!(deleted.len(), 1, "{stdout}");
    assert_eq!(deleted[0]["name"], name);
    assert!(stderr.contains("no-such-vm"), "{stderr}");
    assert!(!b.vm_names().contains(&name.to_string()));
}
