//! Taking over the terminal, and giving it back on every way out: normal
//! return, error, and panic.

use crossterm::cursor::{Hide, Show};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use std::io::Stdout;
use std::panic::PanicHookInfo;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the panic hook: a panic (maybe in a background task) gave the
/// terminal back, so the UI must not draw again.
static PANICKED: AtomicBool = AtomicBool::new(false);

type Hook = Box<dyn Fn(&PanicHookInfo<'_>) + Send + Sync + 'static>;

/// The terminal in raw mode on the alternate screen. Dropping it restores
/// the terminal and the previous panic hook.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
    previous_hook: Arc<Hook>,
}

/// Leaves raw mode and the alternate screen, shows the cursor. Safe to call
/// more than once; errors are ignored, as there is nothing left to do.
pub fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, Show);
}

/// Whether a panic has happened since the terminal was taken over.
pub fn panicked() -> bool {
    PANICKED.load(Ordering::SeqCst)
}

impl TerminalGuard {
    pub fn enter() -> std::io::Result<Self> {
        // The hook first: a panic while entering must restore too.
        let previous_hook: Arc<Hook> = Arc::new(std::panic::take_hook());
        let prev = previous_hook.clone();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            // The message must land on the normal screen, or it is lost
            // with the alternate one.
            restore();
            prev(info);
        }));
        let guard = |e: std::io::Error| {
            restore();
            e
        };
        enable_raw_mode().map_err(guard)?;
        execute!(std::io::stdout(), EnterAlternateScreen, Hide).map_err(guard)?;
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(guard)?;
        Ok(TerminalGuard {
            terminal,
            previous_hook,
        })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
        if !std::thread::panicking() {
            let prev = self.previous_hook.clone();
            std::panic::set_hook(Box::new(move |info| prev(info)));
        }
    }
}
