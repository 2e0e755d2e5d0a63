//! The end of a guest's console (or VMM) log, for the messages that say
//! why a boot failed.

use std::path::Path;

/// The last `max` bytes of the file at `path` (all of it when smaller).
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut b = Vec::new();
    f.take(max).read_to_end(&mut b)?;
    Ok(b)
}

/// The last `n` lines of a console (or VMM) log, for error messages.
pub fn console_tail(path: &Path, n: usize) -> String {
    // The last 64 KiB hold the last 15 lines of any console worth reading.
    let text = read_tail(path, 64 * 1024)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A kernel panic's stack dump says nothing to a user; what led to it does.
    if let Some(i) = lines.iter().position(|l| l.contains("Kernel panic")) {
        lines.truncate(i + 1);
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_ends_at_a_panic_and_skips_blank_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            "one\n\ntwo\nthree\nKernel panic - not syncing: x\n stack\n",
        )
        .expect("write");
        assert_eq!(
            console_tail(&log, 2),
            "three\nKernel panic - not syncing: x"
        );
        assert_eq!(read_tail(&log, 6).expect("tail"), b"stack\n");
        assert_eq!(console_tail(&dir.path().join("none"), 3), "");
    }
}
