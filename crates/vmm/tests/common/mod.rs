//! Helpers shared by the QEMU integration tests. They need only QEMU, no
//! guest kernel: the "kernel" is a tiny multiboot image that halts, which
//! QEMU accepts, so the VMM stays up and answers QMP like a booted one.

#![allow(dead_code)]

use banger_vmm::{DiskFormat, DiskSpec, LaunchSpec};
use std::path::{Path, PathBuf};

/// Writes a 36-byte multiboot image (header with load addresses, then
/// `cli; hlt; jmp .-1`) and returns its path.
pub fn halting_kernel(dir: &Path) -> PathBuf {
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16; // load addresses are in the header
    const LOAD: u32 = 0x10_0000;
    let checksum = 0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS));
    let header = [MAGIC, FLAGS, checksum, LOAD, LOAD, 0, 0, LOAD + 32];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let path = dir.join("halt.bin");
    std::fs::write(&path, image).expect("write kernel stub");
    path
}

/// A spec for a VM whose directory is `dir/vm`, with one read-only and one
/// writable raw disk.
pub fn spec(dir: &Path) -> LaunchSpec {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    let mut disks = Vec::new();
    for (name, read_only) in [("base.raw", true), ("work.raw", false)] {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).expect("disk");
        f.set_len(1 << 20).expect("size disk");
        disks.push(DiskSpec {
            path,
            format: DiskFormat::Raw,
            read_only,
        });
    }
    LaunchSpec {
        name: "test-vm".into(),
        dir: vm_dir,
        kernel: halting_kernel(dir),
        initrd: None,
        extra_cmdline: String::new(),
        disks,
        vcpu: 1,
        nets: Vec::new(),
        memory_mib: 64,
        memory_file: None,
    }
}

/// Pids of live processes whose command line mentions `dir`.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// Kills the VMM of `dir` when dropped, so a failing test leaves no QEMU
/// behind.
pub struct KillOnDrop {
    pub pid: u32,
    pub dir: PathBuf,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if banger_vmm::vmm_process_alive(self.pid, &self.dir) {
            // SAFETY: plain kill(2) on a pid verified to be this test's VMM.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
