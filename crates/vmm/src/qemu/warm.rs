//! Warm starts under QEMU: which versions can, and the machine a restore
//! starts.

use super::check_macs;
use crate::{LaunchSpec, RestoreSpec, VmmError, WarmSupport};

/// The first QEMU whose migration has `mapped-ram` (a file with a fixed
/// offset per RAM page, so restore reads a bounded file).
const MIN_WARM_VERSION: (i64, i64) = (9, 0);
/// The migration capability warm starts need.
const MAPPED_RAM: &str = "mapped-ram";

/// Whether a QEMU of `version` listing `caps` can save to and restore from
/// a file.
pub fn judge_warm(version: (i64, i64, i64), caps: &[String]) -> WarmSupport {
    let (major, minor, micro) = version;
    let id = format!("QEMU {major}.{minor}.{micro}");
    if (major, minor) < MIN_WARM_VERSION {
        return WarmSupport::Unsupported(format!(
            "{id} cannot restore from a file ({MAPPED_RAM} needs QEMU >= {}.{})",
            MIN_WARM_VERSION.0, MIN_WARM_VERSION.1
        ));
    }
    if !caps.iter().any(|c| c == MAPPED_RAM) {
        return WarmSupport::Unsupported(format!("{id} has no {MAPPED_RAM} migration capability"));
    }
    WarmSupport::Supported { id }
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
