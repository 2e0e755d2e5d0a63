use std::io::Write;
use std::path::{Path, PathBuf};
use tracing_subscriber::EnvFilter;

/// Size at which `bangerd.log` becomes `bangerd.log.1` (replacing the
/// previous one): what guests make the daemon log (malformed agent frames,
/// refused requests) costs at most twice this on disk.
const LOG_CAP: u64 = 16 << 20;

/// Sends structured JSON logs to `log_file` (append) at `level`, rotated
/// at [`LOG_CAP`].
pub fn init_logging(log_file: &Path, level: &str) -> anyhow::Result<()> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = Rotating::open(log_file.to_path_buf(), LOG_CAP)?;
    let filter = EnvFilter::try_new(format!("{level},hyper=warn,tungstenite=warn"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_current_span(false)
        .init();
    Ok(())
}

/// An append-only log file that moves itself to `<path>.1` once it would
/// grow past `cap`. Each log line is one write, so lines are never split.
struct Rotating {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    cap: u64,
}

impl Rotating {
    fn open(path: PathBuf, cap: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path,
            file,
            len,
            cap,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, banger_vmm::logcap::rotated(&self.path))?;
        *self = Self::open(std::mem::take(&mut self.path), self.cap)?;
        Ok(())
    }
}

impl Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len > 0 && self.len + buf.len() as u64 > self.cap {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_log_rotates_at_its_cap_and_keeps_whole_lines() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("bangerd.log");
        std::fs::write(&path, "from before\n").expect("write");
        let mut log = Rotating::open(path.clone(), 100).expect("open");
        let line = format!("{}\n", "x".repeat(29));
        for _ in 0..100 {
            log.write_all(line.as_bytes()).expect("write");
        }
        let now = std::fs::read_to_string(&path).expect("log");
        let old = std::fs::read_to_string(banger_vmm::logcap::rotated(&path)).expect("old");
        for text in [&now, &old] {
            assert!(text.len() <= 100, "{}", text.len());
            assert!(text.lines().all(|l| l.len() == 29), "{text}");
        }
        assert_eq!(old.len(), 90);
        // The first generation, with the old content, is long gone.
        assert!(!old.contains("before") && !now.contains("before"));
    }
}
