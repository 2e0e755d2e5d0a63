//! `banger bench`: where the time of `vm run --rm -- true` goes (JSON).

use super::bench_util::{exec_with, ms};
use crate::connect;
use anyhow::Context;
use banger_api::exec::{ExecOutput, ExecStart};
use banger_api::{CreateVmEvent, CreateVmRequest, Step};
use banger_model::{InitramfsMode, WarmMode};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time an OCI import (banger vs skopeo + umoci + mkfs.ext4) and a
    /// catalog install (banger vs curl | zstd -d | tar x) of one image.
    Image(crate::commands::bench_image::ImageBenchArgs),
    /// Time `vm run REPO -- true` on a generated repository and its
    /// workspace copy against `git archive | ssh tar -x` (JSON).
    Run(crate::commands::bench_run::RunBenchArgs),
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
    /// TAP acquisition (warm pool vs cold) and `.vm` DNS latency over 10k
    /// queries, measured in the daemon.
    network: Option<banger_api::NetworkBench>,
    network_error: Option<String>,
    /// Warm starts: the same run restored from a template, interleaved
    /// with the cold runs above.
    warm: Option<WarmBench>,
    warm_error: Option<String>,
    /// Exec round trip and stdout throughput through daemon and agent.
    exec: Option<ExecBench>,
    exec_error: Option<String>,
    /// `vm cp` against `ssh cat`, both ways, on the exec block's VM.
    cp: Option<crate::commands::bench_cp::CpBench>,
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
        Some(BenchCommand::Image(a)) => return crate::commands::bench_image::run(a).await,
        Some(BenchCommand::Run(a)) => return crate::commands::bench_run::run(a).await,
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
    let (network, network_error) = match client.network_bench().await {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (exec, exec_error, cp, cp_error) = match exec_and_cp(&client, &a).await {
        Ok((e, cp)) => {
            eprintln!(
                "bench: exec true p50 {:.1} ms, p99 {:.1} ms; stdout {:.1} MB/s",
                e.true_p50_ms, e.true_p99_ms, e.stdout_mb_per_s
            );
            let (cp, cp_error) = match cp {
                Ok(c) => {
                    eprintln!(
                        "bench: cp push {:.1} MB/s (ssh cat {:.1}), pull {:.1} MB/s (ssh cat {:.1})",
                        c.banger_push_mb_per_s,
                        c.ssh_cat_push_mb_per_s,
                        c.banger_pull_mb_per_s,
                        c.ssh_cat_pull_mb_per_s
                    );
                    (Some(c), None)
                }
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            (Some(e), None, cp, cp_error)
        }
        Err(e) => (None, Some(format!("{e:#}")), None, None),
    };
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
    }
}

async fn one_run(
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

/// Makes the template of the bench shape (an existing current one is
/// kept, with the build time it was made in). Also says whether the image
/// had no template before, so the bench removes what it made.
async fn make_template(
    client: &banger_api::Client,
    image: Option<&str>,
) -> anyhow::Result<(banger_model::TemplateRecord, bool)> {
    let image = match image {
        Some(i) => i.to_string(),
        None => banger_config::Config::load(&crate::connect::daemon_paths()?)?.default_image_name,
    };
    let had_none = client.list_templates(&image).await?.is_empty();
    let req = banger_api::templates::WarmImageRequest {
        vcpu: Some(BENCH_VCPU),
        memory_mib: Some(BENCH_MEMORY_MIB),
    };
    let t = client.warm_image(&image, &req, |_| {}).await?;
    eprintln!(
        "bench: template {} built in {} ms",
        t.id,
        t.build_ms.unwrap_or(0)
    );
    Ok((t, had_none))
}

/// The warm block: sizes of the template and of a warm VM, and a warm
/// VM's VMM memory, on one more warm VM kept briefly.
async fn warm_block(
    client: &banger_api::Client,
    image: Option<String>,
    (t, made): &(banger_model::TemplateRecord, bool),
    runs: Vec<RunSample>,
    cold: &RunSample,
    life: &LifecycleSample,
) -> anyhow::Result<WarmBench> {
    use std::os::unix::fs::MetadataExt;
    let alloc = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.blocks() * 512);
    let mut bytes = TemplateBytes::default();
    for e in std::fs::read_dir(&t.dir)
        .with_context(|| format!("reading {}", t.dir.display()))?
        .flatten()
    {
        let n = alloc(&e.path());
        match e.file_name().to_string_lossy().as_ref() {
            "memory" => bytes.memory += n,
            "vmstate" => bytes.vmstate += n,
            name if name.ends_with(".ext4") => bytes.disks += n,
            _ => {}
        }
        bytes.total += n;
    }
    let req = CreateVmRequest {
        name: Some(format!("bench-warm-mem-{}", std::process::id())),
        image,
        vcpu: Some(BENCH_VCPU),
        memory_mib: Some(BENCH_MEMORY_MIB),
        start: true,
        warm: WarmMode::Require,
        ..Default::default()
    };
    let vm = client.create_vm(&req, |_| {}).await?;
    let measured = async {
        let disks = ["overlay.ext4", "work.ext4"]
            .iter()
            .map(|f| alloc(&vm.dir.join(f)))
            .sum::<u64>();
        let (pss, private) = vm.pid.map(smaps_rollup).unwrap_or((0, 0));
        anyhow::Ok((disks, pss, private))
    }
    .await;
    client.delete_vm(vm.name.as_str()).await?;
    // A benchmark leaves nothing behind: a template it made goes too.
    if *made {
        client.drop_templates(&t.image).await?;
    }
    let (disks, pss, private) = measured?;
    let warm_med = median_sample(&runs);
    let info = client.info().await?;
    Ok(WarmBench {
        template: t.id.clone(),
        template_build_ms: t.build_ms.unwrap_or(0) as f64,
        template_bytes: bytes,
        total_ratio_warm_over_cold: if cold.total_ms > 0.0 {
            warm_med.total_ms / cold.total_ms
        } else {
            0.0
        },
        warm_restore_ms: median(runs.iter().map(|s| s.boot_to_agent_ms).collect()),
        warm_median: warm_med,
        warm_samples: runs,
        warm_vm_disk_allocated_bytes: disks,
        clone_kind: if info.warm.reflink {
            "reflink"
        } else {
            "sparse copy"
        }
        .into(),
        warm_vmm_pss_bytes: pss,
        warm_vmm_private_bytes: private,
        cold_vmm_rss_bytes: life.vmm_rss_bytes,
    })
}

/// PSS and private (clean + dirty) bytes of process `pid`.
fn smaps_rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

/// Creates a VM without starting it, starts it, reads its memory, stops
/// and deletes it.
async fn lifecycle(
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

/// Runs `argv` to its end; returns the stdout byte count and exit code.
async fn exec_count(
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

/// Boots one VM (sshd up too), runs the exec block and then the cp block
/// on it, deletes the VM. A failed cp block does not void the exec one.
async fn exec_and_cp(
    client: &banger_api::Client,
    a: &BenchArgs,
) -> anyhow::Result<(
    ExecBench,
    anyhow::Result<crate::commands::bench_cp::CpBench>,
)> {
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
    let result = async {
        let exec = exec_bench(client, &name, a.exec_runs, a.stdout_mib << 20).await?;
        let cp = crate::commands::bench_cp::cp_bench(client, &vm, a.cp_mib << 20).await;
        anyhow::Ok((exec, cp))
    }
    .await;
    client.delete_vm(&name).await?;
    result
}

/// Times `runs` runs of `true` and the throughput of `stdout_bytes` of
/// stdout on the running VM `name`.
async fn exec_bench(
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

fn host_summary() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

/// The backend the daemon chooses from the same config and host facts:
/// the bare boot starts that VMM directly.
fn bare_backend() -> anyhow::Result<banger_vmm::Selection> {
    let cfg = banger_config::Config::load(&banger_config::Paths::from_env()?)?;
    let facts =
        banger_vmm::HostFacts::probe(cfg.firecracker_bin.as_deref(), cfg.qemu_bin.as_deref());
    Ok(banger_vmm::select_backend(cfg.vmm, &facts)?)
}

/// Boots the image's kernel and root file system with the VMM started
/// directly (QEMU with banger's arguments, or Firecracker with
/// `--no-api --config-file` holding banger's API bodies; no daemon, no API
/// handshake, no overlay or work disk: the image's init on its read-only
/// root) and times spawn → agent hello.
async fn bare_boot(
    client: &banger_api::Client,
    image: Option<&str>,
    vmm: &banger_vmm::Selection,
) -> anyhow::Result<f64> {
    use banger_vmm::{BackendKind, DiskFormat, DiskSpec, LaunchSpec};
    let image = match image {
        Some(i) => i.to_string(),
        None => banger_config::Config::load(&crate::connect::daemon_paths()?)?.default_image_name,
    };
    let img = client.get_image(&image).await?;
    let kernel = client
        .list_kernels()
        .await?
        .into_iter()
        .find(|k| k.name == img.kernel)
        .ok_or_else(|| anyhow::anyhow!("kernel {} of image {} not found", img.kernel, img.name))?;
    let tmp = tempfile::Builder::new().prefix("banger-bench-").tempdir()?;
    let kernel_file = match vmm.kind {
        BackendKind::Firecracker => kernel.vmlinux.clone().ok_or_else(|| {
            anyhow::anyhow!("kernel {} has no vmlinux for Firecracker", kernel.name)
        })?,
        BackendKind::Qemu(_) => kernel.kernel.clone(),
    };
    let spec = LaunchSpec {
        name: "bench-bare".into(),
        dir: tmp.path().to_path_buf(),
        kernel: kernel_file,
        initrd: kernel.initrd.clone(),
        extra_cmdline: format!("root={} ro", banger_agent_proto::boot::BASE_DEVICE),
        disks: vec![DiskSpec {
            path: img.rootfs.clone(),
            format: DiskFormat::Raw,
            read_only: true,
        }],
        nets: Vec::new(),
        vcpu: BENCH_VCPU,
        memory_mib: BENCH_MEMORY_MIB,
    };
    match vmm.kind {
        BackendKind::Qemu(_) => bare_qemu(&spec).await,
        BackendKind::Firecracker => bare_firecracker(&spec, &vmm.binary).await,
    }
}

/// The guest agent's hello on `stream`, within the boot timeout.
async fn hello(stream: tokio::net::UnixStream) -> anyhow::Result<()> {
    let agent = banger_agent_proto::client::AgentClient::spawn(stream);
    tokio::time::timeout(std::time::Duration::from_secs(240), agent.wait_hello())
        .await
        .context("guest agent did not come up")??;
    Ok(())
}

async fn bare_qemu(spec: &banger_vmm::LaunchSpec) -> anyhow::Result<f64> {
    let qemu = banger_vmm::QemuVmm::from_host(None)?;
    let args = banger_vmm::qemu::qemu_args(spec, qemu.accel(), qemu.tsc_khz());
    let paths = banger_vmm::VmPaths::new(&spec.dir);
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(qemu.binary())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu")?;
    // QEMU creates the agent socket during start-up; it offers no other signal.
    let stream = loop {
        match tokio::net::UnixStream::connect(paths.agent_socket()).await {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < std::time::Duration::from_secs(30) => {
                if let Some(st) = child.try_wait()? {
                    anyhow::bail!("qemu exited early: {st}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connecting to the agent socket"),
        }
    };
    hello(stream).await?;
    let elapsed = t0.elapsed();
    let _ = child.kill().await;
    Ok(ms(elapsed))
}

async fn bare_firecracker(
    spec: &banger_vmm::LaunchSpec,
    binary: &std::path::Path,
) -> anyhow::Result<f64> {
    let config = banger_vmm::firecracker::vm_config(spec)?;
    // Firecracker opens its log and metrics files; it does not create them.
    for f in [&config.logger.log_path, &config.metrics.metrics_path] {
        std::fs::File::create(f).with_context(|| format!("creating {}", f.display()))?;
    }
    let config_file = spec.dir.join("config.json");
    std::fs::write(&config_file, config.config_file().to_string())
        .with_context(|| format!("writing {}", config_file.display()))?;
    // The guest agent connects out through the hybrid vsock to this socket.
    let listener =
        tokio::net::UnixListener::bind(banger_vmm::firecracker::agent_listener_path(&spec.dir))
            .context("listening for the guest agent")?;
    let t0 = Instant::now();
    // Files in the VM directory are given relative to it (as for every
    // banger launch), so Firecracker must run there.
    let mut child = tokio::process::Command::new(binary)
        .current_dir(&spec.dir)
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_file)
        .args(["--id", "bench-bare"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stream = tokio::select! {
        accepted = tokio::time::timeout(std::time::Duration::from_secs(240), listener.accept()) => {
            accepted.context("guest agent did not connect")??.0
        }
        status = child.wait() => anyhow::bail!(
            "firecracker exited early ({}); its log: {}",
            status?,
            config.logger.log_path.display()
        ),
    };
    hello(stream).await?;
    let elapsed = t0.elapsed();
    let _ = child.kill().await;
    Ok(ms(elapsed))
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
