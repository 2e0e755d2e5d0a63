//! Workspaces and `vm cp` against a real daemon and a real guest: what is
//! copied, that git is clean in the guest, and round trips through the
//! agent's archive channels.

use banger_e2e::{shared, text};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .env("GIT_AUTHOR_NAME", "e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@example.invalid")
        .env("GIT_COMMITTER_NAME", "e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@example.invalid")
        .output()
        .expect("spawn git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

/// A repository `proj` with tracked files (one executable, one symlink), a
/// branch `feature`, an untracked file and an ignored one.
fn repo(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix(&format!("banger-ws-{tag}-"))
        .tempdir()
        .expect("tmp");
    let r = t.path().join("proj");
    std::fs::create_dir_all(&r).expect("mkdir");
    git(&r, &["init", "-q"]);
    write(&r.join("README.md"), "hello\n");
    write(&r.join("bin/run.sh"), "#!/bin/sh\necho ran\n");
    std::fs::set_permissions(r.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::symlink("README.md", r.join("readme-link")).expect("symlink");
    write(&r.join(".gitignore"), "*.log\n");
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "one"]);
    git(&r, &["checkout", "-q", "-b", "feature"]);
    write(&r.join("feature.txt"), "from feature\n");
    git(&r, &["add", "feature.txt"]);
    git(&r, &["commit", "-q", "-m", "feature"]);
    git(&r, &["checkout", "-q", "main"]);
    write(&r.join("untracked.txt"), "untracked\n");
    write(&r.join("debug.log"), "ignored\n");
    (t, r)
}

const TRACKED: [&str; 4] = [".gitignore", "README.md", "bin/run.sh", "readme-link"];

#[test]
fn dry_run_lists_exactly_the_tracked_files_and_creates_nothing() {
    let b = shared();
    let (_t, r) = repo("dry");
    let before = b.vm_dirs();
    let out = b.run(&["vm", "run", "--dry-run", r.to_str().expect("utf8")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), TRACKED, "{stderr}");
    let out = b.run(&[
        "vm",
        "run",
        "--dry-run",
        "--include-untracked",
        r.to_str().expect("utf8"),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.lines().any(|l| l == "untracked.txt"), "{stdout}");
    assert!(!stdout.contains("debug.log"), "{stdout}");
    assert_eq!(b.vm_dirs(), before, "dry run created something");
}

#[test]
fn run_copies_the_tracked_files_with_a_clean_git_and_propagates_status() {
    let b = shared();
    let (_t, r) = repo("run");
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "e2e-ws-run",
        r.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        "pwd; ls -a; ./bin/run.sh; readlink readme-link; echo status:; git status --short; exit 7",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout={stdout} stderr={stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "/root/proj", "{stdout}");
    for f in [".git", ".gitignore", "README.md", "bin", "readme-link"] {
        assert!(lines.contains(&f), "{f} missing: {stdout}");
    }
    assert!(!lines.contains(&"untracked.txt"), "{stdout}");
    assert!(!lines.contains(&"debug.log"), "{stdout}");
    assert!(lines.contains(&"ran"), "{stdout}");
    assert!(lines.contains(&"README.md"), "{stdout}");
    assert_eq!(
        lines.last(),
        Some(&"status:"),
        "git status not clean: {stdout}"
    );
}

#[test]
fn include_untracked_adds_the_untracked_file_never_the_ignored_one() {
    let b = shared();
    let (_t, r) = repo("untracked");
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "e2e-ws-untracked",
        "--include-untracked",
        r.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        "ls -a; echo status:; git status --short",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout={stdout} stderr={stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"untracked.txt"), "{stdout}");
    assert!(!lines.contains(&"debug.log"), "{stdout}");
    let status: Vec<&str> = stdout
        .split("status:\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .collect();
    assert_eq!(status, ["?? untracked.txt"], "{stdout}");
}

#[test]
fn branch_copies_the_other_branch_checked_out_clean() {
    let b = shared();
    let (_t, r) = repo("branch");
    let out = b.run(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "e2e-ws-branch",
        "--branch",
        "feature",
        r.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        "cat feature.txt; git rev-parse --abbrev-ref HEAD; echo status:; git status --short",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout={stdout} stderr={stderr}");
    assert_eq!(stdout, "from feature\nfeature\nstatus:\n", "{stderr}");
}

/// Size of the sparse disk image `vm cp` copies both ways.
const SPARSE_SIZE: u64 = 256 << 20;

fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

fn sha256_file(p: &std::path::Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).expect("open");
    std::io::copy(&mut f, &mut h).expect("hash");
    format!("{:x}", h.finalize())
}

#[test]
fn cp_round_trip_keeps_modes_and_inner_symlinks_and_skips_outside_ones() {
    let b = shared();
    let t = tempfile::Builder::new()
        .prefix("banger-cp-")
        .tempdir()
        .expect("tmp");
    let src = t.path().join("tree");
    write(&src.join("sub/data.bin"), &"x".repeat(300_000));
    write(&src.join("tool.sh"), "#!/bin/sh\n");
    std::fs::set_permissions(src.join("tool.sh"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    std::os::unix::fs::symlink("sub/data.bin", src.join("inner")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", src.join("outside")).expect("symlink");
    // A disk image: 256 MiB, 3 MiB of it data.
    let disk = src.join("disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&disk).expect("create");
        f.set_len(SPARSE_SIZE).expect("set_len");
        for (i, at) in [0u64, 100 << 20, (256 << 20) - (1 << 20)]
            .iter()
            .enumerate()
        {
            f.write_all_at(&vec![i as u8 + 1; 1 << 20], *at)
                .expect("write");
        }
    }
    assert!(allocated(&disk) < 8 << 20, "not sparse on this host");

    let run = b.run(&["vm", "run", "--name", "e2e-cp", "--", "true"]);
    assert!(run.status.success(), "{}", text(&run).1);

    let push = b.run(&["vm", "cp", src.to_str().expect("utf8"), "e2e-cp:/root/"]);
    let (_, stderr) = text(&push);
    assert!(push.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("outside"),
        "no warning for the outside symlink: {stderr}"
    );

    let check = b.run(&[
        "vm",
        "exec",
        "e2e-cp",
        "--",
        "sh",
        "-c",
        "cd /root/tree && stat -c '%n %a' tool.sh sub && readlink inner && test ! -e outside && wc -c < sub/data.bin \
         && stat -c '%s %b %B' disk.img && sha256sum < disk.img && install -m 6755 /dev/null suid",
    ]);
    let (stdout, stderr) = text(&check);
    assert!(check.status.success(), "{stdout} {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..4].join("\n"),
        "tool.sh 750\nsub 700\nsub/data.bin\n300000"
    );
    // The disk image arrived whole and sparse.
    let sizes: Vec<u64> = lines[4]
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    assert_eq!(sizes[0], SPARSE_SIZE, "{stdout}");
    assert!(
        sizes[1] * sizes[2] < 8 << 20,
        "disk.img takes {} bytes in the guest: {stdout}",
        sizes[1] * sizes[2]
    );
    assert_eq!(
        lines[5].split_whitespace().next(),
        Some(sha256_file(&disk).as_str())
    );

    let back = t.path().join("back");
    let pull = b.run(&["vm", "cp", "e2e-cp:tree", back.to_str().expect("utf8")]);
    assert!(pull.status.success(), "{}", text(&pull).1);
    assert_eq!(
        std::fs::read(back.join("sub/data.bin")).expect("read"),
        std::fs::read(src.join("sub/data.bin")).expect("read")
    );
    // And came back sparse.
    let disk_back = back.join("disk.img");
    assert_eq!(
        std::fs::metadata(&disk_back).expect("stat").len(),
        SPARSE_SIZE
    );
    assert!(
        allocated(&disk_back) < 8 << 20,
        "disk.img takes {} bytes back on the host",
        allocated(&disk_back)
    );
    assert_eq!(sha256_file(&disk_back), sha256_file(&disk));
    let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(back.join("tool.sh")), 0o750);
    assert_eq!(mode(back.join("sub")), 0o700);
    assert_eq!(
        std::fs::read_link(back.join("inner")).expect("link"),
        PathBuf::from("sub/data.bin")
    );
    assert!(!back.join("outside").exists());
    // The guest's setuid/setgid bits are not carried onto the host.
    let full = std::fs::metadata(back.join("suid"))
        .expect("meta")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(full, 0o755);

    let del = b.run(&["vm", "delete", "e2e-cp"]);
    assert!(del.status.success(), "{}", text(&del).1);
}
