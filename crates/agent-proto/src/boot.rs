//! The boot contract between the host and the agent's early-init mode.
//!
//! Every VM gets three disks in this order: the image's shared root file
//! system (read-only), its own system overlay (ext4, holds the overlayfs
//! upper layer, so writes to `/` persist) and its own work disk (ext4,
//! mounted at `/root`). The kernel boots the agent as `init=`; the agent
//! assembles the overlay, mounts the work disk, switches root and execs the
//! image's own init. The kernel command line says where each piece is, so
//! the device order is decided in one place, on the host.

/// Kernel parameter naming the system overlay device.
pub const OVERLAY_PARAM: &str = "banger.overlay";
/// Kernel parameter naming the work disk device.
pub const WORK_PARAM: &str = "banger.work";
/// Kernel parameter naming the image's init, exec'd once the root is ready.
pub const INIT_PARAM: &str = "banger.init";
/// The image's init when [`INIT_PARAM`] is absent.
pub const DEFAULT_INIT: &str = "/sbin/init";

/// Where banger's initramfs keeps the kernel modules it loads.
pub const INITRAMFS_MODULES_DIR: &str = "/banger/modules";
/// The modules of [`INITRAMFS_MODULES_DIR`] in load order, dependencies
/// first: one per line, its file name (`<module>.ko`) and then the modules
/// the agent wants that need it (see [`ModuleEntry`]).
pub const INITRAMFS_MODULES_LIST: &str = "/banger/modules.list";

/// The virtio transport module: loaded first, so that the devices it finds
/// say which of the [`DEVICE_MODULES`] are needed.
pub const TRANSPORT_MODULE: &str = "virtio_mmio";

/// Wanted modules loaded only when a virtio device of that id is present
/// (virtio spec, "Device Types"): the network card, the console (QEMU's
/// agent channel), the entropy source, vsock (Firecracker's agent
/// channel). Every other wanted module is always loaded.
pub const DEVICE_MODULES: &[(&str, u32)] = &[
    ("virtio_net", 1),
    ("virtio_console", 3),
    ("virtio_rng", 4),
    ("vsock", 19),
    ("vmw_vsock_virtio_transport", 19),
];

/// One line of [`INITRAMFS_MODULES_LIST`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// File name in [`INITRAMFS_MODULES_DIR`], `<module>.ko`.
    pub file: String,
    /// The wanted modules it is loaded for (itself, or those depending on it).
    pub wanted_by: Vec<String>,
}

impl ModuleEntry {
    /// The module's name (its file name without `.ko`).
    pub fn name(&self) -> &str {
        self.file.strip_suffix(".ko").unwrap_or(&self.file)
    }

    pub fn to_line(&self) -> String {
        let mut l = self.file.clone();
        for w in &self.wanted_by {
            l.push(' ');
            l.push_str(w);
        }
        l.push('\n');
        l
    }

    /// The entries of a list's text, in order; blank lines skipped.
    pub fn parse_list(text: &str) -> Vec<ModuleEntry> {
        text.lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let file = words.next()?.to_string();
                Some(ModuleEntry {
                    file,
                    wanted_by: words.map(str::to_string).collect(),
                })
            })
            .collect()
    }

    /// Whether it is needed when the guest has virtio devices `ids`: one
    /// of the modules it is loaded for is needed always, or for one of
    /// those devices.
    pub fn needed(&self, ids: &[u32]) -> bool {
        self.wanted_by.iter().any(|w| {
            let mut devices = DEVICE_MODULES.iter().filter(|(m, _)| m == w).peekable();
            devices.peek().is_none() || devices.any(|(_, id)| ids.contains(id))
        })
    }
}

/// What the agent prints on the console, before the rest of the line, when
/// the guest cannot boot (a module or the image's init is missing...).
/// The VM then reboots, which ends it, and the host quotes that line.
pub const BOOT_FAILURE_PREFIX: &str = "banger-agent: boot failed: ";

/// The reason after [`BOOT_FAILURE_PREFIX`] in a console log, if the agent
/// reported one (the last, should there be several).
pub fn boot_failure(console: &str) -> Option<&str> {
    console
        .lines()
        .rev()
        .find_map(|l| l.split_once(BOOT_FAILURE_PREFIX).map(|(_, r)| r.trim()))
        .filter(|r| !r.is_empty())
}

/// Guest device of the shared, read-only root file system.
pub const BASE_DEVICE: &str = "/dev/vda";
/// Guest device of the per-VM system overlay.
pub const OVERLAY_DEVICE: &str = "/dev/vdb";
/// Guest device of the per-VM work disk.
pub const WORK_DEVICE: &str = "/dev/vdc";
/// Where the work disk is mounted in the guest.
pub const WORK_MOUNT: &str = "/root";

/// Kernel parameter listing the guest's resolvers (comma-separated IPv4
/// addresses), written to `/etc/resolv.conf` by early init.
pub const DNS_PARAM: &str = "banger.dns";

/// A static IPv4 configuration in the kernel's `ip=` syntax
/// (`ip=<client>::<gateway>:<netmask>::<device>:off[:<dns0>]`), which early
/// init applies itself: the guest kernel's NIC driver is a module, so the
/// kernel cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIp {
    pub addr: std::net::Ipv4Addr,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub netmask: std::net::Ipv4Addr,
    pub device: String,
}

impl GuestIp {
    /// Parses the value of `ip=`; `None` for forms banger does not use
    /// (`dhcp`, `off`, missing address or device).
    pub fn parse(value: &str) -> Option<Self> {
        let f: Vec<&str> = value.split(':').collect();
        let addr = f.first()?.parse().ok()?;
        let gateway = f.get(2).and_then(|g| g.parse().ok());
        let netmask = f.get(3).and_then(|m| m.parse().ok())?;
        let device = f.get(5).filter(|d| !d.is_empty())?.to_string();
        if device.len() > 15
            || !device
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return None;
        }
        Some(Self {
            addr,
            gateway,
            netmask,
            device,
        })
    }
}

/// The guest's network as the kernel command line gives it: the last
/// `ip=` and `banger.dns=` win.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetArgs {
    pub ip: Option<GuestIp>,
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl NetArgs {
    pub fn parse(cmdline: &str) -> Self {
        let mut a = NetArgs::default();
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("ip=") {
                a.ip = GuestIp::parse(v);
            } else if let Some(v) = word
                .strip_prefix(DNS_PARAM)
                .and_then(|v| v.strip_prefix('='))
            {
                a.dns = v.split(',').filter_map(|d| d.parse().ok()).collect();
            }
        }
        a
    }

    /// `nameserver` lines, `None` when no resolver was given.
    pub fn resolv_conf(&self) -> Option<String> {
        if self.dns.is_empty() {
            return None;
        }
        Some(
            self.dns
                .iter()
                .map(|d| format!("nameserver {d}\n"))
                .collect(),
        )
    }
}

/// What the early-init mode needs to know, read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// The root device (`root=`), the image's shared file system.
    pub root: String,
    /// Mount the root read-write (`rw` after any `ro`; the kernel's rule:
    /// the last of the two wins). Only without an overlay.
    pub root_writable: bool,
    /// Device holding the overlay's upper layer; `None` boots the base
    /// root as it is.
    pub overlay: Option<String>,
    /// Device to mount at [`WORK_MOUNT`].
    pub work: Option<String>,
    /// The image's init.
    pub init: String,
}

impl BootArgs {
    /// The standard layout: overlay on [`OVERLAY_DEVICE`], work disk on
    /// [`WORK_DEVICE`], the image's default init.
    pub fn standard() -> Self {
        Self {
            root: BASE_DEVICE.into(),
            root_writable: false,
            overlay: Some(OVERLAY_DEVICE.into()),
            work: Some(WORK_DEVICE.into()),
            init: DEFAULT_INIT.into(),
        }
    }

    /// Kernel parameters for this layout with the agent at `agent_path` as
    /// `init=` (used when the distribution's initramfs, or none, boots).
    pub fn kernel_params(&self, agent_path: &str) -> String {
        let mode = if self.root_writable { "rw" } else { "ro" };
        let mut s = format!("root={} {mode} init={agent_path}", self.root);
        if let Some(o) = &self.overlay {
            s.push_str(&format!(" {OVERLAY_PARAM}={o}"));
        }
        if let Some(w) = &self.work {
            s.push_str(&format!(" {WORK_PARAM}={w}"));
        }
        if self.init != DEFAULT_INIT {
            s.push_str(&format!(" {INIT_PARAM}={}", self.init));
        }
        s
    }

    /// Reads the parameters out of `/proc/cmdline` text. Later occurrences
    /// win, as with the kernel's own parameters; values must be absolute
    /// paths, anything else is ignored.
    pub fn parse(cmdline: &str) -> Self {
        let mut args = BootArgs {
            root: BASE_DEVICE.into(),
            root_writable: false,
            overlay: None,
            work: None,
            init: DEFAULT_INIT.into(),
        };
        for word in cmdline.split_ascii_whitespace() {
            match word {
                "ro" => args.root_writable = false,
                "rw" => args.root_writable = true,
                _ => {}
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            if !value.starts_with('/') {
                continue;
            }
            match key {
                "root" => args.root = value.into(),
                OVERLAY_PARAM => args.overlay = Some(value.into()),
                WORK_PARAM => args.work = Some(value.into()),
                INIT_PARAM => args.init = value.into(),
                _ => {}
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_params_round_trip_through_parse() {
        let std = BootArgs::standard();
        let params = std.kernel_params("/usr/local/bin/banger-agent");
        assert_eq!(
            params,
            "root=/dev/vda ro init=/usr/local/bin/banger-agent banger.overlay=/dev/vdb banger.work=/dev/vdc"
        );
        assert_eq!(
            BootArgs::parse(&format!("console=ttyS0 {params} quiet")),
            std
        );
        let custom = BootArgs {
            root: "/dev/vdx".into(),
            root_writable: true,
            overlay: None,
            work: Some("/dev/vdd".into()),
            init: "/lib/systemd/systemd".into(),
        };
        assert_eq!(BootArgs::parse(&custom.kernel_params("/a")), custom);
    }

    #[test]
    fn net_args() {
        let a = NetArgs::parse(
            "console=ttyS0 ip=172.16.0.7::172.16.0.1:255.255.255.0::eth0:off banger.dns=1.1.1.1,9.9.9.9",
        );
        let ip = a.ip.clone().expect("ip");
        assert_eq!(ip.addr.to_string(), "172.16.0.7");
        assert_eq!(
            ip.gateway.map(|g| g.to_string()).as_deref(),
            Some("172.16.0.1")
        );
        assert_eq!(ip.netmask.to_string(), "255.255.255.0");
        assert_eq!(ip.device, "eth0");
        assert_eq!(
            a.resolv_conf().as_deref(),
            Some("nameserver 1.1.1.1\nnameserver 9.9.9.9\n")
        );
        assert_eq!(NetArgs::parse("ip=dhcp").ip, None);
        assert_eq!(NetArgs::parse("ip=1.2.3.4::::::off").ip, None);
        assert_eq!(NetArgs::parse("quiet"), NetArgs::default());
    }

    #[test]
    fn parse_ignores_relative_values_and_keeps_the_last() {
        let a = BootArgs::parse(
            "banger.init=sh banger.work=/dev/vdc banger.work=/dev/vdx banger.overlay banger.overlay=vdb",
        );
        assert_eq!(a.init, DEFAULT_INIT);
        assert_eq!(a.work.as_deref(), Some("/dev/vdx"));
        assert_eq!(a.overlay, None);
        // root= takes device paths only (not LABEL= or UUID=); ro/rw: the last wins.
        let a = BootArgs::parse("root=/dev/vda ro root=LABEL=x rw quiet");
        assert_eq!(a.root, "/dev/vda");
        assert!(a.root_writable);
        assert!(!BootArgs::parse("rw ro").root_writable);
        assert!(!BootArgs::parse("").root_writable);
    }

    #[test]
    fn module_list_lines() {
        let e = ModuleEntry {
            file: "virtio.ko".into(),
            wanted_by: vec!["virtio_blk".into(), "virtio_console".into()],
        };
        assert_eq!(e.to_line(), "virtio.ko virtio_blk virtio_console\n");
        assert_eq!(e.name(), "virtio");
        let text = format!(
            "{}\nvsock.ko vsock vmw_vsock_virtio_transport\n",
            e.to_line()
        );
        let list = ModuleEntry::parse_list(&text);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0], e);
        // Always needed through virtio_blk.
        assert!(list[0].needed(&[]));
        // vsock only with a vsock device (19).
        assert!(!list[1].needed(&[1, 2, 3]));
        assert!(list[1].needed(&[2, 19]));
        let console = ModuleEntry::parse_list("virtio_console.ko virtio_console\n");
        assert!(!console[0].needed(&[19]));
        assert!(console[0].needed(&[3]));
    }

    #[test]
    fn boot_failure_lines() {
        let console = "[    1.2] Run /init as init process\n\
            banger-agent: boot failed: no kernel module virtio_blk in the initramfs\r\n\
            [    1.3] reboot: Restarting system\n";
        assert_eq!(
            boot_failure(console),
            Some("no kernel module virtio_blk in the initramfs")
        );
        assert_eq!(boot_failure("[ 1.0] Kernel panic - not syncing\n"), None);
        assert_eq!(boot_failure("banger-agent: boot failed: \n"), None);
    }
}
