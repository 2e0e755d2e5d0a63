//! Sealing a guest into a template and giving a restored clone its own
//! identity (warm starts).
//!
//! The host asks a freshly booted guest to [`Body::Seal`](crate::Body::Seal)
//! itself (sshd stopped, host keys deleted) and snapshots it. Every clone
//! restored from that snapshot wakes up sealed: its agent refuses all work
//! but [`Body::Restore`](crate::Body::Restore), which carries a
//! [`RestoreIdentity`] made fresh by the host for that one VM.
//!
//! Both directions are bounded here: the agent checks what the host sends
//! ([`RestoreIdentity::validate`]) and the host checks what a (possibly
//! hostile) guest answers ([`SealReport::validate`],
//! [`RestoreReport::validate`]) before using any of it.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// What a sealed agent answers to every request it refuses.
pub const SEALED_MESSAGE: &str = "this VM is waiting for its identity";

/// The longest a restored guest holds sshd back for its first command
/// ([`SshdStart::AfterFirstCommand`]).
pub const SSHD_DEFER: std::time::Duration = std::time::Duration::from_secs(1);

/// When a restored guest starts the sshd its seal stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SshdStart {
    /// Right after the answer: the host waits for sshd (an ssh session).
    #[default]
    Now,
    /// Once the first command after the restore has ended, or
    /// [`SSHD_DEFER`] after the answer if none has: sshd's start (systemd,
    /// key loading) would take the guest's CPU from that command.
    AfterFirstCommand,
}

/// Bytes of host randomness a restore feeds the guest's entropy pool.
pub const ENTROPY_BYTES: usize = 64;

/// Longest host name (one DNS label).
pub const MAX_HOSTNAME: usize = 63;
/// Longest OpenSSH private key file accepted.
pub const MAX_PRIVATE_KEY: usize = 16 * 1024;
/// Longest public key line accepted.
pub const MAX_PUBLIC_KEY: usize = 4 * 1024;
/// Longest `authorized_keys` file accepted.
pub const MAX_AUTHORIZED_KEYS: usize = 64 * 1024;
/// Most resolvers in a [`GuestNetConfig`].
pub const MAX_DNS: usize = 8;
/// Most mount points a restore grows.
pub const MAX_GROW: usize = 8;
/// Longest path in a restore or seal message.
pub const MAX_PATH: usize = 256;
/// Longest systemd unit name in a [`SshdPlan`].
pub const MAX_UNIT: usize = 256;
/// Most arguments of a [`SshdPlan::Process`].
pub const MAX_ARGS: usize = 64;
/// Longest argument of a [`SshdPlan::Process`].
pub const MAX_ARG: usize = 4096;
/// Most timed steps in a [`RestoreReport`].
pub const MAX_STEPS: usize = 16;
/// Longest step name in a [`RestoreReport`].
pub const MAX_STEP_NAME: usize = 32;
/// Longest free-text field of a report (machine id, sshd outcome).
pub const MAX_REPORT_TEXT: usize = 256;

/// The guest's SSH host key pair (ed25519), made by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshHostKey {
    /// The private key in OpenSSH's file format (`-----BEGIN OPENSSH
    /// PRIVATE KEY-----`...), written mode 0600.
    pub private_openssh: String,
    /// The public key line (`ssh-ed25519 AAAA... comment`), written mode 0644.
    pub public: String,
}

/// The guest's network: its NIC gets this MAC, address, default route
/// and resolvers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetConfig {
    /// The interface, e.g. `eth0`.
    pub device: String,
    /// Unicast MAC address.
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    /// Prefix length of `addr`'s network (0..=32).
    pub prefix: u8,
    /// Default route, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Resolvers for `/etc/resolv.conf`; empty leaves the file alone.
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNetConfig {
    /// The netmask of [`prefix`](Self::prefix).
    pub fn netmask(&self) -> Ipv4Addr {
        let p = u32::from(self.prefix.min(32));
        let bits = if p == 0 { 0 } else { u32::MAX << (32 - p) };
        Ipv4Addr::from(bits)
    }

    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), String> {
        if self.device.is_empty()
            || self.device.len() > 15
            || !self
                .device
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!("invalid network device name {:?}", self.device));
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(format!(
                "MAC address {} is not a unicast address",
                format_mac(&self.mac)
            ));
        }
        if self.prefix > 32 {
            return Err(format!("network prefix /{} is over 32", self.prefix));
        }
        if self.dns.len() > MAX_DNS {
            return Err(format!("more than {MAX_DNS} resolvers"));
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`, lower-case.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Everything that makes a restored clone a VM of its own; every value is
/// fresh from the host for this one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreIdentity {
    /// Host name (one DNS label: letters, digits, '-').
    pub hostname: String,
    /// `/etc/machine-id`: 32 lower-case hex digits, not all zero.
    pub machine_id: String,
    pub host_key: SshHostKey,
    /// Contents of `/root/.ssh/authorized_keys`.
    pub authorized_keys: String,
    /// The NIC's configuration; `None` for a VM without a configured NIC.
    pub net: Option<GuestNetConfig>,
    /// [`ENTROPY_BYTES`] bytes of host randomness, credited to the guest's
    /// pool before anything else runs.
    pub entropy: Vec<u8>,
    /// Wall-clock time (seconds, nanoseconds since the Unix epoch) taken
    /// just before sending.
    pub realtime: (i64, u32),
    /// Mount points whose file system is grown to its (grown) device,
    /// e.g. `/` and `/root`.
    pub grow: Vec<String>,
    /// When sshd starts.
    #[serde(default)]
    pub sshd: SshdStart,
}

impl RestoreIdentity {
    /// Checks the bounds and forms of every field (the agent refuses an
    /// identity that fails).
    pub fn validate(&self) -> Result<(), String> {
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > MAX_HOSTNAME
            || h.starts_with('-')
            || h.ends_with('-')
            || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("invalid host name {h:?}"));
        }
        validate_machine_id(&self.machine_id)?;
        let k = &self.host_key;
        if k.private_openssh.is_empty() || k.private_openssh.len() > MAX_PRIVATE_KEY {
            return Err(format!(
                "host private key must be 1 to {MAX_PRIVATE_KEY} bytes"
            ));
        }
        if k.public.is_empty()
            || k.public.len() > MAX_PUBLIC_KEY
            || k.public.trim_end().contains('\n')
        {
            return Err(format!(
                "host public key must be one line of 1 to {MAX_PUBLIC_KEY} bytes"
            ));
        }
        if self.authorized_keys.len() > MAX_AUTHORIZED_KEYS {
            return Err(format!(
                "authorized_keys is over {MAX_AUTHORIZED_KEYS} bytes"
            ));
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if self.entropy.len() != ENTROPY_BYTES {
            return Err(format!(
                "entropy must be {ENTROPY_BYTES} bytes, not {}",
                self.entropy.len()
            ));
        }
        if self.realtime.0 < 0 || self.realtime.1 >= 1_000_000_000 {
            return Err(format!("invalid wall-clock time {:?}", self.realtime));
        }
        if self.grow.len() > MAX_GROW {
            return Err(format!("more than {MAX_GROW} mount points to grow"));
        }
        for m in &self.grow {
            if !m.starts_with('/') || m.len() > MAX_PATH || m.contains('\0') {
                return Err(format!("invalid mount point {m:?}"));
            }
        }
        Ok(())
    }
}

/// Checks a machine id: 32 lower-case hex digits, not all zero.
pub fn validate_machine_id(id: &str) -> Result<(), String> {
    let ok = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid machine id {:?}: want 32 lower-case hex digits",
            truncate(id)
        ))
    }
}

/// How the sealed guest's sshd is started again after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SshdPlan {
    /// No sshd was running at seal.
    None,
    /// A systemd unit (`ssh.service`, `sshd.service`): `systemctl start`.
    Unit(String),
    /// A process started outside systemd: spawn this argv again.
    Process(Vec<String>),
}

impl SshdPlan {
    /// Checks the bounds of the plan.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SshdPlan::None => Ok(()),
            SshdPlan::Unit(u) => {
                if u.is_empty()
                    || u.len() > MAX_UNIT
                    || !u
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b))
                {
                    Err(format!("invalid sshd unit {:?}", truncate(u)))
                } else {
                    Ok(())
                }
            }
            SshdPlan::Process(argv) => {
                if argv.is_empty() || argv.len() > MAX_ARGS {
                    return Err(format!("sshd argv must have 1 to {MAX_ARGS} words"));
                }
                if argv.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')) {
                    return Err(format!("an sshd argument is over {MAX_ARG} bytes"));
                }
                Ok(())
            }
        }
    }
}

/// The agent's answer to a seal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealReport {
    /// How sshd was stopped, so a restore starts it the same way.
    pub sshd: SshdPlan,
    /// The template's `/etc/machine-id` (a restored clone must differ); at
    /// most [`MAX_REPORT_TEXT`] bytes, empty when the guest has none.
    pub machine_id: String,
}

impl SealReport {
    /// Checks what a guest answered before the host keeps it.
    pub fn validate(&self) -> Result<(), String> {
        self.sshd.validate()?;
        if self.machine_id.len() > MAX_REPORT_TEXT {
            return Err(format!("machine id is over {MAX_REPORT_TEXT} bytes"));
        }
        Ok(())
    }
}

/// The agent's answer to a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Each step and how long it took, in milliseconds, in order.
    pub steps_ms: Vec<(String, u32)>,
    /// Whether the guest has a VM generation id device (its kernel
    /// reseeds itself at resume, too).
    pub vmgenid: bool,
    /// How far the wall clock was stepped, in milliseconds (new − old).
    pub clock_step_ms: i64,
    /// What happens to sshd (`none`, `unit ssh.service`, `process
    /// /usr/sbin/sshd`): it is started after this answer.
    pub sshd: String,
}

impl RestoreReport {
    /// Checks what a guest answered before the host keeps it.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps_ms.len() > MAX_STEPS {
            return Err(format!("more than {MAX_STEPS} restore steps"));
        }
        if self.steps_ms.iter().any(|(n, _)| n.len() > MAX_STEP_NAME) {
            return Err(format!("a restore step name is over {MAX_STEP_NAME} bytes"));
        }
        if self.sshd.len() > MAX_REPORT_TEXT {
            return Err(format!("the sshd note is over {MAX_REPORT_TEXT} bytes"));
        }
        Ok(())
    }
}

/// The first 64 bytes of `s` for an error message (on a char boundary).
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn identity() -> RestoreIdentity {
        RestoreIdentity {
            hostname: "box-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            host_key: SshHostKey {
                private_openssh:
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n"
                        .into(),
                public: "ssh-ed25519 AAAA box-1\n".into(),
            },
            authorized_keys: "ssh-ed25519 BBBB me\n".into(),
            net: Some(GuestNetConfig {
                device: "eth0".into(),
                mac: [0x02, 0xba, 0x0a, 0x00, 0x00, 0x07],
                addr: Ipv4Addr::new(172, 16, 0, 7),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
                dns: vec![Ipv4Addr::new(172, 16, 0, 1)],
            }),
            entropy: vec![7; ENTROPY_BYTES],
            realtime: (1_800_000_000, 5),
            grow: vec!["/".into(), "/root".into()],
            sshd: SshdStart::Now,
        }
    }

    #[test]
    fn a_good_identity_passes() {
        identity().validate().expect("valid");
    }

    #[test]
    fn bad_identities_are_refused() {
        type Edit = Box<dyn Fn(&mut RestoreIdentity)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("host name", Box::new(|i| i.hostname = "a b".into())),
            ("host name", Box::new(|i| i.hostname = "x".repeat(64))),
            ("host name", Box::new(|i| i.hostname = String::new())),
            ("machine id", Box::new(|i| i.machine_id = "ABC".into())),
            ("machine id", Box::new(|i| i.machine_id = "0".repeat(32))),
            (
                "machine id",
                Box::new(|i| i.machine_id = "0123456789ABCDEF0123456789abcdef".into()),
            ),
            (
                "private key",
                Box::new(|i| i.host_key.private_openssh.clear()),
            ),
            (
                "public key",
                Box::new(|i| i.host_key.public = "a\nb\n".into()),
            ),
            (
                "authorized_keys",
                Box::new(|i| i.authorized_keys = "k".repeat(MAX_AUTHORIZED_KEYS + 1)),
            ),
            ("entropy", Box::new(|i| i.entropy = vec![1; 63])),
            ("wall-clock", Box::new(|i| i.realtime = (1, 1_000_000_000))),
            ("wall-clock", Box::new(|i| i.realtime = (-1, 0))),
            ("mount point", Box::new(|i| i.grow = vec!["root".into()])),
            (
                "unicast",
                Box::new(|i| {
                    if let Some(n) = i.net.as_mut() {
                        n.mac[0] = 0x01
                    }
                }),
            ),
            (
                "device",
                Box::new(|i| {
                    if let Some(n) = i.net.as_mut() {
                        n.device = "eth0/../x".into()
                    }
                }),
            ),
            (
                "prefix",
                Box::new(|i| {
                    if let Some(n) = i.net.as_mut() {
                        n.prefix = 33
                    }
                }),
            ),
        ];
        for (want, edit) in cases {
            let mut id = identity();
            edit(&mut id);
            let err = id.validate().expect_err(want);
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn netmask_of_prefix() {
        let mut n = identity().net.expect("net");
        for (p, m) in [
            (0, [0, 0, 0, 0]),
            (8, [255, 0, 0, 0]),
            (24, [255, 255, 255, 0]),
            (30, [255, 255, 255, 252]),
            (32, [255, 255, 255, 255]),
        ] {
            n.prefix = p;
            assert_eq!(n.netmask(), Ipv4Addr::from(m), "/{p}");
        }
    }

    #[test]
    fn mac_is_formatted_lower_case_with_colons() {
        assert_eq!(
            format_mac(&[0x02, 0xBA, 0x0a, 0, 0xff, 7]),
            "02:ba:0a:00:ff:07"
        );
    }

    #[test]
    fn hostile_reports_are_refused() {
        let long_steps = RestoreReport {
            steps_ms: vec![("x".into(), 1); MAX_STEPS + 1],
            vmgenid: false,
            clock_step_ms: 0,
            sshd: String::new(),
        };
        assert!(long_steps.validate().is_err());
        let long_name = RestoreReport {
            steps_ms: vec![("x".repeat(MAX_STEP_NAME + 1), 1)],
            ..long_steps.clone()
        };
        assert!(long_name.validate().is_err());
        let seal = SealReport {
            sshd: SshdPlan::Process(vec!["a".into(); MAX_ARGS + 1]),
            machine_id: String::new(),
        };
        assert!(seal.validate().is_err());
        let seal = SealReport {
            sshd: SshdPlan::Unit("ssh.service; rm -rf /".into()),
            machine_id: String::new(),
        };
        assert!(seal.validate().is_err());
        let seal = SealReport {
            sshd: SshdPlan::Unit("ssh.service".into()),
            machine_id: "m".repeat(MAX_REPORT_TEXT + 1),
        };
        assert!(seal.validate().is_err());
        let ok = SealReport {
            sshd: SshdPlan::Process(vec!["/usr/sbin/sshd".into(), "-D".into()]),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        };
        ok.validate().expect("valid");
    }
}
