//! SSH provisioning: banger's user key, each VM's host key (made on the host
//! and written into the VM's disks before its first boot) and the
//! `known_hosts` file that pins them.

use crate::Daemon;
use anyhow::Context;
use banger_model::VmRecord;
use banger_ssh::{HostEntry, HostKey, UserKey, known_hosts_line, render_config};
use banger_storage::{GuestFile, VmDisks};
use std::path::{Path, PathBuf};

/// File in a VM's directory holding its host public key.
pub(crate) const HOST_PUBLIC_KEY: &str = "ssh_host_ed25519_key.pub";

impl Daemon {
    /// Where banger's user key lives: `ssh_key_path`, else its state dir.
    pub fn ssh_key_path(&self) -> PathBuf {
        self.config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.state_dir.join("ssh/id_ed25519"))
    }

    /// banger's `known_hosts`, pinning every VM's host key.
    pub fn known_hosts_path(&self) -> PathBuf {
        self.paths.state_dir.join("ssh/known_hosts")
    }

    /// Gives a new VM its host key and authorises banger's user key, by
    /// writing into its (not yet booted) overlay and work disks.
    pub(crate) async fn provision_ssh(&self, vm: &VmRecord) -> anyhow::Result<()> {
        let user = UserKey::ensure(&self.ssh_key_path()).context("banger's ssh key")?;
        let host = HostKey::generate(vm.name.as_str()).context("the VM's ssh host key")?;
        let disks = VmDisks::in_dir(&vm.dir);
        // The overlay's upper layer is the guest's `/`.
        let etc_ssh = "/upper/etc/ssh";
        let host_files = [
            GuestFile {
                path: format!("{etc_ssh}/ssh_host_ed25519_key"),
                content: host.private_openssh.clone().into_bytes(),
                mode: 0o600,
                dir_mode: 0o755,
            },
            GuestFile {
                path: format!("{etc_ssh}/ssh_host_ed25519_key.pub"),
                content: format!("{}\n", host.public).into_bytes(),
                mode: 0o644,
                dir_mode: 0o755,
            },
        ];
        // The work disk is the guest's /root.
        let key_files = [GuestFile {
            path: "/.ssh/authorized_keys".into(),
            content: format!("{}\n", user.public).into_bytes(),
            mode: 0o600,
            dir_mode: 0o700,
        }];
        let overlay = banger_storage::write_files(&disks.overlay, &host_files);
        let work = banger_storage::write_files(&disks.work, &key_files);
        // Two disks, two debugfs runs: side by side.
        let (overlay, work) = tokio::join!(overlay, work);
        overlay.context("writing the host key into the VM's overlay disk")?;
        work.context("authorising banger's key in the VM's work disk")?;
        let pub_path = vm.dir.join(HOST_PUBLIC_KEY);
        std::fs::write(&pub_path, format!("{}\n", host.public))
            .with_context(|| format!("writing {}", pub_path.display()))?;
        Ok(())
    }

    /// banger's ssh_config, included from `~/.ssh/config` by
    /// `banger ssh-config --install`.
    pub fn ssh_config_path(&self) -> PathBuf {
        self.paths.ssh_config.clone()
    }

    /// Rewrites `known_hosts` from the VMs' host keys (one line per VM under
    /// the alias `<name>.vm`, which ssh uses whatever address it dials) and
    /// banger's ssh_config (one `Host <name>.vm` per VM with an address).
    pub(crate) fn refresh_known_hosts(&self) -> anyhow::Result<()> {
        let mut text = String::new();
        let mut entries = Vec::new();
        for vm in self.store.list_vms()? {
            if let Some(public) = read_public(&vm.dir) {
                text.push_str(&known_hosts_line(&[format!("{}.vm", vm.name)], &public));
                text.push('\n');
            }
            let target = match (vm.ssh_port, vm.ip) {
                (Some(port), _) => Some(("127.0.0.1".to_string(), port)),
                (None, Some(ip)) => Some((ip.to_string(), 22)),
                (None, None) => None,
            };
            if let Some((host, port)) = target {
                entries.push(HostEntry {
                    name: vm.name.to_string(),
                    host,
                    port,
                });
            }
        }
        write_atomic(&self.known_hosts_path(), &text)?;
        let config = render_config(&entries, &self.ssh_key_path(), &self.known_hosts_path());
        write_atomic(&self.ssh_config_path(), &config)
    }
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

fn read_public(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(HOST_PUBLIC_KEY)).ok()?;
    let line = text.lines().next()?.trim();
    line.starts_with("ssh-ed25519 ").then(|| line.to_string())
}
