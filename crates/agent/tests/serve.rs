//! The agent's protocol loop against the real host client, over an
//! in-memory pipe, running real processes on this machine.

use banger_agent::serve::ShutdownFn;
use banger_agent_proto::client::{AgentClient, ExecEvent};
use banger_agent_proto::{ExecRequest, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn start() -> (AgentClient, Arc<AtomicU32>) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let shutdowns = Arc::new(AtomicU32::new(0));
    let s = shutdowns.clone();
    let on_shutdown: ShutdownFn = Arc::new(move |_| {
        s.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(banger_agent::serve(guest, on_shutdown));
    (AgentClient::spawn(host), shutdowns)
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), cwd: Some("/".into()), ..Default::default() }
}

/// Collects stdout, stderr and the end of a session.
async fn collect(mut s: banger_agent_proto::client::ExecSession) -> (Vec<u8>, Vec<u8>, ExecEvent) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), s.next_event()).await.expect("timely").expect("event");
        match ev {
            Some(ExecEvent::Stdout(d)) => out.extend(d),
            Some(ExecEvent::Stderr(d)) => err.extend(d),
            Some(end) => return (out, err, end),
            None => panic!("session ended without a final event"),
        }
    }
}

#[tokio::test]
async fn greets_and_runs_a_command() {
    let (c, _) = start();
    let hello = c.wait_hello().await.expect("hello");
    assert_eq!(hello.proto_version, banger_agent_proto::PROTO_VERSION);
    let s = c.exec(req(&["sh", "-c", "echo hi; echo err >&2; exit 3"])).expect("exec");
    let (out, err, end) = collect(s).await;
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"err\n");
    assert_eq!(end, ExecEvent::Exited(ExitStatus { code: Some(3), signal: None }));
}

#[tokio::test]
async fn stdin_round_trips_five_megabytes() {
    let (c, _) = start();
    c.wait_hello().await.expect("hello");
    let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let s = c.exec(ExecRequest { stdin: true, ..req(&["cat"]) }).expect("exec");
    s.write_stdin(&data).expect("stdin");
    s.close_stdin().expect("eof");
    let (out, _, end) = collect(s).await;
    assert_eq!(end, ExecEvent::Exited(ExitStatus { code: Some(0), signal: None }));
    assert!(out == data, "stdout differs from stdin ({} vs {} bytes)", out.len(), data.len());
}

#[tokio::test]
async fn signals_reach_the_process() {
    let (c, _) = start();
    c.wait_hello().await.expect("hello");
    let mut s = c.exec(req(&["sh", "-c", "echo started; exec sleep 100"])).expect("exec");
    // Wait until it runs, then signal it.
    assert_eq!(s.next_event().await.expect("ev"), Some(ExecEvent::Stdout(b"started\n".to_vec())));
    s.signal(15).expect("signal");
    let (_, _, end) = collect(s).await;
    assert_eq!(end, ExecEvent::Exited(ExitStatus { code: None, signal: Some(15) }));
}

#[tokio::test]
async fn missing_command_is_an_error_not_a_crash() {
    let (c, _) = start();
    c.wait_hello().await.expect("hello");
    let (_, _, end) = collect(c.exec(req(&["/nonexistent/cmd"])).expect("exec")).await;
    assert!(matches!(end, ExecEvent::Error(ref m) if m.contains("No such file")), "{end:?}");
    // The agent still works.
    let (out, _, _) = collect(c.exec(req(&["echo", "alive"])).expect("exec")).await;
    assert_eq!(out, b"alive\n");
}

#[tokio::test]
async fn ping_gets_another_hello_and_shutdown_is_delivered() {
    let (c, shutdowns) = start();
    c.wait_hello().await.expect("hello");
    c.ping().expect("ping");
    c.wait_hello().await.expect("hello again");
    c.shutdown(false).expect("shutdown");
    // Shutdown is handled in order: an exec after it completes only after it.
    let _ = collect(c.exec(req(&["true"])).expect("exec")).await;
    assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_execs_are_independent() {
    let (c, _) = start();
    c.wait_hello().await.expect("hello");
    let a = c.exec(req(&["sh", "-c", "sleep 0.2; echo a; exit 1"])).expect("a");
    let b = c.exec(req(&["sh", "-c", "echo b; exit 2"])).expect("b");
    let (ra, rb) = tokio::join!(collect(a), collect(b));
    assert_eq!((ra.0, ra.2), (b"a\n".to_vec(), ExecEvent::Exited(ExitStatus { code: Some(1), signal: None })));
    assert_eq!((rb.0, rb.2), (b"b\n".to_vec(), ExecEvent::Exited(ExitStatus { code: Some(2), signal: None })));
}

#[tokio::test]
async fn malformed_frame_does_not_kill_the_agent() {
    use tokio::io::AsyncWriteExt;
    let (mut host, guest) = tokio::io::duplex(1 << 16);
    let noop: ShutdownFn = Arc::new(|_| {});
    tokio::spawn(banger_agent::serve(guest, noop));
    // A length-prefixed frame of garbage, then a valid client on the same stream.
    host.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.expect("write");
    let c = AgentClient::spawn(host);
    c.wait_hello().await.expect("hello");
    let (out, _, _) = collect(c.exec(req(&["echo", "ok"])).expect("exec")).await;
    assert_eq!(out, b"ok\n");
}

#[test]
fn finds_the_port_by_name() {
    let t = tempfile::tempdir().expect("tmp");
    for (dev, name) in [("vport0p0", "other"), ("vport0p1", banger_agent_proto::VIRTIO_PORT_NAME)] {
        std::fs::create_dir_all(t.path().join(dev)).expect("dir");
        std::fs::write(t.path().join(dev).join("name"), format!("{name}\n")).expect("name");
    }
    assert_eq!(banger_agent::transport::scan_ports(t.path()), Some(std::path::PathBuf::from("/dev/vport0p1")));
    assert_eq!(banger_agent::transport::scan_ports(&t.path().join("missing")), None);
}
