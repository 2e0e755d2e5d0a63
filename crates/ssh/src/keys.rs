//! Key pairs: the user's and each VM's host key.

use crate::SshError;
use ssh_key::rand_core::{OsRng, RngCore};
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key banger logs into guests with.
#[derive(Debug, Clone)]
pub struct UserKey {
    /// The private key file; the public key is next to it with `.pub`.
    pub path: PathBuf,
    /// One `authorized_keys` line.
    pub public: String,
}

impl UserKey {
    /// Loads the key at `path`, generating an ed25519 pair there (0600,
    /// directory 0700) when no file exists. An existing file that is not
    /// an OpenSSH ed25519 private key is an error, never overwritten.
    pub fn ensure(path: &Path) -> Result<UserKey, SshError> {
        if path.exists() {
            return Self::load(path);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(SshError::io(format!("creating {}", dir.display())))?;
        }
        let key = generate("banger")?;
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| SshError::Generate(e.to_string()))?;
        // Written whole under a private name, then linked into place: two
        // processes making the key at once (two creates on a fresh state
        // dir) both succeed, the second with the first one's complete key.
        let tmp = sibling(path, &format!(".new-{:016x}", OsRng.next_u64()));
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, private.as_bytes(), 0o600)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(e) => return Err(SshError::io(format!("creating {}", path.display()))(e)),
        }
        let public = public_line(&key)?;
        let pub_path = pub_path(path);
        if let Err(e) = std::fs::write(&pub_path, format!("{public}\n")) {
            let _ = std::fs::remove_file(path);
            return Err(SshError::io(format!("writing {}", pub_path.display()))(e));
        }
        Ok(UserKey {
            path: path.to_path_buf(),
            public,
        })
    }

    /// Loads the OpenSSH ed25519 private key at `path`.
    fn load(path: &Path) -> Result<UserKey, SshError> {
        let key = PrivateKey::read_openssh_file(path).map_err(|e| SshError::BadKey {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SshError::BadKey {
                path: path.to_path_buf(),
                detail: format!("it is {}", key.algorithm()),
            });
        }
        let public = public_line(&key)?;
        Ok(UserKey {
            path: path.to_path_buf(),
            public,
        })
    }
}

/// A VM's host key, generated on the host.
#[derive(Debug, Clone)]
pub struct HostKey {
    /// OpenSSH private key file content (for the guest's
    /// `/etc/ssh/ssh_host_ed25519_key`, mode 0600).
    pub private_openssh: String,
    /// `ssh-ed25519 AAAA... comment`.
    pub public: String,
}

impl HostKey {
    /// A fresh ed25519 host key for VM `name`.
    pub fn generate(name: &str) -> Result<HostKey, SshError> {
        let key = generate(&format!("root@{name}"))?;
        Ok(HostKey {
            private_openssh: key
                .to_openssh(LineEnding::LF)
                .map_err(|e| SshError::Generate(e.to_string()))?
                .to_string(),
            public: public_line(&key)?,
        })
    }
}

/// One `known_hosts` line naming `hosts` (comma-separated patterns such as
/// `calm-otter.vm,172.16.0.2` or `[127.0.0.1]:2222`) with key `public`.
pub fn known_hosts_line(hosts: &[String], public: &str) -> String {
    // Drop the comment: known_hosts lines are `hosts type base64`.
    let mut parts = public.split_whitespace();
    let (kind, b64) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    format!("{} {kind} {b64}", hosts.join(","))
}

fn generate(comment: &str) -> Result<PrivateKey, SshError> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
        .map_err(|e| SshError::Generate(e.to_string()))?;
    key.set_comment(comment);
    Ok(key)
}

fn public_line(key: &PrivateKey) -> Result<String, SshError> {
    key.public_key()
        .to_openssh()
        .map_err(|e| SshError::Generate(e.to_string()))
}

fn pub_path(path: &Path) -> PathBuf {
    sibling(path, ".pub")
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates `path` (which must not exist) with `mode` from the start, so the
/// secret is never readable by others, even briefly.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SshError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(SshError::io(format!("creating {}", path.display())))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(SshError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_key_is_generated_once_private_and_reloaded() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("ssh/id_ed25519");
        let k = UserKey::ensure(&path).expect("generate");
        assert!(k.public.starts_with("ssh-ed25519 "), "{}", k.public);
        let mode = std::fs::metadata(&path).expect("md").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("dir"))
            .expect("md")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(
            std::fs::read_to_string(pub_path(&path))
                .expect("pub")
                .trim(),
            k.public
        );
        let again = UserKey::ensure(&path).expect("reload");
        assert_eq!(again.public, k.public, "an existing key is kept");
    }

    #[test]
    fn concurrent_first_uses_all_get_the_one_key() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("ssh/id_ed25519");
        let barrier = std::sync::Barrier::new(8);
        let keys: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        UserKey::ensure(&path).map(|k| k.public)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("thread").expect("ensure"))
                .collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(UserKey::ensure(&path).expect("reload").public, keys[0]);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "the key and its .pub only: {names:?}");
    }

    #[test]
    fn a_file_that_is_not_a_key_is_refused_and_kept() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("id");
        std::fs::write(&path, "not a key").expect("write");
        let e = UserKey::ensure(&path).expect_err("bad key");
        assert!(matches!(e, SshError::BadKey { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).expect("kept"), "not a key");
    }

    #[test]
    fn host_keys_differ_and_parse_back() {
        let a = HostKey::generate("a").expect("a");
        let b = HostKey::generate("b").expect("b");
        assert_ne!(a.public, b.public);
        let parsed = PrivateKey::from_openssh(&a.private_openssh).expect("parse");
        assert_eq!(public_line(&parsed).expect("pub"), a.public);
        assert!(a.public.ends_with(" root@a"));
        let line = known_hosts_line(&["a.vm".into(), "172.16.0.2".into()], &a.public);
        assert!(
            line.starts_with("a.vm,172.16.0.2 ssh-ed25519 AAAA"),
            "{line}"
        );
        assert!(!line.contains("root@a"));
    }
}
