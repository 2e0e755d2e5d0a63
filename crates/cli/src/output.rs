//! Printing helpers shared by the commands.

use std::io::IsTerminal;

/// Exit status of a command that runs a guest command (`vm run`, `vm exec`,
/// `vm ssh`, `vm acp`) when banger itself failed, as docker's 125: the
/// guest command's own statuses pass through unchanged.
pub const EXIT_BANGER_FAILED: i32 = 125;

/// The process's exit status for a command's `result`: its own status
/// (clamped to 0..=255) when it ran; when banger failed,
/// [`EXIT_BANGER_FAILED`] for the commands that pass a guest command's
/// status through (`passes_exit_status`), so it cannot pass for the
/// guest's, and 1 for the others.
pub fn exit_code<E>(result: &Result<i32, E>, passes_exit_status: bool) -> u8 {
    match result {
        Ok(code) => (*code).clamp(0, 255) as u8,
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

fn clean(s: &str, keep_lines: bool) -> String {
    let unsafe_char = |c: char| {
        (c.is_control() && !(keep_lines && (c == '\n' || c == '\t')))
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
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

/// A line of a long operation's progress: `[ 12.3s] phase: message`.
pub fn progress_line(elapsed_ms: u64, phase: &str, message: &str) -> String {
    format!("[{:>5.1}s] {phase}: {message}", elapsed_ms as f64 / 1000.0)
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
    fn exit_codes_pass_the_guest_s_and_mark_banger_s_failures() {
        let failed: Result<i32, &str> = Err("daemon gone");
        assert_eq!(exit_code(&failed, true), 125);
        assert_eq!(exit_code(&failed, false), 1);
        for passes in [true, false] {
            assert_eq!(exit_code(&Ok::<i32, ()>(0), passes), 0);
            assert_eq!(exit_code(&Ok::<i32, ()>(127), passes), 127);
            assert_eq!(exit_code(&Ok::<i32, ()>(300), passes), 255);
            assert_eq!(exit_code(&Ok::<i32, ()>(-1), passes), 0);
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
