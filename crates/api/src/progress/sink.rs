//! What producers of progress report ([`Event`]) and where they report it
//! ([`ProgressSink`]), with the one throttle of transfer updates
//! ([`Throttle`]).

use super::Step;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One thing a long operation reports. The outcome (`done`/`error`) is not
/// an event: each operation's wire enum carries its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A step began, with a line for people.
    Phase { step: Step, message: String },
    /// Bytes of a transfer in `step` so far; `total` is 0 when unknown.
    Transfer { step: Step, done: u64, total: u64 },
    /// Something skipped or degraded that the user should know of.
    Warning(String),
}

/// Decides which transfer updates go out, per step: the first one, the
/// final one (`done == total`), and in between one per bucket (a whole
/// percent, or a tenth for [`Throttle::lines`]) at most every `min_gap`
/// (100 ms: at most ~10 a second for [`Throttle::transfers`]).
#[derive(Debug)]
pub struct Throttle {
    /// Buckets a transfer of known size is cut into.
    buckets: u64,
    /// Least time between two updates of one step (the final one excepted).
    min_gap: Duration,
    /// Whether transfers of unknown size go out (one bucket per MiB).
    unknown_size: bool,
    /// The last update that went out, per step.
    last: HashMap<Step, Mark>,
}

/// An update that went out.
#[derive(Debug, Clone, Copy)]
struct Mark {
    bucket: u64,
    done: u64,
    at: Instant,
}

impl Throttle {
    /// For transfer events (progress bars): whole percents (MiB when the
    /// size is unknown), at most one every 100 ms per step.
    pub fn transfers() -> Self {
        Self {
            buckets: 100,
            min_gap: Duration::from_millis(100),
            unknown_size: true,
            last: HashMap::new(),
        }
    }

    /// For transfers told as lines: one per tenth, none when the size is
    /// unknown.
    pub fn lines() -> Self {
        Self {
            buckets: 10,
            min_gap: Duration::ZERO,
            unknown_size: false,
            last: HashMap::new(),
        }
    }

    /// The bucket of this update if it goes out at `now`, else `None`.
    pub fn admit(&mut self, step: &Step, done: u64, total: u64, now: Instant) -> Option<u64> {
        let bucket = match total {
            0 if !self.unknown_size => return None,
            0 => done >> 20,
            t => done.min(t).saturating_mul(self.buckets) / t,
        };
        let last = self.last.get(step).copied();
        let goes = match last {
            None => true,
            // The final update always goes out, once.
            Some(m) if total > 0 && done >= total => m.done != done,
            Some(m) if m.bucket == bucket => false,
            Some(m) => now.saturating_duration_since(m.at) >= self.min_gap,
        };
        if !goes {
            return None;
        }
        self.last.insert(
            step.clone(),
            Mark {
                bucket,
                done,
                at: now,
            },
        );
        Some(bucket)
    }
}

/// What a sink does with an event.
type Emit = dyn Fn(Event) + Send + Sync;

/// Where a long operation reports its progress: steps, transfers and
/// warnings. Cheap to clone (a shared handle); transfers are throttled
/// here, once, for every producer.
#[derive(Clone)]
pub struct ProgressSink {
    inner: Arc<Inner>,
}

struct Inner {
    emit: Box<Emit>,
    /// Transfers become `"N% of T bytes"` phase lines (for streams without
    /// a transfer event) instead of transfer events.
    as_lines: bool,
    throttle: Mutex<Throttle>,
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressSink")
            .field("as_lines", &self.inner.as_lines)
            .finish_non_exhaustive()
    }
}

impl ProgressSink {
    /// A sink handing events to `emit`, transfers throttled by
    /// [`Throttle::transfers`].
    pub fn new(emit: impl Fn(Event) + Send + Sync + 'static) -> Self {
        Self::make(Box::new(emit), false)
    }

    /// A sink handing phases and warnings to `emit`, and transfers as a
    /// phase line per tenth done (`"40% of 1024 bytes"`, [`Throttle::lines`]).
    pub fn lines(emit: impl Fn(Event) + Send + Sync + 'static) -> Self {
        Self::make(Box::new(emit), true)
    }

    /// A sink that drops everything (operations nobody watches).
    pub fn discard() -> Self {
        Self::new(|_| {})
    }

    /// A sink over this one that tells transfers as lines (see
    /// [`ProgressSink::lines`]), for a nested operation whose bytes are not
    /// worth a progress bar of their own.
    pub fn as_lines(&self) -> Self {
        let outer = self.clone();
        Self::lines(move |ev| outer.emit(ev))
    }

    fn make(emit: Box<Emit>, as_lines: bool) -> Self {
        let throttle = if as_lines {
            Throttle::lines()
        } else {
            Throttle::transfers()
        };
        Self {
            inner: Arc::new(Inner {
                emit,
                as_lines,
                throttle: Mutex::new(throttle),
            }),
        }
    }

    /// `step` began.
    pub fn phase(&self, step: impl Into<Step>, message: impl Into<String>) {
        self.emit(Event::Phase {
            step: step.into(),
            message: message.into(),
        });
    }

    /// Bytes of a transfer in `step` so far (`total` 0 when unknown);
    /// throttled.
    pub fn transfer(&self, step: impl Into<Step>, done: u64, total: u64) {
        let step = step.into();
        let admitted = self
            .inner
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&step, done, total, Instant::now());
        let Some(bucket) = admitted else { return };
        let ev = if self.inner.as_lines {
            Event::Phase {
                step,
                message: format!("{}% of {} bytes", bucket * 10, total),
            }
        } else {
            Event::Transfer { step, done, total }
        };
        (self.inner.emit)(ev);
    }

    /// Something skipped or degraded that the user should know of.
    pub fn warn(&self, message: impl Into<String>) {
        self.emit(Event::Warning(message.into()));
    }

    /// Hands `ev` on; a transfer goes through the throttle.
    pub fn emit(&self, ev: Event) {
        match ev {
            Event::Transfer { step, done, total } => self.transfer(step, done, total),
            ev => (self.inner.emit)(ev),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn transfers_go_out_per_percent_at_most_every_100ms_and_always_the_last() {
        let mut t = Throttle::transfers();
        let t0 = Instant::now();
        let step = Step::Download;
        assert_eq!(t.admit(&step, 0, 1000, t0), Some(0), "first update");
        assert_eq!(t.admit(&step, 5, 1000, ms(t0, 200)), None, "same percent");
        assert_eq!(t.admit(&step, 20, 1000, ms(t0, 50)), None, "too soon");
        assert_eq!(t.admit(&step, 20, 1000, ms(t0, 100)), Some(2));
        assert_eq!(t.admit(&step, 990, 1000, ms(t0, 150)), None, "too soon");
        assert_eq!(t.admit(&step, 1000, 1000, ms(t0, 151)), Some(100), "final");
        assert_eq!(t.admit(&step, 1000, 1000, ms(t0, 500)), None, "final once");
        // Steps are throttled apart: another step's first update goes out.
        assert_eq!(t.admit(&Step::Extract, 1, 1000, ms(t0, 151)), Some(0));
    }

    #[test]
    fn a_thousand_updates_in_a_second_make_at_most_eleven_events() {
        let mut t = Throttle::transfers();
        let t0 = Instant::now();
        let out = (0..=1000u64)
            .filter(|&i| t.admit(&Step::Download, i, 1000, ms(t0, i)).is_some())
            .count();
        assert_eq!(out, 11, "0 ms, every 100 ms, and the final one");
    }

    #[test]
    fn unknown_sizes_go_out_per_mib_as_transfers_and_not_as_lines() {
        let t0 = Instant::now();
        let mut t = Throttle::transfers();
        assert_eq!(t.admit(&Step::Download, 1 << 20, 0, t0), Some(1));
        assert_eq!(
            t.admit(&Step::Download, (1 << 20) + 5, 0, ms(t0, 500)),
            None
        );
        assert_eq!(t.admit(&Step::Download, 2 << 20, 0, ms(t0, 500)), Some(2));
        assert_eq!(
            Throttle::lines().admit(&Step::Download, 1 << 20, 0, t0),
            None
        );
    }

    fn collect(make: fn(Box<Emit>) -> ProgressSink) -> (ProgressSink, Arc<Mutex<Vec<Event>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink = make(Box::new(move |ev| s.lock().expect("lock").push(ev)));
        (sink, seen)
    }

    #[test]
    fn a_lines_sink_tells_each_tenth_once() {
        let (sink, seen) = collect(ProgressSink::lines);
        sink.phase(Step::Download, "pulling");
        for done in (0..=1000).step_by(7).chain([1000]) {
            sink.transfer(Step::Download, done, 1000);
        }
        sink.warn("careful");
        let seen = seen.lock().expect("lock");
        let lines: Vec<String> = seen
            .iter()
            .filter_map(|ev| match ev {
                Event::Phase { step, message } if *step == Step::Download => Some(message.clone()),
                _ => None,
            })
            .collect();
        let mut want = vec!["pulling".to_string()];
        want.extend((0..=10).map(|t| format!("{}% of 1000 bytes", t * 10)));
        assert_eq!(lines, want);
        assert_eq!(seen.last(), Some(&Event::Warning("careful".into())));
        assert!(!seen.iter().any(|e| matches!(e, Event::Transfer { .. })));
    }

    #[test]
    fn a_nested_lines_sink_reports_through_its_parent() {
        let (sink, seen) = collect(ProgressSink::new);
        let nested = sink.as_lines();
        nested.transfer(Step::Extract, 500, 1000);
        nested.warn("w");
        sink.transfer(Step::Download, 0, 10);
        let seen = seen.lock().expect("lock");
        assert_eq!(
            *seen,
            [
                Event::Phase {
                    step: Step::Extract,
                    message: "50% of 1000 bytes".into()
                },
                Event::Warning("w".into()),
                Event::Transfer {
                    step: Step::Download,
                    done: 0,
                    total: 10
                },
            ]
        );
    }
}
