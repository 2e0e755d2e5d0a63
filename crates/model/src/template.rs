//! Warm-start templates: what makes a saved, paused guest restorable, and
//! how a VM was started. Pure data; the daemon computes and checks them.

use crate::{InitramfsMode, VmBackend};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The layout of a template directory and its header; bumped when either
/// changes so older templates are refused, not misread.
pub const TEMPLATE_FORMAT: u32 = 3;

/// A file's identity without reading it: path, size, inode, mtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFp {
    pub path: String,
    pub size: u64,
    pub ino: u64,
    pub mtime_ns: i128,
}

/// What of the host a snapshot depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFp {
    /// sha256 of the CPU's vendor, family, model and flags (first 16 hex).
    pub cpu: String,
    /// The TSC rate the guest was told (QEMU TCG), 0 when unknown.
    pub tsc_khz: u64,
    /// The host kernel's release (KVM state formats follow it).
    pub kernel_release: String,
}

/// Which kind of network device a template's guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicKind {
    None,
    /// A TAP on banger's bridge.
    Tap,
    /// QEMU user-mode networking (slirp adds its own migration section).
    User,
}

/// Everything that makes a snapshot unrestorable when it changes. Two
/// keys are equal exactly when a template made for one restores for the
/// other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateKey {
    pub format: u32,
    pub image: String,
    /// Root file system and work seed.
    pub image_fp: Vec<FileFp>,
    pub image_created_at: String,
    pub kernel: String,
    /// The kernel file booted and the initramfs parts it used.
    pub kernel_fp: Vec<FileFp>,
    /// The initramfs the template booted with (resolved, never `auto`).
    pub initramfs: InitramfsMode,
    pub agent_sha256: String,
    pub backend: VmBackend,
    /// The backend's own restore identity, e.g. "QEMU 10.0.2 tcg".
    pub backend_version: String,
    pub host: HostFp,
    pub vcpu: u32,
    pub memory_mib: u64,
    pub nic: NicKind,
}

impl TemplateKey {
    /// The fields that differ between `self` and `other`, as words for a
    /// message ("kernel", "vcpu", ...). Empty when the keys are equal.
    pub fn diff(&self, other: &TemplateKey) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |same: bool, name: &'static str| {
            if !same {
                out.push(name);
            }
        };
        check(self.format == other.format, "format");
        check(self.image == other.image, "image");
        check(
            self.image_fp == other.image_fp && self.image_created_at == other.image_created_at,
            "image files",
        );
        check(
            self.kernel == other.kernel && self.kernel_fp == other.kernel_fp,
            "kernel",
        );
        check(self.initramfs == other.initramfs, "initramfs");
        check(self.agent_sha256 == other.agent_sha256, "agent");
        check(
            self.backend == other.backend && self.backend_version == other.backend_version,
            "VMM",
        );
        check(self.host == other.host, "host");
        check(
            self.vcpu == other.vcpu && self.memory_mib == other.memory_mib,
            "shape",
        );
        check(self.nic == other.nic, "network device");
        out
    }

    /// The shape this key is for.
    pub fn shape(&self) -> TemplateShape {
        TemplateShape {
            vcpu: self.vcpu,
            memory_mib: self.memory_mib,
        }
    }
}

/// The resources a template's guest has (and each of its clones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateShape {
    pub vcpu: u32,
    pub memory_mib: u64,
}

impl fmt::Display for TemplateShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} vCPU/{} MiB", self.vcpu, self.memory_mib)
    }
}

/// Whether a template can be used yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TemplateState {
    /// Its guest is booting or being saved.
    Building,
    /// Saved and sealed: VMs may restore it.
    Ready,
}

impl TemplateState {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateState::Building => "building",
            TemplateState::Ready => "ready",
        }
    }
}

impl std::str::FromStr for TemplateState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "building" => Ok(TemplateState::Building),
            "ready" => Ok(TemplateState::Ready),
            other => Err(format!("unknown template state {other:?}")),
        }
    }
}

/// A template as the daemon stores and lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateRecord {
    /// First 16 hex of the sha256 of its key; also its directory's name.
    pub id: String,
    pub image: String,
    pub backend: VmBackend,
    pub shape: TemplateShape,
    /// The work and overlay disks' size when it was made; clones may only
    /// be as large or larger.
    pub disk_bytes: u64,
    #[schema(value_type = String)]
    pub dir: std::path::PathBuf,
    pub state: TemplateState,
    /// Bytes its files take on disk (allocated).
    pub size_bytes: u64,
    pub build_ms: Option<u64>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// How many VMs restored it.
    pub uses: u64,
}

/// How a VM's last start happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartKind {
    /// An ordinary boot of its kernel.
    #[default]
    Cold,
    /// Restored from a template.
    Warm,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Warm => "warm",
        }
    }
}

impl fmt::Display for StartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StartKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cold" => Ok(StartKind::Cold),
            "warm" => Ok(StartKind::Warm),
            other => Err(format!("unknown start kind {other:?}")),
        }
    }
}

/// How a VM's last start happened and, for a cold one, why it was not warm.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StartInfo {
    pub kind: StartKind,
    /// The template id a warm start restored.
    #[serde(default)]
    pub template: Option<String>,
    /// Why a start was cold (or what a warm one noticed), one line.
    #[serde(default)]
    pub note: Option<String>,
    /// How long the restore took, warm starts only.
    #[serde(default)]
    pub restore_ms: Option<u64>,
}

impl StartInfo {
    /// A cold start, with why when warm was possible in principle.
    pub fn cold(note: Option<String>) -> Self {
        Self {
            kind: StartKind::Cold,
            template: None,
            note,
            restore_ms: None,
        }
    }
}

impl fmt::Display for StartInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        match (self.kind, &self.template, self.restore_ms, &self.note) {
            (StartKind::Warm, Some(t), Some(ms), _) => {
                write!(f, " (template {t}, restored in {ms} ms)")
            }
            (StartKind::Warm, Some(t), None, _) => write!(f, " (template {t})"),
            (_, _, _, Some(note)) => write!(f, " ({note})"),
            _ => Ok(()),
        }
    }
}

/// What one create asks of warm starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarmMode {
    /// Restore a template when one fits, else boot cold (the config decides).
    #[default]
    Auto,
    /// Always boot cold (`--no-warm`).
    Off,
    /// Restore or fail, leaving nothing behind (`--warm`).
    Require,
}

/// The `warm_start` config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmSetting {
    /// Restore when a template fits; a cold create queues one in the background.
    #[default]
    Auto,
    /// Restore when a template fits; only `banger image warm` makes them.
    Manual,
    /// Never restore (`--warm` is refused).
    Off,
}

impl WarmSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            WarmSetting::Auto => "auto",
            WarmSetting::Manual => "manual",
            WarmSetting::Off => "off",
        }
    }
}

impl std::str::FromStr for WarmSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(WarmSetting::Auto),
            "manual" => Ok(WarmSetting::Manual),
            "off" => Ok(WarmSetting::Off),
            other => Err(format!(
                "unknown warm_start {other:?}: use auto, manual or off"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key() -> TemplateKey {
        let fp = |p: &str| FileFp {
            path: p.into(),
            size: 1,
            ino: 2,
            mtime_ns: 3,
        };
        TemplateKey {
            format: TEMPLATE_FORMAT,
            image: "debian".into(),
            image_fp: vec![fp("/i/rootfs.ext4"), fp("/i/work-seed.ext4")],
            image_created_at: "2026-12-06T00:00:00Z".into(),
            kernel: "k".into(),
            kernel_fp: vec![fp("/k/vmlinuz")],
            initramfs: InitramfsMode::Banger,
            agent_sha256: "ab".repeat(32),
            backend: VmBackend::Qemu,
            backend_version: "QEMU 10.0.2 tcg".into(),
            host: HostFp {
                cpu: "0123456789abcdef".into(),
                tsc_khz: 2_000_000,
                kernel_release: "6.1.0".into(),
            },
            vcpu: 1,
            memory_mib: 1024,
            nic: NicKind::Tap,
        }
    }

    #[test]
    fn diff_names_each_changed_field() {
        let a = key();
        assert!(a.diff(&a).is_empty());
        type Change = Box<dyn Fn(&mut TemplateKey)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|k| k.format = TEMPLATE_FORMAT + 1), "format"),
            (Box::new(|k| k.image = "x".into()), "image"),
            (Box::new(|k| k.image_fp[0].ino = 9), "image files"),
            (Box::new(|k| k.image_created_at = "x".into()), "image files"),
            (Box::new(|k| k.kernel_fp[0].size = 9), "kernel"),
            (
                Box::new(|k| k.initramfs = InitramfsMode::Distro),
                "initramfs",
            ),
            (Box::new(|k| k.agent_sha256 = "cd".into()), "agent"),
            (
                Box::new(|k| k.backend_version = "QEMU 9.2.0 tcg".into()),
                "VMM",
            ),
            (Box::new(|k| k.host.tsc_khz = 1), "host"),
            (Box::new(|k| k.vcpu = 2), "shape"),
            (Box::new(|k| k.memory_mib = 2048), "shape"),
            (Box::new(|k| k.nic = NicKind::User), "network device"),
        ];
        for (change, field) in cases {
            let mut b = key();
            change(&mut b);
            assert_eq!(a.diff(&b), [field]);
        }
    }

    #[test]
    fn start_info_lines() {
        let warm = StartInfo {
            kind: StartKind::Warm,
            template: Some("3f2a9c1e".into()),
            note: None,
            restore_ms: Some(412),
        };
        assert_eq!(
            warm.to_string(),
            "warm (template 3f2a9c1e, restored in 412 ms)"
        );
        assert_eq!(
            StartInfo::cold(Some("--no-warm".into())).to_string(),
            "cold (--no-warm)"
        );
        assert_eq!(StartInfo::default().to_string(), "cold");
    }

    #[test]
    fn warm_setting_parses() {
        assert_eq!("manual".parse::<WarmSetting>(), Ok(WarmSetting::Manual));
        assert!(
            "yes"
                .parse::<WarmSetting>()
                .expect_err("not a setting")
                .contains("auto, manual or off")
        );
    }
}
