//! Images and kernels: lookup, and the local Debian build.

use crate::image_ops::{Report, catalog_unavailable};
use crate::vms::now_rfc3339;
use crate::{Daemon, DaemonError};
use anyhow::Context;
use banger_api::BuildImageRequest;
use banger_api::templates::WarmImageRequest;
use banger_image::{DebianBuild, GuestPayload, Progress as BuildProgress};
use banger_model::{ImageRecord, KernelRecord};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The Debian suite of the default image.
const DEFAULT_SUITE: &str = "bookworm";

impl Daemon {
    /// The image named `name`; when it is missing and it is the default image,
    /// builds it locally first.
    pub(crate) async fn ensure_image(
        self: &Arc<Self>,
        name: &str,
        progress: &(dyn Fn(&str, &str) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        match self.store.get_image(name) {
            Ok(img) => return Ok(img),
            Err(banger_store::StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if name != self.config.default_image_name {
            return Err(DaemonError::NotFound(format!(
                "no image named {name}: see `banger image list`, or build it with `banger image build --name {name}`"
            )));
        }
        progress(
            "image",
            &format!("default image {name} not found; pulling it from the catalog"),
        );
        // The catalog pull reports through `progress` too, whose lifetime is
        // this call's: hand it over through a channel-free shared closure.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let report = Report::lines(Arc::new(move |p: &str, m: &str| {
            let _ = tx.send((p.to_string(), m.to_string()));
        }));
        let pull = self.pull_catalog_image(name, &report, cancel);
        tokio::pin!(pull);
        let pulled = loop {
            tokio::select! {
                Some((p, m)) = rx.recv() => progress(&p, &m),
                r = &mut pull => break r,
            }
        };
        while let Ok((p, m)) = rx.try_recv() {
            progress(&p, &m);
        }
        match pulled {
            Ok(img) => return Ok(img),
            Err(e) if catalog_unavailable(&e) => progress(
                "image",
                &format!(
                    "the catalog does not provide {name} ({e}); building it from Debian packages instead (takes about a minute)"
                ),
            ),
            Err(e) => {
                return Err(DaemonError::Failed(
                    anyhow::Error::new(e).context(format!("pulling default image {name}")),
                ));
            }
        }
        self.build_debian_image(name, DEFAULT_SUITE, Vec::new(), progress, cancel.clone())
            .await
    }

    /// A template build of `image`, checked before its stream starts: the
    /// shape's resources, the name, and the image (the default image may
    /// still be missing: the build makes it).
    pub(crate) fn check_warm_image(
        &self,
        image: &str,
        req: &WarmImageRequest,
    ) -> Result<(), DaemonError> {
        crate::settings::check_resources(req.vcpu, req.memory_mib, None)?;
        crate::image_ops::check_name("image", image)?;
        if image == self.config.default_image_name {
            return Ok(());
        }
        self.store.get_image(image).map(|_| ()).map_err(|_| {
            DaemonError::NotFound(format!("no image named {image}: see `banger image list`"))
        })
    }

    /// The names of a build request, checked before its stream starts.
    pub(crate) fn check_build_image(&self, req: &BuildImageRequest) -> Result<(), DaemonError> {
        let names = [Some(&req.name), req.from_image.as_ref()];
        names
            .into_iter()
            .flatten()
            .try_for_each(|n| crate::image_ops::check_name("image", n))
    }

    /// `POST /v1/images/build`: a local Debian build, or with `from_image`
    /// an image derived from a registered one in a transient VM.
    pub(crate) async fn build_image(
        self: &Arc<Self>,
        req: BuildImageRequest,
        progress: &(dyn Fn(&str, &str) + Send + Sync),
        cancel: CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        match req.from_image.as_deref() {
            Some(_) if req.suite.is_some() => Err(DaemonError::Invalid(
                "--suite is for local Debian builds; a derived image keeps its base image's suite"
                    .into(),
            )),
            Some(base) => {
                let derive = crate::derive::DeriveRequest {
                    name: &req.name,
                    base,
                    docker: req.docker,
                    packages: &req.packages,
                };
                self.derive_image(derive, progress, cancel).await
            }
            None => {
                let suite = req.suite.as_deref().unwrap_or(DEFAULT_SUITE);
                let mut packages = req.packages.clone();
                if req.docker {
                    packages.push(banger_image::derive::DOCKER_PACKAGE.into());
                }
                self.build_debian_image(&req.name, suite, packages, progress, cancel)
                    .await
            }
        }
    }

    /// Builds (or finds, if already built) a Debian image with
    /// `extra_packages` on top of the base set and registers it.
    pub async fn build_debian_image(
        self: &Arc<Self>,
        name: &str,
        suite: &str,
        extra_packages: Vec<String>,
        progress: &(dyn Fn(&str, &str) + Send + Sync),
        cancel: CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        banger_model::VmName::parse(name).map_err(|_| {
            DaemonError::Invalid(format!(
                "image name {name:?} must be a DNS label (a-z, 0-9, -)"
            ))
        })?;
        let _guard = self.image_lock.lock().await;
        if let Ok(img) = self.store.get_image(name) {
            return Ok(img);
        }
        let spec = DebianBuild {
            name: name.to_string(),
            suite: suite.to_string(),
            mirror: self.config.debian_mirror.clone(),
            extra_packages,
            payload: GuestPayload::new(self.agent_binary()?),
            images_dir: self.paths.images_dir.clone(),
            kernels_dir: self.paths.kernels_dir.clone(),
        };
        let root = nix::unistd::geteuid().is_root();
        let helper = if root {
            None
        } else {
            crate::network::system_helper().await
        };
        let built = match build_via(root, helper) {
            BuildVia::InProcess => {
                // The tools' whole output, for when a build fails.
                let log_path = self.paths.state_dir.join(format!("image-build-{name}.log"));
                let log = std::sync::Mutex::new(
                    std::fs::File::create(&log_path)
                        .with_context(|| format!("creating {}", log_path.display()))?,
                );
                banger_image::build_debian(
                    &spec,
                    |p| match p {
                        BuildProgress::Phase { name, message } => progress(name, &message),
                        BuildProgress::Line(line) => {
                            use std::io::Write;
                            if let Ok(mut f) = log.lock() {
                                let _ = writeln!(f, "{line}");
                            }
                        }
                    },
                    cancel,
                )
                .await
                .with_context(|| {
                    format!(
                        "building image {name} (the build's output: {})",
                        log_path.display()
                    )
                })?
            }
            BuildVia::Helper(helper) => {
                progress(
                    "image",
                    &format!(
                        "building {name} through the root helper (progress: journalctl -u bangerd-root)"
                    ),
                );
                tokio::select! {
                    r = helper.build_debian_image(name, suite) => {
                        r.with_context(|| format!("building image {name}"))?
                    }
                    _ = cancel.cancelled() => {
                        return Err(DaemonError::Failed(anyhow::anyhow!(
                            "building image {name}: cancelled (the root helper finishes the build in the background)"
                        )));
                    }
                }
            }
        };
        let kernel = KernelRecord {
            name: built.kernel_name.clone(),
            kernel: built.kernel.clone(),
            initrd: Some(built.initrd.clone()),
            vmlinux: built.vmlinux.clone(),
            release: Some(built.kernel_release.clone()),
            dir: Some(self.paths.kernels_dir.join(&built.kernel_name)),
            // Another image of the same kernel may have made it already.
            banger_initramfs: self
                .store
                .get_kernel(&built.kernel_name)
                .ok()
                .and_then(|k| k.banger_initramfs),
            created_at: now_rfc3339(),
        };
        self.store.upsert_kernel(&kernel)?;
        let image = ImageRecord {
            name: name.to_string(),
            rootfs: built.rootfs.clone(),
            work_seed: Some(built.work_seed.clone()),
            kernel: kernel.name.clone(),
            managed: true,
            size_bytes: built.size_bytes,
            created_at: now_rfc3339(),
        };
        self.store.upsert_image(&image)?;
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, &|m| progress("warning", m))
            .await;
        tracing::info!(image = name, kernel = %kernel.name, "image registered");
        Ok(image)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>, DaemonError> {
        Ok(self.store.list_images()?)
    }

    pub fn get_image(&self, name: &str) -> Result<ImageRecord, DaemonError> {
        Ok(self.store.get_image(name)?)
    }

    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, DaemonError> {
        Ok(self.store.list_kernels()?)
    }
}

/// Who builds a Debian image.
#[derive(Debug)]
enum BuildVia {
    /// This process: it is root, or there is nobody else to ask (the build
    /// then fails with its "needs root" error).
    InProcess,
    /// The root helper of the system install this daemon runs in.
    Helper(banger_root_client::HelperClient),
}

fn build_via(root: bool, helper: Option<banger_root_client::HelperClient>) -> BuildVia {
    match helper {
        Some(h) if !root => BuildVia::Helper(h),
        _ => BuildVia::InProcess,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unprivileged_daemon_builds_through_its_helper() {
        let h = || {
            Some(banger_root_client::HelperClient::new(
                "/run/banger-root/helper.sock",
            ))
        };
        assert!(matches!(build_via(false, h()), BuildVia::Helper(_)));
        assert!(matches!(build_via(true, h()), BuildVia::InProcess));
        assert!(matches!(build_via(true, None), BuildVia::InProcess));
        assert!(matches!(build_via(false, None), BuildVia::InProcess));
    }
}
