//! Argument types and parsers shared by the vm commands (`vm create`,
//! `vm run`, `vm exec`, `vm session`) and `image warm`, in a module of
//! their own so that those commands do not import each other.

use banger_api::CreateVmRequest;
use banger_model::{ByteSize, InitramfsMode, VmName, WarmMode};
use clap::Args;

/// Sizing and identity flags shared by run and create.
#[derive(Args, Clone, Default)]
pub struct CreateFlags {
    /// VM name (a DNS label); generated when omitted.
    #[arg(long, value_parser = parse_name)]
    pub name: Option<VmName>,
    /// Image to boot (default: default_image_name from config).
    #[arg(long)]
    pub image: Option<String>,
    /// Virtual CPUs.
    #[arg(long, visible_alias = "cpus")]
    pub vcpu: Option<u32>,
    /// Memory: 2G, 512M, or a plain number of MiB.
    #[arg(long, value_parser = parse_memory_mib, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Root disk size, e.g. 16G.
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<ByteSize>,
    /// Masquerade the VM's traffic out of the host (needs bridge networking).
    #[arg(long)]
    pub nat: bool,
    /// Initramfs its boots use: banger (the agent as /init, ready as soon
    /// as the root is assembled), distro (the kernel's own), or auto
    /// (banger's when the kernel has one). Default: `initramfs` in config.
    #[arg(long, value_name = "auto|banger|distro")]
    pub initramfs: Option<InitramfsMode>,
    /// Ready only once the guest's init has finished booting (systemd
    /// running or degraded), not as soon as the agent answers. Default:
    /// `wait_boot` in config.
    #[arg(long)]
    pub wait_boot: bool,
    /// Restore a saved template of the image (a warm start) or fail,
    /// leaving nothing behind; without it a template is used when one
    /// fits (`warm_start` in config) and the VM boots cold otherwise.
    #[arg(long, conflicts_with = "no_warm")]
    pub warm: bool,
    /// Boot cold even when a template fits.
    #[arg(long)]
    pub no_warm: bool,
}

impl CreateFlags {
    pub fn request(&self, start: bool) -> CreateVmRequest {
        CreateVmRequest {
            name: self.name.as_ref().map(ToString::to_string),
            image: self.image.clone(),
            vcpu: self.vcpu,
            memory_mib: self.memory,
            disk_size: self.disk_size.map(|d| d.to_string()),
            start,
            nat: self.nat,
            initramfs: self.initramfs,
            wait_boot: self.wait_boot.then_some(true),
            warm: if self.warm {
                WarmMode::Require
            } else if self.no_warm {
                WarmMode::Off
            } else {
                WarmMode::Auto
            },
            ..Default::default()
        }
    }
}

fn parse_name(s: &str) -> Result<VmName, String> {
    VmName::parse(s).map_err(|e| e.to_string())
}

/// `KEY=VALUE` with a shell-style variable name.
pub(crate) fn parse_env(s: &str) -> Result<banger_api::exec::EnvVar, String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{k:?} is not a valid environment variable name"));
    }
    Ok(banger_api::exec::EnvVar::new(k, v))
}

pub(crate) fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse::<ByteSize>().map_err(|e| e.to_string())
}

/// `--memory`: a size with a unit (`2G`, `512M`, `1536MiB`) or a plain
/// number of MiB (`2048`), as a whole number of MiB.
pub(crate) fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map_err(|_| format!("{s:?} is too large"));
    }
    let size = t.parse::<ByteSize>().map_err(|e| e.to_string())?;
    if size.0 % ByteSize::MIB != 0 {
        return Err(format!(
            "{s:?} is not a whole number of MiB: use M or G (2G, 512M)"
        ));
    }
    Ok(size.0 / ByteSize::MIB)
}

/// `--json` of the commands that change VMs: a JSON array on stdout with
/// the record of every VM changed (failures stay on stderr).
#[derive(Args)]
pub struct JsonArg {
    /// Print a JSON array of the VMs' records.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| format!("{n} is not a signal"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("unknown signal {s:?}"))
}

/// `vm logs --since`: a duration ago (`10m`, `1h30m`), an RFC 3339 time,
/// or Unix seconds; as Unix milliseconds.
pub(crate) fn parse_since(s: &str) -> Result<u64, String> {
    since_ms(s, std::time::SystemTime::now())
}

pub(crate) fn since_ms(s: &str, now: std::time::SystemTime) -> Result<u64, String> {
    let t = s.trim();
    let unix_ms = |at: std::time::SystemTime| {
        at.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| format!("{s:?} is before 1970"))
    };
    if let Ok(secs) = t.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Ok((secs * 1000.0) as u64);
    }
    if let Ok(ago) = humantime::parse_duration(t) {
        return unix_ms(now.checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH));
    }
    match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        Ok(at) => u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("{s:?} is before 1970")),
        Err(_) => Err(format!(
            "{s:?} is not a time: use a duration ago (10m, 1h30m), an RFC 3339 time (2026-05-01T12:00:00Z) or Unix seconds"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        create: CreateFlags,
    }

    fn parse(args: &[&str]) -> Result<CreateFlags, clap::Error> {
        let mut argv = vec!["create"];
        argv.extend_from_slice(args);
        Flags::try_parse_from(argv).map(|f| f.create)
    }

    #[test]
    fn memory_takes_units_and_plain_mib() {
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("512m"), Ok(512));
        assert_eq!(parse_memory_mib("1536MiB"), Ok(1536));
        assert_eq!(parse_memory_mib("2048"), Ok(2048));
        assert!(parse_memory_mib("1536K").is_err_and(|e| e.contains("whole number of MiB")));
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("").is_err());
        let f = parse(&["--memory", "2G"]).expect("parse");
        assert_eq!(f.request(true).memory_mib, Some(2048));
        let e = parse(&["--memory", "2X"]).err().expect("refused");
        assert!(e.to_string().contains("--memory"), "{e}");
    }

    #[test]
    fn cpus_is_an_alias_of_vcpu() {
        assert_eq!(parse(&["--cpus", "3"]).expect("parse").vcpu, Some(3));
        assert_eq!(parse(&["--vcpu", "2"]).expect("parse").vcpu, Some(2));
        assert!(parse(&["--cpus", "3", "--vcpu", "2"]).is_err());
    }
}
