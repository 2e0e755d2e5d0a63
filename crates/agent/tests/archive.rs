//! Archive channels end to end: the real host client against the real
//! agent over an in-memory pipe, unpacking into and packing from temporary
//! directories of the test machine.

use banger_agent::{Agent, Power, PowerError};
use banger_agent_proto::client::{AgentClient, ClientError};
use banger_agent_proto::{Body, CONTROL, Frame, FrameCodec, GetArchive, PutArchive};
use futures::{SinkExt, StreamExt};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

const LIMIT: Duration = Duration::from_secs(30);

struct NoPower;

impl Power for NoPower {
    fn power_off(&self, _reboot: bool) -> Result<(), PowerError> {
        Ok(())
    }
}

fn start_agent() -> DuplexStream {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let agent = Agent::new(Arc::new(NoPower));
    tokio::spawn(async move { agent.serve(guest).await });
    host
}

async fn client() -> AgentClient {
    let c = AgentClient::spawn(start_agent());
    timeout(LIMIT, c.wait_hello())
        .await
        .expect("hello in time")
        .expect("hello");
    c
}

fn tar_of(src: &Path, name: &str) -> Vec<u8> {
    let plan = banger_transfer::plan_path(src, name).expect("plan");
    banger_transfer::write_tar(&plan, Vec::new(), None, &mut |_| {}).expect("tar")
}

async fn upload(
    c: &AgentClient,
    dest: &Path,
    replace: bool,
    tar: &[u8],
) -> Result<banger_agent_proto::ArchiveSummary, ClientError> {
    let mut up = c
        .put_archive(PutArchive {
            dest: dest.to_str().expect("utf8").into(),
            replace,
        })
        .expect("put");
    for chunk in tar.chunks(100_000) {
        timeout(LIMIT, up.write(chunk))
            .await
            .expect("write in time")?;
    }
    timeout(LIMIT, up.finish()).await.expect("finish in time")
}

/// A tar whose single entry is `name`, written raw as a hostile host would.
fn hostile(name: &[u8], kind: tar::EntryType, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o644);
    {
        let g = h.as_gnu_mut().expect("gnu");
        g.name[..name.len()].copy_from_slice(name);
        g.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test]
async fn upload_larger_than_the_window_keeps_modes() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("bin")).expect("mkdir");
    // 5 MiB: many times the flow-control window, so credit must flow.
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big"), &big).expect("write");
    std::fs::write(src.join("bin/run"), "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(src.join("bin/run"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::symlink("big", src.join("link")).expect("symlink");
    let c = client().await;
    let dest = t.path().join("guest/dest");
    let s = upload(&c, &dest, false, &tar_of(&src, "copy"))
        .await
        .expect("upload");
    assert_eq!(s.files, 3);
    assert_eq!(s.bytes, big.len() as u64 + 10);
    assert_eq!(std::fs::read(dest.join("copy/big")).expect("read"), big);
    let mode = std::fs::metadata(dest.join("copy/bin/run"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(dest.join("copy/link").is_symlink());
}

#[tokio::test]
async fn hostile_entries_are_refused_and_the_agent_keeps_serving() {
    let t = tempfile::tempdir().expect("tmp");
    let c = client().await;
    let dest = t.path().join("d");
    for (name, kind, link) in [
        (&b"../evil"[..], tar::EntryType::Regular, &b""[..]),
        (b"/tmp/evil", tar::EntryType::Regular, b""),
        (b"l", tar::EntryType::Symlink, b"/etc"),
        (b"dev", tar::EntryType::Char, b""),
    ] {
        let err = upload(&c, &dest, false, &hostile(name, kind, link))
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, ClientError::Refused(m) if m.contains("refused")),
            "{err}"
        );
    }
    assert!(!t.path().join("evil").exists());
    // Still serving.
    let ok = upload(&c, &dest, false, &tar_of(&t.path().join("d"), "again")).await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn replace_swaps_whole_trees_and_a_failed_one_keeps_the_old() {
    let t = tempfile::tempdir().expect("tmp");
    let dest = t.path().join("ws");
    std::fs::create_dir_all(&dest).expect("mkdir");
    std::fs::write(dest.join("stale"), "old").expect("write");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("new"), "new").expect("write");
    let c = client().await;

    let bad = hostile(b"x", tar::EntryType::Symlink, b"../../etc");
    upload(&c, &dest, true, &bad).await.expect_err("refused");
    assert!(
        dest.join("stale").exists(),
        "failed replace kept the old tree"
    );

    let tar = tar_of(&src.join("new"), "new");
    upload(&c, &dest, true, &tar).await.expect("replace");
    assert!(!dest.join("stale").exists());
    assert_eq!(
        std::fs::read_to_string(dest.join("new")).expect("read"),
        "new"
    );
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("banger-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn download_streams_a_tree_and_reports_skipped_symlinks() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).expect("mkdir");
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 13) as u8).collect();
    std::fs::write(src.join("d/big"), &big).expect("write");
    std::os::unix::fs::symlink("d/big", src.join("in")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", src.join("out")).expect("symlink");
    let c = client().await;
    let mut down = c
        .get_archive(GetArchive {
            path: src.to_str().expect("utf8").into(),
            name: "got".into(),
        })
        .expect("get");
    let mut tar = Vec::new();
    while let Some(chunk) = timeout(LIMIT, down.next())
        .await
        .expect("chunk in time")
        .expect("chunk")
    {
        assert!(chunk.len() <= banger_agent::OUTPUT_CHUNK);
        tar.extend_from_slice(&chunk);
    }
    let s = down.summary().expect("summary").clone();
    assert_eq!(s.files, 2);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert!(s.skipped[0].contains("out"));
    let dest = t.path().join("host");
    banger_transfer::unpack(tar.as_slice(), &dest).expect("unpack");
    assert_eq!(std::fs::read(dest.join("got/d/big")).expect("read"), big);
    assert!(dest.join("got/in").is_symlink());
    assert!(!dest.join("got/out").exists());
}

#[tokio::test]
async fn dropped_download_is_aborted_and_missing_paths_are_errors() {
    let t = tempfile::tempdir().expect("tmp");
    let big = vec![7u8; 4 * 1024 * 1024];
    std::fs::write(t.path().join("big"), &big).expect("write");
    let c = client().await;
    let mut down = c
        .get_archive(GetArchive {
            path: t.path().join("big").to_str().expect("utf8").into(),
            name: "big".into(),
        })
        .expect("get");
    assert!(down.next().await.expect("first").is_some());
    drop(down);
    let mut missing = c
        .get_archive(GetArchive {
            path: "/nonexistent/banger".into(),
            name: "x".into(),
        })
        .expect("get");
    let err = timeout(LIMIT, missing.next()).await.expect("in time");
    assert!(matches!(err, Err(ClientError::Refused(_))), "{err:?}");
}

#[tokio::test]
async fn malformed_frame_closes_its_channel_not_the_connection() {
    let (rd, wr) = tokio::io::split(start_agent());
    let mut rd = FramedRead::new(rd, FrameCodec);
    let mut wr = FramedWrite::new(wr, FrameCodec);
    let hello = timeout(LIMIT, rd.next()).await.expect("hello in time");
    assert!(matches!(
        hello,
        Some(Ok(Ok(Frame {
            channel: CONTROL,
            ..
        })))
    ));
    let t = tempfile::tempdir().expect("tmp");
    let put = PutArchive {
        dest: t.path().to_str().expect("utf8").into(),
        replace: false,
    };
    wr.send(Frame::new(3, Body::PutArchive(put)))
        .await
        .expect("send");
    // Channel 3, then a body variant that does not exist.
    let inner = wr.get_mut();
    inner.write_all(&2u32.to_le_bytes()).await.expect("len");
    inner.write_all(&[3, 0x7f]).await.expect("payload");
    inner.flush().await.expect("flush");
    let f = timeout(LIMIT, rd.next())
        .await
        .expect("answer in time")
        .expect("open")
        .expect("ok")
        .expect("frame");
    assert_eq!(f.channel, 3);
    assert!(
        matches!(&f.body, Body::Error(m) if m.contains("malformed")),
        "{f:?}"
    );
    wr.send(Frame::new(CONTROL, Body::Ping))
        .await
        .expect("ping");
    let f = timeout(LIMIT, rd.next())
        .await
        .expect("hello in time")
        .expect("open")
        .expect("ok")
        .expect("frame");
    assert!(matches!(f.body, Body::Hello(_)));
}
