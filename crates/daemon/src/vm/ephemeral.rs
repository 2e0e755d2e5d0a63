//! What `banger vm run` asks of a create beyond `vm create`: readiness
//! that includes the guest's sshd (interactive sessions; `vm ssh` waits
//! the same way), and VMs owned by the create request's connection
//! (`--rm`), deleted by the daemon when that connection closes, so a killed
//! CLI cannot leak its VM.

use crate::Daemon;
use banger_api::CreateVmEvent;
use banger_model::VmRecord;
use std::sync::Arc;
use tokio::sync::mpsc;

impl Daemon {
    /// Keeps an ephemeral VM (`vm run --rm`) alive while its create
    /// response is being read: when the client's connection closes (`tx`'s
    /// receiver, the response stream, is dropped), the VM is deleted. A
    /// daemon shutdown ends the hold and keeps the VM (it survives daemon
    /// restarts; the CLI deletes it itself when its run ends).
    pub async fn hold_ephemeral(
        self: &Arc<Self>,
        vm: VmRecord,
        tx: mpsc::UnboundedSender<CreateVmEvent>,
    ) {
        tokio::select! {
            _ = tx.closed() => {}
            _ = self.shutdown.cancelled() => return,
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        match self.delete_vm(vm.id.as_str()).await {
            Ok(_) => {
                tracing::info!(vm = %vm.name, "deleted ephemeral VM: its client went away")
            }
            // The client deleted it itself before closing: the usual case.
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "could not delete ephemeral VM")
            }
        }
    }
}
