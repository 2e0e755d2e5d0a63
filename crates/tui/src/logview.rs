//! The tail of a VM's log as printable lines.
//!
//! Serial consoles carry colour codes, cursor movement and `\r\n`; written
//! into the terminal as they are, they would move ratatui's cursor and
//! garble the screen, so every line is reduced to printable text.

use banger_model::PartialLine;
use std::collections::VecDeque;

/// Lines kept per log; older ones are dropped.
pub const MAX_LINES: usize = 2000;
/// The last [`MAX_LINES`] complete lines of a log plus the line being written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogView {
    lines: VecDeque<String>,
    /// Bytes after the last newline: a line, an escape sequence or a UTF-8
    /// character may be split across chunks.
    partial: PartialLine,
}

impl LogView {
    /// Appends a chunk of the log; only the chunk is scanned, never the
    /// unfinished line again.
    pub fn push(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            self.partial.append(&rest[..nl]);
            rest = &rest[nl + 1..];
            let text = self.line();
            // Lines that were only escape sequences (cursor moves, colour
            // resets between status lines) would show as blank lines.
            let only_escapes = text.is_empty() && self.partial.bytes().contains(&0x1b);
            self.partial.clear();
            if only_escapes {
                continue;
            }
            self.lines.push_back(text);
            if self.lines.len() > MAX_LINES {
                self.lines.pop_front();
            }
        }
        self.partial.append(rest);
    }

    /// The unfinished line as printable text, marked when its start was cut.
    fn line(&self) -> String {
        self.partial.text(printable)
    }

    /// The last `n` lines, oldest first, including the unfinished one.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let partial = (!self.partial.is_empty()).then(|| self.line());
        let total = self.lines.len() + usize::from(partial.is_some());
        let skip = total.saturating_sub(n);
        self.lines
            .iter()
            .cloned()
            .chain(partial)
            .skip(skip)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.partial.is_empty()
    }
}

/// `bytes` as one line of printable text: escape sequences and control
/// characters removed, tabs expanded, invalid UTF-8 replaced.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                // Character set selection takes one more character.
                Some('(' | ')' | '*' | '+') => {
                    chars.next();
                }
                _ => {}
            },
            '\t' => {
                let pad = 8 - out.chars().count() % 8;
                out.extend(std::iter::repeat_n(' ', pad));
            }
            // A carriage return in the middle of a line starts it over, as
            // on a terminal (progress bars).
            '\r' => {
                if chars.peek().is_some() {
                    out.clear();
                }
            }
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::MAX_LINE;

    #[test]
    fn strips_colours_and_crlf() {
        assert_eq!(
            printable(b"[  \x1b[0;32mOK\x1b[0m  ] Started ssh.service.\r"),
            "[  OK  ] Started ssh.service."
        );
        assert_eq!(printable(b"\x1b]0;title\x07prompt"), "prompt");
        assert_eq!(printable(b"a\tb"), "a       b");
        assert_eq!(printable(b"10%\r50%\r100%"), "100%");
        assert_eq!(printable(b"bell\x07\x00"), "bell");
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut v = LogView::default();
        v.push(b"first li");
        v.push(b"ne\r\nsec\xc3");
        v.push(b"\xa9ond \x1b[3");
        v.push(b"1mred\x1b[0m\nthird");
        assert_eq!(v.tail(10), ["first line", "sec\u{e9}ond red", "third"]);
        assert_eq!(v.tail(2), ["sec\u{e9}ond red", "third"]);
        v.push(b"\x1b[0m\r\n\nafter\n");
        assert_eq!(v.tail(3), ["third", "", "after"]);
    }

    #[test]
    fn keeps_only_the_last_lines() {
        let mut v = LogView::default();
        for i in 0..MAX_LINES + 10 {
            v.push(format!("line {i}\n").as_bytes());
        }
        let all = v.tail(usize::MAX);
        assert_eq!(all.len(), MAX_LINES);
        assert_eq!(all[0], "line 10");
    }

    #[test]
    fn a_line_without_newline_keeps_a_bounded_end() {
        let mut v = LogView::default();
        v.push(b"before\n");
        // A MiB without a newline, as a hostile guest console may print.
        for _ in 0..1024 {
            v.push(&[b'x'; 1024]);
        }
        assert!(
            v.partial.bytes().len() <= MAX_LINE,
            "{}",
            v.partial.bytes().len()
        );
        let tail = v.tail(2);
        assert_eq!(tail[0], "before");
        assert!(tail[1].starts_with("…xxx"), "{}", &tail[1][..10]);
        assert_eq!(tail[1].len(), '…'.len_utf8() + MAX_LINE);
        v.push(b"yz\nnext\n");
        let tail = v.tail(2);
        assert!(tail[0].starts_with('…') && tail[0].ends_with("xxyz"));
        assert_eq!(tail[0].len(), '…'.len_utf8() + MAX_LINE);
        assert_eq!(tail[1], "next");
    }
}
