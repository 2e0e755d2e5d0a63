//! Host files copied into a VM's work disk (its `/root`) before the guest
//! boots: the `[[file_sync]]` entries of the config at create, and the
//! agents' credential files ([`CREDENTIALS`]) at every start.
//!
//! Host paths must stay inside the owner's home. The config check is
//! lexical; here the file system has its say: a path whose real location
//! (symlinks resolved) leaves the home is skipped with a warning, and
//! symlinks met while recursing into a synced directory are skipped too,
//! as they could pull in files from outside the named tree.

use crate::Daemon;
use anyhow::Context;
use banger_api::ProgressSink;
use banger_config::FileSync;
use banger_model::VmRecord;
use banger_storage::{EntryKind, GuestEntry, VmDisks, entry_path_ok};
use std::path::{Path, PathBuf};

/// Credential files synced at every VM start when they exist on the host:
/// (host path under the home, guest path under `/root`).
pub const CREDENTIALS: &[(&str, &str)] = &[
    (
        ".local/share/opencode/auth.json",
        ".local/share/opencode/auth.json",
    ),
    (".claude/.credentials.json", ".claude/.credentials.json"),
    (".pi/agent/auth.json", ".pi/agent/auth.json"),
];

/// Mode of credential files in the guest.
const CREDENTIAL_MODE: u32 = 0o600;
/// Mode of the directories of a synced tree in the guest.
const DIR_MODE: u32 = 0o700;

/// What to write into the work disk, and what was skipped (one line each).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub entries: Vec<GuestEntry>,
    pub warnings: Vec<String>,
}

/// A host path after the home rules, ready to copy.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Dir(PathBuf),
}

/// Plans the `[[file_sync]]` entries (already validated by the config:
/// `host` absolute inside `home`, `guest` under `/root`).
pub fn plan_file_sync(home: &Path, syncs: &[FileSync]) -> SyncPlan {
    let mut plan = SyncPlan::default();
    let home_real = match std::fs::canonicalize(home) {
        Ok(h) => h,
        Err(e) => {
            if !syncs.is_empty() {
                plan.warnings.push(format!(
                    "file_sync: the home directory {} cannot be read ({e}); nothing synced",
                    home.display()
                ));
            }
            return plan;
        }
    };
    for (i, fs) in syncs.iter().enumerate() {
        let shown = tilde(home, &fs.host);
        let Some(guest) = disk_path(&fs.guest) else {
            plan.warnings.push(format!(
                "file_sync[{i}]: guest path {} is not under /root; skipped",
                fs.guest.display()
            ));
            continue;
        };
        let mode = fs.mode.unwrap_or(FileSync::DEFAULT_MODE).0;
        match resolve(&home_real, &fs.host) {
            Ok(None) => plan
                .warnings
                .push(format!("file_sync[{i}]: {shown} does not exist; skipped")),
            Ok(Some(Source::File(real))) => plan.entries.push(GuestEntry {
                path: guest,
                kind: EntryKind::HostFile(real),
                mode,
            }),
            Ok(Some(Source::Dir(real))) => {
                plan.entries.push(GuestEntry {
                    path: guest.clone(),
                    kind: EntryKind::Dir,
                    mode: DIR_MODE,
                });
                walk(&real, &shown, &guest, mode, &mut plan);
            }
            Err(why) => plan
                .warnings
                .push(format!("file_sync[{i}]: {shown} {why}; skipped")),
        }
    }
    plan
}

/// Plans the credential files of [`CREDENTIALS`] that exist under `home`.
pub fn plan_credentials(home: &Path) -> SyncPlan {
    let mut plan = SyncPlan::default();
    let Ok(home_real) = std::fs::canonicalize(home) else {
        return plan;
    };
    for (host, guest) in CREDENTIALS {
        let path = home.join(host);
        match resolve(&home_real, &path) {
            Ok(None) => {}
            Ok(Some(Source::File(real))) => plan.entries.push(GuestEntry {
                path: format!("/{guest}"),
                kind: EntryKind::HostFile(real),
                mode: CREDENTIAL_MODE,
            }),
            Ok(Some(Source::Dir(_))) => plan.warnings.push(format!(
                "credential sync: ~/{host} is a directory, not a file; skipped"
            )),
            Err(why) => plan
                .warnings
                .push(format!("credential sync: ~/{host} {why}; skipped")),
        }
    }
    plan
}

/// Applies the home rule to a top-level host path: `Ok(None)` when it does
/// not exist, `Err(why)` when it must be skipped. A symlink (here or in a
/// parent directory) is followed only when its real target stays in the
/// home.
fn resolve(home_real: &Path, host: &Path) -> Result<Option<Source>, String> {
    match std::fs::symlink_metadata(host) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be read ({e})")),
    }
    let real = std::fs::canonicalize(host)
        .map_err(|e| format!("is a symlink that cannot be resolved ({e})"))?;
    if !real.starts_with(home_real) || real == home_real {
        return Err(format!(
            "resolves to {}, outside the home directory {}",
            real.display(),
            home_real.display()
        ));
    }
    let md = std::fs::metadata(&real).map_err(|e| format!("cannot be read ({e})"))?;
    if md.is_file() {
        Ok(Some(Source::File(real)))
    } else if md.is_dir() {
        Ok(Some(Source::Dir(real)))
    } else {
        Err("is not a regular file or directory".into())
    }
}

/// Adds the contents of directory `dir` (shown to users as `shown`) under
/// guest disk path `guest`; symlinks and special files are skipped.
fn walk(dir: &Path, shown: &str, guest: &str, mode: u32, plan: &mut SyncPlan) {
    let mut children: Vec<(std::ffi::OsString, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| (e.file_name(), e.path()))
            .collect(),
        Err(e) => {
            plan.warnings
                .push(format!("file_sync: cannot list {shown} ({e}); skipped"));
            return;
        }
    };
    children.sort();
    for (name, path) in children {
        let shown_child = format!("{shown}/{}", name.to_string_lossy());
        let Some(name) = name.to_str() else {
            plan.warnings.push(format!(
                "file_sync: {shown_child} has a name that is not UTF-8; skipped"
            ));
            continue;
        };
        let guest_child = format!("{guest}/{name}");
        if !entry_path_ok(&guest_child) {
            plan.warnings.push(format!(
                "file_sync: {shown_child} has a name with quotes, backslashes or control characters; skipped"
            ));
            continue;
        }
        let md = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                plan.warnings.push(format!(
                    "file_sync: cannot read {shown_child} ({e}); skipped"
                ));
                continue;
            }
        };
        let ft = md.file_type();
        if ft.is_symlink() {
            plan.warnings.push(format!(
                "file_sync: {shown_child} is a symlink inside a synced directory; skipped"
            ));
        } else if ft.is_dir() {
            plan.entries.push(GuestEntry {
                path: guest_child.clone(),
                kind: EntryKind::Dir,
                mode: DIR_MODE,
            });
            walk(&path, &shown_child, &guest_child, mode, plan);
        } else if ft.is_file() {
            plan.entries.push(GuestEntry {
                path: guest_child,
                kind: EntryKind::HostFile(path),
                mode,
            });
        } else {
            plan.warnings.push(format!(
                "file_sync: {shown_child} is not a regular file or directory; skipped"
            ));
        }
    }
}

/// `/root/x` → `/x` on the work disk.
fn disk_path(guest: &Path) -> Option<String> {
    let rest = guest.strip_prefix("/root").ok()?;
    let p = format!("/{}", rest.to_str()?);
    entry_path_ok(&p).then_some(p)
}

/// `~/x` for paths in the home, for messages.
fn tilde(home: &Path, p: &Path) -> String {
    match p.strip_prefix(home) {
        Ok(rest) => format!("~/{}", rest.display()),
        Err(_) => p.display().to_string(),
    }
}

impl Daemon {
    /// Writes the `[[file_sync]]` entries into `vm`'s work disk (create
    /// time, before the first boot); each skipped path is a warning on
    /// `progress`.
    /// Returns how many entries were written.
    pub(crate) async fn sync_files(
        &self,
        vm: &VmRecord,
        progress: &ProgressSink,
    ) -> anyhow::Result<usize> {
        let (home, syncs) = (self.paths.home.clone(), self.config.file_sync.clone());
        if syncs.is_empty() {
            return Ok(0);
        }
        let plan = tokio::task::spawn_blocking(move || plan_file_sync(&home, &syncs))
            .await
            .context("planning [[file_sync]]")?;
        self.write_plan(vm, plan, progress, "copying [[file_sync]] files into /root")
            .await
    }

    /// Writes the host's credential files ([`CREDENTIALS`]) into the work
    /// disk of `vm`, which must be stopped. Run before every boot.
    pub(crate) async fn sync_credentials(
        &self,
        vm: &VmRecord,
        progress: &ProgressSink,
    ) -> anyhow::Result<usize> {
        let home = self.paths.home.clone();
        let plan = tokio::task::spawn_blocking(move || plan_credentials(&home))
            .await
            .context("planning credential sync")?;
        self.write_plan(vm, plan, progress, "copying credential files into /root")
            .await
    }

    async fn write_plan(
        &self,
        vm: &VmRecord,
        plan: SyncPlan,
        progress: &ProgressSink,
        what: &str,
    ) -> anyhow::Result<usize> {
        for w in &plan.warnings {
            tracing::warn!(vm = %vm.name, "{w}");
            progress.warn(w);
        }
        let disk = VmDisks::in_dir(&vm.dir).work;
        banger_storage::write_entries(&disk, &plan.entries)
            .await
            .with_context(|| format!("{what} of VM {}", vm.name))?;
        Ok(plan.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_config::FileMode;
    use std::os::unix::fs::symlink;

    fn sync(host: &Path, guest: &str, mode: Option<u32>) -> FileSync {
        FileSync {
            host: host.to_path_buf(),
            guest: PathBuf::from(guest),
            mode: mode.map(FileMode),
        }
    }

    fn file(path: &str, src: &Path, mode: u32) -> GuestEntry {
        GuestEntry {
            path: path.into(),
            kind: EntryKind::HostFile(src.to_path_buf()),
            mode,
        }
    }

    fn dir(path: &str) -> GuestEntry {
        GuestEntry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode: 0o700,
        }
    }

    /// A home with a file, a directory tree holding a nested symlink, a
    /// symlink into the home, one out of it, and a secret outside.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        let root = std::fs::canonicalize(t.path()).expect("canon");
        let home = root.join("home");
        let outside = root.join("outside");
        std::fs::create_dir_all(home.join(".aws/sub")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), "s").expect("w");
        std::fs::write(home.join("notes"), "n").expect("w");
        std::fs::write(home.join(".aws/config"), "c").expect("w");
        std::fs::write(home.join(".aws/sub/x"), "x").expect("w");
        symlink(outside.join("secret"), home.join(".aws/leak")).expect("ln");
        symlink(home.join("notes"), home.join("notes-link")).expect("ln");
        symlink(outside.join("secret"), home.join("escape")).expect("ln");
        symlink(&outside, home.join("outdir")).expect("ln");
        (t, home, outside)
    }

    #[test]
    fn files_and_directories_with_modes() {
        let (_t, home, _) = setup();
        let plan = plan_file_sync(
            &home,
            &[
                sync(&home.join("notes"), "/root/n", None),
                sync(&home.join(".aws"), "/root/.aws", Some(0o640)),
            ],
        );
        assert_eq!(
            plan.entries,
            vec![
                file("/n", &home.join("notes"), 0o600),
                dir("/.aws"),
                file("/.aws/config", &home.join(".aws/config"), 0o640),
                dir("/.aws/sub"),
                file("/.aws/sub/x", &home.join(".aws/sub/x"), 0o640),
            ],
            "the nested symlink .aws/leak is not copied"
        );
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(
            plan.warnings[0].contains("~/.aws/leak is a symlink inside a synced directory"),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn top_level_symlinks_are_followed_only_inside_the_home() {
        let (_t, home, outside) = setup();
        let plan = plan_file_sync(
            &home,
            &[
                sync(&home.join("notes-link"), "/root/in", None),
                sync(&home.join("escape"), "/root/out", None),
                sync(&home.join("outdir"), "/root/outdir", None),
                sync(&home.join("outdir/secret"), "/root/via-parent", None),
            ],
        );
        assert_eq!(
            plan.entries,
            vec![file("/in", &home.join("notes"), 0o600)],
            "only the link staying in the home is followed"
        );
        assert_eq!(plan.warnings.len(), 3, "{:?}", plan.warnings);
        for (w, name) in plan
            .warnings
            .iter()
            .zip(["~/escape", "~/outdir", "~/outdir/secret"])
        {
            assert!(
                w.contains(&format!("{name} resolves to {}", outside.display()))
                    && w.contains("outside the home directory")
                    && w.ends_with("skipped"),
                "{w}"
            );
        }
    }

    #[test]
    fn missing_paths_and_the_home_itself_are_skipped() {
        let (_t, home, _) = setup();
        symlink(&home, home.join("self")).expect("ln");
        let plan = plan_file_sync(
            &home,
            &[
                sync(&home.join("nope"), "/root/nope", None),
                sync(&home.join("self"), "/root/self", None),
            ],
        );
        assert!(plan.entries.is_empty(), "{:?}", plan.entries);
        assert!(plan.warnings[0].contains("~/nope does not exist"));
        assert!(plan.warnings[1].contains("~/self resolves to"));
    }

    #[test]
    fn odd_names_are_skipped_with_a_warning() {
        let (_t, home, _) = setup();
        std::fs::write(home.join(".aws/with \"quote"), "q").expect("w");
        std::fs::write(home.join(".aws/with space"), "s").expect("w");
        let plan = plan_file_sync(&home, &[sync(&home.join(".aws"), "/root/.aws", None)]);
        assert!(
            plan.entries
                .iter()
                .any(|e| e.path == "/.aws/with space" && e.mode == 0o600)
        );
        assert!(!plan.entries.iter().any(|e| e.path.contains('"')));
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.contains("with \"quote has a name with quotes")),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn credential_table_syncs_only_existing_files() {
        let (_t, home, outside) = setup();
        assert_eq!(plan_credentials(&home), SyncPlan::default());
        std::fs::create_dir_all(home.join(".claude")).expect("mkdir");
        std::fs::write(home.join(".claude/.credentials.json"), "{}").expect("w");
        std::fs::create_dir_all(home.join(".pi/agent")).expect("mkdir");
        symlink(outside.join("secret"), home.join(".pi/agent/auth.json")).expect("ln");
        let plan = plan_credentials(&home);
        assert_eq!(
            plan.entries,
            vec![file(
                "/.claude/.credentials.json",
                &home.join(".claude/.credentials.json"),
                0o600
            )]
        );
        assert_eq!(plan.warnings.len(), 1);
        assert!(plan.warnings[0].contains("~/.pi/agent/auth.json resolves to"));
        assert_eq!(
            CREDENTIALS.iter().map(|c| c.0).collect::<Vec<_>>(),
            [
                ".local/share/opencode/auth.json",
                ".claude/.credentials.json",
                ".pi/agent/auth.json"
            ]
        );
        for (h, g) in CREDENTIALS {
            assert_eq!(h, g, "the guest keeps the host's layout under /root");
        }
    }

    #[test]
    fn guest_paths_map_onto_the_work_disk() {
        assert_eq!(
            disk_path(Path::new("/root/.config/gh/hosts.yml")).as_deref(),
            Some("/.config/gh/hosts.yml")
        );
        assert_eq!(disk_path(Path::new("/etc/x")), None);
        assert_eq!(disk_path(Path::new("/root")), None);
    }
}
