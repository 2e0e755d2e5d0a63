//! Host facts the daemon and `banger doctor` need: whether KVM really works,
//! the TSC frequency, where the VMM binaries are and which version they are.
//!
//! Each probe is split into a reader (files, ioctls, processes) and a pure
//! parser so the parsers can be tested on fixture text.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors from host probes that run a program.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not run {binary} --version: {source}")]
    VersionRun {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version printed no recognisable version: {output:?}")]
    VersionParse { binary: PathBuf, output: String },
}

/// Whether hardware virtualisation through `/dev/kvm` can run a stock guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmStatus {
    Usable { api_version: i32 },
    Unusable(KvmProblem),
}

impl KvmStatus {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmStatus::Usable { .. })
    }
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmStatus::Usable { api_version } => {
                write!(f, "usable (KVM API version {api_version})")
            }
            KvmStatus::Unusable(problem) => {
                write!(
                    f,
                    "not usable: {problem}; QEMU will use TCG (software emulation)"
                )
            }
        }
    }
}

/// Why KVM cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProblem {
    /// `/dev/kvm` does not exist (no kvm module, or not passed into a container).
    Missing,
    /// `/dev/kvm` exists but this user cannot open it read-write.
    Open(String),
    /// `KVM_GET_API_VERSION` failed on the open device.
    ApiVersion(String),
    /// `/dev/kvm` comes from `kvm_pvm` (or the CPU has no vmx/svm): stock
    /// guest kernels start and then stop with `KVM_EXIT_INTERNAL_ERROR`.
    PvmOnly {
        pvm_module: bool,
        cpu_virt_flags: bool,
    },
}

impl fmt::Display for KvmProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmProblem::Missing => f.write_str("/dev/kvm does not exist"),
            KvmProblem::Open(e) => write!(f, "cannot open /dev/kvm read-write ({e})"),
            KvmProblem::ApiVersion(e) => write!(f, "KVM_GET_API_VERSION on /dev/kvm failed ({e})"),
            KvmProblem::PvmOnly {
                pvm_module: true, ..
            } => f.write_str(
                "/dev/kvm is provided by the kvm_pvm module, which cannot run stock guest kernels",
            ),
            KvmProblem::PvmOnly { .. } => f.write_str(
                "the CPU has no vmx/svm flags (nested virtualisation is off), \
                 so /dev/kvm cannot run stock guest kernels",
            ),
        }
    }
}

mod ioctl {
    const KVMIO: u8 = 0xAE;
    nix::ioctl_none!(kvm_get_api_version, KVMIO, 0x00);
}

/// Probes `/dev/kvm` as the current user.
pub fn kvm_status() -> KvmStatus {
    let device = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KvmProblem::Missing),
        Err(e) => Err(KvmProblem::Open(e.to_string())),
    };
    let api_version = device.and_then(|f| {
        use std::os::fd::AsRawFd;
        // SAFETY: KVM_GET_API_VERSION takes no argument and only reads the fd.
        unsafe { ioctl::kvm_get_api_version(f.as_raw_fd()) }
            .map_err(|e| KvmProblem::ApiVersion(e.desc().to_owned()))
    });
    let pvm_module = Path::new("/sys/module/kvm_pvm").exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    judge_kvm(api_version, pvm_module, cpu_has_virt_flags(&cpuinfo))
}

/// Combines the probes into a verdict; device problems are reported first
/// because they are the ones a user can fix (permissions, module).
pub fn judge_kvm(
    api_version: Result<i32, KvmProblem>,
    pvm_module: bool,
    cpu_virt_flags: bool,
) -> KvmStatus {
    match api_version {
        Err(problem) => KvmStatus::Unusable(problem),
        Ok(_) if pvm_module || !cpu_virt_flags => KvmStatus::Unusable(KvmProblem::PvmOnly {
            pvm_module,
            cpu_virt_flags,
        }),
        Ok(api_version) => KvmStatus::Usable { api_version },
    }
}

/// Whether any CPU in `/proc/cpuinfo` text advertises vmx (Intel) or svm (AMD).
pub fn cpu_has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, v)| v.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The host's TSC frequency in kHz, for the guest's `tsc_early_khz=`.
///
/// Sources, best first: sysfs `tsc_freq_khz` (some kernels), the kernel's
/// own calibration line in the kernel log (readable only with CAP_SYSLOG
/// where `dmesg_restrict` is set), then `cpu MHz` of `/proc/cpuinfo`.
pub fn tsc_khz() -> Option<u64> {
    if let Some(khz) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&k| k > 0)
    {
        return Some(khz);
    }
    if let Some(khz) = read_kmsg().as_deref().and_then(parse_kernel_log_tsc_khz) {
        return Some(khz);
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .as_deref()
        .and_then(parse_cpuinfo_mhz_khz)
}

/// Reads the kernel log records currently buffered in `/dev/kmsg`, without
/// blocking. None when the log is not readable by this user.
fn read_kmsg() -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut out = String::new();
    // /dev/kmsg returns one record per read; EAGAIN marks the end.
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.push_str(&String::from_utf8_lossy(&buf[..n]));
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Finds the TSC frequency in kernel log text (dmesg or /dev/kmsg format).
/// The refined calibration wins over the early estimate.
pub fn parse_kernel_log_tsc_khz(log: &str) -> Option<u64> {
    let find = |prefix: &str, suffix: &str| {
        log.lines().rev().find_map(|line| {
            let rest = &line[line.find(prefix)? + prefix.len()..];
            let (mhz, _) = rest.split_once(suffix)?;
            parse_mhz_as_khz(mhz.trim())
        })
    };
    find("tsc: Refined TSC clocksource calibration: ", " MHz")
        .or_else(|| find("tsc: Detected ", " MHz processor"))
}

/// `cpu MHz` of the first CPU in `/proc/cpuinfo` text, in kHz.
pub fn parse_cpuinfo_mhz_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "cpu MHz")
        .and_then(|(_, v)| parse_mhz_as_khz(v.trim()))
}

/// "2445.404" (MHz) → 2445404 (kHz), exactly, without float rounding.
fn parse_mhz_as_khz(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u64 = int.parse().ok()?;
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
    let frac: u64 = digits.parse().ok()?;
    let khz = int.checked_mul(1000)?.checked_add(frac)?;
    (khz > 0).then_some(khz)
}

/// Locates an executable: the configured path when given (a bare name is
/// looked up in PATH), else `name` in PATH. A configured path that is not
/// an executable file gives None rather than silently using another binary.
pub fn find_binary(name: &str, configured: Option<&Path>) -> Option<PathBuf> {
    match configured {
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            is_executable(p).then(|| p.to_path_buf())
        }
        Some(p) => search_path(p.as_os_str()),
        None => search_path(name.as_ref()),
    }
}

fn search_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A dotted program version, ordered for range checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Runs `<bin> --version` and parses QEMU's version line.
pub fn qemu_version(bin: &Path) -> Result<Version, HostError> {
    binary_version(bin, parse_qemu_version)
}

/// Runs `<bin> --version` and reads its stdout with `parse`.
pub fn binary_version(
    bin: &Path,
    parse: impl FnOnce(&str) -> Option<Version>,
) -> Result<Version, HostError> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|source| HostError::VersionRun {
            binary: bin.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse(&text).ok_or_else(|| HostError::VersionParse {
        binary: bin.to_path_buf(),
        output: text.trim().to_owned(),
    })
}

/// Parses "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)".
pub fn parse_qemu_version(text: &str) -> Option<Version> {
    const MARKER: &str = "QEMU emulator version ";
    let line = text
        .lines()
        .find_map(|l| l.find(MARKER).map(|i| &l[i + MARKER.len()..]))?;
    let word = line.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = match parts.next() {
        Some(p) => p.ok()?,
        None => 0,
    };
    Some(Version {
        major,
        minor,
        patch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO_PVM: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\
cpu MHz\t\t: 2445.404\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep constant_tsc nonstop_tsc \
rdtscp tsc_known_freq hypervisor lahf_lm\n\nprocessor\t: 1\ncpu MHz\t\t: 2445.404\nflags\t\t: fpu tsc\n";
    const CPUINFO_VMX: &str =
        "processor\t: 0\ncpu MHz\t\t: 800.000\nflags\t\t: fpu vme vmx est tm2\n";
    const CPUINFO_SVM: &str = "processor\t: 0\ncpu MHz\t\t: 3600\nflags\t\t: fpu svm npt\n";

    #[test]
    fn virt_flags() {
        assert!(!cpu_has_virt_flags(CPUINFO_PVM));
        assert!(cpu_has_virt_flags(CPUINFO_VMX));
        assert!(cpu_has_virt_flags(CPUINFO_SVM));
        // "svm" must be a whole flag, not a substring.
        assert!(!cpu_has_virt_flags("flags\t: svmx nosvm\n"));
    }

    #[test]
    fn kvm_verdicts() {
        assert_eq!(
            judge_kvm(Ok(12), false, true),
            KvmStatus::Usable { api_version: 12 }
        );
        let pvm = judge_kvm(Ok(12), true, false);
        assert_eq!(
            pvm,
            KvmStatus::Unusable(KvmProblem::PvmOnly {
                pvm_module: true,
                cpu_virt_flags: false
            })
        );
        let msg = pvm.to_string();
        assert!(msg.contains("kvm_pvm"), "{msg}");
        assert!(
            msg.contains("QEMU will use TCG (software emulation)"),
            "{msg}"
        );
        // Module loaded alone is enough, and so is a CPU without the flags.
        assert!(!judge_kvm(Ok(12), true, true).is_usable());
        let no_flags = judge_kvm(Ok(12), false, false);
        assert!(no_flags.to_string().contains("no vmx/svm"), "{no_flags}");
        // Device problems are reported before the PVM verdict.
        assert_eq!(
            judge_kvm(Err(KvmProblem::Missing), true, false),
            KvmStatus::Unusable(KvmProblem::Missing)
        );
        let denied = judge_kvm(
            Err(KvmProblem::Open("Permission denied".into())),
            false,
            true,
        );
        assert!(denied.to_string().contains("Permission denied"), "{denied}");
    }

    #[test]
    fn kvm_on_this_host_is_consistent_with_its_files() {
        let status = kvm_status();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let flags =
            cpu_has_virt_flags(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let opens = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if pvm || !flags || !opens {
            assert!(!status.is_usable(), "{status}");
        }
        if opens {
            // An openable device answers KVM_GET_API_VERSION (always 12).
            assert!(
                !matches!(status, KvmStatus::Unusable(KvmProblem::ApiVersion(_))),
                "{status}"
            );
        }
        if opens && (pvm || !flags) {
            assert!(
                matches!(status, KvmStatus::Unusable(KvmProblem::PvmOnly { .. })),
                "{status}"
            );
        }
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(parse_cpuinfo_mhz_khz(CPUINFO_PVM), Some(2_445_404));
        assert_eq!(parse_cpuinfo_mhz_khz(CPUINFO_SVM), Some(3_600_000));
        assert_eq!(
            parse_cpuinfo_mhz_khz("cpu MHz : 1999.99999\n"),
            Some(1_999_999)
        );
        assert_eq!(parse_cpuinfo_mhz_khz("cpu MHz : fast\n"), None);
        assert_eq!(parse_cpuinfo_mhz_khz("processor : 0\n"), None);
    }

    #[test]
    fn tsc_from_kernel_log() {
        let dmesg = "[    0.000031] tsc: Detected 2445.404 MHz processor\n\
                     [    0.263032] clocksource: tsc: mask: 0xffffffffffffffff\n";
        assert_eq!(parse_kernel_log_tsc_khz(dmesg), Some(2_445_404));
        let kmsg = "6,31,31,-;tsc: Detected 2112.000 MHz processor\n\
                    6,900,1400000,-;tsc: Refined TSC clocksource calibration: 2111.998 MHz\n";
        assert_eq!(parse_kernel_log_tsc_khz(kmsg), Some(2_111_998));
        assert_eq!(
            parse_kernel_log_tsc_khz("6,1,1,-;Linux version 6.1\n"),
            None
        );
    }

    #[test]
    fn tsc_on_this_host() {
        // Every x86 Linux host has at least `cpu MHz`.
        let khz = tsc_khz().expect("TSC frequency");
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
    }

    #[test]
    fn qemu_versions() {
        let v = |a, b, c| {
            Some(Version {
                major: a,
                minor: b,
                patch: c,
            })
        };
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                 Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n"
            ),
            v(10, 0, 2)
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 8.2.2 (qemu-8.2.2-1.fc40)\n"),
            v(8, 2, 2)
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.1.50\n"),
            v(9, 1, 50)
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2\n"),
            v(7, 2, 0)
        );
        assert_eq!(parse_qemu_version("Firecracker v1.14.1\n"), None);
        assert_eq!(parse_qemu_version("QEMU emulator version x.y\n"), None);
        assert!(v(10, 0, 2) > v(9, 2, 4));
    }

    #[test]
    fn finds_binaries() {
        let sh = find_binary("sh", None).expect("sh in PATH");
        assert!(sh.is_absolute());
        assert_eq!(find_binary("ignored", Some(&sh)), Some(sh.clone()));
        // A bare configured name is looked up in PATH.
        assert_eq!(find_binary("ignored", Some(Path::new("sh"))), Some(sh));
        assert_eq!(find_binary("banger-no-such-binary", None), None);
        // A configured path that does not work is not replaced by PATH's.
        assert_eq!(find_binary("sh", Some(Path::new("/nonexistent/sh"))), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("qemu");
        std::fs::write(&plain, "not executable").expect("write");
        assert_eq!(find_binary("qemu", Some(&plain)), None);
    }
}
