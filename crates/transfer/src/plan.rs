//! What goes into a tar stream: a list of entries with their metadata.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where an entry's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory (no content).
    Dir,
    /// A regular file on the local file system.
    File(PathBuf),
    /// A file of a repository's `.git` that git itself may delete at any
    /// moment (a background `git gc`, a finished command's pid or lock
    /// file): left out if it is gone when the archive is written.
    GitInternal(PathBuf),
    /// A symbolic link, stored as a link (never followed).
    Symlink(PathBuf),
    /// A git blob, read through `git cat-file --batch` of the repository.
    Blob { oid: String },
    /// Bytes made up by the planner (e.g. a synthesized `.git/HEAD`).
    Bytes(Vec<u8>),
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive: relative, `/`-separated, no `..`.
    pub name: String,
    pub source: Source,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Content length for files, blobs and bytes; 0 otherwise.
    pub size: u64,
}

/// The entries of a transfer, in archive order, plus what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// One line per path that was skipped, saying why.
    pub skipped: Vec<String>,
}

impl Plan {
    /// Bytes of content the archive will carry.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of non-directory entries.
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.source != Source::Dir)
            .count()
    }
}

/// Errors while planning a transfer.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not valid UTF-8; banger transfers UTF-8 paths only")]
    NotUtf8(PathBuf),
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{0}")]
    Git(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PlanError + '_ {
    move |source| PlanError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Plans the transfer of `src` (a file or a directory tree) under the
/// archive name `name`.
///
/// A top-level symlink is followed (the user named it). Inside a
/// directory, symlinks are kept as symlinks when their target stays inside
/// the tree and skipped otherwise; sockets, fifos and device nodes are
/// skipped. Skips are reported in [`Plan::skipped`].
pub fn plan_path(src: &Path, name: &str) -> Result<Plan, PlanError> {
    check_name(name, src)?;
    let meta = std::fs::metadata(src).map_err(io_err(src))?;
    let mut plan = Plan::default();
    if meta.is_dir() {
        plan.entries.push(dir_entry(name.to_string(), &meta));
        walk(src, Path::new(""), name, &mut plan)?;
    } else if meta.is_file() {
        plan.entries.push(file_entry(name.to_string(), src, &meta));
    } else {
        return Err(PlanError::Unsupported {
            path: src.to_path_buf(),
            reason: "only regular files and directories can be copied".into(),
        });
    }
    Ok(plan)
}

fn check_name(name: &str, src: &Path) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(PlanError::Unsupported {
            path: src.to_path_buf(),
            reason: format!("{name:?} is not a valid name for the copy"),
        })
    }
}

pub(crate) fn dir_entry(name: String, meta: &std::fs::Metadata) -> Entry {
    Entry {
        name,
        source: Source::Dir,
        mode: meta.permissions().mode() & 0o7777,
        mtime: meta.mtime().max(0) as u64,
        size: 0,
    }
}

pub(crate) fn file_entry(name: String, path: &Path, meta: &std::fs::Metadata) -> Entry {
    Entry {
        name,
        source: Source::File(path.to_path_buf()),
        mode: meta.permissions().mode() & 0o7777,
        mtime: meta.mtime().max(0) as u64,
        size: meta.len(),
    }
}

pub(crate) fn symlink_entry(name: String, target: PathBuf, meta: &std::fs::Metadata) -> Entry {
    Entry {
        name,
        source: Source::Symlink(target),
        mode: 0o777,
        mtime: meta.mtime().max(0) as u64,
        size: 0,
    }
}

/// Adds the contents of `root/rel` (a directory) to `plan`, named under
/// `prefix/rel`. Entries are sorted so archives are reproducible.
pub(crate) fn walk(
    root: &Path,
    rel: &Path,
    prefix: &str,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let dir = root.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err(&dir))?;
    names.sort();
    for n in names {
        let child_rel = rel.join(&n);
        let path = root.join(&child_rel);
        let rel_str = child_rel
            .to_str()
            .ok_or_else(|| PlanError::NotUtf8(path.clone()))?;
        let name = join_name(prefix, rel_str);
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            plan.entries.push(dir_entry(name, &meta));
            walk(root, &child_rel, prefix, plan)?;
        } else if ft.is_file() {
            plan.entries.push(file_entry(name, &path, &meta));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err(&path))?;
            if link_stays_inside(&child_rel, &target) {
                plan.entries.push(symlink_entry(name, target, &meta));
            } else {
                plan.skipped.push(format!(
                    "skipped symlink {} -> {}: it points outside {}",
                    path.display(),
                    target.display(),
                    root.display()
                ));
            }
        } else {
            plan.skipped.push(format!(
                "skipped {}: not a regular file, directory or symlink",
                path.display()
            ));
        }
    }
    Ok(())
}

pub(crate) fn join_name(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// Whether a symlink at `link` (relative to a tree's root) with `target`
/// resolves inside that tree, judged without touching the file system.
///
/// The target must be relative, and `..` may only lead it (`../lib/x`),
/// never follow a name (`a/../b`): a name may itself be a symlink, after
/// which `..` would not mean what it says.
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    let mut depth: usize = 0;
    for c in link.parent().unwrap_or(Path::new("")).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
    }
    let mut seen_name = false;
    let mut any = false;
    for c in target.components() {
        any = true;
        match c {
            Component::Normal(_) => {
                seen_name = true;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if seen_name || depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn link_rules() {
        let ok = |l: &str, t: &str| link_stays_inside(Path::new(l), Path::new(t));
        assert!(ok("a", "b"));
        assert!(ok("d/a", "../b"));
        assert!(ok("d/e/a", "../../b/c"));
        assert!(ok("a", "."));
        assert!(!ok("a", "../b"));
        assert!(!ok("d/a", "../../b"));
        assert!(!ok("a", "/etc/passwd"));
        assert!(!ok("a", "b/../c"));
        assert!(!ok("a", ""));
    }

    #[test]
    fn tree_keeps_inner_symlinks_and_skips_escaping_ones() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("src");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/f"), "x").expect("write");
        std::fs::set_permissions(root.join("sub/f"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        symlink("sub/f", root.join("inner")).expect("symlink");
        symlink("../../etc", root.join("sub/out")).expect("symlink");
        symlink("/etc/passwd", root.join("abs")).expect("symlink");
        let plan = plan_path(&root, "dst").expect("plan");
        let names: Vec<_> = plan.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dst", "dst/inner", "dst/sub", "dst/sub/f"]);
        assert_eq!(plan.entries[3].mode, 0o750);
        assert_eq!(plan.entries[3].size, 1);
        assert_eq!(
            plan.entries[1].source,
            Source::Symlink(PathBuf::from("sub/f"))
        );
        assert_eq!(plan.skipped.len(), 2, "{:?}", plan.skipped);
        assert!(plan.skipped.iter().any(|s| s.contains("abs")));
        assert!(plan.skipped.iter().any(|s| s.contains("out")));
    }

    #[test]
    fn single_file_and_bad_names() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("f");
        std::fs::write(&f, "hello").expect("write");
        let plan = plan_path(&f, "g").expect("plan");
        assert_eq!(plan.entries.len(), 1);
        assert_eq!(plan.total_bytes(), 5);
        assert!(plan_path(&f, "../g").is_err());
        assert!(plan_path(&f, "/g").is_err());
    }
}
