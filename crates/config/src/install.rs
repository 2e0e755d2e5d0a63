//! The install record `banger system install` writes to
//! `/etc/banger/install.toml`: which build was installed, for which owner,
//! and where everything went. The CLI reads it to find the system socket,
//! the root helper reads it to learn whose requests to serve.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the install record lives.
pub const INSTALL_RECORD: &str = "/etc/banger/install.toml";
/// The owner daemon's public socket in system mode.
pub const SYSTEM_SOCKET: &str = "/run/banger/bangerd.sock";
/// The root helper's private socket.
pub const HELPER_SOCKET: &str = "/run/banger-root/bangerd-root.sock";
/// The owner daemon's systemd unit.
pub const DAEMON_UNIT: &str = "bangerd.service";
/// The root helper's systemd unit.
pub const HELPER_UNIT: &str = "bangerd-root.service";

/// Why the install record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid install record ({message}): re-run `sudo banger system install`"
    )]
    Parse { path: PathBuf, message: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `system install` installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallRecord {
    /// Version of the installed binaries (`v0.1.0`, `v0.1.0-dev`).
    pub version: String,
    /// Full commit of the installed binaries.
    pub commit: String,
    pub built_at: String,
    /// When the install ran, RFC 3339 UTC.
    pub installed_at: String,
    /// The user `bangerd.service` runs as and the helper serves.
    pub owner: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub owner_home: PathBuf,
    pub paths: InstallPaths,
}

/// Where the installed pieces are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallPaths {
    pub banger: PathBuf,
    pub bangerd: PathBuf,
    pub agent: PathBuf,
    pub daemon_unit: PathBuf,
    pub helper_unit: PathBuf,
    pub socket: PathBuf,
    pub helper_socket: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub helper_runtime_dir: PathBuf,
    /// The helper's own root-only state (`/var/lib/banger-root`): where it
    /// builds images before handing them to the owner. Records written
    /// before it existed get the default.
    #[serde(default = "default_helper_state_dir")]
    pub helper_state_dir: PathBuf,
}

fn default_helper_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/banger-root")
}

impl InstallRecord {
    /// Reads the record at `path`; `Ok(None)` when there is none (no
    /// system install).
    pub fn load(path: &Path) -> Result<Option<Self>, InstallError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(InstallError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| InstallError::Parse {
                path: path.to_path_buf(),
                message: e.message().to_string(),
            })
    }

    /// The record at [`INSTALL_RECORD`], if any.
    pub fn load_system() -> Result<Option<Self>, InstallError> {
        Self::load(Path::new(INSTALL_RECORD))
    }

    /// Writes the record to `path` (mode 0644) through a temporary file, so
    /// readers never see half a record.
    pub fn save(&self, path: &Path) -> Result<(), InstallError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| InstallError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text = toml::to_string_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(b"# Written by `banger system install`; do not edit.\n")
            .and_then(|()| f.write_all(text.as_bytes()))
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> InstallRecord {
        InstallRecord {
            version: "v0.1.0".into(),
            commit: "abcdef".into(),
            built_at: "2026-04-28T20:45:50Z".into(),
            installed_at: "2026-04-29T10:00:00Z".into(),
            owner: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            owner_home: "/home/alice".into(),
            paths: InstallPaths {
                banger: "/usr/local/bin/banger".into(),
                bangerd: "/usr/local/bin/bangerd".into(),
                agent: "/usr/local/lib/banger/banger-agent".into(),
                daemon_unit: "/etc/systemd/system/bangerd.service".into(),
                helper_unit: "/etc/systemd/system/bangerd-root.service".into(),
                socket: SYSTEM_SOCKET.into(),
                helper_socket: HELPER_SOCKET.into(),
                state_dir: "/var/lib/banger".into(),
                cache_dir: "/var/cache/banger".into(),
                runtime_dir: "/run/banger".into(),
                helper_runtime_dir: "/run/banger-root".into(),
                helper_state_dir: "/var/lib/banger-root".into(),
            },
        }
    }

    #[test]
    fn round_trips_and_missing_is_none() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("install.toml");
        assert!(InstallRecord::load(&p).expect("load").is_none());
        record().save(&p).expect("save");
        assert_eq!(InstallRecord::load(&p).expect("load"), Some(record()));
        std::fs::write(&p, "version = 3\n").expect("write");
        let e = InstallRecord::load(&p).expect_err("bad");
        assert!(e.to_string().contains("system install"), "{e}");
    }
}
