//! `banger bench`: where the time of `vm run --rm -- true` goes (JSON). The
//! benchmarks drive the daemon's public API (through `banger-client`), the
//! guest over ssh, the VMMs directly for the bare boot, the `.vm` DNS
//! server over UDP, and banger's image code directly for `bench image`;
//! the CLI only parses `banger bench` and calls [`run`]. The daemon has no
//! benchmark code: what is timed inside it comes from what it reports to
//! any user (progress events, `vm show`'s boot facts, `GET /v1/network`).

mod bare;
mod boot;
pub mod cp;
mod exec;
pub mod image;
mod network;
pub mod run;
mod util;
mod warm;

use anyhow::Context;
use banger_client::connect;
use banger_model::{InitramfsMode, WarmMode};
use bare::{bare_backend, bare_boot, host_summary};
use boot::{lifecycle, one_run};
use clap::{Args, Subcommand};
use exec::exec_and_cp;
use serde::Serialize;
use warm::{make_template, warm_block};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time an OCI import (banger vs skopeo + umoci + mkfs.ext4) and a
    /// catalog install (banger vs curl | zstd -d | tar x) of one image.
    Image(image::ImageBenchArgs),
    /// Time `vm run REPO -- true` on a generated repository and its
    /// workspace copy against `git archive | ssh tar -x` (JSON).
    Run(run::RunBenchArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Image to boot (default: the configured default image).
    #[arg(long)]
    image: Option<String>,
    /// Sequential `true` runs timed by the exec block.
    #[arg(long, default_value_t = 100)]
    exec_runs: usize,
    /// MiB of stdout the exec block streams (`head -c N /dev/zero`).
    #[arg(long, default_value_t = 200)]
    stdout_mib: u64,
    /// MiB of the file the cp block copies each way.
    #[arg(long, default_value_t = 100)]
    cp_mib: u64,
}

/// One `vm run --rm -- true`, in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
struct RunSample {
    /// `cold` (booted) or `warm` (restored from a template).
    start_kind: String,
    /// The initramfs that booted it: `banger`, `distro` or `none`
    /// (a warm run's template booted banger's or the distribution's).
    initramfs: String,
    total_ms: f64,
    /// Request sent → VMM about to be launched (name, image, disk, record).
    create_ms: f64,
    /// VMM launch → agent's hello: the guest's own boot.
    boot_to_agent_ms: f64,
    /// Agent hello → create answered (root fs grow, state update).
    ready_ms: f64,
    exec_ms: f64,
    delete_ms: f64,
    /// Everything outside the guest's boot: total minus boot-to-agent.
    orchestration_overhead_ms: f64,
    /// The same without the exec round trip, whose time is mostly the guest
    /// starting `true` (emulated under TCG).
    overhead_excluding_exec_ms: f64,
    /// Guest kernel uptime when the kernel started its first process
    /// (`Run /init as init process`).
    kernel_init_ms: f64,
    /// Guest kernel uptime at the agent's hello.
    agent_ready_ms: f64,
    /// How the VM got its TAP (for the network block).
    #[serde(skip)]
    tap: Option<banger_api::TapAcquisition>,
    /// `agent_ready_ms / kernel_init_ms`: how far past the kernel's own
    /// start the guest is ready (1.0 = at once).
    ready_over_kernel_init: f64,
}

/// One create → start → stop of a VM, in milliseconds, and its memory.
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct LifecycleSample {
    /// `vm create --no-start`: record, overlay and work disk.
    create_no_start_ms: f64,
    /// `vm start` until the agent's hello.
    start_to_ready_ms: f64,
    /// `vm stop`: guest power-off until the VMM is gone.
    stop_ms: f64,
    /// Resident memory of the VMM process while the guest idles.
    vmm_rss_bytes: u64,
    /// Guest memory the guest has touched (MemTotal − MemFree).
    guest_touched_bytes: u64,
    /// Host memory per VM beyond guest RAM: VMM RSS − guest touched memory.
    overhead_bytes: i64,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: usize,
    backend: String,
    host: String,
    /// `vm run --rm -- true` booting banger's initramfs (the agent as
    /// /init, ready before the image's init).
    banger_median: RunSample,
    samples: Vec<RunSample>,
    /// The same run with `--initramfs distro` (the kernel's own initramfs,
    /// then the agent as init=), in the same iterations.
    distro_median: RunSample,
    distro_samples: Vec<RunSample>,
    /// banger's total over the distro boot's total: below 1 is faster.
    total_ratio_banger_over_distro: f64,
    /// What `vm run --rm -- true` took before banger's initramfs and
    /// readiness at init: the bare boot below (the kernel's own initramfs,
    /// then systemd starting the agent's unit) plus the distro run's time
    /// outside its boot (create, exec, delete).
    previous_total_ms: f64,
    /// banger's total over [`Report::previous_total_ms`].
    total_ratio_banger_over_previous: f64,
    lifecycle_median: LifecycleSample,
    lifecycle_samples: Vec<LifecycleSample>,
    /// The VMM of the bare boot: the daemon's backend, started directly.
    bare_vmm: String,
    /// The same kernel and disk booted by that VMM started directly (no
    /// daemon, no overlay or work disk), to agent-ready.
    bare_boot_to_agent_ms_median: f64,
    bare_samples_ms: Vec<f64>,
    /// banger's boot-to-agent over the bare boot: ~1.0 means banger adds
    /// nothing to the guest boot itself.
    boot_ratio_banger_over_bare: f64,
    /// banger's whole `vm run --rm -- true` over the bare boot.
    total_ratio_banger_over_bare: f64,
    /// TAP acquisition (warm pool vs cold), as the daemon reported it for
    /// the bench's VMs, and `.vm` DNS latency over 10k queries to the
    /// daemon's DNS server, for the exec block's VM.
    network: Option<network::NetworkBench>,
    network_error: Option<String>,
    /// Warm starts: the same run restored from a template, interleaved
    /// with the cold runs above.
    warm: Option<WarmBench>,
    warm_error: Option<String>,
    /// Exec round trip and stdout throughput through daemon and agent.
    exec: Option<ExecBench>,
    exec_error: Option<String>,
    /// `vm cp` against `ssh cat`, both ways, on the exec block's VM.
    cp: Option<cp::CpBench>,
    cp_error: Option<String>,
}

/// `vm run --warm --rm -- true` against the cold runs of the same shape.
#[derive(Debug, Serialize)]
struct WarmBench {
    template: String,
    /// `image warm` of the bench shape, from nothing (the daemon's own
    /// count: boot, settle, seal, snapshot, save).
    template_build_ms: f64,
    /// Bytes the template's files take on disk.
    template_bytes: TemplateBytes,
    warm_median: RunSample,
    warm_samples: Vec<RunSample>,
    /// Warm total over the cold (banger initramfs) total: below 1 is faster.
    total_ratio_warm_over_cold: f64,
    /// Median time the VMM took to load the snapshot and resume.
    warm_restore_ms: f64,
    /// Bytes a warm VM's own disks take on disk (clones of the template's:
    /// shared extents with reflink, copies without).
    warm_vm_disk_allocated_bytes: u64,
    /// `reflink` or `sparse copy`, as the daemon reports its state dir.
    clone_kind: String,
    /// PSS and private memory of a warm VM's VMM (`smaps_rollup`) against
    /// the RSS of a cold VM's (lifecycle block).
    warm_vmm_pss_bytes: u64,
    warm_vmm_private_bytes: u64,
    cold_vmm_rss_bytes: u64,
}

/// Allocated bytes of a template's files.
#[derive(Debug, Serialize, Default)]
struct TemplateBytes {
    memory: u64,
    vmstate: u64,
    disks: u64,
    total: u64,
}

/// `vm exec` costs on one running VM.
#[derive(Debug, Serialize)]
struct ExecBench {
    /// Sequential runs of `true`.
    runs: usize,
    /// Request to exit status of `true`, in milliseconds.
    true_p50_ms: f64,
    true_p99_ms: f64,
    true_mean_ms: f64,
    /// Bytes `head -c N /dev/zero` wrote to stdout and the rate they arrived.
    stdout_bytes: u64,
    stdout_seconds: f64,
    stdout_mb_per_s: f64,
}

const BENCH_VCPU: u32 = 1;
const BENCH_MEMORY_MIB: u64 = 1024;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub async fn run(a: BenchArgs) -> anyhow::Result<i32> {
    match a.command {
        Some(BenchCommand::Image(a)) => return image::run(a).await,
        Some(BenchCommand::Run(a)) => return run::run(a).await,
        None => {}
    }
    anyhow::ensure!(a.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(a.exec_runs >= 1, "--exec-runs must be at least 1");
    anyhow::ensure!(
        a.stdout_mib >= 1 && a.cp_mib >= 1,
        "--stdout-mib and --cp-mib must be at least 1"
    );
    let client = connect::client().await?;
    let info = client.info().await?;
    let bare_vmm = bare_backend().context("choosing the VMM for the bare boot")?;
    let mut samples = Vec::new();
    let mut distro = Vec::new();
    let mut bare = Vec::new();
    let mut life = Vec::new();
    let mut warm_runs = Vec::new();
    // The template of the bench shape, made from nothing so its build is
    // timed (a failure is reported, the cold runs go on).
    let template = make_template(&client, a.image.as_deref()).await;
    if let Err(e) = &template {
        eprintln!("bench: no template: {e:#}");
    }
    for i in 0..a.runs {
        if template.is_ok() {
            let s = one_run(
                &client,
                a.image.clone(),
                i,
                InitramfsMode::Auto,
                WarmMode::Require,
            )
            .await?;
            eprintln!(
                "bench: run {} (warm): total {:.0} ms, restore {:.0} ms, overhead {:.1} ms",
                i + 1,
                s.total_ms,
                s.boot_to_agent_ms,
                s.orchestration_overhead_ms
            );
            warm_runs.push(s);
        }
        for (mode, out) in [
            (InitramfsMode::Banger, &mut samples),
            (InitramfsMode::Distro, &mut distro),
        ] {
            let s = one_run(&client, a.image.clone(), i, mode, WarmMode::Off).await?;
            eprintln!(
                "bench: run {} ({} initramfs): total {:.0} ms, boot {:.0} ms, overhead {:.1} ms, kernel init {:.0} ms, agent ready {:.0} ms ({:.2}x)",
                i + 1,
                s.initramfs,
                s.total_ms,
                s.boot_to_agent_ms,
                s.orchestration_overhead_ms,
                s.kernel_init_ms,
                s.agent_ready_ms,
                s.ready_over_kernel_init
            );
            out.push(s);
        }
        let b = bare_boot(&client, a.image.as_deref(), &bare_vmm)
            .await
            .with_context(|| format!("bare {} boot", bare_vmm.kind))?;
        eprintln!("bench: bare {} boot to agent {b:.0} ms", bare_vmm.kind);
        bare.push(b);
        let l = lifecycle(&client, a.image.clone(), i).await?;
        eprintln!(
            "bench: lifecycle {}: create {:.0} ms, start {:.0} ms, stop {:.0} ms, overhead {} MiB",
            i + 1,
            l.create_no_start_ms,
            l.start_to_ready_ms,
            l.stop_ms,
            l.overhead_bytes >> 20
        );
        life.push(l);
    }
    let lpick = |f: fn(&LifecycleSample) -> f64| median(life.iter().map(f).collect());
    let life_med = LifecycleSample {
        create_no_start_ms: lpick(|s| s.create_no_start_ms),
        start_to_ready_ms: lpick(|s| s.start_to_ready_ms),
        stop_ms: lpick(|s| s.stop_ms),
        vmm_rss_bytes: lpick(|s| s.vmm_rss_bytes as f64) as u64,
        guest_touched_bytes: lpick(|s| s.guest_touched_bytes as f64) as u64,
        overhead_bytes: lpick(|s| s.overhead_bytes as f64) as i64,
    };
    let med = median_sample(&samples);
    let distro_med = median_sample(&distro);
    let (warm, warm_error) = match template {
        Ok(t) => match warm_block(&client, a.image.clone(), &t, warm_runs, &med, &life_med).await {
            Ok(w) => (Some(w), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let bare_med = median(bare.clone());
    let taps: Vec<_> = samples
        .iter()
        .chain(&distro)
        .filter_map(|s| s.tap)
        .collect();
    let (exec, cp, network) = match exec_and_cp(&client, &a, &taps).await {
        Ok(blocks) => blocks,
        Err(e) => (
            Err(e),
            None,
            Err(anyhow::anyhow!("no VM to run the network block on")),
        ),
    };
    if let Ok(e) = &exec {
        eprintln!(
            "bench: exec true p50 {:.1} ms, p99 {:.1} ms; stdout {:.1} MB/s",
            e.true_p50_ms, e.true_p99_ms, e.stdout_mb_per_s
        );
    }
    if let Some(Ok(c)) = &cp {
        eprintln!(
            "bench: cp push {:.1} MB/s (ssh cat {:.1}), pull {:.1} MB/s (ssh cat {:.1})",
            c.banger_push_mb_per_s,
            c.ssh_cat_push_mb_per_s,
            c.banger_pull_mb_per_s,
            c.ssh_cat_pull_mb_per_s
        );
    }
    if let Ok(n) = &network {
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} us"));
        eprintln!(
            "bench: TAP from the pool {}, created {}; .vm DNS p50 {} us, p99 {} us",
            us(n.tap_warm_us),
            us(n.tap_cold_us),
            n.dns_p50_us,
            n.dns_p99_us
        );
    }
    let (exec, exec_error) = split(exec);
    let (cp, cp_error) = cp.map_or((None, None), split);
    let (network, network_error) = split(network);
    let report = Report {
        runs: a.runs,
        backend: format!("{} ({})", info.backend, info.backend_reason),
        host: host_summary(),
        total_ratio_banger_over_distro: if distro_med.total_ms > 0.0 {
            med.total_ms / distro_med.total_ms
        } else {
            0.0
        },
        previous_total_ms: bare_med + distro_med.orchestration_overhead_ms,
        total_ratio_banger_over_previous: if bare_med > 0.0 {
            med.total_ms / (bare_med + distro_med.orchestration_overhead_ms)
        } else {
            0.0
        },
        banger_median: med.clone(),
        samples,
        distro_median: distro_med,
        distro_samples: distro,
        lifecycle_median: life_med,
        lifecycle_samples: life,
        bare_vmm: bare_vmm.kind.to_string(),
        bare_boot_to_agent_ms_median: bare_med,
        bare_samples_ms: bare,
        boot_ratio_banger_over_bare: if bare_med > 0.0 {
            med.boot_to_agent_ms / bare_med
        } else {
            0.0
        },
        total_ratio_banger_over_bare: if bare_med > 0.0 {
            med.total_ms / bare_med
        } else {
            0.0
        },
        network,
        network_error,
        warm,
        warm_error,
        exec,
        exec_error,
        cp,
        cp_error,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

/// A block's result as its report fields: the value, or the error's chain.
fn split<T>(r: anyhow::Result<T>) -> (Option<T>, Option<String>) {
    match r {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    }
}

/// The median of each field.
fn median_sample(samples: &[RunSample]) -> RunSample {
    let pick = |f: fn(&RunSample) -> f64| median(samples.iter().map(f).collect());
    RunSample {
        start_kind: samples
            .first()
            .map(|s| s.start_kind.clone())
            .unwrap_or_default(),
        initramfs: samples
            .first()
            .map(|s| s.initramfs.clone())
            .unwrap_or_default(),
        total_ms: pick(|s| s.total_ms),
        create_ms: pick(|s| s.create_ms),
        boot_to_agent_ms: pick(|s| s.boot_to_agent_ms),
        ready_ms: pick(|s| s.ready_ms),
        exec_ms: pick(|s| s.exec_ms),
        delete_ms: pick(|s| s.delete_ms),
        orchestration_overhead_ms: pick(|s| s.orchestration_overhead_ms),
        overhead_excluding_exec_ms: pick(|s| s.overhead_excluding_exec_ms),
        kernel_init_ms: pick(|s| s.kernel_init_ms),
        agent_ready_ms: pick(|s| s.agent_ready_ms),
        ready_over_kernel_init: pick(|s| s.ready_over_kernel_init),
        tap: None,
    }
}
