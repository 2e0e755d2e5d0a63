//! Arbitrary bytes and frames against the frame decoder: it never panics,
//! never yields a frame over the limit, and stays in sync after bad payloads.

use banger_agent_proto::{Body, Frame, FrameCodec, MAX_FRAME, ProtoError};
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::Ping),
        Just(Body::StdinEof),
        Just(Body::Detach),
        Just(Body::SessionList),
        any::<i32>().prop_map(Body::Signal),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(Body::Stdin),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| Body::Resize(banger_agent_proto::TtySize { rows, cols })),
        ".{0,40}".prop_map(|name| Body::SessionStop { name }),
        ".{0,40}".prop_map(Body::Error),
        (any::<bool>(), any::<bool>())
            .prop_map(|(wait, explain)| Body::BootStatus { wait, explain }),
        (
            any::<Option<u64>>(),
            any::<u64>(),
            ".{0,20}",
            proptest::collection::vec(".{0,30}", 0..4)
        )
            .prop_map(|(k, a, state, pending)| {
                Body::Boot(banger_agent_proto::BootReport {
                    agent: banger_agent_proto::AgentStart::Initramfs,
                    kernel_init_ms: k,
                    agent_start_ms: a,
                    system: banger_agent_proto::SystemState::Systemd { state },
                    pending,
                })
            }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
            loop {
                match FrameCodec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(ProtoError::TooLarge(n)) => {
                        prop_assert!(n > MAX_FRAME);
                        buf.clear();
                        break;
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
        }
    }

    #[test]
    fn frames_survive_garbage_between_them(
        frames in proptest::collection::vec((any::<u32>(), body()), 1..10),
        junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..10),
    ) {
        let mut buf = BytesMut::new();
        let mut expected = Vec::new();
        for (i, (channel, body)) in frames.into_iter().enumerate() {
            // A length-prefixed garbage payload before each good frame.
            let j = &junk[i % junk.len()];
            buf.put_u32_le(j.len() as u32);
            buf.extend_from_slice(j);
            let f = Frame::new(channel, body);
            FrameCodec.encode(f.clone(), &mut buf).expect("encode");
            expected.push(f);
        }
        let mut got = Vec::new();
        while let Some(item) = FrameCodec.decode(&mut buf).expect("lengths are in range") {
            if let Ok(f) = item {
                got.push(f);
            }
        }
        // Garbage may happen to decode as a frame; every real frame must arrive, in order.
        let mut it = got.iter();
        for f in &expected {
            prop_assert!(it.any(|g| g == f), "frame {:?} lost", f);
        }
    }
}
