use super::*;
use crate::pack::write_tar;
use std::os::unix::fs::{PermissionsExt, symlink};

/// Runs git with a fixed identity; panics with its stderr on failure.
fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "protocol.file.allow=always",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("spawn git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(p: &Path, text: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(p, text).expect("write");
}

/// A repository with a tracked file, an executable, an in-repo symlink, a
/// .gitignore, an untracked file and an ignored one.
fn repo(t: &Path) -> PathBuf {
    let r = t.join("proj");
    std::fs::create_dir_all(&r).expect("mkdir");
    git_in(&r, &["init", "-q"]);
    write(&r.join("a.txt"), "a\n");
    write(&r.join("bin/run.sh"), "#!/bin/sh\necho run\n");
    std::fs::set_permissions(r.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    symlink("a.txt", r.join("link")).expect("symlink");
    write(&r.join(".gitignore"), "*.log\n");
    git_in(&r, &["add", "-A"]);
    git_in(&r, &["commit", "-q", "-m", "one"]);
    write(&r.join("untracked.txt"), "u\n");
    write(&r.join("debug.log"), "ignored\n");
    r
}

/// Unpacks the workspace into `dest` the way the guest would and returns
/// `git status --short` there.
fn unpack_and_status(ws: &Workspace, dest: &Path) -> String {
    let mut blobs = ws.blobs().expect("blobs");
    let tar = write_tar(
        &ws.plan,
        Vec::new(),
        blobs.as_mut().map(|b| b as &mut dyn BlobSource),
        &mut |_| {},
    )
    .expect("tar");
    crate::unpack(tar.as_slice(), dest).expect("unpack");
    git_in(dest, &["status", "--short"])
}

fn names(ws: &Workspace) -> Vec<&str> {
    ws.files.iter().map(String::as_str).collect()
}

#[test]
fn tracked_files_only_by_default_and_clean_in_the_copy() {
    let t = tempfile::tempdir().expect("tmp");
    let r = repo(t.path());
    let ws = select(&r.join("bin"), &Options::default()).expect("select");
    assert_eq!(ws.name, "proj");
    assert_eq!(names(&ws), [".gitignore", "a.txt", "bin/run.sh", "link"]);
    assert!(ws.plan.entries.iter().any(|e| e.name == ".git/HEAD"));
    assert!(ws.plan.entries.iter().any(|e| e.name == ".git/index"));
    let run = ws
        .plan
        .entries
        .iter()
        .find(|e| e.name == "bin/run.sh")
        .expect("run.sh");
    assert_eq!(run.mode, 0o755);
    let dest = t.path().join("guest/proj");
    assert_eq!(unpack_and_status(&ws, &dest), "");
    assert_eq!(
        std::fs::read_link(dest.join("link")).expect("link"),
        PathBuf::from("a.txt")
    );
    assert!(!dest.join("untracked.txt").exists());
    assert!(!dest.join("debug.log").exists());
    let mode = std::fs::metadata(dest.join("bin/run.sh"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn include_untracked_adds_untracked_but_never_ignored() {
    let t = tempfile::tempdir().expect("tmp");
    let r = repo(t.path());
    let opts = Options {
        include_untracked: true,
        rev: None,
    };
    let ws = select(&r, &opts).expect("select");
    assert_eq!(
        names(&ws),
        [".gitignore", "a.txt", "bin/run.sh", "link", "untracked.txt"]
    );
    let dest = t.path().join("guest/proj");
    assert_eq!(unpack_and_status(&ws, &dest), "?? untracked.txt\n");
}

#[test]
fn tracked_symlink_leaving_the_repo_is_skipped_with_a_warning() {
    let t = tempfile::tempdir().expect("tmp");
    let r = repo(t.path());
    symlink("../../etc/passwd", r.join("bin/escape")).expect("symlink");
    symlink("/etc/hosts", r.join("abs")).expect("symlink");
    git_in(&r, &["add", "-A"]);
    git_in(&r, &["commit", "-q", "-m", "links"]);
    let ws = select(&r, &Options::default()).expect("select");
    assert!(!ws.files.iter().any(|f| f == "bin/escape" || f == "abs"));
    assert_eq!(ws.plan.skipped.len(), 2, "{:?}", ws.plan.skipped);
}

#[test]
fn submodule_working_tree_is_included() {
    let t = tempfile::tempdir().expect("tmp");
    let sub = t.path().join("sublib");
    std::fs::create_dir_all(&sub).expect("mkdir");
    git_in(&sub, &["init", "-q"]);
    write(&sub.join("lib.txt"), "lib\n");
    git_in(&sub, &["add", "-A"]);
    git_in(&sub, &["commit", "-q", "-m", "lib"]);
    let r = repo(t.path());
    git_in(
        &r,
        &[
            "submodule",
            "add",
            "-q",
            sub.to_str().expect("utf8"),
            "vendor/lib",
        ],
    );
    git_in(&r, &["commit", "-q", "-m", "sub"]);
    write(&r.join("vendor/lib/scratch.txt"), "untracked in sub\n");
    let ws = select(&r, &Options::default()).expect("select");
    assert_eq!(
        names(&ws),
        [
            ".gitignore",
            ".gitmodules",
            "a.txt",
            "bin/run.sh",
            "link",
            "vendor/lib/lib.txt"
        ]
    );
    assert!(ws.plan.entries.iter().any(|e| e.name == "vendor/lib/.git"));
    assert!(
        ws.plan
            .entries
            .iter()
            .any(|e| e.name.starts_with(".git/modules/vendor/lib/"))
    );
    let dest = t.path().join("guest/proj");
    assert_eq!(unpack_and_status(&ws, &dest), "");
    assert_eq!(git_in(&dest.join("vendor/lib"), &["status", "--short"]), "");
}

#[test]
fn branch_copies_that_branch_and_checks_it_out_clean() {
    let t = tempfile::tempdir().expect("tmp");
    let r = repo(t.path());
    git_in(&r, &["checkout", "-q", "-b", "feature"]);
    write(&r.join("feature.txt"), "feature\n");
    std::fs::remove_file(r.join("a.txt")).expect("rm");
    git_in(&r, &["add", "-A", "feature.txt", "a.txt"]);
    git_in(&r, &["commit", "-q", "-m", "feature"]);
    git_in(&r, &["checkout", "-q", "main"]);
    write(&r.join("a.txt"), "dirty on main\n");

    let opts = Options {
        include_untracked: false,
        rev: Some(Rev::Branch("feature".into())),
    };
    let ws = select(&r, &opts).expect("select");
    assert_eq!(
        names(&ws),
        [".gitignore", "bin/run.sh", "feature.txt", "link"]
    );
    let dest = t.path().join("guest/proj");
    assert_eq!(unpack_and_status(&ws, &dest), "");
    assert_eq!(
        git_in(&dest, &["rev-parse", "--abbrev-ref", "HEAD"]).trim(),
        "feature"
    );
    let run = std::fs::metadata(dest.join("bin/run.sh")).expect("meta");
    assert_eq!(run.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(dest.join("link")).expect("link"),
        PathBuf::from("a.txt")
    );
    // The host checkout is untouched.
    assert_eq!(
        git_in(&r, &["status", "--short"]),
        " M a.txt\n?? untracked.txt\n"
    );

    let missing = Options {
        include_untracked: false,
        rev: Some(Rev::Branch("nope".into())),
    };
    let err = select(&r, &missing).expect_err("no such branch");
    assert!(err.to_string().contains("--from"), "{err}");
}

#[test]
fn from_commit_is_detached_and_clean() {
    let t = tempfile::tempdir().expect("tmp");
    let r = repo(t.path());
    let first = git_in(&r, &["rev-parse", "HEAD"]).trim().to_string();
    write(&r.join("later.txt"), "later\n");
    git_in(&r, &["add", "later.txt"]);
    git_in(&r, &["commit", "-q", "-m", "two"]);
    let opts = Options {
        include_untracked: false,
        rev: Some(Rev::Commit("HEAD~1".into())),
    };
    let ws = select(&r, &opts).expect("select");
    assert!(!ws.files.iter().any(|f| f == "later.txt"));
    let dest = t.path().join("guest/proj");
    assert_eq!(unpack_and_status(&ws, &dest), "");
    assert_eq!(git_in(&dest, &["rev-parse", "HEAD"]).trim(), first);
}

#[test]
fn not_a_repository_is_a_clear_error() {
    let t = tempfile::tempdir().expect("tmp");
    let err = select(t.path(), &Options::default()).expect_err("not a repo");
    assert!(
        err.to_string().contains("not inside a git repository"),
        "{err}"
    );
}
