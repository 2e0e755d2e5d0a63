//! A real build cancelled while mmdebstrap installs packages inside its
//! chroot (with /proc, /sys and /dev mounted) leaves nothing behind: no
//! staging directory, no mount, no process, no kernel.

mod common;

use banger_image::{ImageError, Progress, build_debian, mounts_under};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_mmdebstrap_leaves_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().expect("tempdir");
    let spec = common::spec(t.path(), "cancel-me");
    let cancel = CancellationToken::new();
    let saw_mounts = Arc::new(AtomicBool::new(false));
    let cancelled_at = Arc::new(std::sync::Mutex::new(None));
    let on_progress = {
        let (cancel, saw, at, images) = (
            cancel.clone(),
            saw_mounts.clone(),
            cancelled_at.clone(),
            spec.images_dir.clone(),
        );
        move |p: Progress| {
            if let Progress::Phase { name, .. } = &p {
                assert_eq!(
                    *name, "packages",
                    "the build should be cancelled during mmdebstrap"
                );
            }
            // Cancel as soon as mmdebstrap has mounted things in its chroot.
            if !saw.load(Ordering::SeqCst) && !mounts_under(&images).is_empty() {
                saw.store(true, Ordering::SeqCst);
                *at.lock().expect("lock") = Some(Instant::now());
                cancel.cancel();
            }
        }
    };
    let result = build_debian(&spec, on_progress, cancel).await;
    assert!(matches!(result, Err(ImageError::Cancelled)), "{result:?}");
    assert!(
        saw_mounts.load(Ordering::SeqCst),
        "mmdebstrap never mounted anything under the staging dir"
    );
    let took = cancelled_at
        .lock()
        .expect("lock")
        .expect("cancelled")
        .elapsed();
    eprintln!("cancellation took {took:?}");
    assert!(took < Duration::from_secs(30), "cancellation took {took:?}");

    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );
    assert_eq!(common::names_in(&spec.images_dir), [".build.lock"]);
    assert!(common::names_in(&spec.kernels_dir).is_empty());
    assert!(
        common::processes_inside(t.path()).is_empty(),
        "{:?}",
        common::processes_inside(t.path())
    );
}

/// The real-build tests of this file run one at a time (two cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A build future dropped mid-mmdebstrap (its task aborted) still kills the
/// tools and unmounts and removes its staging directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_build_future_cleans_up_too() {
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().expect("tempdir");
    let spec = common::spec(t.path(), "drop-me");
    let mounted = Arc::new(tokio::sync::Notify::new());
    let on_progress = {
        let (mounted, images) = (mounted.clone(), spec.images_dir.clone());
        move |_: Progress| {
            if !mounts_under(&images).is_empty() {
                mounted.notify_one();
            }
        }
    };
    let build = {
        let spec = spec.clone();
        tokio::spawn(
            async move { build_debian(&spec, on_progress, CancellationToken::new()).await },
        )
    };
    tokio::time::timeout(Duration::from_secs(300), mounted.notified())
        .await
        .expect("mmdebstrap mounted its chroot");
    build.abort();
    let joined = build.await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_cancelled()),
        "{joined:?}"
    );

    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );
    assert_eq!(common::names_in(&spec.images_dir), [".build.lock"]);
    assert!(common::names_in(&spec.kernels_dir).is_empty());
    // SIGKILL is delivered at once, but the processes may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::processes_inside(t.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            common::processes_inside(t.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A build that fails (an unreachable mirror) removes its staging directory,
/// and the build first removes what a crashed build left, mounts included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_cleans_up_and_removes_a_crashed_builds_leftovers() {
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().expect("tempdir");
    let mut spec = common::spec(t.path(), "fail-me");
    // Loopback port 9 (discard) refuses connections: apt-get update fails fast.
    spec.mirror = Some("http://127.0.0.1:9/debian".into());
    let stale = spec
        .images_dir
        .join(".staging-fail-me-00000000deadbeef/root/proc");
    std::fs::create_dir_all(&stale).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &stale,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount");
    std::fs::write(stale.join("keep-out"), "x").expect("write");

    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let r = build_debian(
        &spec,
        move |p| {
            if let Progress::Line(l) = p {
                l2.lock().expect("lock").push(l)
            }
        },
        CancellationToken::new(),
    )
    .await;
    match r {
        Err(ImageError::ToolFailed {
            tool: "mmdebstrap",
            ref last_line,
            ref tail,
            ..
        }) => {
            assert!(!tail.is_empty());
            assert!(
                last_line.contains("mmdebstrap failed") || last_line.starts_with("E:"),
                "{last_line}"
            );
        }
        other => panic!("expected mmdebstrap to fail, got {other:?}"),
    }
    assert!(!lines.lock().expect("lock").is_empty());
    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );
    assert_eq!(common::names_in(&spec.images_dir), [".build.lock"]);
}
