use crate::{Frame, MAX_FRAME};
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
        Ok(Some(postcard::from_bytes(&payload)))
    }
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
    use crate::{Body, ExecRequest, ExitStatus};

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
