//! The cold-boot runs of `banger bench`: `vm run --rm -- true` each way,
//! and the VM lifecycle timings.

use super::util::ms;
use super::{BENCH_MEMORY_MIB, BENCH_VCPU, LifecycleSample, RunSample};
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::{CreateVmEvent, CreateVmRequest, Step};
use banger_model::{InitramfsMode, WarmMode};
use std::time::Instant;
pub(super) async fn one_run(
    client: &banger_api::Client,
    image: Option<String>,
    i: usize,
    initramfs: InitramfsMode,
    warm: WarmMode,
) -> anyhow::Result<RunSample> {
    let kind = if warm == WarmMode::Require {
        "warm"
    } else {
        "cold"
    };
    let req = CreateVmRequest {
        name: Some(format!(
            "bench-{}-{kind}-{initramfs}-{i}",
            std::process::id()
        )),
        image,
        // Same size as the bare boot below, so the two are comparable.
        vcpu: Some(BENCH_VCPU),
        memory_mib: Some(BENCH_MEMORY_MIB),
        start: true,
        // A warm run boots nothing: its template decided the initramfs.
        initramfs: (warm != WarmMode::Require).then_some(initramfs),
        warm,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut boot_at = None;
    let mut ready_at = None;
    let vm = client
        .create_vm(&req, |ev| {
            if let CreateVmEvent::Progress(p) = ev {
                match p.phase {
                    // A warm start's "boot" is the VMM loading the snapshot.
                    Step::Boot | Step::Restore => boot_at = Some(t0.elapsed()),
                    Step::Ready => ready_at = Some(t0.elapsed()),
                    _ => {}
                }
            }
        })
        .await?;
    let created = t0.elapsed();
    let (boot_at, ready_at) = match (boot_at, ready_at) {
        (Some(b), Some(r)) => (b, r),
        _ => anyhow::bail!("the daemon did not report boot/ready phases"),
    };
    let t1 = Instant::now();
    let (_, mut reader) = client
        .exec(
            vm.name.as_str(),
            &ExecStart {
                argv: vec!["true".into()],
                ..Default::default()
            },
        )
        .await?;
    loop {
        match reader.next().await? {
            Some(ExecOutput::Exit(_)) => break,
            Some(ExecOutput::Error(e)) => anyhow::bail!("{}", e.message),
            Some(_) => {}
            None => anyhow::bail!("exec ended without status"),
        }
    }
    let exec = t1.elapsed();
    // How it booted, asked outside the timed run.
    let tq = Instant::now();
    let report = client.vm_boot(vm.name.as_str()).await?;
    let query = tq.elapsed();
    let t2 = Instant::now();
    client.delete_vm(vm.name.as_str()).await?;
    let delete = t2.elapsed();
    let total = t0.elapsed() - query;
    let boot = ms(ready_at - boot_at);
    let kernel_init_ms = report.kernel_init_ms.unwrap_or(0) as f64;
    let agent_ready_ms = report.agent_ready_ms.unwrap_or(0) as f64;
    Ok(RunSample {
        start_kind: vm.start.kind.to_string(),
        initramfs: report.initramfs.unwrap_or_default(),
        kernel_init_ms,
        agent_ready_ms,
        ready_over_kernel_init: report.ready_over_kernel_init.unwrap_or(0.0),
        tap: report.tap,
        total_ms: ms(total),
        create_ms: ms(boot_at),
        boot_to_agent_ms: boot,
        ready_ms: ms(created - ready_at),
        exec_ms: ms(exec),
        delete_ms: ms(delete),
        orchestration_overhead_ms: ms(total) - boot,
        overhead_excluding_exec_ms: ms(total) - boot - ms(exec),
    })
}

/// Creates a VM without starting it, starts it, reads its memory, stops
/// and deletes it.
pub(super) async fn lifecycle(
    client: &banger_api::Client,
    image: Option<String>,
    i: usize,
) -> anyhow::Result<LifecycleSample> {
    let req = CreateVmRequest {
        name: Some(format!("bench-life-{}-{i}", std::process::id())),
        image,
        vcpu: Some(BENCH_VCPU),
        memory_mib: Some(BENCH_MEMORY_MIB),
        start: false,
        warm: WarmMode::Off,
        ..Default::default()
    };
    let t0 = Instant::now();
    let vm = client.create_vm(&req, |_| {}).await?;
    let create = t0.elapsed();
    let name = vm.name.to_string();
    let result = async {
        let t1 = Instant::now();
        client.start_vm(&name).await?;
        let start = t1.elapsed();
        let stats = client.vm_stats(&name, true).await?;
        let rss = stats.vmm.as_ref().map_or(0, |p| p.rss_bytes);
        let touched = stats
            .guest
            .as_ref()
            .map_or(0, |g| g.mem_total_bytes.saturating_sub(g.mem_free_bytes));
        let t2 = Instant::now();
        client.stop_vm(&name).await?;
        let stop = t2.elapsed();
        anyhow::Ok(LifecycleSample {
            create_no_start_ms: ms(create),
            start_to_ready_ms: ms(start),
            stop_ms: ms(stop),
            vmm_rss_bytes: rss,
            guest_touched_bytes: touched,
            overhead_bytes: rss as i64 - touched as i64,
        })
    }
    .await;
    client.delete_vm(&name).await?;
    result
}
