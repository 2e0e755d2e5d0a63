//! Pulls from a real local registry (docker-registry on 127.0.0.1) of
//! images written here and pushed with skopeo.

mod common;

use banger_oci::{BlobCache, Credentials, OciError, PullProgress, pull_to_ext4};
use common::*;
use std::path::Path;
use std::sync::{Arc, Mutex};

const BUSYBOX: &str = "/bin/busybox";

/// The test image: a base layer with owners, setuid, links and a device,
/// and a zstd layer with a whiteout, an opaque directory and modes an
/// unprivileged process could not read.
fn test_image(layout: &mut Layout) -> (String, Vec<Layer>) {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|_| b"not busybox".to_vec());
    let base = tar(&[
        E::Dir("bin", 0o755, 0, 0),
        E::File("bin/busybox", &busybox, 0o755, 0, 0),
        E::Symlink("bin/sh", "busybox"),
        E::Symlink("bin/abs", "/etc/os-release"),
        E::Dir("etc", 0o755, 0, 0),
        E::File("etc/os-release", b"NAME=Test\nID=testos\n", 0o644, 0, 0),
        E::File("etc/gone", b"whited out", 0o644, 0, 0),
        E::Dir("home", 0o755, 0, 0),
        E::Dir("home/user", 0o750, 1000, 1000),
        E::File("home/user/file", b"user data", 0o640, 1000, 1000),
        E::Dir("usr/bin", 0o755, 0, 0),
        E::File("usr/bin/suid", b"setuid", 0o4755, 0, 0),
        E::Hardlink("usr/bin/suid-link", "usr/bin/suid"),
        E::Dir("var", 0o755, 0, 0),
        E::Dir("var/mail", 0o2775, 0, 8),
        E::Dir("opt/lower", 0o755, 0, 0),
        E::File("opt/lower/x", b"lower", 0o644, 0, 0),
        E::Dir("srv", 0o755, 33, 33),
        E::File("srv/a b\"c", b"www", 0o644, 33, 33),
        E::Dir("dev", 0o755, 0, 0),
        E::Char("dev/null", 1, 3),
    ]);
    let upper = tar(&[
        E::File("etc/.wh.gone", b"", 0o644, 0, 0),
        E::Dir("opt/lower", 0o755, 0, 0),
        E::File("opt/lower/.wh..wh..opq", b"", 0o644, 0, 0),
        E::File("opt/lower/new", b"upper", 0o644, 0, 0),
        E::File("etc/shadow", b"root:*:1::::::\n", 0o000, 0, 42),
        E::Dir("locked", 0o500, 0, 0),
        E::File("locked/inside", b"in", 0o400, 0, 0),
    ]);
    let layers = vec![layer(GZ, base), layer(ZSTD, upper)];
    let m = layout.image("amd64", &layers);
    layout.tag("v1", OCI_MANIFEST, m.clone());
    (m.0, layers)
}

fn agent_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("agent");
    std::fs::write(&p, AGENT).expect("agent");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_flattens_caches_and_refuses_bad_images() {
    if tools().is_none() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(None);
    let mut layout = Layout::new(&t.path().join("layout"));
    let (v1_digest, layers) = test_image(&mut layout);
    reg.push(&layout.dir, "v1", "test/img:v1", &[]);

    let cache = t.path().join("cache");
    let images = t.path().join("images");
    let agent = agent_file(t.path());
    let opts = |reference: String, out: &str| {
        options(
            reference,
            &cache,
            &images.join(out),
            &agent,
            Credentials::Anonymous,
        )
    };

    // First pull: every layer downloaded, with progress per layer.
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut o = opts(format!("{}/test/img:v1", reg.host()), "one");
    let ev = events.clone();
    o.progress = Some(Arc::new(move |p| ev.lock().expect("lock").push(p)));
    let img = pull_to_ext4(o).await.expect("pull");
    assert_eq!(img.digest, v1_digest);
    assert_eq!(img.os_id.as_deref(), Some("testos"));
    assert!(!img.has_systemd && !img.has_sshd);
    assert_eq!(
        (
            img.report.layers,
            img.report.layers_downloaded,
            img.report.layers_cached
        ),
        (2, 2, 0)
    );
    let events = events.lock().expect("lock").clone();
    for (i, l) in layers.iter().enumerate() {
        let total = l.blob.len() as u64;
        assert!(
            events.iter().any(|e| matches!(e, PullProgress::Layer { index, done, total: t, cached: false, .. } if *index == i && *done == total && *t == total)),
            "no final progress for layer {i}: {events:?}"
        );
    }
    assert_eq!(names(&images), ["one"]);
    assert_eq!(names(&img.dir), ["oci-image.json", "rootfs.ext4"]);
    let fs = &img.rootfs;
    assert!(fsck_clean(fs), "e2fsck -fn found errors");

    let s = |p: &str| stat(fs, p).unwrap_or_else(|| panic!("{p} missing in the image"));
    let user = s("/home/user/file");
    assert_eq!((user.uid, user.gid, user.mode), (1000, 1000, 0o640));
    let home = s("/home/user");
    assert_eq!((home.uid, home.gid, home.mode), (1000, 1000, 0o750));
    let suid = s("/usr/bin/suid");
    assert_eq!((suid.uid, suid.mode), (0, 0o4755));
    // Setuid and setgid bits reach the image (never the host's copy).
    let mail = s("/var/mail");
    assert_eq!((mail.gid, mail.mode), (8, 0o2775));
    assert_eq!(
        s("/usr/bin/suid-link").ino,
        suid.ino,
        "hard link shares the inode"
    );
    assert!(s("/usr/bin/suid").text.contains("Links: 2"));
    let sh = s("/bin/sh");
    assert_eq!(sh.kind, "symlink");
    assert!(
        sh.text.contains("Fast link dest: \"busybox\""),
        "{}",
        sh.text
    );
    assert!(s("/bin/abs").text.contains("\"/etc/os-release\""));
    assert!(stat(fs, "/etc/gone").is_none(), "whiteout did not delete");
    assert!(
        stat(fs, "/opt/lower/x").is_none(),
        "opaque dir kept lower content"
    );
    assert_eq!(cat(fs, "/opt/lower/new"), b"upper");
    let shadow = s("/etc/shadow");
    assert_eq!((shadow.mode, shadow.gid), (0, 42));
    assert_eq!(cat(fs, "/etc/shadow"), b"root:*:1::::::\n");
    assert_eq!(s("/locked").mode, 0o500);
    assert_eq!(s("/locked/inside").mode, 0o400);
    let www = s("/srv/a b\"c");
    assert_eq!((www.uid, www.gid), (33, 33));
    let null = s("/dev/null");
    assert_eq!((null.kind.as_str(), null.mode), ("character", 0o666));
    assert!(
        null.text.contains("major/minor number: 01:03"),
        "{}",
        null.text
    );
    let root = s("/");
    assert_eq!((root.uid, root.gid, root.mode), (0, 0, 0o755));
    // The agent, root-owned, and the sshd bootstrap through inittab.
    let a = s("/usr/local/bin/banger-agent");
    assert_eq!((a.uid, a.gid, a.mode), (0, 0, 0o755));
    assert_eq!(cat(fs, "/usr/local/bin/banger-agent"), AGENT.as_bytes());
    assert_eq!(s("/usr/local/sbin/banger-install-sshd").mode, 0o755);
    let inittab = String::from_utf8(cat(fs, "/etc/inittab")).expect("utf8");
    assert!(
        inittab.contains("::respawn:/usr/local/bin/banger-agent"),
        "{inittab}"
    );
    assert!(
        inittab.contains("::once:/usr/local/sbin/banger-install-sshd"),
        "{inittab}"
    );
    assert_eq!(s("/etc/inittab").uid, 0);

    // Second pull: nothing downloaded.
    let again = pull_to_ext4(opts(format!("{}/test/img:v1", reg.host()), "two"))
        .await
        .expect("again");
    assert_eq!(
        (
            again.report.layers_downloaded,
            again.report.layers_cached,
            again.report.bytes_downloaded
        ),
        (0, 2, 0)
    );
    assert_eq!(again.digest, v1_digest);

    // By digest; into an existing directory is refused.
    let by_digest = format!("{}/test/img@{v1_digest}", reg.host());
    let err = pull_to_ext4(opts(by_digest.clone(), "one"))
        .await
        .expect_err("exists");
    assert!(matches!(err, OciError::Exists(_)), "{err}");
    let d = pull_to_ext4(opts(by_digest, "three"))
        .await
        .expect("by digest");
    assert_eq!(d.digest, v1_digest);

    // Multi-arch index: the amd64 entry is chosen.
    let arm = layout.image(
        "arm64",
        &[layer(GZ, tar(&[E::File("arch", b"arm64", 0o644, 0, 0)]))],
    );
    let amd = layout.image(
        "amd64",
        &[layer(GZ, tar(&[E::File("arch", b"amd64", 0o644, 0, 0)]))],
    );
    let index = layout.index_of(&[(arm.clone(), "arm64"), (amd.clone(), "amd64")]);
    layout.tag("multi", OCI_INDEX, index);
    reg.push(&layout.dir, "multi", "test/multi:latest", &["--all"]);
    let m = pull_to_ext4(opts(format!("{}/test/multi:latest", reg.host()), "multi"))
        .await
        .expect("multi");
    assert_eq!(m.digest, amd.0);
    assert_eq!(cat(&m.rootfs, "/arch"), b"amd64");
    // An index without amd64 is refused clearly.
    let only_arm = layout.index_of(&[(arm, "arm64")]);
    layout.tag("arm", OCI_INDEX, only_arm);
    reg.push(&layout.dir, "arm", "test/arm:latest", &["--all"]);
    let err = pull_to_ext4(opts(format!("{}/test/arm:latest", reg.host()), "arm"))
        .await
        .expect_err("arm only");
    assert!(err.to_string().contains("linux/arm64"), "{err}");

    // Docker v2 schema2 (skopeo converts the manifest; gzip layers only).
    let gz_only = layout.image(
        "amd64",
        &[layer(GZ, tar(&[E::File("docker", b"v2s2", 0o644, 0, 0)]))],
    );
    layout.tag("gz", OCI_MANIFEST, gz_only);
    reg.push(&layout.dir, "gz", "test/docker:v2s2", &["--format", "v2s2"]);
    let v2 = pull_to_ext4(opts(format!("{}/test/docker:v2s2", reg.host()), "v2s2"))
        .await
        .expect("v2s2");
    assert_eq!(cat(&v2.rootfs, "/docker"), b"v2s2");

    // Unknown layer media type.
    let odd = Layer {
        media_type: "application/vnd.example.unknown",
        blob: b"opaque".to_vec(),
        tar: b"opaque".to_vec(),
    };
    let odd = layout.image("amd64", &[odd]);
    layout.tag("odd", OCI_MANIFEST, odd);
    reg.push(&layout.dir, "odd", "test/odd:latest", &[]);
    let err = pull_to_ext4(opts(format!("{}/test/odd:latest", reg.host()), "odd"))
        .await
        .expect_err("odd");
    assert!(
        matches!(&err, OciError::UnknownMediaType { media_type, .. } if media_type == "application/vnd.example.unknown"),
        "{err}"
    );

    // A layer escaping through a symlink: refused, nothing left behind.
    let evil = layout.image(
        "amd64",
        &[
            layer(GZ, tar(&[E::Symlink("etc", "/etc")])),
            layer(GZ, tar(&[E::File("etc/pwned", b"x", 0o644, 0, 0)])),
        ],
    );
    layout.tag("evil", OCI_MANIFEST, evil);
    reg.push(&layout.dir, "evil", "test/evil:latest", &[]);
    let err = pull_to_ext4(opts(format!("{}/test/evil:latest", reg.host()), "evil"))
        .await
        .expect_err("evil");
    assert!(matches!(err, OciError::UnsafeEntry { .. }), "{err}");
    assert!(!Path::new("/etc/pwned").exists());

    // Cancelled before it starts.
    let o = opts(format!("{}/test/img:v1", reg.host()), "cancelled");
    o.cancel.cancel();
    let err = pull_to_ext4(o).await.expect_err("cancelled");
    assert!(matches!(err, OciError::Cancelled), "{err}");

    assert_eq!(
        names(&images),
        ["multi", "one", "three", "two", "v2s2"],
        "failed pulls left something in the output directory"
    );
    assert!(names(&cache.join("oci/tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_docker_config_credentials() {
    if tools().is_none() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(Some(("banger", "s3cret")));
    let mut layout = Layout::new(&t.path().join("layout"));
    test_image(&mut layout);
    reg.push(&layout.dir, "v1", "private/img:v1", &[]);
    let agent = agent_file(t.path());
    let reference = format!("{}/private/img:v1", reg.host());
    let config = t.path().join("docker/config.json");
    std::fs::create_dir_all(config.parent().expect("parent")).expect("mkdir");
    let write_config = |pass: &str| {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("banger:{pass}"));
        std::fs::write(
            &config,
            format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
        )
        .expect("config");
    };
    let cache = t.path().join("cache");
    let out = t.path().join("images/private");

    let err = pull_to_ext4(options(
        reference.clone(),
        &cache,
        &out,
        &agent,
        Credentials::Anonymous,
    ))
    .await
    .expect_err("anonymous");
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("docker login"), "{err}");

    write_config("wrong");
    let err = pull_to_ext4(options(
        reference.clone(),
        &cache,
        &out,
        &agent,
        Credentials::DockerConfigFile(config.clone()),
    ))
    .await
    .expect_err("wrong password");
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
    assert!(!out.exists());

    write_config("s3cret");
    let img = pull_to_ext4(options(
        reference,
        &cache,
        &out,
        &agent,
        Credentials::DockerConfigFile(config),
    ))
    .await
    .expect("authenticated pull");
    assert_eq!(img.report.layers_downloaded, 2);
    assert!(fsck_clean(&img.rootfs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_truncated_blobs_are_refused() {
    if tools().is_none() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(None);
    let mut layout = Layout::new(&t.path().join("layout"));
    let (_, layers) = test_image(&mut layout);
    reg.push(&layout.dir, "v1", "test/img:v1", &[]);
    let agent = agent_file(t.path());
    let cache_dir = t.path().join("cache");
    let cache = BlobCache::new(&cache_dir);
    let out = t.path().join("images/img");
    let reference = format!("{}/test/img:v1", reg.host());

    let upper = sha256(&layers[1].blob);
    let stored = reg.blob_file(&upper);
    let mut data = std::fs::read(&stored).expect("stored blob");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&stored, &data).expect("tamper");
    let err = pull_to_ext4(options(
        reference.clone(),
        &cache_dir,
        &out,
        &agent,
        Credentials::Anonymous,
    ))
    .await
    .expect_err("tampered");
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(!cache.has(&upper, layers[1].blob.len() as u64));
    assert!(!cache.blob_path(&upper).expect("path").exists());
    assert!(names(&cache_dir.join("oci/tmp")).is_empty());
    assert!(!out.exists());
    assert!(names(&t.path().join("images")).is_empty());

    data.truncate(data.len() / 2);
    std::fs::write(&stored, &data).expect("truncate");
    let err = pull_to_ext4(options(
        reference.clone(),
        &cache_dir,
        &out,
        &agent,
        Credentials::Anonymous,
    ))
    .await
    .expect_err("truncated");
    assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");
    assert!(!cache.blob_path(&upper).expect("path").exists());
    assert!(names(&cache_dir.join("oci/tmp")).is_empty());
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_bigger_than_the_free_space_is_refused_before_writing() {
    if tools().is_none() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it mounts a small tmpfs)"
    );
    let t = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(None);
    let mut layout = Layout::new(&t.path().join("layout"));
    let zeros = vec![0u8; 96 << 20];
    let big = layout.image(
        "amd64",
        &[layer(GZ, tar(&[E::File("big", &zeros, 0o644, 0, 0)]))],
    );
    layout.tag("big", OCI_MANIFEST, big);
    reg.push(&layout.dir, "big", "test/big:latest", &[]);
    let small = t.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=128m"),
    )
    .expect("mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(&small);
    let agent = agent_file(t.path());
    let err = pull_to_ext4(options(
        format!("{}/test/big:latest", reg.host()),
        &t.path().join("cache"),
        &small.join("img"),
        &agent,
        Credentials::Anonymous,
    ))
    .await
    .expect_err("too big");
    assert!(matches!(err, OciError::NoSpace { .. }), "{err}");
    assert!(names(&small).is_empty(), "left {:?}", names(&small));
}
