//! Who built this binary, from which commit, when.

use serde::{Deserialize, Serialize};

/// Build identity of a banger binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildInfo {
    /// `v0.1.0` for a tagged build, `v0.1.0-dev` otherwise.
    pub version: String,
    /// Full git commit, or `unknown` outside a git checkout.
    pub commit: String,
    /// Build time, RFC 3339 UTC.
    pub built_at: String,
}

impl BuildInfo {
    /// The identity of the running binary.
    pub fn current() -> Self {
        let tag = env!("BANGER_TAG");
        let version = if tag.is_empty() {
            format!("v{}-dev", env!("CARGO_PKG_VERSION"))
        } else {
            tag.to_string()
        };
        let epoch: u64 = env!("BANGER_BUILD_EPOCH").parse().unwrap_or(0);
        Self {
            version,
            commit: env!("BANGER_COMMIT").to_string(),
            built_at: rfc3339_utc(epoch),
        }
    }

    pub fn short_commit(&self) -> &str {
        &self.commit[..self.commit.len().min(8)]
    }

    /// One line: `banger v0.1.0 (commit abcd1234, built 2026-04-28T20:45:50Z)`.
    pub fn line(&self, program: &str) -> String {
        format!(
            "{program} {} (commit {}, built {})",
            self.version,
            self.short_commit(),
            self.built_at
        )
    }
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days).
pub fn rfc3339_utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_777_409_150), "2026-04-28T20:45:50Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn line_has_three_parts() {
        let b = BuildInfo {
            version: "v0.1.0".into(),
            commit: "abcd1234ef".into(),
            built_at: "2026-04-28T20:45:50Z".into(),
        };
        assert_eq!(
            b.line("banger"),
            "banger v0.1.0 (commit abcd1234, built 2026-04-28T20:45:50Z)"
        );
    }
}
