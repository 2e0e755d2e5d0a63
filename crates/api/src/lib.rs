//! Wire types of the banger daemon API and a typed client.
//!
//! Transport: HTTP/1.1 over the daemon's Unix socket. Long operations
//! (create, image build) answer with a stream of newline-delimited JSON
//! events ending in `done` or `error`; exec is a WebSocket (see [`exec`]).

pub mod client;
pub mod exec;
pub mod files;
pub mod hold;
pub mod images;
pub mod progress;
pub mod rules;
pub mod sessions;
pub mod templates;

use banger_model::{ImageRecord, InitramfsMode, KernelRecord, VmRecord, VmSpec, WarmMode};
use banger_version::BuildInfo;
use serde::{Deserialize, Serialize};

pub use client::{Client, ClientError};
pub use progress::{Event, ProgressSink, Step, StepGroup};

/// Route paths, shared by the server's router and the client.
pub mod paths {
    pub const INFO: &str = "/v1/info";
    pub const SHUTDOWN: &str = "/v1/shutdown";
    pub const VMS: &str = "/v1/vms";
    pub const VM: &str = "/v1/vms/{vm}";
    pub const VM_EXEC: &str = "/v1/vms/{vm}/exec";
    pub const VM_START: &str = "/v1/vms/{vm}/start";
    pub const VM_STOP: &str = "/v1/vms/{vm}/stop";
    pub const VM_RESTART: &str = "/v1/vms/{vm}/restart";
    pub const VM_KILL: &str = "/v1/vms/{vm}/kill";
    pub const VM_LOGS: &str = "/v1/vms/{vm}/logs";
    pub const VM_STATS: &str = "/v1/vms/{vm}/stats";
    pub const VM_PORTS: &str = "/v1/vms/{vm}/ports";
    pub const VM_BOOT: &str = "/v1/vms/{vm}/boot";
    pub const VM_WAIT: &str = "/v1/vms/{vm}/wait";
    pub const NETWORK: &str = "/v1/network";
    pub const IMAGES: &str = "/v1/images";
    pub const IMAGE: &str = "/v1/images/{image}";
    pub const IMAGE_BUILD: &str = "/v1/images/build";
    pub const KERNELS: &str = "/v1/kernels";
    pub const OPENAPI: &str = "/openapi.json";

    /// Fills the `{...}` parameter of `template` with `value`, percent-encoding it.
    pub fn fill(template: &str, value: &str) -> String {
        let start = template.find('{').unwrap_or(template.len());
        let end = template.find('}').map(|e| e + 1).unwrap_or(template.len());
        let mut out = String::with_capacity(template.len() + value.len());
        out.push_str(&template[..start]);
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push_str(&template[end..]);
        out
    }
}

/// An error as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// Stable machine-readable kind: `not_found`, `conflict`, `invalid`, `failed`, ...
    pub code: String,
    /// One line for people: what was wrong and what to do.
    pub message: String,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DaemonInfo {
    pub build: BuildInfo,
    pub pid: u32,
    pub socket: String,
    pub log_path: String,
    pub state_dir: String,
    /// VMM backend new VMs get, and why.
    pub backend: String,
    pub backend_reason: String,
    /// Warm starts on this daemon.
    #[serde(default)]
    pub warm: WarmInfo,
}

/// Whether this daemon can restore templates, and what it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarmInfo {
    /// The `warm_start` config key: `auto`, `manual` or `off`.
    pub setting: String,
    /// Whether the backend can snapshot and restore.
    pub supported: bool,
    /// The backend's restore identity ("QEMU 10.0.2"), or why it cannot.
    pub detail: String,
    pub templates: u64,
    /// Bytes the templates take on disk.
    pub template_bytes: u64,
    /// Whether template disks clone by reflink (else each warm VM copies them).
    pub reflink: bool,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// DNS label; generated (adjective-noun) when absent.
    #[schema(schema_with = rules::schema::vm_name_opt)]
    pub name: Option<String>,
    /// Image name; the configured default when absent.
    #[schema(schema_with = rules::schema::image_name_opt)]
    pub image: Option<String>,
    #[serde(default, deserialize_with = "rules::integer_opt")]
    #[schema(schema_with = rules::schema::vcpu_opt)]
    pub vcpu: Option<u32>,
    #[serde(default, deserialize_with = "rules::integer_opt")]
    #[schema(schema_with = rules::schema::memory_mib_opt)]
    pub memory_mib: Option<u64>,
    /// e.g. "16G".
    #[schema(schema_with = rules::schema::disk_size_opt)]
    pub disk_size: Option<String>,
    /// Boot the VM and wait for its agent (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// Masquerade the VM's traffic out of the host (bridge networking).
    #[serde(default)]
    pub nat: bool,
    /// Delete the VM when this request's connection closes: after `done`
    /// the response stream stays open (blank keep-alive lines) until the
    /// client goes away. A VM kept because it never became ready is not
    /// deleted. `vm run --rm` uses this so a killed CLI cannot leak a VM.
    #[serde(default)]
    pub ephemeral: bool,
    /// Readiness also waits for the guest's sshd to greet (interactive
    /// `vm run`); a timeout keeps the VM for inspection like a guest
    /// whose agent never greeted.
    #[serde(default)]
    pub wait_ssh: bool,
    /// Readiness also waits for the guest's init to finish booting
    /// (systemd `running` or `degraded`); absent: the `wait_boot` config
    /// key. A timeout keeps the VM like one whose agent never greeted.
    #[serde(default)]
    pub wait_boot: Option<bool>,
    /// Which initramfs boots the VM (kept for its later boots); absent:
    /// the `initramfs` config key.
    #[serde(default)]
    pub initramfs: Option<InitramfsMode>,
    /// Restore a warm-start template instead of booting: `auto` (when one
    /// fits and the `warm_start` config key allows), `off` (always boot)
    /// or `require` (restore or fail, leaving nothing behind).
    #[serde(default)]
    pub warm: WarmMode,
}

fn yes() -> bool {
    true
}

/// A progress note of a long operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// Short phase name: `plan`, `image`, `disk`, `boot`, `agent`, ...
    #[schema(value_type = String)]
    pub phase: progress::Step,
    pub message: String,
    /// Milliseconds since the operation started.
    pub elapsed_ms: u64,
}

/// A warning of a long operation: something skipped or degraded that the
/// user should know of (the operation goes on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Warning {
    pub message: String,
    /// Milliseconds since the operation started.
    pub elapsed_ms: u64,
}

/// The `planned` event of a create: what will be made.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlannedVm {
    pub name: String,
    pub spec: VmSpec,
}

/// One line of the `POST /v1/vms` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CreateVmEvent {
    /// First event: the name and effective spec, before anything is made.
    Planned(PlannedVm),
    Progress(Progress),
    Warning(Warning),
    // Boxed: far larger than the other events (not in the API document).
    Done(Box<VmRecord>),
    Error(ApiError),
}

/// `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// Local Debian builds also need a DNS label (no '.' or '_').
    #[schema(schema_with = rules::schema::image_name)]
    pub name: String,
    /// Debian suite, default `bookworm` (local Debian builds only).
    pub suite: Option<String>,
    /// Derive the image from this registered image in a transient VM
    /// instead of building it from Debian packages.
    #[serde(default)]
    #[schema(schema_with = rules::schema::image_name_opt)]
    pub from_image: Option<String>,
    /// Install Docker (Debian's `docker.io`, containerd and docker enabled).
    #[serde(default)]
    pub docker: bool,
    /// More Debian packages to install.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// One line of the `POST /v1/images/build` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildImageEvent {
    Progress(Progress),
    Warning(Warning),
    Done(ImageRecord),
    Error(ApiError),
}

/// One line of the `POST /v1/vms/{vm}/wait` response stream: a progress
/// note (phase `sshd` or `system`) when the guest is not there yet, then
/// the VM once it is.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitEvent {
    Progress(Progress),
    Warning(Warning),
    // Boxed: far larger than the other events (not in the API document).
    Done(Box<VmRecord>),
    Error(ApiError),
}

impl OperationEvent for WaitEvent {
    type Output = VmRecord;
    fn outcome(&self) -> Option<Result<VmRecord, ApiError>> {
        match self {
            WaitEvent::Done(vm) => Some(Ok((**vm).clone())),
            WaitEvent::Error(e) => Some(Err(e.clone())),
            WaitEvent::Progress(_) | WaitEvent::Warning(_) => None,
        }
    }
}

/// An event of a long operation's stream; the last one carries its outcome.
pub trait OperationEvent {
    type Output;
    /// `Some` for the final event: the result, or the daemon's error.
    fn outcome(&self) -> Option<Result<Self::Output, ApiError>>;
}

impl OperationEvent for CreateVmEvent {
    type Output = VmRecord;
    fn outcome(&self) -> Option<Result<VmRecord, ApiError>> {
        match self {
            CreateVmEvent::Done(vm) => Some(Ok((**vm).clone())),
            CreateVmEvent::Error(e) => Some(Err(e.clone())),
            CreateVmEvent::Planned(_) | CreateVmEvent::Progress(_) | CreateVmEvent::Warning(_) => {
                None
            }
        }
    }
}

impl OperationEvent for BuildImageEvent {
    type Output = ImageRecord;
    fn outcome(&self) -> Option<Result<ImageRecord, ApiError>> {
        match self {
            BuildImageEvent::Done(img) => Some(Ok(img.clone())),
            BuildImageEvent::Error(e) => Some(Err(e.clone())),
            BuildImageEvent::Progress(_) | BuildImageEvent::Warning(_) => None,
        }
    }
}

/// `POST /v1/vms/{vm}/kill`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Signal number, e.g. 15 (TERM) or 9 (KILL).
    #[serde(deserialize_with = "rules::integer")]
    #[schema(schema_with = rules::schema::signal)]
    pub signal: i32,
}

/// `PATCH /v1/vms/{vm}`: changes to a stopped VM. Absent fields are kept;
/// at least one is needed (`minProperties`, see
/// [`rules::complete_document`]), and none may be `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetVmRequest {
    #[serde(
        default,
        deserialize_with = "rules::integer_present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = rules::schema::vcpu)]
    pub vcpu: Option<u32>,
    #[serde(
        default,
        deserialize_with = "rules::integer_present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = rules::schema::memory_mib)]
    pub memory_mib: Option<u64>,
    /// New disk size, e.g. "32G"; disks only grow.
    #[serde(
        default,
        deserialize_with = "rules::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = rules::schema::disk_size)]
    pub disk_size: Option<String>,
    /// Masquerade the VM's traffic out of the host.
    #[serde(
        default,
        deserialize_with = "rules::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = rules::schema::boolean)]
    pub nat: Option<bool>,
}

impl SetVmRequest {
    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        self == &SetVmRequest::default()
    }
}

/// `GET /v1/vms/{vm}/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmStats {
    pub name: String,
    pub state: banger_model::VmState,
    pub vcpu: u32,
    pub memory_mib: u64,
    /// The VMM process on the host, while it runs.
    pub vmm: Option<VmmProcessStats>,
    /// The VM's disks: the image's shared base, its overlay and work disk.
    pub disks: Vec<DiskStats>,
    /// What the guest reports, when it runs and was asked (`?guest=true`).
    pub guest: Option<GuestStats>,
}

/// Host-side figures of a VMM process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmmProcessStats {
    pub pid: u32,
    /// CPU time used (user + system), seconds.
    pub cpu_seconds: f64,
    /// Average CPU use since the VMM started, in percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the VMM (guest RAM it touched plus its own).
    pub rss_bytes: u64,
    pub uptime_seconds: f64,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskStats {
    /// `base`, `overlay` or `work`.
    pub role: String,
    pub path: String,
    /// Size the guest sees.
    pub virtual_bytes: u64,
    /// Host bytes the file takes (they are sparse).
    pub allocated_bytes: u64,
    /// Shared with other VMs of the same image (not counted as this VM's).
    pub shared: bool,
}

/// Guest-side figures, read through the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestStats {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Memory the guest has never touched or has freed.
    pub mem_free_bytes: u64,
    /// 1-minute load average.
    pub load1: f64,
    /// Used and total bytes of `/` (overlay) and `/root` (work disk).
    pub root_used_bytes: u64,
    pub root_total_bytes: u64,
    pub work_used_bytes: u64,
    pub work_total_bytes: u64,
}

/// Which log `GET /v1/vms/{vm}/logs` returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The guest's serial console.
    #[default]
    Console,
    /// The VMM's own output.
    Vmm,
}

/// Query of `GET /v1/vms/{vm}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// `console` (default) or `vmm`.
    #[serde(default)]
    #[param(value_type = Option<LogSource>)]
    pub source: LogSource,
    /// Keep streaming what is appended, until the VM is deleted.
    #[serde(default)]
    pub follow: bool,
    /// Start at the last `tail` lines (of what `since_ms` selects).
    #[serde(default)]
    #[param(value_type = Option<rules::LogTailParam>, inline)]
    pub tail: Option<u64>,
    /// Start with what was written at or after this time (Unix
    /// milliseconds). The daemon notes the log's size every second while
    /// the VM runs; lines are placed within that second (or, for what was
    /// written while the daemon was down, as early as they could have been).
    #[serde(default)]
    #[param(value_type = Option<rules::SinceMsParam>, inline)]
    pub since_ms: Option<u64>,
}

impl LogsQuery {
    /// Refuses a `tail` or `since_ms` beyond [`rules::MAX_LOG_TAIL`] and
    /// [`rules::MAX_SINCE_MS`].
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self.tail
            && t > rules::MAX_LOG_TAIL
        {
            return Err(format!("tail must be at most {}", rules::MAX_LOG_TAIL));
        }
        if let Some(s) = self.since_ms
            && s > rules::MAX_SINCE_MS
        {
            return Err(format!("since_ms must be at most {}", rules::MAX_SINCE_MS));
        }
        Ok(())
    }

    /// The query string, without the `?`.
    pub fn to_query(&self) -> String {
        let source = match self.source {
            LogSource::Console => "console",
            LogSource::Vmm => "vmm",
        };
        let mut q = format!("source={source}&follow={}", self.follow);
        if let Some(n) = self.tail {
            q.push_str(&format!("&tail={n}"));
        }
        if let Some(t) = self.since_ms {
            q.push_str(&format!("&since_ms={t}"));
        }
        q
    }
}

/// `GET /v1/kernels`.
pub type KernelList = Vec<KernelRecord>;

/// `GET /v1/vms/{vm}/boot`: how a running VM booted, from the daemon's
/// record of its last boot and its agent's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmBoot {
    pub name: String,
    /// The initramfs of its last boot: `banger`, `distro` or `none`;
    /// unknown when this daemon did not boot it.
    pub initramfs: Option<String>,
    /// Guest kernel uptime, in milliseconds, when the kernel started its
    /// first process (`Run /init as init process`).
    pub kernel_init_ms: Option<u64>,
    /// Guest kernel uptime, in milliseconds, when the agent greeted the
    /// host (the readiness signal); unknown when this daemon did not boot it.
    pub agent_ready_ms: Option<u64>,
    /// `agent_ready_ms / kernel_init_ms`: 1.0 is ready the moment the
    /// kernel started userspace.
    pub ready_over_kernel_init: Option<f64>,
    /// How the serving agent started: `initramfs`, `init-param` (after
    /// the distribution's initramfs) or `service` (by the image's init).
    pub agent_start: String,
    /// The image's init: systemd's `is-system-running` state
    /// (`initializing`, `starting`, `running`, `degraded`, ...) or
    /// `no-systemd`.
    pub system: String,
    /// The init is still booting.
    pub booting: bool,
    /// How its TAP device was got at its last boot (bridge networking;
    /// unknown when this daemon did not boot it, or it has no TAP).
    pub tap: Option<TapAcquisition>,
}

/// How a VM got its TAP device when it booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TapAcquisition {
    /// Taken ready from the warm pool (`true`), or created on the spot
    /// because the pool was empty or disabled (`tap_pool_size = 0`).
    pub from_pool: bool,
    /// How long getting it took, in microseconds.
    pub took_us: u64,
}

/// What `POST /v1/vms/{vm}/wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// The guest's sshd greets (what `vm ssh` needs).
    Sshd,
    /// The guest's init has finished booting (systemd `running` or
    /// `degraded`; at once without systemd).
    System,
}

/// `POST /v1/vms/{vm}/wait`: returns once the running VM is there, or
/// fails after `ready_timeout_secs`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    pub until: WaitFor,
}

/// A listening TCP port in a VM (`vm ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortInfo {
    /// Local address in the guest (`0.0.0.0`, `::`, `127.0.0.1`, ...).
    pub addr: String,
    pub port: u16,
    pub pid: Option<u32>,
    pub command: Option<String>,
    /// `http` or `https` when a probe from the host recognised it.
    pub protocol: Option<String>,
    /// `http://<name>.vm:<port>/` (or https) when detected.
    pub url: Option<String>,
    /// Why the port was not probed or what the probe saw.
    pub note: Option<String>,
}

/// The daemon's networking, for `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkStatus {
    /// `bridge`, `user` or `unavailable`.
    pub mode: String,
    /// Why this mode.
    pub reason: String,
    pub bridge: String,
    pub cidr: String,
    pub bridge_ip: String,
    /// The TAP pool (bridge mode).
    pub tap_pool: Option<TapPool>,
    /// The address the `.vm` DNS server listens on: the bound one while it
    /// runs (so a configured port 0 shows the port it got), else the
    /// configured `dns_listen_addr`.
    pub dns_listen: String,
    /// Why the DNS server is not running, when it is not.
    pub dns_error: Option<String>,
    /// `nft --version`, `None` when nft is missing.
    pub nft_version: Option<String>,
    pub ip_forward: Option<bool>,
    pub nat_error: Option<String>,
    /// Whether the host resolver sends `.vm` to banger, and why (not).
    pub resolver_ok: bool,
    pub resolver_detail: String,
    /// Whether each guest can send only as its own address on the bridge
    /// (nftables checks), and why not.
    pub guard_ok: bool,
    pub guard_detail: String,
    /// Whether `/dev/net/tun` can be opened, and why not.
    pub tun_ok: bool,
    pub tun_detail: String,
}

/// TAPs of the warm pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TapPool {
    /// Made and waiting for a VM.
    pub idle: u64,
    /// How many the pool keeps ready (`tap_pool_size`).
    pub configured: u64,
    /// How long creating the latest TAP took, in microseconds (the pool's
    /// refill, or a VM start that found the pool empty): what a start
    /// waits for its TAP without the pool. `None` until one was made.
    pub last_create_us: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_its_own_event_on_the_wire() {
        let ev = CreateVmEvent::Warning(Warning {
            message: "file_sync[0]: ~/x does not exist; skipped".into(),
            elapsed_ms: 1200,
        });
        let line = serde_json::to_string(&ev).expect("encode");
        assert_eq!(
            line,
            r#"{"warning":{"message":"file_sync[0]: ~/x does not exist; skipped","elapsed_ms":1200}}"#
        );
        let back: CreateVmEvent = serde_json::from_str(&line).expect("decode");
        assert!(matches!(back, CreateVmEvent::Warning(w) if w.elapsed_ms == 1200));
        assert!(ev.outcome().is_none(), "a warning ends nothing");
        let pull: images::PullImageEvent = serde_json::from_str(&line).expect("decode");
        assert!(matches!(pull, images::PullImageEvent::Warning(_)));
    }

    #[test]
    fn the_old_warning_step_is_just_an_unknown_step() {
        let line = r#"{"progress":{"phase":"warning","message":"m","elapsed_ms":1}}"#;
        let ev: WaitEvent = serde_json::from_str(line).expect("decode");
        assert!(matches!(ev, WaitEvent::Progress(p) if p.phase == Step::Other("warning".into())));
    }
}
