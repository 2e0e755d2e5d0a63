//! How the guest booted, for [`Body::BootStatus`](banger_agent_proto::Body::BootStatus):
//! how the agent started, when the kernel started its first process (from
//! the kernel log), and how far the image's init is.

use banger_agent_proto::{AgentStart, BootReport, SystemState};
use std::path::Path;
use std::time::Duration;

/// What the serving agent knows about its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    pub start: AgentStart,
    /// Kernel uptime when this agent process started, in milliseconds.
    pub started_ms: u64,
    /// The image's init and whether it is systemd, when the agent handed
    /// PID 1 to it itself; otherwise PID 1 is looked at.
    pub init: Option<(String, bool)>,
}

impl BootInfo {
    /// An agent started by the image's init.
    pub fn service() -> Self {
        Self {
            start: AgentStart::Service,
            started_ms: uptime_ms(),
            init: None,
        }
    }

    /// The report, with the system state now; with `wait`, once the init
    /// has finished booting; with `explain`, what a still booting init is
    /// doing.
    pub async fn report(&self, wait: bool, explain: bool) -> BootReport {
        let system = self.system_state(wait).await;
        let pending = if explain && system.is_booting() {
            pending().await
        } else {
            Vec::new()
        };
        BootReport {
            agent: self.start,
            kernel_init_ms: kernel_init_ms(),
            agent_start_ms: self.started_ms,
            system,
            pending,
        }
    }

    /// The image's init (PID 1) and whether it is systemd.
    fn init(&self) -> (String, bool) {
        if let Some(i) = &self.init {
            return i.clone();
        }
        let exe = std::fs::read_link("/proc/1/exe").unwrap_or_default();
        let is_systemd = exe.file_name().is_some_and(|n| n == "systemd");
        (exe.display().to_string(), is_systemd)
    }

    async fn system_state(&self, wait: bool) -> SystemState {
        let (init, is_systemd) = self.init();
        if !is_systemd {
            return SystemState::NoSystemd { init };
        }
        loop {
            let state = systemctl_state(wait).await;
            match state.as_deref() {
                // Not answering yet: systemd has just been exec'd.
                None | Some("offline") | Some("unknown") | Some("") => {
                    if !wait {
                        return SystemState::Systemd {
                            state: "initializing".into(),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(s) => return SystemState::Systemd { state: s.into() },
            }
        }
    }
}

/// `systemctl ARGS` as the boot report runs it: the default PATH, no
/// input, its errors dropped, killed when the report gives up on it.
fn systemctl(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("systemctl");
    cmd.args(args)
        .env("PATH", crate::exec::DEFAULT_PATH)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `systemctl is-system-running [--wait]`'s answer; `None` when it could
/// not be asked.
async fn systemctl_state(wait: bool) -> Option<String> {
    let args: &[&str] = if wait {
        &["is-system-running", "--wait"]
    } else {
        &["is-system-running"]
    };
    let out = systemctl(args).output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().last().unwrap_or("").trim().to_string())
}

/// How long systemd may take to list its jobs: a stuck one does not
/// answer at all.
const JOBS_WAIT: Duration = Duration::from_secs(3);

/// What a booting systemd still does: its unfinished jobs (`systemctl
/// list-jobs`), or, when it does not answer in time, PID 1's kernel state
/// (where it sleeps, its kernel stack).
async fn pending() -> Vec<String> {
    let mut cmd = systemctl(&["list-jobs", "--no-legend", "--no-pager", "--full"]);
    if let Ok(Ok(out)) = tokio::time::timeout(JOBS_WAIT, cmd.output()).await
        && out.status.success()
    {
        let jobs = parse_jobs(&String::from_utf8_lossy(&out.stdout));
        if !jobs.is_empty() {
            return jobs;
        }
    }
    let read = |f: &str| std::fs::read_to_string(Path::new("/proc/1").join(f)).unwrap_or_default();
    vec![pid1_state(&read("stat"), &read("wchan"), &read("stack"))]
}

/// At most this many jobs are listed.
const MAX_JOBS: usize = 20;

/// `systemctl list-jobs --no-legend` lines (`ID UNIT TYPE STATE`) as
/// `UNIT (TYPE, STATE)`, the running ones (what the boot waits on) first.
pub(crate) fn parse_jobs(text: &str) -> Vec<String> {
    let mut jobs: Vec<(bool, String)> = text
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [_, unit, kind, state, ..] => {
                Some((state != "running", format!("{unit} ({kind}, {state})")))
            }
            _ => None,
        })
        .collect();
    jobs.sort_by_key(|(waiting, _)| *waiting);
    jobs.into_iter().take(MAX_JOBS).map(|(_, j)| j).collect()
}

/// One line on PID 1 from its `/proc/1/stat`, `wchan` and `stack`.
pub(crate) fn pid1_state(stat: &str, wchan: &str, stack: &str) -> String {
    // The state follows the command's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    let frames: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|f| f.split('+').next().unwrap_or(f))
        .take(8)
        .collect();
    let wchan = match wchan.trim() {
        "" | "0" => "-",
        w => w,
    };
    format!(
        "PID 1 does not answer: state {state}, waiting in {wchan}, kernel stack {}",
        if frames.is_empty() {
            "unknown".to_string()
        } else {
            frames.join(" < ")
        }
    )
}

/// Milliseconds since the guest kernel booted (0 if /proc is unreadable).
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| parse_uptime_ms(&s))
        .unwrap_or(0)
}

pub(crate) fn parse_uptime_ms(proc_uptime: &str) -> Option<u64> {
    let secs: f64 = proc_uptime.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).round() as u64)
}

/// When the kernel started its first process: the timestamp of its first
/// `Run <path> as init process` record in the kernel log.
pub fn kernel_init_ms() -> Option<u64> {
    read_kmsg(Path::new("/dev/kmsg"))
        .iter()
        .find_map(|r| kmsg_init_ms(r))
}

/// The timestamp (ms) of a `/dev/kmsg` record (`PRI,SEQ,USEC,FLAGS;TEXT`)
/// announcing the first process.
pub(crate) fn kmsg_init_ms(record: &str) -> Option<u64> {
    let (usec, text) = kmsg_record(record)?;
    (text.starts_with("Run ") && text.ends_with(" as init process")).then_some(usec / 1000)
}

/// A `/dev/kmsg` record's timestamp (µs on the kernel log's clock) and
/// the first line of its text.
fn kmsg_record(record: &str) -> Option<(u64, &str)> {
    let (head, text) = record.split_once(';')?;
    let usec: u64 = head.split(',').nth(2)?.parse().ok()?;
    Some((usec, text.lines().next()?))
}

/// Writes `text` (one line) to the kernel log and returns its timestamp
/// in milliseconds since boot, on the kernel log's clock: the clock of
/// the console's timestamps and of [`kernel_init_ms`]. `/proc/uptime`
/// runs behind that clock early in a boot under emulation (its timekeeping
/// starts later and on a coarser clock), by tens of milliseconds, so times
/// compared with the kernel's own come from here. `None` when the log
/// cannot be written or read.
pub fn kernel_log_mark(text: &str) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    // Read from the end: the next record is ours, or one the kernel wrote
    // just before it.
    f.seek(SeekFrom::End(0)).ok()?;
    f.write_all(format!("{text}\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 8192];
    for _ in 0..64 {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return None,
        };
        let record = String::from_utf8_lossy(&buf[..n]);
        if let Some((usec, t)) = kmsg_record(&record)
            && t == text
        {
            return Some(usec / 1000);
        }
    }
    None
}

/// Every record the kernel log still holds (one per read of /dev/kmsg).
fn read_kmsg(path: &Path) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            // Overwritten while we read: the next read goes on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
        // The log only grows; the first process is near its start.
        if out.len() > 4096 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_jobs_and_a_stuck_pid_1_read_as_one_line_each() {
        let jobs = "  1 graphical.target    start waiting\n  143 docker.service      start running\n\nbad line\n";
        assert_eq!(
            parse_jobs(jobs),
            [
                "docker.service (start, running)",
                "graphical.target (start, waiting)"
            ]
        );
        let many: String = (0..50)
            .map(|i| format!("{i} u{i}.service start waiting\n"))
            .collect();
        assert_eq!(parse_jobs(&many).len(), MAX_JOBS);
        assert_eq!(
            pid1_state(
                "1 (systemd) D 0 1 1 0 -1 4194560",
                "wait_for_completion\n",
                "[<0>] wait_for_completion+0x9c/0x160\n[<0>] do_foo+0x1/0x2\n"
            ),
            "PID 1 does not answer: state D, waiting in wait_for_completion, kernel stack wait_for_completion < do_foo"
        );
        assert_eq!(
            pid1_state("", "0", ""),
            "PID 1 does not answer: state ?, waiting in -, kernel stack unknown"
        );
    }

    #[test]
    fn finds_the_first_process_in_kernel_log_records() {
        assert_eq!(
            kmsg_init_ms("6,812,2615388,-;Run /init as init process\n"),
            Some(2615)
        );
        assert_eq!(
            kmsg_init_ms(
                "6,812,4100000,-;Run /usr/local/bin/banger-agent as init process\n SUBSYSTEM=x\n"
            ),
            Some(4100)
        );
        assert_eq!(kmsg_init_ms("6,1,10,-;Run /init failed"), None);
        assert_eq!(kmsg_init_ms("garbage"), None);
        assert_eq!(kmsg_init_ms("6,1,x,-;Run /init as init process"), None);
        assert_eq!(
            kmsg_record("12,900,2310456,-;banger-agent: greeting the host\n"),
            Some((2_310_456, "banger-agent: greeting the host"))
        );
        assert_eq!(kmsg_record("12,900,-1,-;x"), None);
    }

    #[test]
    fn uptime_is_parsed_to_milliseconds() {
        assert_eq!(parse_uptime_ms("4.57 6.20\n"), Some(4570));
        assert_eq!(parse_uptime_ms("12345.01 1.00"), Some(12_345_010));
        assert_eq!(parse_uptime_ms("nan 1"), None);
        assert_eq!(parse_uptime_ms(""), None);
    }

    #[tokio::test]
    async fn an_init_that_is_not_systemd_has_nothing_to_wait_for() {
        let info = BootInfo {
            start: AgentStart::Initramfs,
            started_ms: 7,
            init: Some(("/sbin/init".into(), false)),
        };
        let r = info.report(true, false).await;
        assert_eq!(r.agent, AgentStart::Initramfs);
        assert_eq!(r.agent_start_ms, 7);
        assert_eq!(
            r.system,
            SystemState::NoSystemd {
                init: "/sbin/init".into()
            }
        );
        assert!(!r.system.is_booting());
    }
}
