//! The parts of Firecracker's v1.x API that banger speaks, as typed bodies.
//!
//! Field names follow Firecracker's API description (Swagger 2.0,
//! `../shared/reference/firecracker-v1.14.1.yaml`); optional fields banger does not
//! set are left out of the JSON rather than sent as `null`, because
//! Firecracker rejects unknown or mistyped fields.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    /// Simultaneous multithreading; off unless asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// An uncompressed ELF `vmlinux` on x86_64.
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Block device caching: `Writeback` passes the guest's flushes to the host
/// file, `Unsafe` (Firecracker's default) drops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// Name of an existing tap device on the host.
    pub host_dev_name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock`. Guest-initiated connections to host port P arrive on the
/// Unix socket `<uds_path>_<P>`, which the host must be listening on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// 3 or more; 0-2 are reserved (2 is the host).
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// `PUT /entropy`: a virtio-rng device, so early `getrandom()` callers in
/// the guest (sshd) do not stall.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {}

/// Logger verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /logger`. Firecracker opens `log_path` itself (it must exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    pub log_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// `PUT /metrics`. Firecracker opens `metrics_path` itself (it must exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

/// What `PUT /actions` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boots the configured guest; nothing can be configured afterwards.
    InstanceStart,
    /// Presses Ctrl-Alt-Del on the emulated i8042 keyboard (x86_64 only).
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

impl InstanceActionInfo {
    pub fn new(action_type: ActionType) -> Self {
        Self { action_type }
    }
}

/// The instance's state in `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `PATCH /drives/{drive_id}` after boot: Firecracker reopens the file and
/// re-reads its size, and tells the guest of a new capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
}

/// What `PUT /snapshot/create` saves. `Diff` is a developer preview in
/// v1.14 and not used by banger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create` (the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where restored guest memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// The memory file, mapped privately (copy-on-write).
    File,
    /// A userfaultfd page-fault handler process (not used by banger).
    Uffd,
}

/// `mem_backend` of [`SnapshotLoadParams`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

/// A TAP device to use instead of the snapshot's for one interface
/// (Firecracker >= 1.12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`: only on a fresh process, before anything but the
/// logger and metrics is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemoryBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// The run state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmState,
}

/// The body of every error answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    #[serde(default)]
    pub fault_message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_fields_are_left_out() {
        let b = BootSource {
            kernel_image_path: "/k/vmlinux".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        assert_eq!(
            serde_json::to_value(&b).expect("json"),
            json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"})
        );
        assert_eq!(
            serde_json::to_value(EntropyDevice::default()).expect("json"),
            json!({})
        );
    }

    #[test]
    fn snapshot_bodies() {
        let load = SnapshotLoadParams {
            snapshot_path: "/t/vmstate".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/t/memory".into(),
            },
            track_dirty_pages: Some(false),
            resume_vm: Some(false),
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&load).expect("json"),
            json!({
                "snapshot_path": "/t/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/t/memory"},
                "track_dirty_pages": false,
                "resume_vm": false,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
            })
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .expect("json"),
            json!({"state": "Paused"})
        );
        assert_eq!(
            serde_json::to_value(PartialDrive {
                drive_id: "vdc".into(),
                path_on_host: Some("work.ext4".into()),
            })
            .expect("json"),
            json!({"drive_id": "vdc", "path_on_host": "work.ext4"})
        );
    }

    #[test]
    fn enums_use_firecrackers_spelling() {
        assert_eq!(
            serde_json::to_value(InstanceActionInfo::new(ActionType::SendCtrlAltDel))
                .expect("json"),
            json!({"action_type": "SendCtrlAltDel"})
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker", "id": "vm", "state": "Not started", "vmm_version": "1.14.1"
        }))
        .expect("parse");
        assert_eq!(info.state, InstanceState::NotStarted);
        let e: Error = serde_json::from_str(r#"{"fault_message":"bad"}"#).expect("parse");
        assert_eq!(e.fault_message.as_deref(), Some("bad"));
    }
}
