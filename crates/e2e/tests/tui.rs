//! `banger tui` in a real terminal (tmux) against a real daemon and guest.

use banger_e2e::{Banger, shared, text, wait_until};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const PROMPT: &str = "tui-e2e$ ";
const VM: &str = "e2e-tui";

/// A tmux server of its own (own socket, no config) running one shell;
/// killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a detached 150x45 session running a bare bash with the
    /// installation's environment and a known prompt.
    fn start(b: &Banger) -> Tmux {
        let socket = b.root.join("tui-tmux.sock");
        let _ = std::fs::remove_file(&socket);
        let t = Tmux { socket };
        let out = Command::new("tmux")
            .args(["-S"])
            .arg(&t.socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "tui"])
            .args(["-x", "150", "-y", "45", "bash", "--norc", "--noprofile"])
            .env_remove("BANGER_SOCKET")
            .env_remove("TMUX")
            .envs(b.env_vars())
            .env("PS1", PROMPT)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .output()
            .expect("spawn tmux (apt-get install tmux)");
        assert!(out.status.success(), "tmux new-session: {}", text(&out).1);
        t.wait_for("the shell prompt", Duration::from_secs(20), |s| {
            s.contains(PROMPT.trim_end())
        });
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("spawn tmux");
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out).1);
        text(&out).0
    }

    /// The visible pane as text (`escapes`: with colour escape sequences).
    fn capture(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-t", "tui"];
        if escapes {
            args.push("-e");
        }
        self.tmux(&args)
    }

    /// Types `keys` literally.
    fn type_text(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", "tui", "-l", keys]);
    }

    /// Presses a named key (`Enter`, `C-c`, ...).
    fn press(&self, key: &str) {
        self.tmux(&["send-keys", "-t", "tui", key]);
    }

    /// Polls the pane until `cond` holds; returns that screen.
    fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let last = self.capture(false);
            if cond(&last) {
                return last;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; screen:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn vm_state(b: &Banger) -> String {
    b.json(&["vm", "show", VM])["state"]
        .as_str()
        .expect("state")
        .to_string()
}

/// The line of the VM's row in the list.
fn vm_row(screen: &str) -> Option<&str> {
    // Rows start at the list's left border, selected or not.
    let (selected, other) = (format!("│> {VM} "), format!("│  {VM} "));
    screen
        .lines()
        .find(|l| l.starts_with(&selected) || l.starts_with(&other))
}

#[test]
fn tui_lists_a_running_vm_stops_it_and_quits_to_the_shell() {
    let b = shared();
    let out = b.run(&["vm", "create", "--name", VM]);
    assert!(out.status.success(), "vm create: {}", text(&out).1);
    assert_eq!(vm_state(b), "running");

    let tmux = Tmux::start(b);
    let argv: Vec<String> = b
        .banger_argv(&["tui"])
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    tmux.type_text(&argv.join(" "));
    tmux.press("Enter");

    // The row: name, state, IP on the bridge, spec and an uptime.
    let screen = tmux.wait_for("the running VM's row", Duration::from_secs(60), |s| {
        vm_row(s).is_some_and(|r| r.contains("running") && r.contains("172.16.0."))
    });
    let row = vm_row(&screen).expect("row");
    assert!(row.contains("> "), "the only VM is selected: {row}");
    assert!(
        screen.contains("x stop") && screen.contains("q quit"),
        "{screen}"
    );

    // Details get stats from the daemon and ports from the guest agent;
    // the log pane follows the serial console.
    tmux.wait_for(
        "stats, ports and the console log",
        Duration::from_secs(60),
        |s| {
            // Ports answered (sshd may not listen yet on a slow boot).
            s.contains("pid ")
                && s.contains(" up ")
                && (s.contains("ports  none listening") || s.contains("│ports "))
                && s.contains(&format!("console log: {VM}"))
                && !s.contains("(empty)")
        },
    );

    tmux.type_text("x");
    wait_until("the VM to stop", Duration::from_secs(120), || {
        vm_state(b) == "stopped"
    });
    let screen = tmux.wait_for("the stopped row", Duration::from_secs(30), |s| {
        vm_row(s).is_some_and(|r| r.contains("stopped")) && s.contains(&format!("stopped {VM}"))
    });
    save_capture(b, &screen, &tmux.capture(true));

    tmux.type_text("q");
    let screen = tmux.wait_for("the shell after q", Duration::from_secs(20), |s| {
        vm_row(s).is_none()
            && s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with(PROMPT.trim_end()))
    });
    assert!(!screen.contains("q quit"), "TUI left on screen:\n{screen}");
    tmux.type_text("echo tui-exit=$?");
    tmux.press("Enter");
    tmux.wait_for("the TUI's exit status", Duration::from_secs(10), |s| {
        s.contains("tui-exit=0\n")
    });

    let del = b.run(&["vm", "delete", VM]);
    assert!(del.status.success(), "vm delete: {}", text(&del).1);
}

/// Keeps the last TUI screen (plain and with colours) in the e2e root, for
/// the docs.
fn save_capture(b: &Banger, plain: &str, ansi: &str) {
    let _ = std::fs::write(b.root.join("tui-capture.txt"), plain);
    let _ = std::fs::write(b.root.join("tui-capture.ansi"), ansi);
}
