//! The VM registry: one [`VmHandle`] per VM the daemon acts on, holding
//! everything it knows about that VM at run time (the operation lock, the
//! agent connection, the exit signal, the last boot's facts, the network
//! lease). A handle is made on first use and removed when its VM is
//! deleted.

use crate::net::NetLease;
use crate::vm::BootFacts;
use banger_agent_proto::client::AgentClient;
use banger_model::VmId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{OwnedMutexGuard, watch};

/// The handles of the VMs this daemon has acted on since it started.
#[derive(Default)]
pub(crate) struct VmRegistry {
    handles: Mutex<HashMap<VmId, Arc<VmHandle>>>,
}

impl VmRegistry {
    fn map(&self) -> MutexGuard<'_, HashMap<VmId, Arc<VmHandle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle of VM `id`, made if there is none yet.
    pub(crate) fn handle(&self, id: &VmId) -> Arc<VmHandle> {
        self.map()
            .entry(id.clone())
            .or_insert_with(|| Arc::new(VmHandle::new(id.clone())))
            .clone()
    }

    /// The handle of VM `id` if it has one. Readers and the exit watcher
    /// use this: they must never bring back the handle of a deleted VM.
    pub(crate) fn existing(&self, id: &VmId) -> Option<Arc<VmHandle>> {
        self.map().get(id).cloned()
    }

    /// Forgets `handle`, if it is still the one registered for its VM.
    /// Delete calls this while it holds the handle's operation lock: a
    /// waiter on that lock then re-reads the record and finds no VM.
    pub(crate) fn remove(&self, handle: &Arc<VmHandle>) {
        let mut map = self.map();
        if map.get(&handle.id).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            map.remove(&handle.id);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

/// Everything the daemon holds about one VM at run time.
pub(crate) struct VmHandle {
    id: VmId,
    /// Held for a whole operation on the VM (start, stop, delete, ...).
    op: Arc<tokio::sync::Mutex<()>>,
    /// The agent connection, live while the guest runs.
    agent: Mutex<Option<AgentClient>>,
    /// A new channel per launch; true once that launch's VMM has exited.
    exit: Mutex<Option<watch::Sender<bool>>>,
    /// How the last boot went (initramfs, agent hello).
    boot: Mutex<Option<BootFacts>>,
    /// The host side of its network while it runs (TAP, NAT rules, DNS
    /// name, ssh forward): what `net_down` undoes.
    net: Mutex<Option<NetLease>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmHandle {
    fn new(id: VmId) -> Self {
        Self {
            id,
            op: Arc::default(),
            agent: Mutex::default(),
            exit: Mutex::default(),
            boot: Mutex::default(),
            net: Mutex::default(),
        }
    }

    pub(crate) fn id(&self) -> &VmId {
        &self.id
    }

    /// Takes the operation lock; it is released when the guard drops.
    pub(crate) async fn lock_op(&self) -> OwnedMutexGuard<()> {
        self.op.clone().lock_owned().await
    }

    /// Whether an operation holds the lock now.
    #[cfg(test)]
    pub(crate) fn is_busy(&self) -> bool {
        self.op.try_lock().is_err()
    }

    pub(crate) fn agent(&self) -> Option<AgentClient> {
        lock(&self.agent).clone()
    }

    /// Forgets the agent and hands it back, before a deliberate end.
    pub(crate) fn take_agent(&self) -> Option<AgentClient> {
        lock(&self.agent).take()
    }

    /// Records the live agent (or none). A connection that ends while it
    /// is still recorded here is logged: see [`watch_agent_loss`].
    pub(crate) fn set_agent(self: &Arc<Self>, client: Option<AgentClient>) {
        *lock(&self.agent) = client.clone();
        if let Some(c) = client {
            watch_agent_loss(Arc::downgrade(self), c);
        }
    }

    pub(crate) fn boot_facts(&self) -> Option<BootFacts> {
        *lock(&self.boot)
    }

    pub(crate) fn set_boot_facts(&self, facts: Option<BootFacts>) {
        *lock(&self.boot) = facts;
    }

    /// Records the network lease of a new boot, handing back the one it
    /// replaces (holding a TAP or NAT rules, that one was never released).
    pub(crate) fn set_net(&self, lease: NetLease) -> Option<NetLease> {
        lock(&self.net).replace(lease)
    }

    /// Forgets the network lease and hands it back, to release it.
    pub(crate) fn take_net(&self) -> Option<NetLease> {
        lock(&self.net).take()
    }

    /// Changes the network lease in place; false when there is none.
    pub(crate) fn update_net(&self, f: impl FnOnce(&mut NetLease)) -> bool {
        lock(&self.net).as_mut().map(f).is_some()
    }

    #[cfg(test)]
    pub(crate) fn net(&self) -> Option<NetLease> {
        lock(&self.net).clone()
    }

    /// A new exit signal for a new launch, replacing the last one.
    pub(crate) fn new_exit(&self) -> watch::Sender<bool> {
        let (tx, _) = watch::channel(false);
        *lock(&self.exit) = Some(tx.clone());
        tx
    }

    /// Waits on the current launch's exit signal, if its VMM is watched.
    pub(crate) fn subscribe_exit(&self) -> Option<watch::Receiver<bool>> {
        lock(&self.exit).as_ref().map(|tx| tx.subscribe())
    }
}

/// Logs an agent connection that ends while its VM still counts it as live:
/// every deliberate end (stop, delete, restore) forgets the client first, so
/// this line is the trace of a guest or VMM that dropped the host.
fn watch_agent_loss(handle: Weak<VmHandle>, client: AgentClient) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        client.closed().await;
        let Some(h) = handle.upgrade() else {
            return;
        };
        if h.agent().is_some_and(|a| a.is_closed()) {
            tracing::warn!(vm = %h.id, "agent connection lost while the VM was running");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> VmId {
        VmId(c.to_string().repeat(32))
    }

    #[test]
    fn a_handle_is_made_once_and_reused() {
        let r = VmRegistry::default();
        assert!(r.existing(&id('a')).is_none(), "existing never makes one");
        let h = r.handle(&id('a'));
        assert!(Arc::ptr_eq(&h, &r.handle(&id('a'))));
        assert!(Arc::ptr_eq(&h, &r.existing(&id('a')).expect("registered")));
        assert!(!Arc::ptr_eq(&h, &r.handle(&id('b'))));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_removed_handle_is_gone_and_a_stale_one_removes_nothing() {
        let r = VmRegistry::default();
        let old = r.handle(&id('a'));
        old.set_boot_facts(Some(BootFacts {
            initrd: crate::vm::BootInitrd::None,
            hello_ms: 7,
            tap: None,
        }));
        r.remove(&old);
        assert!(r.existing(&id('a')).is_none());
        assert_eq!(r.len(), 0);
        let new = r.handle(&id('a'));
        assert!(
            !Arc::ptr_eq(&old, &new),
            "a new handle, not the removed one"
        );
        assert!(new.boot_facts().is_none(), "nothing carried over");
        r.remove(&old);
        assert!(
            r.existing(&id('a')).is_some_and(|h| Arc::ptr_eq(&h, &new)),
            "removing the stale handle left the new one"
        );
    }

    #[tokio::test]
    async fn the_op_lock_is_the_handles() {
        let r = VmRegistry::default();
        let g = r.handle(&id('a')).lock_op().await;
        let h = r.handle(&id('a'));
        assert!(h.op.try_lock().is_err(), "held through any clone");
        drop(g);
        assert!(h.op.try_lock().is_ok());
    }

    #[tokio::test]
    async fn each_launch_gets_its_own_exit_signal() {
        let h = VmHandle::new(id('a'));
        assert!(h.subscribe_exit().is_none(), "not watched before a launch");
        let first = h.new_exit();
        let mut old = h.subscribe_exit().expect("watched");
        let second = h.new_exit();
        let mut new = h.subscribe_exit().expect("watched");
        first.send(true).expect("a receiver");
        old.wait_for(|gone| *gone).await.expect("first exit seen");
        assert!(!*new.borrow_and_update(), "the new launch has not exited");
        second.send(true).expect("a receiver");
        new.wait_for(|gone| *gone).await.expect("second exit seen");
    }

    /// A log line sink for one test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_recorded_agent_that_drops_is_logged_as_lost() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        // The test runtime runs every task on this thread.
        let _log = tracing::subscriber::set_default(subscriber);
        let h = Arc::new(VmHandle::new(id('a')));
        let (host, guest) = tokio::io::duplex(1024);
        let agent = AgentClient::spawn(host);
        h.set_agent(Some(agent.clone()));
        drop(guest);
        agent.closed().await;
        let logged = || String::from_utf8_lossy(&lock(&lines.0)).into_owned();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !logged().contains("agent connection lost while the VM was running") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no loss logged: {}", logged()));
        assert!(logged().contains(&"a".repeat(32)), "names the VM");
    }
}
