//! Guest-fed logs stay bounded: the serial console (and the VMM's own
//! output) are files the VMM appends to (`O_APPEND`), and the daemon calls
//! [`rotate_if_over`] on them while the VM runs. A log over [`LOG_CAP`]
//! keeps its last [`LOG_CAP`] bytes as `<name>.1` (replacing the previous
//! one) and starts again empty, so a guest flooding its console costs at
//! most twice the cap on the host's disk, plus what it writes between two
//! checks.

use std::io;
use std::path::{Path, PathBuf};

/// Size at which a VM's log is rotated.
pub const LOG_CAP: u64 = 8 << 20;

/// How often the daemon checks a running VM's logs.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Creates (or empties) the log at `path` and returns it open for
/// appending, the way the VMM must write it for [`rotate_if_over`] to work:
/// with `O_APPEND`, writes after a truncation land at the new end instead
/// of leaving a sparse hole of the old size.
pub fn create_log(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

/// The previous generation of a rotated log: `console.log.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    path.with_file_name(name)
}

/// When the log at `path` is larger than `cap`, copies its last `cap`
/// bytes to [`rotated`]`(path)` and empties it. Returns whether it rotated.
/// What the VMM writes between the copy and the truncation is lost (a few
/// bytes), and so is whatever came before the last `cap` bytes.
pub fn rotate_if_over(path: &Path, cap: u64) -> io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let old = rotated(path);
    let tmp = old.with_extension("1.tmp");
    {
        use io::Seek;
        let mut from = std::fs::File::open(path)?;
        from.seek(io::SeekFrom::Start(len - cap))?;
        let mut to = std::fs::File::create(&tmp)?;
        // The tail up to `len`: what the VMM appends meanwhile stays for
        // the next generation (most of it; see above).
        io::copy(&mut io::Read::take(&mut from, cap), &mut to)?;
    }
    std::fs::rename(&tmp, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_appended_log_over_the_cap_rotates_and_keeps_growing_from_zero() {
        let t = tempfile::tempdir().expect("tmp");
        let log = t.path().join("console.log");
        let mut w = create_log(&log).expect("create");
        w.write_all(&[b'a'; 100]).expect("write");
        assert!(!rotate_if_over(&log, 100).expect("rotate"), "at the cap");
        w.write_all(b"b").expect("write");
        assert!(rotate_if_over(&log, 100).expect("rotate"));
        assert_eq!(std::fs::metadata(&log).expect("meta").len(), 0);
        let old = std::fs::read(rotated(&log)).expect("old");
        assert_eq!(old.len(), 100, "the last cap bytes");
        assert_eq!(old.last(), Some(&b'b'));
        // The writer's next bytes land at the start, not at offset 101.
        w.write_all(b"next").expect("write");
        assert_eq!(std::fs::read(&log).expect("read"), b"next");
        // A second rotation replaces the first generation.
        w.write_all(&[b'c'; 200]).expect("write");
        assert!(rotate_if_over(&log, 100).expect("rotate"));
        let old = std::fs::read(rotated(&log)).expect("old");
        assert_eq!(old.len(), 100);
        assert!(old.iter().all(|&c| c == b'c'), "the newest bytes are kept");
        assert!(!rotate_if_over(&t.path().join("missing"), 1).expect("missing"));
        // create_log empties an existing log.
        drop(w);
        create_log(&log)
            .expect("create")
            .write_all(b"x")
            .expect("write");
        assert_eq!(std::fs::read(&log).expect("read"), b"x");
    }
}
