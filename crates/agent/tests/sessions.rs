//! Terminals and supervised sessions, against a real agent over an
//! in-memory pipe, running real processes on the test machine.

use banger_agent::{Agent, Power, PowerError};
use banger_agent_proto::client::{AgentClient, ExecEvent, ExecSession};
use banger_agent_proto::{ExecRequest, SessionSpec, StdinMode, TtySize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

struct NoPower;

impl Power for NoPower {
    fn power_off(&self, _reboot: bool) -> Result<(), PowerError> {
        Ok(())
    }
}

/// An agent and a way to open fresh host connections to it.
struct Guest(Agent);

impl Guest {
    fn new() -> Self {
        Self(Agent::new(Arc::new(NoPower)))
    }

    async fn connect(&self) -> AgentClient {
        let (host, guest) = tokio::io::duplex(1 << 20);
        let agent = self.0.clone();
        tokio::spawn(async move { agent.serve(guest).await });
        let c = AgentClient::spawn(host);
        timeout(LIMIT, c.wait_hello())
            .await
            .expect("in time")
            .expect("hello");
        c
    }
}

async fn next(s: &mut ExecSession) -> ExecEvent {
    timeout(LIMIT, s.next_event())
        .await
        .expect("event in time")
        .expect("connected")
        .expect("an event")
}

/// Reads stdout until it contains `needle`; returns all of it.
async fn read_until(s: &mut ExecSession, needle: &str) -> String {
    let mut out = String::new();
    while !out.contains(needle) {
        match next(s).await {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => {
                out.push_str(&String::from_utf8_lossy(&d))
            }
            end => panic!("ended before {needle:?}: {end:?}; output {out:?}"),
        }
    }
    out
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn exec_on_a_tty_has_a_terminal_of_the_given_size_and_resizes() {
    let c = Guest::new().connect().await;
    let mut s = c
        .exec(ExecRequest {
            argv: argv(&["sh", "-c", "tty; stty size; read x; stty size"]),
            stdin: true,
            tty: Some(TtySize {
                rows: 33,
                cols: 111,
            }),
            ..Default::default()
        })
        .expect("exec");
    let out = read_until(&mut s, "33 111").await;
    assert!(out.contains("/dev/pts/"), "{out:?}");
    s.resize(TtySize {
        rows: 44,
        cols: 122,
    })
    .expect("resize");
    s.write_stdin(b"\n").await.expect("stdin");
    read_until(&mut s, "44 122").await;
    loop {
        match next(&mut s).await {
            ExecEvent::Exited(st) => {
                assert_eq!(st.code, Some(0));
                break;
            }
            ExecEvent::Stdout(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sessions_outlive_their_connection_and_keep_logs() {
    let guest = Guest::new();
    let c = guest.connect().await;
    let info = c
        .session_start(SessionSpec {
            name: "svc".into(),
            argv: argv(&[
                "sh",
                "-c",
                "echo started; echo oops >&2; while read l; do echo got $l; done",
            ]),
            stdin: StdinMode::Pipe,
            ..Default::default()
        })
        .await
        .expect("start");
    assert!(info.status.is_none());
    // Same name while running: refused.
    let dup = c
        .session_start(SessionSpec {
            name: "svc".into(),
            argv: argv(&["true"]),
            ..Default::default()
        })
        .await;
    assert!(dup.is_err());
    drop(c);

    // A new connection still sees it and its logs.
    let c = guest.connect().await;
    let mut logs = c.session_logs("svc", None, true).expect("logs");
    let out = read_until(&mut logs, "oops").await;
    assert!(out.contains("started"), "{out:?}");
    logs.detach().expect("detach");
    loop {
        if let ExecEvent::Session(s) = next(&mut logs).await {
            assert!(s.status.is_none());
            break;
        }
    }

    // Attach, feed input, see the answer, detach.
    let mut a = c.session_attach("svc").expect("attach");
    a.write_stdin(b"hello\n").await.expect("stdin");
    read_until(&mut a, "got hello").await;
    drop(a);

    let list = c.session_list().await.expect("list");
    assert_eq!(list.len(), 1);
    assert!(list[0].stdout_bytes >= 8);

    let stopped = timeout(LIMIT, c.session_stop("svc"))
        .await
        .expect("in time")
        .expect("stop");
    assert_eq!(stopped.status.and_then(|s| s.signal), Some(15));
    assert!(c.session_list().await.expect("list").is_empty());
    assert!(c.session_stop("svc").await.is_err());
}

#[tokio::test]
async fn an_ended_session_reports_its_status() {
    let c = Guest::new().connect().await;
    c.session_start(SessionSpec {
        name: "short".into(),
        argv: argv(&["sh", "-c", "echo bye; exit 3"]),
        stdin: StdinMode::Null,
        ..Default::default()
    })
    .await
    .expect("start");
    let mut logs = c.session_logs("short", None, true).expect("logs");
    let status = loop {
        if let ExecEvent::Session(s) = next(&mut logs).await {
            break s.status;
        }
    };
    assert_eq!(status.and_then(|s| s.code), Some(3));
    assert!(c.session_attach("nope").is_ok());
    assert!(
        c.session_start(SessionSpec {
            name: "../x".into(),
            argv: argv(&["true"]),
            ..Default::default()
        })
        .await
        .is_err()
    );
}
