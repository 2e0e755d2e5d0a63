//! When each part of a VM's logs was written, for `vm logs --since`.
//!
//! The VMM writes the console and its own log straight to files, without
//! timestamps. While a VM runs, the daemon samples each log's size once a
//! second and notes it in `<log>.idx` (`<unix ms> <size>` lines, appended
//! only when the size changed and the index has a line to spare, see
//! [`SPARE_LINES`]), so a time maps to an offset to within a second (to
//! within 4 KiB and a second for a log busy enough to use up its spare
//! lines). Bytes written while the daemon was down are placed as early as
//! they could have been written (`--since` shows them rather than hiding
//! them). Each launch starts a fresh index (a new file: a sampler of an
//! earlier boot that is still finishing writes to the old one). Logs
//! without an index (VMs created before it existed) are shown whole.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// How often a running VM's log sizes are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How much log earns its index one more line.
const BYTES_PER_LINE: u64 = 4 << 10;

/// Lines an index may hold beyond one per [`BYTES_PER_LINE`] of its log.
///
/// An index is read whole by every `vm logs --since` and starts over only
/// when its log rotates (at [`banger_vmm::logcap::LOG_CAP`], 8 MiB), so a
/// line for every second that saw output would let a guest writing a byte a
/// second grow it to tens of MiB over months. A sample that saw its log
/// grow adds a line only while the index holds fewer than `SPARE_LINES +
/// size / BYTES_PER_LINE`: at most about 3,000 lines (some 70 KiB) for a
/// log at its cap, plus the one noted when the VMM exits.
///
/// `--since t` starts at the size in the last line not after `t`, never
/// later than what was written at or after `t` (a line only says that what
/// came before it was written by then). A guest that writes now and then
/// keeps a line for every second it wrote in, so that size is within a
/// second of `t`; once the spare lines are used, a line is added at the
/// first sample after the log passes each further multiple of
/// [`BYTES_PER_LINE`], so `--since` starts at most 4 KiB plus about a
/// second's output before `t` (and at the start of that line).
const SPARE_LINES: u64 = 1024;

/// The index of `log`.
pub(crate) fn index_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_os_string();
    p.push(".idx");
    PathBuf::from(p)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Notes the sizes of `logs` every second while process `pid` lives (and
/// once more when it has exited), until `stop` is cancelled. With `fresh`,
/// each index is replaced by an empty one first (a new launch); otherwise
/// it is appended to (a VM re-adopted by a restarted daemon). Returns the
/// sampling task, if there is anything to sample.
pub(crate) fn spawn_sampler(
    logs: Vec<PathBuf>,
    pid: u32,
    fresh: bool,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut files: Vec<Sampled> = Vec::new();
    for log in logs {
        match Sampled::open(&log, fresh) {
            Ok(f) => files.push(f),
            Err(e) => {
                tracing::warn!(log = %log.display(), error = %e, "no log index: `vm logs --since` will show this log whole")
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    let exited = match banger_vmm::watch_exit(pid) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot watch the VMM: its logs are not indexed");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let Some(mut exited) = exited else {
            // Already gone: what it wrote is all there is.
            sample(&mut files, now_ms(), true);
            return;
        };
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => sample(&mut files, now_ms(), false),
                _ = &mut exited => {
                    sample(&mut files, now_ms(), true);
                    return;
                }
                _ = stop.cancelled() => return,
            }
        }
    }))
}

/// A log and its open index.
struct Sampled {
    log: PathBuf,
    index: std::fs::File,
    /// The lines in the index, for [`SPARE_LINES`].
    lines: u64,
    /// The size in the index's last line; `None` when it has none.
    noted: Option<u64>,
    /// The log's size at the previous sample: a smaller one means it was
    /// rotated. Not `noted`, which can be up to [`BYTES_PER_LINE`] behind
    /// and so miss a rotation that the new file has grown back past.
    seen: Option<u64>,
}

impl Sampled {
    /// `log` with its index opened by [`open_index`]. An index appended to
    /// (a restarted daemon) carries on from its lines: its count stays
    /// bounded across restarts, and a rotation while the daemon was down
    /// is seen at the first sample.
    fn open(log: &Path, fresh: bool) -> std::io::Result<Sampled> {
        let index = open_index(log, fresh)?;
        let (lines, noted) = if fresh {
            (0, None)
        } else {
            let bytes = std::fs::read(index_path(log))?;
            let text = String::from_utf8_lossy(&bytes);
            let last = samples(&text).last().map(|&(_, size)| size);
            (text.lines().count() as u64, last)
        };
        Ok(Sampled {
            log: log.to_path_buf(),
            index,
            lines,
            noted,
            seen: noted,
        })
    }
}

/// Appends `<now_ms> <size>` to each index whose log changed size and that
/// has a line to spare ([`SPARE_LINES`]), or whose VMM has `exited`: that
/// last line is always noted, so that `--since` after the end shows
/// nothing. A log that shrank was rotated: its index starts over (the
/// samples before say nothing about the new file), so an index grows with
/// its log's current file only, not with the VM's lifetime. The time is a
/// parameter so that tests can drive the clock.
fn sample(files: &mut [Sampled], now_ms: u64, exited: bool) {
    for f in files {
        let Ok(size) = std::fs::metadata(&f.log).map(|m| m.len()) else {
            continue;
        };
        if f.seen.is_some_and(|seen| size < seen) {
            match f.index.set_len(0) {
                Ok(()) => f.lines = 0,
                Err(e) => {
                    tracing::debug!(log = %f.log.display(), error = %e, "log index not restarted");
                }
            }
            f.noted = None;
        }
        f.seen = Some(size);
        let spare = f.lines < SPARE_LINES + size / BYTES_PER_LINE;
        if f.noted == Some(size) || !(spare || exited) {
            continue;
        }
        match writeln!(f.index, "{now_ms} {size}") {
            Ok(()) => {
                f.lines += 1;
                f.noted = Some(size);
            }
            Err(e) => {
                tracing::debug!(log = %f.log.display(), error = %e, "log index not updated");
            }
        }
    }
}

/// Opens `log`'s index for appending; with `fresh`, a new empty file
/// replaces the old one (renamed over it, so a sampler still holding the
/// old one writes where nobody reads).
fn open_index(log: &Path, fresh: bool) -> std::io::Result<std::fs::File> {
    let path = index_path(log);
    if fresh {
        let tmp = path.with_extension("idx.new");
        std::fs::File::create(&tmp)?;
        std::fs::rename(&tmp, &path)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
}

/// `(unix ms, size)` samples of an index, oldest first; only those after
/// the last time the log shrank (it was truncated and started over).
fn samples(text: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(Ok(t)), Some(Ok(size)), None) = (
            it.next().map(str::parse::<u64>),
            it.next().map(str::parse::<u64>),
            it.next(),
        ) else {
            continue; // a line cut short by a crash
        };
        if out.last().is_some_and(|&(_, prev)| size < prev) {
            out.clear();
        }
        out.push((t, size));
    }
    out
}

/// Where in `log` what was written at or after `since_ms` begins: the size
/// it had at the last sample not after that time (0 without one), moved
/// back to the start of its line.
pub(crate) fn offset_since(log: &Path, since_ms: u64) -> std::io::Result<u64> {
    let text = match std::fs::read_to_string(index_path(log)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let offset = samples(&text)
        .iter()
        .take_while(|(t, _)| *t <= since_ms)
        .last()
        .map_or(0, |(_, size)| *size);
    line_start(log, offset)
}

/// The start of the line holding byte `offset` of `log` (clamped to its end).
fn line_start(log: &Path, offset: u64) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(log)?;
    let len = f.metadata()?.len();
    let mut end = offset.min(len);
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(nl) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(start + nl as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Where the last `lines` lines of `log` begin, not before `from`. A last
/// line without its newline counts as a line.
pub(crate) fn offset_tail(log: &Path, from: u64, lines: u64) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(log)?;
    let len = f.metadata()?.len();
    let from = from.min(len);
    if lines == 0 {
        return Ok(len);
    }
    // Newlines to pass going back: one per line, plus the last one's own.
    let mut last = [0u8; 1];
    let ends_with_newline = len > from && {
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        last[0] == b'\n'
    };
    let mut to_pass = lines + u64::from(ends_with_newline);
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > from {
        let start = end.saturating_sub(buf.len() as u64).max(from);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                to_pass -= 1;
                if to_pass == 0 {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        end = start;
    }
    Ok(from)
}

/// Where `vm logs` starts reading `log` for `since_ms` and `tail`.
pub(crate) fn start_offset(
    log: &Path,
    since_ms: Option<u64>,
    tail: Option<u64>,
) -> std::io::Result<u64> {
    if !log.exists() {
        return Ok(0);
    }
    let from = match since_ms {
        Some(t) => offset_since(log, t)?,
        None => 0,
    };
    match tail {
        Some(n) => offset_tail(log, from, n),
        None => Ok(from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("console.log");
        std::fs::write(&p, text).expect("write");
        p
    }

    fn from(p: &Path, offset: u64) -> String {
        let text = std::fs::read_to_string(p).expect("read");
        text[offset as usize..].to_string()
    }

    #[test]
    fn tail_counts_lines_from_the_end() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "a\nbb\nccc\ndddd\n");
        assert_eq!(
            from(&p, offset_tail(&p, 0, 2).expect("tail")),
            "ccc\ndddd\n"
        );
        assert_eq!(from(&p, offset_tail(&p, 0, 1).expect("tail")), "dddd\n");
        assert_eq!(
            from(&p, offset_tail(&p, 0, 9).expect("tail")),
            "a\nbb\nccc\ndddd\n"
        );
        assert_eq!(from(&p, offset_tail(&p, 0, 0).expect("tail")), "");
        // Not before `from`.
        assert_eq!(
            from(&p, offset_tail(&p, 5, 9).expect("tail")),
            "ccc\ndddd\n"
        );
        // A last line still being written counts.
        let p = log(t.path(), "a\nbb\nccc");
        assert_eq!(from(&p, offset_tail(&p, 0, 2).expect("tail")), "bb\nccc");
        // Longer than a read buffer.
        let long = format!("first\n{}\nlast\n", "x".repeat(200_000));
        let p = log(t.path(), &long);
        assert_eq!(
            from(&p, offset_tail(&p, 0, 2).expect("tail")),
            format!("{}\nlast\n", "x".repeat(200_000))
        );
    }

    #[test]
    fn since_maps_times_to_line_starts_through_the_index() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "boot 1\nboot 2\nlater 1\nlater 2\nlast\n");
        // Sizes 14 at t=1000, 26 (mid-line "later 2") at 2000, 35 at 3000.
        std::fs::write(index_path(&p), "1000 14\n2000 26\n3000 35\n").expect("idx");
        assert_eq!(
            from(&p, offset_since(&p, 500).expect("since")),
            "boot 1\nboot 2\nlater 1\nlater 2\nlast\n"
        );
        assert_eq!(
            from(&p, offset_since(&p, 1000).expect("since")),
            "later 1\nlater 2\nlast\n"
        );
        assert_eq!(
            from(&p, offset_since(&p, 1999).expect("since")),
            "later 1\nlater 2\nlast\n"
        );
        // Size 26 is inside "later 2": its whole line is shown.
        assert_eq!(
            from(&p, offset_since(&p, 2500).expect("since")),
            "later 2\nlast\n"
        );
        assert_eq!(from(&p, offset_since(&p, 9999).expect("since")), "");
        // Combined with a tail: the last line of what is since.
        assert_eq!(
            from(&p, start_offset(&p, Some(1000), Some(1)).expect("start")),
            "last\n"
        );
    }

    #[test]
    fn a_truncated_log_forgets_older_samples_and_no_index_means_everything() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "new boot\nmore\n");
        std::fs::write(
            index_path(&p),
            "1000 500\n2000 900\n3000 9\n4000 14\ngarbage\n",
        )
        .expect("idx");
        assert_eq!(
            from(&p, offset_since(&p, 2500).expect("since")),
            "new boot\nmore\n"
        );
        assert_eq!(from(&p, offset_since(&p, 3500).expect("since")), "more\n");
        std::fs::remove_file(index_path(&p)).expect("rm");
        assert_eq!(offset_since(&p, 3500).expect("since"), 0);
        assert_eq!(
            start_offset(&t.path().join("missing.log"), Some(1), Some(1)).expect("start"),
            0
        );
    }

    fn index_lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(index_path(p))
            .expect("idx")
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_rotated_log_starts_its_index_over() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "one\n");
        let mut files = vec![Sampled::open(&p, true).expect("index")];
        sample(&mut files, 1000, false);
        sample(&mut files, 2000, false);
        std::fs::write(&p, "one\ntwo\n").expect("grow");
        sample(&mut files, 3000, false);
        assert_eq!(index_lines(&p), ["1000 4", "3000 8"], "one line per size");
        std::fs::write(&p, "x\n").expect("rotated");
        sample(&mut files, 4000, false);
        assert_eq!(index_lines(&p), ["4000 2"], "only the new file's samples");
        std::fs::write(&p, "x\ny\n").expect("grow");
        sample(&mut files, 5000, false);
        assert_eq!(index_lines(&p).len(), 2);
        // With no line to spare, growth is not noted, and a rotation is
        // told from the size last seen: the new file has grown back past
        // the size last noted.
        files[0].lines = SPARE_LINES;
        std::fs::write(&p, "x\ny\nzzzz\n").expect("grow");
        sample(&mut files, 6000, false);
        assert_eq!(index_lines(&p).len(), 2, "no line to spare");
        std::fs::write(&p, "abcdefg\n").expect("rotated");
        sample(&mut files, 7000, false);
        assert_eq!(index_lines(&p), ["7000 8"]);
    }

    #[test]
    fn a_restarted_daemon_carries_on_from_the_index() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "one\ntwo\n");
        let full: String = (0..SPARE_LINES).map(|i| format!("{i} 8\n")).collect();
        std::fs::write(index_path(&p), &full).expect("idx");
        let mut files = vec![Sampled::open(&p, false).expect("index")];
        assert_eq!((files[0].lines, files[0].noted), (SPARE_LINES, Some(8)));
        std::fs::write(&p, "one\ntwo\nthree\n").expect("grow");
        sample(&mut files, 5000, false);
        assert_eq!(index_lines(&p).len() as u64, SPARE_LINES, "none to spare");
        // Rotated while the daemon was down: the first sample sees it.
        let mut files = vec![Sampled::open(&p, false).expect("index")];
        std::fs::write(&p, "x\n").expect("rotated");
        sample(&mut files, 6000, false);
        assert_eq!(index_lines(&p), ["6000 2"]);
    }

    /// A guest writing a little every second for hours (a short line most
    /// seconds, some silent ones, some lines in two pieces, now and then a
    /// burst): its index keeps a line per second only while it has lines
    /// to spare, then one per 4 KiB, and `--since` still starts at or
    /// before every line written at or after the time asked, and not much
    /// before.
    #[test]
    fn a_log_written_every_second_keeps_a_bounded_index_and_since_stays_right() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "");
        let mut files = vec![Sampled::open(&p, true).expect("index")];
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open log");
        const START: u64 = 1_700_000_000_000;
        const SECONDS: u64 = 20_000;
        // (time, end offset) of each write; (time of its first byte, start
        // offset) of each line.
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut lines: Vec<(u64, u64)> = Vec::new();
        let mut len = 0u64;
        let mut write = |at: u64, text: &str, starts_line: bool| {
            if starts_line {
                lines.push((at, len));
            }
            w.write_all(text.as_bytes()).expect("write");
            len += text.len() as u64;
            writes.push((at, len));
        };
        let mut seconds_written = 0u64;
        for s in 1..=SECONDS {
            let now = START + s * 1000;
            // Written between the previous sample and this one.
            let at = now - 500;
            match s % 10 {
                9 => {}
                3 => write(at, &format!("{at} starts "), true),
                4 => write(at, "and ends\n", false),
                _ if s % 1000 == 500 => {
                    for _ in 0..3 {
                        write(at, &format!("{at} {}\n", "b".repeat(3000)), true);
                    }
                }
                _ => write(at, &format!("{at}\n"), true),
            }
            if s % 10 != 9 && s <= SPARE_LINES / 2 {
                seconds_written += 1;
            }
            sample(&mut files, now, false);
        }
        // The VMM exits after one more line: it is noted with no line to
        // spare.
        let end = START + (SECONDS + 1) * 1000;
        write(end - 500, "bye\n", true);
        sample(&mut files, end, true);

        let index = index_lines(&p);
        assert!(
            index.len() as u64 <= SPARE_LINES + len / BYTES_PER_LINE + 1,
            "{} index lines for {len} bytes of log",
            index.len()
        );
        assert!(
            index.len() < 2000,
            "{} index lines (one per second would be {SECONDS})",
            index.len()
        );
        assert_eq!(index.last(), Some(&format!("{end} {len}")));
        // While lines were to spare, each second that saw output has one.
        let early = samples(&index.join("\n"))
            .iter()
            .filter(|(t, _)| *t <= START + SPARE_LINES / 2 * 1000)
            .count() as u64;
        assert_eq!(early, seconds_written);

        let text = std::fs::read(&p).expect("read log");
        let longest_line = lines
            .iter()
            .zip(lines.iter().skip(1).map(|l| l.1).chain([len]))
            .map(|((_, start), end)| end - start)
            .max()
            .expect("lines");
        let mut since = START - 1000;
        while since <= end + 1000 {
            let got = offset_since(&p, since).expect("since");
            // The first line written at or after `since` (its first byte).
            let want = lines
                .get(lines.partition_point(|(at, _)| *at < since))
                .map_or(len, |(_, start)| *start);
            assert!(got <= want, "since {since}: starts at {got}, after {want}");
            assert!(
                got == 0 || text[got as usize - 1] == b'\n',
                "since {since}: {got} is not a line's start"
            );
            // What was written in the second before `since`.
            let written_before = |t: u64| match writes.partition_point(|(at, _)| *at < t) {
                0 => 0,
                i => writes[i - 1].1,
            };
            let last_second = written_before(since) - written_before(since.saturating_sub(1000));
            assert!(
                want - got <= BYTES_PER_LINE + last_second + longest_line,
                "since {since}: starts {} bytes early",
                want - got
            );
            since += 2503;
        }
        assert_eq!(offset_since(&p, end).expect("since"), len);
    }

    #[tokio::test]
    async fn the_sampler_notes_growth_and_stops_with_its_process() {
        let t = tempfile::tempdir().expect("tmp");
        let p = log(t.path(), "one\n");
        std::fs::write(index_path(&p), "1 999999\n").expect("old index");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let stop = CancellationToken::new();
        let task =
            spawn_sampler(vec![p.clone()], child.id(), true, stop.clone()).expect("a sampler");
        let idx = index_path(&p);
        let lines = || {
            std::fs::read_to_string(&idx)
                .expect("index")
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        // Polls `cond` (the sampler writes once a second) for at most 10 s.
        async fn until(what: &str, cond: impl Fn() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // The old index was replaced.
        until("a first sample", || !lines().is_empty()).await;
        assert!(lines()[0].ends_with(" 4"), "{:?}", lines());
        std::fs::write(&p, "one\ntwo\n").expect("grow");
        until("a second sample", || lines().len() >= 2).await;
        assert!(lines()[1].ends_with(" 8"), "{:?}", lines());
        // What the process wrote just before it exited is noted, then the
        // sampler ends by itself.
        std::fs::write(&p, "one\ntwo\nthree\n").expect("grow");
        let _ = child.kill();
        let _ = child.wait();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the sampler ends with its process")
            .expect("join");
        assert!(
            lines().last().expect("a line").ends_with(" 14"),
            "{:?}",
            lines()
        );
        assert!(!stop.is_cancelled());
    }
}
