//! Warm starts under QEMU: which versions can, the template's memory
//! file, and the machine a restore starts.
//!
//! A template's guest runs with its RAM in a file mapped shared, so when it
//! is paused its memory *is* the snapshot; migration with `x-ignore-shared`
//! then writes only the device state. A restore maps that file privately
//! and read-only (`share=off,readonly=on,rom=off`): nothing is loaded up
//! front, pages fault in as the clone touches them, and no clone can write
//! the template. Firecracker restores the same way (`MAP_PRIVATE`).

use super::check_macs;
use crate::{LaunchSpec, RestoreSpec, VmmError, WarmSupport};
use std::path::Path;

/// The first QEMU whose file memory backend maps a read-only file
/// privately and writable for the guest (`rom=off`).
const MIN_WARM_VERSION: (i64, i64) = (8, 2);
/// The migration capability warm starts need: file-backed RAM stays out
/// of the stream.
const IGNORE_SHARED: &str = "x-ignore-shared";

/// Whether a QEMU of `version` listing `caps` can save to and restore from
/// a file.
pub fn judge_warm(version: (i64, i64, i64), caps: &[String]) -> WarmSupport {
    let (major, minor, micro) = version;
    let id = format!("QEMU {major}.{minor}.{micro}");
    if (major, minor) < MIN_WARM_VERSION {
        return WarmSupport::Unsupported(format!(
            "{id} cannot restore from a memory file (a private mapping of a read-only file needs QEMU >= {}.{})",
            MIN_WARM_VERSION.0, MIN_WARM_VERSION.1
        ));
    }
    if !caps.iter().any(|c| c == IGNORE_SHARED) {
        return WarmSupport::Unsupported(format!(
            "{id} has no {IGNORE_SHARED} migration capability"
        ));
    }
    WarmSupport::Supported { id }
}

/// Makes `file` the empty (sparse) memory of a `memory_mib` guest, the
/// owner's only, replacing what was there.
pub(super) fn create_memory_file(file: &Path, memory_mib: u64) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| VmmError::io(format!("create {}", file.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| VmmError::io(format!("chmod {}", file.display()), e))?;
    f.set_len(memory_mib << 20)
        .map_err(|e| VmmError::io(format!("size {}", file.display()), e))
}

/// Refuses a memory file that is not exactly a `memory_mib` guest's RAM:
/// QEMU would map a short file and fault (SIGBUS) when the guest reached
/// past its end.
pub(super) fn check_memory_file(file: &Path, memory_mib: u64) -> Result<(), VmmError> {
    let size = std::fs::metadata(file)
        .map_err(|e| VmmError::io(format!("snapshot memory {}", file.display()), e))?
        .len();
    let want = memory_mib << 20;
    if size != want {
        return Err(VmmError::Spec(format!(
            "snapshot memory {} is {size} bytes, the guest has {want}",
            file.display()
        )));
    }
    Ok(())
}

/// The launch spec a restore starts QEMU with: the clone's files, the
/// template's MACs (the machine must be identical; the guest's MAC is in
/// the migration stream anyway).
pub(super) fn incoming_launch(spec: &RestoreSpec) -> Result<LaunchSpec, VmmError> {
    let mut launch = spec.launch.clone();
    if launch.nets.len() != spec.template_nets.len() {
        return Err(VmmError::Spec(format!(
            "the template has {} network interface(s), the restore asks for {}",
            spec.template_nets.len(),
            launch.nets.len()
        )));
    }
    for (net, template) in launch.nets.iter_mut().zip(&spec.template_nets) {
        if std::mem::discriminant(&net.backend) != std::mem::discriminant(&template.backend) {
            return Err(VmmError::Spec(format!(
                "the template's interface is on {}, the restore's on {}: the network kind must match",
                template.describe(),
                net.describe()
            )));
        }
        net.mac.clone_from(&template.mac);
    }
    check_macs(&launch.nets)?;
    Ok(launch)
}
