//! `banger image ...` and `banger kernel ...`

use crate::commands::transfer::{Display, absolute, interruptible};
use crate::connect;
use crate::output;
use anyhow::Context;
use banger_api::images::{BundleRequest, PullImageEvent, PullImageRequest, RegisterImageRequest};
use banger_api::templates::{WarmImageEvent, WarmImageRequest};
use banger_api::{BuildImageEvent, BuildImageRequest};
use banger_model::{ByteSize, ImageRecord, TemplateRecord};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image: locally from Debian packages (mmdebstrap), or with
    /// --from-image derived from a registered image in a transient VM
    /// (tmux, mise, root's shell and tmux defaults; --docker adds Docker).
    Build {
        /// Image name.
        #[arg(long, default_value = "debian-bookworm")]
        name: String,
        /// Debian suite (local Debian builds; default bookworm).
        #[arg(long, conflicts_with = "from_image")]
        suite: Option<String>,
        /// Derive the image from this registered image: boot it in a
        /// transient VM, provision it over the agent, save the result.
        #[arg(long, value_name = "BASE")]
        from_image: Option<String>,
        /// Install Docker (Debian's docker.io; containerd and docker enabled).
        #[arg(long)]
        docker: bool,
        /// Another Debian package to install (repeatable).
        #[arg(long = "package", value_name = "PACKAGE")]
        packages: Vec<String>,
        /// Print the image's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List images.
    List(crate::output::ListArgs),
    /// Show one image.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Pull an image: a catalog name (debian-bookworm) or an OCI reference
    /// (registry/repo:tag, registry/repo@sha256:...) from any registry.
    Pull {
        reference: String,
        /// Kernel an OCI image boots with (default: the default image's kernel).
        #[arg(long)]
        kernel_ref: Option<String>,
        /// Image name (OCI only; default: repository and tag).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Register local files as an image (unmanaged: banger never deletes
    /// them). Registering an existing name updates it in place.
    Register {
        #[arg(long)]
        name: String,
        /// ext4 root file system.
        #[arg(long)]
        rootfs: PathBuf,
        /// ext4 seed of new VMs' /root disks.
        #[arg(long)]
        work_seed: Option<PathBuf>,
        /// A registered kernel (see `banger kernel list`).
        #[arg(long, conflicts_with = "kernel")]
        kernel_ref: Option<String>,
        /// A kernel image (bzImage); it becomes a kernel named after the image.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Its initrd.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Delete images (a pulled or built one with its files; a registered one
    /// only its record).
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        /// Also stop and delete the VMs that use the image (their disks are
        /// overlays of it and cannot outlive it).
        #[arg(long)]
        force: bool,
        /// Print a JSON array of the deleted images' records.
        #[arg(long)]
        json: bool,
    },
    /// Make the warm-start template of an image: boot it once, seal and
    /// save the paused guest, so `vm run`/`vm create` of that image and
    /// shape restore it instead of booting. Shape: --vcpu/--memory, else
    /// the effective vm_defaults (what a plain `vm run` gets).
    Warm {
        name: String,
        #[arg(long, visible_alias = "cpus", conflicts_with = "drop")]
        vcpu: Option<u32>,
        /// Memory: 2G, 512M, or a plain number of MiB.
        #[arg(long, value_parser = super::vm::flags::parse_memory_mib, value_name = "SIZE", conflicts_with = "drop")]
        memory: Option<u64>,
        /// Delete the image's templates instead.
        #[arg(long)]
        drop: bool,
        /// Print the template's record (with --drop: the removed ones) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a catalog bundle of an image (and its index entry).
    Bundle {
        name: String,
        #[command(flatten)]
        bundle: BundleArgs,
    },
}

/// Where a bundle goes.
#[derive(Args)]
pub struct BundleArgs {
    /// Directory the bundle file is written to.
    #[arg(long)]
    pub out: PathBuf,
    /// URL of that directory once published (http, https or file).
    #[arg(long)]
    pub base_url: String,
    /// Index file to add the entry to (created if missing).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// One line for the catalog listing.
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl BundleArgs {
    pub fn request(&self) -> anyhow::Result<BundleRequest> {
        std::fs::create_dir_all(&self.out)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", self.out.display()))?;
        Ok(BundleRequest {
            out_dir: absolute(&self.out)?,
            base_url: self.base_url.clone(),
            index: self.index.as_deref().map(absolute).transpose()?,
            description: self.description.clone(),
        })
    }
}

/// Prints a written bundle.
pub fn print_bundle(b: &banger_api::images::BundleResult, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(b);
    }
    println!(
        "{} {} bundled: {} ({} bytes, sha256 {})",
        b.kind, b.name, b.path, b.size, b.sha256
    );
    println!("url: {}", b.url);
    match &b.index {
        Some(ix) => println!("index entry added to {ix}"),
        None => println!("index entry:\n{}", serde_json::to_string_pretty(&b.entry)?),
    }
    Ok(())
}

/// An image as `image show --json` and `image list --json` print it: the
/// daemon's record, with its warm-start templates beside the record's
/// fields (the API keeps them apart: templates come and go on their own).
#[derive(Debug, serde::Serialize)]
struct ImageView {
    #[serde(flatten)]
    image: ImageRecord,
    templates: Vec<TemplateRecord>,
}

impl ImageView {
    /// Without its templates (names only are printed).
    fn bare(image: ImageRecord) -> Self {
        Self {
            image,
            templates: Vec::new(),
        }
    }
}

/// Prints an image that is ready (pulled or built).
fn print_ready(img: &banger_model::ImageRecord, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(img);
    }
    println!(
        "image {} ready ({}, kernel {})",
        img.name,
        img.rootfs.display(),
        img.kernel
    );
    Ok(())
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    match cmd {
        ImageCommand::Build {
            name,
            suite,
            from_image,
            docker,
            packages,
            json,
        } => {
            let req = BuildImageRequest {
                name,
                suite,
                from_image,
                docker,
                packages,
            };
            let img = client
                .build_image(&req, |ev| match ev {
                    BuildImageEvent::Progress(p) => eprintln!("{}", output::progress_event(p)),
                    BuildImageEvent::Warning(w) => eprintln!("{}", output::warning_event(w)),
                    _ => {}
                })
                .await?;
            print_ready(&img, json)?;
            Ok(0)
        }
        ImageCommand::List(list) => {
            let images = client.list_images().await?;
            let mut views = Vec::with_capacity(images.len());
            for image in images {
                if list.quiet {
                    views.push(ImageView::bare(image));
                    continue;
                }
                match client.list_templates(&image.name).await {
                    Ok(templates) => views.push(ImageView { image, templates }),
                    // Deleted since the listing: not an image any more.
                    Err(e) if e.code() == Some("not_found") => {}
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("listing the templates of {}", image.name)));
                    }
                }
            }
            list.print(
                &views,
                |v| v.image.name.clone(),
                |views| {
                    let mut rows = vec![
                        ["NAME", "KERNEL", "SIZE", "MANAGED", "TEMPLATES", "CREATED"]
                            .map(String::from)
                            .to_vec(),
                    ];
                    for ImageView {
                        image: i,
                        templates,
                    } in views
                    {
                        rows.push(vec![
                            i.name.clone(),
                            i.kernel.clone(),
                            ByteSize(i.size_bytes).to_string(),
                            i.managed.to_string(),
                            templates.len().to_string(),
                            i.created_at.clone(),
                        ]);
                    }
                    output::table(&rows);
                },
            )?;
            Ok(0)
        }
        ImageCommand::Warm {
            name,
            vcpu,
            memory,
            drop,
            json,
        } => {
            if drop {
                let gone = client.drop_templates(&name).await?;
                if json {
                    output::json(&gone)?;
                } else {
                    println!("removed {} template(s) of {name}", gone.len());
                }
                return Ok(0);
            }
            let req = WarmImageRequest {
                vcpu,
                memory_mib: memory,
            };
            let display = Display::new(&format!("warming {name}"));
            let t = interruptible(client.warm_image(&name, &req, |ev| match ev {
                WarmImageEvent::Progress(p) => display.line(p),
                WarmImageEvent::Warning(w) => display.warning(w),
                _ => {}
            }))
            .await?;
            display.finish();
            if json {
                output::json(&t)?;
            } else {
                println!(
                    "template {} of {} ready: {}, {} on disk, built in {:.1}s",
                    t.id,
                    t.image,
                    t.shape,
                    ByteSize(t.size_bytes).human(),
                    t.build_ms.unwrap_or(0) as f64 / 1000.0
                );
            }
            Ok(0)
        }
        ImageCommand::Show { name, json } => {
            let i = client.get_image(&name).await?;
            let templates = client
                .list_templates(&name)
                .await
                .with_context(|| format!("listing the templates of {name}"))?;
            if json {
                output::json(&ImageView {
                    image: i,
                    templates,
                })?;
            } else {
                output::table(&[
                    vec!["name".into(), i.name],
                    vec!["rootfs".into(), i.rootfs.display().to_string()],
                    vec![
                        "work seed".into(),
                        i.work_seed
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "-".into()),
                    ],
                    vec!["kernel".into(), i.kernel],
                    vec!["size".into(), ByteSize(i.size_bytes).to_string()],
                    vec!["managed".into(), i.managed.to_string()],
                    vec!["created".into(), i.created_at],
                ]);
                if !templates.is_empty() {
                    println!();
                    let mut rows = vec![
                        [
                            "TEMPLATE", "SHAPE", "BACKEND", "SIZE", "BUILT", "USES", "STATE",
                        ]
                        .map(String::from)
                        .to_vec(),
                    ];
                    for t in &templates {
                        rows.push(vec![
                            t.id.clone(),
                            t.shape.to_string(),
                            t.backend.to_string(),
                            ByteSize(t.size_bytes).human(),
                            t.created_at.clone(),
                            t.uses.to_string(),
                            t.state.as_str().to_string(),
                        ]);
                    }
                    output::table(&rows);
                }
            }
            Ok(0)
        }
        ImageCommand::Pull {
            reference,
            kernel_ref,
            name,
            json,
        } => {
            let req = PullImageRequest {
                reference: reference.clone(),
                name,
                kernel_ref,
            };
            let display = Display::new(&format!("pulling {reference}"));
            let img = interruptible(client.pull_image(&req, |ev| match ev {
                PullImageEvent::Progress(p) => display.line(p),
                PullImageEvent::Transfer(t) => display.transfer(t),
                PullImageEvent::Warning(w) => display.warning(w),
                PullImageEvent::Done(_) | PullImageEvent::Error(_) => display.finish(),
            }))
            .await;
            display.finish();
            let img = img?;
            print_ready(&img, json)?;
            Ok(0)
        }
        ImageCommand::Register {
            name,
            rootfs,
            work_seed,
            kernel_ref,
            kernel,
            initrd,
            json,
        } => {
            let req = RegisterImageRequest {
                name,
                rootfs: absolute(&rootfs)?,
                work_seed: work_seed.as_deref().map(absolute).transpose()?,
                kernel_ref,
                kernel: kernel.as_deref().map(absolute).transpose()?,
                initrd: initrd.as_deref().map(absolute).transpose()?,
            };
            let img = client.register_image(&req).await?;
            if json {
                output::json(&img)?;
            } else {
                println!("image {} registered (kernel {})", img.name, img.kernel);
            }
            Ok(0)
        }
        ImageCommand::Delete { names, force, json } => {
            let mut failed = false;
            let mut deleted = Vec::new();
            for name in names {
                match client.delete_image(&name, force).await {
                    Ok(img) if json => deleted.push(img),
                    Ok(_) => println!("image {name} deleted"),
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
        ImageCommand::Bundle { name, bundle } => {
            let req = bundle.request()?;
            let display = Display::new(&format!("bundling {name}"));
            let b = interruptible(client.bundle_image(&name, &req, |ev| match ev {
                banger_api::images::BundleEvent::Progress(p) => display.line(p),
                banger_api::images::BundleEvent::Warning(w) => display.warning(w),
                _ => {}
            }))
            .await;
            display.finish();
            print_bundle(&b?, bundle.json)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::{TemplateShape, TemplateState, VmBackend};

    #[test]
    fn image_json_carries_its_templates_beside_the_record() {
        let image = ImageRecord {
            name: "debian-bookworm".into(),
            rootfs: "/s/images/debian-bookworm/rootfs.ext4".into(),
            work_seed: None,
            kernel: "debian-bookworm".into(),
            managed: true,
            size_bytes: 1 << 30,
            created_at: "2026-12-06T08:00:00Z".into(),
        };
        let t = TemplateRecord {
            id: "3f2a9c1e00112233".into(),
            image: image.name.clone(),
            backend: VmBackend::Qemu,
            shape: TemplateShape {
                vcpu: 1,
                memory_mib: 1024,
            },
            disk_bytes: 8 << 30,
            dir: "/s/templates/3f2a9c1e00112233".into(),
            state: TemplateState::Ready,
            size_bytes: 300 << 20,
            build_ms: Some(46_600),
            created_at: "2026-12-06T08:01:00Z".into(),
            last_used_at: None,
            uses: 2,
        };
        let v = serde_json::to_value(ImageView {
            image: image.clone(),
            templates: vec![t.clone()],
        })
        .expect("json");
        // Every field of the record, unchanged, at the top level.
        let record = serde_json::to_value(&image).expect("record");
        for (k, val) in record.as_object().expect("object") {
            assert_eq!(&v[k], val, "{k}");
        }
        assert_eq!(v["templates"], serde_json::json!([t]));
        assert_eq!(v["templates"][0]["shape"]["memory_mib"], 1024);
        assert_eq!(v["templates"][0]["uses"], 2);
        assert_eq!(v["templates"][0]["state"], "ready");
        // An image without templates says so with an empty list.
        let v = serde_json::to_value(ImageView::bare(image)).expect("json");
        assert_eq!(v["templates"], serde_json::json!([]));
    }
}
