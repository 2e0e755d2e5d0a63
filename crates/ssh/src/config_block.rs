//! banger's `ssh_config` file and the block that includes it from
//! `~/.ssh/config`.

use crate::SshError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// First line of the block banger owns in `~/.ssh/config`.
pub const BEGIN_MARKER: &str = "# >>> banger >>>";
/// Last line of that block.
pub const END_MARKER: &str = "# <<< banger <<<";

/// One VM as `ssh` should reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// The VM's name; the entry matches `<name>.vm`.
    pub name: String,
    /// Address to connect to (the VM's IP, or 127.0.0.1 with a forwarded port).
    pub host: String,
    pub port: u16,
}

/// banger's `ssh_config`: one `Host <name>.vm` entry per VM, logging in as
/// root with banger's key and checking host keys against banger's own
/// `known_hosts` (strictly: the keys are known before the first connection).
pub fn render_config(entries: &[HostEntry], identity: &Path, known_hosts: &Path) -> String {
    let mut out =
        String::from("# Written by banger; rewritten whenever VMs change. Do not edit.\n");
    for e in entries {
        out.push_str(&format!(
            "\nHost {name}.vm\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile \"{id}\"\n  IdentitiesOnly yes\n  UserKnownHostsFile \"{kh}\"\n  StrictHostKeyChecking yes\n  HostKeyAlias {name}.vm\n",
            name = e.name,
            host = e.host,
            port = e.port,
            id = identity.display(),
            kh = known_hosts.display(),
        ));
    }
    out
}

/// The block put into `~/.ssh/config`.
pub fn include_block(config: &Path) -> String {
    format!(
        "{BEGIN_MARKER}\nInclude \"{}\"\n{END_MARKER}\n",
        config.display()
    )
}

/// Puts [`include_block`] at the top of the ssh config file `user_config`
/// (creating it 0600 if missing), or replaces the block already there.
/// Everything else in the file, and its mode, stay exactly as they were.
/// Returns whether the file changed.
pub fn install_include(user_config: &Path, config: &Path) -> Result<bool, SshError> {
    let block = include_block(config);
    let (text, mode) = match std::fs::read_to_string(user_config) {
        Ok(t) => {
            let mode = std::fs::metadata(user_config)
                .map_err(SshError::io(format!("reading {}", user_config.display())))?
                .permissions()
                .mode();
            (Some(t), mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0o600),
        Err(e) => {
            return Err(SshError::io(format!("reading {}", user_config.display()))(
                e,
            ));
        }
    };
    let current = text.unwrap_or_default();
    let rest = strip_block(&current, user_config)?;
    // `Include` only applies to hosts after it when at the top of the file.
    let new = format!("{block}{rest}");
    if new == current {
        return Ok(false);
    }
    if let Some(dir) = user_config.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(SshError::io(format!("creating {}", dir.display())))?;
    }
    write_keeping_mode(user_config, &new, mode)?;
    Ok(true)
}

/// Removes banger's block from `user_config`, leaving every other byte.
/// Returns whether the file changed (false when there was no block or file).
pub fn uninstall_include(user_config: &Path) -> Result<bool, SshError> {
    let current = match std::fs::read_to_string(user_config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(SshError::io(format!("reading {}", user_config.display()))(
                e,
            ));
        }
    };
    let rest = strip_block(&current, user_config)?;
    if rest == current {
        return Ok(false);
    }
    let mode = std::fs::metadata(user_config)
        .map_err(SshError::io(format!("reading {}", user_config.display())))?
        .permissions()
        .mode();
    write_keeping_mode(user_config, &rest, mode)?;
    Ok(true)
}

/// `text` without banger's block (the marker lines and what is between).
fn strip_block(text: &str, path: &Path) -> Result<String, SshError> {
    let Some(start) = find_line(text, BEGIN_MARKER, 0) else {
        return Ok(text.to_string());
    };
    let end = find_line(text, END_MARKER, start).ok_or_else(|| SshError::BrokenBlock {
        path: path.to_path_buf(),
    })?;
    let after = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
    Ok(format!("{}{}", &text[..start], &text[after..]))
}

/// Byte offset of the first line at or after `from` equal to `line`.
fn find_line(text: &str, line: &str, from: usize) -> Option<usize> {
    let mut pos = from;
    for l in text[from..].split_inclusive('\n') {
        if l.trim_end_matches('\n') == line {
            return Some(pos);
        }
        pos += l.len();
    }
    None
}

/// Replaces `path` atomically with `text`, with permission bits `mode`.
fn write_keeping_mode(path: &Path, text: &str, mode: u32) -> Result<(), SshError> {
    let tmp: PathBuf = {
        let mut s = path.as_os_str().to_os_string();
        s.push(".banger-tmp");
        s.into()
    };
    let res = std::fs::write(&tmp, text)
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(SshError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str =
        "Host work\n  HostName example.invalid\n\n# trailing comment without newline";

    #[test]
    fn install_is_idempotent_and_uninstall_restores_the_file_byte_for_byte() {
        let t = tempfile::tempdir().expect("tmp");
        let cfg = t.path().join("config");
        std::fs::write(&cfg, USER).expect("write");
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let inc = Path::new("/home/u/.config/banger/ssh_config");

        assert!(install_include(&cfg, inc).expect("install"));
        let installed = std::fs::read_to_string(&cfg).expect("read");
        assert!(installed.starts_with(BEGIN_MARKER), "{installed}");
        assert!(installed.contains("Include \"/home/u/.config/banger/ssh_config\""));
        assert!(installed.ends_with(USER));
        assert!(
            !install_include(&cfg, inc).expect("again"),
            "second install changes nothing"
        );
        assert_eq!(std::fs::read_to_string(&cfg).expect("read"), installed);

        assert!(uninstall_include(&cfg).expect("uninstall"));
        assert_eq!(std::fs::read_to_string(&cfg).expect("read"), USER);
        let mode = std::fs::metadata(&cfg).expect("md").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(!uninstall_include(&cfg).expect("nothing to remove"));
    }

    #[test]
    fn install_creates_a_private_file_and_replaces_an_old_block() {
        let t = tempfile::tempdir().expect("tmp");
        let cfg = t.path().join(".ssh/config");
        assert!(install_include(&cfg, Path::new("/old")).expect("install"));
        let mode = std::fs::metadata(&cfg).expect("md").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(
            &cfg,
            format!("{}Host x\n", std::fs::read_to_string(&cfg).expect("read")),
        )
        .expect("append");
        assert!(install_include(&cfg, Path::new("/new")).expect("replace"));
        let text = std::fs::read_to_string(&cfg).expect("read");
        assert_eq!(
            text,
            format!("{}Host x\n", include_block(Path::new("/new")))
        );
    }

    #[test]
    fn an_unterminated_block_is_refused_untouched() {
        let t = tempfile::tempdir().expect("tmp");
        let cfg = t.path().join("config");
        let broken = format!("{BEGIN_MARKER}\nInclude x\nHost keep\n");
        std::fs::write(&cfg, &broken).expect("write");
        assert!(matches!(
            uninstall_include(&cfg),
            Err(SshError::BrokenBlock { .. })
        ));
        assert_eq!(std::fs::read_to_string(&cfg).expect("read"), broken);
    }

    #[test]
    fn config_has_one_strict_entry_per_vm() {
        let text = render_config(
            &[
                HostEntry {
                    name: "calm-otter".into(),
                    host: "172.16.0.2".into(),
                    port: 22,
                },
                HostEntry {
                    name: "box".into(),
                    host: "127.0.0.1".into(),
                    port: 2222,
                },
            ],
            Path::new("/s/id_ed25519"),
            Path::new("/s/known_hosts"),
        );
        assert!(text.contains("Host calm-otter.vm\n  HostName 172.16.0.2\n  Port 22\n"));
        assert!(text.contains("Host box.vm\n  HostName 127.0.0.1\n  Port 2222\n"));
        assert_eq!(text.matches("StrictHostKeyChecking yes").count(), 2);
        assert!(!text.contains("StrictHostKeyChecking no"));
    }
}
