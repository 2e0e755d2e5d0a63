//! Which files of a git repository go into a guest workspace.
//!
//! By default: the files git tracks, as they are in the working tree
//! (submodules included, through their own indexes), plus the repository's
//! `.git` so that git works in the guest and `git status` there matches the
//! host's. `include_untracked` adds untracked files that are not ignored;
//! ignored files are never sent. With a [`Rev`], the tree of that branch or
//! commit is sent instead (contents from `git cat-file`), with a `.git`
//! whose `HEAD` is that ref and whose index matches its tree, so the guest
//! checkout is clean.
//!
//! git is driven through its command line (`git ls-files -z`, `ls-tree`,
//! `cat-file --batch`, `read-tree`), with argument vectors.

use crate::pack::BlobSource;
use crate::plan::{
    Entry, Plan, PlanError, Source, file_entry, io_err, join_name, link_stays_inside,
    symlink_entry, walk,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// A branch or commit to copy instead of the working tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rev {
    /// A local branch: the guest checkout is on it.
    Branch(String),
    /// Any commit-ish (tag, remote branch, sha): the guest checkout is
    /// detached at it.
    Commit(String),
}

/// What to select.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Also send untracked files that are not ignored (working tree only).
    pub include_untracked: bool,
    pub rev: Option<Rev>,
}

/// A selected workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The repository's top-level directory on the host.
    pub root: PathBuf,
    /// Its directory name (the default guest directory name).
    pub name: String,
    /// The selected files and symlinks (not `.git`), relative to `root`,
    /// sorted: what `--dry-run` prints.
    pub files: Vec<String>,
    /// Everything to send, `.git` included; names relative to the
    /// workspace directory.
    pub plan: Plan,
    /// Set when entries are git blobs: the repository to read them from.
    pub blob_repo: Option<PathBuf>,
}

impl Workspace {
    /// Whether the workspace declares tools for `mise` (`.mise.toml`,
    /// `mise.toml` or `.tool-versions` at its top).
    pub fn has_tool_config(&self) -> bool {
        self.files
            .iter()
            .any(|f| matches!(f.as_str(), ".mise.toml" | "mise.toml" | ".tool-versions"))
    }

    /// A reader of the git blobs this workspace's plan refers to.
    pub fn blobs(&self) -> Result<Option<CatFile>, PlanError> {
        self.blob_repo.as_deref().map(CatFile::start).transpose()
    }
}

/// Selects the workspace of the repository containing `path`.
pub fn select(path: &Path, opts: &Options) -> Result<Workspace, PlanError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Err(PlanError::Unsupported {
            path: path.to_path_buf(),
            reason: "a workspace is a directory inside a git repository".into(),
        });
    }
    let top = git_text(path, &["rev-parse", "--show-toplevel"]).map_err(|e| {
        PlanError::Git(format!(
            "{} is not inside a git repository (git init and commit first): {e}",
            path.display()
        ))
    })?;
    let root = PathBuf::from(top);
    let name = root
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| PlanError::NotUtf8(root.clone()))?
        .to_string();
    let mut plan = Plan::default();
    let mut files = Vec::new();
    match &opts.rev {
        None => {
            let mut entries = BTreeMap::new();
            list_worktree(
                &root,
                &root,
                "",
                opts.include_untracked,
                &mut entries,
                &mut plan,
            )?;
            for (n, e) in entries {
                if !n.ends_with("/.git") && !n.contains("/.git/") {
                    files.push(n);
                }
                plan.entries.push(e);
            }
            add_git_dir(&root, None, &mut plan)?;
            Ok(Workspace {
                root,
                name,
                files,
                plan,
                blob_repo: None,
            })
        }
        Some(rev) => {
            let (sha, head) = resolve(&root, rev)?;
            let mtime: u64 = git_text(&root, &["show", "-s", "--format=%ct", &sha])?
                .parse()
                .unwrap_or(0);
            let mut blobs = CatFile::start(&root)?;
            list_tree(&root, &sha, mtime, &mut blobs, &mut files, &mut plan)?;
            let index = tree_index(&root, &sha)?;
            add_git_dir(&root, Some((head, index)), &mut plan)?;
            Ok(Workspace {
                root: root.clone(),
                name,
                files,
                plan,
                blob_repo: Some(root),
            })
        }
    }
}

/// Runs git in `dir`; its stdout, or its stderr as the error.
fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, PlanError> {
    git_env(dir, args, &[])
}

fn git_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<Vec<u8>, PlanError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| {
        PlanError::Git(format!(
            "running git (install it, e.g. apt-get install git): {e}"
        ))
    })?;
    if !out.status.success() {
        return Err(PlanError::Git(format!(
            "git {} in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn git_text(dir: &Path, args: &[&str]) -> Result<String, PlanError> {
    let out = git(dir, args)?;
    String::from_utf8(out)
        .map(|s| s.trim_end_matches('\n').to_string())
        .map_err(|_| PlanError::Git(format!("git {} printed non-UTF-8", args.join(" "))))
}

fn nul_split(out: &[u8]) -> impl Iterator<Item = &[u8]> {
    out.split(|b| *b == 0).filter(|s| !s.is_empty())
}

fn utf8<'a>(dir: &Path, raw: &'a [u8]) -> Result<&'a str, PlanError> {
    std::str::from_utf8(raw).map_err(|_| {
        PlanError::NotUtf8(dir.join(std::ffi::OsStr::new(
            &String::from_utf8_lossy(raw).into_owned(),
        )))
    })
}

/// Adds the tracked (and optionally untracked) files of the repository at
/// `dir` (named `prefix` under the workspace) and of its submodules.
fn list_worktree(
    top: &Path,
    dir: &Path,
    prefix: &str,
    untracked: bool,
    out: &mut BTreeMap<String, Entry>,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let staged = git(dir, &["ls-files", "-z", "--stage"])?;
    let mut paths: BTreeMap<String, bool> = BTreeMap::new();
    for rec in nul_split(&staged) {
        let rec = utf8(dir, rec)?;
        let Some((meta, path)) = rec.split_once('\t') else {
            continue;
        };
        let gitlink = meta.starts_with("160000 ");
        paths.insert(path.to_string(), gitlink);
    }
    if untracked {
        let others = git(dir, &["ls-files", "-z", "--others", "--exclude-standard"])?;
        for rec in nul_split(&others) {
            let rec = utf8(dir, rec)?;
            // A nested repository shows as "dir/": not ours to send.
            if !rec.ends_with('/') {
                paths.entry(rec.to_string()).or_insert(false);
            }
        }
    }
    for (path, gitlink) in paths {
        let name = join_name(prefix, &path);
        let abs = dir.join(&path);
        if gitlink {
            if abs.join(".git").exists() {
                list_worktree(top, &abs, &name, untracked, out, plan)?;
                add_tree(&abs, ".git", &format!("{name}/.git"), out, plan)?;
            } else {
                plan.skipped.push(format!(
                    "submodule {name} is not checked out on the host; not copied"
                ));
            }
            continue;
        }
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            // Tracked but deleted in the working tree: the guest shows it deleted too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&abs)(e)),
        };
        let ft = meta.file_type();
        if ft.is_file() {
            out.insert(name.clone(), file_entry(name, &abs, &meta));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&abs).map_err(io_err(&abs))?;
            if link_stays_inside(Path::new(&name), &target) {
                out.insert(name.clone(), symlink_entry(name, target, &meta));
            } else {
                plan.skipped.push(format!(
                    "skipped symlink {name} -> {}: it points outside {}",
                    target.display(),
                    top.display()
                ));
            }
        } else {
            plan.skipped.push(format!(
                "skipped {name}: not a regular file or symlink in the working tree"
            ));
        }
    }
    Ok(())
}

/// Adds `dir/rel` (a file, or a directory walked whole) as `name`.
fn add_tree(
    dir: &Path,
    rel: &str,
    name: &str,
    out: &mut BTreeMap<String, Entry>,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let abs = dir.join(rel);
    let meta = std::fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
    if meta.is_dir() {
        let mut sub = Plan::default();
        sub.entries
            .push(crate::plan::dir_entry(name.to_string(), &meta));
        walk(&abs, Path::new(""), name, &mut sub)?;
        for e in sub.entries {
            out.insert(e.name.clone(), e);
        }
        plan.skipped.extend(sub.skipped);
    } else if meta.is_file() {
        out.insert(name.to_string(), file_entry(name.to_string(), &abs, &meta));
    }
    Ok(())
}

/// Adds the repository's `.git`. For a linked worktree (`.git` is a file)
/// the common directory is sent, with the worktree's own `HEAD` and index.
/// `replace` gives a `HEAD` and an index to use instead of the host's.
fn add_git_dir(
    root: &Path,
    replace: Option<(String, Vec<u8>)>,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let git_dir = PathBuf::from(git_text(root, &["rev-parse", "--absolute-git-dir"])?);
    let common = git_text(root, &["rev-parse", "--git-common-dir"])?;
    let common = {
        let p = PathBuf::from(&common);
        if p.is_absolute() { p } else { root.join(p) }
    };
    let mut sub = Plan::default();
    walk(&common, Path::new(""), ".git", &mut sub)?;
    let linked = git_dir != common.canonicalize().unwrap_or_else(|_| common.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    plan.entries.push(Entry {
        name: ".git".into(),
        source: Source::Dir,
        mode: 0o755,
        mtime: now,
        size: 0,
    });
    for e in sub.entries {
        let n = e.name.as_str();
        let dropped = n == ".git/HEAD"
            || n == ".git/index"
            || n.ends_with(".lock")
            || (linked && (n == ".git/worktrees" || n.starts_with(".git/worktrees/")));
        if !dropped {
            let source = match e.source {
                Source::File(p) => Source::GitInternal(p),
                other => other,
            };
            plan.entries.push(Entry { source, ..e });
        }
    }
    plan.skipped.extend(sub.skipped);
    let bytes = |name: &str, data: Vec<u8>| Entry {
        name: name.into(),
        size: data.len() as u64,
        source: Source::Bytes(data),
        mode: 0o644,
        mtime: now,
    };
    match replace {
        Some((head, index)) => {
            plan.entries.push(bytes(".git/HEAD", head.into_bytes()));
            plan.entries.push(bytes(".git/index", index));
        }
        None => {
            for f in ["HEAD", "index"] {
                let p = git_dir.join(f);
                if let Ok(meta) = std::fs::metadata(&p) {
                    plan.entries
                        .push(file_entry(format!(".git/{f}"), &p, &meta));
                }
            }
        }
    }
    Ok(())
}

/// The commit `rev` names, and the `HEAD` file the guest gets for it.
fn resolve(root: &Path, rev: &Rev) -> Result<(String, String), PlanError> {
    match rev {
        Rev::Branch(b) => {
            let full = format!("refs/heads/{b}");
            let sha = git_text(root, &["rev-parse", "--verify", "--quiet", &format!("{full}^{{commit}}")])
                .map_err(|_| {
                    PlanError::Git(format!(
                        "{} has no local branch {b:?}: create it, or pass --from REF for a remote branch, tag or commit",
                        root.display()
                    ))
                })?;
            Ok((sha, format!("ref: {full}\n")))
        }
        Rev::Commit(r) => {
            let sha = git_text(
                root,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{r}^{{commit}}"),
                ],
            )
            .map_err(|_| PlanError::Git(format!("{r:?} is not a commit in {}", root.display())))?;
            Ok((sha.clone(), format!("{sha}\n")))
        }
    }
}

/// Adds the tree of commit `sha`.
fn list_tree(
    root: &Path,
    sha: &str,
    mtime: u64,
    blobs: &mut CatFile,
    files: &mut Vec<String>,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let out = git(root, &["ls-tree", "-r", "-z", "-l", "--full-tree", sha])?;
    for rec in nul_split(&out) {
        let rec = utf8(root, rec)?;
        let Some((meta, path)) = rec.split_once('\t') else {
            continue;
        };
        let mut f = meta.split_whitespace();
        let (Some(mode), Some(_kind), Some(oid), Some(size)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let size: u64 = size.parse().unwrap_or(0);
        let entry = |source, mode, size| Entry {
            name: path.to_string(),
            source,
            mode,
            mtime,
            size,
        };
        match mode {
            "100644" | "100755" | "100664" => {
                let m = if mode == "100755" { 0o755 } else { 0o644 };
                plan.entries.push(entry(
                    Source::Blob {
                        oid: oid.to_string(),
                    },
                    m,
                    size,
                ));
                files.push(path.to_string());
            }
            "120000" => {
                let (_, mut r) = blobs
                    .blob(oid)
                    .map_err(|e| PlanError::Git(format!("reading symlink {path} at {sha}: {e}")))?;
                let mut target = Vec::new();
                r.read_to_end(&mut target)
                    .map_err(|e| PlanError::Git(format!("reading symlink {path}: {e}")))?;
                let target = PathBuf::from(utf8(root, &target)?);
                if link_stays_inside(Path::new(path), &target) {
                    plan.entries.push(entry(Source::Symlink(target), 0o777, 0));
                    files.push(path.to_string());
                } else {
                    plan.skipped.push(format!(
                        "skipped symlink {path} -> {}: it points outside the repository",
                        target.display()
                    ));
                }
            }
            "160000" => {
                plan.entries.push(entry(Source::Dir, 0o755, 0));
                plan.skipped.push(format!(
                    "submodule {path} is not copied with --branch/--from: run `git submodule update --init` in the guest"
                ));
            }
            other => plan
                .skipped
                .push(format!("skipped {path}: unknown git mode {other}")),
        }
    }
    Ok(())
}

/// An index matching the tree of `sha`, made by `git read-tree` into a
/// temporary index file (the host's own index is untouched).
fn tree_index(root: &Path, sha: &str) -> Result<Vec<u8>, PlanError> {
    let tmp = tempfile::tempdir().map_err(io_err(Path::new("temporary directory")))?;
    let idx = tmp.path().join("index");
    git_env(root, &["read-tree", sha], &[("GIT_INDEX_FILE", &idx)])?;
    std::fs::read(&idx).map_err(io_err(&idx))
}

/// `git cat-file --batch` on one repository.
pub struct CatFile {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The newline that follows a blob's content is still to be read.
    pending_lf: bool,
}

impl CatFile {
    /// Starts `git cat-file --batch` in `repo`.
    pub fn start(repo: &Path) -> Result<CatFile, PlanError> {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| PlanError::Git(format!("running git cat-file: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(PlanError::Git("git cat-file without pipes".into()));
        };
        Ok(CatFile {
            child,
            stdin,
            stdout: BufReader::with_capacity(256 * 1024, stdout),
            pending_lf: false,
        })
    }
}

impl BlobSource for CatFile {
    fn blob(&mut self, oid: &str) -> std::io::Result<(u64, Box<dyn Read + '_>)> {
        use std::io::{Error, ErrorKind};
        if self.pending_lf {
            let mut lf = [0u8; 1];
            self.stdout.read_exact(&mut lf)?;
            self.pending_lf = false;
        }
        writeln!(self.stdin, "{oid}")?;
        self.stdin.flush()?;
        let mut header = String::new();
        self.stdout.read_line(&mut header)?;
        let mut f = header.split_whitespace();
        let (Some(_), Some(kind), Some(size)) = (f.next(), f.next(), f.next()) else {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("git cat-file: {}", header.trim()),
            ));
        };
        if kind != "blob" {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("{oid} is a {kind}, not a blob"),
            ));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| Error::new(ErrorKind::InvalidData, "git cat-file: bad size"))?;
        self.pending_lf = true;
        Ok((size, Box::new((&mut self.stdout).take(size))))
    }
}

impl Drop for CatFile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests;
