//! Powering the guest off.

use nix::sys::reboot::{RebootMode, reboot};
use std::path::Path;
use std::process::Command;

/// Errors powering the guest off.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("reboot(2) {mode:?} failed: {source}")]
    Reboot {
        mode: RebootMode,
        source: nix::Error,
    },
}

/// Carries out the host's shutdown requests. The real one is [`SystemPower`];
/// tests record the requests instead of powering off the machine they run on.
pub trait Power: Send + Sync {
    /// Syncs file systems, then powers the guest off (or reboots it).
    /// Blocking; returning `Ok` means the request is under way.
    fn power_off(&self, reboot: bool) -> Result<(), PowerError>;
}

/// Powers off the machine the agent runs on.
///
/// Under systemd (the normal case) it asks systemd, so services stop cleanly;
/// when the agent is itself PID 1, or systemd refuses, it syncs and calls
/// reboot(2) directly: the host asked for the guest to go down, and it will.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemPower;

impl Power for SystemPower {
    fn power_off(&self, reboot: bool) -> Result<(), PowerError> {
        nix::unistd::sync();
        if std::process::id() != 1 && Path::new("/run/systemd/system").is_dir() {
            let verb = if reboot { "reboot" } else { "poweroff" };
            // `systemctl poweroff` only queues the job (it implies
            // --no-block), so this returns at once.
            match Command::new("systemctl").arg(verb).status() {
                Ok(st) if st.success() => return Ok(()),
                Ok(st) => tracing::warn!(%st, "systemctl {verb} failed; powering off directly"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot run systemctl {verb}; powering off directly")
                }
            }
        }
        direct(reboot)
    }
}

fn direct(reboot_instead: bool) -> Result<(), PowerError> {
    let mode = if reboot_instead {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    };
    nix::unistd::sync();
    match reboot(mode) {
        Ok(never) => match never {},
        Err(source) => Err(PowerError::Reboot { mode, source }),
    }
}
