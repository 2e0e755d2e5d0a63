//! The unfinished line of output a guest is printing, bounded.

/// Longest unfinished line kept, bytes: output that never ends a line
/// keeps its last bytes instead of growing without limit.
pub const MAX_LINE: usize = 4096;

/// The bytes of a line not yet ended: at most its last [`MAX_LINE`], and
/// whether its start was cut. Appending looks only at the new bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialLine {
    bytes: Vec<u8>,
    cut: bool,
}

impl PartialLine {
    /// Adds bytes to the line, keeping its last [`MAX_LINE`].
    pub fn append(&mut self, bytes: &[u8]) {
        let keep = &bytes[bytes.len().saturating_sub(MAX_LINE)..];
        self.cut |= keep.len() < bytes.len();
        self.bytes.extend_from_slice(keep);
        let over = self.bytes.len().saturating_sub(MAX_LINE);
        if over > 0 {
            self.bytes.drain(..over);
            self.cut = true;
        }
    }

    /// The bytes kept.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Starts the next line.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.cut = false;
    }

    /// The line as `render` makes it text, marked `…` when its start was
    /// cut (and it is not empty).
    pub fn text(&self, render: impl FnOnce(&[u8]) -> String) -> String {
        let text = render(&self.bytes);
        if self.cut && !text.is_empty() {
            format!("…{text}")
        } else {
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn a_line_keeps_its_last_bytes_and_says_it_was_cut() {
        let mut l = PartialLine::default();
        l.append(b"short");
        assert_eq!(l.text(lossy), "short");
        for _ in 0..10 {
            l.append(&[b'x'; 1000]);
        }
        l.append(b"end");
        assert_eq!(l.bytes().len(), MAX_LINE);
        let text = l.text(lossy);
        assert!(
            text.starts_with("…xxx") && text.ends_with("xxend"),
            "{text}"
        );
        // One piece longer than the bound alone.
        let mut l = PartialLine::default();
        l.append(&[b'y'; MAX_LINE + 1]);
        assert_eq!(l.bytes().len(), MAX_LINE);
        assert!(l.text(lossy).starts_with('…'));
        l.clear();
        assert!(l.is_empty());
        assert_eq!(l.text(lossy), "");
        l.append(b"next");
        assert_eq!(l.text(lossy), "next", "a new line starts uncut");
    }
}
