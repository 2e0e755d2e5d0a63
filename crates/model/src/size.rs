use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a size string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: use a number with an optional K, M, G or T suffix (powers of 1024), e.g. \"16G\""
)]
pub struct SizeError(pub String);

/// A size in bytes, written by people as `8G`, `512M`, `1024K` or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Num(u64),
    Str(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = SizeError;
    fn try_from(r: SizeRepr) -> Result<Self, SizeError> {
        match r {
            SizeRepr::Num(n) => Ok(ByteSize(n)),
            SizeRepr::Str(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn gib(n: u64) -> Self {
        ByteSize(n * Self::GIB)
    }
    pub fn mib(n: u64) -> Self {
        ByteSize(n * Self::MIB)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
    pub fn as_mib(self) -> u64 {
        self.0 / Self::MIB
    }
}

impl std::str::FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, SizeError> {
        let err = || SizeError(s.to_string());
        let t = s.trim();
        let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            None => (t, 1),
            Some((i, _)) => {
                let suffix = t[i..].trim().to_ascii_uppercase();
                let suffix = suffix
                    .strip_suffix("IB")
                    .or(suffix.strip_suffix('B'))
                    .unwrap_or(&suffix);
                let mult = match suffix {
                    "" => 1,
                    "K" => Self::KIB,
                    "M" => Self::MIB,
                    "G" => Self::GIB,
                    "T" => Self::GIB * 1024,
                    _ => return Err(err()),
                };
                (&t[..i], mult)
            }
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        n.checked_mul(mult).map(ByteSize).ok_or_else(err)
    }
}

impl ByteSize {
    /// Approximate, for people: `11.8M`, `2.0G`, `512` (one decimal).
    pub fn human(self) -> String {
        let b = self.0 as f64;
        for (unit, m) in [
            ("T", Self::GIB * 1024),
            ("G", Self::GIB),
            ("M", Self::MIB),
            ("K", Self::KIB),
        ] {
            if self.0 >= m {
                return format!("{:.1}{unit}", b / m as f64);
            }
        }
        format!("{}", self.0)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, m) in [
            ("T", Self::GIB * 1024),
            ("G", Self::GIB),
            ("M", Self::MIB),
            ("K", Self::KIB),
        ] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{unit}", b / m);
            }
        }
        write!(f, "{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("16G".parse::<ByteSize>(), Ok(ByteSize::gib(16)));
        assert_eq!("512M".parse::<ByteSize>(), Ok(ByteSize::mib(512)));
        assert_eq!("2GiB".parse::<ByteSize>(), Ok(ByteSize::gib(2)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("1k".parse::<ByteSize>(), Ok(ByteSize(1024)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "G", "12X", "-1G", "1.5G", "99999999999999999999T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn displays_round_units() {
        assert_eq!(ByteSize::gib(8).to_string(), "8G");
        assert_eq!(ByteSize::mib(1536).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn human_is_approximate_with_one_decimal() {
        assert_eq!(ByteSize(12_373_196).human(), "11.8M");
        assert_eq!(ByteSize::gib(2).human(), "2.0G");
        assert_eq!(ByteSize(512).human(), "512");
        assert_eq!(ByteSize(1536).human(), "1.5K");
    }
}
