//! `banger vm run` modes: exit statuses, `--rm` in every way a run can
//! end (normal, SIGINT during boot or command, a killed CLI), `--json`,
//! interactive sessions, `[[file_sync]]`, credential sync and name clashes.

use banger_e2e::{Banger, processes_mentioning, shared, text, wait_until};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Asserts that no VM named `name` is left: no record, no directory
/// beyond `dirs_before`, no VMM process.
fn assert_gone(b: &Banger, name: &str, dirs_before: &[String]) {
    assert!(
        !b.vm_names().iter().any(|n| n == name),
        "record of {name} left"
    );
    assert_eq!(b.vm_dirs(), dirs_before, "VM files of {name} left behind");
    assert!(processes_mentioning(name).is_empty(), "VMM of {name} left");
}

/// Swaps the installation's config for the duration of a test (restarting
/// the daemon so it reads it), and puts the old one back afterwards.
struct ConfigSwap<'a> {
    b: &'a Banger,
    saved: Option<String>,
}

impl<'a> ConfigSwap<'a> {
    fn new(b: &'a Banger, extra: &str) -> Self {
        let saved = std::fs::read_to_string(b.config_dir().join("config.toml")).ok();
        let _ = b.run(&["daemon", "stop"]);
        b.write_config(&format!("{}{extra}", saved.clone().unwrap_or_default()));
        Self { b, saved }
    }
}

impl Drop for ConfigSwap<'_> {
    fn drop(&mut self) {
        let _ = self.b.run(&["daemon", "stop"]);
        let file = self.b.config_dir().join("config.toml");
        match &self.saved {
            Some(t) => {
                let _ = std::fs::write(&file, t);
            }
            None => {
                let _ = std::fs::remove_file(&file);
            }
        }
    }
}

fn home(b: &Banger) -> PathBuf {
    b.root.join("home")
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

#[test]
fn json_record_exit_status_and_rm_leave_nothing() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--json",
        "--name",
        "e2e-rm42",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 42",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(42), "{stdout} {stderr}");
    // stdout holds only the record; the command's stdout went to stderr.
    let rec: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON record ({e}): {stdout}"));
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    assert_eq!(rec["name"], "e2e-rm42", "{rec}");
    assert_eq!(rec["mode"], "command", "{rec}");
    assert_eq!(rec["exit_status"], 42, "{rec}");
    assert_eq!(rec["deleted"], true, "{rec}");
    for phase in ["create", "boot", "ready", "command", "delete", "total"] {
        assert!(
            rec["timings_ms"][phase].is_u64(),
            "no {phase} timing: {rec}"
        );
    }
    assert!(
        stderr.contains("out\n") && stderr.contains("err\n"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("spec: ")),
        "the spec line comes first: {stderr}"
    );
    // Not a terminal: no progress lines.
    assert!(!stderr.contains("] create: "), "{stderr}");
    assert_gone(b, "e2e-rm42", &dirs_before);
}

#[test]
fn sigint_during_a_rm_command_cleans_up() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let run = b.spawn_running(&["--rm", "--name", "e2e-int"], "sleep 600");
    // SAFETY: plain kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(run.id() as i32, libc::SIGINT) }, 0);
    let out = run.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(b, "e2e-int", &dirs_before);
}

#[test]
fn sigint_during_boot_rolls_the_vm_back() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let mut child = b
        .cmd(&["vm", "run", "--rm", "--name", "e2e-intboot", "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    // Interrupt once the VM has its directory (disks being made or booting).
    wait_until("the VM's directory", Duration::from_secs(120), || {
        b.vm_dirs().len() > dirs_before.len()
    });
    // SAFETY: plain kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().expect("wait");
    let stderr = lines.join().expect("stderr").join("\n");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_gone(b, "e2e-intboot", &dirs_before);
}

#[test]
fn a_killed_cli_does_not_leak_its_rm_vm() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let run = b.spawn_running(&["--rm", "--name", "e2e-kill9"], "sleep 600");
    let mut run = run;
    // SIGKILL: the CLI cannot clean up; the daemon sees its connection
    // close and deletes the VM itself.
    run.kill().expect("kill banger");
    let _ = run.wait();
    wait_until(
        "the daemon to delete the VM of the killed CLI",
        Duration::from_secs(90),
        || !b.vm_names().iter().any(|n| n == "e2e-kill9"),
    );
    assert_gone(b, "e2e-kill9", &dirs_before);
}

#[test]
fn interactive_session_mode_with_json() {
    let b = shared();
    let dirs_before = b.vm_dirs();
    let mut child = b
        .cmd(&["vm", "run", "--rm", "--json", "--name", "e2e-sess"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Not a terminal: ssh runs the login shell on this input.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hostname\nexit 5\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout} {stderr}");
    let rec: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON record ({e}): {stdout}"));
    assert_eq!(rec["mode"], "session", "{rec}");
    assert_eq!(rec["exit_status"], 5, "{rec}");
    assert_eq!(rec["deleted"], true, "{rec}");
    assert!(rec["timings_ms"]["session"].is_u64(), "{rec}");
    assert!(stderr.contains("e2e-sess\n"), "hostname output: {stderr}");
    assert_gone(b, "e2e-sess", &dirs_before);
}

/// A session whose VM goes down (its VMM killed here, as a guest that
/// resets or panics ends it) is ended by banger within seconds, with the
/// end of the VM's console, instead of ssh waiting on a guest that is gone
/// until TCP gives up.
#[test]
fn a_session_ends_when_its_vm_goes_down() {
    let b = shared();
    let _ = b.run(&["vm", "delete", "e2e-down"]);
    let mut child = b
        .cmd(&["vm", "run", "--name", "e2e-down"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The shell reads this, then waits for more: stdin stays open.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"echo session-is-up\n")
        .expect("write stdin");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.trim() == "session-is-up" => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                let console = b.run(&["vm", "logs", "e2e-down", "--tail", "60"]);
                panic!(
                    "the session never answered ({e}): {}\nthe end of its console:\n{}",
                    text(&out).1,
                    text(&console).0
                );
            }
        }
    }
    let vm = b.json(&["vm", "show", "e2e-down"]);
    let pid = vm["pid"].as_u64().expect("a running VM has a VMM pid");
    let kill = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success(), "kill -9 {pid}");
    let ended = (0..600).any(|_| {
        let done = child.try_wait().expect("try_wait").is_some();
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    drop(stdin);
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let err = text(&out).1;
    assert!(
        ended,
        "the session of the VM that went down still ran 60 s later: {err}"
    );
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains("VM e2e-down went down during the session (now stopped)"),
        "{err}"
    );
    assert!(err.contains("the end of its console:"), "{err}");
    assert!(b.run(&["vm", "delete", "e2e-down"]).status.success());
}

#[test]
fn a_name_clash_is_refused_before_anything_is_made() {
    let b = shared();
    let out = b.run(&["vm", "create", "--name", "e2e-clash", "--no-start"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let before = b.json(&["vm", "show", "e2e-clash"]);
    let dirs_before = b.vm_dirs();
    let out = b.run(&["vm", "run", "--rm", "--name", "e2e-clash", "--", "true"]);
    let err = text(&out).1;
    // banger's own failure, told apart from a command's status.
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("a VM named e2e-clash already exists"), "{err}");
    assert!(!err.contains("spec: "), "refused before planning: {err}");
    assert_eq!(b.vm_dirs(), dirs_before, "no disks made");
    // --rm did not delete the VM that owns the name.
    let after = b.json(&["vm", "show", "e2e-clash"]);
    assert_eq!(after["id"], before["id"]);
    assert_eq!(b.vm_names().iter().filter(|n| *n == "e2e-clash").count(), 1);
    assert!(b.run(&["vm", "delete", "e2e-clash"]).status.success());
}

#[test]
fn file_sync_and_credentials_reach_the_guest() {
    let b = shared();
    let h = home(b);
    let outside = b.root.join("outside");
    write(&outside.join("secret"), "TOPSECRET\n");
    write(&h.join("e2e-sync/file.txt"), "plain file\n");
    write(&h.join("e2e-sync/dir/a"), "a\n");
    write(&h.join("e2e-sync/dir/sub/b"), "b\n");
    write(&h.join("e2e-sync/tool"), "#!/bin/sh\necho tool\n");
    let link = |target: &Path, at: &Path| {
        let _ = std::fs::remove_file(at);
        std::os::unix::fs::symlink(target, at).expect("symlink");
    };
    link(&outside.join("secret"), &h.join("e2e-sync/dir/leak"));
    link(&outside.join("secret"), &h.join("e2e-sync/escape"));
    let cred = h.join(".claude/.credentials.json");
    write(&cred, "{\"token\":\"one\"}\n");
    struct RemoveCred(PathBuf);
    impl Drop for RemoveCred {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cred = RemoveCred(cred.clone());
    let _config = ConfigSwap::new(
        b,
        "[[file_sync]]\nhost = \"~/e2e-sync/file.txt\"\nguest = \"~/synced-file\"\n\
         [[file_sync]]\nhost = \"~/e2e-sync/dir\"\nguest = \"/root/synced-dir\"\n\
         [[file_sync]]\nhost = \"~/e2e-sync/tool\"\nguest = \"~/bin/tool\"\nmode = \"0755\"\n\
         [[file_sync]]\nhost = \"~/e2e-sync/escape\"\nguest = \"~/escape\"\n",
    );
    let dirs_before = b.vm_dirs();
    let script = "cat /root/synced-file /root/synced-dir/a /root/synced-dir/sub/b; \
         stat -c '%a %U %n' /root/synced-file /root/synced-dir /root/synced-dir/sub/b /root/bin/tool; \
         /root/bin/tool; \
         test -e /root/synced-dir/leak || echo no-leak; \
         test -e /root/escape || echo no-escape; \
         grep -rl TOPSECRET /root || echo secret-not-copied; \
         cat /root/.claude/.credentials.json; stat -c '%a %U' /root/.claude/.credentials.json";
    let out = b.run(&[
        "vm", "run", "--rm", "--name", "e2e-sync", "--", "sh", "-c", script,
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    assert_eq!(
        stdout,
        "plain file\na\nb\n\
         600 root /root/synced-file\n700 root /root/synced-dir\n600 root /root/synced-dir/sub/b\n\
         755 root /root/bin/tool\ntool\nno-leak\nno-escape\nsecret-not-copied\n\
         {\"token\":\"one\"}\n600 root\n",
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: file_sync: ~/e2e-sync/dir/leak is a symlink inside a synced directory; skipped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: file_sync[3]: ~/e2e-sync/escape resolves to")
            && stderr.contains("outside the home directory"),
        "{stderr}"
    );
    assert_gone(b, "e2e-sync", &dirs_before);

    // Credentials are synced again at every start.
    let ok = |args: &[&str]| {
        let out = b.run(args);
        assert!(out.status.success(), "banger {args:?}: {}", text(&out).1);
        text(&out).0
    };
    ok(&["vm", "create", "--name", "e2e-cred"]);
    let read = || {
        ok(&[
            "vm",
            "exec",
            "e2e-cred",
            "--",
            "cat",
            "/root/.claude/.credentials.json",
        ])
    };
    assert_eq!(read(), "{\"token\":\"one\"}\n");
    ok(&["vm", "stop", "e2e-cred"]);
    write(&cred, "{\"token\":\"two\"}\n");
    ok(&["vm", "start", "e2e-cred"]);
    assert_eq!(read(), "{\"token\":\"two\"}\n");
    ok(&["vm", "delete", "e2e-cred"]);
}

#[test]
fn a_bad_file_sync_entry_is_named_at_config_load() {
    let b = shared();
    let _config = ConfigSwap::new(
        b,
        "[[file_sync]]\nhost = \"/etc/passwd\"\nguest = \"~/p\"\n",
    );
    let out = b.run(&["vm", "run", "--rm", "--", "true"]);
    let err = text(&out).1;
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("file_sync[0].host") && err.contains("not inside the home directory"),
        "{err}"
    );
}

#[test]
fn a_vm_not_ready_in_time_is_kept_despite_rm() {
    let b = shared();
    let _config = ConfigSwap::new(b, "ready_timeout_secs = 1\n");
    let out = b.run(&["vm", "run", "--rm", "--name", "e2e-slow", "--", "true"]);
    let err = text(&out).1;
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("did not signal readiness within 1s")
            && err.contains("banger vm logs e2e-slow"),
        "{err}"
    );
    // The CLI is gone, and with it the --rm guard: the VM must stay.
    assert!(
        b.vm_names().iter().any(|n| n == "e2e-slow"),
        "the VM was not kept: {err}"
    );
    wait_until("the kept VM's console", Duration::from_secs(60), || {
        let logs = b.run(&["vm", "logs", "e2e-slow"]);
        logs.status.success() && text(&logs).0.contains("Linux version")
    });
    let del = b.run(&["vm", "delete", "e2e-slow"]);
    assert!(del.status.success(), "{}", text(&del).1);
    assert!(processes_mentioning("e2e-slow").is_empty(), "VMM left");
}
