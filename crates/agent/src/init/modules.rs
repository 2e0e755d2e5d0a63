//! The kernel modules of banger's initramfs: which load before the root,
//! which alongside it, which after the greeting.

use super::{InitError, io};
use banger_agent_proto::boot::{
    DEVICE_MODULES, INITRAMFS_MODULES_DIR, ModuleEntry, TRANSPORT_MODULE,
};
use std::ffi::CString;
use std::path::Path;

/// The modules of banger's initramfs (see [`ModuleEntry`]): first those of
/// the virtio transport, then, in the listed order, those needed always
/// (the disks) and those of the virtio devices the guest has. The overlay's
/// file system loads in a thread of its own (joined before the overlay is
/// mounted), and so do the modules of the agent's channel to the host (the
/// console of QEMU's agent channel, Firecracker's vsock; joined before the
/// agent greets), while the disks are probed and mounted (which wait on
/// emulated I/O much of the time). The other
/// device modules are opened now and loaded after the greeting: the network
/// card's before commands run, the rest (entropy) after. Parameters given on the kernel
/// command line as `module.param=value` are passed on, as modprobe would.
/// A module already loaded (or built in) is fine.
pub(super) fn load_modules(list: &Path, cmdline: &str) -> Result<LoadedModules, InitError> {
    let text = std::fs::read_to_string(list).map_err(io(format!("reading {}", list.display())))?;
    let entries = ModuleEntry::parse_list(&text);
    let is_transport = |e: &ModuleEntry| e.wanted_by.iter().any(|w| w == TRANSPORT_MODULE);
    for e in entries.iter().filter(|e| is_transport(e)) {
        load_module(&open_module(e)?, cmdline)?;
    }
    let ids = crate::transport::virtio_device_ids(Path::new(VIRTIO_DEVICES));
    let only_for_devices = |e: &ModuleEntry| {
        e.wanted_by
            .iter()
            .all(|w| DEVICE_MODULES.iter().any(|(m, _)| m == w))
    };
    let for_channel = |e: &ModuleEntry| {
        e.wanted_by
            .iter()
            .any(|w| CHANNEL_MODULES.contains(&w.as_str()))
    };
    let (devices, always): (Vec<ModuleEntry>, Vec<ModuleEntry>) = entries
        .iter()
        .filter(|e| !is_transport(e) && e.needed(&ids))
        .cloned()
        .partition(|e| only_for_devices(e));
    // The overlay's file system is needed only once the disks are mounted:
    // it loads in a thread of its own while they are probed and mounted.
    let (filesystems, disks): (Vec<ModuleEntry>, Vec<ModuleEntry>) = always
        .into_iter()
        .partition(|e| e.wanted_by.iter().all(|w| w == OVERLAY_MODULE));
    let (channel, later): (Vec<ModuleEntry>, Vec<ModuleEntry>) =
        devices.into_iter().partition(|e| for_channel(e));
    let (network, after): (Vec<ModuleEntry>, Vec<ModuleEntry>) = later
        .into_iter()
        .partition(|e| e.wanted_by.iter().any(|w| w == NETWORK_MODULE));
    // Opened here, before the thread starts: the root is switched (and the
    // initramfs's files deleted) while it may still be loading them, and
    // the later ones load after that.
    let open_all = |v: &[ModuleEntry]| v.iter().map(open_module).collect::<Result<Vec<_>, _>>();
    let (channel, network, after) = (open_all(&channel)?, open_all(&network)?, open_all(&after)?);
    let filesystems = DeviceModules::load(open_all(&filesystems)?, cmdline);
    let channel = DeviceModules::load(channel, cmdline);
    for e in &disks {
        load_module(&open_module(e)?, cmdline)?;
    }
    Ok(LoadedModules {
        now: entries.iter().filter(|e| is_transport(e)).count() + disks.len(),
        filesystems,
        channel,
        network,
        after,
    })
}

/// The device modules of the agent's channel to the host: loaded before it
/// greets. Other device modules wait until after the greeting.
const CHANNEL_MODULES: &[&str] = &["virtio_console", "vsock", "vmw_vsock_virtio_transport"];

/// The network card's module: commands wait for it (and the network).
const NETWORK_MODULE: &str = "virtio_net";

/// The overlay's file system: needed once the disks are mounted.
const OVERLAY_MODULE: &str = "overlay";

/// What [`load_modules`] did and left to do.
pub(super) struct LoadedModules {
    /// How many loaded before it returned.
    pub(super) now: usize,
    /// The overlay's file system, loading alongside.
    pub(super) filesystems: DeviceModules,
    /// The channel's modules, loading alongside.
    pub(super) channel: DeviceModules,
    /// The network card's, opened, loaded after the fork before commands
    /// run.
    pub(super) network: Vec<ModuleFile>,
    /// The rest (the entropy source), opened, loaded once commands may run.
    pub(super) after: Vec<ModuleFile>,
}

/// Modules loading in a thread of their own ([`load_modules`]).
pub(super) struct DeviceModules(std::thread::JoinHandle<Result<usize, InitError>>);

impl DeviceModules {
    fn load(modules: Vec<ModuleFile>, cmdline: &str) -> Self {
        let line = cmdline.to_string();
        DeviceModules(std::thread::spawn(move || {
            for m in &modules {
                load_module(m, &line)?;
            }
            Ok(modules.len())
        }))
    }

    /// Waits until they are loaded; how many.
    pub(super) fn wait(self) -> Result<usize, InitError> {
        self.0
            .join()
            .map_err(|_| InitError::Panicked("loading the device modules"))?
    }
}

/// Where the kernel lists virtio devices (with their `device` ids).
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

/// A module file of the initramfs, open.
pub(super) struct ModuleFile {
    name: String,
    file: std::fs::File,
}

fn open_module(e: &ModuleEntry) -> Result<ModuleFile, InitError> {
    let name = e.name().to_string();
    let path = Path::new(INITRAMFS_MODULES_DIR).join(&e.file);
    match std::fs::File::open(&path) {
        Ok(file) => Ok(ModuleFile { name, file }),
        Err(_) => Err(InitError::ModuleMissing {
            name,
            path: path.display().to_string(),
        }),
    }
}

pub(super) fn load_module(m: &ModuleFile, cmdline: &str) -> Result<(), InitError> {
    let name = m.name.clone();
    let params = CString::new(module_params(cmdline, &name)).unwrap_or_default();
    match nix::kmod::finit_module(&m.file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(source) => {
            let hint = match source {
                nix::Error::ENOEXEC | nix::Error::EINVAL => {
                    " (not a module of this kernel: re-register or rebuild the image so banger remakes its initramfs)"
                }
                _ => "",
            };
            Err(InitError::ModuleLoad { name, source, hint })
        }
    }
}

/// `param=value ...` for module `name` from `name.param=value` words of the
/// kernel command line (`-` and `_` are the same in module names).
pub fn module_params(cmdline: &str, name: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let name = norm(name);
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| {
            let (module, param) = w.split_once('.')?;
            (norm(module) == name && param.contains('=')).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 \
                       virtio_mmio.force_legacy virtio_blk.queue_depth=64 vsock.x=1 root=/dev/vda";
        assert_eq!(
            module_params(cmdline, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(cmdline, "virtio_blk"), "queue_depth=64");
        assert_eq!(module_params(cmdline, "overlay"), "");
    }
}
