//! Bounds of a VM's resources, shared by the config file, the daemon's
//! checks and the API document.

/// Most vCPUs a VM may have.
pub const MAX_VCPU: u32 = 64;
/// Least memory a VM may have, MiB: a Debian guest with systemd does not
/// boot in less.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Most memory a VM may have, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Smallest disk, bytes: ext4 with a journal needs some room.
pub const MIN_DISK_BYTES: u64 = 64 << 20;
/// Largest disk, bytes (2 TiB; disks are sparse files on the host).
pub const MAX_DISK_BYTES: u64 = 2 << 40;
