//! A pool of idle TAP devices, so creating a VM does not wait for one.
//!
//! A background task keeps `size` TAPs ready (created, owned by the VMM's
//! user, attached to the bridge, up). [`TapPool::acquire`] hands one out at
//! once, or creates one on the spot when the pool is empty. Released TAPs
//! are deleted rather than reused: a fresh device carries no state from the
//! previous VM. The deletion goes on after [`TapPool::release`] returns
//! (the kernel's unregistering of a device takes 15-25 ms, which a VM's
//! stop or delete need not wait for); [`TapPool::shutdown`] waits for it.
//! On start the pool deletes every banger TAP a previous daemon left,
//! except those the caller says are in use: a leftover may be one whose
//! deletion that daemon had not finished, and nothing tells it apart from
//! an idle one.

use crate::host::{HostNet, HostNetError};
use crate::ifname::{IfName, TapName};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// A pool operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Host(#[from] HostNetError),
    #[error("bridge {0} does not exist: set it up before starting the TAP pool")]
    NoBridge(IfName),
}

/// How the pool makes its TAPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub bridge: IfName,
    /// The uid the VMM runs as; it may open the TAPs without privileges.
    pub owner_uid: u32,
    /// Idle TAPs to keep ready (`tap_pool_size`); 0 disables the pool.
    pub size: usize,
}

/// A TAP handed to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquiredTap {
    pub name: TapName,
    /// Taken from the pool (`true`) or created on demand (`false`).
    pub warm: bool,
    /// How long [`TapPool::acquire`] took to hand it out.
    pub took: Duration,
}

struct Inner {
    host: Arc<dyn HostNet>,
    cfg: PoolConfig,
    idle: Mutex<VecDeque<TapName>>,
    wake: Notify,
    level: watch::Sender<usize>,
    closed: AtomicBool,
    /// How long the latest TAP creation took (refill or on demand).
    last_create: Mutex<Option<Duration>>,
}

impl Inner {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<TapName>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, idle: &VecDeque<TapName>) {
        self.level.send_replace(idle.len());
    }

    async fn create(&self) -> Result<TapName, HostNetError> {
        let tap = TapName::random();
        let start = Instant::now();
        self.host
            .create_tap(&tap, self.cfg.owner_uid, &self.cfg.bridge)
            .await?;
        *self.last_create.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(tap)
    }
}

/// The TAP pool. Dropping it stops the refill task; [`TapPool::shutdown`]
/// also deletes the idle TAPs and waits for the released ones.
pub struct TapPool {
    inner: Arc<Inner>,
    /// The refill task, until [`TapPool::shutdown`] takes it.
    task: Mutex<Option<JoinHandle<()>>>,
    /// How many released TAPs are still being deleted.
    deleting: Arc<watch::Sender<usize>>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl TapPool {
    /// Starts the refill task on the current tokio runtime, and deletes the
    /// banger TAPs not in `in_use` beside it (as released ones are).
    pub async fn start(
        host: Arc<dyn HostNet>,
        cfg: PoolConfig,
        in_use: &HashSet<TapName>,
    ) -> Result<Self, PoolError> {
        if host.bridge_index(&cfg.bridge).await?.is_none() {
            return Err(PoolError::NoBridge(cfg.bridge.clone()));
        }
        let leftovers: Vec<TapName> = host
            .list_taps()
            .await?
            .into_iter()
            .map(|t| t.name)
            .filter(|name| !in_use.contains(name))
            .collect();
        let (level, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            host,
            cfg,
            idle: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            level,
            closed: AtomicBool::new(false),
            last_create: Mutex::new(None),
        });
        let task = tokio::spawn(refill(inner.clone()));
        let pool = Self {
            inner,
            task: Mutex::new(Some(task)),
            deleting: Arc::new(watch::channel(0).0),
        };
        for tap in leftovers {
            tracing::info!(%tap, "deleting leftover TAP");
            pool.release(&tap);
        }
        Ok(pool)
    }

    /// A TAP for a new VM: from the pool when one is ready, else created now.
    pub async fn acquire(&self) -> Result<AcquiredTap, PoolError> {
        let start = Instant::now();
        let warm = {
            let mut idle = self.inner.idle();
            let t = idle.pop_front();
            self.inner.publish(&idle);
            t
        };
        self.inner.wake.notify_one();
        let (name, warm) = match warm {
            Some(name) => (name, true),
            None => (self.inner.create().await?, false),
        };
        Ok(AcquiredTap {
            name,
            warm,
            took: start.elapsed(),
        })
    }

    /// Gives back a VM's TAP: it is deleted, the pool makes fresh ones.
    /// Returns at once; the deletion goes on in the background, and its
    /// failure is logged (a later daemon start deletes the leftover).
    pub fn release(&self, tap: &TapName) {
        self.release_after(tap, std::future::ready(()));
    }

    /// [`Self::release`], deleting the TAP only once `first` has run (its
    /// VM's address checks going, say), in the same background task.
    pub fn release_after<F>(&self, tap: &TapName, first: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (host, tap) = (self.inner.host.clone(), tap.clone());
        let pending = Pending::new(self.deleting.clone());
        tokio::spawn(async move {
            let _pending = pending;
            first.await;
            if let Err(e) = host.delete_tap(&tap).await {
                tracing::warn!(%tap, error = %e, "deleting a released TAP");
            }
        });
    }

    /// Waits until the TAPs released so far are deleted (or failed to be).
    pub async fn released(&self) {
        let mut rx = self.deleting.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// How many TAPs are ready right now.
    pub fn idle_count(&self) -> usize {
        self.inner.idle().len()
    }

    /// How long the latest TAP creation took, whether the refill made it
    /// or [`Self::acquire`] did on an empty pool: what a VM waits for its
    /// TAP when the pool is empty. `None` until one was made.
    pub fn last_create(&self) -> Option<Duration> {
        *self
            .inner
            .last_create
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The configured pool size.
    pub fn size(&self) -> usize {
        self.inner.cfg.size
    }

    /// Waits until at least `n` TAPs are idle; `false` on timeout.
    pub async fn wait_idle(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.inner.level.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|level| *level >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops the refill task (after the TAP it may be creating), deletes
    /// the idle TAPs and waits for the deletions of released ones. TAPs
    /// handed out stay. A TAP acquired after this is made on the spot.
    pub async fn shutdown(&self) -> Result<(), PoolError> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let idle: Vec<TapName> = self.inner.idle().drain(..).collect();
        self.inner.level.send_replace(0);
        for tap in idle {
            self.inner.host.delete_tap(&tap).await?;
        }
        self.released().await;
        Ok(())
    }
}

impl Drop for TapPool {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

/// One deletion under way, counted while it lives.
struct Pending(Arc<watch::Sender<usize>>);

impl Pending {
    fn new(count: Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn refill(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(250);
    while !inner.closed.load(Ordering::SeqCst) {
        if inner.idle().len() >= inner.cfg.size {
            inner.wake.notified().await;
            continue;
        }
        match inner.create().await {
            Ok(tap) => {
                let mut idle = inner.idle();
                idle.push_back(tap);
                inner.publish(&idle);
                backoff = Duration::from_millis(250);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "refilling the TAP pool");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = inner.wake.notified() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
