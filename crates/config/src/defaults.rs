//! The sizing of new VMs and where each value came from.

use crate::VmDefaults;
use banger_model::{ByteSize, Provenance, SpecValue, VmSpec};

/// CPUs and memory of the host, for sizing heuristics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub cpus: u32,
    /// Total RAM; 0 when it could not be read.
    pub memory_mib: u64,
}

impl HostResources {
    /// Reads the usable CPU count and `MemTotal` of `/proc/meminfo`. What
    /// cannot be read counts as 1 CPU / 0 MiB, which lands on the floor.
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_meminfo_mib(&s))
            .unwrap_or(0);
        Self { cpus, memory_mib }
    }
}

/// `MemTotal:` of /proc/meminfo text, in MiB.
pub fn parse_meminfo_mib(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = rest.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(kib / 1024),
        Some(_) => None,
    }
}

/// Most vCPUs the host heuristic hands out.
pub const HOST_VCPU_CAP: u32 = 4;
/// Most memory the host heuristic hands out.
pub const HOST_MEMORY_CAP_MIB: u64 = 8 * 1024;
/// The floor: no VM gets fewer vCPUs without asking.
pub const BUILTIN_VCPU: u32 = 1;
/// The floor: no VM gets less memory without asking.
pub const BUILTIN_MEMORY_MIB: u64 = 1024;
/// The work disk size when config does not set one.
pub const BUILTIN_DISK_BYTES: u64 = 8 * ByteSize::GIB;

/// The sizing of a new VM before flags, each value with its provenance.
///
/// Per field, the first that applies wins:
/// 1. `[vm_defaults]` sets it: that value, `config` (the floor does not
///    apply: an explicit setting is respected, and validated at load).
/// 2. The host heuristic (vCPU = CPUs / 4 capped at 4; memory = RAM / 8
///    capped at 8 GiB) when it reaches the floor: that value, `host`.
/// 3. Otherwise the built-in floor (1 vCPU, 1024 MiB), `builtin`.
///
/// The disk does not depend on the host: without config it is the built-in
/// 8 GiB, reported as `builtin`.
///
/// E.g. a 2-CPU, 24 GiB host gets 1 vCPU (`builtin`: 2/4 = 0 is below the
/// floor) and 3072 MiB (`host`).
pub fn effective_defaults(cfg: &VmDefaults, host: &HostResources) -> VmSpec {
    let vcpu = match cfg.vcpu {
        Some(v) => SpecValue::new(v, Provenance::Config),
        None => host_or_floor((host.cpus / 4).min(HOST_VCPU_CAP), BUILTIN_VCPU),
    };
    let memory_mib = match cfg.memory_mib {
        Some(m) => SpecValue::new(m, Provenance::Config),
        None => host_or_floor(
            (host.memory_mib / 8).min(HOST_MEMORY_CAP_MIB),
            BUILTIN_MEMORY_MIB,
        ),
    };
    let disk_bytes = match cfg.disk_size {
        Some(d) => SpecValue::new(d.bytes(), Provenance::Config),
        None => SpecValue::new(BUILTIN_DISK_BYTES, Provenance::Builtin),
    };
    VmSpec {
        vcpu,
        memory_mib,
        disk_bytes,
    }
}

fn host_or_floor<T: Ord + Copy>(heuristic: T, floor: T) -> SpecValue<T> {
    if heuristic < floor {
        SpecValue::new(floor, Provenance::Builtin)
    } else {
        SpecValue::new(heuristic, Provenance::Host)
    }
}

/// Overrides `spec` with the values given on the command line (or in an API
/// request), marking them `flag`. Validating them is the caller's job.
pub fn apply_flags(
    mut spec: VmSpec,
    vcpu: Option<u32>,
    memory_mib: Option<u64>,
    disk: Option<ByteSize>,
) -> VmSpec {
    if let Some(v) = vcpu {
        spec.vcpu = SpecValue::new(v, Provenance::Flag);
    }
    if let Some(m) = memory_mib {
        spec.memory_mib = SpecValue::new(m, Provenance::Flag);
    }
    if let Some(d) = disk {
        spec.disk_bytes = SpecValue::new(d.bytes(), Provenance::Flag);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use Provenance::{Builtin, Config, Flag, Host};

    const GIB_MIB: u64 = 1024;

    #[test]
    fn host_heuristic_table() {
        // (cpus, RAM MiB) → (vcpu, provenance), (memory MiB, provenance)
        let table = [
            ((1, 512), (1, Builtin), (1024, Builtin)),
            ((2, 24 * GIB_MIB), (1, Builtin), (3072, Host)),
            ((3, 8 * GIB_MIB), (1, Builtin), (1024, Host)),
            ((4, 7 * GIB_MIB), (1, Host), (1024, Builtin)),
            ((8, 16 * GIB_MIB), (2, Host), (2048, Host)),
            ((16, 64 * GIB_MIB), (4, Host), (8192, Host)),
            ((64, 256 * GIB_MIB), (4, Host), (8192, Host)),
            ((2, 0), (1, Builtin), (1024, Builtin)),
        ];
        for ((cpus, mem), (v, vp), (m, mp)) in table {
            let s = effective_defaults(
                &VmDefaults::default(),
                &HostResources {
                    cpus,
                    memory_mib: mem,
                },
            );
            assert_eq!(s.vcpu, SpecValue::new(v, vp), "{cpus} cpus");
            assert_eq!(s.memory_mib, SpecValue::new(m, mp), "{mem} MiB");
            assert_eq!(s.disk_bytes, SpecValue::new(8 * ByteSize::GIB, Builtin));
        }
    }

    #[test]
    fn config_wins_even_below_the_floor() {
        let cfg = VmDefaults {
            vcpu: Some(3),
            memory_mib: Some(512),
            disk_size: Some(ByteSize::gib(16)),
        };
        let s = effective_defaults(
            &cfg,
            &HostResources {
                cpus: 64,
                memory_mib: 1 << 20,
            },
        );
        assert_eq!(s.vcpu, SpecValue::new(3, Config));
        assert_eq!(s.memory_mib, SpecValue::new(512, Config));
        assert_eq!(s.disk_bytes, SpecValue::new(16 * ByteSize::GIB, Config));
        // Only what config sets comes from config.
        let s = effective_defaults(
            &VmDefaults {
                vcpu: Some(2),
                ..VmDefaults::default()
            },
            &HostResources {
                cpus: 16,
                memory_mib: 16 * GIB_MIB,
            },
        );
        assert_eq!(s.vcpu, SpecValue::new(2, Config));
        assert_eq!(s.memory_mib, SpecValue::new(2048, Host));
        assert_eq!(s.disk_bytes.source, Builtin);
    }

    #[test]
    fn flags_win_over_everything() {
        let cfg = VmDefaults {
            vcpu: Some(3),
            memory_mib: None,
            disk_size: Some(ByteSize::gib(16)),
        };
        let s = effective_defaults(
            &cfg,
            &HostResources {
                cpus: 8,
                memory_mib: 16 * GIB_MIB,
            },
        );
        let f = apply_flags(s, Some(2), None, Some(ByteSize::gib(20)));
        assert_eq!(f.vcpu, SpecValue::new(2, Flag));
        assert_eq!(f.memory_mib, SpecValue::new(2048, Host));
        assert_eq!(f.disk_bytes, SpecValue::new(20 * ByteSize::GIB, Flag));
        let f = apply_flags(s, None, Some(4096), None);
        assert_eq!(f.vcpu, SpecValue::new(3, Config));
        assert_eq!(f.memory_mib, SpecValue::new(4096, Flag));
        assert_eq!(
            f.summary(),
            "spec: vcpu=3 (config), memory=4G (flag), disk=16G (config)"
        );
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24567892 kB\nMemFree:         1234 kB\nMemAvailable: 1 kB\n";
        assert_eq!(parse_meminfo_mib(text), Some(23992));
        assert_eq!(
            parse_meminfo_mib("MemFree: 1 kB\nMemTotal: 2048 kB\n"),
            Some(2)
        );
        assert_eq!(parse_meminfo_mib("garbage"), None);
        assert_eq!(parse_meminfo_mib("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo_mib("MemTotal: 2048 MB\n"), None);
    }

    #[test]
    fn detect_reads_this_host() {
        let h = HostResources::detect();
        assert!(h.cpus >= 1);
        // Every Linux host has /proc/meminfo; this one has more than 64 MiB.
        assert!(h.memory_mib > 64, "{h:?}");
    }
}
