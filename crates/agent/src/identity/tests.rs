//! Seal and restore against a recording [`IdentitySys`].

use super::*;
use banger_agent_proto::{SshHostKey, SshdStart};
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// Records every call, in order, as one line; `fail` makes the call whose
/// line starts with it fail.
#[derive(Default)]
pub(crate) struct Recorder {
    pub log: Mutex<Vec<String>>,
    pub fail: Option<String>,
    pub systemd: bool,
    pub active_units: Vec<&'static str>,
    pub sshd: Vec<SshdProcess>,
    /// Answers of `fs_size`, per mount, in turn (the last one repeats).
    pub sizes: Mutex<HashMap<String, VecDeque<FsSize>>>,
    /// What `replace_file`/`overwrite_file` wrote, with the mode.
    pub files: Mutex<HashMap<PathBuf, (String, u32)>>,
    pub buffers: Mutex<Vec<Vec<u8>>>,
}

impl Recorder {
    pub fn note(&self, line: String) -> std::io::Result<()> {
        let failing = self.fail.as_deref().is_some_and(|f| line.starts_with(f));
        self.log.lock().expect("log").push(line);
        if failing {
            Err(std::io::Error::other("injected failure"))
        } else {
            Ok(())
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    fn file(&self, path: &str) -> Option<(String, u32)> {
        self.files
            .lock()
            .expect("files")
            .get(Path::new(path))
            .cloned()
    }
}

impl IdentitySys for Recorder {
    fn add_entropy(&self, request: &[u8]) -> std::io::Result<()> {
        self.buffers.lock().expect("buffers").push(request.to_vec());
        self.note(format!("add_entropy {}", request.len()))
    }
    fn reseed_crng(&self) -> std::io::Result<()> {
        self.note("reseed_crng".into())
    }
    fn vmgenid(&self) -> bool {
        let _ = self.note("vmgenid".into());
        true
    }
    fn realtime(&self) -> (i64, u32) {
        let _ = self.note("realtime".into());
        (1_700_000_000, 500_000_000)
    }
    fn set_realtime(&self, t: (i64, u32)) -> std::io::Result<()> {
        self.note(format!("set_realtime {}.{:09}", t.0, t.1))
    }
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        self.note(format!("set_hostname {name}"))
    }
    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        self.note(format!("read {}", path.display()))?;
        Ok("feedfacefeedfacefeedfacefeedface\n".into())
    }
    fn replace_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
        self.note(format!("replace {} {mode:o}", path.display()))?;
        let text = String::from_utf8_lossy(data).into_owned();
        self.files
            .lock()
            .expect("files")
            .insert(path.to_owned(), (text, mode));
        Ok(())
    }
    fn overwrite_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
        self.note(format!("overwrite {} {mode:o}", path.display()))?;
        let text = String::from_utf8_lossy(data).into_owned();
        self.files
            .lock()
            .expect("files")
            .insert(path.to_owned(), (text, mode));
        Ok(())
    }
    fn remove_files(&self, dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>> {
        self.note(format!("remove {}/{prefix}*", dir.display()))?;
        Ok(vec![dir.join(format!("{prefix}ed25519_key"))])
    }
    fn sync(&self) {
        let _ = self.note("sync".into());
    }
    fn apply_net(&self, net: &GuestNetConfig) -> std::io::Result<()> {
        self.note(format!(
            "apply_net {} {} {}/{} via {:?}",
            net.device,
            format_mac(&net.mac),
            net.addr,
            net.prefix,
            net.gateway
        ))
    }
    fn fs_size(&self, mount: &str) -> std::io::Result<FsSize> {
        self.note(format!("fs_size {mount}"))?;
        let mut sizes = self.sizes.lock().expect("sizes");
        let q = sizes
            .get_mut(mount)
            .ok_or_else(|| std::io::Error::other("no such mount"))?;
        let size = if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().copied()
        };
        size.ok_or_else(|| std::io::Error::other("no size"))
    }
    fn resize_fs(&self, mount: &str, blocks: u64) -> std::io::Result<()> {
        self.note(format!("resize_fs {mount} {blocks}"))
    }
    fn systemd(&self) -> bool {
        self.systemd
    }
    fn unit_active(&self, unit: &str) -> bool {
        self.active_units.contains(&unit)
    }
    fn systemctl(&self, args: &[&str]) -> std::io::Result<()> {
        self.note(format!("systemctl {}", args.join(" ")))
    }
    fn sshd_processes(&self) -> Vec<SshdProcess> {
        self.sshd.clone()
    }
    fn terminate(&self, pid: i32) -> std::io::Result<()> {
        self.note(format!("terminate {pid}"))
    }
    fn spawn(&self, argv: &[String]) -> std::io::Result<()> {
        self.note(format!("spawn {}", argv.join(" ")))
    }
}

pub(crate) fn identity() -> RestoreIdentity {
    RestoreIdentity {
        hostname: "box-1".into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        host_key: SshHostKey {
            private_openssh:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
            public: "ssh-ed25519 AAAAC3 box-1".into(),
        },
        authorized_keys: "ssh-ed25519 AAAAuser me@host\n".into(),
        net: Some(GuestNetConfig {
            device: "eth0".into(),
            mac: [0x02, 0xba, 0x0a, 0x00, 0x00, 0x07],
            addr: Ipv4Addr::new(172, 30, 0, 7),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(172, 30, 0, 1)),
            dns: vec![Ipv4Addr::new(172, 30, 0, 1)],
        }),
        entropy: (0..64).collect(),
        realtime: (1_800_000_000, 250_000_000),
        grow: vec!["/".into(), "/root".into()],
        sshd: SshdStart::Now,
    }
}

fn size(blocks: u64, device_bytes: u64) -> FsSize {
    FsSize {
        blocks,
        block_size: 4096,
        device_bytes,
    }
}

/// A recorder whose `/` and `/root` disks have grown to 4 GiB.
pub(crate) fn grown() -> Recorder {
    let r = Recorder::default();
    {
        let mut sizes = r.sizes.lock().expect("sizes");
        for m in ["/", "/root"] {
            sizes.insert(m.into(), VecDeque::from([size(262_144, 4 << 30)]));
        }
    }
    r
}

fn sealed_gate(plan: SshdPlan) -> Arc<SealGate> {
    let gate = Arc::new(SealGate::default());
    gate.begin_seal().expect("seal");
    gate.end_seal(Some(plan));
    gate
}

#[test]
fn restore_runs_in_order_reseed_first_sshd_after_the_answer() {
    let sys = grown();
    let gate = sealed_gate(SshdPlan::Unit("ssh.service".into()));
    let plan = gate.begin_restore().expect("restore");
    let mut answered = None;
    run_restore(
        &sys,
        &gate,
        &identity(),
        plan,
        |body| {
            // The host may send its first exec as soon as it has the answer.
            assert!(!gate.is_sealed(), "the gate opens before the answer");
            sys.note("answer".into()).expect("note");
            answered = Some(body);
        },
        || sys.note("hold".into()).expect("note"),
    );
    assert_eq!(
        sys.lines(),
        [
            "add_entropy 72",
            "reseed_crng",
            "vmgenid",
            "realtime",
            "set_realtime 1800000000.250000000",
            "set_hostname box-1",
            "replace /etc/hostname 644",
            "overwrite /etc/machine-id 444",
            "apply_net eth0 02:ba:0a:00:00:07 172.30.0.7/24 via Some(172.30.0.1)",
            "replace /etc/resolv.conf 644",
            "fs_size /",
            "resize_fs / 1048576",
            "fs_size /root",
            "resize_fs /root 1048576",
            "replace /etc/ssh/ssh_host_ed25519_key 600",
            "replace /etc/ssh/ssh_host_ed25519_key.pub 644",
            "replace /root/.ssh/authorized_keys 600",
            "sync",
            "answer",
            "hold",
            "systemctl start --no-block ssh.service",
        ]
    );
    let Some(Body::Restored(report)) = answered else {
        panic!("expected Restored, got {answered:?}");
    };
    let names: Vec<&str> = report.steps_ms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "reseed",
            "clock",
            "hostname",
            "machine-id",
            "network",
            "grow",
            "ssh",
            "sync"
        ]
    );
    assert!(report.vmgenid);
    // 1_800_000_000.25 - 1_700_000_000.5
    assert_eq!(report.clock_step_ms, 99_999_999_750);
    assert_eq!(report.sshd, "unit ssh.service");
    report.validate().expect("a report the host accepts");
    assert_eq!(sys.file("/etc/hostname"), Some(("box-1\n".into(), 0o644)));
    assert_eq!(
        sys.file("/etc/machine-id"),
        Some(("0123456789abcdef0123456789abcdef\n".into(), 0o444))
    );
    assert_eq!(
        sys.file("/etc/ssh/ssh_host_ed25519_key.pub"),
        Some(("ssh-ed25519 AAAAC3 box-1\n".into(), 0o644))
    );
    assert_eq!(
        sys.file("/etc/resolv.conf"),
        Some(("nameserver 172.30.0.1\n".into(), 0o644))
    );
}

#[test]
fn entropy_is_credited_in_full() {
    let sys = grown();
    let gate = sealed_gate(SshdPlan::None);
    let plan = gate.begin_restore().expect("restore");
    run_restore(&sys, &gate, &identity(), plan, |_| {}, || {});
    let buffers = sys.buffers.lock().expect("buffers");
    let req = &buffers[0];
    assert_eq!(req.len(), 8 + ENTROPY_BYTES);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    assert_eq!(req[0..4], 512i32.to_ne_bytes());
    assert_eq!(req[4..8], 64i32.to_ne_bytes());
    assert_eq!(req[8..], identity().entropy[..]);
    assert_eq!(entropy_request(&[]), [0u8; 8]);
}

#[test]
fn a_failing_step_answers_error_stops_there_and_stays_sealed() {
    let sys = Recorder {
        fail: Some("apply_net".into()),
        ..grown()
    };
    let gate = sealed_gate(SshdPlan::Unit("ssh.service".into()));
    let plan = gate.begin_restore().expect("restore");
    let mut answered = None;
    run_restore(
        &sys,
        &gate,
        &identity(),
        plan,
        |b| answered = Some(b),
        || panic!("a failed restore holds nothing"),
    );
    let Some(Body::Error(msg)) = answered else {
        panic!("expected Error, got {answered:?}");
    };
    assert!(msg.contains("configuring eth0 (02:ba:0a:00:00:07"), "{msg}");
    let lines = sys.lines();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("apply_net eth0 02:ba:0a:00:00:07 172.30.0.7/24 via Some(172.30.0.1)")
    );
    assert!(!lines.iter().any(|l| l.starts_with("systemctl")));
    assert!(gate.is_sealed());
    // The host may try again.
    assert_eq!(
        gate.begin_restore(),
        Ok(SshdPlan::Unit("ssh.service".into()))
    );
}

#[test]
fn an_invalid_identity_touches_nothing() {
    let sys = grown();
    let mut id = identity();
    id.entropy.truncate(10);
    let err = restore(&sys, &id, &SshdPlan::None).expect_err("invalid");
    assert!(err.contains("entropy"), "{err}");
    assert!(sys.lines().is_empty());
}

#[test]
fn restore_without_network_or_growth_skips_those_steps() {
    let sys = Recorder::default();
    let mut id = identity();
    id.net = None;
    id.grow.clear();
    let report = restore(&sys, &id, &SshdPlan::None).expect("restore");
    let names: Vec<&str> = report.steps_ms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["reseed", "clock", "hostname", "machine-id", "ssh", "sync"]
    );
    assert!(!sys.lines().iter().any(|l| l.starts_with("apply_net")));
}

#[test]
fn growth_waits_for_the_new_disk_size() {
    let sys = Recorder::default();
    sys.sizes.lock().expect("sizes").insert(
        "/root".into(),
        VecDeque::from([
            size(262_144, 1 << 30),
            size(262_144, 1 << 30),
            size(262_144, (2 << 30) + 100),
        ]),
    );
    grow(&sys, "/root").expect("grow");
    assert_eq!(
        sys.lines(),
        [
            "fs_size /root",
            "fs_size /root",
            "fs_size /root",
            "resize_fs /root 524288"
        ]
    );
}

#[test]
fn a_disk_that_never_grows_is_an_error() {
    let sys = Recorder::default();
    sys.sizes
        .lock()
        .expect("sizes")
        .insert("/".into(), VecDeque::from([size(262_144, 1 << 30)]));
    let started = Instant::now();
    let err = grow(&sys, "/").expect_err("no growth");
    assert!(started.elapsed() >= GROW_WAIT);
    assert!(err.contains("did not grow"), "{err}");
    assert!(!sys.lines().iter().any(|l| l.starts_with("resize_fs")));
}

#[test]
fn seal_stops_sshd_units_deletes_keys_and_syncs() {
    let sys = Recorder {
        systemd: true,
        active_units: vec!["ssh.socket", "ssh.service"],
        ..Default::default()
    };
    let report = seal(&sys).expect("seal");
    assert_eq!(report.sshd, SshdPlan::Unit("ssh.socket".into()));
    assert_eq!(report.machine_id, "feedfacefeedfacefeedfacefeedface");
    assert_eq!(
        sys.lines(),
        [
            "systemctl stop ssh.socket ssh.service",
            "remove /etc/ssh/ssh_host_*",
            "sync",
            "read /etc/machine-id",
        ]
    );
    report.validate().expect("a report the host accepts");
}

#[test]
fn seal_without_systemd_terminates_the_listening_sshd() {
    let argv: Vec<String> = vec!["/usr/sbin/sshd".into(), "-D".into()];
    let sys = Recorder {
        systemd: false,
        sshd: vec![SshdProcess {
            pid: 42,
            argv: argv.clone(),
        }],
        ..Default::default()
    };
    let report = seal(&sys).expect("seal");
    assert_eq!(report.sshd, SshdPlan::Process(argv.clone()));
    assert_eq!(sys.lines()[0], "terminate 42");
    start_sshd(&sys, &report.sshd);
    assert_eq!(
        sys.lines().last().map(String::as_str),
        Some("spawn /usr/sbin/sshd -D")
    );
}

#[test]
fn seal_with_no_sshd_plans_none() {
    let sys = Recorder {
        systemd: true,
        ..Default::default()
    };
    assert_eq!(seal(&sys).expect("seal").sshd, SshdPlan::None);
    start_sshd(&sys, &SshdPlan::None);
    assert!(
        !sys.lines()
            .iter()
            .any(|l| l.starts_with("spawn") || l.starts_with("systemctl"))
    );
}

#[test]
fn a_failed_seal_opens_the_gate_again() {
    let sys = Recorder {
        systemd: true,
        active_units: vec!["ssh.service"],
        fail: Some("remove".into()),
        ..Default::default()
    };
    let gate = SealGate::default();
    gate.begin_seal().expect("begin");
    let mut answered = None;
    run_seal(&sys, &gate, |b| answered = Some(b));
    assert!(matches!(answered, Some(Body::Error(m)) if m.contains("host keys")));
    assert!(!gate.is_sealed());
}

#[test]
fn gate_transitions() {
    let gate = SealGate::default();
    assert!(!gate.is_sealed());
    assert!(
        gate.begin_restore()
            .expect_err("not sealed")
            .contains("not sealed")
    );
    gate.begin_seal().expect("seal");
    assert!(gate.is_sealed());
    assert!(gate.begin_seal().is_err(), "sealing twice");
    assert!(gate.begin_restore().is_err(), "restore while sealing");
    gate.end_seal(Some(SshdPlan::None));
    assert_eq!(gate.begin_restore(), Ok(SshdPlan::None));
    assert!(gate.begin_restore().is_err(), "restore while restoring");
    assert!(gate.is_sealed());
    gate.end_restore(None);
    assert!(!gate.is_sealed());
}

#[test]
fn clock_step_and_descriptions() {
    assert_eq!(step_ms((10, 0), (12, 500_000_000)), 2500);
    assert_eq!(step_ms((12, 0), (10, 0)), -2000);
    assert_eq!(describe(&SshdPlan::None), "none");
    assert_eq!(
        describe(&SshdPlan::Process(vec![
            "/usr/sbin/sshd".into(),
            "-D".into()
        ])),
        "process /usr/sbin/sshd -D"
    );
    let long = describe(&SshdPlan::Process(vec!["x".repeat(5000)]));
    assert!(long.len() <= banger_agent_proto::identity::MAX_REPORT_TEXT);
}
