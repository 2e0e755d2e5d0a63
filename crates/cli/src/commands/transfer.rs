//! Progress display of long image and kernel operations, and their
//! cancellation with Ctrl-C.

use banger_api::images::Transfer;
use banger_api::{ClientError, Progress, Warning};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::cell::RefCell;
use std::path::Path;

/// Progress lines on stderr, and a byte bar for transfers when stderr is a
/// terminal.
pub struct Display {
    bar: RefCell<Option<(String, ProgressBar)>>,
    tty: bool,
}

impl Display {
    pub fn new(what: &str) -> Display {
        let tty = crate::output::chatty();
        if tty {
            eprintln!("{what}");
        }
        Display {
            bar: RefCell::new(None),
            tty,
        }
    }

    /// A phase line; always printed, so logs of non-interactive runs show it.
    pub fn line(&self, p: &Progress) {
        self.print(crate::output::progress_event(p));
    }

    /// A warning, as a `warning` line; always printed.
    pub fn warning(&self, w: &Warning) {
        self.print(crate::output::warning_event(w));
    }

    fn print(&self, text: String) {
        match &*self.bar.borrow() {
            Some((_, bar)) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Bytes of a transfer: one bar per phase, replaced when the phase changes.
    pub fn transfer(&self, t: &Transfer) {
        if !self.tty {
            return;
        }
        let mut slot = self.bar.borrow_mut();
        if slot.as_ref().is_none_or(|(phase, _)| *phase != t.phase) {
            if let Some((_, old)) = slot.take() {
                old.finish_and_clear();
            }
            let bar = ProgressBar::with_draw_target(
                (t.total > 0).then_some(t.total),
                ProgressDrawTarget::stderr(),
            );
            let style = if t.total > 0 {
                ProgressStyle::with_template(
                    "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
            } else {
                ProgressStyle::with_template("{msg:>12} {bytes} {bytes_per_sec}")
            };
            if let Ok(style) = style {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(t.phase.clone());
            *slot = Some((t.phase.clone(), bar));
        }
        if let Some((_, bar)) = &*slot {
            bar.set_position(t.done);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some((_, bar)) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}

/// Runs `op` until it ends or Ctrl-C; Ctrl-C drops the request, which makes
/// the daemon cancel the operation.
pub async fn interruptible<T>(
    op: impl std::future::Future<Output = Result<T, ClientError>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = op => Ok(r?),
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the operation was cancelled"),
    }
}

/// `p` made absolute against the current directory, as UTF-8 for the API.
pub fn absolute(p: &Path) -> anyhow::Result<String> {
    let abs =
        std::path::absolute(p).map_err(|e| anyhow::anyhow!("resolving {}: {e}", p.display()))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", abs.display()))
}
