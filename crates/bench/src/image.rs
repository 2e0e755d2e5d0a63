//! `banger bench image`: OCI import and catalog install timed against
//! skopeo + umoci + mkfs.ext4 and curl | zstd -d | tar x (JSON).

use banger_api::bench::{ImageBenchEvent, ImageBenchRequest};
use banger_client::connect;
use clap::Args;

#[derive(Args)]
pub struct ImageBenchArgs {
    /// OCI reference of the image (registry/repo:tag); the daemon pulls it
    /// from its registry (plain HTTP is used for loopback registries).
    #[arg(long)]
    reference: String,
}

pub async fn run(a: ImageBenchArgs) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    let req = ImageBenchRequest {
        reference: a.reference,
    };
    let report = super::util::interruptible(client.bench_image(&req, |ev| match ev {
        ImageBenchEvent::Progress(p) => eprintln!("bench: {}: {}", p.phase, p.message),
        ImageBenchEvent::Warning(w) => eprintln!("bench: warning: {}", w.message),
        _ => {}
    }))
    .await?;
    super::util::print_json(&report)?;
    Ok(0)
}
