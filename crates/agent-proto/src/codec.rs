use crate::{Body, Frame, Hello, MAX_FRAME, PROTO_VERSION};
use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Errors on the framed stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("agent frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed agent frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("agent stream: {0}")]
    Io(#[from] std::io::Error),
}

/// tokio codec for [`Frame`]s.
///
/// A payload that does not decode is yielded as `Ok(Some(Err(..)))` with the
/// stream still in sync (its length was known), so one bad frame never tears
/// down the whole connection. An oversized length is fatal.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Result<Frame, postcard::Error>;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let payload = src.split_to(len);
        Ok(Some(
            postcard::from_bytes(&payload).or_else(|e| other_version_hello(&payload).ok_or(e)),
        ))
    }
}

/// Where [`Body::Hello`] is in [`Body`] (postcard writes the variant's
/// index): first, in every protocol version.
const HELLO_VARIANT: u32 = 0;

/// The greeting of an agent that speaks another protocol version (an image
/// built by an older banger, booted with its own agent): its `Hello` may
/// have other fields, but the first two, the protocol and agent versions,
/// are where they have always been. Decoded that far, the host can say
/// which versions differ instead of skipping the frame and waiting for a
/// greeting that never comes.
fn other_version_hello(payload: &[u8]) -> Option<Frame> {
    let ((channel, variant, proto_version, agent_version), _) =
        postcard::take_from_bytes::<(u32, u32, u32, String)>(payload).ok()?;
    (variant == HELLO_VARIANT && proto_version != PROTO_VERSION).then(|| {
        Frame::new(
            channel,
            Body::Hello(Hello {
                proto_version,
                agent_version,
                uptime_ms: 0,
                sealed: false,
            }),
        )
    })
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let payload = postcard::to_allocvec(&frame)?;
        if payload.len() > MAX_FRAME {
            return Err(ProtoError::TooLarge(payload.len()));
        }
        dst.reserve(4 + payload.len());
        dst.put_u32_le(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecRequest, ExitStatus};

    #[test]
    fn hello_is_the_first_variant() {
        let hello = Body::Hello(Hello {
            proto_version: PROTO_VERSION,
            agent_version: "x".into(),
            uptime_ms: 1,
            sealed: true,
        });
        let bytes = postcard::to_allocvec(&Frame::new(7, hello)).expect("encode");
        let ((channel, variant, version), _) =
            postcard::take_from_bytes::<(u32, u32, u32)>(&bytes).expect("prefix");
        assert_eq!(
            (channel, variant, version),
            (7, HELLO_VARIANT, PROTO_VERSION)
        );
    }

    #[test]
    fn a_greeting_of_another_version_decodes_as_far_as_its_versions() {
        // Protocol 5's Hello: no `sealed` field.
        let old: (u32, u32, u32, String, u64) = (0, HELLO_VARIANT, 5, "0.0.9".into(), 1234);
        let payload = postcard::to_allocvec(&old).expect("encode");
        let mut buf = BytesMut::new();
        buf.put_u32_le(payload.len() as u32);
        buf.extend_from_slice(&payload);
        let frame = FrameCodec
            .decode(&mut buf)
            .expect("stream in sync")
            .expect("a whole frame")
            .expect("decoded as a greeting");
        let Body::Hello(h) = frame.body else {
            panic!("not a greeting: {frame:?}");
        };
        assert_eq!((h.proto_version, h.agent_version.as_str()), (5, "0.0.9"));
        // Another body that does not decode is still refused.
        let junk = postcard::to_allocvec(&(0u32, 250u32, 1u32)).expect("encode");
        let mut buf = BytesMut::new();
        buf.put_u32_le(junk.len() as u32);
        buf.extend_from_slice(&junk);
        assert!(
            FrameCodec
                .decode(&mut buf)
                .expect("in sync")
                .expect("whole")
                .is_err()
        );
    }

    fn roundtrip(f: Frame) {
        let mut buf = BytesMut::new();
        FrameCodec.encode(f.clone(), &mut buf).expect("encode");
        // Feed byte by byte: partial frames must wait, not fail.
        let mut partial = BytesMut::new();
        let mut out = None;
        for b in buf.iter() {
            partial.put_u8(*b);
            if let Some(fr) = FrameCodec.decode(&mut partial).expect("decode") {
                out = Some(fr.expect("valid frame"));
            }
        }
        assert_eq!(out, Some(f));
        assert!(partial.is_empty());
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::new(0, Body::Ping));
        roundtrip(Frame::new(
            7,
            Body::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/root".into()),
                stdin: true,
                tty: Some(crate::TtySize {
                    rows: 40,
                    cols: 120,
                }),
            }),
        ));
        roundtrip(Frame::new(7, Body::Stdout(vec![1, 2, 3])));
        roundtrip(Frame::new(
            9,
            Body::PutArchive(crate::PutArchive {
                dest: "/root/repo".into(),
                replace: true,
            }),
        ));
        roundtrip(Frame::new(9, Body::ArchiveData(vec![0; 512])));
        roundtrip(Frame::new(9, Body::Credit(8)));
        roundtrip(Frame::new(
            9,
            Body::ArchiveDone(crate::ArchiveSummary {
                files: 2,
                bytes: 10,
                skipped: vec!["skipped x".into()],
            }),
        ));
        roundtrip(Frame::new(
            7,
            Body::Exited(ExitStatus {
                code: Some(3),
                signal: None,
            }),
        ));
    }

    #[test]
    fn warm_start_frames_roundtrip() {
        use crate::{Hello, RestoreReport, SealReport, SshdPlan};
        roundtrip(Frame::new(
            0,
            Body::Hello(Hello {
                proto_version: crate::PROTO_VERSION,
                agent_version: "0.1".into(),
                uptime_ms: 12,
                sealed: true,
            }),
        ));
        roundtrip(Frame::new(3, Body::Seal));
        for sshd in [
            SshdPlan::None,
            SshdPlan::Unit("ssh.service".into()),
            SshdPlan::Process(vec!["/usr/sbin/sshd".into(), "-D".into()]),
        ] {
            roundtrip(Frame::new(
                3,
                Body::Sealed(SealReport {
                    sshd,
                    machine_id: "0123456789abcdef0123456789abcdef".into(),
                }),
            ));
        }
        roundtrip(Frame::new(
            4,
            Body::Restore(Box::new(crate::identity::tests::identity())),
        ));
        let mut no_net = crate::identity::tests::identity();
        no_net.net = None;
        no_net.grow.clear();
        roundtrip(Frame::new(4, Body::Restore(Box::new(no_net))));
        roundtrip(Frame::new(
            4,
            Body::Restored(RestoreReport {
                steps_ms: vec![("reseed".into(), 0), ("net".into(), 12)],
                vmgenid: true,
                clock_step_ms: -3_600_000,
                sshd: "unit ssh.service".into(),
            }),
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut buf = BytesMut::new();
        buf.put_u32_le((MAX_FRAME + 1) as u32);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn garbage_payload_is_skipped_and_stream_stays_in_sync() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(3);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        FrameCodec
            .encode(Frame::new(0, Body::Ping), &mut buf)
            .expect("encode");
        assert!(matches!(FrameCodec.decode(&mut buf), Ok(Some(Err(_)))));
        let next = FrameCodec.decode(&mut buf).expect("decode").expect("frame");
        assert_eq!(next.expect("valid"), Frame::new(0, Body::Ping));
    }
}
