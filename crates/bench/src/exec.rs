//! Exec latency and throughput of `banger bench`, and `vm cp`.

use super::util::{exec_with, ms};
use super::{BENCH_MEMORY_MIB, BENCH_VCPU, BenchArgs, ExecBench};
use banger_api::CreateVmRequest;
use std::time::Instant;
/// Runs `argv` to its end; returns the stdout byte count and exit code.
pub(super) async fn exec_count(
    client: &banger_api::Client,
    vm: &str,
    argv: &[&str],
) -> anyhow::Result<(u64, i32)> {
    let mut bytes = 0u64;
    let code = exec_with(client, vm, argv, |d| bytes += d.len() as u64).await?;
    Ok((bytes, code))
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What [`exec_and_cp`] measured on its VM: the exec block, the cp block
/// (not run when exec failed) and the network block, each failing alone.
type OnOneVm = (
    anyhow::Result<ExecBench>,
    Option<anyhow::Result<super::cp::CpBench>>,
    anyhow::Result<super::network::NetworkBench>,
);

/// Boots one VM (sshd up too), runs the exec block, the network block
/// (`taps`: the TAP acquisitions of the earlier runs; its DNS queries ask
/// for this VM) and then the cp block on it, deletes the VM. Only creating
/// or deleting the VM fails the whole.
pub(super) async fn exec_and_cp(
    client: &banger_api::Client,
    a: &BenchArgs,
    taps: &[banger_api::TapAcquisition],
) -> anyhow::Result<OnOneVm> {
    let req = CreateVmRequest {
        name: Some(format!("bench-exec-{}", std::process::id())),
        image: a.image.clone(),
        vcpu: Some(BENCH_VCPU),
        memory_mib: Some(BENCH_MEMORY_MIB),
        start: true,
        wait_ssh: true,
        ..Default::default()
    };
    let vm = client.create_vm(&req, |_| {}).await?;
    let name = vm.name.to_string();
    let exec = exec_bench(client, &name, a.exec_runs, a.stdout_mib << 20).await;
    let net = async {
        let mut taps = taps.to_vec();
        taps.extend(client.vm_boot(&name).await?.tap);
        super::network::network_bench(client, &taps, &name).await
    }
    .await;
    let cp = match exec {
        Ok(_) => Some(super::cp::cp_bench(client, &vm, a.cp_mib << 20).await),
        Err(_) => None,
    };
    client.delete_vm(&name).await?;
    Ok((exec, cp, net))
}

/// Times `runs` runs of `true` and the throughput of `stdout_bytes` of
/// stdout on the running VM `name`.
pub(super) async fn exec_bench(
    client: &banger_api::Client,
    name: &str,
    runs: usize,
    stdout_bytes: u64,
) -> anyhow::Result<ExecBench> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let (_, code) = exec_count(client, name, &["true"]).await?;
        anyhow::ensure!(code == 0, "`true` exited {code} in the guest");
        times.push(ms(t.elapsed()));
    }
    let count = format!("{stdout_bytes}");
    let t = Instant::now();
    let (bytes, code) = exec_count(client, name, &["head", "-c", &count, "/dev/zero"]).await?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        code == 0 && bytes == stdout_bytes,
        "head wrote {bytes} bytes and exited {code}"
    );
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(|a, b| a.total_cmp(b));
    anyhow::Ok(ExecBench {
        runs,
        true_p50_ms: percentile(&times, 50.0),
        true_p99_ms: percentile(&times, 99.0),
        true_mean_ms: mean,
        stdout_bytes: bytes,
        stdout_seconds: secs,
        stdout_mb_per_s: bytes as f64 / 1e6 / secs.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
