//! Warm starts under Firecracker: which versions can, and the snapshot
//! calls' parameters.

use super::api::{
    MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType,
};
use crate::host::{self, Version};
use crate::{RestoreSpec, VmmError, WarmSupport};
use std::path::Path;

/// The first Firecracker whose snapshot load takes `network_overrides`
/// (CHANGELOG 1.12.0), without which a clone cannot have its own TAP.
pub const MIN_WARM: Version = Version {
    major: 1,
    minor: 12,
    patch: 0,
};

/// `PUT /snapshot/load` for a restore: memory file mapped privately, no
/// dirty page tracking, resumed separately (after the host listens).
pub fn snapshot_load_params(
    vmstate: &Path,
    memory: &Path,
    network_overrides: Vec<NetworkOverride>,
) -> SnapshotLoadParams {
    SnapshotLoadParams {
        snapshot_path: vmstate.to_path_buf(),
        mem_backend: MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: memory.to_path_buf(),
        },
        track_dirty_pages: Some(false),
        resume_vm: Some(false),
        network_overrides,
    }
}

/// `PUT /snapshot/create` for a template: a full snapshot.
pub fn snapshot_create_params(vmstate: &Path, memory: &Path) -> SnapshotCreateParams {
    SnapshotCreateParams {
        snapshot_path: vmstate.to_path_buf(),
        mem_file_path: memory.to_path_buf(),
        snapshot_type: Some(SnapshotType::Full),
    }
}

/// The TAP of each clone interface in place of the template's, by
/// interface id (`eth<i>`, as [`vm_config`] names them).
pub fn network_overrides(spec: &RestoreSpec) -> Result<Vec<NetworkOverride>, VmmError> {
    if spec.launch.nets.len() != spec.template_nets.len() {
        return Err(VmmError::Spec(format!(
            "the template has {} network interface(s), the restore asks for {}",
            spec.template_nets.len(),
            spec.launch.nets.len()
        )));
    }
    spec.launch
        .nets
        .iter()
        .enumerate()
        .map(|(i, net)| match &net.backend {
            crate::NetBackend::Tap { name } => Ok(NetworkOverride {
                iface_id: format!("eth{i}"),
                host_dev_name: name.clone(),
            }),
            crate::NetBackend::User { .. } => Err(VmmError::Spec(
                "Firecracker has no user-mode networking: a clone needs a TAP".into(),
            )),
        })
        .collect()
}

/// Whether Firecracker `version` on a host with `kvm` can snapshot and
/// restore with per-clone TAPs.
pub fn judge_warm(version: Version, kvm: &host::KvmStatus) -> WarmSupport {
    if version < MIN_WARM {
        return WarmSupport::Unsupported(format!(
            "Firecracker v{version} cannot give a restored VM its own TAP (network_overrides needs v{MIN_WARM} or newer)"
        ));
    }
    if !kvm.is_usable() {
        return WarmSupport::Unsupported(format!("Firecracker needs /dev/kvm: {kvm}"));
    }
    WarmSupport::Supported {
        id: format!("Firecracker v{version}"),
    }
}
