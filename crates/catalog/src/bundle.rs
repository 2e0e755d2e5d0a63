//! Publishing: writing bundles and the index entries that describe them.

use crate::extract::{BLOCK, is_zero};
use crate::index::{ImageEntry, KernelEntry};
use crate::manifest::{
    BundleFile, CONFIG_FILE, INITRD_FILE, ImageManifest, KERNEL_FILE, KernelManifest,
    MANIFEST_FILE, MANIFEST_VERSION, MODULES_FILE, ROOTFS_FILE, VMLINUX_FILE, WORK_SEED_FILE,
};
use crate::names::{NAME_RULE, hex_digest, is_valid_name};
use crate::{CatalogError, blocking, now_rfc3339};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;
use url::Url;

/// zstd level of published bundles: most of the gain of higher levels at a
/// fraction of their time on multi-GiB root file systems.
const ZSTD_LEVEL: i32 = 6;

/// File name of a published bundle: `<name>-<first 16 hex digits of its
/// sha256>.tar.zst`. A new build gets a new name, so caches and CDNs never
/// serve a stale bundle under an old name.
pub fn bundle_file_name(name: &str, sha256: &str) -> String {
    format!("{name}-{}.tar.zst", &sha256[..sha256.len().min(16)])
}

/// An image to bundle.
#[derive(Debug, Clone)]
pub struct ImageBundleRequest {
    /// Catalog name, e.g. `debian-bookworm`.
    pub name: String,
    pub description: String,
    /// Name of the catalog kernel the image boots with, e.g. `generic-6.12`.
    pub kernel: String,
    /// The ext4 root file system.
    pub rootfs: PathBuf,
    /// The ext4 `/root` work-seed, if the image has one.
    pub work_seed: Option<PathBuf>,
    /// Where the bundle file is written.
    pub out_dir: PathBuf,
    /// Where the bundle file will be published (http, https or file URL of
    /// a directory); the entry's URL is this plus the bundle's file name.
    pub base_url: String,
}

/// A kernel to bundle.
#[derive(Debug, Clone)]
pub struct KernelBundleRequest {
    /// Catalog name, e.g. `generic-6.12`.
    pub name: String,
    pub description: String,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// bzImage (QEMU).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Uncompressed ELF vmlinux (Firecracker).
    pub vmlinux: Option<PathBuf>,
    /// The modules as a tar.
    pub modules: Option<PathBuf>,
    /// The kernel's build config.
    pub config: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// See [`ImageBundleRequest::base_url`].
    pub base_url: String,
}

/// A written image bundle and its index entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundledImage {
    pub path: PathBuf,
    pub entry: ImageEntry,
    pub manifest: ImageManifest,
}

/// A written kernel bundle and its index entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundledKernel {
    pub path: PathBuf,
    pub entry: KernelEntry,
    pub manifest: KernelManifest,
}

/// Writes `out_dir/<name>-<sha16>.tar.zst` from an image's files and returns
/// its index entry (for the host's architecture).
pub async fn bundle_image(
    req: &ImageBundleRequest,
    cancel: &CancellationToken,
) -> Result<BundledImage, CatalogError> {
    check_name("image", &req.name)?;
    check_name("kernel", &req.kernel)?;
    let base = base_url(&req.base_url)?;
    let mut files = vec![(ROOTFS_FILE, req.rootfs.clone())];
    if let Some(ws) = &req.work_seed {
        files.push((WORK_SEED_FILE, ws.clone()));
    }
    let (name, kernel) = (req.name.clone(), req.kernel.clone());
    let written = write_bundle(&req.name, files, &req.out_dir, cancel, move |files| {
        ImageManifest {
            version: MANIFEST_VERSION,
            name,
            kernel,
            files,
            created_at: now_rfc3339(),
            banger_version: banger_version::BuildInfo::current().version,
        }
    })
    .await?;
    Ok(BundledImage {
        entry: ImageEntry {
            name: req.name.clone(),
            description: req.description.clone(),
            url: join_url(&base, &written.file_name),
            sha256: written.sha256,
            size: written.size,
            kernel: req.kernel.clone(),
            arch: std::env::consts::ARCH.into(),
        },
        path: written.path,
        manifest: written.manifest,
    })
}

/// Writes `out_dir/<name>-<sha16>.tar.zst` from a kernel's files and returns
/// its index entry (for the host's architecture).
pub async fn bundle_kernel(
    req: &KernelBundleRequest,
    cancel: &CancellationToken,
) -> Result<BundledKernel, CatalogError> {
    check_name("kernel", &req.name)?;
    if req.release.is_empty() || req.release.chars().any(char::is_whitespace) {
        return Err(CatalogError::Invalid(format!(
            "kernel release {:?} is not valid: give `uname -r` of the kernel",
            req.release
        )));
    }
    let base = base_url(&req.base_url)?;
    let mut files = vec![(KERNEL_FILE, req.kernel.clone())];
    for (name, path) in [
        (INITRD_FILE, &req.initrd),
        (VMLINUX_FILE, &req.vmlinux),
        (MODULES_FILE, &req.modules),
        (CONFIG_FILE, &req.config),
    ] {
        if let Some(p) = path {
            files.push((name, p.clone()));
        }
    }
    let (name, release) = (req.name.clone(), req.release.clone());
    let written = write_bundle(&req.name, files, &req.out_dir, cancel, move |files| {
        KernelManifest {
            version: MANIFEST_VERSION,
            name,
            release,
            files,
            created_at: now_rfc3339(),
            banger_version: banger_version::BuildInfo::current().version,
        }
    })
    .await?;
    Ok(BundledKernel {
        entry: KernelEntry {
            name: req.name.clone(),
            description: req.description.clone(),
            url: join_url(&base, &written.file_name),
            sha256: written.sha256,
            size: written.size,
            release: req.release.clone(),
            arch: std::env::consts::ARCH.into(),
        },
        path: written.path,
        manifest: written.manifest,
    })
}

fn check_name(kind: &str, name: &str) -> Result<(), CatalogError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(CatalogError::Invalid(format!(
            "{kind} name {name:?} is not valid: {NAME_RULE}"
        )))
    }
}

fn base_url(raw: &str) -> Result<Url, CatalogError> {
    match Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https" | "file") => Ok(u),
        _ => Err(CatalogError::Invalid(format!(
            "base URL {raw:?} is not valid: give the http, https or file URL of the directory the bundle will be published in"
        ))),
    }
}

/// Mode of what banger writes for a web server to publish (bundles and
/// index files): 0644, whatever the daemon's umask.
pub(crate) fn publishable() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o644)
}

fn join_url(base: &Url, file_name: &str) -> String {
    format!("{}/{file_name}", base.as_str().trim_end_matches('/'))
}

struct Written<M> {
    path: PathBuf,
    file_name: String,
    sha256: String,
    size: u64,
    manifest: M,
}

async fn write_bundle<M: serde::Serialize + Send + 'static>(
    name: &str,
    files: Vec<(&'static str, PathBuf)>,
    out_dir: &Path,
    cancel: &CancellationToken,
    make_manifest: impl FnOnce(Vec<BundleFile>) -> M + Send + 'static,
) -> Result<Written<M>, CatalogError> {
    let (name, out_dir, cancel) = (name.to_string(), out_dir.to_path_buf(), cancel.clone());
    blocking(move || {
        let mut listed = Vec::new();
        for (fname, path) in &files {
            let md = std::fs::metadata(path)
                .map_err(CatalogError::io(format!("reading {}", path.display())))?;
            if !md.is_file() {
                return Err(CatalogError::Invalid(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
            listed.push(scan(fname, path, &cancel)?);
        }
        let manifest = make_manifest(listed.clone());
        let mut manifest_json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CatalogError::Invalid(format!("encoding the bundle manifest: {e}")))?;
        manifest_json.push(b'\n');

        std::fs::create_dir_all(&out_dir)
            .map_err(CatalogError::io(format!("creating {}", out_dir.display())))?;
        let tmp = out_dir.join(format!(
            ".{name}-{:016x}.tar.zst.tmp",
            rand::random::<u64>()
        ));
        let result = write_tar(&tmp, &manifest_json, &files, &listed, &cancel);
        let (sha256, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let file_name = bundle_file_name(&name, &sha256);
        let path = out_dir.join(&file_name);
        // Bundles are for publishing: world-readable whatever the umask
        // (bangerd's is 077).
        if let Err(e) = std::fs::set_permissions(&tmp, publishable()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(CatalogError::Io {
                context: format!("chmod {}", tmp.display()),
                source: e,
            });
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(CatalogError::Io {
                context: format!("moving the bundle to {}", path.display()),
                source: e,
            });
        }
        Ok(Written {
            path,
            file_name,
            sha256,
            size,
            manifest,
        })
    })
    .await
}

/// Size, sha256 and non-zero bytes of a file, in one read.
fn scan(name: &str, path: &Path, cancel: &CancellationToken) -> Result<BundleFile, CatalogError> {
    let ctx = || format!("reading {}", path.display());
    let mut f = File::open(path).map_err(CatalogError::io(ctx()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut data_bytes) = (0u64, 0u64);
    loop {
        if cancel.is_cancelled() {
            return Err(CatalogError::Cancelled);
        }
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CatalogError::io(ctx())(e)),
            }
        }
        if filled == 0 {
            break;
        }
        hasher.update(&buf[..filled]);
        data_bytes += buf[..filled]
            .chunks(BLOCK)
            .filter(|b| !is_zero(b))
            .map(|b| b.len() as u64)
            .sum::<u64>();
        size += filled as u64;
    }
    Ok(BundleFile {
        name: name.to_string(),
        size,
        sha256: hex_digest(hasher),
        data_bytes,
    })
}

/// Writes the tar+zstd stream: the manifest, then the files in manifest
/// order, each re-hashed as it is copied so a file that changed since
/// [`scan`] is caught. Returns the sha256 and size of the bundle.
fn write_tar(
    tmp: &Path,
    manifest_json: &[u8],
    files: &[(&'static str, PathBuf)],
    listed: &[BundleFile],
    cancel: &CancellationToken,
) -> Result<(String, u64), CatalogError> {
    let ctx = || format!("writing {}", tmp.display());
    let out = File::create_new(tmp).map_err(CatalogError::io(ctx()))?;
    let mut enc = zstd::stream::write::Encoder::new(
        HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            size: 0,
        },
        ZSTD_LEVEL,
    )
    .map_err(CatalogError::io(ctx()))?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    enc.multithread(workers).map_err(CatalogError::io(ctx()))?;
    let mut tar = tar::Builder::new(enc);
    tar.append(
        &header(MANIFEST_FILE, manifest_json.len() as u64),
        manifest_json,
    )
    .map_err(CatalogError::io(ctx()))?;
    for ((name, path), want) in files.iter().zip(listed) {
        let src =
            File::open(path).map_err(CatalogError::io(format!("reading {}", path.display())))?;
        let mut reader = HashingReader {
            inner: src.take(want.size),
            hasher: Sha256::new(),
            size: 0,
            cancel,
        };
        tar.append(&header(name, want.size), &mut reader)
            .map_err(|e| {
                if cancel.is_cancelled() {
                    CatalogError::Cancelled
                } else {
                    CatalogError::io(ctx())(e)
                }
            })?;
        if reader.size != want.size || hex_digest(reader.hasher) != want.sha256 {
            return Err(CatalogError::Invalid(format!(
                "{} changed while it was being bundled: stop whatever writes to it and bundle again",
                path.display()
            )));
        }
    }
    let enc = tar.into_inner().map_err(CatalogError::io(ctx()))?;
    let hw = enc.finish().map_err(CatalogError::io(ctx()))?;
    hw.inner.sync_all().map_err(CatalogError::io(ctx()))?;
    Ok((hex_digest(hw.hasher), hw.size))
}

/// A plain, reproducible header: regular file, 0644, owned by root, time 0.
fn header(name: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    // Names are our fixed, short constants: set_path cannot fail on them.
    let _ = h.set_path(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

struct HashingWriter {
    inner: File,
    hasher: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<'a, R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_content_addressed() {
        let sha = "0123456789abcdef".repeat(4);
        assert_eq!(
            bundle_file_name("debian-bookworm", &sha),
            "debian-bookworm-0123456789abcdef.tar.zst"
        );
    }

    #[test]
    fn urls_join_with_one_slash() {
        for base in ["https://h/c/releases", "https://h/c/releases/"] {
            let u = base_url(base).expect("url");
            assert_eq!(join_url(&u, "a.tar.zst"), "https://h/c/releases/a.tar.zst");
        }
        assert!(base_url("/srv/catalog").is_err());
        assert!(base_url("ftp://h/x").is_err());
    }

    /// bangerd runs with umask 077; what it writes for publishing must
    /// still be readable by the web server that serves it.
    #[tokio::test]
    async fn bundles_and_index_files_are_world_readable_under_a_private_umask() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let file = t.path().join("rootfs.ext4");
        std::fs::write(&file, b"data").expect("write");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let cancel = CancellationToken::new();
        let written = write_bundle(
            "x",
            vec![("rootfs.ext4", file)],
            &t.path().join("out"),
            &cancel,
            |f| f,
        )
        .await;
        let index = t.path().join("out/index.json");
        let merged = crate::index::merge_into_index_file(&index, &[]);
        nix::sys::stat::umask(old);
        let written = written.expect("bundle");
        merged.expect("index");
        for p in [&written.path, &index] {
            let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}", p.display());
        }
    }

    #[tokio::test]
    async fn refuses_bad_requests_before_writing() {
        let t = tempfile::tempdir().expect("tempdir");
        let req = ImageBundleRequest {
            name: "Bad Name".into(),
            description: String::new(),
            kernel: "generic-6.12".into(),
            rootfs: t.path().join("rootfs.ext4"),
            work_seed: None,
            out_dir: t.path().join("out"),
            base_url: "https://example.invalid/c".into(),
        };
        let cancel = CancellationToken::new();
        let err = bundle_image(&req, &cancel).await.expect_err("bad name");
        assert!(err.to_string().contains("\"Bad Name\""), "{err}");
        let req = ImageBundleRequest {
            name: "ok".into(),
            ..req
        };
        let err = bundle_image(&req, &cancel)
            .await
            .expect_err("missing rootfs");
        assert!(err.to_string().contains("rootfs.ext4"), "{err}");
        assert!(!t.path().join("out").exists());
    }
}
