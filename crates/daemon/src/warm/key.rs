//! The current [`TemplateKey`] of an image and shape: computed from file
//! metadata only (no hashing but the agent's, cached by its metadata), so
//! a create can afford it every time.

use crate::Daemon;
use anyhow::{Context, anyhow};
use banger_model::{
    FileFp, HostFp, ImageRecord, InitramfsMode, KernelRecord, NicKind, TEMPLATE_FORMAT,
    TemplateKey, TemplateShape, VmBackend,
};
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The template id of `key`: the first 16 hex digits of the sha256 of its
/// canonical JSON (field order is the struct's, fixed).
pub(crate) fn key_id(key: &TemplateKey) -> String {
    let json = serde_json::to_vec(key).unwrap_or_default();
    hex(&Sha256::digest(&json))[..16].to_string()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size, inode and mtime of `path`.
pub(crate) fn file_fp(path: &Path) -> anyhow::Result<FileFp> {
    let md = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(FileFp {
        path: path.display().to_string(),
        size: md.len(),
        ino: md.ino(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    })
}

/// The initramfs a boot of a VM asking for `mode` uses with `kernel`
/// today, without making one (see `Daemon::boot_initrd`).
pub(crate) fn resolve_initramfs(mode: InitramfsMode, kernel: &KernelRecord) -> InitramfsMode {
    match mode {
        InitramfsMode::Auto => {
            if kernel
                .banger_initramfs
                .as_ref()
                .is_some_and(|p| p.is_file())
            {
                InitramfsMode::Banger
            } else {
                InitramfsMode::Distro
            }
        }
        other => other,
    }
}

/// The host facts a snapshot depends on: CPU model and features, host
/// kernel. (The guest's clock is set at each restore, so the TSC rate,
/// which some hosts only report as a fluctuating `cpu MHz`, is left out.)
pub(crate) fn host_fp() -> HostFp {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut h = Sha256::new();
    // The first processor's identity lines; every core of a host is alike.
    for line in cpuinfo.lines().take_while(|l| !l.trim().is_empty()) {
        let key = line.split(':').next().unwrap_or("").trim();
        if matches!(key, "vendor_id" | "cpu family" | "model" | "flags") {
            h.update(line.as_bytes());
            h.update(b"\n");
        }
    }
    HostFp {
        cpu: hex(&h.finalize())[..16].to_string(),
        tsc_khz: 0,
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// What of a create decides its template, besides the daemon's own state.
pub(crate) struct KeyInput<'a> {
    pub(crate) image: &'a ImageRecord,
    pub(crate) kernel: &'a KernelRecord,
    pub(crate) initramfs: InitramfsMode,
    pub(crate) backend: VmBackend,
    /// `WarmSupport::Supported { id }` of the backend.
    pub(crate) backend_id: &'a str,
    pub(crate) shape: TemplateShape,
    pub(crate) nic: NicKind,
}

impl Daemon {
    /// The key a template for `input` has when it is current.
    pub(crate) fn template_key(&self, input: &KeyInput<'_>) -> anyhow::Result<TemplateKey> {
        let KeyInput {
            image,
            kernel,
            initramfs,
            backend,
            backend_id,
            shape,
            nic,
        } = input;
        let mut image_fp = vec![file_fp(&image.rootfs)?];
        if let Some(seed) = &image.work_seed {
            image_fp.push(file_fp(seed)?);
        }
        let kernel_file = match backend {
            VmBackend::Firecracker => kernel
                .vmlinux
                .clone()
                .ok_or_else(|| anyhow!("kernel {} has no vmlinux", kernel.name))?,
            VmBackend::Qemu => kernel.kernel.clone(),
        };
        let initramfs = resolve_initramfs(*initramfs, kernel);
        let mut kernel_fp = vec![file_fp(&kernel_file)?];
        let part = match initramfs {
            InitramfsMode::Banger => kernel.banger_initramfs.as_ref(),
            _ => kernel.initrd.as_ref(),
        };
        if let Some(p) = part {
            kernel_fp.push(file_fp(p)?);
        }
        Ok(TemplateKey {
            format: TEMPLATE_FORMAT,
            image: image.name.clone(),
            image_fp,
            image_created_at: image.created_at.clone(),
            kernel: kernel.name.clone(),
            kernel_fp,
            initramfs,
            agent_sha256: self.agent_sha256()?,
            backend: *backend,
            backend_version: backend_id.to_string(),
            host: host_fp(),
            vcpu: shape.vcpu,
            memory_mib: shape.memory_mib,
            nic: *nic,
        })
    }

    /// sha256 of the agent binary, recomputed only when its metadata changes.
    fn agent_sha256(&self) -> anyhow::Result<String> {
        let path = self.agent_binary()?;
        let fp = file_fp(&path)?;
        let mut cache = self.agent_sha.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, sha)) = cache.as_ref()
            && *cached == fp
        {
            return Ok(sha.clone());
        }
        let sha = sha256_file(&path)?;
        *cache = Some((fp, sha.clone()));
        Ok(sha)
    }
}

/// sha256 of a file's contents, hex.
pub(crate) fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use banger_model::TEMPLATE_FORMAT;

    pub(crate) fn key() -> TemplateKey {
        TemplateKey {
            format: TEMPLATE_FORMAT,
            image: "debian".into(),
            image_fp: vec![FileFp {
                path: "/i/rootfs.ext4".into(),
                size: 1,
                ino: 2,
                mtime_ns: 3,
            }],
            image_created_at: "2026-12-06T00:00:00Z".into(),
            kernel: "k".into(),
            kernel_fp: vec![],
            initramfs: InitramfsMode::Banger,
            agent_sha256: "ab".repeat(32),
            backend: VmBackend::Qemu,
            backend_version: "QEMU 10.0.2".into(),
            host: HostFp {
                cpu: "0123456789abcdef".into(),
                tsc_khz: 0,
                kernel_release: "6.1.0".into(),
            },
            vcpu: 1,
            memory_mib: 1024,
            nic: NicKind::Tap,
        }
    }

    /// The id is stable across builds (it names directories on disk):
    /// a change here orphans every template, so it must be deliberate.
    #[test]
    fn key_id_is_golden() {
        let k = key();
        assert_eq!(key_id(&k), "0e9bcab608112e45");
        let mut other = k.clone();
        other.memory_mib = 2048;
        assert_ne!(key_id(&other), key_id(&k));
        assert_eq!(key_id(&k).len(), 16);
    }

    #[test]
    fn initramfs_resolves_like_a_boot() {
        let t = tempfile::tempdir().expect("tmp");
        let part = t.path().join("modules.cpio");
        let mut k = KernelRecord {
            name: "k".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: None,
            vmlinux: None,
            release: None,
            banger_initramfs: Some(part.clone()),
            dir: None,
            created_at: String::new(),
        };
        assert_eq!(
            resolve_initramfs(InitramfsMode::Auto, &k),
            InitramfsMode::Distro,
            "a recorded part that is missing is not used"
        );
        std::fs::write(&part, b"x").expect("w");
        assert_eq!(
            resolve_initramfs(InitramfsMode::Auto, &k),
            InitramfsMode::Banger
        );
        assert_eq!(
            resolve_initramfs(InitramfsMode::Distro, &k),
            InitramfsMode::Distro
        );
        k.banger_initramfs = None;
        assert_eq!(
            resolve_initramfs(InitramfsMode::Banger, &k),
            InitramfsMode::Banger
        );
    }

    #[test]
    fn host_fp_is_stable() {
        assert_eq!(host_fp(), host_fp());
        assert_eq!(host_fp().cpu.len(), 16);
    }
}
