//! The API contract, checked by tools no one here wrote, against a real
//! daemon (user-mode networking, the default image registered):
//!
//! - `openapi-spec-validator` accepts the document the daemon serves, and
//!   that document is the committed `docs/openapi.json`;
//! - a client generated from `docs/openapi.json` by `openapi-python-client`
//!   lists, creates (`start: false`), reads and deletes a VM;
//! - `schemathesis run --checks all` (stateful phase on, bounded) finds
//!   nothing.
//!
//! The tools are pinned in `crates/e2e/api-tools/requirements.txt` and
//! installed into a virtual environment this file makes (once per set of
//! versions) under `~/.cache/banger-e2e/`; it needs `python3` with `venv`
//! (`scripts/setup-host.sh --test-tools`) and PyPI.

use banger_e2e::{Banger, shared, text};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMAGE: &str = "debian-bookworm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("api-tools")
}

/// The virtual environment with the pinned tools, made on first use.
fn venv() -> PathBuf {
    use sha2::Digest;
    let requirements = tools_dir().join("requirements.txt");
    let pins = std::fs::read(&requirements).expect("requirements.txt");
    let python = std::env::var("BANGER_PYTHON").unwrap_or_else(|_| "python3".into());
    let version = Command::new(&python)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}: run scripts/setup-host.sh --test-tools"));
    let mut h = sha2::Sha256::new();
    h.update(&pins);
    h.update(&version.stdout);
    let tag = format!("{:x}", h.finalize());
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = cache
        .join("banger-e2e")
        .join(format!("api-tools-{}", &tag[..16]));
    let done = dir.join("installed");
    if done.exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().expect("parent")).expect("cache dir");
    let out = Command::new(&python)
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .expect("spawn python3 -m venv");
    assert!(
        out.status.success(),
        "python3 -m venv failed (apt-get install python3-venv): {}",
        text(&out).1
    );
    let out = Command::new(dir.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "--quiet", "-r"])
        .arg(&requirements)
        .output()
        .expect("spawn pip");
    assert!(out.status.success(), "pip install failed: {}", text(&out).1);
    std::fs::write(&done, "").expect("marker");
    dir
}

/// A throwaway installation with user-mode networking and the shared
/// installation's default image registered (its files are only read).
fn installation(tag: &str) -> Banger {
    let from = shared();
    let img = from.json(&["image", "show", IMAGE]);
    let kernel = from.json(&["kernel", "show", img["kernel"].as_str().expect("kernel")]);
    let b = Banger::isolated(tag);
    b.write_config(
        "network = \"user\"\ndns_listen_addr = \"127.0.0.1:0\"\nweb_listen_addr = \"\"\n",
    );
    let s = |v: &serde_json::Value| v.as_str().expect("path").to_string();
    let mut args = vec![
        "image".to_string(),
        "register".into(),
        "--name".into(),
        IMAGE.into(),
        "--rootfs".into(),
        s(&img["rootfs"]),
        "--kernel".into(),
        s(&kernel["kernel"]),
    ];
    if let Some(seed) = img["work_seed"].as_str() {
        args.extend(["--work-seed".into(), seed.into()]);
    }
    if let Some(initrd) = kernel["initrd"].as_str() {
        args.extend(["--initrd".into(), initrd.into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = b.run(&args);
    assert!(out.status.success(), "image register: {}", text(&out).1);
    b
}

fn socket(b: &Banger) -> PathBuf {
    let out = b.run(&["daemon", "socket"]);
    assert!(out.status.success(), "daemon socket: {}", text(&out).1);
    PathBuf::from(text(&out).0.trim())
}

/// The document as `banger api openapi` prints it.
fn served_document(b: &Banger) -> serde_json::Value {
    let out = b.run(&["api", "openapi"]);
    assert!(out.status.success(), "banger api openapi: {}", text(&out).1);
    serde_json::from_slice(&out.stdout).expect("the document is JSON")
}

fn ok(out: &Output, what: &str) -> String {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn spec_validator_accepts_the_served_document() {
    let v = venv();
    let b = installation("api-doc");
    let served = served_document(&b);
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/openapi.json")).expect("docs/openapi.json"),
    )
    .expect("docs/openapi.json is JSON");
    assert!(
        served == committed,
        "the daemon serves another document than docs/openapi.json"
    );
    let file = b.root.join("openapi.json");
    std::fs::write(&file, served.to_string()).expect("write");
    let out = Command::new(v.join("bin/openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("spawn openapi-spec-validator");
    let said = ok(&out, "openapi-spec-validator");
    assert!(said.contains(": OK"), "{said}");
}

#[test]
fn generated_client_lists_creates_reads_and_deletes_a_vm() {
    let v = venv();
    let b = installation("api-client");
    let gen_dir = b.root.join("client");
    let out = Command::new(v.join("bin/openapi-python-client"))
        .args(["generate", "--meta", "none", "--output-path"])
        .arg(gen_dir.join("banger_client"))
        .arg("--path")
        .arg(repo().join("docs/openapi.json"))
        .output()
        .expect("spawn openapi-python-client");
    ok(&out, "openapi-python-client generate");
    let out = Command::new(v.join("bin/python"))
        .arg(tools_dir().join("client_check.py"))
        .arg(&gen_dir)
        .arg(socket(&b))
        .args(["api-client-vm", IMAGE])
        .output()
        .expect("spawn client_check.py");
    let said = ok(&out, "client_check.py");
    for step in [
        "list: 0 VMs",
        "create: api-client-vm stopped",
        "read: api-client-vm",
        "duplicate: 409 conflict",
        "delete: api-client-vm",
        "gone: 404 not_found",
    ] {
        assert!(said.contains(step), "no {step:?} in:\n{said}");
    }
    assert!(b.vm_dirs().is_empty(), "VM files left: {:?}", b.vm_dirs());
}

/// Relays TCP connections on 127.0.0.1 to the daemon's Unix socket (the
/// fuzzer speaks TCP only); returns the port. The relay ends with the test.
fn tcp_relay(socket: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { return };
            let Ok(unix) = UnixStream::connect(&socket) else {
                continue;
            };
            let (mut tcp_r, mut unix_w) = (
                tcp.try_clone().expect("clone tcp"),
                unix.try_clone().expect("clone unix"),
            );
            std::thread::spawn(move || {
                let _ = pipe(&mut tcp_r, &mut unix_w);
                let _ = unix_w.shutdown(Shutdown::Write);
            });
            let (mut unix_r, mut tcp_w) = (unix, tcp);
            std::thread::spawn(move || {
                let _ = pipe(&mut unix_r, &mut tcp_w);
                let _ = tcp_w.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

fn pipe(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

/// The operations the fuzzer leaves out, and why. Everything else runs,
/// including the WebSocket routes (the fuzzer's plain requests must get
/// the documented 400).
const EXCLUDED: &[(&str, &str)] = &[
    // (operationId, why)
    ("shutdown", "POST /v1/shutdown stops the daemon under test"),
    (
        "pull_image",
        "reaches registries and the catalog off this machine",
    ),
    ("pull_kernel", "reaches the catalog off this machine"),
    (
        "build_image",
        "runs mmdebstrap against the Debian mirror, or boots a VM",
    ),
    (
        "bundle_image",
        "writes bundles into any absolute directory it is given",
    ),
    (
        "bundle_kernel",
        "writes bundles into any absolute directory it is given",
    ),
    ("start_vm", "boots a guest (20-60 s under TCG)"),
    ("restart_vm", "boots a guest (20-60 s under TCG)"),
    (
        "warm_image",
        "boots a guest to make a template (about a minute under TCG)",
    ),
];

#[test]
fn schemathesis_finds_nothing() {
    let v = venv();
    let b = installation("api-fuzz");
    let port = tcp_relay(socket(&b));
    let report = b.root.join("schemathesis");
    let mut cmd = Command::new(v.join("bin/schemathesis"));
    cmd.arg("run")
        .arg(repo().join("docs/openapi.json"))
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        // Every check; the response-time check is off unless
        // --max-response-time is given (guests here are emulated).
        .args(["--checks", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", "15", "--max-time", "120"])
        .args(["--workers", "1", "--request-timeout", "60"])
        .args(["--seed", "23", "--generation-database", "none"])
        .args(["--no-color", "--suppress-health-check", "all"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report)
        // Its cache and reports stay in the throwaway root, not the tree.
        .current_dir(&b.root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONPATH", tools_dir())
        .env("BANGER_OPENAPI", repo().join("docs/openapi.json"))
        .env("SCHEMATHESIS_HOOKS", "st_hooks");
    let documented = served_document(&b).to_string();
    for (op, _why) in EXCLUDED {
        assert!(
            documented.contains(&format!("\"operationId\":\"{op}\"")),
            "{op} is not an operation of the document"
        );
        cmd.args(["--exclude-operation-id", op]);
    }
    let out = cmd.output().expect("spawn schemathesis");
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found problems (report under {}):\n{stdout}\n{stderr}",
        report.display()
    );
    // It really ran: operations were tested and the stateful phase too,
    // and the create stream was checked (the hooks' NDJSON deserializer).
    assert!(stdout.contains("Stateful"), "no stateful phase:\n{stdout}");
    assert!(
        !stdout.contains("cannot validate application/x-ndjson"),
        "create's stream was not validated:\n{stdout}"
    );
    // Whatever the fuzzer did, the daemon still answers and its VMs are
    // consistent with their files.
    let names = b.vm_names();
    assert_eq!(
        b.vm_dirs().len(),
        names.len(),
        "VMs {names:?} vs dirs {:?}",
        b.vm_dirs()
    );
}
