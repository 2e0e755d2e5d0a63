//! A VMM that never answers on its control socket is killed, with its
//! children, when start-up times out or the launch is abandoned.
//!
//! One test in its own binary on purpose: it executes a script written just
//! before, and a concurrent fork elsewhere in the process could inherit the
//! script's write descriptor and make the exec fail with "text file busy".

mod common;

use banger_vmm::{Accel, QemuVmm, Vmm, VmmError};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[tokio::test]
async fn silent_vmm_is_killed_on_timeout_and_on_cancel() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Stays alive with the VM dir in its arguments, with a helper in its
    // process group, and keeps forking children, like a hung QEMU with
    // helpers.
    let fake = tmp.path().join("fake-qemu");
    std::fs::write(
        &fake,
        "#!/bin/sh\n(while :; do sleep 1; done) &\nwhile :; do sleep 1; done\n",
    )
    .expect("write script");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // Start-up timeout.
    let spec = common::spec(&tmp.path().join("timeout"));
    let vmm = QemuVmm::new(fake.clone(), Accel::Tcg, Some(2_000_000))
        .with_startup_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let err = vmm.launch(&spec).await.expect_err("must time out");
    assert!(matches!(err, VmmError::Timeout { secs: 1, .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Killed, with every process of its group (a child the script was
    // forking at that moment too), before the error returns.
    assert_eq!(
        common::processes_mentioning(&spec.dir),
        Vec::<u32>::new(),
        "fake VMM left running"
    );

    // Launch future dropped while it waits for QMP, once the VMM runs.
    let spec = common::spec(&tmp.path().join("cancel"));
    let vmm = QemuVmm::new(fake, Accel::Tcg, Some(2_000_000));
    let mut launch = Box::pin(vmm.launch(&spec));
    let running = async {
        while common::processes_mentioning(&spec.dir).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        r = &mut launch => panic!("launch finished: {r:?}"),
        r = tokio::time::timeout(Duration::from_secs(10), running) => r.expect("fake VMM started"),
    }
    drop(launch);
    // SIGKILL was sent on drop; the kernel acts on it asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::processes_mentioning(&spec.dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "fake VMM survived a cancelled launch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
