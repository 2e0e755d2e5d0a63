//! `config.toml`: parsed strictly (unknown keys are errors), then validated
//! as a whole, with errors that name the file and the key.

use crate::Paths;
use crate::values::{FileMode, Ipv4Cidr, LogLevel, NetworkMode, VmmChoice};
use banger_model::{ByteSize, InitramfsMode, WarmSetting};
use serde::{Deserialize, Deserializer};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};

/// The environment variable that overrides `log_level`.
pub const LOG_LEVEL_ENV: &str = "BANGER_LOG_LEVEL";

/// Bounds of `[vm_defaults]`: those of every VM.
pub use banger_model::limits::{MAX_VCPU, MIN_MEMORY_MIB};
/// Smallest disk `[vm_defaults]` may ask for.
pub const MIN_DISK_BYTES: u64 = ByteSize::GIB;

/// A config file that could not be used. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("${var}: {message}")]
    Env { var: &'static str, message: String },
}

/// `config.toml`. Every key is optional; a missing file means all defaults.
///
/// Paths are absolute after loading: `~/` is expanded against the owner's
/// home and relative paths are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Image used when `--image` is not given.
    pub default_image_name: String,
    /// The host SSH key; unset means [`Paths::default_ssh_key`].
    pub ssh_key_path: Option<PathBuf>,
    pub vmm: VmmChoice,
    /// Firecracker binary instead of the one on `PATH`.
    pub firecracker_bin: Option<PathBuf>,
    /// `qemu-system-x86_64` binary instead of the one on `PATH`.
    pub qemu_bin: Option<PathBuf>,
    /// The banger-agent binary baked into images.
    pub agent_path: Option<PathBuf>,
    /// Address of the web UI; `""` in the file disables it (`None`).
    #[serde(deserialize_with = "listen_addr")]
    pub web_listen_addr: Option<SocketAddr>,
    /// Verbosity of `bangerd.log`; `$BANGER_LOG_LEVEL` overrides it.
    pub log_level: LogLevel,
    /// Host bridge the VMs' TAP devices join.
    pub bridge_name: String,
    /// The bridge's address; unset means the first host address of `cidr`
    /// (see [`Config::effective_bridge_ip`]).
    pub bridge_ip: Option<Ipv4Addr>,
    /// Network the bridge and guests live in.
    pub cidr: Ipv4Cidr,
    /// TAP devices kept ready for new VMs.
    pub tap_pool_size: u32,
    /// Seconds a starting VM has to signal readiness (its agent's hello,
    /// and sshd for interactive `vm run`) before banger gives up waiting
    /// and keeps it for inspection. TCG boots take 5-30 s; the default's
    /// margin covers a loaded host.
    pub ready_timeout_secs: u32,
    /// Which initramfs boots VMs: `auto` (banger's own when the kernel has
    /// one, else the distribution's), `banger` or `distro`. `--initramfs`
    /// on `vm create`/`vm run` overrides it per VM.
    pub initramfs: InitramfsMode,
    /// Readiness also waits for the guest's init to finish booting
    /// (systemd's `is-system-running`), not only for the agent, which
    /// answers as soon as the root is assembled. `vm run --wait-boot`
    /// asks for it once.
    pub wait_boot: bool,
    /// Warm starts: `auto` restores a saved template when one fits and
    /// makes one in the background after a cold create; `manual` restores
    /// only templates made by `banger image warm`; `off` always boots cold.
    pub warm_start: WarmSetting,
    /// Resolver handed to guests; unset leaves the choice to the network setup.
    pub default_dns: Option<Ipv4Addr>,
    /// Bridge or user-mode networking (see [`NetworkMode`]).
    pub network: NetworkMode,
    /// Where the `.vm` DNS server listens (UDP and TCP); must be a loopback
    /// address.
    pub dns_listen_addr: SocketAddr,
    /// Image catalog index instead of the embedded one.
    pub catalog_url: Option<String>,
    /// Debian mirror for local image builds.
    pub debian_mirror: Option<String>,
    pub vm_defaults: VmDefaults,
    pub file_sync: Vec<FileSync>,
    /// The guest command `vm acp` bridges stdio to, as an argument vector.
    pub acp_command: Vec<String>,
}

/// `[vm_defaults]`: sizing for new VMs when flags do not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    pub vcpu: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Written like `"16G"`.
    pub disk_size: Option<ByteSize>,
}

/// `[[file_sync]]`: a host file or directory copied into each new VM.
///
/// After loading, `host` is an absolute path inside the owner's home and
/// `guest` an absolute path under `/root`; neither contains `..`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSync {
    pub host: PathBuf,
    pub guest: PathBuf,
    /// Mode of copied files; `None` means 0600.
    pub mode: Option<FileMode>,
}

impl FileSync {
    /// Mode of copied files when the entry does not set one.
    pub const DEFAULT_MODE: FileMode = FileMode(0o600);
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_image_name: "debian-bookworm".into(),
            ssh_key_path: None,
            vmm: VmmChoice::Auto,
            firecracker_bin: None,
            qemu_bin: None,
            agent_path: None,
            web_listen_addr: Some(SocketAddr::from(([127, 0, 0, 1], 7777))),
            log_level: LogLevel::Info,
            bridge_name: "banger0".into(),
            bridge_ip: None,
            cidr: Ipv4Cidr::DEFAULT,
            tap_pool_size: 2,
            ready_timeout_secs: 240,
            initramfs: InitramfsMode::Auto,
            wait_boot: false,
            warm_start: WarmSetting::Auto,
            default_dns: None,
            network: NetworkMode::Auto,
            dns_listen_addr: SocketAddr::from(([127, 0, 0, 1], 42069)),
            catalog_url: None,
            debian_mirror: None,
            vm_defaults: VmDefaults::default(),
            file_sync: Vec::new(),
            acp_command: vec!["opencode".into(), "acp".into()],
        }
    }
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not IP:port such as \"127.0.0.1:7777\" (\"\" disables the web UI)"
        ))
    })
}

impl Config {
    /// Loads `paths.config_file` (all defaults when it does not exist), then
    /// applies `$BANGER_LOG_LEVEL`.
    pub fn load(paths: &Paths) -> Result<Self, ConfigError> {
        let level = std::env::var(LOG_LEVEL_ENV).ok().filter(|v| !v.is_empty());
        Self::load_from(&paths.config_file, &paths.home, level.as_deref())
    }

    /// [`Config::load`] with the file, the home directory and the value of
    /// `$BANGER_LOG_LEVEL` given explicitly.
    pub fn load_from(
        file: &Path,
        home: &Path,
        log_level_env: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: file.to_path_buf(),
                    source,
                });
            }
        };
        let mut cfg = Self::parse(&text, file, home)?;
        if let Some(level) = log_level_env {
            cfg.log_level = level.parse().map_err(|message| ConfigError::Env {
                var: LOG_LEVEL_ENV,
                message,
            })?;
        }
        Ok(cfg)
    }

    /// Parses and validates config text; `path` is only used in messages,
    /// `home` anchors `~/`.
    pub fn parse(text: &str, path: &Path, home: &Path) -> Result<Self, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| syntax_error(text, path, &e))?;
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." {
                // Not tied to a key (e.g. a table where a value belongs): say where.
                return syntax_error(text, path, &inner);
            }
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message: key_message(inner.message()),
            }
        })?;
        cfg.validate(path, home)?;
        Ok(cfg)
    }

    /// The bridge address: `bridge_ip` when set, else the first host of `cidr`.
    pub fn effective_bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip.unwrap_or_else(|| self.cidr.first_host())
    }

    /// Checks what the types alone cannot, and makes paths absolute.
    fn validate(&mut self, path: &Path, home: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let name = &self.default_image_name;
        if name.is_empty()
            || name
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "default_image_name",
                format!("{name:?} is not an image name: no spaces or '/'"),
            ));
        }
        for (key, p) in [
            ("ssh_key_path", &mut self.ssh_key_path),
            ("firecracker_bin", &mut self.firecracker_bin),
            ("qemu_bin", &mut self.qemu_bin),
            ("agent_path", &mut self.agent_path),
        ] {
            if let Some(v) = p.take() {
                *p = Some(expand_home(&v, home).ok_or_else(|| {
                    invalid(
                        key,
                        format!(
                            "{} is relative: use an absolute path or one starting with ~/",
                            v.display()
                        ),
                    )
                })?);
            }
        }
        if let Some(v) = self
            .vm_defaults
            .vcpu
            .filter(|v| !(1..=MAX_VCPU).contains(v))
        {
            return Err(invalid(
                "vm_defaults.vcpu",
                format!("{v}: must be between 1 and {MAX_VCPU}"),
            ));
        }
        if let Some(m) = self.vm_defaults.memory_mib.filter(|m| *m < MIN_MEMORY_MIB) {
            return Err(invalid(
                "vm_defaults.memory_mib",
                format!("{m}: must be at least {MIN_MEMORY_MIB}"),
            ));
        }
        if let Some(d) = self
            .vm_defaults
            .disk_size
            .filter(|d| d.bytes() < MIN_DISK_BYTES)
        {
            return Err(invalid(
                "vm_defaults.disk_size",
                format!("{d}: must be at least {}", ByteSize(MIN_DISK_BYTES)),
            ));
        }
        if let Some(ip) = self.bridge_ip.filter(|ip| !self.cidr.is_host(*ip)) {
            return Err(invalid(
                "bridge_ip",
                format!(
                    "{ip} is outside cidr {} or is its network or broadcast address",
                    self.cidr
                ),
            ));
        }
        if !is_interface_name(&self.bridge_name) {
            return Err(invalid(
                "bridge_name",
                format!(
                    "{:?} is not a network interface name: 1 to 15 characters, no '/', ':' or spaces",
                    self.bridge_name
                ),
            ));
        }
        if !self.dns_listen_addr.ip().is_loopback() {
            return Err(invalid(
                "dns_listen_addr",
                format!(
                    "{}: must be a loopback address (the .vm zone is only served to this host)",
                    self.dns_listen_addr
                ),
            ));
        }
        if self.acp_command.first().is_none_or(|p| p.trim().is_empty())
            || self.acp_command.iter().any(|a| a.contains('\0'))
        {
            return Err(invalid(
                "acp_command",
                format!(
                    "{:?}: must be a non-empty argument list such as [\"opencode\", \"acp\"] whose first item names a program",
                    self.acp_command
                ),
            ));
        }
        if !(1..=3600).contains(&self.ready_timeout_secs) {
            return Err(invalid(
                "ready_timeout_secs",
                format!("{}: must be 1 to 3600", self.ready_timeout_secs),
            ));
        }
        if self.tap_pool_size > 64 {
            return Err(invalid(
                "tap_pool_size",
                format!("{}: must be at most 64", self.tap_pool_size),
            ));
        }
        // The catalog index may also be a local file (a mirror, or a
        // catalog being published); a Debian mirror must be HTTP.
        for (key, url, schemes) in [
            (
                "catalog_url",
                &self.catalog_url,
                &["http://", "https://", "file:///"][..],
            ),
            (
                "debian_mirror",
                &self.debian_mirror,
                &["http://", "https://"][..],
            ),
        ] {
            if let Some(u) = url
                .as_ref()
                .filter(|u| !schemes.iter().any(|s| u.starts_with(s)))
            {
                let names: Vec<&str> = schemes.iter().map(|s| s.trim_end_matches('/')).collect();
                return Err(invalid(
                    key,
                    format!("{u:?} is not a {} URL", names.join(" or ")),
                ));
            }
        }
        for (i, fs) in self.file_sync.iter_mut().enumerate() {
            fs.host = sync_host_path(&fs.host, home)
                .map_err(|m| invalid(&format!("file_sync[{i}].host"), m))?;
            fs.guest = sync_guest_path(&fs.guest)
                .map_err(|m| invalid(&format!("file_sync[{i}].guest"), m))?;
        }
        Ok(())
    }
}

/// serde says "unknown field `x`, expected ..."; the key is already named
/// in front of the message, and config files have keys.
fn key_message(message: &str) -> String {
    match message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split_once("`, "))
    {
        Some((_, rest)) => format!("unknown key; {rest}"),
        None => message.to_string(),
    }
}

/// A syntax error with the line and column its span starts at.
fn syntax_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    // toml's messages may span lines; the error must stay on one.
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// `~/x` → `<home>/x`; absolute paths unchanged; relative paths → `None`.
fn expand_home(p: &Path, home: &Path) -> Option<PathBuf> {
    if let Ok(rest) = p.strip_prefix("~") {
        return Some(home.join(rest));
    }
    p.is_absolute().then(|| p.to_path_buf())
}

fn has_parent_dir(p: &Path) -> bool {
    p.components().any(|c| c == Component::ParentDir)
}

/// The seed's rule: host paths live in the owner's home, `~/...` being the
/// intended form. The check is lexical; symlinks are judged at copy time.
fn sync_host_path(p: &Path, home: &Path) -> Result<PathBuf, String> {
    let abs = expand_home(p, home)
        .ok_or_else(|| format!("{} is relative: write it as ~/...", p.display()))?;
    if has_parent_dir(&abs) {
        return Err(format!("{} must not contain '..'", p.display()));
    }
    match abs.strip_prefix(home) {
        Ok(rest) if rest.components().next().is_some() => Ok(abs),
        _ => Err(format!(
            "{} is not inside the home directory {}",
            p.display(),
            home.display()
        )),
    }
}

/// Guest paths live on the work disk, i.e. under `/root`; `~/x` means `/root/x`.
fn sync_guest_path(p: &Path) -> Result<PathBuf, String> {
    let rest = p.strip_prefix("~").or_else(|_| p.strip_prefix("/root"));
    // Guest files are written with debugfs, which cannot quote these.
    if p.to_string_lossy()
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "{:?} must not contain double quotes, backslashes or control characters",
            p.display().to_string()
        ));
    }
    match rest {
        Ok(rest) if rest.components().next().is_some() && !has_parent_dir(rest) => {
            Ok(Path::new("/root").join(rest))
        }
        _ => Err(format!(
            "{} must be a path under ~/ or /root/ without '..'",
            p.display()
        )),
    }
}

/// What Linux accepts as an interface name (`dev_valid_name`).
fn is_interface_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/c/config.toml"), Path::new("/home/u"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must fail").to_string()
    }

    #[test]
    fn empty_is_defaults() {
        let c = parse("").expect("ok");
        assert_eq!(c, Config::default());
        assert_eq!(c.default_image_name, "debian-bookworm");
        assert_eq!(c.vmm, VmmChoice::Auto);
        assert_eq!(c.cidr.to_string(), "172.16.0.0/24");
        assert_eq!(c.effective_bridge_ip(), Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(
            c.web_listen_addr,
            Some("127.0.0.1:7777".parse().expect("addr"))
        );
        assert_eq!(c.log_level, LogLevel::Info);
    }

    #[test]
    fn warm_start() {
        assert_eq!(parse("").expect("ok").warm_start, WarmSetting::Auto);
        for (text, want) in [
            ("auto", WarmSetting::Auto),
            ("manual", WarmSetting::Manual),
            ("off", WarmSetting::Off),
        ] {
            let c = parse(&format!("warm_start = \"{text}\"\n")).expect("ok");
            assert_eq!(c.warm_start, want);
        }
        let e = err("warm_start = \"sometimes\"\n");
        assert!(e.starts_with("/c/config.toml: warm_start: "), "{e}");
    }

    #[test]
    fn initramfs_and_wait_boot() {
        let c = parse("").expect("ok");
        assert_eq!((c.initramfs, c.wait_boot), (InitramfsMode::Auto, false));
        let c = parse("initramfs = \"distro\"\nwait_boot = true\n").expect("ok");
        assert_eq!((c.initramfs, c.wait_boot), (InitramfsMode::Distro, true));
        let e = err("initramfs = \"dracut\"\n");
        assert!(e.starts_with("/c/config.toml: initramfs: "), "{e}");
        assert!(e.contains("`banger`"), "{e}");
        assert!(err("wait_boot = \"yes\"\n").starts_with("/c/config.toml: wait_boot: "));
    }

    #[test]
    fn acp_command_is_an_argument_list() {
        assert_eq!(Config::default().acp_command, ["opencode", "acp"]);
        let c = parse("acp_command = [\"cat\"]\n").expect("ok");
        assert_eq!(c.acp_command, ["cat"]);
        assert!(err("acp_command = []\n").contains("acp_command"));
        assert!(err("acp_command = [\" \", \"x\"]\n").contains("acp_command"));
        assert!(err("acp_command = \"opencode acp\"\n").contains("acp_command"));
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let e = err("bogus_key = 1\n");
        assert!(e.starts_with("/c/config.toml: bogus_key: "), "{e}");
        assert!(
            e.contains("unknown key; expected one of `default_image_name`"),
            "{e}"
        );
        let e = err("[vm_defaults]\nvcpus = 2\n");
        assert!(e.starts_with("/c/config.toml: vm_defaults.vcpus: "), "{e}");
        let e = err("[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\nowner = \"me\"\n");
        assert!(e.starts_with("/c/config.toml: file_sync[0].owner: "), "{e}");
        for e in [err("bogus_key = 1\n"), err("[vm_defaults]\nvcpus = 2\n")] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (
                "[vm_defaults]\ndisk_size = \"lots\"\n",
                "vm_defaults.disk_size",
            ),
            (
                "[vm_defaults]\ndisk_size = \"512M\"\n",
                "vm_defaults.disk_size",
            ),
            ("[vm_defaults]\nvcpu = 0\n", "vm_defaults.vcpu"),
            ("[vm_defaults]\nvcpu = 65\n", "vm_defaults.vcpu"),
            ("[vm_defaults]\nvcpu = -1\n", "vm_defaults.vcpu"),
            (
                "[vm_defaults]\nmemory_mib = \"x\"\n",
                "vm_defaults.memory_mib",
            ),
            ("[vm_defaults]\nmemory_mib = 64\n", "vm_defaults.memory_mib"),
            ("log_level = \"verbose\"\n", "log_level"),
            ("vmm = \"xen\"\n", "vmm"),
            ("cidr = \"10.0.0.300/24\"\n", "cidr"),
            ("cidr = \"10.0.0.1/24\"\n", "cidr"),
            ("bridge_ip = \"10.1.0.1\"\n", "bridge_ip"),
            ("bridge_ip = \"172.16.0.255\"\n", "bridge_ip"),
            ("bridge_ip = \"nope\"\n", "bridge_ip"),
            ("bridge_name = \"this-name-is-too-long\"\n", "bridge_name"),
            ("bridge_name = \"\"\n", "bridge_name"),
            ("tap_pool_size = 1000\n", "tap_pool_size"),
            ("ready_timeout_secs = 0\n", "ready_timeout_secs"),
            ("ready_timeout_secs = 86400\n", "ready_timeout_secs"),
            ("dns_listen_addr = \"0.0.0.0:53\"\n", "dns_listen_addr"),
            ("dns_listen_addr = \"localhost\"\n", "dns_listen_addr"),
            ("network = \"tap\"\n", "network"),
            ("default_dns = \"dns.example\"\n", "default_dns"),
            ("default_image_name = \"\"\n", "default_image_name"),
            ("default_image_name = \"a/b\"\n", "default_image_name"),
            ("ssh_key_path = \"keys/id\"\n", "ssh_key_path"),
            ("qemu_bin = \"qemu-system-x86_64\"\n", "qemu_bin"),
            ("agent_path = \"./banger-agent\"\n", "agent_path"),
            ("web_listen_addr = \"nope\"\n", "web_listen_addr"),
            ("web_listen_addr = 7777\n", "web_listen_addr"),
            ("debian_mirror = \"deb.debian.org\"\n", "debian_mirror"),
            ("catalog_url = \"ftp://x\"\n", "catalog_url"),
            ("catalog_url = \"/srv/index.json\"\n", "catalog_url"),
            ("debian_mirror = \"file:///srv/debian\"\n", "debian_mirror"),
            (
                "[[file_sync]]\nhost = \"~/.aws\"\nguest = \"/etc/x\"\n",
                "file_sync[0].guest",
            ),
            (
                "[[file_sync]]\nhost = \"~/.aws\"\nguest = \"~/../etc\"\n",
                "file_sync[0].guest",
            ),
            (
                "[[file_sync]]\nhost = \"/etc/shadow\"\nguest = \"~/s\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"~/../v/x\"\nguest = \"~/x\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"rel\"\nguest = \"~/x\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\n[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\nmode = \"999\"\n",
                "file_sync[1].mode",
            ),
            ("[[file_sync]]\nguest = \"~/a\"\n", "file_sync[0]"),
            (
                "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\\\"b\"\n",
                "file_sync[0].guest",
            ),
            (
                "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\\nb\"\n",
                "file_sync[0].guest",
            ),
            (
                "[[file_sync]]\nhost = \"/home/other/a\"\nguest = \"~/a\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"/home/u/../other/a\"\nguest = \"~/a\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"/home/uu/a\"\nguest = \"~/a\"\n",
                "file_sync[0].host",
            ),
            (
                "[[file_sync]]\nhost = \"~/a\"\nguest = \"/rootx/a\"\n",
                "file_sync[0].guest",
            ),
        ] {
            let e = err(text);
            assert!(
                e.starts_with(&format!("/c/config.toml: {key}: ")),
                "{text:?} gave {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn messages_say_what_is_wrong() {
        assert_eq!(
            err("[vm_defaults]\nvcpu = 0\n"),
            "/c/config.toml: vm_defaults.vcpu: 0: must be between 1 and 64"
        );
        assert_eq!(
            err("log_level = \"verbose\"\n"),
            "/c/config.toml: log_level: unknown level \"verbose\": use debug, info, warn or error"
        );
        let e = err("cidr = \"10.0.0.300/24\"\n");
        assert!(
            e.contains("\"10.0.0.300/24\" is not an IPv4 network"),
            "{e}"
        );
        let e = err("cidr = \"10.0.0.0/24\"\nbridge_ip = \"10.1.0.1\"\n");
        assert!(e.contains("10.1.0.1 is outside cidr 10.0.0.0/24"), "{e}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = parse("vmm = \"qemu\"\nlog_level = \n").expect_err("syntax");
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e}");
        assert!(
            e.to_string().starts_with("/c/config.toml: line 2, column "),
            "{e}"
        );
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
    }

    #[test]
    fn home_expansion_and_relative_paths() {
        let c = parse("ssh_key_path = \"~/.ssh/id\"\nqemu_bin = \"/opt/q\"\nagent_path = \"~/bin/banger-agent\"\n")
            .expect("ok");
        assert_eq!(c.ssh_key_path, Some(PathBuf::from("/home/u/.ssh/id")));
        assert_eq!(c.qemu_bin, Some(PathBuf::from("/opt/q")));
        assert_eq!(
            c.agent_path,
            Some(PathBuf::from("/home/u/bin/banger-agent"))
        );
        let e = err("ssh_key_path = \"keys/id\"\n");
        assert_eq!(
            e,
            "/c/config.toml: ssh_key_path: keys/id is relative: use an absolute path or one starting with ~/"
        );
        // `~user/` is not supported: it is relative, not the home of `user`.
        assert!(parse("ssh_key_path = \"~bob/id\"\n").is_err());
    }

    #[test]
    fn file_sync_paths_are_normalised() {
        let c = parse(
            "[[file_sync]]\nhost = \"~/.aws\"\nguest = \"~/.aws\"\n\
             [[file_sync]]\nhost = \"/home/u/bin/s\"\nguest = \"/root/bin/s\"\nmode = \"0755\"\n",
        )
        .expect("ok");
        assert_eq!(c.file_sync[0].host, PathBuf::from("/home/u/.aws"));
        assert_eq!(c.file_sync[0].guest, PathBuf::from("/root/.aws"));
        assert_eq!(c.file_sync[0].mode, None);
        assert_eq!(c.file_sync[1].host, PathBuf::from("/home/u/bin/s"));
        assert_eq!(c.file_sync[1].guest, PathBuf::from("/root/bin/s"));
        assert_eq!(c.file_sync[1].mode, Some(FileMode(0o755)));
        // The home itself and /root itself are not files to sync.
        assert!(parse("[[file_sync]]\nhost = \"~/\"\nguest = \"~/x\"\n").is_err());
        assert!(parse("[[file_sync]]\nhost = \"~/x\"\nguest = \"/root\"\n").is_err());
    }

    #[test]
    fn catalog_url_may_be_a_local_file() {
        let c = parse("catalog_url = \"file:///srv/catalog/index.json\"\n").expect("ok");
        assert_eq!(
            c.catalog_url.as_deref(),
            Some("file:///srv/catalog/index.json")
        );
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            "default_image_name = \"box\"\nvmm = \"qemu\"\nlog_level = \"debug\"\ncidr = \"10.9.0.0/16\"\n\
             bridge_ip = \"10.9.0.1\"\nbridge_name = \"br-banger\"\ntap_pool_size = 4\ndefault_dns = \"1.1.1.1\"\n\
             network = \"user\"\ndns_listen_addr = \"127.0.0.1:5353\"\n\
             web_listen_addr = \"\"\ndebian_mirror = \"http://deb.debian.org/debian\"\n\
             catalog_url = \"https://example.invalid/catalog.json\"\nfirecracker_bin = \"/usr/bin/firecracker\"\n\
             [vm_defaults]\nvcpu = 4\nmemory_mib = 4096\ndisk_size = \"16G\"\n\
             [[file_sync]]\nhost = \"~/.aws\"\nguest = \"~/.aws\"\n",
        )
        .expect("ok");
        assert_eq!(c.vmm, VmmChoice::Qemu);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.effective_bridge_ip(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(c.web_listen_addr, None);
        assert_eq!(c.default_dns, Some(Ipv4Addr::new(1, 1, 1, 1)));
        assert_eq!(c.network, NetworkMode::User);
        assert_eq!(c.dns_listen_addr.to_string(), "127.0.0.1:5353");
        assert_eq!(
            c.vm_defaults,
            VmDefaults {
                vcpu: Some(4),
                memory_mib: Some(4096),
                disk_size: Some(ByteSize::gib(16))
            }
        );
        assert_eq!(c.file_sync.len(), 1);
    }

    #[test]
    fn load_reads_the_file_and_env_level() {
        let t = tempfile::tempdir().expect("tmp");
        let file = t.path().join("config.toml");
        let home = t.path().join("home");
        // A missing file is all defaults.
        assert_eq!(
            Config::load_from(&file, &home, None).expect("missing"),
            Config::default()
        );
        std::fs::write(&file, "log_level = \"warn\"\n").expect("write");
        assert_eq!(
            Config::load_from(&file, &home, None)
                .expect("file")
                .log_level,
            LogLevel::Warn
        );
        assert_eq!(
            Config::load_from(&file, &home, Some("debug"))
                .expect("env")
                .log_level,
            LogLevel::Debug
        );
        let e = Config::load_from(&file, &home, Some("loud")).expect_err("bad env");
        assert_eq!(
            e.to_string(),
            "$BANGER_LOG_LEVEL: unknown level \"loud\": use debug, info, warn or error"
        );
        // The file is validated even when the env overrides its level.
        std::fs::write(&file, "log_level = \"loud\"\n").expect("write");
        let e = Config::load_from(&file, &home, Some("debug")).expect_err("bad file");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: log_level: ", file.display())),
            "{e}"
        );
        // A directory where the file should be is a read error naming it.
        let dir = t.path().join("dir.toml");
        std::fs::create_dir(&dir).expect("mkdir");
        let e = Config::load_from(&dir, &home, None).expect_err("dir");
        assert!(
            matches!(e, ConfigError::Read { ref path, .. } if path == &dir),
            "{e}"
        );
    }
}
