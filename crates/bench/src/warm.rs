//! The warm-start part of `banger bench`: a template, restores against
//! cold boots, and what a warm VM costs the host.

use super::{
    BENCH_MEMORY_MIB, BENCH_VCPU, LifecycleSample, RunSample, TemplateBytes, WarmBench, median,
    median_sample,
};
use anyhow::Context;
use banger_api::CreateVmRequest;
use banger_model::WarmMode;
/// Makes the template of the bench shape (an existing current one is
/// kept, with the build time it was made in). Also says whether the image
/// had no template before, so the bench removes what it made.
pub(super) async fn make_template(
    client: &banger_api::Client,
    image: Option<&str>,
) -> anyhow::Result<(banger_model::TemplateRecord, bool)> {
    let image = match image {
        Some(i) => i.to_string(),
        None => {
            banger_config::Config::load(&banger_client::connect::daemon_paths()?)?
                .default_image_name
        }
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
pub(super) async fn warm_block(
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
pub(super) fn smaps_rollup(pid: u32) -> (u64, u64) {
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
