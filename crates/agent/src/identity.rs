//! Sealing the guest into a template and giving a restored clone its own
//! identity (warm starts; protocol in [`banger_agent_proto::identity`]).
//!
//! A template guest is sealed once: sshd stopped, its host keys deleted,
//! the disks synced, and from then on the agent refuses all work but a
//! restore ([`SealGate`]). The gate is guest memory, so every clone of the
//! snapshot wakes up sealed and can run nothing with the template's
//! identity. A restore applies the host's fresh identity in a fixed order
//! (entropy first, so nothing after it draws from the template's pool
//! state; sshd last, after the answer, so the host's first command does not
//! wait for it).
//!
//! The system calls sit behind [`IdentitySys`]; [`SystemIdentity`] is the
//! real one, and the tests drive the logic with a recording double.

pub mod system;
pub use system::SystemIdentity;

use banger_agent_proto::identity::{ENTROPY_BYTES, format_mac};
use banger_agent_proto::{
    Body, GuestNetConfig, RestoreIdentity, RestoreReport, SealReport, SshdPlan,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The systemd units that may run sshd, socket first: when socket
/// activation is on, starting the socket is what brings sshd back.
pub const SSHD_UNITS: &[&str] = &["ssh.socket", "ssh.service", "sshd.service"];

/// Where the SSH host keys live; every `ssh_host_*` file there is deleted at seal.
pub const SSH_DIR: &str = "/etc/ssh";
/// The host key a restore installs (the public half gets `.pub`).
pub const HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";
/// Where a restore writes the authorized keys.
pub const AUTHORIZED_KEYS: &str = "/root/.ssh/authorized_keys";
pub const MACHINE_ID: &str = "/etc/machine-id";
pub const HOSTNAME: &str = "/etc/hostname";
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How long a restore waits for a grown disk's new size to show in the guest.
pub const GROW_WAIT: Duration = Duration::from_secs(2);
const GROW_POLL: Duration = Duration::from_millis(20);

/// The longest machine id the seal report carries.
const MACHINE_ID_MAX: usize = banger_agent_proto::identity::MAX_REPORT_TEXT;

/// A file system's size against its device's, for growing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSize {
    /// Blocks in the file system.
    pub blocks: u64,
    /// Its block size in bytes.
    pub block_size: u64,
    /// Bytes of the block device under it.
    pub device_bytes: u64,
}

impl FsSize {
    /// Blocks the file system can have on its device, when more than it has.
    pub fn grown_blocks(&self) -> Option<u64> {
        let fit = self.device_bytes / self.block_size.max(1);
        (fit > self.blocks).then_some(fit)
    }
}

/// A listening sshd process found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshdProcess {
    pub pid: i32,
    /// The argv that starts it again.
    pub argv: Vec<String>,
}

/// The system calls behind sealing and restoring. Each method is one
/// effect, so a recording double shows the order of a whole seal or restore.
pub trait IdentitySys: Send + Sync {
    /// `RNDADDENTROPY` with an already laid out `rand_pool_info`
    /// ([`entropy_request`]).
    fn add_entropy(&self, request: &[u8]) -> std::io::Result<()>;
    /// `RNDRESEEDCRNG`: the kernel's CRNG reseeds from the pool now.
    fn reseed_crng(&self) -> std::io::Result<()>;
    /// Whether a VM generation id device exists (ACPI `VMGENID*`).
    fn vmgenid(&self) -> bool;
    /// `CLOCK_REALTIME` now: (seconds, nanoseconds).
    fn realtime(&self) -> (i64, u32);
    fn set_realtime(&self, t: (i64, u32)) -> std::io::Result<()>;
    fn set_hostname(&self, name: &str) -> std::io::Result<()>;
    fn read_file(&self, path: &Path) -> std::io::Result<String>;
    /// Replaces `path` (a new file renamed over it; a symlink is replaced,
    /// not followed) with `data`, mode `mode`; makes missing parents 0700.
    /// Not durable by itself: the caller syncs once after a batch.
    fn replace_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()>;
    /// Writes `data` into the existing file at `path` (creating it, mode
    /// `mode`, if missing): a bind mount over it stays in place. Not
    /// durable by itself, like `replace_file`.
    fn overwrite_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()>;
    /// Removes the files in `dir` whose names start with `prefix`.
    fn remove_files(&self, dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>>;
    fn sync(&self);
    /// Gives the NIC its MAC, address, default route (bringing it up).
    fn apply_net(&self, net: &GuestNetConfig) -> std::io::Result<()>;
    /// The size of the file system mounted at `mount` and of its device.
    fn fs_size(&self, mount: &str) -> std::io::Result<FsSize>;
    /// `EXT4_IOC_RESIZE_FS` of the file system at `mount` to `blocks`.
    fn resize_fs(&self, mount: &str, blocks: u64) -> std::io::Result<()>;
    /// Whether systemd runs the guest (it is PID 1).
    fn systemd(&self) -> bool;
    /// `systemctl is-active --quiet <unit>`.
    fn unit_active(&self, unit: &str) -> bool;
    /// Runs `systemctl <args>`; an exit status other than 0 is an error.
    fn systemctl(&self, args: &[&str]) -> std::io::Result<()>;
    /// The listening sshd processes.
    fn sshd_processes(&self) -> Vec<SshdProcess>;
    /// SIGTERM to `pid`, then waits (boundedly) for it to be gone.
    fn terminate(&self, pid: i32) -> std::io::Result<()>;
    /// Starts `argv` detached from the agent.
    fn spawn(&self, argv: &[String]) -> std::io::Result<()>;
}

/// Where the agent is between seal and restore. Shared by every host
/// connection, and part of guest memory: a clone of a sealed template
/// starts sealed.
#[derive(Debug, Default)]
pub struct SealGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum GateState {
    #[default]
    Open,
    Sealing,
    Sealed(SshdPlan),
    Restoring,
}

impl SealGate {
    /// True from the start of a seal to the end of a restore: all work but
    /// a restore is refused.
    pub fn is_sealed(&self) -> bool {
        *self.lock() != GateState::Open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate for a seal; refused unless open.
    pub fn begin_seal(&self) -> Result<(), String> {
        let mut st = self.lock();
        if *st != GateState::Open {
            return Err("this VM is already sealed".into());
        }
        *st = GateState::Sealing;
        Ok(())
    }

    /// Ends a seal: sealed with `plan`, or open again when it failed.
    pub fn end_seal(&self, outcome: Option<SshdPlan>) {
        *self.lock() = match outcome {
            Some(plan) => GateState::Sealed(plan),
            None => GateState::Open,
        };
    }

    /// Starts a restore; refused unless sealed (and not restoring).
    pub fn begin_restore(&self) -> Result<SshdPlan, String> {
        let mut st = self.lock();
        match std::mem::replace(&mut *st, GateState::Restoring) {
            GateState::Sealed(plan) => Ok(plan),
            other => {
                let msg = match other {
                    GateState::Open => "this VM is not sealed: it has its identity already",
                    GateState::Sealing => "this VM is still being sealed",
                    _ => "this VM is being restored already",
                };
                *st = other;
                Err(msg.into())
            }
        }
    }

    /// Ends a restore: open, or sealed again (with `plan`) when it failed.
    pub fn end_restore(&self, failed: Option<SshdPlan>) {
        *self.lock() = match failed {
            Some(plan) => GateState::Sealed(plan),
            None => GateState::Open,
        };
    }
}

/// Runs a seal whose gate the caller closed ([`SealGate::begin_seal`])
/// and hands the answer to `answer`. A failed seal opens the gate again
/// (sshd may stay stopped: the host discards that guest).
pub fn run_seal(sys: &dyn IdentitySys, gate: &SealGate, answer: impl FnOnce(Body)) {
    match seal(sys) {
        Ok(report) => {
            gate.end_seal(Some(report.sshd.clone()));
            answer(Body::Sealed(report));
        }
        Err(e) => {
            tracing::error!(error = %e, "seal failed");
            gate.end_seal(None);
            answer(Body::Error(format!("sealing failed: {e}")));
        }
    }
}

/// Runs a restore begun with [`SealGate::begin_restore`]: applies `id`,
/// opens the gate, hands the answer to `answer`, and only then starts
/// sshd, once `hold` returns (it waits as `id.sshd` asks). A failed
/// restore leaves the guest sealed.
pub fn run_restore(
    sys: &dyn IdentitySys,
    gate: &SealGate,
    id: &RestoreIdentity,
    sshd: SshdPlan,
    answer: impl FnOnce(Body),
    hold: impl FnOnce(),
) {
    match restore(sys, id, &sshd) {
        Ok(report) => {
            tracing::info!(
                steps = ?report.steps_ms,
                vmgenid = report.vmgenid,
                clock_step_ms = report.clock_step_ms,
                hostname = %id.hostname,
                "identity restored"
            );
            gate.end_restore(None);
            answer(Body::Restored(report));
            hold();
            start_sshd(sys, &sshd);
        }
        Err(e) => {
            tracing::error!(error = %e, "restore failed");
            gate.end_restore(Some(sshd));
            answer(Body::Error(format!("restoring the identity failed: {e}")));
        }
    }
}

/// Seals the guest: sshd stopped (how is remembered for the restore), its
/// host keys deleted, the disks synced. The caller has checked that no
/// work is live and closed the gate.
pub fn seal(sys: &dyn IdentitySys) -> Result<SealReport, String> {
    let sshd = stop_sshd(sys)?;
    let removed = sys
        .remove_files(Path::new(SSH_DIR), "ssh_host_")
        .map_err(|e| format!("deleting the SSH host keys in {SSH_DIR}: {e}"))?;
    tracing::info!(
        ?sshd,
        keys = removed.len(),
        "sealed: sshd stopped, host keys deleted"
    );
    sys.sync();
    let mut machine_id = sys
        .read_file(Path::new(MACHINE_ID))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if machine_id.len() > MACHINE_ID_MAX {
        machine_id.clear();
    }
    Ok(SealReport { sshd, machine_id })
}

/// Stops sshd: its systemd units if systemd runs it, else the listening
/// sshd processes.
fn stop_sshd(sys: &dyn IdentitySys) -> Result<SshdPlan, String> {
    if sys.systemd() {
        let active: Vec<&str> = SSHD_UNITS
            .iter()
            .copied()
            .filter(|u| sys.unit_active(u))
            .collect();
        if let Some(first) = active.first() {
            let mut args = vec!["stop"];
            args.extend(&active);
            sys.systemctl(&args)
                .map_err(|e| format!("stopping {}: {e}", active.join(" ")))?;
            return Ok(SshdPlan::Unit(first.to_string()));
        }
    }
    let found = sys.sshd_processes();
    let Some(first) = found.first() else {
        return Ok(SshdPlan::None);
    };
    let plan = SshdPlan::Process(first.argv.clone());
    for p in &found {
        sys.terminate(p.pid)
            .map_err(|e| format!("stopping sshd (pid {}): {e}", p.pid))?;
    }
    Ok(plan)
}

/// The `struct rand_pool_info` of `RNDADDENTROPY` for `bytes`, every bit
/// credited: `entropy_count` (bits), `buf_size` (bytes), then the bytes.
pub fn entropy_request(bytes: &[u8]) -> Vec<u8> {
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    let mut req = Vec::with_capacity(8 + bytes.len());
    req.extend_from_slice(&bits.to_ne_bytes());
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(bytes);
    req
}

/// Applies `id`, in order; `Err` names the step that failed. The steps
/// are timed for the report. sshd is not started here: see [`start_sshd`].
pub fn restore(
    sys: &dyn IdentitySys,
    id: &RestoreIdentity,
    sshd: &SshdPlan,
) -> Result<RestoreReport, String> {
    id.validate()?;
    let mut steps = Steps::default();
    let mut vmgenid = false;
    steps.run("reseed", || {
        sys.add_entropy(&entropy_request(&id.entropy))
            .map_err(|e| format!("adding {ENTROPY_BYTES} bytes of entropy: {e}"))?;
        sys.reseed_crng()
            .map_err(|e| format!("reseeding the kernel's random generator: {e}"))?;
        vmgenid = sys.vmgenid();
        Ok(())
    })?;
    let mut clock_step_ms = 0;
    steps.run("clock", || {
        let before = sys.realtime();
        sys.set_realtime(id.realtime)
            .map_err(|e| format!("setting the clock: {e}"))?;
        clock_step_ms = step_ms(before, id.realtime);
        Ok(())
    })?;
    steps.run("hostname", || {
        sys.set_hostname(&id.hostname)
            .map_err(|e| format!("setting the host name {}: {e}", id.hostname))?;
        let text = format!("{}\n", id.hostname);
        sys.replace_file(Path::new(HOSTNAME), text.as_bytes(), 0o644)
            .map_err(|e| format!("writing {HOSTNAME}: {e}"))
    })?;
    steps.run("machine-id", || {
        let text = format!("{}\n", id.machine_id);
        sys.overwrite_file(Path::new(MACHINE_ID), text.as_bytes(), 0o444)
            .map_err(|e| format!("writing {MACHINE_ID}: {e}"))
    })?;
    if let Some(net) = &id.net {
        steps.run("network", || {
            sys.apply_net(net).map_err(|e| {
                format!(
                    "configuring {} ({} {}/{}): {e}",
                    net.device,
                    format_mac(&net.mac),
                    net.addr,
                    net.prefix
                )
            })?;
            if let Some(text) = crate::netconf::resolv_conf(&net.dns) {
                sys.replace_file(Path::new(RESOLV_CONF), text.as_bytes(), 0o644)
                    .map_err(|e| format!("writing {RESOLV_CONF}: {e}"))?;
            }
            Ok(())
        })?;
    }
    if !id.grow.is_empty() {
        steps.run("grow", || {
            for mount in &id.grow {
                grow(sys, mount)?;
            }
            Ok(())
        })?;
    }
    steps.run("ssh", || {
        let key = Path::new(HOST_KEY);
        let public = PathBuf::from(format!("{HOST_KEY}.pub"));
        sys.replace_file(key, id.host_key.private_openssh.as_bytes(), 0o600)
            .map_err(|e| format!("writing {HOST_KEY}: {e}"))?;
        sys.replace_file(&public, line(&id.host_key.public).as_bytes(), 0o644)
            .map_err(|e| format!("writing {}: {e}", public.display()))?;
        sys.replace_file(
            Path::new(AUTHORIZED_KEYS),
            id.authorized_keys.as_bytes(),
            0o600,
        )
        .map_err(|e| format!("writing {AUTHORIZED_KEYS}: {e}"))
    })?;
    // One flush for every file above, before the answer: the VM's disks
    // must hold its own identity (never the template's) if it is killed
    // and later booted cold. Each file's own fsync used to cost a host
    // fdatasync apiece (cache=writeback), the largest part of a restore.
    steps.run("sync", || {
        sys.sync();
        Ok(())
    })?;
    Ok(RestoreReport {
        steps_ms: steps.done,
        vmgenid,
        clock_step_ms,
        sshd: describe(sshd),
    })
}

/// Grows the file system at `mount` once its device shows its new size
/// (the host grew it just before the restore; the guest learns of it
/// through a config interrupt, which may lag a little).
fn grow(sys: &dyn IdentitySys, mount: &str) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let size = sys
            .fs_size(mount)
            .map_err(|e| format!("reading the size of {mount}: {e}"))?;
        if let Some(blocks) = size.grown_blocks() {
            sys.resize_fs(mount, blocks)
                .map_err(|e| format!("growing {mount} to {blocks} blocks: {e}"))?;
            tracing::info!(mount, blocks, "file system grown");
            return Ok(());
        }
        if started.elapsed() >= GROW_WAIT {
            return Err(format!(
                "the disk of {mount} did not grow within {GROW_WAIT:?}: it holds {} bytes, its file system {} blocks of {}",
                size.device_bytes, size.blocks, size.block_size
            ));
        }
        std::thread::sleep(GROW_POLL);
    }
}

/// Starts sshd the way it ran before the seal. Called after the restore's
/// answer; a failure is logged (the host's `wait_sshd` notices).
pub fn start_sshd(sys: &dyn IdentitySys, plan: &SshdPlan) {
    let result = match plan {
        SshdPlan::None => return,
        SshdPlan::Unit(unit) => sys.systemctl(&["start", "--no-block", unit]),
        SshdPlan::Process(argv) => sys.spawn(argv),
    };
    match result {
        Ok(()) => tracing::info!(sshd = describe(plan), "sshd started"),
        Err(e) => tracing::error!(sshd = describe(plan), error = %e, "cannot start sshd"),
    }
}

/// How a plan reads in a report.
pub fn describe(plan: &SshdPlan) -> String {
    let s = match plan {
        SshdPlan::None => "none".to_string(),
        SshdPlan::Unit(u) => format!("unit {u}"),
        SshdPlan::Process(argv) => format!("process {}", argv.join(" ")),
    };
    let max = banger_agent_proto::identity::MAX_REPORT_TEXT;
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `text` ending in exactly one newline.
fn line(text: &str) -> String {
    format!("{}\n", text.trim_end())
}

/// Milliseconds from `before` to `after` (negative when the clock went back).
fn step_ms(before: (i64, u32), after: (i64, u32)) -> i64 {
    let ms = |t: (i64, u32)| i128::from(t.0) * 1000 + i128::from(t.1 / 1_000_000);
    i64::try_from(ms(after) - ms(before)).unwrap_or(i64::MAX)
}

/// The timed steps of a restore.
#[derive(Default)]
struct Steps {
    done: Vec<(String, u32)>,
}

impl Steps {
    fn run(&mut self, name: &str, step: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let started = Instant::now();
        step()?;
        let ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        self.done.push((name.to_string(), ms));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
