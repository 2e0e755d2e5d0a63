//! The one writer of a VM's state.

use crate::error::{Chain, store_kind};
use crate::{Daemon, ErrorKind};
use banger_model::{VmName, VmRecord, VmState};
use banger_store::StoreError;

/// Why a VM's state was not changed.
///
/// Each message carries its causes and no variant has a `source()`: a boot
/// wraps this error in `anyhow` and prints it with `{:#}`, which would
/// otherwise say a cause twice.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The move is not in [`VmState::can_move_to`]'s table: a bug of the
    /// caller, refused so that the store never records it.
    #[error("VM {name} cannot go from {from} to {to}")]
    Illegal {
        name: VmName,
        from: VmState,
        to: VmState,
    },
    /// Recording the state failed.
    #[error("{}", Chain(.0))]
    Store(StoreError),
}

impl StateError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::Illegal { .. } => ErrorKind::Conflict,
            StateError::Store(e) => store_kind(e),
        }
    }
}

// By hand, not `#[from]`: that would make the cause a `source()` too.
impl From<StoreError> for StateError {
    fn from(e: StoreError) -> Self {
        StateError::Store(e)
    }
}

impl Daemon {
    /// Records `vm` in state `to` with its VMM's pid and last error, and
    /// updates `vm` to match what is stored. A move that
    /// [`VmState::can_move_to`] does not allow is refused, and neither the
    /// store nor `vm` changes.
    pub(crate) fn set_state(
        &self,
        vm: &mut VmRecord,
        to: VmState,
        pid: Option<u32>,
        error: Option<&str>,
    ) -> Result<(), StateError> {
        let from = vm.state;
        if !from.can_move_to(to) {
            tracing::error!(vm = %vm.name, %from, %to, "illegal VM state change refused");
            return Err(StateError::Illegal {
                name: vm.name.clone(),
                from,
                to,
            });
        }
        self.store.set_vm_state(&vm.id, to, pid, error)?;
        vm.state = to;
        vm.pid = pid;
        vm.last_error = error.map(str::to_string);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::StateError;
    use crate::vm::tests::{daemon, record};
    use banger_model::VmState;

    #[test]
    fn a_state_change_is_stored_and_mirrored() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let mut vm = record(&d, "calm-otter", VmState::Stopped);
        d.set_state(&mut vm, VmState::Starting, Some(42), None)
            .expect("starting");
        d.set_state(&mut vm, VmState::Error, Some(42), Some("no greeting"))
            .expect("error");
        let stored = d.store.get_vm(&vm.id).expect("get");
        for v in [&vm, &stored] {
            assert_eq!(v.state, VmState::Error);
            assert_eq!(v.pid, Some(42));
            assert_eq!(v.last_error.as_deref(), Some("no greeting"));
        }
    }

    #[test]
    fn an_illegal_change_is_refused_and_changes_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let mut vm = record(&d, "calm-otter", VmState::Stopped);
        let e = d
            .set_state(&mut vm, VmState::Running, Some(7), None)
            .expect_err("stopped -> running skips starting");
        assert!(
            matches!(
                e,
                StateError::Illegal {
                    from: VmState::Stopped,
                    to: VmState::Running,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter cannot go from stopped to running"
        );
        let stored = d.store.get_vm(&vm.id).expect("get");
        for v in [&vm, &stored] {
            assert_eq!((v.state, v.pid), (VmState::Stopped, None));
        }
        // Through a typed operation error, the same kind and message.
        let e = crate::DaemonError::from(crate::vm::StartError::from(e));
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter cannot go from stopped to running"
        );
    }
}
