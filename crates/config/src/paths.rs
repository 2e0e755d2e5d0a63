//! Where banger keeps things: XDG directories in user mode, FHS ones in
//! system mode.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Selects system mode in [`Paths::from_env`] when set to `1`.
pub const SYSTEM_ENV: &str = "BANGER_SYSTEM";
/// Overrides the daemon socket in [`Paths::from_env`].
pub const SOCKET_ENV: &str = "BANGER_SOCKET";

/// Why banger's directories could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(
        "$HOME is not set and the XDG directories are not given: cannot place banger's config and state"
    )]
    NoHome,
    #[error("creating {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} {reason}: remove it or set $XDG_RUNTIME_DIR")]
    UnsafeDir { path: PathBuf, reason: String },
}

/// Where banger keeps its config, state, cache and socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Holds the socket; private to the owner.
    pub runtime_dir: PathBuf,
    /// The daemon's API socket.
    pub socket: PathBuf,
    pub log_file: PathBuf,
    pub db: PathBuf,
    pub vms_dir: PathBuf,
    pub images_dir: PathBuf,
    pub kernels_dir: PathBuf,
    /// banger's ssh_config (a `Host <name>.vm` per VM), kept by the daemon
    /// and included from `~/.ssh/config` by `banger ssh-config --install`:
    /// in the config directory in user mode, in the state directory in
    /// system mode (the service cannot write /etc).
    pub ssh_config: PathBuf,
    /// The owner's home directory: `~/` in config values, `file_sync` sources.
    pub home: PathBuf,
}

impl Paths {
    /// User mode (XDG) unless `$BANGER_SYSTEM` is `1`; `$BANGER_SOCKET`
    /// replaces the socket path in either mode.
    ///
    /// When `$XDG_RUNTIME_DIR` is unset the runtime directory is
    /// `/tmp/banger-<uid>`, created here with mode 0700 and refused if it
    /// already exists with another owner or looser permissions (anyone
    /// could have made it to plant a socket).
    pub fn from_env() -> Result<Self, PathsError> {
        let uid = nix::unistd::getuid().as_raw();
        let paths = Self::from_vars(|k| std::env::var_os(k), uid)?;
        if std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|v| v.is_empty())
            && std::env::var(SYSTEM_ENV).as_deref() != Ok("1")
        {
            create_private_dir(&paths.runtime_dir, uid)?;
        }
        Ok(paths)
    }

    /// [`Paths::from_env`] without touching the file system, reading
    /// variables through `var` (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>, uid: u32) -> Result<Self, PathsError> {
        let var = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = var("HOME");
        let mut paths = if var(SYSTEM_ENV).is_some_and(|v| v == Path::new("1")) {
            Self::system(home.unwrap_or_else(|| PathBuf::from("/root")))
        } else {
            let under_home = |rel: &str| home.as_ref().map(|h| h.join(rel));
            let config = var("XDG_CONFIG_HOME")
                .or_else(|| under_home(".config"))
                .ok_or(PathsError::NoHome)?;
            let state = var("XDG_STATE_HOME")
                .or_else(|| under_home(".local/state"))
                .ok_or(PathsError::NoHome)?;
            let cache = var("XDG_CACHE_HOME")
                .or_else(|| under_home(".cache"))
                .ok_or(PathsError::NoHome)?;
            let runtime = var("XDG_RUNTIME_DIR")
                .map(|r| r.join("banger"))
                .unwrap_or_else(|| PathBuf::from(format!("/tmp/banger-{uid}")));
            let home = home.ok_or(PathsError::NoHome)?;
            Self::layout(
                config.join("banger"),
                state.join("banger"),
                cache.join("banger"),
                runtime,
                home,
            )
        };
        if let Some(s) = var(SOCKET_ENV) {
            paths.socket = s;
        }
        Ok(paths)
    }

    /// The system-service layout (`banger system install`); `owner_home` is
    /// the home of the user the service works for.
    pub fn system(owner_home: PathBuf) -> Self {
        let mut paths = Self::layout(
            PathBuf::from("/etc/banger"),
            PathBuf::from("/var/lib/banger"),
            PathBuf::from("/var/cache/banger"),
            PathBuf::from("/run/banger"),
            owner_home,
        );
        paths.ssh_config = paths.state_dir.join("ssh/ssh_config");
        paths
    }

    /// The user-mode layout with every XDG directory under `root`, as the
    /// end-to-end tests set them up: `root/{config,state,cache,run,home}`.
    pub fn under(root: &Path) -> Self {
        Self::layout(
            root.join("config/banger"),
            root.join("state/banger"),
            root.join("cache/banger"),
            root.join("run/banger"),
            root.join("home"),
        )
    }

    fn layout(
        config_dir: PathBuf,
        state_dir: PathBuf,
        cache_dir: PathBuf,
        runtime_dir: PathBuf,
        home: PathBuf,
    ) -> Self {
        Self {
            config_file: config_dir.join("config.toml"),
            ssh_config: config_dir.join("ssh_config"),
            socket: runtime_dir.join("bangerd.sock"),
            log_file: state_dir.join("bangerd.log"),
            db: state_dir.join("banger.db"),
            vms_dir: state_dir.join("vms"),
            images_dir: state_dir.join("images"),
            kernels_dir: state_dir.join("kernels"),
            config_dir,
            state_dir,
            cache_dir,
            runtime_dir,
            home,
        }
    }

    /// The SSH key banger creates when `ssh_key_path` is not set.
    pub fn default_ssh_key(&self) -> PathBuf {
        self.state_dir.join("ssh/id_ed25519")
    }

    /// Creates the runtime directory (mode 0700) if needed and checks that
    /// it is a directory owned by the current user and closed to others.
    pub fn create_runtime_dir(&self) -> Result<(), PathsError> {
        create_private_dir(&self.runtime_dir, nix::unistd::getuid().as_raw())
    }
}

/// Creates `dir` (and its parents) with mode 0700, or accepts an existing
/// one only if it is a real directory owned by `uid` that neither group nor
/// others can use.
fn create_private_dir(dir: &Path, uid: u32) -> Result<(), PathsError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(source) => {
            return Err(PathsError::CreateDir {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let unsafe_dir = |reason: String| PathsError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
    };
    // symlink_metadata: a symlink planted in /tmp must not redirect us.
    let meta = std::fs::symlink_metadata(dir).map_err(|source| PathsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("is a symlink".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not {uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "has mode {:04o}, not 0700",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn from(vars: &[(&str, &str)]) -> Result<Paths, PathsError> {
        let m: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Paths::from_vars(|k| m.get(k).cloned(), 1000)
    }

    #[test]
    fn xdg_defaults_under_home() {
        let p = from(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1000")]).expect("paths");
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/banger/config.toml")
        );
        assert_eq!(p.state_dir, PathBuf::from("/home/u/.local/state/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/home/u/.cache/banger"));
        assert_eq!(
            p.socket,
            PathBuf::from("/run/user/1000/banger/bangerd.sock")
        );
        assert_eq!(
            p.log_file,
            PathBuf::from("/home/u/.local/state/banger/bangerd.log")
        );
        assert_eq!(p.db, PathBuf::from("/home/u/.local/state/banger/banger.db"));
        assert_eq!(p.vms_dir, PathBuf::from("/home/u/.local/state/banger/vms"));
        assert_eq!(
            p.images_dir,
            PathBuf::from("/home/u/.local/state/banger/images")
        );
        assert_eq!(
            p.kernels_dir,
            PathBuf::from("/home/u/.local/state/banger/kernels")
        );
        assert_eq!(
            p.default_ssh_key(),
            PathBuf::from("/home/u/.local/state/banger/ssh/id_ed25519")
        );
        assert_eq!(p.home, PathBuf::from("/home/u"));
    }

    #[test]
    fn xdg_variables_win_and_empty_ones_are_unset() {
        let p = from(&[
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/x/config"),
            ("XDG_STATE_HOME", "/x/state"),
            ("XDG_CACHE_HOME", ""),
            ("XDG_RUNTIME_DIR", ""),
        ])
        .expect("paths");
        assert_eq!(p.config_dir, PathBuf::from("/x/config/banger"));
        assert_eq!(p.state_dir, PathBuf::from("/x/state/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/home/u/.cache/banger"));
        assert_eq!(p.runtime_dir, PathBuf::from("/tmp/banger-1000"));
        assert_eq!(p.socket, PathBuf::from("/tmp/banger-1000/bangerd.sock"));
    }

    #[test]
    fn socket_override_and_system_mode() {
        let p = from(&[("HOME", "/home/u"), ("BANGER_SOCKET", "/s/d.sock")]).expect("paths");
        assert_eq!(p.socket, PathBuf::from("/s/d.sock"));
        let p = from(&[("HOME", "/home/u"), ("BANGER_SYSTEM", "1")]).expect("paths");
        assert_eq!(p, Paths::system(PathBuf::from("/home/u")));
        assert_eq!(p.socket, PathBuf::from("/run/banger/bangerd.sock"));
        assert_eq!(p.config_file, PathBuf::from("/etc/banger/config.toml"));
        assert_eq!(p.state_dir, PathBuf::from("/var/lib/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/var/cache/banger"));
        // The service cannot write /etc: its ssh_config is with its state.
        assert_eq!(
            p.ssh_config,
            PathBuf::from("/var/lib/banger/ssh/ssh_config")
        );
        // Any other value keeps user mode.
        let p = from(&[("HOME", "/home/u"), ("BANGER_SYSTEM", "0")]).expect("paths");
        assert_eq!(p.state_dir, PathBuf::from("/home/u/.local/state/banger"));
        assert_eq!(
            p.ssh_config,
            PathBuf::from("/home/u/.config/banger/ssh_config")
        );
    }

    #[test]
    fn no_home_is_an_error() {
        assert!(matches!(from(&[]), Err(PathsError::NoHome)));
        assert!(matches!(
            from(&[("XDG_CONFIG_HOME", "/c")]),
            Err(PathsError::NoHome)
        ));
    }

    #[test]
    fn layout_under_root() {
        let p = Paths::under(Path::new("/r"));
        assert_eq!(p.socket, PathBuf::from("/r/run/banger/bangerd.sock"));
        assert_eq!(p.db, PathBuf::from("/r/state/banger/banger.db"));
        assert_eq!(p.config_file, PathBuf::from("/r/config/banger/config.toml"));
    }

    #[test]
    fn private_dir_is_created_0700_and_checked() {
        let t = tempfile::tempdir().expect("tmp");
        let uid = nix::unistd::getuid().as_raw();
        let d = t.path().join("a/b");
        create_private_dir(&d, uid).expect("create");
        let mode = std::fs::metadata(&d).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        // Existing and fine: accepted again.
        create_private_dir(&d, uid).expect("again");
        // Someone else's directory is refused.
        let e = create_private_dir(&d, uid + 1).expect_err("other owner");
        assert!(e.to_string().contains("belongs to uid"), "{e}");
        // Loose permissions are refused.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = create_private_dir(&d, uid).expect_err("loose");
        assert!(e.to_string().contains("mode 0755"), "{e}");
        // A symlink to a good directory is refused too.
        let good = t.path().join("good");
        create_private_dir(&good, uid).expect("good");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        let e = create_private_dir(&link, uid).expect_err("symlink");
        assert!(e.to_string().contains("is a symlink"), "{e}");
        // A file in the way fails to be created as a directory.
        let file = t.path().join("file");
        std::fs::write(&file, b"").expect("file");
        assert!(create_private_dir(&file, uid).is_err());
    }
}
