use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string is not a valid VM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("VM name is empty")]
    Empty,
    #[error("VM name {0:?} is longer than {VM_NAME_MAX_LEN} characters")]
    TooLong(String),
    #[error(
        "VM name {0:?} is not a DNS label: use lowercase letters, digits and '-', not starting or ending with '-'"
    )]
    NotDnsLabel(String),
}

/// Longest VM name (a DNS label).
pub const VM_NAME_MAX_LEN: usize = 63;
/// The characters of a VM name, as the API document states them (with
/// 1 to [`VM_NAME_MAX_LEN`] characters); `banger_api::rules` checks that
/// this pattern and [`VmName::parse`] agree.
pub const VM_NAME_PATTERN: &str = "^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$";

/// A VM name: a DNS label (RFC 1123, lowercase), so `<name>.vm` resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Validates `s` as a DNS label.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > VM_NAME_MAX_LEN {
            return Err(NameError::TooLong(s.to_string()));
        }
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_chars || s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::NotDnsLabel(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

const ADJECTIVES: &[&str] = &[
    "calm", "brave", "bright", "quiet", "swift", "lucky", "gentle", "bold", "eager", "fuzzy",
    "happy", "jolly", "keen", "mellow", "nimble", "proud", "rapid", "sunny", "tidy", "witty",
    "amber", "crisp", "dusty", "frosty", "golden", "hidden", "misty", "silver", "steady", "wild",
];
const NOUNS: &[&str] = &[
    "otter", "falcon", "badger", "heron", "lynx", "panda", "raven", "tiger", "walrus", "yak",
    "bison", "crane", "dingo", "ferret", "gecko", "ibis", "koala", "lemur", "marten", "newt",
    "ocelot", "puffin", "quokka", "robin", "salmon", "tapir", "urchin", "vole", "wombat", "zebra",
];

/// A random adjective-noun name such as `calm-otter`.
pub fn generate_name() -> VmName {
    let mut rng = rand::rng();
    let a = ADJECTIVES.choose(&mut rng).copied().unwrap_or("calm");
    let n = NOUNS.choose(&mut rng).copied().unwrap_or("otter");
    VmName(format!("{a}-{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "calm-otter", "web-1", "x0", &"a".repeat(63)] {
            assert!(VmName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_non_labels() {
        assert_eq!(VmName::parse(""), Err(NameError::Empty));
        assert!(matches!(
            VmName::parse(&"a".repeat(64)),
            Err(NameError::TooLong(_))
        ));
        for bad in [
            "-a",
            "a-",
            "Upper",
            "under_score",
            "dot.ted",
            "spa ce",
            "ümlaut",
        ] {
            assert!(
                matches!(VmName::parse(bad), Err(NameError::NotDnsLabel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..100 {
            let n = generate_name();
            assert!(VmName::parse(n.as_str()).is_ok());
            assert_eq!(n.as_str().split('-').count(), 2);
        }
    }
}
