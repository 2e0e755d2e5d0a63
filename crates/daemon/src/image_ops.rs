//! Images and kernels from elsewhere: catalog and OCI pulls, registration of
//! local files, deletion and catalog bundles.

use crate::vms::now_rfc3339;
use crate::{Daemon, DaemonError};
use anyhow::anyhow;
use banger_api::images::{
    BundleRequest, BundleResult, PullImageRequest, PullKernelRequest, RegisterImageRequest,
};
use banger_catalog::{CatalogError, IndexEntry};
use banger_model::{ImageRecord, KernelRecord};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Sizes of OCI root file systems are at least this (sparse): room for the
/// first-boot sshd install before the guest grows its file system.
const OCI_MIN_ROOTFS: u64 = 512 << 20;

/// Receives a phase and a line for people.
pub(crate) type ProgressFn = Arc<dyn Fn(&str, &str) + Send + Sync>;
/// Receives bytes of a transfer: phase, done, total (0 when unknown).
pub(crate) type TransferFn = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Where a long image operation reports to.
#[derive(Clone)]
pub(crate) struct Report {
    /// A phase and a line for people.
    pub progress: ProgressFn,
    /// Bytes of a transfer: phase, done, total (0 when unknown).
    pub transfer: TransferFn,
}

impl Report {
    /// Progress lines only: transfers become a line per tenth done.
    pub(crate) fn lines(progress: ProgressFn) -> Report {
        let last = Arc::new(std::sync::Mutex::new((String::new(), u64::MAX)));
        let p = progress.clone();
        Report {
            progress,
            transfer: Arc::new(move |phase: &str, done: u64, total: u64| {
                let Some(tenth) = done.saturating_mul(10).checked_div(total) else {
                    return;
                };
                let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
                if l.0 != phase || l.1 != tenth {
                    *l = (phase.to_string(), tenth);
                    p(phase, &format!("{}% of {} bytes", tenth * 10, total));
                }
            }),
        }
    }
}

/// Whether a pull reference is an OCI image reference rather than a catalog
/// name (catalog names never hold `/`, `:` or `@`).
pub(crate) fn is_oci_reference(reference: &str) -> bool {
    reference.contains(['/', ':', '@'])
}

/// The rule for image and kernel names: they become directory names and
/// catalog names.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), DaemonError> {
    let rule = match kind {
        "kernel" => &banger_api::rules::KERNEL_NAME,
        _ => &banger_api::rules::IMAGE_NAME,
    };
    rule.check(name)
        .map_err(|e| DaemonError::Invalid(e.to_string()))
}

/// A default image name for an OCI reference: last repository component and
/// tag (`ghcr.io/org/tool:1.2` -> `tool-1.2`).
pub(crate) fn name_from_reference(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let raw = match last.split_once(':') {
        Some((repo, tag)) if !tag.is_empty() && tag != "latest" => format!("{repo}-{tag}"),
        Some((repo, _)) => repo.to_string(),
        None => last.to_string(),
    };
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    name.truncate(63);
    if name.is_empty() {
        "oci-image".into()
    } else {
        name
    }
}

/// The catalog errors after which `vm run` builds the default image locally:
/// the catalog cannot be reached or does not have it.
pub(crate) fn catalog_unavailable(e: &CatalogError) -> bool {
    matches!(
        e,
        CatalogError::NotInCatalog { .. }
            | CatalogError::WrongArch { .. }
            | CatalogError::Http { .. }
            | CatalogError::BadIndex { .. }
            | CatalogError::Incomplete { .. }
    )
}

fn catalog_error(e: CatalogError) -> DaemonError {
    match e {
        CatalogError::NotInCatalog { .. } => DaemonError::NotFound(e.to_string()),
        CatalogError::Exists(_) | CatalogError::Busy(_) => DaemonError::Conflict(e.to_string()),
        CatalogError::Invalid(_) => DaemonError::Invalid(e.to_string()),
        other => DaemonError::Failed(other.into()),
    }
}

fn oci_error(e: banger_oci::OciError) -> DaemonError {
    use banger_oci::OciError as O;
    match e {
        O::BadReference { .. } | O::BadDigest(_) => DaemonError::Invalid(e.to_string()),
        O::Exists(_) => DaemonError::Conflict(e.to_string()),
        other => DaemonError::Failed(other.into()),
    }
}

fn in_use(e: banger_store::StoreError) -> DaemonError {
    match e {
        banger_store::StoreError::InUse { .. } => DaemonError::Conflict(e.to_string()),
        other => other.into(),
    }
}

/// `path` as an absolute, existing regular file (symlinks resolved). A
/// path that is not absolute is a bad request; a missing file is not
/// found, and one that is no regular file or cannot be read conflicts
/// with the host's state.
fn regular_file(what: &str, path: &str) -> Result<PathBuf, DaemonError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(DaemonError::Invalid(format!(
            "{what} {path:?} must be an absolute path"
        )));
    }
    match std::fs::metadata(p) {
        Ok(md) if md.is_file() => std::fs::canonicalize(p)
            .map_err(|e| DaemonError::Conflict(format!("{what} {path}: {e}"))),
        Ok(_) => Err(DaemonError::Conflict(format!(
            "{what} {path} is not a regular file"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DaemonError::NotFound(format!(
            "{what} {path} does not exist"
        ))),
        Err(e) => Err(DaemonError::Conflict(format!(
            "{what} {path} cannot be read: {e}"
        ))),
    }
}

fn absolute_dir(what: &str, path: &str) -> Result<PathBuf, DaemonError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(DaemonError::Invalid(format!(
            "{what} {path:?} must be an absolute path"
        )));
    }
    Ok(p.to_path_buf())
}

/// The release of a bzImage, from its setup header's version string
/// (`kernel_version` at 0x20E points to it, relative to 0x200).
pub(crate) fn bzimage_release(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut hdr = [0u8; 0x210];
    f.read_exact(&mut hdr).ok()?;
    if &hdr[0x202..0x206] != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([hdr[0x20E], hdr[0x20F]]);
    if ptr == 0 {
        return None;
    }
    f.seek(SeekFrom::Start(u64::from(ptr) + 0x200)).ok()?;
    let mut s = [0u8; 128];
    let n = f.read(&mut s).ok()?;
    let text = String::from_utf8_lossy(&s[..n]);
    let release = text.split([' ', '\0']).next()?.trim();
    (!release.is_empty()).then(|| release.to_string())
}

/// The directory `file` is directly in, when that directory is `store/<x>`:
/// the daemon's own artifact directory, safe to remove.
fn owned_dir(store: &Path, file: &Path) -> Option<PathBuf> {
    let dir = file.parent()?;
    (dir.parent()? == store).then(|| dir.to_path_buf())
}

/// A new, empty directory `kernels_dir/<name>.<random>` (mode 0700).
pub(crate) fn new_kernel_dir(kernels_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    loop {
        let dir = kernels_dir.join(format!("{name}.{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove artifact directory");
    }
}

impl Daemon {
    fn catalog_options(
        &self,
        report: &Report,
        cancel: &CancellationToken,
    ) -> banger_catalog::PullOptions {
        let transfer = report.transfer.clone();
        banger_catalog::PullOptions {
            progress: Arc::new(move |p| match p {
                banger_catalog::Progress::Download { done, total } => {
                    transfer("download", done, total)
                }
                banger_catalog::Progress::Extract { done, total } => {
                    transfer("extract", done, total)
                }
            }),
            cancel: cancel.clone(),
        }
    }

    fn catalog_cache(&self) -> PathBuf {
        self.paths.cache_dir.join("catalog")
    }

    /// Pulls image `name` from the catalog (and its kernel when it is not
    /// registered) and registers it. Errors are the catalog's, so callers can
    /// tell "unavailable" from other failures.
    pub(crate) async fn pull_catalog_image(
        self: &Arc<Self>,
        name: &str,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, CatalogError> {
        let index = banger_catalog::load_index(self.config.catalog_url.as_deref()).await?;
        let entry = index.image(name)?.clone();
        let _guard = self.image_lock.lock().await;
        if self.store.get_kernel(&entry.kernel).is_err() {
            let kentry = index.kernel(&entry.kernel)?.clone();
            (report.progress)(
                "kernel",
                &format!("pulling kernel {} from the catalog", kentry.name),
            );
            self.pull_kernel_entry(&kentry, report, cancel).await?;
        }
        (report.progress)(
            "download",
            &format!(
                "pulling image {name} from {} ({} bytes)",
                entry.url, entry.size
            ),
        );
        let opts = self.catalog_options(report, cancel);
        let pulled = match banger_catalog::pull_image(
            &entry,
            &self.catalog_cache(),
            &self.paths.images_dir,
            &opts,
        )
        .await
        {
            Ok(p) => p,
            // A pull that completed just before a crash: adopt it.
            Err(CatalogError::Exists(dir)) => {
                banger_catalog::PulledImage::open(&self.paths.images_dir, name)
                    .ok_or(CatalogError::Exists(dir))?
            }
            Err(e) => return Err(e),
        };
        let image = ImageRecord {
            name: name.to_string(),
            rootfs: pulled.rootfs,
            work_seed: pulled.work_seed,
            kernel: entry.kernel.clone(),
            managed: true,
            size_bytes: pulled.size_bytes,
            created_at: now_rfc3339(),
        };
        self.store
            .upsert_image(&image)
            .map_err(|e| CatalogError::Invalid(e.to_string()))?;
        // Snapshots of the old contents: never restorable on the new ones.
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, &|m| (report.progress)("warning", m))
            .await;
        tracing::info!(image = name, kernel = %entry.kernel, "image pulled from the catalog");
        (report.progress)("done", &format!("image {name} registered"));
        Ok(image)
    }

    async fn pull_kernel_entry(
        &self,
        entry: &banger_catalog::KernelEntry,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<KernelRecord, CatalogError> {
        let opts = self.catalog_options(report, cancel);
        let pulled = match banger_catalog::pull_kernel(
            entry,
            &self.catalog_cache(),
            &self.paths.kernels_dir,
            &opts,
        )
        .await
        {
            Ok(p) => p,
            Err(CatalogError::Exists(dir)) => {
                banger_catalog::PulledKernel::open(&self.paths.kernels_dir, &entry.name)
                    .ok_or(CatalogError::Exists(dir))?
            }
            Err(e) => return Err(e),
        };
        let k = KernelRecord {
            name: entry.name.clone(),
            kernel: pulled.kernel,
            initrd: pulled.initrd,
            vmlinux: pulled.vmlinux,
            release: Some(pulled.release),
            dir: Some(pulled.dir),
            banger_initramfs: None,
            created_at: now_rfc3339(),
        };
        self.store
            .upsert_kernel(&k)
            .map_err(|e| CatalogError::Invalid(e.to_string()))?;
        tracing::info!(kernel = %k.name, "kernel pulled from the catalog");
        Ok(k)
    }

    /// `POST /v1/kernels/pull`.
    pub(crate) async fn pull_kernel(
        self: &Arc<Self>,
        name: &str,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<KernelRecord, DaemonError> {
        check_name("kernel", name)?;
        if self.store.get_kernel(name).is_ok() {
            return Err(DaemonError::Conflict(format!(
                "kernel {name} is already registered: delete it first (banger kernel delete {name})"
            )));
        }
        let index = banger_catalog::load_index(self.config.catalog_url.as_deref())
            .await
            .map_err(catalog_error)?;
        let entry = index.kernel(name).map_err(catalog_error)?.clone();
        let _guard = self.image_lock.lock().await;
        (report.progress)(
            "download",
            &format!("pulling kernel {name} from {}", entry.url),
        );
        let k = self
            .pull_kernel_entry(&entry, report, cancel)
            .await
            .map_err(catalog_error)?;
        (report.progress)("done", &format!("kernel {name} registered"));
        Ok(k)
    }

    /// The checks of a pull request that need nothing but the request and
    /// the store, so a bad one is answered before the stream starts;
    /// [`Daemon::pull_image`] runs them again.
    pub(crate) fn check_pull(&self, req: &PullImageRequest) -> Result<(), DaemonError> {
        let rule = |r: &banger_api::rules::StringRule, v: &str| {
            r.check(v).map_err(|e| DaemonError::Invalid(e.to_string()))
        };
        rule(&banger_api::rules::REFERENCE, &req.reference)?;
        if let Some(k) = &req.kernel_ref {
            rule(&banger_api::rules::KERNEL_NAME, k)?;
        }
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            if req.kernel_ref.is_some() {
                return Err(DaemonError::Invalid(format!(
                    "--kernel-ref is for OCI images; catalog image {reference} boots the kernel its catalog entry names"
                )));
            }
            if req.name.as_deref().is_some_and(|n| n != reference) {
                return Err(DaemonError::Invalid(format!(
                    "--name is for OCI images; catalog image {reference} keeps its catalog name"
                )));
            }
            check_name("image", reference)?;
            return self.refuse_existing_image(reference);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        check_name("image", &name)?;
        banger_oci::parse_reference(reference).map_err(oci_error)?;
        self.refuse_existing_image(&name)
    }

    /// A kernel pull, checked before its stream starts: a valid name that
    /// no kernel has yet.
    pub(crate) fn check_pull_kernel(&self, req: &PullKernelRequest) -> Result<(), DaemonError> {
        check_name("kernel", &req.name)?;
        match self.store.get_kernel(&req.name) {
            Ok(_) => Err(DaemonError::Conflict(format!(
                "kernel {} is already registered: delete it first (banger kernel delete {})",
                req.name, req.name
            ))),
            Err(_) => Ok(()),
        }
    }

    /// A bundle of `image`, checked before its stream starts: the
    /// request's own rules, then the image.
    pub(crate) fn check_bundle_image(
        &self,
        image: &str,
        req: &BundleRequest,
    ) -> Result<(), DaemonError> {
        check_bundle(req)?;
        self.store.get_image(image).map(|_| ()).map_err(|_| {
            DaemonError::NotFound(format!("no image named {image}: see `banger image list`"))
        })
    }

    /// A bundle of `kernel`, checked before its stream starts: the
    /// request's own rules, then the kernel.
    pub(crate) fn check_bundle_kernel(
        &self,
        kernel: &str,
        req: &BundleRequest,
    ) -> Result<(), DaemonError> {
        check_bundle(req)?;
        self.store.get_kernel(kernel).map(|_| ()).map_err(|_| {
            DaemonError::NotFound(format!(
                "no kernel named {kernel}: see `banger kernel list`"
            ))
        })
    }

    /// `POST /v1/images/pull`: a catalog name or an OCI reference.
    pub(crate) async fn pull_image(
        self: &Arc<Self>,
        req: PullImageRequest,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<ImageRecord, DaemonError> {
        self.check_pull(&req)?;
        let reference = req.reference.as_str();
        if !is_oci_reference(reference) {
            return self
                .pull_catalog_image(reference, report, cancel)
                .await
                .map_err(catalog_error);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| name_from_reference(reference));
        let kernel = match &req.kernel_ref {
            Some(k) => self.store.get_kernel(k).map_err(|_| {
                DaemonError::NotFound(format!(
                    "no kernel named {k}: see `banger kernel list`, or pull one with `banger kernel pull {k}`"
                ))
            })?,
            None => {
                let default = self.config.default_image_name.clone();
                (report.progress)(
                    "kernel",
                    &format!("using the kernel of the default image {default} (choose another with --kernel-ref)"),
                );
                let progress = report.progress.clone();
                let img = self
                    .ensure_image(&default, &move |p, m| progress(p, m), cancel)
                    .await?;
                self.store.get_kernel(&img.kernel)?
            }
        };
        let _guard = self.image_lock.lock().await;
        self.refuse_existing_image(&name)?;
        let out_dir = self.paths.images_dir.join(&name);
        let progress = report.progress.clone();
        let transfer = report.transfer.clone();
        let opts = banger_oci::PullOptions {
            reference: reference.to_string(),
            cache_dir: self.paths.cache_dir.clone(),
            out_dir,
            payload: banger_image::GuestPayload::new(self.agent_binary()?),
            min_size: OCI_MIN_ROOTFS,
            auth: banger_oci::Credentials::DockerConfig,
            progress: Some(Arc::new(move |p| {
                use banger_oci::PullProgress as P;
                match p {
                    P::Resolved {
                        digest,
                        layers,
                        total_bytes,
                    } => progress(
                        "resolve",
                        &format!("{digest}: {layers} layers, {total_bytes} bytes"),
                    ),
                    P::Layer {
                        index,
                        done,
                        total,
                        cached,
                        ..
                    } => {
                        if !cached {
                            transfer(&format!("layer {}", index + 1), done, total)
                        }
                    }
                    P::Phase { name, message } => progress(name, &message),
                    P::Line(l) => tracing::debug!(target: "oci_pull", "{l}"),
                    P::Note(n) => progress("note", &n),
                }
            })),
            cancel: cancel.clone(),
        };
        let pulled = banger_oci::pull_to_ext4(opts).await.map_err(oci_error)?;
        let image = ImageRecord {
            name: name.clone(),
            rootfs: pulled.rootfs.clone(),
            work_seed: None,
            kernel: kernel.name.clone(),
            managed: true,
            size_bytes: pulled.size_bytes,
            created_at: now_rfc3339(),
        };
        if let Err(e) = self.store.upsert_image(&image) {
            remove_dir(&pulled.dir).await;
            return Err(e.into());
        }
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, &|m| (report.progress)("warning", m))
            .await;
        tracing::info!(image = %name, reference, digest = %pulled.digest, "OCI image pulled");
        (report.progress)(
            "done",
            &format!("image {name} registered ({})", pulled.digest),
        );
        Ok(image)
    }

    pub(crate) fn refuse_existing_image(&self, name: &str) -> Result<(), DaemonError> {
        if self.store.get_image(name).is_ok() {
            return Err(DaemonError::Conflict(format!(
                "image {name} already exists: delete it first (banger image delete {name}) or choose another name"
            )));
        }
        Ok(())
    }

    /// `POST /v1/images/register`.
    pub(crate) async fn register_image(
        &self,
        req: RegisterImageRequest,
    ) -> Result<ImageRecord, DaemonError> {
        let name = req.name.as_str();
        check_name("image", name)?;
        let rootfs = regular_file("rootfs", &req.rootfs)?;
        let work_seed = req
            .work_seed
            .as_deref()
            .map(|p| regular_file("work seed", p))
            .transpose()?;
        let _guard = self.image_lock.lock().await;
        let old = self.store.get_image(name).ok();
        if let Some(old) = &old
            && old.managed
        {
            return Err(DaemonError::Conflict(format!(
                "image {name} was pulled or built by banger: delete it first (banger image delete {name}) or register under another name"
            )));
        }
        let kernel = match (&req.kernel_ref, &req.kernel) {
            (Some(_), Some(_)) => {
                return Err(DaemonError::Invalid(
                    "give either --kernel-ref or --kernel, not both".into(),
                ));
            }
            (None, None) => {
                return Err(DaemonError::Invalid(
                    "give the image's kernel: --kernel-ref NAME (see banger kernel list) or --kernel PATH [--initrd PATH]".into(),
                ));
            }
            (Some(k), None) => {
                if req.initrd.is_some() {
                    return Err(DaemonError::Invalid(
                        "--initrd goes with --kernel PATH; a kernel ref has its own initrd".into(),
                    ));
                }
                self.store.get_kernel(k).map_err(|_| {
                    DaemonError::NotFound(format!(
                        "no kernel named {k}: see `banger kernel list`, or pull one with `banger kernel pull {k}`"
                    ))
                })?
            }
            (None, Some(kpath)) => {
                let kernel = regular_file("kernel", kpath)?;
                let initrd = req
                    .initrd
                    .as_deref()
                    .map(|p| regular_file("initrd", p))
                    .transpose()?;
                let existing = self.store.get_kernel(name).ok();
                if existing.as_ref().is_some_and(KernelRecord::is_managed) {
                    return Err(DaemonError::Conflict(format!(
                        "kernel {name} was pulled or built by banger: register the image under another name, or use --kernel-ref {name}"
                    )));
                }
                let (vmlinux, dir) = self.registered_vmlinux(name, &kernel).await?;
                let k = KernelRecord {
                    name: name.to_string(),
                    release: bzimage_release(&kernel),
                    kernel,
                    initrd,
                    vmlinux,
                    dir,
                    banger_initramfs: None,
                    created_at: now_rfc3339(),
                };
                if let Err(e) = self.store.upsert_kernel(&k) {
                    if let Some(d) = &k.dir {
                        remove_dir(d).await;
                    }
                    return Err(e.into());
                }
                // The vmlinux of the kernel this registration replaces.
                if let Some(old_dir) = existing.and_then(|e| e.dir)
                    && Some(&old_dir) != k.dir.as_ref()
                {
                    self.remove_kernel_dir(&old_dir).await;
                }
                k
            }
        };
        let size_bytes = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
        let image = ImageRecord {
            name: name.to_string(),
            rootfs,
            work_seed,
            kernel: kernel.name.clone(),
            managed: false,
            size_bytes,
            created_at: now_rfc3339(),
        };
        self.store.upsert_image(&image)?;
        self.remove_image_templates(&image.name);
        self.offer_kernel_modules(&image, &|_| {}).await;
        // A kernel registered with an earlier --kernel and no longer used goes too.
        if let Some(old) = old
            && old.kernel == name
            && image.kernel != name
        {
            let _ = self.store.delete_kernel(name);
        }
        tracing::info!(image = name, kernel = %image.kernel, "image registered");
        self.store.get_image(name).map_err(Into::into)
    }

    /// `DELETE /v1/images/{image}`. Managed images lose their directory,
    /// unmanaged ones only their record. VMs boot from overlays of the
    /// image, so they cannot outlive it: without `force` an image with VMs
    /// is refused, with `force` its VMs are deleted first.
    pub(crate) async fn delete_image(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<ImageRecord, DaemonError> {
        let img = self.store.get_image(name).map_err(|_| {
            DaemonError::NotFound(format!("no image named {name}: see `banger image list`"))
        })?;
        let users: Vec<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| v.image == name)
            .map(|v| v.name.to_string())
            .collect();
        if !users.is_empty() {
            if !force {
                return Err(DaemonError::Conflict(format!(
                    "image {name} is used by VM {}: delete them first (banger vm delete {}) or pass --force to delete them with the image",
                    users.join(", "),
                    users.join(" ")
                )));
            }
            for vm in &users {
                tracing::info!(image = name, vm = %vm, "deleting VM with its image (--force)");
                self.delete_vm(vm).await?;
            }
        }
        let _guard = self.image_lock.lock().await;
        {
            // A template build in progress would save a template of a
            // deleted image: wait for it, then remove them all.
            let _build = self.template_build.lock().await;
            self.remove_image_templates(name);
        }
        self.store.delete_image(name).map_err(in_use)?;
        if img.managed
            && let Some(dir) = owned_dir(&self.paths.images_dir, &img.rootfs)
        {
            remove_dir(&dir).await;
        }
        tracing::info!(image = name, managed = img.managed, "image deleted");
        Ok(img)
    }

    /// The vmlinux Firecracker boots for a kernel registered from `kernel`
    /// (a user's file), and the directory banger made for it: an ELF is
    /// used as it is; a bzImage's vmlinux is extracted into a new
    /// directory of the kernel store. A kernel that yields no vmlinux is
    /// refused, and nothing is left behind.
    async fn registered_vmlinux(
        &self,
        name: &str,
        kernel: &Path,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>), DaemonError> {
        // What the file holds, not the request's shape.
        let unusable = |why: String| {
            DaemonError::Conflict(format!(
                "kernel {} cannot be booted by Firecracker: {why}; give a bzImage compressed with gzip, xz, zstd, lz4 or lzma, or its uncompressed ELF vmlinux",
                kernel.display()
            ))
        };
        if banger_image::vmlinux::is_elf(kernel).map_err(|e| unusable(e.to_string()))? {
            return Ok((Some(kernel.to_path_buf()), None));
        }
        let dir = new_kernel_dir(&self.paths.kernels_dir, name).map_err(|e| {
            DaemonError::Failed(anyhow!(
                "creating a directory for kernel {name}'s vmlinux in {}: {e}",
                self.paths.kernels_dir.display()
            ))
        })?;
        let dest = dir.join(banger_image::vmlinux::VMLINUX_FILE);
        let (src, to) = (kernel.to_path_buf(), dest.clone());
        let extracted = tokio::task::spawn_blocking(move || {
            banger_image::vmlinux::extract_vmlinux_file(&src, &to)
        })
        .await;
        match extracted {
            Ok(Ok(compression)) => {
                tracing::info!(kernel = name, %compression, vmlinux = %dest.display(), "extracted vmlinux");
                Ok((Some(dest), Some(dir)))
            }
            Ok(Err(e)) => {
                remove_dir(&dir).await;
                Err(unusable(e.to_string()))
            }
            Err(e) => {
                remove_dir(&dir).await;
                Err(DaemonError::Failed(anyhow!(
                    "extracting the vmlinux of kernel {name}: {e}"
                )))
            }
        }
    }

    /// Removes a kernel directory banger recorded as its own, but only one
    /// directly in the kernel store (a record is never a licence to delete
    /// anything else).
    async fn remove_kernel_dir(&self, dir: &Path) {
        if dir.parent() == Some(self.paths.kernels_dir.as_path()) {
            remove_dir(dir).await;
        } else {
            tracing::warn!(dir = %dir.display(), "kernel directory outside the kernel store left alone");
        }
    }

    /// Records the directories of kernels pulled or built before kernel
    /// records carried them (`kernels/<name>/`, made by banger under the
    /// record's own name).
    pub(crate) fn record_legacy_kernel_dirs(&self) -> Result<(), DaemonError> {
        for mut k in self.store.list_kernels()? {
            let own = self.paths.kernels_dir.join(&k.name);
            if k.dir.is_none() && k.kernel.parent() == Some(own.as_path()) {
                k.dir = Some(own);
                self.store.upsert_kernel(&k)?;
            }
        }
        Ok(())
    }

    pub(crate) fn get_kernel(&self, name: &str) -> Result<KernelRecord, DaemonError> {
        self.store.get_kernel(name).map_err(|_| {
            DaemonError::NotFound(format!("no kernel named {name}: see `banger kernel list`"))
        })
    }

    /// `DELETE /v1/kernels/{kernel}`: refused while images use it; a kernel
    /// in the daemon's kernel store loses its directory.
    pub(crate) async fn delete_kernel(&self, name: &str) -> Result<KernelRecord, DaemonError> {
        let k = self.get_kernel(name)?;
        let _guard = self.image_lock.lock().await;
        self.store.delete_kernel(name).map_err(|e| match e {
            banger_store::StoreError::InUse { ref users, .. } => DaemonError::Conflict(format!(
                "{e}: delete {} first (banger image delete NAME), or register them with another kernel",
                if users.len() == 1 { "that image" } else { "those images" }
            )),
            other => other.into(),
        })?;
        if let Some(dir) = &k.dir {
            self.remove_kernel_dir(dir).await;
        }
        tracing::info!(kernel = name, "kernel deleted");
        Ok(k)
    }

    /// `POST /v1/images/{image}/bundle`.
    pub(crate) async fn bundle_image(
        &self,
        name: &str,
        req: BundleRequest,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<BundleResult, DaemonError> {
        let img = self.store.get_image(name).map_err(|_| {
            DaemonError::NotFound(format!("no image named {name}: see `banger image list`"))
        })?;
        let out_dir = absolute_dir("output directory", &req.out_dir)?;
        let index = req
            .index
            .as_deref()
            .map(|p| absolute_dir("index file", p))
            .transpose()?;
        (report.progress)(
            "bundle",
            &format!(
                "compressing {} into {}",
                img.rootfs.display(),
                out_dir.display()
            ),
        );
        let breq = banger_catalog::ImageBundleRequest {
            name: img.name.clone(),
            description: req.description.clone().unwrap_or_default(),
            kernel: img.kernel.clone(),
            rootfs: img.rootfs.clone(),
            work_seed: img.work_seed.clone(),
            out_dir,
            base_url: req.base_url.clone(),
        };
        let b = banger_catalog::bundle_image(&breq, cancel)
            .await
            .map_err(catalog_error)?;
        let (url, sha256, size) = (b.entry.url.clone(), b.entry.sha256.clone(), b.entry.size);
        let entry = serde_json::to_value(&b.entry).map_err(|e| DaemonError::Failed(e.into()))?;
        let hint = format!(
            "; add its kernel to that index first: banger kernel bundle {} --out DIR --base-url URL --index FILE",
            img.kernel
        );
        finish_bundle(
            "image",
            name,
            b.path,
            IndexEntry::Image(b.entry),
            entry,
            url,
            sha256,
            size,
            index,
            &hint,
        )
        .await
    }

    /// `POST /v1/kernels/{kernel}/bundle`.
    pub(crate) async fn bundle_kernel(
        &self,
        name: &str,
        req: BundleRequest,
        report: &Report,
        cancel: &CancellationToken,
    ) -> Result<BundleResult, DaemonError> {
        let k = self.get_kernel(name)?;
        let out_dir = absolute_dir("output directory", &req.out_dir)?;
        let index = req
            .index
            .as_deref()
            .map(|p| absolute_dir("index file", p))
            .transpose()?;
        let release = k.release.clone().or_else(|| bzimage_release(&k.kernel)).ok_or_else(|| {
            DaemonError::Invalid(format!(
                "kernel {name}: its release is unknown and {} has no version string; it cannot be published",
                k.kernel.display()
            ))
        })?;
        let beside = |file: &str| {
            k.kernel
                .parent()
                .map(|d| d.join(file))
                .filter(|p| p.is_file())
        };
        (report.progress)(
            "bundle",
            &format!("compressing kernel {name} into {}", out_dir.display()),
        );
        let breq = banger_catalog::KernelBundleRequest {
            name: k.name.clone(),
            description: req.description.clone().unwrap_or_default(),
            release,
            kernel: k.kernel.clone(),
            initrd: k.initrd.clone(),
            vmlinux: k.vmlinux.clone(),
            modules: beside(banger_catalog::MODULES_FILE),
            config: beside(banger_catalog::CONFIG_FILE),
            out_dir,
            base_url: req.base_url.clone(),
        };
        let b = banger_catalog::bundle_kernel(&breq, cancel)
            .await
            .map_err(catalog_error)?;
        let (url, sha256, size) = (b.entry.url.clone(), b.entry.sha256.clone(), b.entry.size);
        let entry = serde_json::to_value(&b.entry).map_err(|e| DaemonError::Failed(e.into()))?;
        finish_bundle(
            "kernel",
            name,
            b.path,
            IndexEntry::Kernel(b.entry),
            entry,
            url,
            sha256,
            size,
            index,
            "",
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish_bundle(
    kind: &str,
    name: &str,
    path: PathBuf,
    index_entry: IndexEntry,
    entry: serde_json::Value,
    url: String,
    sha256: String,
    size: u64,
    index: Option<PathBuf>,
    hint: &str,
) -> Result<BundleResult, DaemonError> {
    if let Some(ix) = &index {
        let ix = ix.clone();
        tokio::task::spawn_blocking(move || {
            banger_catalog::merge_into_index_file(&ix, &[index_entry])
        })
        .await
        .map_err(|e| DaemonError::Failed(anyhow!("index update: {e}")))?
        .map_err(|e| match e {
            CatalogError::BadIndex { .. } => DaemonError::Invalid(format!("{e}{hint}")),
            other => catalog_error(other),
        })?;
    }
    Ok(BundleResult {
        kind: kind.to_string(),
        name: name.to_string(),
        path: path.display().to_string(),
        url,
        sha256,
        size,
        entry,
        index: index.map(|p| p.display().to_string()),
    })
}

/// The request's own rules, checked before the stream starts.
fn check_bundle(req: &BundleRequest) -> Result<(), DaemonError> {
    use banger_api::rules::{BASE_URL, HOST_PATH};
    let paths = [Some(&req.out_dir), req.index.as_ref()];
    paths
        .into_iter()
        .flatten()
        .try_for_each(|p| HOST_PATH.check(p))
        .and_then(|()| BASE_URL.check(&req.base_url))
        .map_err(|e| DaemonError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_names() {
        assert!(!is_oci_reference("debian-bookworm"));
        assert!(!is_oci_reference("generic-6.12"));
        assert!(is_oci_reference("127.0.0.1:5000/test/alpine:3"));
        assert!(is_oci_reference("docker.io/library/busybox"));
        assert!(is_oci_reference("x@sha256:00"));
        assert_eq!(name_from_reference("ghcr.io/org/tool:1.2"), "tool-1.2");
        assert_eq!(
            name_from_reference("127.0.0.1:5000/a/Busy_Box:latest"),
            "busy_box"
        );
        assert_eq!(name_from_reference("reg:5000/repo"), "repo");
        assert_eq!(
            name_from_reference(&format!("reg/repo@sha256:{}", "a".repeat(64))),
            "repo"
        );
        assert_eq!(name_from_reference("reg/--x:t+1"), "x-t-1");
        check_name("image", &name_from_reference("reg/--x:t+1")).expect("valid");
        assert!(check_name("image", "Bad").is_err());
        assert!(check_name("image", "-x").is_err());
    }

    #[test]
    fn only_the_store_s_own_directories_are_owned() {
        let store = Path::new("/s/images");
        assert_eq!(
            owned_dir(store, Path::new("/s/images/a/rootfs.ext4")),
            Some(PathBuf::from("/s/images/a"))
        );
        assert_eq!(owned_dir(store, Path::new("/home/u/rootfs.ext4")), None);
        assert_eq!(owned_dir(store, Path::new("/s/images/rootfs.ext4")), None);
        assert_eq!(
            owned_dir(store, Path::new("/s/images/a/b/rootfs.ext4")),
            None
        );
    }

    #[test]
    fn bzimage_release_reads_the_setup_header() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("bz");
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-42-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        std::fs::write(&p, &img).expect("write");
        assert_eq!(bzimage_release(&p).as_deref(), Some("6.1.0-42-cloud-amd64"));
        std::fs::write(&p, b"not a kernel").expect("write");
        assert_eq!(bzimage_release(&p), None);
    }
}
