//! A real mmdebstrap run cancelled mid-way leaves no staging dir and no mounts.

use banger_image::{DebianBuild, ImageError, Progress, build_debian};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn cancelled_build_leaves_nothing_behind() {
    let t = tempfile::tempdir().expect("tmp");
    let images = t.path().join("images");
    let agent = t.path().join("agent");
    std::fs::copy("/bin/true", &agent).expect("agent stand-in");
    let spec = DebianBuild {
        name: "cancel-me".into(),
        suite: "bookworm".into(),
        mirror: None,
        extra_packages: vec![],
        agent_binary: agent,
        images_dir: images.clone(),
        kernels_dir: t.path().join("kernels"),
    };
    let cancel = CancellationToken::new();
    let lines = Arc::new(AtomicUsize::new(0));
    let (c2, l2) = (cancel.clone(), lines.clone());
    // Cancel once mmdebstrap has printed a few lines: it is then downloading
    // or unpacking inside its chroot with /proc, /sys and /dev mounted.
    let r = build_debian(
        &spec,
        move |p| {
            if matches!(p, Progress::Line(_)) && l2.fetch_add(1, Ordering::SeqCst) == 5 {
                c2.cancel();
            }
        },
        cancel,
    )
    .await;
    assert!(matches!(r, Err(ImageError::Cancelled)), "{r:?}");
    assert!(lines.load(Ordering::SeqCst) > 5);
    let left: Vec<_> = std::fs::read_dir(&images).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(banger_image::mounts_under_dir(t.path()).is_empty());
    assert!(!t.path().join("kernels").exists() || std::fs::read_dir(t.path().join("kernels")).expect("k").next().is_none());
}
