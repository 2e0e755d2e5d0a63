//! The boot path on a real guest: banger's initramfs (the agent as
//! `/init`, ready before the image's init, which then gets PID 1), the
//! distribution's initramfs as the fallback a VM can choose, waiting for
//! the init's own boot, and boots that cannot work failing in one line.

use banger_e2e::{Banger, registry::run_ok, shared, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ok(b: &Banger, args: &[&str]) -> String {
    let out = b.run(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "banger {args:?}: {stderr}");
    stdout
}

/// The lines of a failed command's stderr that are not the `spec:` and
/// `start:` lines or the daemon's start note: what the user is told went
/// wrong.
fn error_lines(b: &Banger, args: &[&str]) -> Vec<String> {
    let out = b.run(args);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "banger {args:?} succeeded");
    stderr
        .lines()
        .filter(|l| {
            !l.starts_with("spec: ")
                && !l.starts_with("start: ")
                && !l.starts_with("banger: daemon was not running")
        })
        .map(str::to_string)
        .collect()
}

fn show(b: &Banger, vm: &str) -> Value {
    b.json(&["vm", "show", vm])
}

fn exec(b: &Banger, vm: &str, argv: &[&str]) -> String {
    let mut a = vec!["vm", "exec", vm, "--"];
    a.extend_from_slice(argv);
    ok(b, &a)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The default image's kernel record.
fn default_kernel(b: &Banger) -> Value {
    let img = b.json(&["image", "show", "debian-bookworm"]);
    let name = img["kernel"].as_str().expect("kernel name").to_string();
    b.json(&["kernel", "show", &name])
}

/// A small ext4 made from `tree`.
fn ext4_of(tree: &Path, out: &Path) {
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(tree)
            .arg(out)
            .arg("16M"),
    );
}

fn work_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("banger-boot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

#[test]
fn banger_initramfs_answers_before_the_init_and_hands_it_pid_1() {
    let b = shared();
    let vm = "e2e-boot-banger";
    let _ = b.run(&["vm", "delete", vm]);
    ok(b, &["vm", "create", "--name", vm, "--initramfs", "banger"]);
    let v = show(b, vm);
    assert_eq!(v["initramfs"], "banger", "{v}");
    let boot = &v["boot"];
    assert_eq!(boot["initramfs"], "banger", "{v}");
    assert_eq!(boot["agent_start"], "initramfs", "{v}");
    let kernel_init = boot["kernel_init_ms"].as_u64().expect("kernel init time");
    let ready = boot["agent_ready_ms"].as_u64().expect("agent ready time");
    assert!(kernel_init > 0 && ready > kernel_init, "{v}");

    // PID 1 is the image's systemd; the agent that answers is its own
    // process, forked off before it.
    let pid1 = exec(b, vm, &["readlink", "/proc/1/exe"]);
    assert!(pid1.trim().ends_with("/systemd"), "{pid1}");
    let status = exec(
        b,
        vm,
        &[
            "sh",
            "-c",
            "grep -E '^(Name|PPid):' /proc/$(pgrep -o -x banger-agent)/status",
        ],
    );
    assert!(status.contains("Name:\tbanger-agent"), "{status}");
    assert!(status.contains("PPid:\t1\n"), "{status}");

    // The image's own agent unit starts too, and stands by. systemd may
    // not even answer yet (the agent answered first): asked again until it
    // does, for at most 120 s, then until its boot is over.
    let after = exec(
        b,
        vm,
        &[
            "sh",
            "-c",
            "i=0; until [ $i -ge 600 ] || { s=$(systemctl is-system-running --wait 2>/dev/null); \
             [ -n \"$s\" ] && [ \"$s\" != offline ]; }; do sleep 0.2; i=$((i+1)); done; \
             systemctl is-active banger-agent.service; journalctl --no-pager -u banger-agent.service",
        ],
    );
    assert!(after.starts_with("active\n"), "{after}");
    assert!(after.contains("standing by"), "{after}");
    let v = show(b, vm);
    assert_eq!(v["boot"]["booting"], false, "{v}");
    let system = v["boot"]["system"].as_str().expect("system");
    assert!(system == "running" || system == "degraded", "{system}: {v}");
    // The console says where early boot's time went.
    let logs = ok(b, &["vm", "logs", vm]);
    assert!(
        logs.contains("banger-agent: started at ") && logs.contains(" modules in "),
        "{logs}"
    );
    ok(b, &["vm", "delete", vm]);
}

#[test]
fn wait_boot_returns_a_booted_system() {
    let b = shared();
    let out = ok(
        b,
        &[
            "vm",
            "run",
            "--rm",
            "--wait-boot",
            "--",
            "sh",
            "-c",
            "systemctl is-system-running || true",
        ],
    );
    let state = out.trim();
    assert!(state == "running" || state == "degraded", "{out}");
}

#[test]
fn the_distribution_initramfs_is_kept_per_vm() {
    let b = shared();
    let vm = "e2e-boot-distro";
    let _ = b.run(&["vm", "delete", vm]);
    ok(b, &["vm", "create", "--name", vm, "--initramfs", "distro"]);
    for round in ["create", "start"] {
        let v = show(b, vm);
        assert_eq!(v["initramfs"], "distro", "{round}: {v}");
        assert_eq!(v["boot"]["initramfs"], "distro", "{round}: {v}");
        assert_eq!(v["boot"]["agent_start"], "init-param", "{round}: {v}");
        let cmdline = exec(b, vm, &["cat", "/proc/cmdline"]);
        assert!(
            cmdline.contains("init=/usr/local/bin/banger-agent"),
            "{cmdline}"
        );
        if round == "create" {
            ok(b, &["vm", "stop", vm]);
            ok(b, &["vm", "start", vm]);
        }
    }
    ok(b, &["vm", "delete", vm]);
}

#[test]
fn an_image_with_a_broken_init_fails_in_one_line() {
    let b = shared();
    let work = work_dir("noinit");
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::create_dir_all(tree.join("sbin")).expect("tree");
    std::fs::write(tree.join("etc/os-release"), "ID=noinit\n").expect("os-release");
    // Its init is a link to nothing (an image with nothing at all there
    // has the agent as its init instead; see image_pull).
    std::os::unix::fs::symlink("/lib/systemd/systemd", tree.join("sbin/init")).expect("link");
    let rootfs = work.join("rootfs.ext4");
    ext4_of(&tree, &rootfs);
    let kernel = default_kernel(b);
    let kname = kernel["name"].as_str().expect("name");
    let _ = b.run(&["image", "delete", "--force", "e2e-noinit"]);
    ok(
        b,
        &[
            "image",
            "register",
            "--name",
            "e2e-noinit",
            "--rootfs",
            s(&rootfs),
            "--kernel-ref",
            kname,
        ],
    );
    let before = b.vm_names();
    let lines = error_lines(
        b,
        &["vm", "run", "--rm", "--image", "e2e-noinit", "--", "true"],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("cannot boot: the image has no init at /sbin/init"),
        "{lines:?}"
    );
    assert_eq!(b.vm_names(), before, "a VM was left behind");
    ok(b, &["image", "delete", "e2e-noinit"]);
    let _ = std::fs::remove_dir_all(&work);
}

/// A module tree for `release` holding `files` (path, bytes) under
/// `/lib/modules/<release>`, with that `modules.dep` and `modules.builtin`.
fn module_image(
    work: &Path,
    release: &str,
    dep: &str,
    builtin: &str,
    files: &[(&str, &[u8])],
) -> PathBuf {
    let tree = work.join("tree");
    let dir = tree.join("lib/modules").join(release);
    std::fs::create_dir_all(&dir).expect("modules dir");
    std::fs::write(dir.join("modules.dep"), dep).expect("dep");
    std::fs::write(dir.join("modules.builtin"), builtin).expect("builtin");
    for (p, data) in files {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(f, data).expect("module");
    }
    let rootfs = work.join("rootfs.ext4");
    ext4_of(&tree, &rootfs);
    rootfs
}

#[test]
fn missing_or_foreign_kernel_modules_fail_in_one_line() {
    let b = shared();
    let kernel = default_kernel(b);
    let release = kernel["release"].as_str().expect("release").to_string();
    let vmlinuz = kernel["kernel"].as_str().expect("kernel path").to_string();

    // No virtio_blk for this kernel in the image: said before any boot.
    let work = work_dir("nomods");
    let rootfs = module_image(
        &work,
        &release,
        "kernel/drivers/virtio/virtio_mmio.ko:\n",
        "kernel/fs/ext4/ext4.ko\n",
        &[("kernel/drivers/virtio/virtio_mmio.ko", b"\x7fELF")],
    );
    for name in ["e2e-nomods", "e2e-badmod"] {
        let _ = b.run(&["image", "delete", "--force", name]);
        let _ = b.run(&["kernel", "delete", name]);
    }
    ok(
        b,
        &[
            "image",
            "register",
            "--name",
            "e2e-nomods",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            &vmlinuz,
        ],
    );
    let lines = error_lines(
        b,
        &[
            "vm",
            "run",
            "--rm",
            "--image",
            "e2e-nomods",
            "--initramfs",
            "banger",
            "--",
            "true",
        ],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("kernel e2e-nomods has no banger initramfs")
            && lines[0].contains("virtio_blk")
            && lines[0].contains("--initramfs distro"),
        "{lines:?}"
    );

    // A module that is not one of this kernel's: the guest says so and
    // stops at once (no panic, no wait for an agent).
    let work2 = work_dir("badmod");
    let builtin: String = [
        "virtio_blk",
        "ext4",
        "overlay",
        "virtio_net",
        "virtio_console",
        "vsock",
        "vmw_vsock_virtio_transport",
        "virtio_rng",
    ]
    .iter()
    .map(|m| format!("kernel/x/{m}.ko\n"))
    .collect();
    let rootfs2 = module_image(
        &work2,
        &release,
        "kernel/drivers/virtio/virtio_mmio.ko:\n",
        &builtin,
        &[(
            "kernel/drivers/virtio/virtio_mmio.ko",
            b"not a kernel module",
        )],
    );
    ok(
        b,
        &[
            "image",
            "register",
            "--name",
            "e2e-badmod",
            "--rootfs",
            s(&rootfs2),
            "--kernel",
            &vmlinuz,
        ],
    );
    let before = b.vm_names();
    let started = std::time::Instant::now();
    let lines = error_lines(
        b,
        &["vm", "run", "--rm", "--image", "e2e-badmod", "--", "true"],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("cannot boot: loading kernel module virtio_mmio"),
        "{lines:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "the failure took {:?}",
        started.elapsed()
    );
    assert_eq!(b.vm_names(), before, "a VM was left behind");

    for name in ["e2e-nomods", "e2e-badmod"] {
        ok(b, &["image", "delete", name]);
        ok(b, &["kernel", "delete", name]);
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&work2);
}
