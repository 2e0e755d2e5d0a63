use super::*;
use banger_ext4::find_tool;
use std::process::Command as StdCommand;

fn tool(name: &str, args: &[&str], path: &Path) -> String {
    let bin =
        find_tool(name).unwrap_or_else(|| panic!("{name} missing: apt-get install e2fsprogs"));
    let out = StdCommand::new(bin)
        .args(args)
        .arg(path)
        .output()
        .expect("run tool");
    assert!(
        out.status.success(),
        "{name} {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A work seed holding `/hello` (and `len` bytes of incompressible data in
/// `/blob` when asked), made the way the image build makes it.
fn make_seed(dir: &Path, blob_len: usize) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).expect("tree");
    std::fs::write(tree.join("hello"), "from the seed\n").expect("hello");
    if blob_len > 0 {
        let blob: Vec<u8> = (0..blob_len).map(|_| rand_byte()).collect();
        std::fs::write(tree.join("blob"), blob).expect("blob");
    }
    let seed = dir.join("seed.ext4");
    std::fs::File::create(&seed)
        .and_then(|f| f.set_len(MIN_DISK_BYTES))
        .expect("seed file");
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-d",
            &tree.to_string_lossy(),
        ],
        &seed,
    );
    seed
}

fn rand_byte() -> u8 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut x = STATE.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x >> 24) as u8
}

#[tokio::test]
async fn overlay_disk_is_an_empty_sparse_ext4_owned_by_root() {
    let t = tempfile::tempdir().expect("tempdir");
    let disks = VmDisks::in_dir(t.path());
    create_overlay_disk(&disks.overlay, 1 << 30)
        .await
        .expect("overlay");
    let u = disk_usage(&disks.overlay);
    assert_eq!(u.virtual_bytes, 1 << 30);
    assert!(u.allocated_bytes < 64 << 20, "not sparse: {u:?}");
    tool("e2fsck", &["-f", "-n"], &disks.overlay);
    let stat = tool("debugfs", &["-R", "stat /"], &disks.overlay);
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    assert_eq!(host_mode(&disks.overlay), 0o600, "whatever the umask");
    // A second create on the same path fails and keeps the first.
    let e = create_overlay_disk(&disks.overlay, 1 << 30)
        .await
        .expect_err("exists");
    assert!(matches!(e, StorageError::Io { .. }), "{e}");
    assert!(disks.overlay.is_file());
}

#[tokio::test]
async fn work_disk_clones_the_seed_and_grows_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 0);
    let disks = VmDisks::in_dir(t.path());
    create_work_disk(WorkSource::Seed(&seed), &disks.work, 256 << 20)
        .await
        .expect("work disk");
    let u = disk_usage(&disks.work);
    assert_eq!(u.virtual_bytes, 256 << 20);
    assert!(u.allocated_bytes < 64 << 20, "not sparse: {u:?}");
    tool("e2fsck", &["-f", "-n"], &disks.work);
    assert_eq!(
        tool("debugfs", &["-R", "cat /hello"], &disks.work),
        "from the seed\n"
    );
    let stats = tool("dumpe2fs", &["-h"], &disks.work);
    let blocks: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block count");
    let block_size: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block size");
    assert_eq!(blocks * block_size, 256 << 20, "file system not grown");
    // The seed is untouched.
    assert_eq!(disk_usage(&seed).virtual_bytes, MIN_DISK_BYTES);
    assert_eq!(host_mode(&disks.work), 0o600, "whatever the umask");
}

/// The permission bits of a host file.
fn host_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[tokio::test]
async fn grow_is_grow_only() {
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 0);
    let work = t.path().join(WORK_DISK);
    create_work_disk(WorkSource::Seed(&seed), &work, 128 << 20)
        .await
        .expect("work disk");
    let e = grow_disk(&work, 100 << 20).await.expect_err("shrink");
    assert!(matches!(e, StorageError::Shrink { .. }), "{e}");
    assert_eq!(grow_disk(&work, 128 << 20).await.expect("same"), 128 << 20);
    assert_eq!(grow_disk(&work, 300 << 20).await.expect("grow"), 300 << 20);
    assert_eq!(disk_usage(&work).virtual_bytes, 300 << 20);
    tool("e2fsck", &["-f", "-n"], &work);
    assert_eq!(
        tool("debugfs", &["-R", "cat /hello"], &work),
        "from the seed\n"
    );
}

#[tokio::test]
async fn a_disk_mounted_since_its_last_check_is_checked_before_growing() {
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 0);
    let work = t.path().join(WORK_DISK);
    create_work_disk(WorkSource::Seed(&seed), &work, 128 << 20)
        .await
        .expect("work disk");
    // As a VM leaves it: mounted after the last check.
    tool("debugfs", &["-w", "-R", "ssv mtime 20300101000000"], &work);
    let plain = std::process::Command::new("resize2fs")
        .arg(&work)
        .arg("200M")
        .output()
        .expect("resize2fs");
    assert!(
        !plain.status.success() && String::from_utf8_lossy(&plain.stderr).contains("e2fsck"),
        "resize2fs did not ask for a check: {plain:?}"
    );
    assert_eq!(grow_disk(&work, 256 << 20).await.expect("grow"), 256 << 20);
    tool("e2fsck", &["-f", "-n"], &work);
    let stats = tool("dumpe2fs", &["-h"], &work);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    assert_eq!(field("Block count:") * field("Block size:"), 256 << 20);
}

#[tokio::test]
async fn empty_work_disk_is_private_to_root() {
    let t = tempfile::tempdir().expect("tempdir");
    let work = t.path().join(WORK_DISK);
    create_work_disk(WorkSource::Empty, &work, MIN_DISK_BYTES)
        .await
        .expect("work disk");
    let stat = tool("debugfs", &["-R", "stat /"], &work);
    assert!(stat.contains("Mode:  0700"), "{stat}");
}

#[tokio::test]
async fn bad_requests_leave_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let work = t.path().join(WORK_DISK);
    let e = create_work_disk(WorkSource::Seed(&t.path().join("nope")), &work, 1 << 30)
        .await
        .expect_err("missing seed");
    assert!(matches!(e, StorageError::MissingSource { .. }), "{e}");
    assert!(e.to_string().contains("re-pull"), "{e}");
    let e = create_overlay_disk(&work, 1 << 20).await.expect_err("tiny");
    assert!(matches!(e, StorageError::TooSmall { .. }), "{e}");
    assert!(!work.exists());
}

/// Cloning onto a full file system fails with a clear error and removes
/// the partial copy. Needs root for the small tmpfs that plays the full
/// host disk.
#[tokio::test]
async fn full_host_disk_during_clone_is_clear_and_leaves_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 24 << 20);
    let small = t.path().join("small");
    std::fs::create_dir(&small).expect("mnt");
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m"),
    )
    .expect("mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(&small);
    let work = small.join(WORK_DISK);
    let e = create_work_disk(WorkSource::Seed(&seed), &work, 1 << 30)
        .await
        .expect_err("disk full");
    assert!(matches!(e, StorageError::NoSpace { .. }), "{e:?}");
    assert!(e.to_string().contains("no space left"), "{e}");
    assert!(!work.exists(), "partial work disk left behind");
    assert_eq!(std::fs::read_dir(&small).expect("ls").count(), 0);
}

#[tokio::test]
async fn files_are_written_into_the_disk_as_root_with_their_modes() {
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 0);
    let work = t.path().join(WORK_DISK);
    create_work_disk(WorkSource::Seed(&seed), &work, MIN_DISK_BYTES)
        .await
        .expect("work disk");
    let key = GuestFile {
        path: "/.ssh/authorized_keys".into(),
        content: b"ssh-ed25519 AAAA test\n".to_vec(),
        mode: 0o600,
        dir_mode: 0o700,
    };
    let replaced = GuestFile {
        path: "/hello".into(),
        content: b"replaced\n".to_vec(),
        mode: 0o644,
        dir_mode: 0o755,
    };
    write_files(&work, &[key, replaced]).await.expect("inject");
    assert_eq!(
        tool("debugfs", &["-R", "cat /.ssh/authorized_keys"], &work),
        "ssh-ed25519 AAAA test\n"
    );
    assert_eq!(tool("debugfs", &["-R", "cat /hello"], &work), "replaced\n");
    let stat = tool("debugfs", &["-R", "stat /.ssh/authorized_keys"], &work);
    assert!(
        stat.contains("Mode:  0600") && stat.contains("User:     0"),
        "{stat}"
    );
    let stat = tool("debugfs", &["-R", "stat /.ssh"], &work);
    assert!(
        stat.contains("Mode:  0700") && stat.contains("directory"),
        "{stat}"
    );
    tool("e2fsck", &["-f", "-n"], &work);
    // No scratch files left next to the disk.
    let names: Vec<_> = std::fs::read_dir(t.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".inject"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let bad = GuestFile {
        path: "/../etc/x".into(),
        content: vec![],
        mode: 0o600,
        dir_mode: 0o700,
    };
    assert!(write_files(&work, &[bad]).await.is_err());
}

#[tokio::test]
async fn entries_copy_host_files_and_directories_with_modes() {
    let t = tempfile::tempdir().expect("tempdir");
    let seed = make_seed(t.path(), 0);
    let work = t.path().join(WORK_DISK);
    create_work_disk(WorkSource::Seed(&seed), &work, MIN_DISK_BYTES)
        .await
        .expect("work disk");
    let host = t.path().join("host");
    std::fs::create_dir_all(&host).expect("mkdir");
    std::fs::write(host.join("a b"), b"spaced\n").expect("write");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(host.join("big"), &big).expect("write");
    std::os::unix::fs::symlink(host.join("big"), host.join("link")).expect("symlink");
    let entries = vec![
        GuestEntry {
            path: "/.aws".into(),
            kind: EntryKind::Dir,
            mode: 0o700,
        },
        GuestEntry {
            path: "/.aws/cred file".into(),
            kind: EntryKind::HostFile(host.join("a b")),
            mode: 0o600,
        },
        GuestEntry {
            path: "/deep/er/big".into(),
            kind: EntryKind::HostFile(host.join("big")),
            mode: 0o755,
        },
        GuestEntry {
            path: "/hello".into(),
            kind: EntryKind::HostFile(host.join("a b")),
            mode: 0o640,
        },
    ];
    write_entries(&work, &entries).await.expect("write entries");
    assert_eq!(
        tool("debugfs", &["-R", "cat \"/.aws/cred file\""], &work),
        "spaced\n"
    );
    assert_eq!(tool("debugfs", &["-R", "cat /hello"], &work), "spaced\n");
    for (path, mode) in [
        ("/.aws", "0700"),
        ("\"/.aws/cred file\"", "0600"),
        ("/deep/er/big", "0755"),
        ("/deep", "0755"),
        ("/hello", "0640"),
    ] {
        let stat = tool("debugfs", &["-R", &format!("stat {path}")], &work);
        assert!(
            stat.contains(&format!("Mode:  {mode}")) && stat.contains("User:     0"),
            "{path}: {stat}"
        );
    }
    let dumped = t.path().join("dumped");
    tool(
        "debugfs",
        &["-R", &format!("dump /deep/er/big {}", dumped.display())],
        &work,
    );
    assert_eq!(std::fs::read(&dumped).expect("dumped"), big);
    tool("e2fsck", &["-f", "-n"], &work);

    // A symlink given as a file is refused, not followed.
    let link = [GuestEntry {
        path: "/link".into(),
        kind: EntryKind::HostFile(host.join("link")),
        mode: 0o600,
    }];
    assert!(write_entries(&work, &link).await.is_err());
    // A file where a directory is fails loudly.
    let clash = [GuestEntry {
        path: "/.aws".into(),
        kind: EntryKind::HostFile(host.join("a b")),
        mode: 0o600,
    }];
    let e = write_entries(&work, &clash).await.expect_err("clash");
    assert!(e.to_string().contains("did not take"), "{e}");
    let names: Vec<_> = std::fs::read_dir(t.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".inject"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

/// A file of `len` bytes with data only at `chunks` (offset, byte).
fn holey_file(path: &Path, len: u64, chunks: &[(u64, u8)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(len).expect("len");
    for &(off, b) in chunks {
        f.write_all_at(&[b; 4096], off).expect("write");
    }
}

fn allocated(path: &Path) -> u64 {
    disk_usage(path).allocated_bytes
}

#[test]
fn clone_keeps_holes_contents_and_is_private() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    let len = 256 << 20;
    holey_file(&src, len, &[(0, 1), (100 << 20, 2), (len - 4096, 3)]);
    let dst = t.path().join("dst");
    let kind = clone_file(&src, &dst).expect("clone");
    // ext4 and tmpfs share no extents: the sparse copy it is. On a
    // reflink file system the data is shared instead; both keep holes.
    if !reflink_supported(t.path()) {
        assert_eq!(kind, CloneKind::Sparse);
    }
    assert_eq!(
        std::fs::read(&dst).expect("dst"),
        std::fs::read(&src).expect("src")
    );
    assert_eq!(disk_usage(&dst).virtual_bytes, len);
    assert!(
        allocated(&dst) <= 1 << 20,
        "holes filled: {}",
        allocated(&dst)
    );
    assert_eq!(host_mode(&dst), 0o600);
}

/// A clone is whole before its sync (the VMM may open it at once); the
/// sync reports the same kind.
#[test]
fn an_unsynced_clone_is_whole_and_syncs_later() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    holey_file(&src, 8 << 20, &[(0, 4), (6 << 20, 5)]);
    let dst = t.path().join("dst");
    let clone = clone_file_unsynced(&src, &dst).expect("clone");
    assert_eq!(
        std::fs::read(&dst).expect("dst"),
        std::fs::read(&src).expect("src")
    );
    let kind = clone.kind();
    assert_eq!(clone.sync().expect("sync"), kind);
    assert_eq!(host_mode(&dst), 0o600);
}

/// A reserved clone is its source's length, all hole, at once (a VMM
/// may open it then); filling the same file makes it the source's copy.
#[test]
fn a_reserved_clone_is_sized_first_and_filled_in_place() {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    holey_file(&src, 8 << 20, &[(0, 4), (6 << 20, 5)]);
    let dst = t.path().join("dst");
    let reserved = reserve_clone(&src, &dst).expect("reserve");
    let opened = std::fs::File::open(&dst).expect("open as a VMM would");
    let meta = opened.metadata().expect("stat");
    assert_eq!(meta.len(), 8 << 20);
    assert_eq!(meta.blocks(), 0, "nothing allocated yet");
    assert_eq!(host_mode(&dst), 0o600);
    let clone = reserved.fill().expect("fill");
    let mut seen = Vec::new();
    std::io::Read::read_to_end(&mut &opened, &mut seen).expect("read");
    assert_eq!(
        seen,
        std::fs::read(&src).expect("src"),
        "the opened file holds the copy"
    );
    clone.sync().expect("sync");
    let e = reserve_clone(&src, &dst).expect_err("exists");
    assert!(
        matches!(&e, StorageError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e:?}"
    );
    let e = reserve_clone(&t.path().join("nothing"), &t.path().join("new")).expect_err("no source");
    assert!(matches!(e, StorageError::MissingSource { .. }), "{e:?}");
    assert!(!t.path().join("new").exists());
}

#[test]
fn clone_refuses_an_existing_destination_and_keeps_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    holey_file(&src, 1 << 20, &[(0, 7)]);
    let dst = t.path().join("dst");
    std::fs::write(&dst, "someone else's").expect("dst");
    let e = clone_file(&src, &dst).expect_err("exists");
    assert!(
        matches!(&e, StorageError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e:?}"
    );
    assert_eq!(std::fs::read(&dst).expect("dst"), b"someone else's");
}

#[test]
fn clone_of_a_missing_source_leaves_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let dst = t.path().join("dst");
    let e = clone_file(&t.path().join("nope"), &dst).expect_err("missing");
    assert!(matches!(e, StorageError::MissingSource { .. }), "{e:?}");
    assert!(!dst.exists());
}

/// A small tmpfs mounted under `dir` for the test's lifetime (needs root).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounting a small tmpfs needs root");
            return None;
        }
        let at = dir.join("small");
        std::fs::create_dir(&at).expect("mnt");
        nix::mount::mount(
            Some("tmpfs"),
            &at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(size),
        )
        .expect("mount tmpfs");
        Some(Self(at))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Source and destination on different file systems: FICLONE says EXDEV
/// and the copy takes over.
#[test]
fn clone_across_file_systems_falls_back_to_a_sparse_copy() {
    let t = tempfile::tempdir().expect("tempdir");
    let Some(fs) = SmallFs::mount(t.path(), "size=64m") else {
        return;
    };
    let src = t.path().join("src");
    holey_file(&src, 32 << 20, &[(1 << 20, 9)]);
    let dst = fs.0.join("dst");
    assert_eq!(clone_file(&src, &dst).expect("clone"), CloneKind::Sparse);
    assert_eq!(
        std::fs::read(&dst).expect("dst"),
        std::fs::read(&src).expect("src")
    );
    assert!(allocated(&dst) <= 1 << 20);
    assert!(!reflink_supported(&fs.0), "tmpfs has no reflink");
    assert_eq!(
        std::fs::read_dir(&fs.0).expect("ls").count(),
        1,
        "probe files left"
    );
}

#[test]
fn clone_onto_a_full_file_system_is_no_space_and_leaves_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let Some(fs) = SmallFs::mount(t.path(), "size=8m") else {
        return;
    };
    let src = t.path().join("src");
    std::fs::write(&src, vec![5u8; 16 << 20]).expect("src");
    let dst = fs.0.join("dst");
    let e = clone_file(&src, &dst).expect_err("full");
    assert!(matches!(e, StorageError::NoSpace { .. }), "{e:?}");
    assert!(!dst.exists(), "partial clone left behind");
}
