//! The `ssh` command that reaches a VM: banger's user key, the VM's host
//! key pinned in banger's known_hosts.

use crate::connect;
use banger_config::Config;
use banger_model::VmRecord;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where banger keeps its user key and known_hosts (the system install's
/// under a system install); the daemon uses the same rules
/// (`Daemon::ssh_key_path`, `known_hosts_path`).
pub fn key_and_known_hosts() -> anyhow::Result<(PathBuf, PathBuf)> {
    let paths = connect::daemon_paths()?;
    let config = Config::load(&paths)?;
    let key = config
        .ssh_key_path
        .unwrap_or_else(|| paths.state_dir.join("ssh/id_ed25519"));
    Ok((key, paths.state_dir.join("ssh/known_hosts")))
}

/// The `ssh` argument vector reaching `vm`: its bridge address, or the
/// forwarded port on 127.0.0.1 in user-mode networking. Host keys are
/// checked strictly against banger's known_hosts under `<name>.vm`.
pub fn ssh_args(
    vm: &VmRecord,
    key: &Path,
    known_hosts: &Path,
    command: &[String],
) -> anyhow::Result<Vec<OsString>> {
    let (host, port) = match (vm.ip, vm.ssh_port) {
        (_, Some(port)) => ("127.0.0.1".to_string(), port),
        (Some(ip), None) => (ip.to_string(), 22),
        (None, None) => anyhow::bail!(
            "VM {} has no network address or forwarded ssh port: see `banger vm show {}`",
            vm.name,
            vm.name
        ),
    };
    let mut args: Vec<OsString> = Vec::new();
    let mut opt = |o: String| {
        args.push("-o".into());
        args.push(o.into());
    };
    opt(format!("UserKnownHostsFile={}", known_hosts.display()));
    opt("StrictHostKeyChecking=yes".into());
    opt(format!("HostKeyAlias={}.vm", vm.name));
    opt(format!("IdentityFile={}", key.display()));
    opt("IdentitiesOnly=yes".into());
    opt("PasswordAuthentication=no".into());
    opt("BatchMode=yes".into());
    opt("ConnectTimeout=10".into());
    opt("LogLevel=ERROR".into());
    args.push("-p".into());
    args.push(port.to_string().into());
    args.push(format!("root@{host}").into());
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command.iter().map(OsString::from));
    }
    Ok(args)
}
