//! Records for the tests of the crates above the model (feature
//! `fixtures`): a kernel and an image for VMs to name.

use crate::{ImageRecord, KernelRecord};

/// When every fixture was made.
pub const CREATED_AT: &str = "2026-01-01T00:00:00Z";

/// A kernel record named `name` (its file is `/k/vmlinuz`, never read).
pub fn kernel(name: &str) -> KernelRecord {
    KernelRecord {
        name: name.into(),
        kernel: "/k/vmlinuz".into(),
        initrd: None,
        vmlinux: None,
        release: None,
        dir: None,
        banger_initramfs: None,
        created_at: CREATED_AT.into(),
    }
}

/// A managed image record named `name` on kernel `kernel` (its root file
/// system is `/i/NAME/rootfs.ext4`, never read).
pub fn image(name: &str, kernel: &str) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        rootfs: format!("/i/{name}/rootfs.ext4").into(),
        kernel: kernel.into(),
        managed: true,
        work_seed: None,
        size_bytes: 1,
        created_at: CREATED_AT.into(),
    }
}
