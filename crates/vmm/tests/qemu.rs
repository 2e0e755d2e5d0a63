//! The QEMU backend against the real qemu-system-x86_64.

mod common;

use banger_vmm::qmp::{Qmp, RunState};
use banger_vmm::{AgentEndpoint, QemuVmm, VmPaths, Vmm, VmmError, host, vmm_process_alive};
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
