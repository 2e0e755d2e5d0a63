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

/// The page size zero runs are found at.
const PAGE: usize = 4096;
/// How much of the memory file is read at a time (a multiple of [`PAGE`]).
const CHUNK: usize = 1 << 20;

/// Punches holes where a snapshot's memory file holds whole pages of
/// zeros: Firecracker writes every page of guest RAM, a mostly idle guest
/// has most of them zero. The file keeps its size (it is the guest's RAM,
/// mapped at restore, where a hole reads as zeros) and then takes only the
/// disk of the pages the guest wrote. Returns the bytes punched.
pub fn punch_zero_pages(file: &Path) -> std::io::Result<u64> {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let punch = |start: u64, end: u64| -> std::io::Result<u64> {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let at = i64::try_from(start).map_err(std::io::Error::other)?;
        let len = i64::try_from(end - start).map_err(std::io::Error::other)?;
        fallocate(&f, flags, at, len)?;
        Ok(end - start)
    };
    let mut buf = vec![0u8; CHUNK];
    let (mut offset, mut zeros_from, mut punched) = (0u64, None::<u64>, 0u64);
    loop {
        let n = f.read_at(&mut buf, offset)?;
        if n == 0 {
            break;
        }
        for page in buf[..n].chunks(PAGE) {
            match (page.iter().all(|b| *b == 0), zeros_from) {
                (true, None) => zeros_from = Some(offset),
                (false, Some(start)) => {
                    punched += punch(start, offset)?;
                    zeros_from = None;
                }
                _ => {}
            }
            offset += page.len() as u64;
        }
    }
    if let Some(start) = zeros_from {
        punched += punch(start, offset)?;
    }
    Ok(punched)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_the_contents_stay() {
        let t = tempfile::tempdir().expect("tmp");
        let file = t.path().join("memory");
        // A page of data, a zero run crossing a read chunk, a page of data,
        // then zeros to a size that is not a whole page.
        let size = CHUNK + 6 * PAGE + 100;
        let mut data = vec![0u8; size];
        data[..PAGE].fill(7);
        let second = CHUNK + 2 * PAGE;
        data[second + 10] = 1;
        std::fs::write(&file, &data).expect("write");
        let punched = punch_zero_pages(&file).expect("punch");
        let zero = (second - PAGE) + (size - second - PAGE);
        assert_eq!(punched, zero as u64);
        assert_eq!(std::fs::read(&file).expect("read"), data);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&file).expect("meta");
        assert_eq!(meta.len(), size as u64);
        assert!(
            meta.blocks() * 512 < (4 * PAGE) as u64,
            "{} blocks",
            meta.blocks()
        );
        assert_eq!(punch_zero_pages(&file).expect("again"), zero as u64);
    }
}
