//! A step runner with per-step rollback.
//!
//! A lifecycle operation is a list of named steps. Each step may register an
//! undo. When a step fails, the undos of every completed step *and of the
//! failing step* (it may have acquired something before failing) run in
//! reverse order; their errors are joined after the root cause, which stays
//! first so callers and users see why the operation failed.

use banger_api::ProgressSink;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::{Arc, Mutex};

/// An undo action: runs at most once, during rollback.
pub type Undo<'a> = Box<dyn FnOnce() -> BoxFuture<'a, anyhow::Result<()>> + Send + 'a>;

/// Errors of a rolled-back run: the root cause, then any undo failures.
#[derive(Debug)]
pub struct StepError {
    pub step: &'static str,
    pub cause: anyhow::Error,
    pub rollback_errors: Vec<(&'static str, anyhow::Error)>,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.cause)?;
        for (step, e) in &self.rollback_errors {
            write!(f, "; also, undoing {step} failed: {e:#}")?;
        }
        Ok(())
    }
}

/// No `source()`: the message above already carries the cause's whole
/// chain (and the undo failures after it), so a chain printer would say
/// the cause twice. Callers that need the cause take [`StepError::cause`].
impl std::error::Error for StepError {}

/// Collects undos while steps run; rolls back on failure.
pub struct Steps<'a> {
    undos: Vec<(&'static str, Undo<'a>)>,
    /// Told of each step as it begins.
    progress: ProgressSink,
}

impl<'a> Steps<'a> {
    /// Each step's name and message go to `progress` as it begins.
    pub fn new(progress: &ProgressSink) -> Self {
        Self {
            undos: Vec::new(),
            progress: progress.clone(),
        }
    }

    /// Runs one step. The step receives an [`UndoSlot`] where it registers its
    /// undo as soon as it has acquired something, even if it fails later.
    pub async fn run<T, F, Fut>(
        &mut self,
        name: &'static str,
        message: &str,
        f: F,
    ) -> Result<T, StepError>
    where
        F: FnOnce(UndoSlot<'a>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        self.progress.phase(name, message);
        let started = std::time::Instant::now();
        let slot = UndoSlot(Arc::new(Mutex::new(None)));
        let result = f(slot.clone()).await;
        tracing::debug!(
            step = name,
            ok = result.is_ok(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step ended"
        );
        if let Some(u) = slot.0.lock().ok().and_then(|mut s| s.take()) {
            self.undos.push((name, u));
        }
        match result {
            Ok(v) => Ok(v),
            Err(cause) => {
                tracing::warn!(step = name, error = %format!("{cause:#}"), "step failed, rolling back");
                let rollback_errors = self.rollback().await;
                Err(StepError {
                    step: name,
                    cause,
                    rollback_errors,
                })
            }
        }
    }

    /// Runs every registered undo in reverse order (also usable when a later,
    /// non-step failure means the whole operation must be undone).
    pub async fn rollback(&mut self) -> Vec<(&'static str, anyhow::Error)> {
        let mut errors = Vec::new();
        while let Some((name, undo)) = self.undos.pop() {
            if let Err(e) = undo().await {
                tracing::warn!(step = name, error = %format!("{e:#}"), "undo failed");
                errors.push((name, e));
            }
        }
        errors
    }

    /// Takes over the undos of `other` (an attempt run under its own
    /// steps, so that its failure rolled back only itself), to run after
    /// this runner's own in a later rollback.
    pub fn absorb(&mut self, mut other: Steps<'a>) {
        self.undos.append(&mut other.undos);
    }

    /// Forgets the undos: the operation succeeded and keeps what it made.
    pub fn commit(mut self) {
        self.undos.clear();
    }
}

/// Where a step registers its undo (a handle: the step owns a clone).
#[derive(Clone)]
pub struct UndoSlot<'a>(Arc<Mutex<Option<Undo<'a>>>>);

impl<'a> UndoSlot<'a> {
    pub fn set<F, Fut>(&self, f: F)
    where
        F: FnOnce() -> Fut + Send + 'a,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'a,
    {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(Box::new(move || Box::pin(f())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    fn push(log: &Log, s: &str) {
        log.lock().expect("log").push(s.to_string());
    }

    async fn ok_step(
        steps: &mut Steps<'_>,
        log: &Log,
        name: &'static str,
        with_undo: bool,
    ) -> Result<(), StepError> {
        let log2 = log.clone();
        steps
            .run(name, "", |u: UndoSlot<'_>| async move {
                push(&log2, &format!("run {name}"));
                if with_undo {
                    let l = log2.clone();
                    u.set(move || async move {
                        push(&l, &format!("undo {name}"));
                        Ok(())
                    });
                }
                Ok(())
            })
            .await
    }

    #[tokio::test]
    async fn rolls_back_in_reverse_including_the_failing_step() {
        let log: Log = Arc::default();
        let mut steps = Steps::new(&ProgressSink::discard());
        ok_step(&mut steps, &log, "a", true).await.expect("a");
        ok_step(&mut steps, &log, "b", true).await.expect("b");
        let l = log.clone();
        let err = steps
            .run("c", "", |u: UndoSlot<'_>| async move {
                let l2 = l.clone();
                u.set(move || async move {
                    push(&l2, "undo c");
                    Ok(())
                });
                Err::<(), _>(anyhow::anyhow!("disk full"))
            })
            .await
            .expect_err("c fails");
        assert_eq!(err.step, "c");
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(
            *log.lock().expect("log"),
            ["run a", "run b", "undo c", "undo b", "undo a"]
        );
    }

    #[tokio::test]
    async fn steps_without_undo_are_skipped() {
        let log: Log = Arc::default();
        let mut steps = Steps::new(&ProgressSink::discard());
        ok_step(&mut steps, &log, "a", true).await.expect("a");
        ok_step(&mut steps, &log, "b", false).await.expect("b");
        steps
            .run("c", "", |_| async { Err::<(), _>(anyhow::anyhow!("boom")) })
            .await
            .expect_err("c");
        assert_eq!(*log.lock().expect("log"), ["run a", "run b", "undo a"]);
    }

    #[tokio::test]
    async fn undo_errors_do_not_hide_the_cause() {
        let mut steps = Steps::new(&ProgressSink::discard());
        steps
            .run("a", "", |u: UndoSlot<'_>| async move {
                u.set(|| async { anyhow::bail!("cannot remove tap") });
                Ok(())
            })
            .await
            .expect("a");
        let err = steps
            .run("b", "", |_| async {
                Err::<(), _>(anyhow::anyhow!("qemu died"))
            })
            .await
            .expect_err("b");
        assert_eq!(err.cause.to_string(), "qemu died");
        assert_eq!(err.rollback_errors.len(), 1);
        assert_eq!(
            err.to_string(),
            "qemu died; also, undoing a failed: cannot remove tap"
        );
    }

    #[tokio::test]
    async fn a_wrapped_step_error_says_its_cause_once() {
        let mut steps = Steps::new(&ProgressSink::discard());
        let err = steps
            .run("boot", "", |_| async {
                Err::<(), _>(anyhow::anyhow!("no vmlinux").context("kernel k"))
            })
            .await
            .expect_err("boot");
        // What the daemon does with it: an anyhow error printed with its chain.
        let wrapped = anyhow::Error::from(err);
        assert_eq!(format!("{wrapped:#}"), "kernel k: no vmlinux");
    }

    #[tokio::test]
    async fn happy_path_fires_no_undo() {
        let log: Log = Arc::default();
        let names: Arc<Mutex<Vec<banger_api::Step>>> = Arc::default();
        let n2 = names.clone();
        let mut steps = Steps::new(&ProgressSink::new(move |ev| {
            if let banger_api::Event::Phase { step, .. } = ev {
                n2.lock().expect("names").push(step)
            }
        }));
        ok_step(&mut steps, &log, "a", true).await.expect("a");
        ok_step(&mut steps, &log, "b", true).await.expect("b");
        steps.commit();
        assert_eq!(*log.lock().expect("log"), ["run a", "run b"]);
        assert_eq!(*names.lock().expect("names"), ["a".into(), "b".into()]);
    }
}
