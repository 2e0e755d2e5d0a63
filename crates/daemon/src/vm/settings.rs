//! `vm set` (resources of a stopped VM) and `vm stats`.

use crate::error::{Chain, store_kind};
use crate::net::NetError;
use crate::vm::LookupError;
use crate::{Daemon, ErrorKind};
use anyhow::Context;
use banger_agent_proto::ExecRequest;
use banger_agent_proto::client::{AgentClient, ClientError, ExecEvent};
use banger_api::{DiskStats, GuestStats, SetVmRequest, VmStats, VmmProcessStats};
use banger_model::{ByteSize, Provenance, SpecValue, VmName, VmRecord, VmState};
use banger_storage::VmDisks;
use banger_store::StoreError;
use std::sync::Arc;
use std::time::Duration;

use banger_api::rules::{self, MAX_MEMORY_MIB, MAX_VCPU, MIN_MEMORY_MIB};

// The storage crate refuses smaller disks with the same bound.
const _: () = assert!(rules::MIN_DISK_BYTES == banger_storage::MIN_DISK_BYTES);
/// Bound on the guest-side part of `vm stats`.
const GUEST_STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Most output taken from the guest's stats command: the real answer is a
/// few KiB, a hostile guest's may never end.
const MAX_GUEST_STATS: usize = 64 * 1024;

/// Checks requested resources the same way for create and set; returns the
/// parsed disk size.
pub(crate) fn check_resources(
    vcpu: Option<u32>,
    memory_mib: Option<u64>,
    disk_size: Option<&str>,
) -> Result<Option<ByteSize>, ResourceError> {
    if vcpu.is_some_and(|v| v == 0 || v > MAX_VCPU) {
        return Err(ResourceError::Vcpu);
    }
    if memory_mib.is_some_and(|m| !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m)) {
        return Err(ResourceError::Memory);
    }
    if let Some(d) = disk_size {
        rules::DISK_SIZE
            .check(d)
            .map_err(|e| ResourceError::DiskSize(e.to_string()))?;
    }
    disk_size
        .map(str::parse::<ByteSize>)
        .transpose()
        .map_err(|e| ResourceError::DiskSize(format!("disk size: {e}")))
}

/// A requested vCPU count, memory or disk size out of bounds (create and
/// set): the request is wrong whatever the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("vcpu must be between 1 and {}", MAX_VCPU)]
    Vcpu,
    #[error("memory must be between {} and {} MiB", MIN_MEMORY_MIB, MAX_MEMORY_MIB)]
    Memory,
    /// The disk size's rule or parse, in its own words.
    #[error("{0}")]
    DiskSize(String),
}

impl ResourceError {
    /// What kind of failure this is: always the request's.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

/// Why `vm set` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("nothing to change: pass --vcpu, --memory, --disk-size or --nat/--no-nat")]
    Empty,
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// vCPUs, memory and disks change only while the VM is stopped.
    #[error("VM {name} is {state}: stop it first (`banger vm stop {name}`) to change its {what}")]
    NotStopped {
        name: VmName,
        state: VmState,
        /// What the request asked to change, e.g. "vcpu, memory".
        what: String,
    },
    /// Disks only grow.
    #[error("VM {name} has a {current} disk; disks only grow, so {asked} is refused")]
    Shrink {
        name: VmName,
        current: ByteSize,
        asked: ByteSize,
    },
    /// NAT needs the bridge, or changing the rules failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Growing the disks failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    /// Recording the change failed.
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl SetError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SetError::Empty => ErrorKind::Invalid,
            SetError::Resources(e) => e.kind(),
            SetError::Lookup(e) => e.kind(),
            SetError::NotStopped { .. } | SetError::Shrink { .. } => ErrorKind::Conflict,
            SetError::Net(e) => e.kind(),
            SetError::Failed(_) => ErrorKind::Failed,
            SetError::Store(e) => store_kind(e),
        }
    }
}

impl Daemon {
    /// Changes vcpu, memory, disk size (grow only) and NAT of a VM.
    /// Precondition: the VM is stopped (NAT alone may change while it runs);
    /// a running VM is refused with what to do, since vCPUs, memory and
    /// disks cannot change under a running guest here.
    pub async fn set_vm(
        self: &Arc<Self>,
        r: &str,
        req: SetVmRequest,
    ) -> Result<VmRecord, SetError> {
        if req.is_empty() {
            return Err(SetError::Empty);
        }
        // NAT alone can change under a running VM: its rules are host-side.
        if let (Some(nat), None, None, None) =
            (req.nat, req.vcpu, req.memory_mib, req.disk_size.as_ref())
        {
            return self.set_vm_nat(r, nat).await;
        }
        let disk = check_resources(req.vcpu, req.memory_mib, req.disk_size.as_deref())?;
        let mut cx = self.lock_vm(r).await?;
        let vm = &mut cx.vm;
        if !matches!(vm.state, VmState::Stopped | VmState::Error)
            || vm
                .pid
                .is_some_and(|p| banger_vmm::vmm_process_alive(p, &vm.dir))
        {
            let what = [
                req.vcpu.map(|_| "vcpu"),
                req.memory_mib.map(|_| "memory"),
                req.disk_size.as_ref().map(|_| "disk size"),
                req.nat.map(|_| "NAT"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            return Err(SetError::NotStopped {
                name: vm.name.clone(),
                state: vm.state,
                what,
            });
        }
        if let Some(d) = disk {
            // A work disk cloned from a seed larger than the asked size is
            // as large as its seed.
            let disks = VmDisks::in_dir(&vm.dir);
            let current = [&disks.work, &disks.overlay]
                .into_iter()
                .map(|p| banger_storage::disk_usage(p).virtual_bytes)
                .fold(vm.spec.disk_bytes.value, u64::max);
            if d.bytes() < current {
                // A rule of this VM's state, not of the request's shape.
                return Err(SetError::Shrink {
                    name: vm.name.clone(),
                    current: ByteSize(current),
                    asked: d,
                });
            }
            for path in [&disks.work, &disks.overlay] {
                banger_storage::grow_disk(path, d.bytes())
                    .await
                    .with_context(|| format!("growing the disks of VM {}", vm.name))?;
            }
            vm.spec.disk_bytes = SpecValue::new(d.bytes(), Provenance::Flag);
        }
        if let Some(v) = req.vcpu {
            vm.spec.vcpu = SpecValue::new(v, Provenance::Flag);
        }
        if let Some(m) = req.memory_mib {
            vm.spec.memory_mib = SpecValue::new(m, Provenance::Flag);
        }
        if let Some(n) = req.nat {
            vm.nat = n;
        }
        self.store.update_vm(vm)?;
        tracing::info!(vm = %vm.name, spec = %vm.spec.summary(), nat = vm.nat, "changed VM");
        Ok(vm.clone())
    }

    /// Host-side figures of a VM (VMM process, disks) and, with `guest`,
    /// the guest's own through its agent.
    pub async fn vm_stats(&self, r: &str, guest: bool) -> Result<VmStats, LookupError> {
        let vm = self.store.resolve_vm(r)?;
        let vmm = vm
            .pid
            .filter(|p| banger_vmm::vmm_process_alive(*p, &vm.dir))
            .and_then(process_stats);
        let mut disks = Vec::new();
        if let Ok(image) = self.store.get_image(&vm.image) {
            disks.push(disk_stats("base", &image.rootfs, true));
        }
        let own = VmDisks::in_dir(&vm.dir);
        disks.push(disk_stats("overlay", &own.overlay, false));
        disks.push(disk_stats("work", &own.work, false));
        let guest = match (guest, vm.state, self.agent(&vm.id)) {
            (true, VmState::Running, Some(agent)) => {
                match tokio::time::timeout(GUEST_STATS_TIMEOUT, guest_stats(&agent)).await {
                    Ok(Ok(g)) => Some(g),
                    // Only an oversized answer is worth a warning: an image
                    // without df, polled by the TUI, would fill the log.
                    Ok(Err(e @ GuestStatsError::TooLarge)) => {
                        tracing::warn!(vm = %vm.name, error = %e, "no guest figures");
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(vm = %vm.name, error = %e, "no guest figures");
                        None
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        };
        Ok(VmStats {
            name: vm.name.to_string(),
            state: vm.state,
            vcpu: vm.spec.vcpu.value,
            memory_mib: vm.spec.memory_mib.value,
            vmm,
            disks,
            guest,
        })
    }
}

fn disk_stats(role: &str, path: &std::path::Path, shared: bool) -> DiskStats {
    let u = banger_storage::disk_usage(path);
    DiskStats {
        role: role.into(),
        path: path.display().to_string(),
        virtual_bytes: u.virtual_bytes,
        allocated_bytes: u.allocated_bytes,
        shared,
    }
}

/// CPU time, average CPU use and RSS of process `pid`, from /proc.
pub(crate) fn process_stats(pid: u32) -> Option<VmmProcessStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, in parens.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); utime is field 14, starttime 22.
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)? as f64;
    let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
    let started = field(22)? as f64 / ticks;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let uptime_seconds = (uptime - started).max(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(VmmProcessStats {
        pid,
        cpu_seconds,
        cpu_percent: if uptime_seconds > 0.0 {
            100.0 * cpu_seconds / uptime_seconds
        } else {
            0.0
        },
        rss_bytes: rss_kib * 1024,
        uptime_seconds,
    })
}

/// Why the guest's own figures are missing from `vm stats`.
#[derive(Debug, thiserror::Error)]
enum GuestStatsError {
    #[error("asking the guest agent: {0}")]
    Agent(#[from] ClientError),
    #[error("the guest's answer was too large (more than {MAX_GUEST_STATS} bytes)")]
    TooLarge,
    #[error("the guest's answer is not what its stats command prints")]
    Unreadable,
}

/// Reads memory, load and file system use inside the guest with one exec.
/// An answer over [`MAX_GUEST_STATS`] ends the exec (dropping the session
/// kills the process) instead of piling up until the timeout.
async fn guest_stats(agent: &AgentClient) -> Result<GuestStats, GuestStatsError> {
    let req = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "cat /proc/meminfo /proc/loadavg; df -P -B1 / /root".into(),
        ],
        ..Default::default()
    };
    let mut session = agent.exec(req)?;
    let mut out = Vec::new();
    while let Ok(Some(ev)) = session.next_event().await {
        match ev {
            ExecEvent::Stdout(b) => {
                if out.len().saturating_add(b.len()) > MAX_GUEST_STATS {
                    return Err(GuestStatsError::TooLarge);
                }
                out.extend_from_slice(&b);
            }
            ExecEvent::Exited(_) => break,
            _ => {}
        }
    }
    parse_guest_stats(&String::from_utf8_lossy(&out)).ok_or(GuestStatsError::Unreadable)
}

/// Parses `/proc/meminfo`, `/proc/loadavg` and `df -P -B1 / /root` output.
fn parse_guest_stats(text: &str) -> Option<GuestStats> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|v| v * 1024)
    };
    let load1 = text
        .lines()
        .find(|l| l.split_whitespace().count() == 5 && l.contains('/'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // df rows: filesystem, size, used, available, capacity, mount point.
    let df = |mount: &str| -> Option<(u64, u64)> {
        let cols: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c.len() == 6 && c[5] == mount)?;
        Some((cols[2].parse().ok()?, cols[1].parse().ok()?))
    };
    let (root_used, root_total) = df("/")?;
    let (work_used, work_total) = df("/root").unwrap_or((0, 0));
    Some(GuestStats {
        mem_total_bytes: kib("MemTotal:")?,
        mem_available_bytes: kib("MemAvailable:")?,
        mem_free_bytes: kib("MemFree:")?,
        load1,
        root_used_bytes: root_used,
        root_total_bytes: root_total,
        work_used_bytes: work_used,
        work_total_bytes: work_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{daemon, record};

    #[test]
    fn resource_and_set_errors_keep_todays_text() {
        let e = check_resources(Some(0), None, None).expect_err("vcpu");
        assert_eq!(
            (e.kind(), e.to_string()),
            (
                ErrorKind::Invalid,
                format!("vcpu must be between 1 and {MAX_VCPU}")
            )
        );
        let e = check_resources(None, None, Some("lots")).expect_err("disk");
        assert!(matches!(e, ResourceError::DiskSize(_)), "{e:?}");
        let name = VmName::parse("calm-otter").expect("name");
        let e = SetError::Shrink {
            name: name.clone(),
            current: ByteSize(2 << 30),
            asked: ByteSize(1 << 30),
        };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            format!(
                "VM calm-otter has a {} disk; disks only grow, so {} is refused",
                ByteSize(2 << 30),
                ByteSize(1 << 30)
            )
        );
        let e = SetError::from(NetError::NatNeedsBridge { mode: "user" });
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "NAT needs bridge networking; this daemon uses user networking (see banger doctor)"
        );
        assert_eq!(SetError::Empty.kind(), ErrorKind::Invalid);
    }

    #[tokio::test]
    async fn set_refuses_a_running_vm_with_what_to_do() {
        let t = tempfile::tempdir().expect("tmp");
        let d = daemon(&t);
        record(&d, "calm-otter", VmState::Running);
        let req = SetVmRequest {
            vcpu: Some(2),
            memory_mib: Some(512),
            ..Default::default()
        };
        let e = d.set_vm("calm-otter", req).await.expect_err("running");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter is running: stop it first (`banger vm stop calm-otter`) to change its vcpu, memory"
        );
        let e = d
            .set_vm("calm-otter", SetVmRequest::default())
            .await
            .expect_err("empty");
        assert_eq!(crate::DaemonError::from(e).to_api().code, "invalid");
    }

    #[test]
    fn resources_are_checked_once_for_create_and_set() {
        assert!(check_resources(Some(0), None, None).is_err());
        assert!(check_resources(Some(65), None, None).is_err());
        assert!(check_resources(None, Some(64), None).is_err());
        assert!(check_resources(None, None, Some("lots")).is_err());
        assert!(check_resources(None, None, Some("1M")).is_err());
        assert_eq!(
            check_resources(Some(2), Some(1024), Some("16G")).expect("ok"),
            Some(ByteSize::gib(16))
        );
    }

    #[test]
    fn guest_stats_parse_real_output() {
        let text = "MemTotal:        1004548 kB\nMemFree:          800000 kB\n\
MemAvailable:     900000 kB\nBuffers:            1000 kB\n\
0.52 0.31 0.12 1/97 412\n\
Filesystem     1-blocks    Used Available Capacity Mounted on\n\
overlay      8318783488 8482816 7883358208       1% /\n\
/dev/vdc     8318783488   40960 7889833984       1% /root\n";
        let g = parse_guest_stats(text).expect("parse");
        assert_eq!(g.mem_total_bytes, 1004548 * 1024);
        assert_eq!(g.mem_available_bytes, 900000 * 1024);
        assert_eq!(g.mem_free_bytes, 800000 * 1024);
        assert!((g.load1 - 0.52).abs() < 1e-9);
        assert_eq!(
            (g.root_used_bytes, g.root_total_bytes),
            (8482816, 8318783488)
        );
        assert_eq!((g.work_used_bytes, g.work_total_bytes), (40960, 8318783488));
        assert!(parse_guest_stats("garbage").is_none());
    }

    #[test]
    fn own_process_stats_are_sane() {
        let s = process_stats(std::process::id()).expect("stats of self");
        assert!(s.rss_bytes > 1 << 20, "{s:?}");
        assert!(s.cpu_seconds >= 0.0 && s.uptime_seconds >= 0.0, "{s:?}");
        assert!(process_stats(u32::MAX).is_none());
    }

    #[tokio::test]
    async fn an_endless_stats_answer_is_cut_off_and_its_exec_ended() {
        use banger_agent_proto::{Body, Frame, FrameCodec};
        use futures::{SinkExt, StreamExt};
        let (host, guest) = tokio::io::duplex(64 * 1024);
        let agent = AgentClient::spawn(host);
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        // An agent that answers the stats exec with far more than its real
        // output, and never with an exit.
        tokio::spawn(async move {
            let mut io = tokio_util::codec::Framed::new(guest, FrameCodec);
            let mut ended_tx = Some(ended_tx);
            while let Some(Ok(Ok(frame))) = io.next().await {
                match frame.body {
                    Body::Exec(_) => {
                        for _ in 0..64 {
                            let out = Body::Stdout(vec![b'x'; 16 * 1024]);
                            if io.send(Frame::new(frame.channel, out)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Body::Credit(_) => {}
                    other => {
                        if let Some(tx) = ended_tx.take() {
                            let _ = tx.send(other);
                        }
                    }
                }
            }
        });
        let got = tokio::time::timeout(Duration::from_secs(5), guest_stats(&agent))
            .await
            .expect("cut off, not waited out");
        let err = got.expect_err("too large");
        assert!(matches!(err, GuestStatsError::TooLarge), "{err}");
        assert!(err.to_string().contains("too large"), "{err}");
        let ended = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the exec is ended")
            .expect("the fake agent saw it");
        assert!(matches!(ended, Body::Error(_)), "{ended:?}");
    }
}
