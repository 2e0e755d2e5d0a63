use crate::{VmName, VmSpec};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// A VM's stable id: 32 lowercase hex characters. Refs may use any unique prefix.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct VmId(pub String);

impl VmId {
    pub fn random() -> Self {
        let bytes: [u8; 16] = rand::random();
        VmId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(8)]
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lifecycle state of a VM as recorded by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Error,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    /// Whether the daemon may move a VM from this state to `to`. Creating
    /// is entered only by recording a new VM, and delete removes the
    /// record; every other move the daemon makes is listed here:
    ///
    /// - boot: creating, stopped or error → starting → starting (its VMM's
    ///   pid recorded) → running (the agent greeted); a warm restore the same;
    /// - create without start: creating → stopped;
    /// - stop: any state but creating → stopping (a VMM is left: stopping
    ///   again after a failed stop) → stopped, or straight to stopped;
    /// - the exit watcher: starting, running or stopping → stopped;
    /// - a guest not ready in time, a failed boot, a lost re-adoption or an
    ///   interrupted operation (reconcile): creating, starting, running or
    ///   stopping → error; a start that fails before it could record
    ///   starting: stopped or error → error;
    /// - reconcile of a stopped VM with a leftover VMM: stopped → stopped.
    pub fn can_move_to(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Creating, Starting | Stopped | Error)
                | (Starting, Starting | Running | Stopping | Stopped | Error)
                | (Running, Stopping | Stopped | Error)
                | (Stopping, Stopping | Stopped | Error)
                | (Stopped | Error, Starting | Stopping | Stopped | Error)
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "creating" => VmState::Creating,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "error" => VmState::Error,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmBackend {
    Qemu,
    Firecracker,
}

impl VmBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            VmBackend::Qemu => "qemu",
            VmBackend::Firecracker => "firecracker",
        }
    }
}

impl fmt::Display for VmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" => Ok(VmBackend::Qemu),
            "firecracker" => Ok(VmBackend::Firecracker),
            other => Err(format!("unknown VM backend {other:?}")),
        }
    }
}

/// Which initramfs boots a VM's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InitramfsMode {
    /// banger's own when the kernel has one, else the distribution's.
    #[default]
    Auto,
    /// banger's own: the guest agent as `/init` with the few modules it
    /// needs; ready as soon as the root is assembled.
    Banger,
    /// The distribution's (the kernel's own initrd), then the agent as
    /// `init=`.
    Distro,
}

impl InitramfsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InitramfsMode::Auto => "auto",
            InitramfsMode::Banger => "banger",
            InitramfsMode::Distro => "distro",
        }
    }
}

impl fmt::Display for InitramfsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for InitramfsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(InitramfsMode::Auto),
            "banger" => Ok(InitramfsMode::Banger),
            "distro" => Ok(InitramfsMode::Distro),
            other => Err(format!(
                "unknown initramfs {other:?}: use auto, banger or distro"
            )),
        }
    }
}

/// A VM as stored by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmRecord {
    pub id: VmId,
    #[schema(value_type = String)]
    pub name: VmName,
    pub image: String,
    pub state: VmState,
    pub backend: VmBackend,
    pub spec: VmSpec,
    /// The VM's directory: disks, sockets, logs.
    #[schema(value_type = String)]
    pub dir: PathBuf,
    /// PID of the VMM process while it runs.
    pub pid: Option<u32>,
    /// Whether the VM's traffic is masqueraded out of the host.
    pub nat: bool,
    /// The guest's address on the bridge network, allocated at create.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The host TAP device while the VM runs on the bridge.
    #[serde(default)]
    pub tap: Option<String>,
    /// Host port on 127.0.0.1 forwarded to the guest's ssh port while the
    /// VM runs with user-mode networking.
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Which initramfs its boots use.
    #[serde(default)]
    pub initramfs: InitramfsMode,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Last error, when `state` is `error`.
    pub last_error: Option<String>,
    /// How its last start happened (cold boot or restored template).
    #[serde(default)]
    pub start: crate::StartInfo,
}

/// A bootable kernel: for QEMU a bzImage + initrd, for Firecracker an ELF vmlinux.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KernelRecord {
    pub name: String,
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    #[schema(value_type = Option<String>)]
    pub vmlinux: Option<PathBuf>,
    /// Kernel release, e.g. `6.1.0-27-cloud-amd64`.
    pub release: Option<String>,
    /// The kernel's part of banger's initramfs (its modules, see
    /// `banger_image::initramfs`), made from the modules of an image that
    /// boots it; `None` until one did.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub banger_initramfs: Option<PathBuf>,
    /// The directory banger made for this kernel's files (pulled, built, or
    /// a vmlinux extracted at register), removed with the record. `None`:
    /// every file is the user's and banger never deletes any of them.
    #[schema(value_type = Option<String>)]
    pub dir: Option<PathBuf>,
    pub created_at: String,
}

impl KernelRecord {
    /// Pulled or built by banger: its files live in the directory banger
    /// made for it (a registered kernel may have only its extracted
    /// vmlinux there).
    pub fn is_managed(&self) -> bool {
        self.dir
            .as_ref()
            .is_some_and(|d| self.kernel.starts_with(d))
    }
}

/// A root file system image VMs boot from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRecord {
    pub name: String,
    #[schema(value_type = String)]
    pub rootfs: PathBuf,
    /// ext4 file system cloned for each VM's `/root` work disk; without one
    /// the work disk is made from the image's own `/root`, more slowly.
    #[schema(value_type = Option<String>)]
    pub work_seed: Option<PathBuf>,
    pub kernel: String,
    /// Managed images live in banger's image store and are removed with the record.
    pub managed: bool,
    pub size_bytes: u64,
    pub created_at: String,
}

#[cfg(test)]
mod tests {
    use super::VmState::{self, *};

    const ALL: [VmState; 6] = [Creating, Starting, Running, Stopping, Stopped, Error];

    /// The transition table of docs/design/daemon-core.md §3.3, one row
    /// per from-state, columns in the order of `ALL` ('x' = legal).
    const TABLE: [(VmState, &str); 6] = [
        (Creating, "-x--xx"),
        (Starting, "-xxxxx"),
        (Running, "---xxx"),
        (Stopping, "---xxx"),
        (Stopped, "-x-xxx"),
        (Error, "-x-xxx"),
    ];

    #[test]
    fn moves_follow_the_table() {
        for (from, row) in TABLE {
            for (to, cell) in ALL.iter().zip(row.chars()) {
                assert_eq!(
                    from.can_move_to(*to),
                    cell == 'x',
                    "{from} -> {to} should be {}",
                    if cell == 'x' { "legal" } else { "illegal" }
                );
            }
        }
    }

    #[test]
    fn creating_is_never_reentered_and_running_comes_only_from_starting() {
        for from in ALL {
            assert!(!from.can_move_to(Creating), "{from} -> creating");
            assert_eq!(
                from.can_move_to(Running),
                from == Starting,
                "{from} -> running"
            );
        }
    }

    /// Every path the daemon takes (its `set_state` callers, audited for
    /// the strict check), move by move, is legal.
    #[test]
    fn the_daemons_paths_are_legal() {
        let paths: &[(&str, &[VmState])] = &[
            (
                "create, cold boot",
                &[Creating, Starting, Starting, Running],
            ),
            ("create --no-start", &[Creating, Stopped]),
            (
                "create, warm restore",
                &[Creating, Starting, Starting, Running],
            ),
            // A failed warm restore leaves starting; the cold boot follows.
            (
                "create, warm failed, cold boot",
                &[Creating, Starting, Starting, Starting, Running],
            ),
            ("create, not ready", &[Creating, Starting, Starting, Error]),
            (
                "create, not ready after running",
                &[Creating, Starting, Starting, Running, Error],
            ),
            (
                "start, then stop",
                &[Stopped, Starting, Starting, Running, Stopping, Stopped],
            ),
            (
                "start of an errored VM",
                &[Error, Starting, Starting, Running],
            ),
            ("start failing before starting", &[Stopped, Error]),
            ("stop of a kept VMM", &[Error, Stopping, Stopped]),
            (
                "stop again after a failed stop",
                &[Stopping, Stopping, Stopped],
            ),
            ("stop with a leftover VMM", &[Stopped, Stopping, Stopped]),
            ("stop without a VMM", &[Running, Stopped]),
            ("the exit watcher", &[Starting, Stopped]),
            ("reconcile: lost", &[Running, Error]),
            ("reconcile: interrupted", &[Stopping, Error]),
            ("reconcile: a leftover VMM", &[Stopped, Stopped]),
        ];
        for (path, states) in paths {
            for w in states.windows(2) {
                assert!(w[0].can_move_to(w[1]), "{path}: {} -> {}", w[0], w[1]);
            }
        }
    }
}
