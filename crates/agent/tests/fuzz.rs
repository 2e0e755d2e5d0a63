//! Arbitrary byte streams and frame sequences sent to a real agent: it never
//! panics or hangs, a malformed frame closes only its own channel, and the
//! control channel keeps answering afterwards.

use banger_agent::{Agent, HostFrames, Power, PowerError};
use banger_agent_proto::{Body, CONTROL, ExecRequest, Frame, FrameCodec, SessionSpec, StdinMode};
use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

struct NoPower;

impl Power for NoPower {
    fn power_off(&self, _reboot: bool) -> Result<(), PowerError> {
        Ok(())
    }
}

/// Host frames built only from harmless commands (the agent runs them on
/// this machine).
fn body() -> impl Strategy<Value = Body> {
    let argv = prop_oneof![
        Just(vec![]),
        Just(vec!["true".to_string()]),
        Just(vec!["/nonexistent/program".to_string()]),
    ];
    prop_oneof![
        Just(Body::Ping),
        Just(Body::StdinEof),
        Just(Body::Detach),
        Just(Body::SessionList),
        Just(Body::ListListeners),
        Just(Body::Stdout(vec![1, 2])),
        Just(Body::Exited(banger_agent_proto::ExitStatus {
            code: Some(0),
            signal: None
        })),
        (-5i32..70).prop_map(Body::Signal),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Body::Stdin),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| Body::Resize(banger_agent_proto::TtySize { rows, cols })),
        "[a-z./]{0,12}".prop_map(|name| Body::SessionStop { name }),
        "[a-z./]{0,12}".prop_map(|name| Body::SessionAttach { name }),
        "[a-z./]{0,12}".prop_map(|name| Body::SessionLogs {
            name,
            stream: None,
            follow: false
        }),
        argv.clone().prop_map(|argv| Body::Exec(ExecRequest {
            argv,
            ..Default::default()
        })),
        (argv, "[a-z]{0,3}").prop_map(|(argv, name)| Body::SessionStart(SessionSpec {
            name,
            argv,
            stdin: StdinMode::Null,
            ..Default::default()
        })),
    ]
}

/// One piece of the host's stream.
#[derive(Debug, Clone)]
enum Piece {
    Frame(u32, Body),
    /// A well-delimited payload that is not a frame.
    Garbage(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => (0u32..6, body()).prop_map(|(c, b)| Piece::Frame(c, b)),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Garbage),
    ]
}

/// Sends `pieces` to a fresh agent, then checks it still greets on Ping.
async fn drive(pieces: Vec<Piece>) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let agent = Agent::new(Arc::new(NoPower));
    let task = tokio::spawn(async move { agent.serve(guest).await });
    let (rd, mut wr) = tokio::io::split(host);
    let mut rd = FramedRead::new(rd, FrameCodec);
    // Drain the agent's answers so it never blocks on a full pipe.
    let (hello_tx, mut hellos) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(item)) = rd.next().await {
            if let Ok(Frame {
                body: Body::Hello(_),
                ..
            }) = item
            {
                let _ = hello_tx.send(());
            }
        }
    });
    let mut buf = BytesMut::new();
    for p in pieces {
        match p {
            Piece::Frame(c, b) => FrameCodec
                .encode(Frame::new(c, b), &mut buf)
                .expect("encode"),
            Piece::Garbage(g) => {
                buf.put_u32_le(g.len() as u32);
                buf.extend_from_slice(&g);
            }
        }
    }
    wr.write_all(&buf).await.expect("write");
    let mut fw = FramedWrite::new(wr, FrameCodec);
    fw.send(Frame::new(CONTROL, Body::Ping))
        .await
        .expect("ping");
    // The first hello is the greeting, a later one answers some Ping.
    let limit = Duration::from_secs(20);
    let wait = async {
        let mut n = 0;
        while hellos.recv().await.is_some() {
            n += 1;
            if n >= 2 {
                return true;
            }
        }
        false
    };
    assert!(
        tokio::time::timeout(limit, wait).await.unwrap_or(false),
        "the agent stopped answering Ping"
    );
    assert!(!task.is_finished(), "the agent ended its connection");
    drop(fw);
    task.abort();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_frame_sequences_keep_the_agent_alive(pieces in proptest::collection::vec(piece(), 0..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(drive(pieces));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..16)) {
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
            while let Ok(Some(_)) = HostFrames.decode(&mut buf) {}
        }
    }
}

async fn next_frame<R: tokio::io::AsyncRead + Unpin>(rd: &mut FramedRead<R, FrameCodec>) -> Frame {
    tokio::time::timeout(Duration::from_secs(20), rd.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("no stream error")
        .expect("well-formed")
}

/// A frame whose body does not decode closes that channel with an error.
#[tokio::test]
async fn a_malformed_frame_closes_its_channel_only() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let agent = Agent::new(Arc::new(NoPower));
    tokio::spawn(async move { agent.serve(guest).await });
    let (rd, wr) = tokio::io::split(host);
    let mut rd = FramedRead::new(rd, FrameCodec);
    let mut wr = FramedWrite::new(wr, FrameCodec);
    let hello = next_frame(&mut rd).await;
    assert!(matches!(hello.body, Body::Hello(_)));
    // A long-running exec on channel 3.
    wr.send(Frame::new(
        3,
        Body::Exec(ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            ..Default::default()
        }),
    ))
    .await
    .expect("exec");
    // Channel 3, then a body tag no variant has.
    let mut raw = BytesMut::new();
    raw.put_u32_le(3);
    raw.extend_from_slice(&[3, 0xff, 0x7f]);
    wr.get_mut().write_all(&raw).await.expect("raw");
    let f = next_frame(&mut rd).await;
    assert_eq!(f.channel, 3);
    assert!(
        matches!(&f.body, Body::Error(m) if m.contains("malformed")),
        "{f:?}"
    );
    wr.send(Frame::new(CONTROL, Body::Ping))
        .await
        .expect("ping");
    let f = next_frame(&mut rd).await;
    assert!(matches!(f.body, Body::Hello(_)), "{f:?}");
}
