//! Local servers for tests: a `docker-registry` holding a tiny busybox
//! image, and the process guard and helpers around them.

use crate::{Banger, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills and reaps a helper process (HTTP server, registry) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Waits until something listens on 127.0.0.1:`port` inside `b`'s
/// network namespace (where its daemon runs, so where servers must be).
pub fn wait_for_port(b: &Banger, port: u16, child: &mut Child) {
    wait_until(
        &format!("a server on 127.0.0.1:{port}"),
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited early with {status}");
            }
            b.in_netns(
                "bash",
                &["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")],
            )
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        },
    );
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty OCI image `<work>/<prefix>layout:1` made with umoci, unpacked
/// (rootless) into `<work>/<prefix>bundle`: `(image, bundle)`.
fn empty_image(work: &Path, prefix: &str) -> (String, PathBuf) {
    let layout = work.join(format!("{prefix}layout"));
    let bundle = work.join(format!("{prefix}bundle"));
    let image = format!("{}:1", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &image]));
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle),
    );
    (image, bundle)
}

/// A docker-registry on 127.0.0.1 holding `test/bb:1`, a busybox image
/// written with umoci and pushed with skopeo. Returns the reference.
pub fn registry_with_busybox(b: &Banger, work: &Path) -> (Proc, String) {
    let port = free_port();
    let storage = work.join("registry");
    std::fs::create_dir_all(&storage).expect("storage");
    let cfg = work.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .expect("config");
    let mut child = b
        .in_netns("docker-registry", &["serve", s(&cfg)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (apt-get install docker-registry)");
    wait_for_port(b, port, &mut child);
    let registry = Proc(child);

    let (image, bundle) = empty_image(work, "");
    busybox_rootfs(&bundle.join("rootfs"), "bbtest");
    let reference = format!("127.0.0.1:{port}/test/bb:1");
    repack_and_push(b, &image, &bundle, &reference);
    (registry, reference)
}

/// A busybox root file system at `root` whose os-release says `ID=id`.
fn busybox_rootfs(root: &Path, id: &str) {
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("dir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for l in ["sh", "cat", "mount", "ls", "echo", "sleep", "stat", "find"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(l)).expect("link");
    }
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init")).expect("init");
    std::fs::write(
        root.join("etc/os-release"),
        format!("NAME=\"banger e2e busybox\"\nID={id}\n"),
    )
    .expect("os-release");
}

/// Repacks the umoci `bundle` into `image` and pushes it as `reference`.
fn repack_and_push(b: &Banger, image: &str, bundle: &Path, reference: &str) {
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", image])
            .arg(bundle),
    );
    run_ok(&mut b.in_netns(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{image}"),
            &format!("docker://{reference}"),
        ],
    ));
}

/// Pushes `test/setid:1` next to `busybox_ref`: the busybox image plus
/// what real distributions ship and a host must not keep: a setuid binary
/// (`/bin/suid`, 4755, like `su`), a setgid one (`/bin/sgid`, 2755) and a
/// setgid directory (`/var/mail`, 2775). Returns its reference.
pub fn push_setid(b: &Banger, work: &Path, busybox_ref: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let host = busybox_ref
        .split('/')
        .next()
        .expect("a registry host in the reference");
    let (image, bundle) = empty_image(work, "setid-");
    let root = bundle.join("rootfs");
    busybox_rootfs(&root, "setid");
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).expect(p)
    };
    for (bin, m) in [("bin/suid", 0o4755), ("bin/sgid", 0o2755)] {
        std::fs::copy("/bin/busybox", root.join(bin)).expect("busybox-static");
        mode(bin, m);
    }
    std::fs::create_dir_all(root.join("var/mail")).expect("var/mail");
    mode("var/mail", 0o2775);
    let reference = format!("{host}/test/setid:1");
    repack_and_push(b, &image, &bundle, &reference);
    reference
}

/// Pushes `test/bare:1` next to `busybox_ref` (what
/// [`registry_with_busybox`] returned): an image whose only file is a
/// static busybox in `/bin`: no `/dev`, `/proc`, `/sys`, `/run`, `/tmp`,
/// `/root`, no init. Returns its reference.
pub fn push_static_only(b: &Banger, work: &Path, busybox_ref: &str) -> String {
    let host = busybox_ref
        .split('/')
        .next()
        .expect("a registry host in the reference");
    let (image, bundle) = empty_image(work, "bare-");
    let root = bundle.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let top: Vec<String> = std::fs::read_dir(&root)
        .expect("rootfs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top, ["bin"], "the bare image has more than /bin");
    let reference = format!("{host}/test/bare:1");
    repack_and_push(b, &image, &bundle, &reference);
    reference
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}
