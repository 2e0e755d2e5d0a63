//! Printing helpers shared by the commands.

use std::io::IsTerminal;

/// Exit status of a command that runs a guest command (`vm run`, `vm exec`,
/// `vm ssh`, `vm acp`) when banger itself failed, as docker's 125: the
/// guest command's own statuses pass through unchanged.
pub const EXIT_BANGER_FAILED: i32 = 125;

/// The exit status for a status that does not fit in one (outside 0..=255): a
/// failure, as `ExitStatus::shell_code` gives for a guest's out-of-range
/// status, whatever its sign.
pub const EXIT_OUT_OF_RANGE: u8 = 255;

/// The process's exit status for a command's `result`: its own status
/// when it ran, [`EXIT_OUT_OF_RANGE`] if that is outside 0..=255 (a
/// negative one must not read as success); when banger failed,
/// [`EXIT_BANGER_FAILED`] for the commands that pass a guest command's
/// status through (`passes_exit_status`), so it cannot pass for the
/// guest's, and 1 for the others.
pub fn exit_code<E>(result: &Result<i32, E>, passes_exit_status: bool) -> u8 {
    match result {
        Ok(code) => u8::try_from(*code).unwrap_or(EXIT_OUT_OF_RANGE),
        Err(_) if passes_exit_status => EXIT_BANGER_FAILED as u8,
        Err(_) => 1,
    }
}

/// What `--help` of those commands says about their exit status.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  the command's own (128+N when a signal N ended it)
  125  banger itself failed (the VM, the daemon, the connection)
  126  the command was found but cannot be executed
  127  the command was not found
  2    invalid arguments";

/// The error and its causes on one line, each cause once. Errors can
/// carry what a guest said (its agent's messages, console lines), so
/// control characters are shown escaped; newlines stay.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    printable_lines(&parts.join(": "))
}

/// `s` with control characters (terminal escape sequences, carriage
/// returns, newlines) and bidirectional overrides written as escapes
/// (`\u{1b}`): strings a guest supplies (file names, process and session
/// names) never reach the terminal raw.
pub fn printable(s: &str) -> String {
    clean(s, false)
}

/// Like [`printable`], keeping newlines and tabs (multi-line messages).
pub fn printable_lines(s: &str) -> String {
    clean(s, true)
}

/// Bidirectional marks and overrides: they reorder what a terminal shows.
fn is_bidi(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn clean(s: &str, keep_lines: bool) -> String {
    let unsafe_char =
        |c: char| (c.is_control() && !(keep_lines && (c == '\n' || c == '\t'))) || is_bidi(c);
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A line of a long operation's progress: `[ 12.3s] phase: message`. The
/// message may quote a guest (its agent's errors, its boot state), so it
/// is made [`printable_lines`].
pub fn progress_line(elapsed_ms: u64, phase: &str, message: &str) -> String {
    format!(
        "[{:>5.1}s] {}: {}",
        elapsed_ms as f64 / 1000.0,
        printable(phase),
        printable_lines(message)
    )
}

/// Makes a guest's byte stream (its console log) safe to show on a
/// terminal, piece by piece: text, newlines, tabs, carriage returns and
/// colour (SGR) sequences pass; any other control character or escape
/// sequence is shown escaped, so a console line cannot move the cursor,
/// set the window title, write the clipboard or make the terminal answer
/// on the user's input. Invalid UTF-8 becomes U+FFFD.
#[derive(Debug, Default)]
pub struct TerminalFilter {
    /// An escape sequence or character cut by the end of the last piece.
    pending: Vec<u8>,
}

/// Longest colour sequence kept whole; a longer one is shown escaped.
const MAX_SGR: usize = 64;

impl TerminalFilter {
    /// The safe form of `chunk`, which continues the earlier ones.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            if b == 0x1b {
                match sgr_len(&buf[i..]) {
                    Some(Some(n)) => {
                        out.extend_from_slice(&buf[i..i + n]);
                        i += n;
                    }
                    Some(None) => {
                        self.pending = buf[i..].to_vec();
                        break;
                    }
                    None => {
                        out.extend_from_slice(b"\\u{1b}");
                        i += 1;
                    }
                }
            } else if b < 0x80 {
                if b.is_ascii_control() && !matches!(b, b'\n' | b'\t' | b'\r') {
                    out.extend(char::from(b).escape_default().to_string().bytes());
                } else {
                    out.push(b);
                }
                i += 1;
            } else {
                let rest = &buf[i..];
                let len = match b {
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => 1,
                };
                if rest.len() < len && len > 1 {
                    self.pending = rest.to_vec();
                    break;
                }
                match std::str::from_utf8(&rest[..len])
                    .ok()
                    .and_then(|s| s.chars().next())
                {
                    Some(c) if c.is_control() || is_bidi(c) => {
                        out.extend(c.escape_default().to_string().bytes());
                    }
                    Some(_) => out.extend_from_slice(&rest[..len]),
                    None => {
                        // Only this byte: what follows may be good text.
                        out.extend_from_slice("\u{fffd}".as_bytes());
                        i += 1;
                        continue;
                    }
                }
                i += len;
            }
        }
        out
    }

    /// What a cut-off sequence at the very end left, shown escaped.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        printable(&rest).into_bytes()
    }
}

/// At an escape character: `Some(Some(n))` when a colour sequence of `n`
/// bytes starts here, `Some(None)` when `s` may be the start of one that
/// the next piece completes, `None` when it is something else.
fn sgr_len(s: &[u8]) -> Option<Option<usize>> {
    if s.len() < 2 {
        return Some(None);
    }
    if s[1] != b'[' {
        return None;
    }
    for (j, &b) in s.iter().enumerate().skip(2).take(MAX_SGR) {
        match b {
            b'0'..=b'9' | b';' => {}
            b'm' => return Some(Some(j + 1)),
            _ => return None,
        }
    }
    if s.len() < MAX_SGR + 2 {
        Some(None)
    } else {
        None
    }
}

/// [`progress_line`] of an operation's progress event.
pub fn progress_event(p: &banger_api::Progress) -> String {
    progress_line(p.elapsed_ms, p.phase.as_str(), &p.message)
}

/// [`progress_line`] of an operation's warning, shown as a `warning` phase.
pub fn warning_event(w: &banger_api::Warning) -> String {
    progress_line(w.elapsed_ms, "warning", &w.message)
}

/// Whether progress chatter should go to stderr.
pub fn chatty() -> bool {
    std::io::stderr().is_terminal()
}

/// Prints rows as aligned columns; the first row is the header. Cells are
/// made [`printable`].
pub fn table(rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i + 1 == r.len() {
                    s.clone()
                } else {
                    format!("{s:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `--json` or `-q/--quiet` of list commands.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Print only the names, one per line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl ListArgs {
    /// Prints `items` as JSON, as names, or with `table`.
    pub fn print<T: serde::Serialize>(
        &self,
        items: &[T],
        name: impl Fn(&T) -> String,
        table: impl FnOnce(&[T]),
    ) -> anyhow::Result<()> {
        if self.json {
            json(&items)?;
        } else if self.quiet {
            for i in items {
                println!("{}", name(i));
            }
        } else {
            table(items);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_stream_keeps_text_and_colour_and_loses_its_escapes() {
        let mut f = TerminalFilter::default();
        let mut out = Vec::new();
        // Cut at every byte: a sequence or character split between pieces
        // comes out as if whole.
        let input = "\u{1b}[0;32m  OK  \u{1b}[0m] Started x.\r\n\
                     title\u{1b}]0;pwned\u{7} clip\u{1b}]52;c;aGk=\u{7} \
                     up\u{1b}[2A ask\u{1b}[6n bell\u{7} grün \u{202e}rtl\n";
        for b in input.as_bytes() {
            out.extend(f.push(std::slice::from_ref(b)));
        }
        out.extend(f.finish());
        let shown = String::from_utf8(out).expect("utf8");
        assert_eq!(
            shown,
            "\u{1b}[0;32m  OK  \u{1b}[0m] Started x.\r\n\
             title\\u{1b}]0;pwned\\u{7} clip\\u{1b}]52;c;aGk=\\u{7} \
             up\\u{1b}[2A ask\\u{1b}[6n bell\\u{7} grün \\u{202e}rtl\n"
        );
        // Bad UTF-8 is replaced byte by byte; a trailing escape is shown.
        let mut f = TerminalFilter::default();
        let mut out = f.push(b"a\xc3(b\x1b");
        out.extend(f.finish());
        assert_eq!(String::from_utf8(out).expect("utf8"), "a\u{fffd}(b\\u{1b}");
    }

    #[test]
    fn progress_lines_escape_what_a_guest_said() {
        let line = progress_line(1500, "boot", "state \u{1b}]0;x\u{7}running");
        assert_eq!(line, "[  1.5s] boot: state \\u{1b}]0;x\\u{7}running");
    }

    #[test]
    fn exit_codes_pass_the_guest_s_and_mark_banger_s_failures() {
        let failed: Result<i32, &str> = Err("daemon gone");
        assert_eq!(exit_code(&failed, true), 125);
        assert_eq!(exit_code(&failed, false), 1);
        for passes in [true, false] {
            for code in 0..=255u8 {
                assert_eq!(exit_code(&Ok::<i32, ()>(code.into()), passes), code);
            }
            for out_of_range in [256, 300, i32::MAX, -1, -255, -256, i32::MIN] {
                assert_eq!(
                    exit_code(&Ok::<i32, ()>(out_of_range), passes),
                    255,
                    "status {out_of_range}"
                );
            }
        }
    }

    #[test]
    fn progress_and_warnings_share_one_line_format() {
        let p = banger_api::Progress {
            phase: banger_api::Step::Download,
            message: "40% of 1000 bytes".into(),
            elapsed_ms: 1234,
        };
        assert_eq!(progress_event(&p), "[  1.2s] download: 40% of 1000 bytes");
        let w = banger_api::Warning {
            message: "kernel k gets no banger initramfs".into(),
            elapsed_ms: 65_050,
        };
        assert_eq!(
            warning_event(&w),
            "[ 65.0s] warning: kernel k gets no banger initramfs"
        );
    }

    #[test]
    fn chain_dedups_repeated_causes() {
        let e = anyhow::anyhow!("disk full").context("creating root disk");
        assert_eq!(error_chain(&e), "creating root disk: disk full");
    }

    #[test]
    fn guest_strings_lose_their_control_characters() {
        // A process name that would clear the screen and retitle the window.
        let evil = "python3\x1b[2J\x1b]0;pwned\x07\rok\u{202e}txt.exe";
        let shown = printable(evil);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            "python3\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\rok\\u{202e}txt.exe"
        );
        assert_eq!(printable("plain name-1.txt"), "plain name-1.txt");
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(printable_lines("a\nb\tc\x1b"), "a\nb\tc\\u{1b}");
        let e = anyhow::anyhow!("guest agent refused the request: \x1b[31mred");
        assert_eq!(
            error_chain(&e),
            "guest agent refused the request: \\u{1b}[31mred"
        );
    }
}
