//! Printing helpers shared by the commands.

use std::io::IsTerminal;

/// Exit status of a command that runs a guest command (`vm run`, `vm exec`,
/// `vm ssh`, `vm acp`) when banger itself failed, as docker's 125: the
/// guest command's own statuses pass through unchanged.
pub const EXIT_BANGER_FAILED: i32 = 125;

/// What `--help` of those commands says about their exit status.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  the command's own (128+N when a signal N ended it)
  125  banger itself failed (the VM, the daemon, the connection)
  126  the command was found but cannot be executed
  127  the command was not found
  2    invalid arguments";

/// The error and its causes on one line, each cause once.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Whether progress chatter should go to stderr.
pub fn chatty() -> bool {
    std::io::stderr().is_terminal()
}

/// Prints rows as aligned columns; the first row is the header.
pub fn table(rows: &[Vec<String>]) {
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
    for r in rows {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_dedups_repeated_causes() {
        let e = anyhow::anyhow!("disk full").context("creating root disk");
        assert_eq!(error_chain(&e), "creating root disk: disk full");
    }
}
