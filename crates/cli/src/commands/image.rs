//! `banger image ...` and `banger kernel ...`

use crate::connect;
use crate::output;
use banger_api::{BuildImageEvent, BuildImageRequest};
use banger_model::ByteSize;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a Debian image locally from Debian packages (mmdebstrap).
    Build {
        /// Image name.
        #[arg(long, default_value = "debian-bookworm")]
        name: String,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
    },
    /// List images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one image.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KernelCommand {
    /// List kernels.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    match cmd {
        ImageCommand::Build { name, suite } => {
            let req = BuildImageRequest {
                name,
                suite: Some(suite),
            };
            let img = client
                .build_image(&req, |ev| {
                    if let BuildImageEvent::Progress(p) = ev {
                        eprintln!(
                            "[{:>5.1}s] {}: {}",
                            p.elapsed_ms as f64 / 1000.0,
                            p.phase,
                            p.message
                        );
                    }
                })
                .await?;
            println!(
                "image {} ready ({}, kernel {})",
                img.name,
                img.rootfs.display(),
                img.kernel
            );
            Ok(0)
        }
        ImageCommand::List { json } => {
            let images = client.list_images().await?;
            if json {
                output::json(&images)?;
                return Ok(0);
            }
            let mut rows = vec![
                ["NAME", "KERNEL", "SIZE", "MANAGED", "CREATED"]
                    .map(String::from)
                    .to_vec(),
            ];
            for i in images {
                rows.push(vec![
                    i.name,
                    i.kernel,
                    ByteSize(i.size_bytes).to_string(),
                    i.managed.to_string(),
                    i.created_at,
                ]);
            }
            output::table(&rows);
            Ok(0)
        }
        ImageCommand::Show { name, json } => {
            let i = client.get_image(&name).await?;
            if json {
                output::json(&i)?;
            } else {
                output::table(&[
                    vec!["name".into(), i.name],
                    vec!["rootfs".into(), i.rootfs.display().to_string()],
                    vec!["kernel".into(), i.kernel],
                    vec!["size".into(), ByteSize(i.size_bytes).to_string()],
                    vec!["managed".into(), i.managed.to_string()],
                    vec!["created".into(), i.created_at],
                ]);
            }
            Ok(0)
        }
    }
}

pub async fn run_kernel(cmd: KernelCommand) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    match cmd {
        KernelCommand::List { json } => {
            let kernels = client.list_kernels().await?;
            if json {
                output::json(&kernels)?;
                return Ok(0);
            }
            let mut rows = vec![
                ["NAME", "RELEASE", "KERNEL", "CREATED"]
                    .map(String::from)
                    .to_vec(),
            ];
            for k in kernels {
                rows.push(vec![
                    k.name,
                    k.release.unwrap_or_default(),
                    k.kernel.display().to_string(),
                    k.created_at,
                ]);
            }
            output::table(&rows);
            Ok(0)
        }
    }
}
