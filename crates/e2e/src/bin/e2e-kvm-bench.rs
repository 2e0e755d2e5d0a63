//! `banger bench` on real (nested) KVM, Firecracker and QEMU-KVM side by
//! side in one run: boots the KVM host of the nested-KVM tests (see
//! `banger_e2e::kvm_host`), runs the inner `banger bench` once per backend,
//! and prints both reports with the Firecracker / QEMU-KVM ratio of each
//! timing (JSON on stdout). Nested guests are emulated twice over: the
//! ratios mean something, the absolute times do not.
//!
//! Usage (after `scripts/build.sh`):
//!   BANGER_BIN_DIR=$PWD/build/bin cargo run -p banger-e2e --bin e2e-kvm-bench -- [BENCH ARGS...]
//! BENCH ARGS go to `banger bench` (default `--runs 1 --exec-runs 20
//! --stdout-mib 8 --cp-mib 4`: nested virtio moves about 1 MB/s).

use banger_e2e::kvm_host::{InnerVmm, kvm_host};
use serde_json::{Map, Value, json};

/// Timings compared between the backends: (JSON pointer, name in the output).
const COMPARED: &[(&str, &str)] = &[
    ("/banger_median/total_ms", "vm_run_rm_true_total_ms"),
    ("/banger_median/boot_to_agent_ms", "boot_to_agent_ms"),
    (
        "/banger_median/orchestration_overhead_ms",
        "orchestration_overhead_ms",
    ),
    ("/bare_boot_to_agent_ms_median", "bare_boot_to_agent_ms"),
    ("/lifecycle_median/create_no_start_ms", "create_no_start_ms"),
    ("/lifecycle_median/start_to_ready_ms", "start_to_ready_ms"),
    ("/lifecycle_median/stop_ms", "stop_ms"),
    ("/lifecycle_median/overhead_bytes", "vmm_overhead_bytes"),
    ("/exec/true_p50_ms", "exec_true_p50_ms"),
    ("/exec/stdout_mb_per_s", "exec_stdout_mb_per_s"),
    ("/cp/banger_push_mb_per_s", "cp_push_mb_per_s"),
    ("/cp/banger_pull_mb_per_s", "cp_pull_mb_per_s"),
];

fn main() {
    let mut bench_args: Vec<String> = std::env::args().skip(1).collect();
    if bench_args.is_empty() {
        bench_args = [
            "--runs",
            "1",
            "--exec-runs",
            "20",
            "--stdout-mib",
            "8",
            "--cp-mib",
            "4",
        ]
        .map(String::from)
        .to_vec();
    }
    let host = kvm_host();
    let mut reports = Map::new();
    let mut failed = Vec::new();
    for (name, vmm) in [
        ("firecracker", InnerVmm::Firecracker),
        ("qemu_kvm", InnerVmm::Qemu),
    ] {
        host.set_vmm(vmm);
        let mut args = vec!["bench"];
        args.extend(bench_args.iter().map(String::as_str));
        eprintln!("e2e-kvm-bench: banger {} ({name})", args.join(" "));
        let out = host.banger(&args);
        // Each backend's summary as soon as it is known: a later failure
        // (the nested guests are fragile) must not lose it.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let report = out
            .status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).ok())
            .flatten();
        match report {
            Some(report) => {
                eprintln!("e2e-kvm-bench: {name}: {report}");
                reports.insert(name.to_string(), report);
            }
            None => {
                eprintln!(
                    "e2e-kvm-bench: banger bench under {name} failed: {:?}",
                    out.status.code()
                );
                failed.push(name);
            }
        }
    }
    let mut ratios = Map::new();
    for (pointer, name) in COMPARED {
        let value = |backend: &str| {
            reports
                .get(backend)?
                .pointer(pointer)
                .and_then(Value::as_f64)
        };
        if let (Some(fc), Some(q)) = (value("firecracker"), value("qemu_kvm"))
            && q != 0.0
        {
            ratios.insert(name.to_string(), json!(fc / q));
        }
    }
    host.set_vmm(InnerVmm::Firecracker);
    let combined = json!({
        "note": "nested KVM inside a QEMU TCG guest: compare ratios, not absolute times",
        "firecracker_over_qemu_kvm": ratios,
        "reports": reports,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&combined).unwrap_or_default()
    );
    assert!(failed.is_empty(), "banger bench failed under {failed:?}");
}
