//! `banger bench` and `banger bench run` against real guests, at small
//! sizes: every block must run and report plausible numbers.

use banger_e2e::{shared, text};

fn json_of(out: &std::process::Output) -> serde_json::Value {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bench JSON: {e}: {stdout}"))
}

fn positive(v: &serde_json::Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    let n = cur
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {v}"));
    assert!(n > 0.0, "{path} = {n}: {v}");
    n
}

#[test]
fn bench_reports_run_lifecycle_exec_and_cp_blocks() {
    let b = shared();
    let out = b.run(&[
        "bench",
        "--runs",
        "1",
        "--exec-runs",
        "5",
        "--stdout-mib",
        "4",
        "--cp-mib",
        "4",
    ]);
    let r = json_of(&out);
    for err in ["exec_error", "cp_error", "network_error", "warm_error"] {
        assert!(r[err].is_null(), "{err}: {}", r[err]);
    }
    for f in [
        "banger_median.total_ms",
        "banger_median.boot_to_agent_ms",
        "banger_median.kernel_init_ms",
        "banger_median.agent_ready_ms",
        "banger_median.ready_over_kernel_init",
        "distro_median.total_ms",
        "distro_median.kernel_init_ms",
        "distro_median.agent_ready_ms",
        "total_ratio_banger_over_distro",
        "previous_total_ms",
        "total_ratio_banger_over_previous",
        "lifecycle_median.start_to_ready_ms",
        "bare_boot_to_agent_ms_median",
        "exec.true_p50_ms",
        "exec.true_p99_ms",
        "exec.stdout_mb_per_s",
        "cp.banger_push_mb_per_s",
        "cp.ssh_cat_push_mb_per_s",
        "cp.banger_pull_mb_per_s",
        "cp.ssh_cat_pull_mb_per_s",
        "cp.push_speedup_banger_over_ssh",
        "warm.template_build_ms",
        "warm.template_bytes.memory",
        "warm.template_bytes.disks",
        "warm.warm_median.total_ms",
        "warm.warm_restore_ms",
        "warm.total_ratio_warm_over_cold",
        "warm.warm_vmm_pss_bytes",
    ] {
        positive(&r, f);
    }
    // The bare boot starts the daemon's own backend (QEMU under TCG here).
    assert_eq!(r["bare_vmm"], "qemu (tcg)", "{r}");
    // The same run booted both ways, side by side.
    assert_eq!(r["banger_median"]["initramfs"], "banger", "{r}");
    assert_eq!(r["distro_median"]["initramfs"], "distro", "{r}");
    // Cold and warm runs of the same shape, interleaved.
    assert_eq!(r["banger_median"]["start_kind"], "cold", "{r}");
    assert_eq!(r["warm"]["warm_median"]["start_kind"], "warm", "{r}");
    assert!(
        positive(&r, "warm.total_ratio_warm_over_cold") < 1.0,
        "a restore beats a boot: {r}"
    );
    assert!(
        positive(&r, "banger_median.ready_over_kernel_init") > 1.0,
        "{r}"
    );
    assert_eq!(r["exec"]["runs"], 5, "{r}");
    assert_eq!(r["exec"]["stdout_bytes"], 4 << 20, "{r}");
    assert_eq!(r["cp"]["bytes"], 4 << 20, "{r}");
    assert!(
        b.vm_names().is_empty(),
        "bench left VMs: {:?}",
        b.vm_names()
    );
}

#[test]
fn bench_run_compares_the_workspace_copy_with_git_archive() {
    let b = shared();
    let r = json_of(&b.run(&["bench", "run", "--files", "300"]));
    assert_eq!(r["files"], 300, "{r}");
    positive(&r, "bytes");
    for phase in ["create", "boot", "copy", "command", "delete", "total"] {
        positive(&r, &format!("phases_ms.{phase}"));
    }
    let total = positive(&r, "total_ms");
    let outside = positive(&r, "overhead_outside_boot_ms");
    let copy = positive(&r, "copy_ms");
    assert!(outside < total && copy < outside, "{r}");
    positive(&r, "copy_settled_ms");
    positive(&r, "git_archive_ssh_ms");
    positive(&r, "copy_speedup_banger_over_git_archive");
    assert!(
        b.vm_names().is_empty(),
        "bench left VMs: {:?}",
        b.vm_names()
    );
}
