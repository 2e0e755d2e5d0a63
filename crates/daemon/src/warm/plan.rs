//! The warm-or-cold decision of one create: pure, so every combination of
//! config, request, backend and template state is tested in a table.

use banger_model::{WarmMode, WarmSetting};
use std::fmt;

/// What looking for a template of the VM's image and shape found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup<T> {
    /// A current template that opened cleanly; `disk_bytes` is its disks' size.
    Found { template: T, disk_bytes: u64 },
    /// None of this image and shape.
    Missing,
    /// One exists but was made for something else (what changed).
    Stale(String),
    /// One exists but is damaged ([`super::header::TemplateError`]).
    Refused(String),
}

/// Why a create boots cold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ColdReason {
    /// `--no-warm`.
    NotAsked,
    /// `warm_start = "off"`.
    ConfigOff,
    /// The backend cannot restore (its words).
    Unsupported(String),
    /// No template of this image and shape.
    Missing,
    Stale(String),
    Refused(String),
    /// The VM asks for smaller disks than the template's.
    DiskSmaller {
        template_bytes: u64,
    },
}

impl ColdReason {
    /// Whether a template for this image and shape is worth (re)building.
    pub(crate) fn wants_template(&self) -> bool {
        matches!(
            self,
            ColdReason::Missing | ColdReason::Stale(_) | ColdReason::Refused(_)
        )
    }
}

impl fmt::Display for ColdReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColdReason::NotAsked => f.write_str("--no-warm"),
            ColdReason::ConfigOff => f.write_str("warm_start = \"off\""),
            ColdReason::Unsupported(why) => write!(f, "warm starts unavailable: {why}"),
            ColdReason::Missing => f.write_str("no template for this image and shape yet"),
            ColdReason::Stale(why) => write!(f, "template out of date ({why})"),
            ColdReason::Refused(why) => write!(f, "template refused ({why})"),
            ColdReason::DiskSmaller { template_bytes } => write!(
                f,
                "disk smaller than the template's {}: disks only grow",
                banger_model::ByteSize(*template_bytes)
            ),
        }
    }
}

/// How a create starts its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartPlan<T> {
    Warm(T),
    Cold(ColdReason),
}

/// Decides warm or cold. `support` is the backend's answer (`Err(why)`
/// when it cannot restore); `lookup` runs only when its answer matters.
/// A `Cold` plan under [`WarmMode::Require`] is the caller's error.
pub(crate) fn choose_start<T>(
    setting: WarmSetting,
    mode: WarmMode,
    support: Result<(), &str>,
    lookup: impl FnOnce() -> Lookup<T>,
    req_disk: u64,
) -> StartPlan<T> {
    if mode == WarmMode::Off {
        return StartPlan::Cold(ColdReason::NotAsked);
    }
    if setting == WarmSetting::Off {
        return StartPlan::Cold(ColdReason::ConfigOff);
    }
    if let Err(why) = support {
        return StartPlan::Cold(ColdReason::Unsupported(why.to_string()));
    }
    match lookup() {
        Lookup::Found {
            template,
            disk_bytes,
        } => {
            if req_disk < disk_bytes {
                StartPlan::Cold(ColdReason::DiskSmaller {
                    template_bytes: disk_bytes,
                })
            } else {
                StartPlan::Warm(template)
            }
        }
        Lookup::Missing => StartPlan::Cold(ColdReason::Missing),
        Lookup::Stale(why) => StartPlan::Cold(ColdReason::Stale(why)),
        Lookup::Refused(why) => StartPlan::Cold(ColdReason::Refused(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn decision_table() {
        use ColdReason as C;
        use StartPlan::{Cold, Warm};
        use WarmMode as M;
        use WarmSetting as S;
        let found = || Lookup::Found {
            template: "t",
            disk_bytes: 8 * G,
        };
        type Case = (
            S,
            M,
            Result<(), &'static str>,
            fn() -> Lookup<&'static str>,
            u64,
            StartPlan<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (S::Auto, M::Auto, Ok(()), found, 8 * G, Warm("t")),
            (S::Manual, M::Auto, Ok(()), found, 8 * G, Warm("t")),
            (S::Auto, M::Require, Ok(()), found, 16 * G, Warm("t")),
            (S::Auto, M::Off, Ok(()), found, 8 * G, Cold(C::NotAsked)),
            (S::Off, M::Auto, Ok(()), found, 8 * G, Cold(C::ConfigOff)),
            (S::Off, M::Require, Ok(()), found, 8 * G, Cold(C::ConfigOff)),
            (
                S::Auto,
                M::Auto,
                Err("QEMU 7.2 has no x-ignore-shared"),
                found,
                8 * G,
                Cold(C::Unsupported("QEMU 7.2 has no x-ignore-shared".into())),
            ),
            (
                S::Auto,
                M::Auto,
                Ok(()),
                || Lookup::Missing,
                8 * G,
                Cold(C::Missing),
            ),
            (
                S::Manual,
                M::Require,
                Ok(()),
                || Lookup::Stale("kernel changed".into()),
                8 * G,
                Cold(C::Stale("kernel changed".into())),
            ),
            (
                S::Auto,
                M::Auto,
                Ok(()),
                || Lookup::Refused("truncated".into()),
                8 * G,
                Cold(C::Refused("truncated".into())),
            ),
            (
                S::Auto,
                M::Auto,
                Ok(()),
                found,
                4 * G,
                Cold(C::DiskSmaller {
                    template_bytes: 8 * G,
                }),
            ),
        ];
        for (setting, mode, support, lookup, disk, want) in cases {
            assert_eq!(
                choose_start(setting, mode, support, lookup, disk),
                want,
                "{setting:?} {mode:?} {support:?} {disk}"
            );
        }
    }

    #[test]
    fn lookup_runs_only_when_it_matters() {
        let never = || -> Lookup<()> { panic!("looked up") };
        choose_start(WarmSetting::Auto, WarmMode::Off, Ok(()), never, 0);
        choose_start(WarmSetting::Off, WarmMode::Auto, Ok(()), never, 0);
        choose_start(WarmSetting::Auto, WarmMode::Auto, Err("no"), never, 0);
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            ColdReason::DiskSmaller {
                template_bytes: 8 * G
            }
            .to_string(),
            "disk smaller than the template's 8G: disks only grow"
        );
        assert!(ColdReason::Missing.wants_template());
        assert!(!ColdReason::NotAsked.wants_template());
        assert!(!ColdReason::DiskSmaller { template_bytes: 1 }.wants_template());
    }
}
