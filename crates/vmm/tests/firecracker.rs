//! The Firecracker backend against a real child process that plays
//! Firecracker on its API socket, and every request it sends checked
//! against Firecracker's own API description (`../shared/reference/`).
//!
//! The stand-in is this test binary itself, started through a symlink named
//! `fake-firecracker-<mode>`: `main` sees the name and serves the API
//! instead of running tests. Its modes:
//! - `ok`: answers like Firecracker, records every request as a JSON line
//!   in `<api socket dir>/fake-requests.jsonl`, writes to its logger file,
//!   stderr and stdout (the serial console), connects to the agent's vsock
//!   socket as a guest would after `InstanceStart`, and exits after
//!   `SendCtrlAltDel` (as a guest booted with `reboot=k` makes it);
//! - `reject`: like `ok`, but refuses `PUT /machine-config`;
//! - `exit`: complains on stderr and exits at once;
//! - `silent`: never opens its API socket;
//! - `old`: `--version` says v1.4.0.

mod common;

use banger_vmm::firecracker::{
    self, ApiError, FirecrackerVmm, VersionVerdict, agent_listener_path, check_version,
};
use banger_vmm::host::Version;
use banger_vmm::{
    AgentEndpoint, DiskFormat, DiskSpec, LaunchSpec, NetSpec, VmPaths, Vmm, VmmError,
    vmm_process_alive,
};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Bound on waiting for anything a child process does.
const WAIT: Duration = Duration::from_secs(10);
const FAKE_PREFIX: &str = "fake-firecracker-";
const RECORD_FILE: &str = "fake-requests.jsonl";
const GUEST_HELLO: &str = "hello from the guest\n";

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(mode) = name.strip_prefix(FAKE_PREFIX) {
        fake::main(mode);
    }
    let args = Arguments::from_args();
    // The API document is reference data outside the repository; without it
    // the contract tests cannot run, and say so rather than pass.
    let no_doc = api_document().is_none();
    if no_doc {
        eprintln!(
            "SKIPPING the Firecracker contract tests: firecracker-v1.14.1.yaml not found in \
             shared/reference/ next to the repository (set BANGER_FIRECRACKER_API_DOC)"
        );
    }
    let trials = vec![
        Trial::test("contract_full_launch_and_shutdown", || {
            block_on(contract_full_launch_and_shutdown())
        })
        .with_ignored_flag(no_doc),
        Trial::test("contract_snapshot_restore_and_grow", || {
            block_on(contract_snapshot_restore_and_grow())
        })
        .with_ignored_flag(no_doc),
        Trial::test("warm_support_needs_kvm", || {
            block_on(warm_support_needs_kvm())
        }),
        Trial::test(
            "validator_rejects_bad_requests",
            validator_rejects_bad_requests,
        )
        .with_ignored_flag(no_doc),
        Trial::test(
            "config_file_holds_the_api_bodies",
            config_file_holds_the_api_bodies,
        )
        .with_ignored_flag(no_doc),
        Trial::test("early_exit_reports_log_tail", || {
            block_on(early_exit_reports_log_tail())
        }),
        Trial::test("silent_vmm_times_out_and_is_killed", || {
            block_on(silent_vmm_times_out_and_is_killed())
        }),
        Trial::test("rejected_config_kills_the_vmm", || {
            block_on(rejected_config_kills_the_vmm())
        }),
        Trial::test("terminate_kills_and_reattach_rebinds", || {
            block_on(terminate_kills_and_reattach_rebinds())
        }),
        Trial::test("version_of_a_real_binary", version_of_a_real_binary),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn block_on(f: impl Future<Output = ()>) -> Result<(), Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(e.to_string()))?
        .block_on(f);
    Ok(())
}

/// A symlink to this binary that makes it play Firecracker in `mode`.
fn fake_binary(dir: &Path, mode: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let link = dir.join(format!("{FAKE_PREFIX}{mode}"));
    std::os::unix::fs::symlink(exe, &link).expect("symlink fake firecracker");
    link
}

/// A spec for a VM in `dir/vm` with an ELF kernel, an initrd, two raw disks
/// and one network interface.
fn spec(dir: &Path) -> LaunchSpec {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00fake").expect("kernel");
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, b"initrd").expect("initrd");
    let mut disks = Vec::new();
    for (name, read_only) in [("root.raw", false), ("data.raw", true)] {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk");
        disks.push(DiskSpec {
            path,
            format: DiskFormat::Raw,
            read_only,
        });
    }
    LaunchSpec {
        name: "calm-otter".into(),
        dir: vm_dir,
        kernel,
        initrd: Some(initrd),
        extra_cmdline: "systemd.hostname=calm-otter".into(),
        disks,
        nets: vec![NetSpec::tap("tap-calm", "06:00:ac:10:00:02")],
        vcpu: 2,
        memory_mib: 256,
        memory_file: None,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Waits until no process mentions `dir` any more (SIGKILL acts
/// asynchronously).
async fn wait_gone(dir: &Path) {
    let deadline = Instant::now() + WAIT;
    while !common::processes_mentioning(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMM of {} survived",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The recorded requests: (method, path, body).
fn recorded(dir: &Path) -> Vec<(String, String, Option<Value>)> {
    read(&dir.join(RECORD_FILE))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("record line");
            (
                v["method"].as_str().expect("method").to_owned(),
                v["path"].as_str().expect("path").to_owned(),
                (!v["body"].is_null()).then(|| v["body"].clone()),
            )
        })
        .collect()
}

async fn contract_full_launch_and_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let paths = VmPaths::new(&spec.dir);
    // Leftovers of an earlier run that Firecracker would refuse.
    std::fs::write(paths.control_socket(), "stale").expect("stale");
    std::fs::write(paths.agent_socket(), "stale").expect("stale");
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "ok"));

    let launched = vmm.launch(&spec).await.expect("launch");
    let pid = launched.pid;
    let _cleanup = common::KillOnDrop {
        pid,
        dir: spec.dir.clone(),
    };
    assert!(
        vmm_process_alive(pid, &spec.dir),
        "VMM {pid} not recognised"
    );
    assert_eq!(read(&paths.pid_file()).trim(), pid.to_string());
    // Its own session, so terminal signals to the daemon never reach it.
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .ok()
            .map(|p| p.as_raw()),
        Some(pid as i32)
    );

    // The guest's connection to host port VSOCK_PORT arrives on the listener.
    let AgentEndpoint::Accept(listener) = launched.agent else {
        panic!("Firecracker's agent endpoint is a listener");
    };
    assert_eq!(
        listener
            .local_addr()
            .expect("addr")
            .as_pathname()
            .map(Path::to_path_buf),
        Some(spec.dir.join("agent.sock_1024"))
    );
    let mut stream = tokio::time::timeout(WAIT, AgentEndpoint::Accept(listener).open())
        .await
        .expect("guest connects in time")
        .expect("accept");
    let mut hello = vec![0u8; GUEST_HELLO.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut hello))
        .await
        .expect("guest says hello in time")
        .expect("read");
    assert_eq!(hello, GUEST_HELLO.as_bytes());

    // Serial console (stdout), logger and stderr are captured.
    let console = read(&paths.console_log());
    assert!(
        console.contains("fake guest console: Linux version"),
        "{console:?}"
    );
    let log = read(&paths.vmm_log());
    assert!(
        log.contains("fake logger: Running Firecracker v1.14.1"),
        "{log:?}"
    );
    assert!(log.contains("fake stderr: guest started"), "{log:?}");
    assert!(firecracker::metrics_path(&spec.dir).is_file());

    // Ctrl-Alt-Del reboots the guest, which ends Firecracker.
    vmm.request_shutdown(&spec.dir).await.expect("shutdown");
    tokio::time::timeout(WAIT, launched.exited)
        .await
        .expect("VMM exits after Ctrl-Alt-Del")
        .expect("exit task");
    assert!(!vmm_process_alive(pid, &spec.dir));

    let requests = recorded(&spec.dir);
    let contract = Contract::load();
    for (method, path, body) in &requests {
        if let Err(e) = contract.check(method, path, body.as_ref()) {
            panic!("{method} {path} {body:?} breaks Firecracker's API: {e}");
        }
    }
    let puts: Vec<String> = requests
        .iter()
        .filter(|(m, ..)| m == "PUT")
        .map(|(_, p, b)| match p.as_str() {
            "/actions" => format!("/actions {}", b.as_ref().expect("body")["action_type"]),
            _ => p.clone(),
        })
        .collect();
    assert_eq!(
        puts,
        [
            "/logger",
            "/metrics",
            "/machine-config",
            "/boot-source",
            "/drives/vda",
            "/drives/vdb",
            "/network-interfaces/eth0",
            "/vsock",
            "/entropy",
            "/actions \"InstanceStart\"",
            "/actions \"SendCtrlAltDel\"",
        ]
    );
    assert!(
        requests.iter().any(|(m, p, _)| m == "GET" && p == "/"),
        "readiness is checked with GET /"
    );
    let body = |path: &str| {
        requests
            .iter()
            .find(|(_, p, _)| p == path)
            .and_then(|(.., b)| b.clone())
            .expect("body")
    };
    assert_eq!(
        body("/machine-config"),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false})
    );
    assert_eq!(
        body("/boot-source"),
        json!({
            "kernel_image_path": spec.kernel,
            "initrd_path": spec.initrd,
            "boot_args": "console=ttyS0 reboot=k panic=1 systemd.hostname=calm-otter",
        })
    );
    assert_eq!(
        body("/drives/vdb"),
        json!({
            "drive_id": "vdb",
            "path_on_host": spec.disks[1].path,
            "is_root_device": false,
            "is_read_only": true,
            "cache_type": "Writeback",
        })
    );
    // Relative to the VM directory, Firecracker's working directory, so a
    // snapshot of this VM can be restored in another directory.
    assert_eq!(
        body("/vsock"),
        json!({"guest_cid": 3, "uds_path": "agent.sock"})
    );
    assert_eq!(
        body("/network-interfaces/eth0"),
        json!({"iface_id": "eth0", "host_dev_name": "tap-calm", "guest_mac": "06:00:ac:10:00:02"})
    );
}

/// Accepts the guest agent's connection on `agent` and reads its hello.
async fn guest_hello(agent: AgentEndpoint) {
    let mut stream = tokio::time::timeout(WAIT, agent.open())
        .await
        .expect("guest connects in time")
        .expect("accept");
    let mut hello = vec![0u8; GUEST_HELLO.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut hello))
        .await
        .expect("guest says hello in time")
        .expect("read");
    assert_eq!(hello, GUEST_HELLO.as_bytes());
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// A template VM whose writable disk lives in its directory is snapshotted,
/// then restored in another directory holding a copy of that disk: the
/// clone's Firecracker runs there, so the relative drive and vsock paths of
/// the state file resolve to the clone's files. Then its disk grows.
async fn contract_snapshot_restore_and_grow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "ok"));
    let mut template = spec(tmp.path());
    let own_disk = template.dir.join("overlay.ext4");
    std::fs::File::create(&own_disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    template.disks[0].path = own_disk;
    let launched = vmm.launch(&template).await.expect("launch");
    let _cleanup = common::KillOnDrop {
        pid: launched.pid,
        dir: template.dir.clone(),
    };
    guest_hello(launched.agent).await;

    let files = banger_vmm::SnapshotFiles {
        memory: tmp.path().join("memory"),
        vmstate: tmp.path().join("vmstate"),
    };
    vmm.snapshot(&template.dir, launched.pid, &files)
        .await
        .expect("snapshot");
    tokio::time::timeout(WAIT, launched.exited)
        .await
        .expect("the template's VMM ends after its snapshot")
        .expect("exit task");
    assert_eq!(mode_of(&files.memory), 0o600);
    assert_eq!(mode_of(&files.vmstate), 0o600);

    let clone_dir = tmp.path().join("clone");
    std::fs::create_dir(&clone_dir).expect("clone dir");
    std::fs::copy(&template.disks[0].path, clone_dir.join("overlay.ext4")).expect("copy");
    let mut launch = template.clone();
    launch.name = "clone".into();
    launch.dir = clone_dir.clone();
    launch.disks[0].path = clone_dir.join("overlay.ext4");
    launch.nets = vec![NetSpec::tap("tap-clone", "06:00:ac:10:00:09")];
    let restore = banger_vmm::RestoreSpec {
        launch,
        from: files.clone(),
        template_nets: template.nets.clone(),
    };
    let restored = vmm
        .restore(&restore, banger_vmm::disks_ready())
        .await
        .expect("restore");
    let _cleanup_clone = common::KillOnDrop {
        pid: restored.pid,
        dir: clone_dir.clone(),
    };
    assert!(vmm_process_alive(restored.pid, &clone_dir));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/cwd", restored.pid)).expect("cwd"),
        clone_dir
    );
    // The fake guest connects to `agent.sock_1024` relative to its working
    // directory: only the clone's listener can take it.
    guest_hello(restored.agent).await;

    vmm.grow_disk(&clone_dir, 0, 2 << 20).await.expect("grow");
    assert_eq!(
        std::fs::metadata(clone_dir.join("overlay.ext4"))
            .expect("disk")
            .len(),
        2 << 20
    );
    assert_eq!(
        std::fs::metadata(&template.disks[0].path)
            .expect("disk")
            .len(),
        1 << 20,
        "the template's disk must not change"
    );
    let err = vmm
        .grow_disk(&clone_dir, 0, 1 << 20)
        .await
        .expect_err("shrink");
    assert!(err.to_string().contains("only grow"), "{err}");
    let log = read(&VmPaths::new(&clone_dir).vmm_log());
    assert!(log.contains("drive \"vda\" is now 2097152 bytes"), "{log}");

    let contract = Contract::load();
    let template_requests = recorded(&template.dir);
    let clone_requests = recorded(&clone_dir);
    for (method, path, body) in template_requests.iter().chain(&clone_requests) {
        if let Err(e) = contract.check(method, path, body.as_ref()) {
            panic!("{method} {path} {body:?} breaks Firecracker's API: {e}");
        }
    }
    let calls = |reqs: &[(String, String, Option<Value>)]| -> Vec<String> {
        reqs.iter()
            .filter(|(m, ..)| m != "GET")
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect()
    };
    let template_calls = calls(&template_requests);
    assert_eq!(
        template_calls[template_calls.len() - 2..],
        ["PATCH /vm", "PUT /snapshot/create"]
    );
    // Load is the first call after logger and metrics.
    assert_eq!(
        calls(&clone_requests),
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /snapshot/load",
            "PATCH /vm",
            "PATCH /drives/vda",
        ]
    );
    let body = |reqs: &[(String, String, Option<Value>)], m: &str, p: &str| {
        reqs.iter()
            .filter(|(rm, rp, _)| rm == m && rp == p)
            .filter_map(|(.., b)| b.clone())
            .collect::<Vec<Value>>()
    };
    assert_eq!(
        body(&template_requests, "PATCH", "/vm"),
        [json!({"state": "Paused"})]
    );
    assert_eq!(
        body(&template_requests, "PUT", "/snapshot/create"),
        [json!({
            "snapshot_path": files.vmstate,
            "mem_file_path": files.memory,
            "snapshot_type": "Full",
        })]
    );
    assert_eq!(
        body(&template_requests, "PUT", "/drives/vda"),
        [json!({
            "drive_id": "vda",
            "path_on_host": "overlay.ext4",
            "is_root_device": false,
            "is_read_only": false,
            "cache_type": "Writeback",
        })]
    );
    assert_eq!(
        body(&clone_requests, "PUT", "/snapshot/load"),
        [json!({
            "snapshot_path": files.vmstate,
            "mem_backend": {"backend_type": "File", "backend_path": files.memory},
            "track_dirty_pages": false,
            "resume_vm": false,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-clone"}],
        })]
    );
    assert_eq!(
        body(&clone_requests, "PATCH", "/vm"),
        [json!({"state": "Resumed"})]
    );
    assert_eq!(
        body(&clone_requests, "PATCH", "/drives/vda"),
        [json!({"drive_id": "vda", "path_on_host": "overlay.ext4"})]
    );

    vmm.terminate(&clone_dir, restored.pid)
        .await
        .expect("terminate");
    tokio::time::timeout(WAIT, restored.exited)
        .await
        .expect("reaped")
        .expect("exit task");

    // A restore that fails leaves nothing running and no listener.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).expect("dir");
    let mut bad = restore.clone();
    bad.launch.dir = broken.clone();
    bad.launch.disks[0].path = broken.join("overlay.ext4");
    let err = vmm
        .restore(&bad, banger_vmm::disks_ready())
        .await
        .expect_err("no disk copy");
    assert!(err.to_string().contains("overlay.ext4 missing"), "{err}");
    assert!(common::processes_mentioning(&broken).is_empty());
    assert!(!agent_listener_path(&broken).exists());

    // The disk copies are made while Firecracker starts: it waits for them
    // (running already) before the load, and ends when they failed.
    let up_while_waiting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, dir) = (up_while_waiting.clone(), broken.clone());
    let gate = Box::pin(async move {
        seen.store(
            !common::processes_mentioning(&dir).is_empty(),
            std::sync::atomic::Ordering::SeqCst,
        );
        false
    });
    let err = vmm.restore(&bad, gate).await.expect_err("no disks");
    assert!(
        matches!(err, banger_vmm::VmmError::DisksUnavailable),
        "{err:?}"
    );
    assert!(up_while_waiting.load(std::sync::atomic::Ordering::SeqCst));
    assert!(common::processes_mentioning(&broken).is_empty());
    assert!(!agent_listener_path(&broken).exists());
}

/// The fake says v1.14.1, new enough; this host has no usable /dev/kvm
/// (or, on a KVM host, it is supported).
async fn warm_support_needs_kvm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "ok"));
    match vmm.warm_support().await {
        banger_vmm::WarmSupport::Supported { id } => {
            assert!(banger_vmm::host::kvm_status().is_usable());
            assert_eq!(id, "Firecracker v1.14.1");
        }
        banger_vmm::WarmSupport::Unsupported(why) => {
            assert!(!banger_vmm::host::kvm_status().is_usable());
            assert!(why.contains("/dev/kvm"), "{why}");
        }
    }
    let old = FirecrackerVmm::new(fake_binary(tmp.path(), "old"));
    match old.warm_support().await {
        banger_vmm::WarmSupport::Unsupported(why) => {
            assert!(why.contains("v1.4.0") && why.contains("v1.12.0"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}

/// The `--config-file` document (the bench's bare Firecracker boot) holds
/// exactly the bodies the API would get, each valid for its resource.
fn config_file_holds_the_api_bodies() -> Result<(), Failed> {
    let c = Contract::load();
    let t = tempfile::tempdir().map_err(|e| Failed::from(e.to_string()))?;
    let config =
        firecracker::vm_config(&spec(t.path())).map_err(|e| Failed::from(e.to_string()))?;
    let doc = config.config_file();
    let keys: Vec<&str> = doc
        .as_object()
        .ok_or("config file is not an object")?
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "boot-source",
        "drives",
        "entropy",
        "logger",
        "machine-config",
        "metrics",
        "network-interfaces",
        "vsock",
    ];
    want.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    if keys != want {
        return Err(format!("config file sections {keys:?}, expected {want:?}").into());
    }
    let mut checks: Vec<(String, &Value)> = [
        "boot-source",
        "entropy",
        "logger",
        "machine-config",
        "metrics",
        "vsock",
    ]
    .iter()
    .map(|k| (format!("/{k}"), &doc[*k]))
    .collect();
    for d in doc["drives"].as_array().ok_or("drives")? {
        checks.push((
            format!("/drives/{}", d["drive_id"].as_str().ok_or("drive_id")?),
            d,
        ));
    }
    for n in doc["network-interfaces"]
        .as_array()
        .ok_or("network-interfaces")?
    {
        checks.push((
            format!(
                "/network-interfaces/{}",
                n["iface_id"].as_str().ok_or("iface_id")?
            ),
            n,
        ));
    }
    if checks.len() != 6 + config.drives.len() + config.nets.len() || config.drives.is_empty() {
        return Err("drives or interfaces missing from the config file".into());
    }
    for (path, body) in checks {
        c.check("PUT", &path, Some(body))
            .map_err(|e| Failed::from(format!("{path} in the config file: {e}")))?;
    }
    Ok(())
}

fn validator_rejects_bad_requests() -> Result<(), Failed> {
    let c = Contract::load();
    let ok = |m: &str, p: &str, b: Option<Value>| {
        c.check(m, p, b.as_ref())
            .map_err(|e| Failed::from(format!("{m} {p} should pass: {e}")))
    };
    ok(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256})),
    )?;
    ok("GET", "/", None)?;
    ok(
        "PUT",
        "/drives/rootfs",
        Some(json!({"drive_id": "rootfs", "is_root_device": false, "path_on_host": "/x"})),
    )?;
    let bad: Vec<(&str, &str, Option<Value>, &str)> = vec![
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": "2", "mem_size_mib": 256})),
            "vcpu_count as a string",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 64, "mem_size_mib": 256})),
            "vcpu_count above the maximum",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2})),
            "required mem_size_mib missing",
        ),
        (
            "PUT",
            "/drives/vda",
            Some(json!({"drive_id": "vda", "is_root_device": false, "readonly": true})),
            "unknown field",
        ),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "Reboot"})),
            "action outside the enum",
        ),
        ("PUT", "/vsock", None, "required body missing"),
        ("PUT", "/nope", Some(json!({})), "unknown path"),
        ("PUT", "/drives/", Some(json!({})), "empty path parameter"),
        ("DELETE", "/vsock", None, "unknown method"),
        ("GET", "/", Some(json!({})), "body where none is taken"),
    ];
    for (m, p, b, why) in bad {
        if c.check(m, p, b.as_ref()).is_ok() {
            return Err(format!("{why}: {m} {p} {b:?} was accepted").into());
        }
    }
    Ok(())
}

async fn early_exit_reports_log_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "exit"));
    let err = vmm.launch(&spec).await.expect_err("must fail");
    match &err {
        VmmError::EarlyExit { detail, log, .. } => {
            assert!(detail.contains("exit status: 1"), "{detail}");
            assert!(
                detail.contains("Failed to open /dev/kvm: No such device"),
                "{detail}"
            );
            assert_eq!(log, &VmPaths::new(&spec.dir).vmm_log());
        }
        other => panic!("expected EarlyExit, got {other:?}"),
    }
    assert!(common::processes_mentioning(&spec.dir).is_empty());
    assert!(!agent_listener_path(&spec.dir).exists());
}

async fn silent_vmm_times_out_and_is_killed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "silent"))
        .with_startup_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let err = vmm.launch(&spec).await.expect_err("must time out");
    assert!(matches!(err, VmmError::Timeout { secs: 1, .. }), "{err:?}");
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    wait_gone(&spec.dir).await;
}

async fn rejected_config_kills_the_vmm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "reject"));
    let err = vmm.launch(&spec).await.expect_err("must fail");
    match &err {
        VmmError::FirecrackerApi(ApiError::Rejected {
            status,
            fault_message,
            path,
            ..
        }) => {
            assert_eq!(*status, 400);
            assert_eq!(path, "/machine-config");
            assert_eq!(fault_message, "Invalid vCPU count: 2");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(err.to_string().contains("Invalid vCPU count: 2"), "{err}");
    wait_gone(&spec.dir).await;

    // A qcow2 disk is refused before anything starts.
    let mut qcow = spec.clone();
    qcow.disks[0].format = DiskFormat::Qcow2;
    let err = vmm.launch(&qcow).await.expect_err("qcow2");
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    assert!(common::processes_mentioning(&spec.dir).is_empty());
}

async fn terminate_kills_and_reattach_rebinds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = FirecrackerVmm::new(fake_binary(tmp.path(), "ok"));
    let launched = vmm.launch(&spec).await.expect("launch");
    let pid = launched.pid;
    let _cleanup = common::KillOnDrop {
        pid,
        dir: spec.dir.clone(),
    };
    // A daemon restart: the old listener is gone, a new one takes its place.
    drop(launched.agent);
    let AgentEndpoint::Accept(listener) = vmm.reattach_agent(&spec.dir).expect("reattach") else {
        panic!("listener expected");
    };
    let path = agent_listener_path(&spec.dir);
    let (client, accepted) =
        tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
    client.expect("connect");
    accepted.expect("accept");
    drop(listener);
    // A stale file in its place is replaced.
    std::fs::remove_file(&path).ok();
    std::fs::write(&path, "stale").expect("stale");
    let again = vmm
        .reattach_agent(&spec.dir)
        .expect("reattach over a stale file");
    drop(again);

    vmm.terminate(&spec.dir, pid).await.expect("terminate");
    tokio::time::timeout(WAIT, launched.exited)
        .await
        .expect("reaped after terminate")
        .expect("exit task");
    assert!(!vmm_process_alive(pid, &spec.dir));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still there"
    );
    assert!(!path.exists(), "agent listener socket left behind");
    // Terminating a VMM that is already gone is fine.
    vmm.terminate(&spec.dir, pid)
        .await
        .expect("terminate again");
}

fn version_of_a_real_binary() -> Result<(), Failed> {
    let tmp = tempfile::tempdir().map_err(|e| Failed::from(e.to_string()))?;
    let v = |major, minor, patch| Version {
        major,
        minor,
        patch,
    };
    let ok = check_version(&fake_binary(tmp.path(), "ok"));
    if ok != VersionVerdict::Supported(v(1, 14, 1)) {
        return Err(format!("{ok:?}").into());
    }
    let old = check_version(&fake_binary(tmp.path(), "old"));
    if old != VersionVerdict::TooOld(v(1, 4, 0)) {
        return Err(format!("{old:?}").into());
    }
    Ok(())
}

/// Firecracker's API description (Apache-2.0, from the firecracker-microvm
/// repository at v1.14.1). It is reference data kept next to the project,
/// in `../shared/reference/` from the repository root, not a project file:
/// `BANGER_FIRECRACKER_API_DOC` overrides the location.
fn api_document() -> Option<std::path::PathBuf> {
    const NAME: &str = "firecracker-v1.14.1.yaml";
    if let Some(p) = std::env::var_os("BANGER_FIRECRACKER_API_DOC") {
        return Some(p.into());
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("shared/reference").join(NAME))
        .chain([Path::new("/work/shared/reference").join(NAME)])
        .find(|p| p.is_file())
}

/// Firecracker's API description, as a validator of requests.
struct Contract {
    paths: serde_json::Map<String, Value>,
    definitions: Value,
}

impl Contract {
    fn load() -> Self {
        let file = api_document().expect("the API document (checked in main)");
        let doc: Value = serde_norway::from_str(&read(&file)).expect("parse the API description");
        assert_eq!(doc["swagger"], "2.0");
        let paths = doc["paths"].as_object().expect("paths").clone();
        let mut definitions = doc["definitions"].clone();
        deny_unknown_fields(&mut definitions);
        Self { paths, definitions }
    }

    /// Whether `method path` exists and `body` validates against its body
    /// parameter's schema.
    fn check(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(), String> {
        let op = self
            .paths
            .iter()
            .find(|(template, _)| path_matches(template, path))
            .map(|(_, item)| item)
            .ok_or_else(|| format!("no path {path} in the API"))?
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| format!("{path} has no {method}"))?;
        let param = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["in"] == "body");
        match (param, body) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(format!("{method} {path} takes no body")),
            (Some(p), None) if p["required"] == true => {
                Err(format!("{method} {path} needs a body"))
            }
            (Some(_), None) => Ok(()),
            (Some(p), Some(body)) => {
                let schema = json!({
                    "definitions": self.definitions,
                    "allOf": [p["schema"]],
                });
                let validator = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft4)
                    .build(&schema)
                    .map_err(|e| format!("schema of {method} {path}: {e}"))?;
                let errors: Vec<String> = validator
                    .iter_errors(body)
                    .map(|e| format!("{} at {}", e, e.instance_path()))
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("; "))
                }
            }
        }
    }
}

/// `/drives/{drive_id}` matches `/drives/vda`: same segments, a template
/// segment matching one non-empty segment.
fn path_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

/// Firecracker's request types reject unknown fields (serde
/// `deny_unknown_fields`), which the document does not say: object schemas
/// that list properties and say nothing about others get
/// `additionalProperties: false`.
fn deny_unknown_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object)
                && !map.contains_key("additionalProperties")
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, v) in map.iter_mut() {
                if key == "properties" {
                    // Property names are not schemas; their values are.
                    if let Value::Object(props) = v {
                        props.values_mut().for_each(deny_unknown_fields);
                    }
                } else {
                    deny_unknown_fields(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(deny_unknown_fields),
        _ => {}
    }
}

/// The process that plays Firecracker.
mod fake {
    use super::{GUEST_HELLO, RECORD_FILE};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, StatusCode};
    use serde_json::{Value, json};
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    struct State {
        mode: String,
        id: String,
        record: PathBuf,
        started: AtomicBool,
        vsock_uds: std::sync::Mutex<Option<PathBuf>>,
        drives: std::sync::Mutex<Vec<Value>>,
        /// Something besides logger and metrics was configured (then a
        /// snapshot load is refused, as by Firecracker).
        configured: AtomicBool,
        shutting_down: AtomicBool,
    }

    pub fn main(mode: &str) -> ! {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--version") {
            let v = if mode == "old" { "1.4.0" } else { "1.14.1" };
            println!("Firecracker v{v}\n\nSupported snapshot data format versions: v1.0.0");
            std::process::exit(0);
        }
        let arg = |flag: &str| {
            args.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| w[1].clone())
                .unwrap_or_else(|| {
                    eprintln!("fake: {flag} missing");
                    std::process::exit(2)
                })
        };
        let socket = PathBuf::from(arg("--api-sock"));
        let id = arg("--id");
        match mode {
            "exit" => {
                eprintln!("fake stderr: Failed to open /dev/kvm: No such device");
                std::process::exit(1);
            }
            "silent" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve(
            State {
                mode: mode.to_owned(),
                id,
                record: socket.parent().expect("socket in a dir").join(RECORD_FILE),
                started: AtomicBool::new(false),
                vsock_uds: std::sync::Mutex::new(None),
                drives: std::sync::Mutex::new(Vec::new()),
                configured: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
            },
            &socket,
        ));
        std::process::exit(0)
    }

    async fn serve(state: State, socket: &Path) {
        if socket.exists() {
            // Like Firecracker: a socket path in use is fatal.
            eprintln!("fake stderr: API socket {} exists", socket.display());
            std::process::exit(1);
        }
        let listener = tokio::net::UnixListener::bind(socket).expect("bind API socket");
        let state = Arc::new(state);
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let st = state.clone();
            let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // One request per connection is what the client does; serving
            // inline keeps the order of the record.
            let _ = conn.await;
            if state.shutting_down.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    fn answer(status: StatusCode, body: Option<Value>) -> Response<Full<Bytes>> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .expect("response")
    }

    async fn handle(
        state: Arc<State>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect().await?.to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!({"unparsable": String::from_utf8_lossy(&bytes)}))
        };
        let line = json!({"method": method, "path": path, "body": body});
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&state.record)
            .and_then(|mut f| writeln!(f, "{line}"))
            .expect("record request");

        let no_content = || Ok(answer(StatusCode::NO_CONTENT, None));
        let bad = |msg: String| {
            Ok(answer(
                StatusCode::BAD_REQUEST,
                Some(json!({"fault_message": msg})),
            ))
        };
        if method == "PUT"
            && !matches!(
                path.as_str(),
                "/logger" | "/metrics" | "/actions" | "/snapshot/create" | "/snapshot/load"
            )
        {
            state.configured.store(true, Ordering::SeqCst);
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/") => Ok(answer(
                StatusCode::OK,
                Some(json!({
                    "app_name": "Firecracker",
                    "id": state.id,
                    "state": if state.started.load(Ordering::SeqCst) { "Running" } else { "Not started" },
                    "vmm_version": "1.14.1",
                })),
            )),
            ("GET", "/version") => Ok(answer(
                StatusCode::OK,
                Some(json!({"firecracker_version": "1.14.1"})),
            )),
            ("PUT", "/machine-config") if state.mode == "reject" => Ok(answer(
                StatusCode::BAD_REQUEST,
                Some(json!({"fault_message": "Invalid vCPU count: 2"})),
            )),
            ("PUT", "/logger") => {
                // Like Firecracker: the file must exist, and it is opened
                // for writing without O_APPEND.
                let log_path = body["log_path"].as_str().unwrap_or_default();
                let opened = std::fs::OpenOptions::new().write(true).open(log_path);
                match opened
                    .and_then(|mut f| writeln!(f, "fake logger: Running Firecracker v1.14.1"))
                {
                    Ok(()) => no_content(),
                    Err(e) => Ok(answer(
                        StatusCode::BAD_REQUEST,
                        Some(json!({"fault_message": format!("logger: {e}")})),
                    )),
                }
            }
            ("GET", "/vm/config") => {
                let drives = state.drives.lock().expect("lock").clone();
                Ok(answer(StatusCode::OK, Some(json!({"drives": drives}))))
            }
            ("PUT", p) if p.starts_with("/drives/") => {
                state.drives.lock().expect("lock").push(body);
                no_content()
            }
            ("PATCH", p) if p.starts_with("/drives/") => {
                // Like Firecracker: the file is reopened (relative to the
                // working directory) and its size re-read.
                let on_host = body["path_on_host"].as_str().unwrap_or_default();
                match std::fs::metadata(on_host) {
                    Ok(md) => {
                        eprintln!(
                            "fake stderr: drive {} is now {} bytes",
                            body["drive_id"],
                            md.len()
                        );
                        no_content()
                    }
                    Err(e) => bad(format!("drive {on_host}: {e}")),
                }
            }
            ("PATCH", "/vm") => match body["state"].as_str() {
                Some("Paused") => no_content(),
                Some("Resumed") => {
                    // A restored guest's agent reconnects after the vsock
                    // reset the snapshot recorded.
                    let uds = state.vsock_uds.lock().expect("lock").clone();
                    if let Some(uds) = uds {
                        tokio::spawn(guest_agent(uds));
                    }
                    no_content()
                }
                _ => bad("bad state".into()),
            },
            ("PUT", "/snapshot/create") => {
                // The state file keeps drive and vsock paths verbatim, as
                // Firecracker's does.
                let drives = state.drives.lock().expect("lock").clone();
                let uds = state.vsock_uds.lock().expect("lock").clone();
                let saved = json!({"drives": drives, "vsock_uds": uds}).to_string();
                let written =
                    std::fs::write(body["snapshot_path"].as_str().unwrap_or_default(), saved)
                        .and_then(|()| {
                            std::fs::write(
                                body["mem_file_path"].as_str().unwrap_or_default(),
                                b"guest memory",
                            )
                        });
                match written {
                    Ok(()) => no_content(),
                    Err(e) => bad(format!("snapshot: {e}")),
                }
            }
            ("PUT", "/snapshot/load") => {
                if state.configured.load(Ordering::SeqCst) {
                    return bad("Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
                }
                let saved =
                    std::fs::read_to_string(body["snapshot_path"].as_str().unwrap_or_default())
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
                let mem_ok = std::fs::metadata(
                    body["mem_backend"]["backend_path"]
                        .as_str()
                        .unwrap_or_default(),
                )
                .is_ok();
                let Some(saved) = saved.filter(|_| mem_ok) else {
                    eprintln!("fake stderr: cannot load the snapshot");
                    std::process::exit(1);
                };
                // Restored devices open their files now, relative to the
                // working directory.
                let drives = saved["drives"].as_array().cloned().unwrap_or_default();
                for d in &drives {
                    let on_host = d["path_on_host"].as_str().unwrap_or_default();
                    if std::fs::metadata(on_host).is_err() {
                        eprintln!("fake stderr: drive {on_host} missing");
                        std::process::exit(1);
                    }
                }
                *state.drives.lock().expect("lock") = drives;
                *state.vsock_uds.lock().expect("lock") =
                    saved["vsock_uds"].as_str().map(PathBuf::from);
                state.started.store(true, Ordering::SeqCst);
                no_content()
            }
            ("PUT", "/vsock") => {
                let uds = body["uds_path"].as_str().map(PathBuf::from);
                *state.vsock_uds.lock().expect("lock") = uds;
                no_content()
            }
            ("PUT", "/actions") => match body["action_type"].as_str() {
                Some("InstanceStart") => {
                    state.started.store(true, Ordering::SeqCst);
                    println!("fake guest console: Linux version 6.1.0 (fake)");
                    let _ = std::io::stdout().flush();
                    eprintln!("fake stderr: guest started");
                    let uds = state.vsock_uds.lock().expect("lock").clone();
                    if let Some(uds) = uds {
                        tokio::spawn(guest_agent(uds));
                    }
                    no_content()
                }
                Some("SendCtrlAltDel") => {
                    state.shutting_down.store(true, Ordering::SeqCst);
                    no_content()
                }
                _ => Ok(answer(
                    StatusCode::BAD_REQUEST,
                    Some(json!({"fault_message": "unknown action"})),
                )),
            },
            ("PUT", _) => no_content(),
            _ => Ok(answer(
                StatusCode::BAD_REQUEST,
                Some(json!({"fault_message": format!("no route {method} {path}")})),
            )),
        }
    }

    /// Connects to the host's listener for port 1024 as the guest agent
    /// does through Firecracker's hybrid vsock, and says hello.
    async fn guest_agent(uds: PathBuf) {
        use tokio::io::AsyncWriteExt;
        let mut target = uds.into_os_string();
        target.push(format!("_{}", banger_agent_proto::VSOCK_PORT));
        match tokio::net::UnixStream::connect(&target).await {
            Ok(mut s) => {
                let _ = s.write_all(GUEST_HELLO.as_bytes()).await;
                // Keep the connection open like a running agent.
                std::future::pending::<()>().await;
            }
            Err(e) => eprintln!("fake stderr: guest agent cannot connect: {e}"),
        }
    }
}
