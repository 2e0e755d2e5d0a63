//! Which Firecracker versions banger works with.

use crate::host::{HostError, Version};
use std::fmt;
use std::path::Path;

/// Oldest Firecracker banger supports: every API call it makes
/// (`/entropy` included) exists from here on.
pub const MIN_SUPPORTED: Version = Version {
    major: 1,
    minor: 5,
    patch: 0,
};

/// Newest Firecracker banger has been tested with (its API description is
/// in `../shared/reference/`).
pub const TESTED: Version = Version {
    major: 1,
    minor: 14,
    patch: 1,
};

/// How a Firecracker version relates to what banger supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionVerdict {
    /// Between [`MIN_SUPPORTED`] and [`TESTED`].
    Supported(Version),
    /// Newer than [`TESTED`]: likely fine, Firecracker keeps its v1 API.
    UntestedNewer(Version),
    /// Older than [`MIN_SUPPORTED`]: some API calls banger makes are missing.
    TooOld(Version),
    /// `firecracker --version` failed or printed something unexpected.
    Unknown(String),
}

impl VersionVerdict {
    /// Whether banger should use this binary.
    pub fn is_usable(&self) -> bool {
        matches!(
            self,
            VersionVerdict::Supported(_) | VersionVerdict::UntestedNewer(_)
        )
    }
}

impl fmt::Display for VersionVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionVerdict::Supported(v) => write!(f, "v{v} (supported)"),
            VersionVerdict::UntestedNewer(v) => write!(
                f,
                "v{v} is newer than the tested v{TESTED}; it should work, report problems"
            ),
            VersionVerdict::TooOld(v) => write!(
                f,
                "v{v} is too old: banger needs Firecracker v{MIN_SUPPORTED} or newer (tested with v{TESTED})"
            ),
            VersionVerdict::Unknown(why) => write!(f, "version unknown: {why}"),
        }
    }
}

/// Places a version in the supported range.
pub fn judge_version(v: Version) -> VersionVerdict {
    if v < MIN_SUPPORTED {
        VersionVerdict::TooOld(v)
    } else if v > TESTED {
        VersionVerdict::UntestedNewer(v)
    } else {
        VersionVerdict::Supported(v)
    }
}

/// Parses the first line of `firecracker --version`: `Firecracker v1.14.1`
/// (a suffix such as `-dev` is ignored).
pub fn parse_firecracker_version(text: &str) -> Option<Version> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let mut words = line.split_whitespace();
    if words.next()? != "Firecracker" {
        return None;
    }
    let word = words.next()?;
    let word = word.strip_prefix('v').unwrap_or(word);
    let core = word.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let mut num = || parts.next()?.parse::<u32>().ok();
    let (major, minor, patch) = (num()?, num()?, num()?);
    Some(Version {
        major,
        minor,
        patch,
    })
}

/// Runs `<bin> --version` and parses it.
pub fn firecracker_version(bin: &Path) -> Result<Version, HostError> {
    crate::host::binary_version(bin, parse_firecracker_version)
}

/// Runs `<bin> --version` and judges the answer.
pub fn check_version(bin: &Path) -> VersionVerdict {
    match firecracker_version(bin) {
        Ok(v) => judge_version(v),
        Err(e) => VersionVerdict::Unknown(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn parses_version_output() {
        let out = "Firecracker v1.14.1\n\nSupported snapshot data format versions: v8.0.0\n";
        assert_eq!(parse_firecracker_version(out), Some(v(1, 14, 1)));
        assert_eq!(
            parse_firecracker_version("Firecracker v1.7.0-dev\n"),
            Some(v(1, 7, 0))
        );
        assert_eq!(
            parse_firecracker_version("\nFirecracker 1.5.0\n"),
            Some(v(1, 5, 0))
        );
        assert_eq!(parse_firecracker_version("Firecracker v1.14\n"), None);
        assert_eq!(parse_firecracker_version("Firecracker vX.Y.Z\n"), None);
        assert_eq!(
            parse_firecracker_version("QEMU emulator version 10.0.2\n"),
            None
        );
        assert_eq!(parse_firecracker_version(""), None);
    }

    #[test]
    fn verdicts_cover_the_range() {
        assert_eq!(
            judge_version(v(1, 5, 0)),
            VersionVerdict::Supported(v(1, 5, 0))
        );
        assert_eq!(
            judge_version(v(1, 14, 1)),
            VersionVerdict::Supported(v(1, 14, 1))
        );
        assert_eq!(
            judge_version(v(1, 14, 2)),
            VersionVerdict::UntestedNewer(v(1, 14, 2))
        );
        assert_eq!(
            judge_version(v(2, 0, 0)),
            VersionVerdict::UntestedNewer(v(2, 0, 0))
        );
        assert_eq!(
            judge_version(v(1, 4, 9)),
            VersionVerdict::TooOld(v(1, 4, 9))
        );
        assert_eq!(
            judge_version(v(0, 25, 0)),
            VersionVerdict::TooOld(v(0, 25, 0))
        );
        assert!(judge_version(v(1, 10, 0)).is_usable());
        assert!(judge_version(v(1, 15, 0)).is_usable());
        assert!(!judge_version(v(1, 4, 0)).is_usable());
        assert!(!VersionVerdict::Unknown("x".into()).is_usable());
        let old = judge_version(v(1, 4, 0)).to_string();
        assert!(old.contains("v1.5.0 or newer"), "{old}");
    }

    #[test]
    fn unrunnable_binary_is_unknown() {
        let verdict = check_version(Path::new("/nonexistent/firecracker"));
        assert!(matches!(verdict, VersionVerdict::Unknown(_)), "{verdict:?}");
    }
}
