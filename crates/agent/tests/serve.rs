//! The agent's protocol loop against the real host client (and a raw framed
//! host for what the client cannot send), over an in-memory pipe, running
//! real processes on the test machine.

use banger_agent::{Agent, Power, PowerError};
use banger_agent_proto::client::{AgentClient, ExecEvent, ExecSession};
use banger_agent_proto::{
    Body, CONTROL, ExecRequest, ExitStatus, Frame, FrameCodec, PROTO_VERSION,
};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

const LIMIT: Duration = Duration::from_secs(30);

/// Records shutdown requests instead of powering off the test machine.
struct RecordingPower(mpsc::UnboundedSender<bool>);

impl Power for RecordingPower {
    fn power_off(&self, reboot: bool) -> Result<(), PowerError> {
        let _ = self.0.send(reboot);
        Ok(())
    }
}

/// Starts an agent on one end of a pipe; returns the host end, the agent's
/// task and its shutdown requests.
fn start_agent() -> (DuplexStream, JoinHandle<()>, mpsc::UnboundedReceiver<bool>) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let (tx, shutdowns) = mpsc::unbounded_channel();
    let agent = Agent::new(Arc::new(RecordingPower(tx)));
    let task = tokio::spawn(async move { agent.serve(guest).await });
    (host, task, shutdowns)
}

async fn client() -> AgentClient {
    let (host, _, _) = start_agent();
    let c = AgentClient::spawn(host);
    timeout(LIMIT, c.wait_hello())
        .await
        .expect("hello in time")
        .expect("hello");
    c
}

/// A host speaking frames directly.
struct RawHost {
    rd: FramedRead<ReadHalf<DuplexStream>, FrameCodec>,
    wr: FramedWrite<WriteHalf<DuplexStream>, FrameCodec>,
}

impl RawHost {
    fn new(host: DuplexStream) -> Self {
        let (rd, wr) = tokio::io::split(host);
        Self {
            rd: FramedRead::new(rd, FrameCodec),
            wr: FramedWrite::new(wr, FrameCodec),
        }
    }

    async fn send(&mut self, channel: u32, body: Body) {
        self.wr.send(Frame::new(channel, body)).await.expect("send");
    }

    async fn recv(&mut self) -> Frame {
        let next = timeout(LIMIT, self.rd.next()).await.expect("frame in time");
        next.expect("stream open")
            .expect("no stream error")
            .expect("well-formed frame")
    }
}

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn with_stdin(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        stdin: true,
        ..cmd(argv)
    }
}

async fn next(s: &mut ExecSession) -> ExecEvent {
    timeout(LIMIT, s.next_event())
        .await
        .expect("event in time")
        .expect("connected")
        .expect("an event")
}

/// Stdout, stderr and the final event of a session.
async fn collect(mut s: ExecSession) -> (Vec<u8>, Vec<u8>, ExecEvent) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match next(&mut s).await {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(d) => err.extend(d),
            end => return (out, err, end),
        }
    }
}

fn exited(code: i32) -> ExecEvent {
    ExecEvent::Exited(ExitStatus {
        code: Some(code),
        signal: None,
    })
}

fn killed_by(signal: i32) -> ExecEvent {
    ExecEvent::Exited(ExitStatus {
        code: None,
        signal: Some(signal),
    })
}

#[tokio::test]
async fn greets_first_with_its_versions() {
    let (host, _, _) = start_agent();
    let mut h = RawHost::new(host);
    let first = h.recv().await;
    assert_eq!(first.channel, CONTROL);
    let Body::Hello(hello) = first.body else {
        panic!("first frame is not Hello: {first:?}")
    };
    assert_eq!(hello.proto_version, PROTO_VERSION);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(hello.uptime_ms > 0, "uptime comes from /proc/uptime");
}

#[tokio::test]
async fn streams_output_and_exit_code() {
    let c = client().await;
    let s = c
        .exec(cmd(&["sh", "-c", "echo hi; echo err >&2; exit 3"]))
        .expect("exec");
    assert_eq!(
        collect(s).await,
        (b"hi\n".to_vec(), b"err\n".to_vec(), exited(3))
    );
}

#[tokio::test]
async fn output_is_live_not_held_until_exit() {
    let c = client().await;
    let mut s = c
        .exec(with_stdin(&[
            "sh",
            "-c",
            "echo first; read line; echo \"got $line\"",
        ]))
        .expect("exec");
    // The process is blocked on stdin: "first" can only arrive if streamed.
    assert_eq!(next(&mut s).await, ExecEvent::Stdout(b"first\n".to_vec()));
    s.write_stdin(b"x\n").await.expect("stdin");
    assert_eq!(
        collect(s).await,
        (b"got x\n".to_vec(), Vec::new(), exited(0))
    );
}

#[tokio::test]
async fn stdin_round_trips_five_megabytes() {
    let c = client().await;
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let s = c.exec(with_stdin(&["cat"])).expect("exec");
    s.write_stdin(&data).await.expect("stdin");
    s.close_stdin().expect("eof");
    let (out, err, end) = collect(s).await;
    assert_eq!(end, exited(0));
    assert!(err.is_empty());
    assert_eq!(out.len(), data.len());
    assert!(out == data, "stdout differs from stdin");
}

#[tokio::test]
async fn signal_reaches_the_process() {
    let c = client().await;
    let s = c.exec(cmd(&["sleep", "100"])).expect("exec");
    s.signal(15).expect("signal");
    assert_eq!(collect(s).await, (Vec::new(), Vec::new(), killed_by(15)));
}

#[tokio::test]
async fn signal_reaches_the_whole_process_group() {
    let c = client().await;
    let mut s = c
        .exec(cmd(&["sh", "-c", "sleep 100 & echo started; wait"]))
        .expect("exec");
    assert_eq!(next(&mut s).await, ExecEvent::Stdout(b"started\n".to_vec()));
    // Were the background sleep spared, it would hold stdout open and the
    // session would not end for 100 s.
    s.signal(15).expect("signal");
    assert_eq!(collect(s).await.2, killed_by(15));
}

/// A command that cannot run exits like it would in a shell (127: not
/// found, 126: not executable) with the reason on stderr, so `vm exec`
/// and `vm run` can tell it from a failure of banger's own.
#[tokio::test]
async fn missing_command_exits_127_with_the_reason_on_stderr() {
    let c = client().await;
    for (argv0, msg) in [
        (
            "/nonexistent/banger-test-cmd",
            "banger-agent: /nonexistent/banger-test-cmd: No such file or directory\n",
        ),
        (
            "banger-no-such-command",
            "banger-agent: banger-no-such-command: command not found\n",
        ),
    ] {
        let s = c.exec(cmd(&[argv0, "x"])).expect("exec");
        let (out, err, end) = collect(s).await;
        assert!(out.is_empty());
        assert_eq!(String::from_utf8_lossy(&err), msg);
        assert_eq!(end, exited(127));
    }
}

#[tokio::test]
async fn non_executable_command_exits_126() {
    let c = client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").expect("write");
    let path = file.to_string_lossy().into_owned();
    for argv0 in [path.as_str(), "/"] {
        let s = c.exec(cmd(&[argv0])).expect("exec");
        let (out, err, end) = collect(s).await;
        assert!(out.is_empty());
        let err = String::from_utf8_lossy(&err).into_owned();
        assert!(
            err.starts_with(&format!("banger-agent: {argv0}: ")),
            "{err}"
        );
        assert_eq!(end, exited(126), "{argv0}: {err}");
    }
}

#[tokio::test]
async fn missing_working_directory_is_an_error() {
    let c = client().await;
    let req = ExecRequest {
        cwd: Some("/nonexistent-banger-dir".into()),
        ..cmd(&["true"])
    };
    let (_, _, end) = collect(c.exec(req).expect("exec")).await;
    assert_eq!(
        end,
        ExecEvent::Error("/nonexistent-banger-dir: No such file or directory".into())
    );
}

#[tokio::test]
async fn empty_command_is_an_error() {
    let c = client().await;
    let (_, _, end) = collect(c.exec(cmd(&[])).expect("exec")).await;
    assert_eq!(end, ExecEvent::Error("empty command".into()));
}

#[tokio::test]
async fn environment_and_directory_have_defaults_the_request_can_override() {
    let c = client().await;
    let script = "echo \"$PATH|$HOME|$USER|$LANG|$TERM|$EXTRA\"; pwd";
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = dir.path().to_str().expect("utf-8 path").to_string();
    let req = ExecRequest {
        env: vec![
            ("TERM".into(), "dumb".into()),
            ("EXTRA".into(), "yes".into()),
        ],
        cwd: Some(dir_path.clone()),
        ..cmd(&["sh", "-c", script])
    };
    let (out, _, end) = collect(c.exec(req).expect("exec")).await;
    assert_eq!(end, exited(0));
    let expected = format!(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|root|C.UTF-8|dumb|yes\n{dir_path}\n"
    );
    assert_eq!(String::from_utf8_lossy(&out), expected);

    let (out, _, _) = collect(c.exec(cmd(&["sh", "-c", "echo $TERM"])).expect("exec")).await;
    assert_eq!(out, b"xterm-256color\n");
}

#[tokio::test]
async fn processes_get_default_sigpipe() {
    let c = client().await;
    // With SIGPIPE ignored, `yes` would complain on stderr instead of dying.
    let s = c.exec(cmd(&["sh", "-c", "yes | head -n 1"])).expect("exec");
    assert_eq!(collect(s).await, (b"y\n".to_vec(), Vec::new(), exited(0)));
}

#[tokio::test]
async fn ping_gets_another_hello() {
    let (host, _, _) = start_agent();
    let mut h = RawHost::new(host);
    assert!(matches!(h.recv().await.body, Body::Hello(_)));
    h.send(CONTROL, Body::Ping).await;
    let again = h.recv().await;
    assert_eq!(again.channel, CONTROL);
    assert!(matches!(again.body, Body::Hello(_)), "got {again:?}");
}

#[tokio::test]
async fn malformed_frame_is_skipped() {
    let (mut host, _, _) = start_agent();
    // A frame whose payload is not a valid Frame, ahead of the client's.
    host.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .expect("write garbage");
    let c = AgentClient::spawn(host);
    timeout(LIMIT, c.wait_hello())
        .await
        .expect("hello in time")
        .expect("hello");
    let s = c.exec(cmd(&["echo", "still here"])).expect("exec");
    assert_eq!(
        collect(s).await,
        (b"still here\n".to_vec(), Vec::new(), exited(0))
    );
}

#[tokio::test]
async fn unexpected_frames_get_errors_on_their_channel() {
    let (host, _, _) = start_agent();
    let mut h = RawHost::new(host);
    h.recv().await; // hello

    h.send(9, Body::Stdin(b"nobody".to_vec())).await;
    let f = h.recv().await;
    assert_eq!(f.channel, 9);
    assert!(
        matches!(&f.body, Body::Error(m) if m.contains("no process")),
        "got {f:?}"
    );

    h.send(CONTROL, Body::Exec(cmd(&["true"]))).await;
    let f = h.recv().await;
    assert_eq!(f.channel, CONTROL);
    assert!(
        matches!(&f.body, Body::Error(m) if m.contains("Exec")),
        "got {f:?}"
    );

    h.send(4, Body::Stdout(b"backwards".to_vec())).await;
    let f = h.recv().await;
    assert_eq!(f.channel, 4);
    assert!(
        matches!(&f.body, Body::Error(m) if m.contains("Stdout")),
        "got {f:?}"
    );

    // The agent still works.
    h.send(5, Body::Exec(cmd(&["echo", "ok"]))).await;
    assert_eq!(
        h.recv().await,
        Frame::new(5, Body::Stdout(b"ok\n".to_vec()))
    );
    assert_eq!(
        h.recv().await,
        Frame::new(
            5,
            Body::Exited(ExitStatus {
                code: Some(0),
                signal: None
            })
        )
    );
}

#[tokio::test]
async fn protocol_violation_on_a_live_channel_ends_its_process() {
    let c = client().await;
    // stdin was not requested, so sending some is a violation.
    let s = c.exec(cmd(&["sleep", "100"])).expect("exec");
    s.write_stdin(b"unwanted").await.expect("stdin");
    let (_, _, end) = collect(s).await;
    assert!(
        matches!(&end, ExecEvent::Error(m) if m.contains("stdin")),
        "got {end:?}"
    );
}

#[tokio::test]
async fn concurrent_execs_are_independent() {
    let c = client().await;
    let mut slow = c
        .exec(with_stdin(&[
            "sh",
            "-c",
            "echo ready; read line; echo \"slow $line\"",
        ]))
        .expect("exec");
    assert_eq!(
        next(&mut slow).await,
        ExecEvent::Stdout(b"ready\n".to_vec())
    );
    // A second process runs to completion while the first still waits.
    let fast = c
        .exec(cmd(&["sh", "-c", "echo fast; echo fast-err >&2; exit 7"]))
        .expect("exec");
    assert_eq!(
        collect(fast).await,
        (b"fast\n".to_vec(), b"fast-err\n".to_vec(), exited(7))
    );
    slow.write_stdin(b"done\n").await.expect("stdin");
    assert_eq!(
        collect(slow).await,
        (b"slow done\n".to_vec(), Vec::new(), exited(0))
    );
}

#[tokio::test]
async fn many_concurrent_execs() {
    let c = client().await;
    let sessions: Vec<_> = (0..20)
        .map(|i| {
            c.exec(cmd(&["sh", "-c", &format!("echo {i}; exit {i}")]))
                .expect("exec")
        })
        .collect();
    let results = futures::future::join_all(sessions.into_iter().map(collect)).await;
    for (i, (out, _, end)) in results.into_iter().enumerate() {
        assert_eq!(out, format!("{i}\n").into_bytes());
        assert_eq!(end, exited(i as i32));
    }
}

#[tokio::test]
async fn shutdown_requests_reach_the_power_control() {
    let (host, _, mut shutdowns) = start_agent();
    let c = AgentClient::spawn(host);
    c.wait_hello().await.expect("hello");
    c.shutdown(false).expect("shutdown");
    assert_eq!(
        timeout(LIMIT, shutdowns.recv()).await.expect("in time"),
        Some(false)
    );
    c.shutdown(true).expect("reboot");
    assert_eq!(
        timeout(LIMIT, shutdowns.recv()).await.expect("in time"),
        Some(true)
    );
}

#[tokio::test]
async fn closing_the_connection_kills_its_processes() {
    let (host, serving, _) = start_agent();
    let mut h = RawHost::new(host);
    h.recv().await; // hello
    h.send(1, Body::Exec(cmd(&["sh", "-c", "echo $$; exec sleep 100"])))
        .await;
    let Body::Stdout(pid) = h.recv().await.body else {
        panic!("expected the pid")
    };
    let pid = String::from_utf8(pid).expect("utf-8").trim().to_string();
    let proc_dir = std::path::Path::new("/proc").join(&pid);
    assert!(proc_dir.exists(), "sleep {pid} runs");

    drop(h);
    timeout(LIMIT, serving)
        .await
        .expect("serve returns when the host leaves")
        .expect("serve task");
    // serve() reaps what it killed before returning.
    assert!(!proc_dir.exists(), "sleep {pid} was not killed");
}

/// Output is under credit: a host that takes nothing gets exactly the
/// window, then nothing more however much the process writes; credit lets
/// more through, and ending the channel kills the process.
#[tokio::test]
async fn output_waits_for_credit() {
    use banger_agent_proto::OUTPUT_WINDOW;
    let (host, _, _) = start_agent();
    let mut h = RawHost::new(host);
    let hello = h.recv().await;
    assert!(matches!(hello.body, Body::Hello(_)), "{hello:?}");
    h.send(7, Body::Exec(cmd(&["yes", "flood"]))).await;
    let stdout_frames = |f: &Frame| f.channel == 7 && matches!(f.body, Body::Stdout(_));
    for i in 0..OUTPUT_WINDOW {
        let f = h.recv().await;
        assert!(stdout_frames(&f), "frame {i}: {f:?}");
    }
    // `yes` keeps writing; without credit the agent sends nothing, so the
    // next frame on the channel is the answer to our abort.
    h.send(7, Body::Credit(2)).await;
    for _ in 0..2 {
        let f = h.recv().await;
        assert!(stdout_frames(&f), "{f:?}");
    }
    h.send(7, Body::Error("enough".into())).await;
    let f = h.recv().await;
    assert_eq!(f.channel, 7);
    match f.body {
        Body::Error(m) => assert!(m.contains("enough"), "{m}"),
        other => panic!("more output than the credit allowed: {other:?}"),
    }
}

/// The client grants credit as output is taken, so a long stream flows.
#[tokio::test]
async fn a_stream_longer_than_the_window_flows_through_the_client() {
    let c = client().await;
    let s = c
        .exec(cmd(&["head", "-c", "20000000", "/dev/zero"]))
        .expect("exec");
    let (out, err, last) = collect(s).await;
    assert_eq!(out.len(), 20_000_000);
    assert!(err.is_empty());
    assert_eq!(last, exited(0));
}

#[tokio::test]
async fn reports_how_the_guest_booted() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let (tx, _shutdowns) = mpsc::unbounded_channel();
    let boot = banger_agent::bootinfo::BootInfo {
        start: banger_agent_proto::AgentStart::Initramfs,
        started_ms: 1234,
        init: Some(("/sbin/init".into(), false)),
    };
    let agent = Agent::with_boot(Arc::new(RecordingPower(tx)), boot);
    tokio::spawn(async move { agent.serve(guest).await });
    let c = AgentClient::spawn(host);
    timeout(LIMIT, c.wait_hello())
        .await
        .expect("hello in time")
        .expect("hello");
    for wait in [false, true] {
        let r = timeout(LIMIT, c.boot_status(wait))
            .await
            .expect("answer in time")
            .expect("report");
        assert_eq!(r.agent, banger_agent_proto::AgentStart::Initramfs);
        assert_eq!(r.agent_start_ms, 1234);
        // Not systemd: nothing to wait for, even with `wait`.
        assert_eq!(r.system.describe(), "no-systemd");
        assert!(!r.system.is_booting());
    }
}

#[tokio::test]
async fn says_once_when_the_first_greeting_is_out() {
    let (tx, _shutdowns) = mpsc::unbounded_channel();
    let agent = Agent::new(Arc::new(RecordingPower(tx)));
    let (greeted_tx, mut greeted) = mpsc::unbounded_channel();
    agent.on_first_greeting(move || {
        let _ = greeted_tx.send(());
    });
    for round in 0..2 {
        let (host, guest) = tokio::io::duplex(1 << 20);
        let a = agent.clone();
        let task = tokio::spawn(async move { a.serve(guest).await });
        let mut h = RawHost::new(host);
        assert!(matches!(h.recv().await.body, Body::Hello(_)));
        if round == 0 {
            timeout(LIMIT, greeted.recv())
                .await
                .expect("told in time")
                .expect("told");
        }
        drop(h);
        timeout(LIMIT, task).await.expect("ends").expect("task");
    }
    // The hook is gone after the first connection: nothing more arrives.
    assert!(greeted.try_recv().is_err());
}

#[tokio::test]
async fn greets_at_once_and_holds_commands_until_the_guest_is_prepared() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let (tx, _shutdowns) = mpsc::unbounded_channel();
    let (rd, wr) = nix::unistd::pipe().expect("pipe");
    let prepared = banger_agent::Prepared::from_pipe(rd, LIMIT);
    let agent = Agent::new(Arc::new(RecordingPower(tx))).with_prepared(prepared);
    tokio::spawn(async move { agent.serve(guest).await });
    let c = AgentClient::spawn(host);
    timeout(LIMIT, c.wait_hello())
        .await
        .expect("hello before the guest is prepared")
        .expect("hello");
    // Boot status is answered while the guest is being prepared.
    timeout(LIMIT, c.boot_status(false))
        .await
        .expect("boot status in time")
        .expect("report");
    let mut s = c.exec(cmd(&["echo", "ran"])).expect("exec");
    let held = timeout(Duration::from_millis(300), s.next_event()).await;
    assert!(
        held.is_err(),
        "the command ran before the guest was prepared"
    );
    drop(wr);
    let (out, _, end) = collect(s).await;
    assert_eq!(out, b"ran\n");
    assert_eq!(end, exited(0));
}
