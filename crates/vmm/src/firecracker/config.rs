//! What Firecracker is told at start: its command line, the machine, boot
//! source, drives, network, vsock, entropy and logger (one `VmConfig`).

use super::api::{
    BootSource, CacheType, Drive, EntropyDevice, LogLevel, Logger, MachineConfiguration, Metrics,
    NetworkInterface, Vsock,
};
use super::{BASE_BOOT_ARGS, GUEST_CID, metrics_path};
use crate::{DiskFormat, LaunchSpec, VmPaths, VmmError, is_valid_mac};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The guest kernel command line: [`BASE_BOOT_ARGS`] then the caller's
/// arguments, which win where they repeat a parameter.
pub fn boot_args(extra: &str) -> String {
    let extra = extra.trim();
    if extra.is_empty() {
        BASE_BOOT_ARGS.to_owned()
    } else {
        format!("{BASE_BOOT_ARGS} {extra}")
    }
}

/// `path` as Firecracker should be given it: relative to the VM directory
/// (Firecracker's working directory) when the file is directly inside it,
/// else as is. A snapshot stores drive and vsock paths verbatim, so relative
/// paths are what lets a restored clone in another directory use its own
/// disk copies and socket (Firecracker v1.14 has no override for them).
pub fn vm_relative(dir: &Path, path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if parent == dir => PathBuf::from(name),
        _ => path.to_path_buf(),
    }
}

/// Firecracker's `--id`: letters, digits and `-`, at most 64 characters.
pub(super) fn instance_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() {
        "banger-vm".into()
    } else {
        id
    }
}

/// The Firecracker argument vector. The API socket path names the VM
/// directory, which is how [`vmm_process_alive`] recognises the process.
pub fn firecracker_args(spec: &LaunchSpec) -> Vec<OsString> {
    vec![
        "--api-sock".into(),
        VmPaths::new(&spec.dir).control_socket().into_os_string(),
        "--id".into(),
        instance_id(&spec.name).into(),
    ]
}

/// Every API body of one launch, in the order they are sent (before
/// `InstanceStart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub logger: Logger,
    pub metrics: Metrics,
    pub machine: MachineConfiguration,
    pub boot: BootSource,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Vsock,
    pub entropy: EntropyDevice,
}

impl VmConfig {
    /// The whole configuration as one document for `firecracker --no-api
    /// --config-file`: the same bodies under Firecracker's kebab-case
    /// resource names. For booting without the API (the bench's bare boot).
    pub fn config_file(&self) -> serde_json::Value {
        serde_json::json!({
            "logger": self.logger,
            "metrics": self.metrics,
            "machine-config": self.machine,
            "boot-source": self.boot,
            "drives": self.drives,
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "entropy": self.entropy,
        })
    }
}

/// Checks `spec` against what Firecracker can do and turns it into API
/// bodies. Reads the kernel's first bytes; starts nothing.
pub fn vm_config(spec: &LaunchSpec) -> Result<VmConfig, VmmError> {
    if let Some(file) = &spec.memory_file {
        // Firecracker has no file-backed guest memory at boot; its
        // snapshot writes the memory file itself.
        return Err(VmmError::Spec(format!(
            "Firecracker cannot boot a guest with its memory in {}",
            file.display()
        )));
    }
    check_elf_kernel(&spec.kernel)?;
    let paths = VmPaths::new(&spec.dir);
    let mut drives = Vec::with_capacity(spec.disks.len());
    for (i, disk) in spec.disks.iter().enumerate() {
        if disk.format == DiskFormat::Qcow2 {
            return Err(VmmError::Spec(format!(
                "disk {} is qcow2, but Firecracker takes raw disk images only: \
                 give it a raw disk or use the QEMU backend (vmm = \"qemu\" in config.toml)",
                disk.path.display()
            )));
        }
        drives.push(Drive {
            drive_id: drive_name(i),
            path_on_host: vm_relative(&spec.dir, &disk.path),
            // The command line names the root itself; a root device would
            // make Firecracker append its own `root=` and `ro`/`rw`.
            is_root_device: false,
            is_read_only: disk.read_only,
            // Pass the guest's flushes on to the host file.
            cache_type: Some(CacheType::Writeback),
        });
    }
    let mut nets = Vec::with_capacity(spec.nets.len());
    for (i, net) in spec.nets.iter().enumerate() {
        if !is_valid_mac(&net.mac) {
            return Err(VmmError::Spec(format!(
                "network interface on {}: MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
                net.describe(),
                net.mac
            )));
        }
        let crate::NetBackend::Tap { name: tap } = &net.backend else {
            return Err(VmmError::Spec(
                "Firecracker has no user-mode networking: VMs need the bridge, so run bangerd as root \
                 (or with CAP_NET_ADMIN) with network = \"auto\" or \"bridge\", or set vmm = \"qemu\""
                    .into(),
            ));
        };
        nets.push(NetworkInterface {
            iface_id: format!("eth{i}"),
            host_dev_name: tap.clone(),
            guest_mac: Some(net.mac.to_ascii_lowercase()),
        });
    }
    if !(1..=32).contains(&spec.vcpu) {
        return Err(VmmError::Spec(format!(
            "Firecracker runs 1 to 32 vCPUs, not {}",
            spec.vcpu
        )));
    }
    Ok(VmConfig {
        logger: logger(&paths),
        metrics: Metrics {
            metrics_path: metrics_path(&spec.dir),
        },
        machine: MachineConfiguration {
            vcpu_count: spec.vcpu,
            mem_size_mib: spec.memory_mib,
            smt: Some(false),
        },
        boot: BootSource {
            kernel_image_path: spec.kernel.clone(),
            initrd_path: spec.initrd.clone(),
            boot_args: Some(boot_args(&spec.extra_cmdline)),
        },
        drives,
        nets,
        vsock: Vsock {
            guest_cid: GUEST_CID,
            uds_path: vm_relative(&spec.dir, &paths.agent_socket()),
        },
        entropy: EntropyDevice::default(),
    })
}

/// The logger banger configures: Firecracker's log into `vmm.log`.
pub(super) fn logger(paths: &VmPaths) -> Logger {
    Logger {
        log_path: paths.vmm_log(),
        level: Some(LogLevel::Info),
        show_level: Some(true),
        show_log_origin: Some(false),
    }
}

/// `vda`, `vdb`, ... `vdz`, `vdaa`, ...: the guest's name for disk `i`,
/// and its Firecracker drive id.
pub fn drive_name(i: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = i;
    loop {
        // `n % 26` is below 26, so the cast cannot truncate.
        suffix.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// Firecracker on x86_64 boots only an uncompressed ELF kernel; a bzImage
/// would be accepted by the API and then fail at `InstanceStart`.
fn check_elf_kernel(kernel: &Path) -> Result<(), VmmError> {
    let mut magic = [0u8; 4];
    std::fs::File::open(kernel)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| VmmError::io(format!("reading kernel {}", kernel.display()), e))?;
    if magic == *b"\x7fELF" {
        Ok(())
    } else {
        Err(VmmError::Spec(format!(
            "kernel {} is not an ELF vmlinux (a compressed bzImage?): Firecracker boots the \
             uncompressed vmlinux, which banger extracts when it builds an image; rebuild the \
             image or use the QEMU backend",
            kernel.display()
        )))
    }
}
