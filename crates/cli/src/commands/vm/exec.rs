//! `banger vm exec`, `banger vm acp`: a guest process bridged to this
//! terminal (or these pipes) through the daemon and the guest agent.

use anyhow::Context;
use banger_api::Client;
use banger_api::exec::{ExecControl, ExecOutput, ExecStart, TermSize};
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How long a guest process gets to exit after Ctrl-C/SIGTERM was forwarded
/// before banger stops waiting for it.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);

/// How stdin and the terminal are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecMode {
    /// Run the guest process on a pseudo-terminal.
    pub tty: bool,
    /// Forward stdin (otherwise the guest process reads /dev/null).
    pub stdin: bool,
}

impl ExecMode {
    /// `vm exec`'s choice: a tty when forced, never when refused, else when
    /// stdin and stdout are both terminals (as ssh does). Stdin is
    /// forwarded with a tty or when it is not a terminal.
    pub fn choose(force_tty: bool, no_tty: bool) -> Self {
        let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        let tty = force_tty || (!no_tty && interactive);
        Self {
            tty,
            stdin: tty || !std::io::stdin().is_terminal(),
        }
    }
}

/// Size of the terminal on `fd`, if it is one.
pub fn term_size(fd: BorrowedFd<'_>) -> Option<TermSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, which is valid
    // for the duration of the call; the fd is borrowed, so open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(TermSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The terminal size to give a guest tty: stdin's, else stdout's, else 24x80.
fn local_size() -> TermSize {
    term_size(std::io::stdin().as_fd())
        .or_else(|| term_size(std::io::stdout().as_fd()))
        .unwrap_or(TermSize { rows: 24, cols: 80 })
}

/// Saved terminal settings, put back by [`RawMode::restore`], on drop, and
/// by the panic hook [`RawMode::enter`] installs.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Puts stdin's terminal in raw mode for as long as it lives.
pub struct RawMode(());

impl RawMode {
    /// Raw mode on stdin if it is a terminal; `None` (nothing to restore)
    /// when it is not.
    pub fn enter() -> anyhow::Result<Option<Self>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(Some(Self(())))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts back the settings saved by [`RawMode::enter`], once.
fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = saved {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &t);
    }
}

/// Reads stdin on a thread of its own: `Some(data)` chunks, then `None`
/// at its end. Not tokio's stdin: its blocking read would hold up the
/// runtime's shutdown until the user typed something (a terminal never ends).
pub fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => n,
            };
            if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    rx
}

/// SIGINT, SIGTERM and SIGHUP, caught so that none of them ends banger
/// before it has passed them on (and, in `vm run`, cleaned up).
pub struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    pub fn new() -> anyhow::Result<Self> {
        let ctx = "installing signal handlers";
        Ok(Self {
            int: signal(SignalKind::interrupt()).context(ctx)?,
            term: signal(SignalKind::terminate()).context(ctx)?,
            hup: signal(SignalKind::hangup()).context(ctx)?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Runs `start` in the VM with `mode`, bridging stdio; returns the guest
/// process's shell-style exit status (128+N when killed by signal N).
pub async fn exec(
    client: &Client,
    vm: &str,
    start: ExecStart,
    mode: ExecMode,
) -> anyhow::Result<i32> {
    exec_with(client, vm, start, mode, false, &mut Interrupts::new()?).await
}

/// [`exec`] with the caller's signal handlers, and the guest's stdout
/// written to stderr when `stdout_to_stderr` (`vm run --json` keeps stdout
/// for its record).
///
/// Without a tty, SIGINT, SIGTERM and SIGHUP sent to banger are forwarded
/// to the guest process, which gets [`SIGNAL_GRACE`] to exit; a second one
/// stops waiting. With a tty the local terminal is raw, so Ctrl-C reaches
/// the guest as a byte, and SIGWINCH resizes the guest terminal.
pub async fn exec_with(
    client: &Client,
    vm: &str,
    start: ExecStart,
    mode: ExecMode,
    stdout_to_stderr: bool,
    sig: &mut Interrupts,
) -> anyhow::Result<i32> {
    let start = ExecStart {
        stdin: mode.stdin,
        tty: mode.tty.then(local_size),
        ..start
    };
    let (mut writer, mut reader) = client
        .exec(vm, &start)
        .await
        .context("starting the command")?;
    let _raw = if mode.tty { RawMode::enter()? } else { None };

    let mut in_rx = if mode.stdin {
        stdin_chunks()
    } else {
        tokio::sync::mpsc::channel(1).1
    };
    let mut winch = signal(SignalKind::window_change()).context("handling SIGWINCH")?;
    let mut forwarded: Option<i32> = None;
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    let mut stdin_open = mode.stdin;
    let mut stdout: Box<dyn Write + Send> = if stdout_to_stderr {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let mut stderr = std::io::stderr();
    loop {
        let sig = tokio::select! {
            out = reader.next() => {
                match out? {
                    Some(ExecOutput::Stdout(d)) => { stdout.write_all(&d)?; stdout.flush()?; }
                    Some(ExecOutput::Stderr(d)) => { stderr.write_all(&d)?; stderr.flush()?; }
                    Some(ExecOutput::Exit(e)) => return Ok(e.shell_code()),
                    Some(ExecOutput::Error(e)) => anyhow::bail!("{}", e.message),
                    None => anyhow::bail!("the command's stream ended without an exit status"),
                }
                continue;
            }
            // A write fails when the daemon has already closed the exec
            // after the process ended: its report is still to be read, and
            // decides the outcome, so sending just stops.
            msg = in_rx.recv(), if stdin_open => {
                let sent = match msg {
                    Some(Some(data)) => writer.stdin(&data).await,
                    Some(None) => {
                        stdin_open = false;
                        writer.control(ExecControl::StdinEof).await
                    }
                    None => {
                        stdin_open = false;
                        Ok(())
                    }
                };
                if sent.is_err() {
                    stdin_open = false;
                }
                continue;
            }
            _ = winch.recv(), if mode.tty => {
                let _ = writer.control(ExecControl::Resize(local_size())).await;
                continue;
            }
            s = sig.recv() => s,
            () = &mut grace => {
                eprintln!("banger: the guest command did not exit within {}s of the signal; leaving it", SIGNAL_GRACE.as_secs());
                return Ok(128 + forwarded.unwrap_or(libc::SIGINT));
            }
        };
        // A signal: forward it once; a second one stops waiting.
        if forwarded.is_some() {
            return Ok(128 + sig);
        }
        forwarded = Some(sig);
        let _ = writer.control(ExecControl::Signal(sig)).await;
        grace
            .as_mut()
            .reset(tokio::time::Instant::now() + SIGNAL_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_has_no_terminal_size() {
        let (r, _w) = std::io::pipe().expect("pipe");
        assert_eq!(term_size(r.as_fd()), None);
    }

    #[test]
    fn a_pty_reports_its_size() {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 33,
                ws_col: 111,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .expect("openpty");
        assert_eq!(
            term_size(pty.slave.as_fd()),
            Some(TermSize {
                rows: 33,
                cols: 111
            })
        );
    }
}
