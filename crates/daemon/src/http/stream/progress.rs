//! A [`ProgressSink`] onto an operation's NDJSON stream: each operation's
//! wire enum says how phases, warnings and transfers become its events.

use banger_api::images::{BundleEvent, PullImageEvent, PullKernelEvent, Transfer};
use banger_api::templates::WarmImageEvent;
use banger_api::{
    BuildImageEvent, CreateVmEvent, Event, Progress, ProgressSink, WaitEvent, Warning,
};
use std::time::Instant;
use tokio::sync::mpsc;

/// An operation's wire enum, as the target of a [`ProgressSink`].
pub(crate) trait ProgressEvents: Sized + Send + 'static {
    /// A phase line.
    fn progress(p: Progress) -> Self;
    /// A warning.
    fn warning(w: Warning) -> Self;
    /// The transfer event, for streams that have one (progress bars);
    /// `None`: transfers are told as phase lines per tenth.
    const TRANSFER: Option<fn(Transfer) -> Self> = None;
}

/// Implements [`ProgressEvents`] for wire enums with `Progress` and
/// `Warning` variants (and `Transfer`, after `transfer:`).
macro_rules! progress_events {
    ($($ty:ty),* $(; transfer: $($tty:ty),*)?) => {
        $(impl ProgressEvents for $ty {
            fn progress(p: Progress) -> Self { Self::Progress(p) }
            fn warning(w: Warning) -> Self { Self::Warning(w) }
        })*
        $($(impl ProgressEvents for $tty {
            fn progress(p: Progress) -> Self { Self::Progress(p) }
            fn warning(w: Warning) -> Self { Self::Warning(w) }
            const TRANSFER: Option<fn(Transfer) -> Self> = Some(Self::Transfer);
        })*)?
    };
}

progress_events!(
    CreateVmEvent, WaitEvent, BuildImageEvent, WarmImageEvent, BundleEvent;
    transfer: PullImageEvent, PullKernelEvent
);

/// A sink sending its events on `tx` as `E`s, their time counted from now.
pub(crate) fn sink<E: ProgressEvents>(tx: &mpsc::UnboundedSender<E>) -> ProgressSink {
    let started = Instant::now();
    let tx = tx.clone();
    let emit = move |ev: Event| {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let wire = match ev {
            Event::Phase { step, message } => E::progress(Progress {
                phase: step,
                message,
                elapsed_ms,
            }),
            Event::Warning(message) => E::warning(Warning {
                message,
                elapsed_ms,
            }),
            Event::Transfer { step, done, total } => match E::TRANSFER {
                Some(wrap) => wrap(Transfer {
                    phase: step.to_string(),
                    done,
                    total,
                }),
                // A lines sink never hands on transfers.
                None => return,
            },
        };
        let _ = tx.send(wire);
    };
    match E::TRANSFER {
        Some(_) => ProgressSink::new(emit),
        None => ProgressSink::lines(emit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::Step;

    #[test]
    fn warnings_and_transfers_become_the_stream_s_own_events() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = sink::<PullImageEvent>(&tx);
        s.phase(Step::Resolve, "r");
        s.transfer("layer 1", 0, 10);
        s.warn("w");
        assert!(
            matches!(rx.try_recv(), Ok(PullImageEvent::Progress(p)) if p.phase == Step::Resolve)
        );
        assert!(
            matches!(rx.try_recv(), Ok(PullImageEvent::Transfer(t)) if t.phase == "layer 1" && t.total == 10)
        );
        assert!(matches!(rx.try_recv(), Ok(PullImageEvent::Warning(w)) if w.message == "w"));
    }

    #[test]
    fn streams_without_transfers_get_lines() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = sink::<CreateVmEvent>(&tx);
        s.transfer(Step::Download, 512, 1024);
        s.warn("w");
        assert!(
            matches!(rx.try_recv(), Ok(CreateVmEvent::Progress(p)) if p.phase == Step::Download && p.message == "50% of 1024 bytes")
        );
        assert!(matches!(rx.try_recv(), Ok(CreateVmEvent::Warning(w)) if w.message == "w"));
    }
}
