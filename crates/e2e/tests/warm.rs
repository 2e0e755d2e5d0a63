//! Warm starts against a real daemon and real TCG guests: `image warm`
//! saves a sealed template, `vm run`/`vm create --warm` restore it, each
//! clone gets an identity of its own, broken templates are refused.
//!
//! Lean on purpose (CI has 2 cores): one template of a 1 GiB shape serves
//! every test, and VMs are shared between assertions.

use banger_e2e::{Banger, processes_mentioning, shared, text, wait_until};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shape of every warm test (small, so the template is cheap to save).
const MEMORY: &str = "1024";
const VCPU: &str = "1";
const IMAGE: &str = "debian-bookworm";

fn ok(b: &Banger, args: &[&str]) -> String {
    let out = b.run(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "banger {args:?}: {stdout}\n{stderr}");
    stdout
}

/// Makes the template of the test shape (a no-op when it is current).
fn warm(b: &Banger) -> Value {
    let out = b.run(&[
        "image", "warm", IMAGE, "--vcpu", VCPU, "--memory", MEMORY, "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "image warm: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn template_header(t: &Value) -> Value {
    let dir = PathBuf::from(t["dir"].as_str().expect("dir"));
    let text = std::fs::read_to_string(dir.join("template.json")).expect("template.json");
    serde_json::from_str(&text).expect("header json")
}

fn taps(b: &Banger) -> usize {
    b.ip(&["-o", "link", "show", "type", "tun"]).lines().count()
}

fn create_warm(b: &Banger, name: &str, extra: &[&str]) {
    let mut args = vec![
        "vm", "create", "--warm", "--name", name, "--vcpu", VCPU, "--memory", MEMORY,
    ];
    args.extend_from_slice(extra);
    ok(b, &args);
}

/// One guest's identity, read in one exec.
#[derive(Debug)]
struct Identity {
    host_key: String,
    mac: String,
    ip: String,
    machine_id: String,
    hostname: String,
    random: String,
    clock: i64,
}

fn identity(b: &Banger, vm: &str) -> Identity {
    let script = "cat /etc/ssh/ssh_host_ed25519_key.pub; cat /sys/class/net/eth0/address; \
        ip -4 -o addr show eth0 | awk '{print $4}'; cat /etc/machine-id; hostname; \
        head -c 64 /dev/urandom | sha256sum | cut -c1-64; date +%s";
    let out = ok(b, &["vm", "exec", vm, "--", "sh", "-c", script]);
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(l.len(), 7, "{out}");
    Identity {
        host_key: l[0].split_whitespace().nth(1).unwrap_or("").to_string(),
        mac: l[1].to_string(),
        ip: l[2].to_string(),
        machine_id: l[3].to_string(),
        hostname: l[4].to_string(),
        random: l[5].to_string(),
        clock: l[6].parse().expect("date"),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs() as i64
}

/// `image warm` saves a sealed template; `vm run --warm` restores it;
/// two warm VMs share nothing of their identity with each other or with
/// the template; a bigger disk is grown; stop/start is a cold boot of the
/// VM's own disks that keeps its state.
#[test]
fn warm_vms_restore_with_identities_of_their_own() {
    let b = shared();
    let t = warm(b);
    assert_eq!(t["state"], "ready", "{t}");
    assert_eq!(t["shape"]["memory_mib"], 1024, "{t}");
    // The image's JSON carries its templates, as `image warm` printed them.
    let shown = b.json(&["image", "show", IMAGE]);
    let listed = b.json(&["image", "list"]);
    let listed = listed
        .as_array()
        .and_then(|l| l.iter().find(|i| i["name"] == IMAGE))
        .unwrap_or_else(|| panic!("{IMAGE} not in image list: {listed}"));
    for (what, img) in [("image show", &shown), ("image list", listed)] {
        let of_shape: Vec<&Value> = img["templates"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no templates array: {img}"))
            .iter()
            .filter(|x| x["id"] == t["id"])
            .collect();
        assert_eq!(of_shape, [&t], "{what}: {img}");
    }
    let dir = PathBuf::from(t["dir"].as_str().expect("dir"));
    for f in [
        "template.json",
        "memory",
        "vmstate",
        "overlay.ext4",
        "work.ext4",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "templates hold guest memory: owner only");
    let header = template_header(&t);
    assert_eq!(header["magic"], "banger-template");
    assert!(
        !header["cmdline"].as_str().expect("cmdline").contains("ip="),
        "a template's NIC is never configured: {header}"
    );

    // Ephemeral run, warm.
    let dirs_before = b.vm_dirs();
    let out = b.run(&[
        "vm",
        "run",
        "--warm",
        "--rm",
        "--vcpu",
        VCPU,
        "--memory",
        MEMORY,
        "--",
        "sh",
        "-c",
        "echo warm-ok",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout, "warm-ok\n", "{stderr}");
    assert!(
        stderr.contains("start: warm (restoring template"),
        "{stderr}"
    );
    assert_eq!(b.vm_dirs(), dirs_before, "VM files left behind");

    // Two persistent warm VMs; the second asks for a bigger disk.
    create_warm(b, "warm-a", &[]);
    create_warm(b, "warm-b", &["--disk-size", "12G"]);
    let show = b.json(&["vm", "show", "warm-a"]);
    assert_eq!(show["start"]["kind"], "warm", "{show}");
    assert_eq!(show["start"]["template"], t["id"], "{show}");
    let human = ok(b, &["vm", "show", "warm-a"]);
    assert!(human.contains("warm (template "), "{human}");
    // Its console log names the template whose boot it continues.
    let logs = ok(b, &["vm", "logs", "warm-a"]);
    let banner = format!(
        "banger: restored from template {} (template boot log: {}/console.log)",
        t["id"].as_str().expect("id"),
        dir.display()
    );
    assert!(logs.contains(&banner), "{banner:?} not in:\n{logs}");

    let a = identity(b, "warm-a");
    let c = identity(b, "warm-b");
    assert_ne!(a.host_key, c.host_key);
    assert_ne!(a.mac, c.mac);
    assert_ne!(a.ip, c.ip);
    assert_ne!(a.machine_id, c.machine_id);
    assert_ne!(a.random, c.random, "entropy reseeded per clone");
    assert_eq!(
        (a.hostname.as_str(), c.hostname.as_str()),
        ("warm-a", "warm-b")
    );
    for id in [&a, &c] {
        assert_ne!(id.mac, header["template_mac"].as_str().expect("mac"));
        assert_ne!(
            id.machine_id,
            header["seal"]["machine_id"].as_str().expect("mid")
        );
        assert!(
            (id.clock - now()).abs() < 30,
            "guest clock {id:?} vs host {}",
            now()
        );
    }
    // The guest's key is the one banger pins; strict ssh works.
    let known =
        std::fs::read_to_string(b.state_dir().join("ssh/known_hosts")).expect("known_hosts");
    assert!(
        known
            .lines()
            .any(|l| l.starts_with("warm-a.vm ssh-ed25519 ") && l.contains(&a.host_key)),
        "{known}"
    );
    let ssh = ok(b, &["vm", "ssh", "warm-a", "--", "hostname"]);
    assert_eq!(ssh.trim(), "warm-a");

    // The bigger disk was grown online, file system included.
    let df = ok(
        b,
        &[
            "vm",
            "exec",
            "warm-b",
            "--",
            "df",
            "-B1",
            "--output=size",
            "/root",
        ],
    );
    let size: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df");
    assert!(size > 10 << 30, "/root is {size} bytes: {df}");

    // Stop/start: a cold boot of its own disks, state kept.
    ok(
        b,
        &[
            "vm",
            "exec",
            "warm-a",
            "--",
            "sh",
            "-c",
            "echo kept > /root/marker; echo etc > /etc/marker; sync",
        ],
    );
    ok(b, &["vm", "stop", "warm-a"]);
    ok(b, &["vm", "start", "warm-a"]);
    let show = b.json(&["vm", "show", "warm-a"]);
    assert_eq!(show["start"]["kind"], "cold", "{show}");
    let after = identity(b, "warm-a");
    assert_eq!(after.host_key, a.host_key);
    assert_eq!(after.machine_id, a.machine_id);
    assert_eq!(after.hostname, "warm-a");
    assert_eq!(
        ok(
            b,
            &[
                "vm",
                "exec",
                "warm-a",
                "--",
                "cat",
                "/root/marker",
                "/etc/marker"
            ]
        ),
        "kept\netc\n"
    );
    // A daemon killed outright re-adopts a running warm VM.
    b.kill_daemon();
    assert_eq!(
        ok(b, &["vm", "exec", "warm-b", "--", "hostname"]),
        "warm-b\n"
    );
    let show = b.json(&["vm", "show", "warm-b"]);
    assert_eq!(show["start"]["kind"], "warm", "{show}");
    ok(b, &["vm", "delete", "warm-a", "warm-b"]);
    let used = warm(b);
    assert!(used["uses"].as_u64().unwrap_or(0) >= 3, "{used}");
}

/// Workspace and `[[file_sync]]`/credential files reach a warm VM (pushed
/// live: its disks are the template's).
#[test]
fn workspace_and_file_sync_on_warm() {
    let b = shared();
    let home = b.root.join("home");
    let write = |p: &Path, s: &str| {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, s).expect("write");
    };
    write(&home.join("warm-sync/file.txt"), "synced\n");
    let cred = home.join(".claude/.credentials.json");
    write(&cred, "{\"token\":\"warm\"}\n");
    let saved = std::fs::read_to_string(b.config_dir().join("config.toml")).ok();
    let _ = b.run(&["daemon", "stop"]);
    b.write_config(&format!(
        "{}[[file_sync]]\nhost = \"~/warm-sync/file.txt\"\nguest = \"~/synced\"\n",
        saved.clone().unwrap_or_default()
    ));
    struct Restore<'a>(&'a Banger, Option<String>, PathBuf);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["daemon", "stop"]);
            let file = self.0.config_dir().join("config.toml");
            match &self.1 {
                Some(t) => {
                    let _ = std::fs::write(&file, t);
                }
                None => {
                    let _ = std::fs::remove_file(&file);
                }
            }
            let _ = std::fs::remove_file(&self.2);
        }
    }
    let _restore = Restore(b, saved, cred);
    // The last test of the file (they run in name order): the lane's
    // later files must not find a template of this shape.
    struct DropTemplates<'a>(&'a Banger);
    impl Drop for DropTemplates<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["image", "warm", IMAGE, "--drop"]);
        }
    }
    let _drop = DropTemplates(b);
    warm(b);

    let repo = b.root.join("warm-repo");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).expect("repo");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("f"), "from-the-repo\n").expect("f");
    git(&["add", "f"]);
    git(&[
        "-c",
        "user.email=e@x",
        "-c",
        "user.name=e",
        "commit",
        "-qm",
        "f",
    ]);
    let repo_arg = repo.display().to_string();
    let out = b.run(&[
        "vm", "run", &repo_arg, "--warm", "--rm", "--vcpu", VCPU, "--memory", MEMORY, "--",
        "sh", "-c",
        "cat f; cat /root/synced; stat -c '%a %U' /root/synced; cat /root/.claude/.credentials.json",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("start: warm (restoring template"),
        "{stderr}"
    );
    assert_eq!(
        stdout, "from-the-repo\nsynced\n600 root\n{\"token\":\"warm\"}\n",
        "{stderr}"
    );
}

/// A template whose header or files do not check out is refused with the
/// reason: `--warm` fails leaving nothing behind, a plain run boots cold.
/// `warm_start = "off"` refuses `--warm` before anything is made.
#[test]
fn broken_templates_are_refused() {
    let b = shared();
    let t = warm(b);
    let dir = PathBuf::from(t["dir"].as_str().expect("dir"));

    // A header of another format: refused, and --warm leaves nothing.
    let path = dir.join("template.json");
    let text_before = std::fs::read_to_string(&path).expect("header");
    let mut other: Value = serde_json::from_str(&text_before).expect("header json");
    other["format"] = 7.into();
    std::fs::write(&path, other.to_string()).expect("w");
    let dirs_before = b.vm_dirs();
    let taps_before = taps(b);
    let out = b.run(&[
        "vm",
        "run",
        "--warm",
        "--rm",
        "--name",
        "warm-broken",
        "--vcpu",
        VCPU,
        "--memory",
        MEMORY,
        "--",
        "true",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("template format 7"), "{stderr}");
    assert!(
        !b.vm_names().iter().any(|n| n == "warm-broken"),
        "record left"
    );
    assert_eq!(b.vm_dirs(), dirs_before, "VM files left behind");
    assert_eq!(taps(b), taps_before, "TAP left behind");
    assert!(processes_mentioning("warm-broken").is_empty(), "VMM left");
    assert!(!dir.exists(), "the refused template is removed");

    // Rebuilt by image warm; a truncated memory file: a plain run says
    // why and boots cold.
    let t = warm(b);
    let dir = PathBuf::from(t["dir"].as_str().expect("dir"));
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .expect("memory");
    mem.set_len(4096).expect("truncate");
    let out = b.run(&[
        "vm", "run", "--rm", "--vcpu", VCPU, "--memory", MEMORY, "--", "echo", "cold-ok",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout, "cold-ok\n");
    assert!(
        stderr.contains("template refused") && stderr.contains("truncated"),
        "{stderr}"
    );

    // warm_start = "off": --warm is refused up front.
    let saved = std::fs::read_to_string(b.config_dir().join("config.toml")).expect("config");
    let _ = b.run(&["daemon", "stop"]);
    b.write_config(&format!(
        "warm_start = \"off\"\n{}",
        saved.replace("warm_start = \"manual\"\n", "")
    ));
    let out = b.run(&["vm", "run", "--warm", "--rm", "--", "true"]);
    let (_, stderr) = text(&out);
    let _ = b.run(&["daemon", "stop"]);
    std::fs::write(b.config_dir().join("config.toml"), &saved).expect("restore config");
    assert!(!out.status.success());
    assert!(stderr.contains("warm starts are off"), "{stderr}");
}

/// `warm_start = "auto"`: a cold create of a shape without a template
/// makes one in the background.
#[test]
fn auto_builds_a_template_on_first_use() {
    let b = shared();
    ok(b, &["image", "warm", IMAGE, "--drop"]);
    let saved = std::fs::read_to_string(b.config_dir().join("config.toml")).expect("config");
    let _ = b.run(&["daemon", "stop"]);
    b.write_config(&format!(
        "warm_start = \"auto\"\n{}",
        saved.replace("warm_start = \"manual\"\n", "")
    ));
    struct Restore<'a>(&'a Banger, String);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["daemon", "stop"]);
            let _ = std::fs::write(self.0.config_dir().join("config.toml"), &self.1);
        }
    }
    let _restore = Restore(b, saved);
    let out = b.run(&[
        "vm", "run", "--rm", "--vcpu", VCPU, "--memory", MEMORY, "--", "true",
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no template for this image and shape yet"),
        "{stderr}"
    );
    let templates = b.state_dir().join("templates");
    let ready = || -> HashSet<String> {
        std::fs::read_dir(&templates)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("template.json").is_file())
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("a background template", Duration::from_secs(600), || {
        !ready().is_empty()
    });
    let info = warm(b);
    assert!(ready().contains(info["id"].as_str().expect("id")), "{info}");
    // With a template there, --no-warm still boots cold, and says why.
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--no-warm",
        "--vcpu",
        VCPU,
        "--memory",
        MEMORY,
        "--",
        "true",
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let start = stderr
        .lines()
        .find(|l| l.starts_with("start: "))
        .unwrap_or_else(|| panic!("no start: line in {stderr}"));
    assert!(
        start.contains("cold") && start.contains("--no-warm"),
        "{start}"
    );
}
