//! Which backend runs VMs on this host: the `vmm` setting plus host facts
//! (KVM, binaries, Firecracker's version) give a backend and a one-line
//! reason, or an error saying why and what to do.

use crate::firecracker::{FIRECRACKER_BINARY, FIRECRACKER_CONFIG_KEY, TESTED, VersionVerdict};
use crate::host::{self, KvmStatus};
use crate::qemu::{QEMU_BINARY, QEMU_CONFIG_KEY};
use crate::{Accel, FirecrackerVmm, QemuVmm, Vmm};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `vmm` setting of config.toml.
pub use banger_config::VmmChoice;

/// Why no backend could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("vmm = \"firecracker\" cannot be used: {0}")]
    FirecrackerUnusable(String),
    #[error("no usable VMM: {0}")]
    NoVmm(String),
}

/// A Firecracker binary and what its version means for banger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerFound {
    pub binary: PathBuf,
    pub version: VersionVerdict,
}

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub kvm: KvmStatus,
    pub firecracker: Option<FirecrackerFound>,
    /// `firecracker_bin` from config, for messages.
    pub firecracker_configured: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    /// `qemu_bin` from config, for messages.
    pub qemu_configured: Option<PathBuf>,
}

impl HostFacts {
    /// Probes KVM, looks the binaries up (configured paths first) and runs
    /// `firecracker --version` when there is one.
    pub fn probe(firecracker_bin: Option<&Path>, qemu_bin: Option<&Path>) -> Self {
        let firecracker = host::find_binary(FIRECRACKER_BINARY, firecracker_bin).map(|binary| {
            let version = crate::firecracker::check_version(&binary);
            FirecrackerFound { binary, version }
        });
        Self {
            kvm: host::kvm_status(),
            firecracker,
            firecracker_configured: firecracker_bin.map(Path::to_path_buf),
            qemu: host::find_binary(QEMU_BINARY, qemu_bin),
            qemu_configured: qemu_bin.map(Path::to_path_buf),
        }
    }

    /// Why Firecracker cannot run guests here, or None when it can.
    fn firecracker_problem(&self) -> Option<String> {
        if let KvmStatus::Unusable(problem) = &self.kvm {
            return Some(format!(
                "KVM is not usable ({problem}); Firecracker needs working KVM"
            ));
        }
        let Some(fc) = &self.firecracker else {
            let what = self.firecracker_configured.as_ref().map_or_else(
                || format!("{FIRECRACKER_BINARY} is not in PATH"),
                |p| {
                    format!(
                        "{FIRECRACKER_CONFIG_KEY} = {} is not an executable",
                        p.display()
                    )
                },
            );
            return Some(format!(
                "{what}; install Firecracker v{TESTED} from its GitHub release or set {FIRECRACKER_CONFIG_KEY}"
            ));
        };
        (!fc.version.is_usable()).then(|| format!("{}: {}", fc.binary.display(), fc.version))
    }

    fn qemu_missing(&self) -> String {
        match &self.qemu_configured {
            Some(p) => format!("{QEMU_CONFIG_KEY} = {} is not an executable", p.display()),
            None => format!(
                "{QEMU_BINARY} is not in PATH; install qemu-system-x86 or set {QEMU_CONFIG_KEY}"
            ),
        }
    }
}

/// The chosen backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Firecracker,
    Qemu(Accel),
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendKind::Firecracker => f.write_str("firecracker"),
            BackendKind::Qemu(accel) => write!(f, "qemu ({accel})"),
        }
    }
}

/// A backend, its binary, and why it was chosen (one line, for logs,
/// `banger doctor` and the daemon's info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: BackendKind,
    pub binary: PathBuf,
    pub reason: String,
}

impl Selection {
    /// The backend itself. QEMU also probes the host's TSC frequency here.
    pub fn into_vmm(self) -> Arc<dyn Vmm> {
        match self.kind {
            BackendKind::Firecracker => Arc::new(FirecrackerVmm::new(self.binary)),
            BackendKind::Qemu(accel) => {
                let tsc_khz = host::tsc_khz();
                if accel == Accel::Tcg && tsc_khz.is_none() {
                    tracing::warn!(
                        "host TSC frequency unknown: TCG guests may hang while calibrating their clock"
                    );
                }
                Arc::new(QemuVmm::new(self.binary, accel, tsc_khz))
            }
        }
    }
}

/// Applies the rules: `qemu` needs QEMU; `firecracker` needs usable KVM, the
/// binary and a supported version, else a clear error; `auto` takes
/// Firecracker when all of that holds, else QEMU (KVM or TCG).
pub fn select_backend(choice: VmmChoice, facts: &HostFacts) -> Result<Selection, SelectError> {
    let qemu = |why: String| -> Result<Selection, SelectError> {
        let accel = Accel::for_host(&facts.kvm);
        let binary = facts
            .qemu
            .clone()
            .ok_or_else(|| SelectError::NoVmm(format!("{why}; and {}", facts.qemu_missing())))?;
        // Said once: the reason for not using Firecracker may already be KVM.
        let kvm_note = match &facts.kvm {
            KvmStatus::Unusable(problem) if !why.contains("KVM is not usable") => {
                format!(" because KVM is not usable: {problem}")
            }
            _ => String::new(),
        };
        Ok(Selection {
            kind: BackendKind::Qemu(accel),
            binary,
            reason: format!("{why}; QEMU with {accel}{kvm_note}"),
        })
    };
    match choice {
        VmmChoice::Qemu => qemu("vmm = \"qemu\"".into()),
        VmmChoice::Firecracker => match (facts.firecracker_problem(), &facts.firecracker) {
            (None, Some(fc)) => Ok(Selection {
                kind: BackendKind::Firecracker,
                binary: fc.binary.clone(),
                reason: format!(
                    "vmm = \"firecracker\"; {} {}",
                    fc.binary.display(),
                    fc.version
                ),
            }),
            (Some(problem), _) => Err(SelectError::FirecrackerUnusable(format!(
                "{problem}; or set vmm = \"auto\" or \"qemu\""
            ))),
            (None, None) => Err(SelectError::FirecrackerUnusable(format!(
                "{FIRECRACKER_BINARY} not found"
            ))),
        },
        VmmChoice::Auto => match (facts.firecracker_problem(), &facts.firecracker) {
            (None, Some(fc)) => Ok(Selection {
                kind: BackendKind::Firecracker,
                binary: fc.binary.clone(),
                reason: format!(
                    "vmm = \"auto\"; KVM usable and {} {}",
                    fc.binary.display(),
                    fc.version
                ),
            }),
            (Some(problem), _) => qemu(format!("vmm = \"auto\"; not Firecracker: {problem}")),
            (None, None) => qemu("vmm = \"auto\"".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::judge_version;
    use crate::host::{KvmProblem, Version};

    const KVM: KvmStatus = KvmStatus::Usable { api_version: 12 };

    fn pvm() -> KvmStatus {
        KvmStatus::Unusable(KvmProblem::PvmOnly {
            pvm_module: true,
            cpu_virt_flags: false,
        })
    }

    fn fc(major: u32, minor: u32, patch: u32) -> Option<FirecrackerFound> {
        Some(FirecrackerFound {
            binary: "/usr/bin/firecracker".into(),
            version: judge_version(Version {
                major,
                minor,
                patch,
            }),
        })
    }

    fn facts(kvm: KvmStatus, firecracker: Option<FirecrackerFound>, qemu: bool) -> HostFacts {
        HostFacts {
            kvm,
            firecracker,
            firecracker_configured: None,
            qemu: qemu.then(|| PathBuf::from("/usr/bin/qemu-system-x86_64")),
            qemu_configured: None,
        }
    }

    fn kind(r: &Result<Selection, SelectError>) -> Result<BackendKind, &SelectError> {
        r.as_ref().map(|s| s.kind)
    }

    #[test]
    fn decision_table() {
        use BackendKind::{Firecracker as Fc, Qemu};
        use VmmChoice::{Auto, Firecracker, Qemu as Q};
        let fc_ok = || fc(1, 14, 1);
        let cases: Vec<(VmmChoice, HostFacts, Option<BackendKind>)> = vec![
            // auto
            (Auto, facts(KVM, fc_ok(), true), Some(Fc)),
            (Auto, facts(KVM, fc(1, 20, 0), true), Some(Fc)),
            (Auto, facts(KVM, fc_ok(), false), Some(Fc)),
            (Auto, facts(pvm(), fc_ok(), true), Some(Qemu(Accel::Tcg))),
            (Auto, facts(KVM, None, true), Some(Qemu(Accel::Kvm))),
            (Auto, facts(KVM, fc(1, 4, 0), true), Some(Qemu(Accel::Kvm))),
            (Auto, facts(pvm(), None, true), Some(Qemu(Accel::Tcg))),
            (Auto, facts(pvm(), fc_ok(), false), None),
            (Auto, facts(KVM, None, false), None),
            // firecracker
            (Firecracker, facts(KVM, fc_ok(), false), Some(Fc)),
            (Firecracker, facts(pvm(), fc_ok(), true), None),
            (Firecracker, facts(KVM, None, true), None),
            (Firecracker, facts(KVM, fc(1, 4, 0), true), None),
            // qemu
            (Q, facts(KVM, fc_ok(), true), Some(Qemu(Accel::Kvm))),
            (Q, facts(pvm(), fc_ok(), true), Some(Qemu(Accel::Tcg))),
            (Q, facts(KVM, fc_ok(), false), None),
        ];
        for (i, (choice, f, want)) in cases.into_iter().enumerate() {
            let got = select_backend(choice, &f);
            assert_eq!(kind(&got).ok(), want, "case {i}: {choice:?} → {got:?}");
        }
    }

    #[test]
    fn reasons_say_why() {
        let auto_pvm =
            select_backend(VmmChoice::Auto, &facts(pvm(), fc(1, 14, 1), true)).expect("qemu");
        assert!(auto_pvm.reason.contains("kvm_pvm"), "{}", auto_pvm.reason);
        assert!(
            auto_pvm.reason.contains("QEMU with tcg"),
            "{}",
            auto_pvm.reason
        );

        let auto_fc = select_backend(VmmChoice::Auto, &facts(KVM, fc(1, 14, 1), true)).expect("fc");
        assert_eq!(auto_fc.binary, PathBuf::from("/usr/bin/firecracker"));
        assert!(auto_fc.reason.contains("v1.14.1"), "{}", auto_fc.reason);

        let no_fc = select_backend(VmmChoice::Auto, &facts(KVM, None, true)).expect("qemu");
        assert!(
            no_fc.reason.contains("firecracker is not in PATH"),
            "{}",
            no_fc.reason
        );
        assert!(no_fc.reason.contains("QEMU with kvm"), "{}", no_fc.reason);
    }

    #[test]
    fn explicit_firecracker_errors_are_one_line_with_a_fix() {
        let e = select_backend(VmmChoice::Firecracker, &facts(pvm(), fc(1, 14, 1), true))
            .expect_err("pvm");
        let msg = e.to_string();
        assert!(msg.contains("KVM is not usable"), "{msg}");
        assert!(msg.contains("vmm = \"auto\""), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let mut f = facts(KVM, None, true);
        f.firecracker_configured = Some("/opt/fc/firecracker".into());
        let msg = select_backend(VmmChoice::Firecracker, &f)
            .expect_err("missing")
            .to_string();
        assert!(
            msg.contains("firecracker_bin = /opt/fc/firecracker"),
            "{msg}"
        );

        let msg = select_backend(VmmChoice::Firecracker, &facts(KVM, fc(1, 4, 0), true))
            .expect_err("old")
            .to_string();
        assert!(msg.contains("too old"), "{msg}");

        let msg = select_backend(VmmChoice::Auto, &facts(pvm(), None, false))
            .expect_err("nothing")
            .to_string();
        assert!(msg.starts_with("no usable VMM"), "{msg}");
        assert!(msg.contains("qemu-system-x86"), "{msg}");
    }

    #[test]
    fn this_host_never_picks_firecracker_without_kvm() {
        let f = HostFacts::probe(None, None);
        if !f.kvm.is_usable() {
            let r = select_backend(VmmChoice::Auto, &f);
            assert!(!matches!(kind(&r), Ok(BackendKind::Firecracker)), "{r:?}");
        }
    }
}
