//! `banger kernel ...`

use crate::commands::image::{BundleArgs, print_bundle};
use crate::commands::transfer::{Display, interruptible};
use crate::connect;
use crate::output;
use banger_api::images::{BundleEvent, PullKernelEvent, PullKernelRequest};
use banger_model::KernelRecord;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum KernelCommand {
    /// List kernels.
    List(crate::output::ListArgs),
    /// Show one kernel.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Pull a kernel from the catalog (e.g. generic-6.12).
    Pull {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete kernels no image uses (a pulled or built one with its files).
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        /// Print a JSON array of the deleted kernels' records.
        #[arg(long)]
        json: bool,
    },
    /// Write a catalog bundle of a kernel (and its index entry).
    Bundle {
        name: String,
        #[command(flatten)]
        bundle: BundleArgs,
    },
}

fn opt(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".into())
}

fn show(k: KernelRecord) {
    output::table(&[
        vec!["name".into(), k.name],
        vec!["release".into(), k.release.unwrap_or_else(|| "-".into())],
        vec!["kernel".into(), k.kernel.display().to_string()],
        vec!["initrd".into(), opt(&k.initrd)],
        vec!["vmlinux".into(), opt(&k.vmlinux)],
        vec!["created".into(), k.created_at],
    ]);
}

pub async fn run(cmd: KernelCommand) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    match cmd {
        KernelCommand::List(list) => {
            let kernels = client.list_kernels().await?;
            list.print(
                &kernels,
                |k| k.name.clone(),
                |kernels| {
                    let mut rows = vec![
                        ["NAME", "RELEASE", "KERNEL", "CREATED"]
                            .map(String::from)
                            .to_vec(),
                    ];
                    for k in kernels {
                        rows.push(vec![
                            k.name.clone(),
                            k.release.clone().unwrap_or_default(),
                            k.kernel.display().to_string(),
                            k.created_at.clone(),
                        ]);
                    }
                    output::table(&rows);
                },
            )?;
            Ok(0)
        }
        KernelCommand::Show { name, json } => {
            let k = client.get_kernel(&name).await?;
            if json {
                output::json(&k)?;
            } else {
                show(k);
            }
            Ok(0)
        }
        KernelCommand::Pull { name, json } => {
            let display = Display::new(&format!("pulling kernel {name}"));
            let req = PullKernelRequest { name };
            let k = interruptible(client.pull_kernel(&req, |ev| match ev {
                PullKernelEvent::Progress(p) => display.line(p),
                PullKernelEvent::Transfer(t) => display.transfer(t),
                PullKernelEvent::Warning(w) => display.warning(w),
                PullKernelEvent::Done(_) | PullKernelEvent::Error(_) => display.finish(),
            }))
            .await;
            display.finish();
            let k = k?;
            if json {
                output::json(&k)?;
            } else {
                println!("kernel {} ready ({})", k.name, k.kernel.display());
            }
            Ok(0)
        }
        KernelCommand::Delete { names, json } => {
            let mut failed = false;
            let mut deleted = Vec::new();
            for name in names {
                match client.delete_kernel(&name).await {
                    Ok(k) if json => deleted.push(k),
                    Ok(_) => println!("kernel {name} deleted"),
                    Err(e) => {
                        eprintln!("banger: {e}");
                        failed = true;
                    }
                }
            }
            if json {
                output::json(&deleted)?;
            }
            Ok(i32::from(failed))
        }
        KernelCommand::Bundle { name, bundle } => {
            let req = bundle.request()?;
            let display = Display::new(&format!("bundling kernel {name}"));
            let b = interruptible(client.bundle_kernel(&name, &req, |ev| match ev {
                BundleEvent::Progress(p) => display.line(p),
                BundleEvent::Warning(w) => display.warning(w),
                _ => {}
            }))
            .await;
            display.finish();
            print_bundle(&b?, bundle.json)?;
            Ok(0)
        }
    }
}
