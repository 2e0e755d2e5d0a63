//! The one writer of a VM's state.

use crate::Daemon;
use banger_model::{VmRecord, VmState};
use banger_store::StoreError;

impl Daemon {
    /// Records `vm` in state `to` with its VMM's pid and last error, and
    /// updates `vm` to match what is stored. The move is checked against
    /// [`VmState::can_move_to`]: an illegal one is a bug, logged (and
    /// asserted in debug builds) but still made.
    pub(crate) fn set_state(
        &self,
        vm: &mut VmRecord,
        to: VmState,
        pid: Option<u32>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let from = vm.state;
        if !from.can_move_to(to) {
            tracing::error!(vm = %vm.name, %from, %to, "illegal VM state change");
            debug_assert!(
                false,
                "illegal VM state change of {}: {from} -> {to}",
                vm.name
            );
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
    #[cfg(debug_assertions)]
    #[should_panic(expected = "illegal VM state change of calm-otter: stopped -> running")]
    fn an_illegal_change_is_caught_in_debug_builds() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        let mut vm = record(&d, "calm-otter", VmState::Stopped);
        let _ = d.set_state(&mut vm, VmState::Running, None, None);
    }
}
