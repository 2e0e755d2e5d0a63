//! Images and kernels with the built `banger`: register, bundle, a catalog
//! pull from a bundle served on 127.0.0.1, an OCI pull from a local
//! `docker-registry`, and one boot of the OCI image under QEMU.

use banger_e2e::registry::{Proc, free_port, registry_with_busybox, run_ok, wait_for_port};
use banger_e2e::{Banger, shared, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn ok(b: &Banger, args: &[&str]) -> String {
    let out = b.run(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "banger {args:?}: {stderr}");
    stdout
}

/// The one line of a failed command's error.
fn fails(b: &Banger, args: &[&str]) -> String {
    let out = b.run(args);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "banger {args:?} succeeded");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("banger: daemon was not running"))
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    lines[0].to_string()
}

/// A small ext4 and a bzImage with a gzip-compressed ELF payload (nothing
/// boots them).
fn small_image(dir: &Path) -> (PathBuf, PathBuf) {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::write(tree.join("etc/os-release"), "ID=tiny\n").expect("os-release");
    let rootfs = dir.join("rootfs.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&rootfs)
            .arg("8M"),
    );
    let kernel = dir.join("bzImage");
    let img = banger_image::vmlinux::fake_bzimage(
        "6.12.1-tiny",
        b"\x7fELF\x02\x01\x01\x00 boots nothing",
    );
    std::fs::write(&kernel, img).expect("kernel");
    (rootfs, kernel)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

#[test]
fn register_bundle_serve_and_pull_from_the_catalog() {
    let work = tempfile_dir("catalog");
    let (rootfs, kernel) = small_image(&work);

    let publisher = Banger::isolated("img-pub");
    ok(
        &publisher,
        &[
            "image",
            "register",
            "--name",
            "tiny",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            s(&kernel),
        ],
    );
    let shown = publisher.json(&["image", "show", "tiny"]);
    assert_eq!(shown["managed"], false);
    assert_eq!(
        publisher.json(&["kernel", "show", "tiny"])["release"],
        "6.12.1-tiny"
    );
    let line = fails(
        &publisher,
        &[
            "image",
            "register",
            "--name",
            "x",
            "--rootfs",
            "/nonexistent",
            "--kernel-ref",
            "tiny",
        ],
    );
    assert!(line.contains("/nonexistent"), "{line}");
    let line = fails(&publisher, &["kernel", "delete", "tiny"]);
    assert!(line.contains("in use by image tiny"), "{line}");

    // The server runs where the consumer's daemon runs: its namespace.
    let consumer = Banger::isolated("img-con");
    let port = free_port();
    let out = work.join("out");
    let index = out.join("index.json");
    let base = format!("http://127.0.0.1:{port}");
    for kind in ["kernel", "image"] {
        let b = publisher.json(&[
            kind,
            "bundle",
            "tiny",
            "--out",
            s(&out),
            "--base-url",
            &base,
            "--index",
            s(&index),
        ]);
        assert!(
            Path::new(b["path"].as_str().expect("path")).is_file(),
            "{b}"
        );
    }
    let mut server = consumer
        .in_netns(
            "busybox",
            &[
                "httpd",
                "-f",
                "-p",
                &format!("127.0.0.1:{port}"),
                "-h",
                s(&out),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox httpd (apt-get install busybox-static)");
    wait_for_port(&consumer, port, &mut server);
    let _server = Proc(server);

    consumer.write_config(&format!("catalog_url = \"{base}/index.json\"\n"));
    let line = fails(&consumer, &["image", "pull", "nope"]);
    assert!(
        line.contains("not in the catalog") && line.contains("tiny"),
        "{line}"
    );
    let img = consumer.json(&["image", "pull", "tiny"]);
    assert_eq!(img["managed"], true);
    assert_eq!(img["kernel"], "tiny");
    let pulled = PathBuf::from(img["rootfs"].as_str().expect("rootfs"));
    assert_eq!(
        std::fs::read(&pulled).expect("pulled"),
        std::fs::read(&rootfs).expect("orig")
    );
    let kernels = consumer.json(&["kernel", "list"]);
    assert_eq!(kernels[0]["name"], "tiny", "{kernels}");
    let list = consumer.json(&["image", "list"]);
    assert_eq!(list.as_array().expect("list").len(), 1);

    let line = fails(&consumer, &["kernel", "delete", "tiny"]);
    assert!(line.contains("in use by image tiny"), "{line}");
    ok(&consumer, &["image", "delete", "tiny"]);
    assert!(!pulled.exists(), "managed image files left behind");
    ok(&consumer, &["kernel", "delete", "tiny"]);
    assert_eq!(consumer.json(&["kernel", "list"]), serde_json::json!([]));

    // Unmanaged: deleting leaves the files alone.
    ok(&publisher, &["image", "delete", "tiny"]);
    ok(&publisher, &["kernel", "delete", "tiny"]);
    assert!(rootfs.is_file() && kernel.is_file());
    for b in [&publisher, &consumer] {
        let _ = b.run(&["daemon", "stop"]);
        let _ = std::fs::remove_dir_all(&b.root);
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("banger-img-work-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

#[test]
fn oci_pull_from_a_local_registry() {
    let work = tempfile_dir("oci");
    let b = Banger::isolated("img-oci");
    let (_registry, reference) = registry_with_busybox(&b, &work);
    let (rootfs, kernel) = small_image(&work);
    ok(
        &b,
        &[
            "image",
            "register",
            "--name",
            "k",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            s(&kernel),
        ],
    );
    let line = fails(&b, &["image", "pull", &reference, "--kernel-ref", "nope"]);
    assert!(line.contains("no kernel named nope"), "{line}");
    let img = b.json(&["image", "pull", &reference, "--kernel-ref", "k"]);
    assert_eq!(img["name"], "bb-1", "{img}");
    assert_eq!(img["kernel"], "k");
    assert_eq!(img["managed"], true);
    let rootfs_out = PathBuf::from(img["rootfs"].as_str().expect("rootfs"));
    let cat = run_ok(
        Command::new("debugfs")
            .args(["-R", "cat /etc/os-release"])
            .arg(&rootfs_out),
    );
    assert!(cat.contains("ID=bbtest"), "{cat}");
    let line = fails(&b, &["image", "pull", &reference, "--kernel-ref", "k"]);
    assert!(line.contains("already exists"), "{line}");
    let named = b.json(&[
        "image",
        "pull",
        &reference,
        "--kernel-ref",
        "k",
        "--name",
        "bb2",
    ]);
    assert_eq!(named["name"], "bb2");
    ok(&b, &["image", "delete", "bb-1", "bb2"]);
    assert!(!rootfs_out.exists());
    let _ = b.run(&["daemon", "stop"]);
    let _ = std::fs::remove_dir_all(&b.root);
    let _ = std::fs::remove_dir_all(&work);
}

/// The OCI image boots under QEMU with the default image's kernel, and the
/// command runs in it. Uses the shared installation (its Debian image).
#[test]
fn oci_image_boots_and_runs_a_command() {
    let work = tempfile_dir("oci-boot");
    let b = shared();
    let (_registry, reference) = registry_with_busybox(b, &work);
    let _ = b.run(&["image", "delete", "--force", "e2e-bb"]);
    let img = b.json(&["image", "pull", &reference, "--name", "e2e-bb"]);
    assert_eq!(img["name"], "e2e-bb");
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--image",
        "e2e-bb",
        "--",
        "cat",
        "/etc/os-release",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout={stdout} stderr={stderr}");
    assert!(stdout.contains("ID=bbtest"), "{stdout}");
    // VMs use the image: delete refuses without --force.
    ok(
        b,
        &[
            "vm",
            "create",
            "--name",
            "e2e-bb-vm",
            "--image",
            "e2e-bb",
            "--no-start",
        ],
    );
    let line = fails(b, &["image", "delete", "e2e-bb"]);
    assert!(
        line.contains("e2e-bb-vm") && line.contains("--force"),
        "{line}"
    );
    ok(b, &["image", "delete", "--force", "e2e-bb"]);
    assert!(!b.vm_names().contains(&"e2e-bb-vm".to_string()));
    let _ = std::fs::remove_dir_all(&work);
}
