//! The web UI (headless Chromium against a real daemon and guest) and shell
//! completion (scripts load in their shells; live names from the daemon).

use banger_e2e::{Banger, shared, text};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The web UI's address in these tests (inside the installation's network
/// namespace), set through config to exercise `web_listen_addr`.
const WEB: &str = "127.0.0.1:7791";

fn ok(b: &Banger, args: &[&str]) -> String {
    let out = b.run(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "banger {args:?}: {stderr}");
    stdout
}

fn state(b: &Banger, vm: &str) -> String {
    b.json(&["vm", "show", vm])["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Deletes the named VMs when the test ends, passed or not.
struct Cleanup<'a>(&'a Banger, Vec<&'static str>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for vm in &self.1 {
            let _ = self.0.run(&["vm", "delete", vm]);
        }
    }
}

/// Where screenshots and browser logs of a run go.
fn artifacts(b: &Banger) -> PathBuf {
    let dir = b.root.join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// `curl` inside the installation's namespace: (HTTP status, body).
fn curl(b: &Banger, args: &[&str]) -> (u16, String) {
    let mut a = vec!["-sS", "--max-time", "20", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = b.in_netns("curl", &a).output().expect("spawn curl");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "curl {args:?}: {stderr}");
    let (body, code) = stdout.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status code"), body.to_string())
}

/// `curl` as another local user (uid 65534, `nobody`) inside the
/// installation's namespace: (HTTP status, body).
fn curl_as_stranger(b: &Banger, url: &str) -> (u16, String) {
    let out = b
        .in_netns(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                url,
            ],
        )
        .output()
        .expect("spawn setpriv curl");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "curl as nobody {url}: {stderr}");
    let (body, code) = stdout.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status code"), body.to_string())
}

/// Headless Chromium in the installation's network namespace, driven over
/// the DevTools protocol on a pipe (fds 3 and 4), which needs no port and
/// crosses the namespace boundary.
struct Browser {
    child: Child,
    to_browser: std::io::PipeWriter,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    fn launch(b: &Banger, profile: &Path) -> Browser {
        let _ = std::fs::remove_dir_all(profile);
        std::fs::create_dir_all(profile).expect("profile dir");
        let (cmd_r, cmd_w) = std::io::pipe().expect("pipe");
        let (resp_r, resp_w) = std::io::pipe().expect("pipe");
        let log = std::fs::File::create(profile.join("chromium.log")).expect("browser log");
        let user_data = format!("--user-data-dir={}", profile.join("data").display());
        let mut cmd = b.in_netns(
            "chromium",
            &[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
                &user_data,
                "about:blank",
            ],
        );
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let (r, w) = (cmd_r.as_raw_fd(), resp_w.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Move both ends out of the way first, so that dup2 onto 3
                // cannot clobber the other one.
                let r2 = libc::fcntl(r, libc::F_DUPFD, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn chromium");
        drop((cmd_r, resp_w));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(resp_r);
            loop {
                let mut msg = Vec::new();
                match reader.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        msg.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&msg)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser: cmd_w,
            from_browser: rx,
            next_id: 0,
            session: None,
        };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        browser.session = Some(
            attached["sessionId"]
                .as_str()
                .expect("session id")
                .to_string(),
        );
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser
    }

    /// Sends one command and waits (up to a minute) for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("sending {method} to chromium: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url }));
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
    }

    /// Evaluates `expr` in the page and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the page.
    fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(&format!("!!({expr})")) == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                // The page without its (long) log tail.
                let body = self.eval(
                    "[...document.querySelectorAll('header, main .title, main .card:not(.wide), main table, #ops')]\
                     .map(e => e.innerText).join('\\n')",
                );
                let body = body.as_str().unwrap_or_default();
                panic!("timed out after {timeout:?} waiting for {what}; the page shows:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session = None;
        let _ = serde_json::to_vec(&json!({ "id": 0, "method": "Browser.close" })).map(|mut m| {
            m.push(0);
            self.to_browser.write_all(&m)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn web_ui_shows_the_vm_stops_it_and_refuses_foreign_requests() {
    let b = shared();
    b.write_config(&format!("web_listen_addr = \"{WEB}\"\n"));
    // The next command starts a daemon that reads this config.
    ok(b, &["daemon", "stop"]);
    let _cleanup = Cleanup(b, vec!["web-e2e"]);
    ok(b, &["vm", "create", "--name", "web-e2e"]);
    assert_eq!(state(b, "web-e2e"), "running");
    // A guest web server, to show up as a link to its .vm name later
    // (python starts slowly under TCG).
    ok(
        b,
        &[
            "vm",
            "exec",
            "web-e2e",
            "--",
            "sh",
            "-c",
            "cd /tmp && setsid -f python3 -m http.server 8080 >/dev/null 2>&1",
        ],
    );

    // The page embeds the token; the API is the daemon's, under /api.
    let base = format!("http://{WEB}");
    let (code, page) = curl(b, &[&format!("{base}/")]);
    assert_eq!(code, 200, "{page}");
    let token = page
        .split("name=\"banger-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("token in the page")
        .to_string();
    assert_eq!(token.len(), 64, "{token}");
    let (code, vms) = curl(b, &[&format!("{base}/api/v1/vms")]);
    assert_eq!(code, 200, "{vms}");
    assert!(vms.contains("\"web-e2e\""), "{vms}");
    let (code, _) = curl(b, &["-H", "Host: localhost:7791", &format!("{base}/")]);
    assert_eq!(code, 200);

    // Another local user reaches the port but not the UI: no page (and so
    // no token), no API, not even with the token.
    for path in ["/", "/api/v1/vms", "/api/v1/vms/web-e2e"] {
        let (code, body) = curl_as_stranger(b, &format!("{base}{path}"));
        assert_eq!(code, 403, "{path}: {body}");
        assert!(!body.contains(&token), "{path}: {body}");
    }
    let out = b
        .in_netns(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                &format!("x-banger-token: {token}"),
                &format!("{base}/api/v1/vms/web-e2e/stop"),
            ],
        )
        .output()
        .expect("spawn setpriv curl");
    assert_eq!(text(&out).0, "403", "{}", text(&out).1);
    assert_eq!(state(b, "web-e2e"), "running");

    // DNS rebinding: a foreign Host is refused, for the page and the API.
    for path in ["/", "/api/v1/vms"] {
        let (code, body) = curl(
            b,
            &[
                "-H",
                "Host: attacker.example:7791",
                &format!("{base}{path}"),
            ],
        );
        assert_eq!(code, 403, "{path}: {body}");
    }
    // State changes need the token; a refused stop leaves the VM running.
    let stop = format!("{base}/api/v1/vms/web-e2e/stop");
    let (code, body) = curl(b, &["-X", "POST", &stop]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("x-banger-token"), "{body}");
    let (code, _) = curl(b, &["-X", "POST", "-H", "x-banger-token: 0000", &stop]);
    assert_eq!(code, 403);
    let with_token = format!("x-banger-token: {token}");
    let (code, _) = curl(
        b,
        &[
            "-X",
            "POST",
            "-H",
            &with_token,
            "-H",
            "Host: attacker.example:7791",
            &stop,
        ],
    );
    assert_eq!(code, 403);
    let (code, _) = curl(
        b,
        &[
            "-X",
            "POST",
            "-H",
            &with_token,
            "-H",
            "Origin: http://attacker.example",
            &stop,
        ],
    );
    assert_eq!(code, 403);
    assert_eq!(state(b, "web-e2e"), "running");

    // A real browser: the VM appears, its page shows the console, and the
    // stop button stops it.
    let art = artifacts(b);
    let mut browser = Browser::launch(b, &art.join("chromium"));
    browser.navigate(&format!("{base}/#/"));
    browser.wait_for(
        "the VM row, running",
        "document.querySelector('tr[data-vm=\"web-e2e\"]')?.dataset.state === 'running'",
        Duration::from_secs(30),
    );
    browser.wait_for(
        "the daemon version in the header",
        "document.getElementById('daemon').textContent.includes('bangerd')",
        Duration::from_secs(10),
    );
    browser.screenshot(&art.join("web-ui.png"));

    browser.navigate(&format!("{base}/#/vm/web-e2e"));
    browser.wait_for(
        "the serial console tail",
        "document.getElementById('log')?.textContent.includes('Linux version')",
        Duration::from_secs(30),
    );
    browser.wait_for(
        "VMM and guest stats",
        "document.getElementById('stats').textContent.includes('VMM CPU') && \
         document.getElementById('stats').textContent.includes('Guest memory')",
        Duration::from_secs(60),
    );
    browser.wait_for(
        "a link to the guest's web server",
        "document.querySelector('#ports a[href=\"http://web-e2e.vm:8080/\"]')",
        Duration::from_secs(240),
    );
    browser.screenshot(&art.join("web-ui-vm.png"));

    let clicked = browser.eval(
        "(() => { const b = document.querySelector('.title button[data-action=\"stop\"][data-vm=\"web-e2e\"]'); \
         if (!b || b.disabled) return false; b.click(); return true; })()",
    );
    assert_eq!(clicked, json!(true), "no enabled stop button");
    browser.wait_for(
        "the VM to show as stopped",
        "document.querySelector('.title[data-vm=\"web-e2e\"]')?.dataset.state === 'stopped'",
        Duration::from_secs(120),
    );
    browser.wait_for(
        "the stop operation to finish",
        "[...document.querySelectorAll('#ops-list .op-done .op-title')].some(e => e.textContent === 'stop web-e2e')",
        Duration::from_secs(30),
    );
    drop(browser);
    assert_eq!(state(b, "web-e2e"), "stopped");
    eprintln!("screenshots: {}", art.display());
}

#[test]
fn completion_scripts_load_and_complete_live_names() {
    let b = shared();
    let dir = artifacts(b).join("completion");
    std::fs::create_dir_all(&dir).expect("dir");

    for (shell, checker) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let script = ok(b, &["completion", shell]);
        assert!(script.contains("COMPLETE="), "{shell}: {script}");
        let path = dir.join(format!("banger.{shell}"));
        std::fs::write(&path, &script).expect("write script");
        let out = std::process::Command::new(checker)
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{checker}: {e} (apt-get install {checker})"));
        assert!(out.status.success(), "{checker} -n: {}", text(&out).1);
    }
    let ps = ok(b, &["completion", "powershell"]);
    assert!(ps.contains("Register-ArgumentCompleter"), "{ps}");
    let help = ok(b, &["completion", "--help"]);
    for needle in [
        "source <(banger completion bash)",
        "~/.zfunc/_banger",
        "fish/completions/banger.fish",
        "$PROFILE",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }

    let _cleanup = Cleanup(b, vec!["comp-alpha", "comp-beta"]);
    ok(b, &["vm", "create", "--name", "comp-alpha", "--no-start"]);
    ok(b, &["vm", "create", "--name", "comp-beta", "--no-start"]);

    // What a <TAB> asks: `COMPLETE=bash banger -- banger vm stop <word>`.
    let complete = |b: &Banger, shell: &str, words: &[&str]| {
        let mut args = vec!["--", "banger"];
        args.extend_from_slice(words);
        let out = b
            .cmd(&args)
            .env("COMPLETE", shell)
            .env("_CLAP_COMPLETE_INDEX", words.len().to_string())
            .env("_CLAP_IFS", "\n")
            .output()
            .expect("spawn banger");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{words:?}: {stderr}");
        assert_eq!(stderr, "", "{words:?}");
        stdout
    };
    let names = complete(b, "bash", &["vm", "stop", ""]);
    let names: Vec<&str> = names.lines().collect();
    assert!(
        names.contains(&"comp-alpha") && names.contains(&"comp-beta"),
        "{names:?}"
    );
    assert_eq!(complete(b, "bash", &["vm", "stop", "comp-a"]), "comp-alpha");
    let fish = complete(b, "fish", &["vm", "ssh", "comp-b"]);
    assert!(fish.starts_with("comp-beta\tstopped VM"), "{fish}");
    let images = b.json(&["image", "list"]);
    let image = images[0]["name"].as_str().expect("an image").to_string();
    let offered = complete(b, "bash", &["vm", "create", "--image", ""]);
    assert!(offered.lines().any(|l| l == image), "{offered}");

    // The bash script itself, as bash runs it on <TAB>.
    let socket = b.json(&["daemon", "status"])["socket"]
        .as_str()
        .expect("socket")
        .to_string();
    let script = format!(
        "source {}\nCOMP_WORDS=(banger vm delete comp-)\nCOMP_CWORD=3\nCOMP_TYPE=9\n\
         _clap_complete_banger banger comp- delete\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        dir.join("banger.bash").display()
    );
    let out = b
        .in_netns("bash", &["-c", &script])
        .env("BANGER_SOCKET", &socket)
        .output()
        .expect("spawn bash");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let mut got: Vec<&str> = stdout.lines().collect();
    got.sort();
    assert_eq!(got, ["comp-alpha", "comp-beta"], "{stderr}");

    // No daemon: names complete to nothing, quietly (only flags, no file
    // names even where files match), and no daemon is started for it.
    let idle = Banger::isolated("completion");
    let idle_complete = |word: &str| {
        let out = idle
            .cmd(&["--", "banger", "vm", "stop", word])
            .current_dir(&dir)
            .env("COMPLETE", "bash")
            .env("_CLAP_COMPLETE_INDEX", "3")
            .env("_CLAP_IFS", "\n")
            .output()
            .expect("spawn banger");
        assert!(out.status.success());
        let (stdout, stderr) = text(&out);
        assert_eq!(stderr, "");
        stdout
    };
    let offered = idle_complete("");
    assert!(offered.lines().all(|l| l.starts_with('-')), "{offered}");
    assert_eq!(idle_complete("banger."), "", "files of the cwd offered");
    assert!(
        !idle.state_dir().join("bangerd.lock").exists(),
        "completion started a daemon"
    );
}
