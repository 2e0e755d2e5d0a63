//! Validated interface names.
//!
//! Names reach privileged code (and later a root helper), so they are checked
//! once, here, and carried as types: a [`TapName`] always starts with
//! [`TAP_PREFIX`], which is what lets banger delete TAPs without ever touching
//! an interface it did not make.

use std::fmt;
use std::str::FromStr;

/// Prefix of every TAP device banger creates.
pub const TAP_PREFIX: &str = "bgtap";

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A name that cannot be used for a banger interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interface name {name:?}: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

/// An interface name: 1 to 15 characters from `a-z`, `0-9` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("is empty")
        } else if name.len() > MAX_IFNAME_LEN {
            Some("is longer than 15 characters")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("may only contain a-z, 0-9 and '-'")
        } else if name.starts_with('-') {
            Some("must not start with '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NameError { name, reason }),
            None => Ok(Self(name)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IfName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// The name of a TAP device banger owns: an [`IfName`] starting with
/// [`TAP_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TapName(IfName);

impl TapName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = IfName::new(name)?;
        if name.as_str().len() <= TAP_PREFIX.len() || !name.as_str().starts_with(TAP_PREFIX) {
            return Err(NameError {
                name: name.0,
                reason: "is not a banger TAP name (bgtap followed by at least one character)",
            });
        }
        Ok(Self(name))
    }

    /// A fresh name, `bgtap` and 8 random hex digits (13 characters).
    pub fn random() -> Self {
        let n: u32 = rand::random();
        Self(IfName(format!("{TAP_PREFIX}{n:08x}")))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_ifname(&self) -> &IfName {
        &self.0
    }
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TapName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["banger0", "br-banger", "a", "abcdefghijklmno"] {
            assert!(IfName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "Banger0",
            "br_x",
            "a/b",
            "a b",
            "-x",
            "ä",
        ] {
            assert!(IfName::new(bad).is_err(), "{bad}");
        }
        let e = IfName::new("abcdefghijklmnop").expect_err("too long");
        assert_eq!(
            e.to_string(),
            "interface name \"abcdefghijklmnop\": is longer than 15 characters"
        );
    }

    #[test]
    fn tap_names_carry_the_prefix() {
        assert!(TapName::new("bgtap0").is_ok());
        assert!(TapName::new("bgtap").is_err());
        assert!(TapName::new("eth0").is_err());
        assert!(TapName::new("banger0").is_err());
        assert!(TapName::new("bgtap0123456789a").is_err());
        let r = TapName::random();
        assert_eq!(r.as_str().len(), 13);
        assert_eq!(TapName::new(r.as_str()), Ok(r));
    }
}
