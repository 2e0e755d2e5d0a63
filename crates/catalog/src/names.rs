//! Checks on names and digests that end up in paths and URLs.

use sha2::{Digest, Sha256};

/// A catalog name: 1 to 63 characters a-z, 0-9, `.`, `_` and `-`, starting
/// with a letter or digit (`debian-bookworm`, `generic-6.12`). Names become
/// directory and file names, so nothing else is accepted.
pub(crate) fn is_valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

pub(crate) const NAME_RULE: &str =
    "use 1 to 63 characters a-z, 0-9, '.', '_' and '-', starting with a letter or digit";

/// A sha256 digest written as 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex of a finished hash.
pub(crate) fn hex_digest(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_become_paths() {
        for ok in ["debian-bookworm", "generic-6.12", "a", "x_1", "9lives"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            ".hidden",
            "A",
            "a/b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn sha256_hex_is_strict() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_sha256_hex(&"ab".repeat(31)));
        assert!(!is_sha256_hex(&"zz".repeat(32)));
        assert_eq!(
            hex_digest(Sha256::new()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
