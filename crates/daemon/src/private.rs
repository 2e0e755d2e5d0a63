//! The owner's files stay the owner's: banger's state, cache and runtime
//! directories are 0700 and nothing under them is open to group or others
//! (work disks hold `file_sync` secrets, overlays the VM's ssh host key,
//! `banger.db` every VM's record). New files are private because bangerd
//! runs with umask 077; this repairs what older versions left.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Strips the group and other permission bits of `root` and of everything
/// under it that the daemon's user owns, without following symlinks
/// (a symlink's target is never changed). Returns how many modes changed;
/// entries that cannot be changed are logged and skipped.
pub(crate) fn tighten(root: &Path) -> usize {
    let me = nix::unistd::geteuid().as_raw();
    let mut changed = 0;
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot check the mode");
                continue;
            }
        };
        let kind = meta.file_type();
        if kind.is_symlink() || meta.uid() != me {
            continue;
        }
        if kind.is_dir() {
            match std::fs::read_dir(&path) {
                Ok(rd) => todo.extend(rd.flatten().map(|e| e.path())),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot list the directory")
                }
            }
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 == 0 || !(kind.is_dir() || kind.is_file()) {
            continue;
        }
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !0o077)) {
            Ok(()) => changed += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot make it private")
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    }

    #[test]
    fn tighten_closes_a_tree_to_group_and_others_but_not_symlink_targets() {
        let t = tempfile::tempdir().expect("tempdir");
        let state = t.path().join("state");
        let vm = state.join("vms/abc");
        std::fs::create_dir_all(&vm).expect("mkdir");
        for (f, m) in [
            ("work.ext4", 0o644),
            ("overlay.ext4", 0o666),
            ("run.sh", 0o755),
        ] {
            std::fs::write(vm.join(f), "x").expect("write");
            chmod(&vm.join(f), m);
        }
        std::fs::write(state.join("banger.db"), "db").expect("write");
        chmod(&state.join("banger.db"), 0o644);
        chmod(&vm, 0o755);
        chmod(&state.join("vms"), 0o775);
        chmod(&state, 0o755);
        let outside = t.path().join("outside");
        std::fs::write(&outside, "not banger's").expect("write");
        chmod(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, state.join("link")).expect("symlink");

        assert_eq!(tighten(&state), 7);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("vms")), 0o700);
        assert_eq!(mode(&vm), 0o700);
        assert_eq!(mode(&vm.join("work.ext4")), 0o600);
        assert_eq!(mode(&vm.join("overlay.ext4")), 0o600);
        assert_eq!(mode(&vm.join("run.sh")), 0o700);
        assert_eq!(mode(&state.join("banger.db")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a symlink's target is not banger's");
        assert_eq!(tighten(&state), 0, "idempotent");
        assert_eq!(tighten(&t.path().join("missing")), 0);
    }

    #[test]
    fn the_daemon_closes_an_old_installs_state_and_cache_at_start() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = banger_config::Paths::under(t.path());
        let disk = paths.vms_dir.join("abc/work.ext4");
        std::fs::create_dir_all(disk.parent().expect("vm dir")).expect("mkdir");
        std::fs::create_dir_all(&paths.cache_dir).expect("mkdir");
        std::fs::write(&disk, "secret").expect("write");
        chmod(&disk, 0o644);
        for d in [&paths.state_dir, &paths.vms_dir, &paths.cache_dir] {
            chmod(d, 0o755);
        }
        let _d =
            crate::Daemon::new(banger_config::Config::default(), paths.clone()).expect("daemon");
        assert_eq!(mode(&disk), 0o600);
        for d in [&paths.state_dir, &paths.vms_dir, &paths.cache_dir] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&paths.db) & 0o077, 0, "banger.db");
    }
}
