//! `vm exec` (exit codes, stdin, tty, signals), `vm session ...` and
//! `vm acp` against one real guest, created for this file.

use banger_e2e::{Banger, shared, text, wait_until};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VM: &str = "e2e-exec";
/// Prints the pids of `sleep` processes in the guest (procps may be absent).
const GUEST_SLEEPS: &str =
    "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = sleep ] && echo $p; done; true";
const LONG: Duration = Duration::from_secs(120);

/// Deletes the VM however the test ends.
struct VmGuard(&'static Banger);

impl Drop for VmGuard {
    fn drop(&mut self) {
        let _ = self.0.run(&["vm", "delete", VM]);
    }
}

fn exec(b: &Banger, cmd: &str) -> std::process::Output {
    b.run(&["vm", "exec", VM, "--", "sh", "-c", cmd])
}

#[test]
fn exec_sessions_and_acp_on_one_guest() {
    let b = shared();
    let _ = b.run(&["vm", "delete", VM]);
    let out = b.run(&["vm", "create", "--name", VM]);
    assert!(out.status.success(), "create: {}", text(&out).1);
    let _guard = VmGuard(b);

    ssh_waits_for_sshd(b);
    exit_codes(b);
    exec_without_dashes(b);
    logs_tail_and_since(b);
    stdin_is_piped_intact(b);
    tty_size_and_resize(b);
    sigint_ends_the_guest_process(b);
    sessions_survive_the_cli(b);
    attach_bridges_a_pipe_session(b);
    acp_bridges_stdio(b);
}

/// Right after `vm create` the agent is ready but sshd may not be yet:
/// `vm ssh` waits for it (saying so) instead of failing.
fn ssh_waits_for_sshd(b: &Banger) {
    let out = b.run(&["vm", "ssh", VM, "echo", "ssh-ok"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "ssh-ok\n", "{stderr}");
    for line in stderr.lines() {
        assert!(
            line.starts_with(&format!("banger: waiting for {VM}'s sshd on ")),
            "unexpected stderr: {stderr}"
        );
    }
}

fn exit_codes(b: &Banger) {
    for (cmd, code) in [("true", 0), ("exit 1", 1), ("kill -9 $$", 137)] {
        let out = exec(b, cmd);
        assert_eq!(out.status.code(), Some(code), "{cmd}: {}", text(&out).1);
    }
    // Like docker: 127 not found, 126 not executable, 125 banger failed.
    for (argv, code, says) in [
        (
            &["no-such-command"][..],
            127,
            "no-such-command: command not found",
        ),
        (
            &["/etc/hostname"][..],
            126,
            "/etc/hostname: Permission denied",
        ),
    ] {
        let mut args = vec!["vm", "exec", VM, "--"];
        args.extend_from_slice(argv);
        let out = b.run(&args);
        let stderr = text(&out).1;
        assert_eq!(out.status.code(), Some(code), "{argv:?}: {stderr}");
        assert!(stderr.contains(says), "{argv:?}: {stderr}");
    }
    let out = b.run(&["vm", "exec", "no-such-vm", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out).1);
    let help = text(&b.run(&["vm", "exec", "--help"])).0;
    for line in ["125", "126", "127"] {
        assert!(help.contains(line), "{help}");
    }
}

/// `vm exec NAME CMD...` needs no `--` (the command's own flags are its).
fn exec_without_dashes(b: &Banger) {
    let out = b.run(&["vm", "exec", VM, "ls", "-d", "/etc"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "/etc\n");
    let out = b.run(&["vm", "exec", VM, "--cwd", "/tmp", "sh", "-c", "pwd; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out).1);
    assert_eq!(text(&out).0, "/tmp\n");
}

/// `vm logs --tail N` and `--since TIME`, on the guest's console.
fn logs_tail_and_since(b: &Banger) {
    let logs = |args: &[&str]| {
        let mut a = vec!["vm", "logs", VM];
        a.extend_from_slice(args);
        let out = b.run(&a);
        assert!(out.status.success(), "{a:?}: {}", text(&out).1);
        text(&out).0
    };
    let tail = logs(&["--tail", "3"]);
    assert_eq!(tail.lines().count(), 3, "{tail}");
    let all = logs(&[]);
    assert!(all.lines().count() > 3, "{all}");
    assert!(
        all.contains(&tail),
        "the tail is not the log's end:\n{tail}"
    );

    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
    };
    let console = |line: &str| {
        let out = exec(b, &format!("echo {line} > /dev/console"));
        assert!(out.status.success(), "{}", text(&out).1);
    };
    console("e2e-mark-before");
    wait_until("the first mark in the console log", LONG, || {
        logs(&[]).contains("e2e-mark-before")
    });
    // Once the daemon has noted when it was written (within a second), a
    // later --since leaves it out.
    let mut since = String::new();
    wait_until("--since to leave the first mark out", LONG, || {
        since = format!("{:.3}", now());
        !logs(&["--since", &since]).contains("e2e-mark-before")
    });
    console("e2e-mark-after");
    wait_until("the second mark after --since", LONG, || {
        logs(&["--since", &since]).contains("e2e-mark-after")
    });
    let recent = logs(&["--since", &since]);
    assert!(!recent.contains("e2e-mark-before"), "{recent}");
    let both = logs(&["--since", "10m"]);
    assert!(
        both.contains("e2e-mark-before") && both.contains("e2e-mark-after"),
        "{both}"
    );
    assert_eq!(logs(&["--since", &since, "--tail", "1"]).lines().count(), 1);
}

fn stdin_is_piped_intact(b: &Banger) {
    use sha2::Digest;
    // 50 MB of varied bytes (not just zeros).
    let data: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = format!("{:x}", sha2::Sha256::digest(&data));
    let mut child = b
        .cmd(&["vm", "exec", VM, "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("exec output");
    writer.join().expect("writer").expect("write stdin");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.split_whitespace().next(), Some(want.as_str()));
}

/// The output of a process on a pty, collected by a reader thread.
struct PtyOutput(Arc<Mutex<Vec<u8>>>);

impl PtyOutput {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

/// `b.cmd(args)` on a new pseudo-terminal of `rows` x `cols`.
fn spawn_on_pty(
    b: &Banger,
    args: &[&str],
    rows: u16,
    cols: u16,
) -> (pty_process::blocking::Pty, std::process::Child, PtyOutput) {
    let std_cmd = b.cmd(args);
    let mut cmd =
        pty_process::blocking::Command::new(std_cmd.get_program()).args(std_cmd.get_args());
    for (k, v) in std_cmd.get_envs() {
        cmd = match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let (pty, pts) = pty_process::blocking::open().expect("open pty");
    pty.resize(pty_process::Size::new(rows, cols))
        .expect("size");
    let child = cmd.spawn(pts).expect("spawn on pty");
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let mut reader = std::fs::File::from(pty.as_fd().try_clone_to_owned().expect("clone pty fd"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    (pty, child, PtyOutput(out))
}

fn tty_size_and_resize(b: &Banger) {
    let (mut pty, mut child, out) = spawn_on_pty(
        b,
        &[
            "vm",
            "exec",
            VM,
            "--",
            "sh",
            "-c",
            "tty; stty size; while read l; do stty size; done",
        ],
        33,
        111,
    );
    wait_until("the guest tty and size", LONG, || {
        let t = out.text();
        t.contains("/dev/pts/") && t.contains("33 111")
    });
    pty.resize(pty_process::Size::new(44, 122)).expect("resize");
    // Each Enter makes the guest print its size again; the resize is
    // forwarded on SIGWINCH, so repeat until it shows.
    wait_until("the resized guest tty", LONG, || {
        let _ = pty.write_all(b"\r");
        std::thread::sleep(Duration::from_millis(400));
        out.text().contains("44 122")
    });
    // Ctrl-D at the start of a line ends the guest's `read` loop.
    pty.write_all(&[4]).expect("eof");
    wait_until("exec on a tty to exit", LONG, || {
        child.try_wait().expect("wait").is_some()
    });
    assert_eq!(
        child.wait().expect("status").code(),
        Some(0),
        "{}",
        out.text()
    );
}

fn sigint_ends_the_guest_process(b: &Banger) {
    let mut child = b
        .cmd(&[
            "vm",
            "exec",
            VM,
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut first = [0u8; 6];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("ready");
    assert_eq!(&first, b"ready\n");
    // `ip netns exec` runs banger as its child (same pid after exec).
    let pid = child.id() as i32;
    // SAFETY: kill(2) of the process this test spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "SIGINT-ed sleep should exit 130");
    let out = exec(b, GUEST_SLEEPS);
    assert_eq!(text(&out).0.trim(), "", "sleep still runs in the guest");
}

fn sessions_survive_the_cli(b: &Banger) {
    let out = b.run(&[
        "vm",
        "session",
        "start",
        VM,
        "--name",
        "bg",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]);
    assert!(out.status.success(), "start: {}", text(&out).1);
    // The CLI has exited; the session runs on.
    let list = b.json(&["vm", "session", "list", VM]);
    let s = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "bg")
        .unwrap_or_else(|| panic!("no session bg in {list}"))
        .clone();
    assert!(s["exit"].is_null(), "{s}");
    wait_until("the session's log", LONG, || {
        text(&b.run(&["vm", "session", "logs", VM, "bg"]))
            .0
            .contains("started")
    });
    let out = b.run(&["vm", "session", "stop", VM, "bg"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stop: {stderr}");
    assert!(stdout.contains("signal 15"), "{stdout}");
    let out = exec(b, GUEST_SLEEPS);
    assert_eq!(text(&out).0.trim(), "", "the session's sleep still runs");
    let list = b.json(&["vm", "session", "list", VM]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

fn attach_bridges_a_pipe_session(b: &Banger) {
    let out = b.run(&[
        "vm",
        "session",
        "start",
        VM,
        "--name",
        "echo",
        "--",
        "sh",
        "-c",
        "while read l; do echo got $l; done",
    ]);
    assert!(out.status.success(), "start: {}", text(&out).1);
    let mut child = b
        .cmd(&["vm", "session", "attach", VM, "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn attach");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\n").expect("write");
    let mut got = [0u8; 10];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut got)
        .expect("the session's answer");
    assert_eq!(&got, b"got hello\n");
    // Ctrl-C detaches; the session keeps running.
    // SAFETY: kill(2) of the process this test spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("attach exit");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    drop(stdin);
    let list = b.json(&["vm", "session", "list", VM]);
    let s = &list.as_array().expect("array")[0];
    assert!(s["name"] == "echo" && s["exit"].is_null(), "{list}");
    let out = b.run(&["vm", "session", "stop", VM, "echo"]);
    assert!(out.status.success(), "stop: {}", text(&out).1);
}

fn acp_bridges_stdio(b: &Banger) {
    let cfg = b.config_dir().join("config.toml");
    let saved = std::fs::read_to_string(&cfg).ok();
    b.write_config(&format!(
        "{}acp_command = [\"cat\"]\n",
        saved.clone().unwrap_or_default()
    ));
    let mut child = b
        .cmd(&["vm", "acp", VM])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn acp");
    let msg = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\"}\n";
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(msg)
        .expect("write");
    let out = child.wait_with_output().expect("acp output");
    match saved {
        Some(t) => b.write_config(&t),
        None => {
            let _ = std::fs::remove_file(&cfg);
        }
    }
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.as_bytes(), msg);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Bytes in the files of a directory tree, as allocated on disk.
fn dir_kib(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-sk", "--apparent-size"])
        .arg(dir)
        .output()
        .expect("du");
    text(&out)
        .0
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du size")
}

/// A guest that floods its serial console and an exec's stdout, with a
/// host reader that stops reading: the guest's writer is held up (the
/// daemon buffers a bounded window, not the stream), the daemon's memory
/// stays put and the console log is rotated at its cap.
#[test]
fn a_flooding_guest_leaves_the_daemon_and_the_vm_dir_bounded() {
    const FLOOD: &str = "e2e-flood";
    let b = shared();
    let _ = b.run(&["vm", "delete", FLOOD]);
    let out = b.run(&["vm", "create", "--name", FLOOD]);
    assert!(out.status.success(), "create: {}", text(&out).1);
    struct Del(&'static Banger);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = self.0.run(&["vm", "delete", "e2e-flood"]);
        }
    }
    let _del = Del(b);
    let daemon = b.json(&["daemon", "status"])["pid"]
        .as_u64()
        .expect("daemon pid");
    let vm_dir = std::path::PathBuf::from(
        b.json(&["vm", "show", FLOOD])["dir"]
            .as_str()
            .expect("vm dir"),
    );
    let before = rss_kib(daemon);

    // 200 MiB on stdout into a reader that never reads.
    let mut stalled = b
        .cmd(&[
            "vm",
            "exec",
            FLOOD,
            "--",
            "sh",
            "-c",
            // /root, not /tmp: the guest may still be mounting its /tmp.
            "head -c 200M /dev/zero & echo $! > /root/flood.pid; wait $!; touch /root/flood.done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the flood");

    // The guest writer's progress (bytes written), until it stops moving
    // (held up by flow control) or it is done (nothing held it up).
    let written = |b: &Banger| -> (Option<u64>, bool) {
        let out = exec_in(
            b,
            FLOOD,
            "test -e /root/flood.done && echo done; p=$(cat /root/flood.pid) && sed -n 's/^wchar: //p' /proc/$p/io",
        );
        let out = text(&out).0;
        (
            out.lines().find_map(|l| l.trim().parse().ok()),
            out.lines().any(|l| l == "done"),
        )
    };
    let mut last = None;
    let mut plateau = None;
    wait_until("the guest's stdout writer to stop", LONG, || {
        let (now, done) = written(b);
        if done {
            plateau = Some(200 << 20);
            return true;
        }
        if now.is_some() && now == last {
            plateau = now;
            return true;
        }
        last = now;
        std::thread::sleep(Duration::from_secs(1));
        false
    });
    let plateau = plateau.expect("plateau");
    assert!(
        plateau < 32 << 20,
        "the guest wrote {plateau} bytes to a reader that reads nothing: the host buffered them"
    );
    let grown = rss_kib(daemon).saturating_sub(before);
    assert!(grown < 64 * 1024, "the daemon grew by {grown} KiB");

    let _ = stalled.kill();
    let _ = stalled.wait();

    // The console: the guest's serial port runs at tens of KiB/s under
    // TCG, so its flood is played by appending to the log as the VMM does
    // (24 MiB, three times the cap); the daemon rotates it while the VM
    // runs, and the VMM's next lines land at the start of the new log.
    let console = vm_dir.join("console.log");
    {
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .expect("console.log");
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        for _ in 0..24 * 1024 {
            log.write_all(&line).expect("flood the console log");
        }
    }
    let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    wait_until("the console log to be rotated", LONG, || {
        vm_dir.join("console.log.1").is_file() && len(&console) < 8 << 20
    });
    let rotated_len = len(&console);
    let out = exec_in(b, FLOOD, "echo banger-after-rotation > /dev/ttyS0");
    assert!(out.status.success(), "{}", text(&out).1);
    wait_until("the guest's next console line", LONG, || {
        std::fs::read(&console)
            .is_ok_and(|t| String::from_utf8_lossy(&t).contains("banger-after-rotation"))
    });
    // Appended after what is there, not at the VMM's old offset (which
    // would leave a sparse file of the pre-rotation size).
    assert!(
        len(&console) < rotated_len + 64 * 1024,
        "the VMM kept writing at its old offset: {} bytes after rotation, {} now",
        rotated_len,
        len(&console)
    );
    let kib = dir_kib(&vm_dir) - dir_kib_of_disks(&vm_dir);
    assert!(kib < 20 * 1024, "{kib} KiB besides the disks");
    let grown = rss_kib(daemon).saturating_sub(before);
    assert!(grown < 64 * 1024, "the daemon grew by {grown} KiB");
}

fn exec_in(b: &Banger, vm: &str, cmd: &str) -> std::process::Output {
    b.run(&["vm", "exec", vm, "--", "sh", "-c", cmd])
}

/// Apparent size of the VM's disk images, which the guest fills as it likes.
fn dir_kib_of_disks(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("vm dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "ext4"))
        .map(|e| e.metadata().map(|m| m.len() / 1024).unwrap_or(0))
        .sum()
}
