//! Harness for end-to-end tests: runs the built `banger` as a user would,
//! against its own daemon and state under one e2e root.
//!
//! Needs `BANGER_BIN_DIR` (the `build/bin` of `scripts/build.sh`). The e2e
//! root (`BANGER_E2E_ROOT`, default `/tmp/banger-e2e`) keeps the built image
//! between runs; it is wiped when the agent binary changes, so guests always
//! run the agent under test.
//!
//! Every installation runs its daemon (and so its bridge, TAPs, NAT rules
//! and DNS server) inside a network namespace of its own, made here
//! (`ip netns add`): `banger` is always started through `ip netns exec`,
//! and the daemon it starts inherits the namespace. Nothing a test does
//! touches the host's own network namespace. The one exception is the
//! default image, built once outside the namespace (mmdebstrap needs the
//! Debian mirror) by a daemon in user-mode networking, which creates no
//! links. A second root may borrow that image instead of building its own
//! (`BANGER_E2E_IMAGE_FROM=<other root>`): `scripts/test.sh` runs the suite
//! in two such lanes at once.

pub mod kvm_host;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One isolated banger installation: its binaries, its XDG directories
/// and its network namespace.
pub struct Banger {
    pub bin_dir: PathBuf,
    pub root: PathBuf,
    /// The network namespace its daemon runs in.
    pub netns: String,
    /// Delete the namespace and the root when dropped (throwaway installations).
    owns_netns: bool,
}

static SHARED: OnceLock<Banger> = OnceLock::new();

/// The shared installation used by tests that boot guests (built image reused).
pub fn shared() -> &'static Banger {
    SHARED.get_or_init(|| {
        let root = std::env::var_os("BANGER_E2E_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/banger-e2e"));
        let b = Banger {
            bin_dir: bin_dir(),
            netns: netns_name(&root),
            root,
            owns_netns: false,
        };
        b.reset_if_agent_changed();
        b.ensure_netns();
        // Before anything starts the daemon (registering another root's
        // image does): it reads its config once. Rewritten even when it
        // exists, so a root made before `warm_start` existed gets it
        // pinned too.
        let config = std::fs::read_to_string(b.config_dir().join("config.toml"));
        b.write_config(&config.unwrap_or_default());
        b.build_default_image_outside_netns();
        b.delete_leftover_vms();
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_shared_daemon) };
        b
    })
}

extern "C" fn stop_shared_daemon() {
    if let Some(b) = SHARED.get() {
        let _ = b
            .cmd(&["daemon", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("BANGER_BIN_DIR").map(PathBuf::from).expect(
        "BANGER_BIN_DIR is not set: run the e2e tests through scripts/test.sh (it builds build/bin first)",
    );
    for b in ["banger", "bangerd", "banger-agent"] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: run scripts/build.sh",
            dir.join(b).display()
        );
    }
    dir
}

pub(crate) fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    format!("{:x}", h.finalize())
}

impl Banger {
    /// A throwaway installation under a fresh temporary root (no image).
    pub fn isolated(tag: &str) -> Banger {
        let root = std::env::temp_dir().join(format!("banger-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let b = Banger {
            bin_dir: bin_dir(),
            netns: netns_name(&root),
            root,
            owns_netns: true,
        };
        b.ensure_netns();
        b
    }

    /// Creates this installation's network namespace (loopback up) unless
    /// it exists.
    fn ensure_netns(&self) {
        if !Path::new("/run/netns").join(&self.netns).exists() {
            run_ip(&["netns", "add", &self.netns]);
        }
        run_ip(&["-n", &self.netns, "link", "set", "lo", "up"]);
    }

    /// Builds the default image with a daemon outside the namespace (see the
    /// module docs), then stops that daemon. Idempotent: an existing image
    /// is kept.
    fn build_default_image_outside_netns(&self) {
        let marker = "image-built";
        if self.root.join(marker).exists() {
            return;
        }
        if let Some(from) = std::env::var_os("BANGER_E2E_IMAGE_FROM") {
            self.register_image_of(Path::new(&from));
            std::fs::write(self.root.join(marker), "").expect("image marker");
            return;
        }
        self.build_image_outside_netns(marker, &["image", "build"]);
    }

    /// Runs `banger build_args...` (an image build) with a daemon outside
    /// the namespace in user-mode networking (mmdebstrap needs the Debian
    /// mirror), then stops that daemon; once per root (`marker`, a file
    /// name in the root, records it).
    pub fn build_image_outside_netns(&self, marker: &str, build_args: &[&str]) {
        let marker = self.root.join(marker);
        if marker.exists() {
            return;
        }
        // A daemon already running in the namespace would get the build.
        let stop = self.run(&["daemon", "stop"]);
        assert!(stop.status.success(), "daemon stop: {}", text(&stop).1);
        let cfg = self.config_dir().join("config.toml");
        let saved = std::fs::read_to_string(&cfg).ok();
        // No listener in the host's namespace: no DNS port, no web UI.
        self.write_config(
            "network = \"user\"\ndns_listen_addr = \"127.0.0.1:0\"\nweb_listen_addr = \"\"\n",
        );
        let out = self
            .env(Command::new(self.bin_dir.join("banger")))
            .args(build_args)
            .output()
            .expect("spawn banger image build");
        let stop = self
            .env(Command::new(self.bin_dir.join("banger")))
            .args(["daemon", "stop"])
            .output()
            .expect("spawn banger daemon stop");
        match saved {
            Some(t) => std::fs::write(&cfg, t).expect("restore config"),
            None => std::fs::remove_file(&cfg).expect("remove config"),
        }
        assert!(
            out.status.success(),
            "banger {build_args:?} failed: {}",
            text(&out).1
        );
        assert!(stop.status.success(), "daemon stop: {}", text(&stop).1);
        std::fs::write(&marker, "").expect("image marker");
    }

    /// Registers the default image another e2e root built (read-only for
    /// this installation: its rootfs is only ever a base), so parallel lanes
    /// of the suite build it once.
    fn register_image_of(&self, other: &Path) {
        let state = other.join("state/banger");
        let image = state.join("images/debian-bookworm");
        let kernel = std::fs::read_dir(state.join("kernels"))
            .unwrap_or_else(|e| panic!("BANGER_E2E_IMAGE_FROM={}: {e}", other.display()))
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("vmlinuz").is_file())
            .unwrap_or_else(|| panic!("no kernel under {}", state.display()));
        let arg = |p: PathBuf| p.to_string_lossy().into_owned();
        let (rootfs, seed) = (
            arg(image.join("rootfs.ext4")),
            arg(image.join("work-seed.ext4")),
        );
        let (vmlinuz, initrd) = (arg(kernel.join("vmlinuz")), arg(kernel.join("initrd.img")));
        let out = self.run(&[
            "image",
            "register",
            "--name",
            "debian-bookworm",
            "--rootfs",
            &rootfs,
            "--work-seed",
            &seed,
            "--kernel",
            &vmlinuz,
            "--initrd",
            &initrd,
        ]);
        assert!(
            out.status.success(),
            "registering {}'s image: {}",
            other.display(),
            text(&out).1
        );
    }

    /// The default image's rootfs, work seed, kernel (bzImage) and initrd,
    /// as this installation's daemon records them.
    pub fn default_image_files(&self) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let img = self.json(&["image", "show", "debian-bookworm"]);
        let k = self.json(&[
            "kernel",
            "show",
            img["kernel"].as_str().expect("image kernel"),
        ]);
        let path = |v: &serde_json::Value, what: &str| {
            PathBuf::from(
                v.as_str()
                    .unwrap_or_else(|| panic!("no {what} in the default image: {img} {k}")),
            )
        };
        (
            path(&img["rootfs"], "rootfs"),
            path(&img["work_seed"], "work seed"),
            path(&k["kernel"], "kernel"),
            path(&k["initrd"], "initrd"),
        )
    }

    /// Runs `ip -n <netns> args...` and returns stdout, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.netns.as_str()];
        a.extend_from_slice(args);
        run_ip(&a)
    }

    /// A command run inside this installation's network namespace.
    pub fn in_netns(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]).args(args);
        c
    }

    fn reset_if_agent_changed(&self) {
        let marker = self.root.join("agent.sha256");
        let want = sha256_file(&self.bin_dir.join("banger-agent"));
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str()) {
            let _ = self.cmd(&["daemon", "stop"]).output();
            let _ = std::fs::remove_dir_all(&self.root);
            std::fs::create_dir_all(&self.root).expect("create e2e root");
            std::fs::write(&marker, want).expect("write marker");
        }
    }

    /// Deletes VMs an earlier, interrupted run left behind, so every run
    /// starts with no VMs (only the built image is reused).
    fn delete_leftover_vms(&self) {
        let out = self.run(&["vm", "list", "--json"]);
        let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v["name"].as_str().map(String::from))
            .collect();
        // A kept KVM host (see `kvm_host`) is reused, not deleted.
        let names: Vec<String> = if std::env::var_os(kvm_host::KEEP_ENV).is_some() {
            names
                .into_iter()
                .filter(|n| n != kvm_host::OUTER_VM)
                .collect()
        } else {
            names
        };
        if names.is_empty() {
            return;
        }
        let mut args = vec!["vm", "delete"];
        args.extend(names.iter().map(String::as_str));
        let del = self.run(&args);
        assert!(
            del.status.success(),
            "cannot clean up leftover VMs {names:?}: {}",
            text(&del).1
        );
    }

    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config/banger")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state/banger")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir().join("vms")
    }

    /// Writes `config.toml`, with `warm_start = "manual"` unless `text`
    /// sets `warm_start` itself: CI hosts have 2 cores, and the template
    /// builds that `auto` starts in the background after a cold create
    /// would compete with the next test's guests (and make its boots warm).
    /// Warm starts are tested on purpose in `tests/warm.rs`.
    pub fn write_config(&self, text: &str) {
        std::fs::create_dir_all(self.config_dir()).expect("config dir");
        // First: a top-level key must come before any table.
        let text = if text
            .lines()
            .any(|l| l.trim_start().starts_with("warm_start"))
        {
            text.to_string()
        } else {
            format!("warm_start = \"manual\"\n{text}")
        };
        std::fs::write(self.config_dir().join("config.toml"), text).expect("write config");
    }

    /// A `banger` command with this installation's environment, inside its
    /// network namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns])
            .arg(self.bin_dir.join("banger"))
            .args(args);
        self.env(c)
    }

    fn env(&self, mut c: Command) -> Command {
        c.env_remove("BANGER_SOCKET")
            .envs(self.env_vars())
            .stdin(Stdio::null());
        c
    }

    /// The environment of this installation's `banger` (besides an unset
    /// `BANGER_SOCKET`), for programs that start it themselves.
    pub fn env_vars(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("HOME", self.root.join("home")),
            ("XDG_CONFIG_HOME", self.root.join("config")),
            ("XDG_STATE_HOME", self.root.join("state")),
            ("XDG_CACHE_HOME", self.root.join("cache")),
            ("XDG_RUNTIME_DIR", self.root.join("run")),
            // A system install on the test host must not capture the tests.
            ("BANGER_SYSTEM", PathBuf::from("0")),
        ]
    }

    /// The program and arguments that run `banger args...` inside this
    /// installation's network namespace (what [`Banger::cmd`] runs, for
    /// programs that start it themselves, e.g. in a terminal).
    pub fn banger_argv(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = ["ip", "netns", "exec", self.netns.as_str()]
            .map(String::from)
            .to_vec();
        v.push(self.bin_dir.join("banger").to_string_lossy().into_owned());
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// Runs `banger args...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("spawn banger")
    }

    /// Runs `banger args... --json` and parses stdout, asserting success.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "banger {a:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// True when guest `vm` went down by itself: its VMM exited (the
    /// daemon marks it stopped; waited for a few seconds, as the daemon
    /// sees the exit just after its agent connection broke) or its console
    /// shows a kernel panic. Never panics: it is asked while a test
    /// unwinds.
    pub fn went_down(&self, vm: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.vm_state(vm).as_deref() {
                Some("running" | "starting") if Instant::now() < deadline => {}
                Some("running" | "starting") => break,
                // Stopped (or failed): its VMM exited.
                Some(_) => return true,
                None => return false,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let logs = self.run(&["vm", "logs", vm, "--tail", "200"]);
        String::from_utf8_lossy(&logs.stdout).contains("Kernel panic - not syncing")
    }

    /// The state of VM `vm` (`running`, `stopped`, ...); `None` when
    /// the daemon does not say. Never panics.
    pub fn vm_state(&self, vm: &str) -> Option<String> {
        let show = self.run(&["vm", "show", vm, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&show.stdout)
            .ok()
            .and_then(|v| v["state"].as_str().map(String::from))
    }

    /// Names of the VMs the daemon knows.
    pub fn vm_names(&self) -> Vec<String> {
        self.json(&["vm", "list"])
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// Sorted names of the entries in the VMs directory (one per VM that
    /// has files), once the files of deleted VMs are gone: a delete moves a
    /// VM's directory aside and removes it after its answer.
    pub fn vm_dirs(&self) -> Vec<String> {
        let list = || -> Vec<String> {
            match std::fs::read_dir(self.vms_dir()) {
                Ok(rd) => rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        wait_until(
            "the files of deleted VMs to be removed",
            Duration::from_secs(30),
            || !list().iter().any(|n| n.starts_with(".deleting-")),
        );
        let mut v = list();
        v.sort();
        v
    }
}

impl Banger {
    /// SIGKILLs the running daemon and waits until it is gone; returns its pid.
    pub fn kill_daemon(&self) -> i32 {
        let pid = self.json(&["daemon", "status"])["pid"]
            .as_u64()
            .expect("daemon pid") as i32;
        // SAFETY: plain kill(2) of the daemon this installation started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_until("the killed daemon to exit", Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        pid
    }

    /// Spawns `banger vm run ... -- sh -c 'echo started; exec CMD'` and
    /// returns once the guest command has printed `started`.
    pub fn spawn_running(&self, run_args: &[&str], guest_cmd: &str) -> std::process::Child {
        let script = format!("echo started; exec {guest_cmd}");
        let mut args = vec!["vm", "run"];
        args.extend_from_slice(run_args);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        let mut child = self
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn banger vm run");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 8];
        std::io::Read::read_exact(&mut stdout, &mut first)
            .expect("the guest command's first output");
        assert_eq!(&first, b"started\n");
        // Keep the pipe open: the CLI must not see EPIPE on later output.
        child.stdout = Some(stdout);
        child
    }
}

impl Drop for Banger {
    fn drop(&mut self) {
        if self.owns_netns {
            let _ = self
                .cmd(&["daemon", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.netns])
                .status();
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A namespace name derived from the installation root (at most 15
/// characters, like interface names, to stay readable in `ip netns`).
fn netns_name(root: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("bge-{:x}", h)[..12].to_string()
}

/// Runs `ip args...`, asserting success; returns stdout.
pub fn run_ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pids of running processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("cargo") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `test`, and once more when it failed because the outer guest in
/// which it runs nested guests went down by itself (`down` says so, after
/// the test unwound: see [`Banger::went_down`]; a test whose guards delete
/// that guest asks before they do). QEMU's TCG emulation of SVM now and
/// then loses the outer kernel's state on a nested guest's exit (a kernel
/// panic in `exc_page_fault` during `KVM_RUN`, or a reset), which no code
/// of banger causes. `revive` makes the guest usable again before the second run.
/// The first failure is printed; a second one fails the test, as does a
/// failure with the guest up.
pub fn once_more_if_outer_went_down(
    what: &str,
    down: impl FnOnce() -> bool,
    revive: impl FnOnce(),
    test: impl Fn(),
) {
    let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&test)) else {
        return;
    };
    if !down() {
        std::panic::resume_unwind(panic);
    }
    eprintln!(
        "[{what}] the outer guest went down during the test (failure above); running it once more"
    );
    revive();
    test();
}

/// Stdout and stderr as text, for assertions.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::once_more_if_outer_went_down;
    use std::cell::Cell;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    /// Runs `once_more_if_outer_went_down` over a test that fails its
    /// first `fails` runs; how many runs there were and whether the revive
    /// ran, or `Err` when the whole thing failed.
    fn run(fails: u32, down: bool) -> Result<(u32, bool), (u32, bool)> {
        let (runs, revived) = (Cell::new(0), Cell::new(false));
        let r = catch_unwind(AssertUnwindSafe(|| {
            once_more_if_outer_went_down(
                "t",
                || down,
                || revived.set(true),
                || {
                    runs.set(runs.get() + 1);
                    assert!(runs.get() > fails, "run {} fails", runs.get());
                },
            )
        }));
        let seen = (runs.get(), revived.get());
        r.map(|()| seen).map_err(|_| seen)
    }

    #[test]
    fn only_a_failure_with_the_outer_guest_down_is_run_once_more() {
        assert_eq!(run(0, true), Ok((1, false)));
        assert_eq!(run(1, true), Ok((2, true)));
        assert_eq!(run(2, true), Err((2, true)), "a second failure fails");
        assert_eq!(run(1, false), Err((1, false)), "guest up: no retry");
    }
}
