//! The QEMU backend against the real qemu-system-x86_64.

mod common;

use banger_vmm::qmp::{Qmp, RunState};
use banger_vmm::{
    AgentEndpoint, QemuVmm, RestoreSpec, SnapshotFiles, VmPaths, Vmm, VmmError, WarmSupport, host,
    vmm_process_alive,
};
use common::{KillOnDrop, processes_mentioning, spec};
use std::time::Duration;

/// Bound on waiting for a VMM process to be reaped.
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn vmm() -> QemuVmm {
    QemuVmm::from_host(None).expect("qemu-system-x86_64 must be installed for these tests")
}

#[test]
fn host_qemu_is_recent_enough() {
    let version = host::qemu_version(vmm().binary()).expect("qemu --version");
    assert!(version.major >= 7, "{version}");
}

#[tokio::test]
async fn launch_control_and_terminate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = vmm();
    let paths = VmPaths::new(&spec.dir);

    let launched = vmm.launch(&spec).await.expect("launch");
    let pid = launched.pid;
    let _cleanup = KillOnDrop {
        pid,
        dir: spec.dir.clone(),
    };
    assert!(
        vmm_process_alive(pid, &spec.dir),
        "VMM {pid} not recognised by its dir"
    );
    let pid_file = std::fs::read_to_string(paths.pid_file()).expect("pid file");
    assert_eq!(pid_file.trim(), pid.to_string());
    assert!(paths.console_log().exists());
    // Its own session, so terminal signals to the daemon never reach it.
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .ok()
            .map(|p| p.as_raw()),
        Some(pid as i32)
    );

    let mut qmp = Qmp::connect(&paths.control_socket())
        .await
        .expect("QMP connect");
    let status = qmp.query_status().await.expect("query-status");
    assert!(status.running);
    assert_eq!(status.status, RunState::running);
    drop(qmp);

    let AgentEndpoint::Connect(agent) = launched.agent else {
        panic!("QEMU serves the agent socket")
    };
    assert_eq!(agent, paths.agent_socket());
    let stream = AgentEndpoint::Connect(agent.clone())
        .open()
        .await
        .expect("agent socket accepts");
    drop(stream);
    match vmm.reattach_agent(&spec.dir).expect("reattach") {
        AgentEndpoint::Connect(p) => assert_eq!(p, agent),
        other => panic!("unexpected endpoint {other:?}"),
    }

    // Delivered, not obeyed: the halted stub has no ACPI handler.
    vmm.request_shutdown(&spec.dir)
        .await
        .expect("system_powerdown delivered");
    assert!(vmm_process_alive(pid, &spec.dir));

    vmm.terminate(&spec.dir, pid).await.expect("terminate");
    tokio::time::timeout(EXIT_WAIT, launched.exited)
        .await
        .expect("exited resolves")
        .expect("join");
    assert!(!vmm_process_alive(pid, &spec.dir));
    assert!(processes_mentioning(&spec.dir).is_empty());
    // Already gone is fine.
    vmm.terminate(&spec.dir, pid)
        .await
        .expect("terminate again");
}

#[tokio::test]
async fn missing_disk_is_an_early_exit_with_the_log_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut spec = spec(tmp.path());
    let missing = tmp.path().join("no-such-disk.raw");
    spec.disks[1].path = missing.clone();

    let err = vmm().launch(&spec).await.expect_err("launch must fail");
    match &err {
        VmmError::EarlyExit { detail, log, .. } => {
            assert_eq!(log, &VmPaths::new(&spec.dir).vmm_log());
            assert!(detail.contains("no-such-disk.raw"), "{detail}");
            assert!(detail.contains("exit status"), "{detail}");
        }
        other => panic!("expected EarlyExit, got {other:?}"),
    }
    assert!(!err.to_string().contains('\n'), "one-line error: {err}");
    assert!(processes_mentioning(&spec.dir).is_empty());
}

#[tokio::test]
async fn unknown_kernel_is_an_early_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut spec = spec(tmp.path());
    spec.kernel = tmp.path().join("no-such-vmlinuz");
    let err = vmm().launch(&spec).await.expect_err("launch must fail");
    assert!(
        matches!(&err, VmmError::EarlyExit { detail, .. } if detail.contains("no-such-vmlinuz")),
        "{err:?}"
    );
    assert!(processes_mentioning(&spec.dir).is_empty());
}

#[tokio::test]
async fn vmm_killed_from_outside_is_reaped_and_terminate_is_ok() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(tmp.path());
    let vmm = vmm();
    let launched = vmm.launch(&spec).await.expect("launch");
    let _cleanup = KillOnDrop {
        pid: launched.pid,
        dir: spec.dir.clone(),
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launched.pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .expect("kill");
    tokio::time::timeout(EXIT_WAIT, launched.exited)
        .await
        .expect("exited resolves")
        .expect("join");
    assert!(!vmm_process_alive(launched.pid, &spec.dir));
    vmm.terminate(&spec.dir, launched.pid)
        .await
        .expect("terminate a dead VMM");
    assert!(
        vmm.request_shutdown(&spec.dir).await.is_err(),
        "no QMP on a dead VMM"
    );
}

#[tokio::test]
async fn terminate_kills_a_vmm_that_does_not_answer_qmp() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vm");
    std::fs::create_dir(&dir).expect("dir");
    // A stand-in VMM: names the VM dir on its command line, serves no QMP,
    // blocks on its stdin (held open below) and has no children.
    let mut fake = std::process::Command::new("sh")
        .args(["-c", "echo started; read line"])
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sh");
    // Its command line is only complete once it runs (spawn returns earlier).
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(fake.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line, "started\n");
    let pid = fake.id();
    assert!(vmm_process_alive(pid, &dir));

    vmm().terminate(&dir, pid).await.expect("terminate");
    let status = fake.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[tokio::test]
async fn terminate_leaves_other_processes_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vm");
    std::fs::create_dir(&dir).expect("dir");
    // Alive, but not the VMM of `dir` (a reused pid, say).
    let mut other = std::process::Command::new("sh")
        .args(["-c", "read line"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sh");
    vmm().terminate(&dir, other.id()).await.expect("terminate");
    assert_eq!(
        other.try_wait().expect("try_wait"),
        None,
        "unrelated process was killed"
    );
    other.kill().expect("kill");
    other.wait().expect("wait");
}

#[test]
fn reattach_without_socket_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = vmm().reattach_agent(tmp.path()).expect_err("no socket");
    assert!(err.to_string().contains("agent.sock"), "{err}");
}

/// The argv of process `pid` with `dir` replaced by `<dir>`.
fn argv_of(pid: u32, dir: &std::path::Path) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let dir = dir.to_string_lossy().into_owned();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).replace(&dir, "<dir>"))
        .collect()
}

#[tokio::test]
async fn warm_support_is_probed_from_the_binary() {
    let vmm = vmm();
    let version = host::qemu_version(vmm.binary()).expect("qemu --version");
    let support = vmm.warm_support().await;
    if (version.major, version.minor) >= (8, 2) {
        assert_eq!(
            support,
            WarmSupport::Supported {
                id: format!("QEMU {version}")
            }
        );
    } else {
        assert!(
            matches!(&support, WarmSupport::Unsupported(why) if why.contains(">= 8.2")),
            "{support:?}"
        );
    }
    // Cached: the same answer without another probe.
    assert_eq!(vmm.warm_support().await, support);
}

/// A running VM with its memory in a file is saved (device state only) and
/// restored into a new QEMU in another directory, with its own copy of the
/// writable disk and the memory file mapped privately: the clone runs, its
/// argv is the template's with that mapping plus `-S -incoming defer` (host
/// paths aside), it never writes the template's memory, and its disk grows
/// online.
#[tokio::test]
async fn snapshot_restore_and_grow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vmm = vmm();
    if !matches!(vmm.warm_support().await, WarmSupport::Supported { .. }) {
        eprintln!("SKIPPED: this QEMU cannot restore from a file");
        return;
    }
    assert!(vmm.snapshot_memory_at_launch());
    let template = spec(tmp.path());
    // The writable disk inside the VM directory, like banger's.
    let mut template = template;
    let own = template.dir.join("work.raw");
    std::fs::rename(&template.disks[1].path, &own).expect("move disk");
    template.disks[1].path = own;
    let files = SnapshotFiles {
        memory: tmp.path().join("memory"),
        vmstate: tmp.path().join("vmstate"),
    };
    template.memory_file = Some(files.memory.clone());
    let launched = vmm.launch(&template).await.expect("launch");
    let _cleanup = KillOnDrop {
        pid: launched.pid,
        dir: template.dir.clone(),
    };
    let template_argv = argv_of(launched.pid, &template.dir);
    // The firmware loads the kernel at 1 MiB once the guest runs: until
    // then the shared memory file is all zeros.
    let loaded = || {
        use std::os::unix::fs::FileExt;
        let mut page = [0u8; 4096];
        std::fs::File::open(&files.memory)
            .and_then(|f| f.read_exact_at(&mut page, 1 << 20))
            .is_ok_and(|()| page.iter().any(|b| *b != 0))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !loaded() {
        assert!(std::time::Instant::now() < deadline, "the guest never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A memory file the VM was not launched with is refused, the VM untouched.
    let elsewhere = SnapshotFiles {
        memory: tmp.path().join("other-memory"),
        ..files.clone()
    };
    let err = vmm
        .snapshot(&template.dir, launched.pid, &elsewhere)
        .await
        .expect_err("not its memory");
    assert!(
        matches!(err, VmmError::Spec(ref m) if m.contains("is not in")),
        "{err:?}"
    );
    assert!(!files.vmstate.exists(), "a refused snapshot left its file");

    vmm.snapshot(&template.dir, launched.pid, &files)
        .await
        .expect("snapshot");
    tokio::time::timeout(EXIT_WAIT, launched.exited)
        .await
        .expect("the template's QEMU ends after its snapshot")
        .expect("join");
    let vmstate = std::fs::read(&files.vmstate).expect("vmstate file");
    assert_eq!(&vmstate[..4], b"QEVM", "not a QEMU migration stream");
    assert!(
        vmstate.len() < 4 << 20,
        "RAM left the stream: {} bytes",
        vmstate.len()
    );
    let memory = std::fs::read(&files.memory).expect("memory file");
    assert_eq!(memory.len() as u64, template.memory_mib << 20);
    assert!(
        memory.iter().any(|b| *b != 0),
        "the guest's memory is not in the file"
    );
    use std::os::unix::fs::PermissionsExt;
    for f in [&files.memory, &files.vmstate] {
        let mode = std::fs::metadata(f).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", f.display());
    }

    let clone_dir = tmp.path().join("clone");
    std::fs::create_dir(&clone_dir).expect("clone dir");
    std::fs::copy(&template.disks[1].path, clone_dir.join("work.raw")).expect("copy disk");
    let mut launch = template.clone();
    launch.dir = clone_dir.clone();
    launch.disks[1].path = clone_dir.join("work.raw");
    let restore = RestoreSpec {
        launch,
        from: files.clone(),
        template_nets: template.nets.clone(),
    };
    let restored = vmm
        .restore(&restore, banger_vmm::disks_ready())
        .await
        .expect("restore");
    let _cleanup_clone = KillOnDrop {
        pid: restored.pid,
        dir: clone_dir.clone(),
    };
    let paths = VmPaths::new(&clone_dir);
    let mut qmp = Qmp::connect(&paths.control_socket())
        .await
        .expect("QMP connect");
    let status = qmp.query_status().await.expect("query-status");
    assert_eq!(status.status, RunState::running);
    assert!(status.running);
    drop(qmp);
    let shared = format!("share=on,mem-path={}", files.memory.display());
    let private = format!(
        "share=off,readonly=on,rom=off,mem-path={}",
        files.memory.display()
    );
    let mut want: Vec<String> = template_argv
        .iter()
        .map(|a| a.replace(&shared, &private))
        .collect();
    assert_ne!(
        want, template_argv,
        "no shared memory backend in {template_argv:?}"
    );
    want.extend(["-S", "-incoming", "defer"].map(String::from));
    assert_eq!(argv_of(restored.pid, &clone_dir), want);
    assert!(matches!(restored.agent, AgentEndpoint::Connect(ref p) if *p == paths.agent_socket()));

    vmm.grow_disk(&clone_dir, 1, 2 << 20).await.expect("grow");
    assert_eq!(
        std::fs::metadata(clone_dir.join("work.raw"))
            .expect("disk")
            .len(),
        2 << 20
    );
    assert_eq!(
        std::fs::metadata(&template.disks[1].path)
            .expect("disk")
            .len(),
        1 << 20
    );
    vmm.grow_disk(&clone_dir, 1, 2 << 20)
        .await
        .expect("same size");
    let err = vmm
        .grow_disk(&clone_dir, 1, 1 << 20)
        .await
        .expect_err("shrink");
    assert!(err.to_string().contains("only grow"), "{err}");

    vmm.terminate(&clone_dir, restored.pid)
        .await
        .expect("terminate");
    tokio::time::timeout(EXIT_WAIT, restored.exited)
        .await
        .expect("reaped")
        .expect("join");

    assert!(
        std::fs::read(&files.memory).expect("memory") == memory,
        "the clone wrote the template's memory"
    );

    // A truncated snapshot fails to load and leaves nothing running: the
    // device state when QEMU reads it, the memory before QEMU starts.
    let short = tmp.path().join("short");
    std::fs::write(&short, &vmstate[..vmstate.len() / 2]).expect("short");
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).expect("dir");
    let mut bad = restore.clone();
    bad.launch.dir = broken.clone();
    bad.from.vmstate = short;
    let err = vmm
        .restore(&bad, banger_vmm::disks_ready())
        .await
        .expect_err("truncated");
    assert!(
        matches!(
            err,
            VmmError::Snapshot {
                what: "loading the snapshot",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(processes_mentioning(&broken).is_empty());
    let short_memory = tmp.path().join("short-memory");
    std::fs::write(&short_memory, &memory[..memory.len() / 2]).expect("short");
    let mut bad = restore.clone();
    bad.launch.dir = broken.clone();
    bad.from.memory = short_memory;
    let err = vmm
        .restore(&bad, banger_vmm::disks_ready())
        .await
        .expect_err("truncated memory");
    assert!(
        matches!(err, VmmError::Spec(ref m) if m.contains("the guest has")),
        "{err:?}"
    );
    assert!(processes_mentioning(&broken).is_empty());

    // The disk copies are made while QEMU starts: it waits for them
    // (running already), and ends when they could not be made.
    let mut waiting = restore.clone();
    waiting.launch.dir = broken.clone();
    let up_while_waiting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, dir) = (up_while_waiting.clone(), broken.clone());
    let gate = Box::pin(async move {
        seen.store(
            !processes_mentioning(&dir).is_empty(),
            std::sync::atomic::Ordering::SeqCst,
        );
        false
    });
    let err = vmm.restore(&waiting, gate).await.expect_err("no disks");
    assert!(matches!(err, VmmError::DisksUnavailable), "{err:?}");
    assert!(up_while_waiting.load(std::sync::atomic::Ordering::SeqCst));
    assert!(processes_mentioning(&broken).is_empty());
}
