use super::*;

/// One entry of a `newc` archive, as the kernel would read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    mode: u32,
    ino: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// Reads a `newc` archive up to its trailer; checks every header's magic
/// and alignment. Returns the entries and the bytes after the trailer.
fn read_cpio(mut b: &[u8]) -> (Vec<Entry>, usize) {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        assert_eq!((total - b.len()) % 4, 0, "header not aligned");
        assert_eq!(&b[..6], NEWC_MAGIC, "bad magic");
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).expect("hex"),
                16,
            )
            .expect("hex")
        };
        let (ino, mode, size, maj, min, namesize) =
            (field(0), field(1), field(6), field(9), field(10), field(11));
        let name_end = 110 + namesize as usize;
        let name = std::str::from_utf8(&b[110..name_end - 1])
            .expect("name")
            .to_string();
        assert_eq!(b[name_end - 1], 0);
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + size as usize;
        let data = b[data_start..data_end].to_vec();
        b = &b[data_end.div_ceil(4) * 4..];
        if name == "TRAILER!!!" {
            return (out, total - b.len());
        }
        out.push(Entry {
            name,
            mode,
            ino,
            rdev: (maj, min),
            data,
        });
    }
}

const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crc32c_generic.ko.gz:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/sound/unrelated.ko:
";
const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

fn names(p: &ModulePlan) -> Vec<&str> {
    p.modules.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn module_names_follow_the_kernel() {
    assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko"), "overlay");
    assert_eq!(
        module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
        "virtio_rng"
    );
    assert_eq!(module_name("virtio_blk.ko.zst"), "virtio_blk");
}

#[test]
fn plan_orders_dependencies_first_and_skips_built_ins() {
    let p = plan_modules("6.1.0-x", "test", DEP, BUILTIN, "").expect("plan");
    assert_eq!(
        names(&p),
        [
            "virtio_ring",
            "virtio",
            "virtio_mmio",
            "virtio_blk",
            "overlay",
            "failover",
            "net_failover",
            "virtio_net",
            "virtio_console",
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
            "virtio_rng",
        ]
    );
    assert_eq!(p.builtin, ["ext4"]);
    assert!(p.skipped.is_empty());
    let by = |m: &str| {
        p.modules
            .iter()
            .find(|x| x.name == m)
            .expect(m)
            .wanted_by
            .clone()
    };
    // Shared dependencies are loaded for every module that needs them.
    assert_eq!(
        by("virtio"),
        [
            "virtio_mmio",
            "virtio_blk",
            "virtio_net",
            "virtio_console",
            "vmw_vsock_virtio_transport",
            "virtio_rng"
        ]
    );
    assert_eq!(by("vsock"), ["vsock", "vmw_vsock_virtio_transport"]);
    assert_eq!(by("failover"), ["virtio_net"]);
    assert_eq!(by("overlay"), ["overlay"]);
    // Every module comes after everything modules.dep says it needs.
    for (i, m) in p.modules.iter().enumerate() {
        let line = DEP
            .lines()
            .find(|l| l.starts_with(&format!("{}:", m.path)))
            .expect("line");
        for d in line.split_once(':').expect(":").1.split_whitespace() {
            let j = p
                .modules
                .iter()
                .position(|x| x.path == d)
                .expect("dependency planned");
            assert!(j < i, "{} before its dependency {d}", m.name);
        }
    }
}

#[test]
fn plan_takes_pre_soft_dependencies_and_module_ext4() {
    let dep = format!(
        "{DEP}kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\nkernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\n"
    );
    let softdep = "# comment\nsoftdep ext4 pre: crc32c-generic missing_one post: nothing\n";
    let p = plan_modules("r", "test", &dep, "", softdep).expect("plan");
    let n = names(&p);
    let at = |m: &str| n.iter().position(|x| *x == m).expect(m);
    assert!(at("crc32c_generic") < at("ext4"), "{n:?}");
    assert!(
        at("jbd2") < at("ext4") && at("mbcache") < at("ext4"),
        "{n:?}"
    );
    assert!(
        !n.contains(&"nothing") && !n.contains(&"missing_one"),
        "{n:?}"
    );
    assert!(p.builtin.is_empty());
}

#[test]
fn plan_names_every_missing_module_and_tolerates_optional_ones() {
    let dep: String = DEP
        .lines()
        .filter(|l| !l.contains("virtio_blk") && !l.contains("overlay") && !l.contains("rng"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = plan_modules("6.1.0-x", "/lib/modules/6.1.0-x in img", &dep, BUILTIN, "")
        .expect_err("missing");
    assert_eq!(
        e.to_string(),
        "kernel 6.1.0-x: /lib/modules/6.1.0-x in img lacks the modules virtio_blk, overlay (neither in modules.dep nor built in)"
    );
    let dep: String = DEP
        .lines()
        .filter(|l| !l.contains("rng"))
        .map(|l| format!("{l}\n"))
        .collect();
    let p = plan_modules("r", "t", &dep, BUILTIN, "").expect("plan");
    assert_eq!(p.skipped, ["virtio_rng"]);
}

#[test]
fn everything_built_in_plans_nothing() {
    let builtin: String = WANTED_MODULES
        .iter()
        .chain(OPTIONAL_MODULES)
        .map(|m| format!("kernel/x/{m}.ko\n"))
        .collect();
    let p = plan_modules("r", "t", "", &builtin, "").expect("plan");
    assert!(p.modules.is_empty());
    assert_eq!(
        p.builtin.len(),
        WANTED_MODULES.len() + OPTIONAL_MODULES.len()
    );
}

#[test]
fn circular_dependencies_are_refused() {
    let mut dep: String = DEP
        .lines()
        .filter(|l| !l.starts_with("kernel/fs/overlayfs/"))
        .map(|l| format!("{l}\n"))
        .collect();
    dep.push_str("kernel/fs/overlayfs/overlay.ko: kernel/a.ko\nkernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n");
    let e = plan_modules("r", "t", &dep, BUILTIN, "").expect_err("cycle");
    assert!(e.to_string().contains("circle"), "{e}");
}

/// A module tree for every module of [`DEP`]: `<name>.ko` holds
/// `ELF:<name>`; virtio_blk is xz-compressed and crc32c gzip-compressed.
fn module_tree(dir: &Path) {
    for line in DEP.lines() {
        let path = line.split_once(':').expect(":").0;
        let body = format!("\x7fELF:{}", module_name(path)).into_bytes();
        let data = if path.ends_with(".xz") {
            let mut w =
                lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1))
                    .expect("xz");
            w.write_all(&body).expect("xz");
            w.finish().expect("xz")
        } else if path.ends_with(".gz") {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(&body).expect("gz");
            w.finish().expect("gz")
        } else {
            body
        };
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("module");
    }
    std::fs::write(dir.join("modules.dep"), DEP).expect("dep");
    std::fs::write(dir.join("modules.builtin"), BUILTIN).expect("builtin");
}

fn check_modules_cpio(bytes: &[u8]) {
    let (entries, used) = read_cpio(bytes);
    assert_eq!(used, bytes.len(), "bytes after the trailer");
    let find = |n: &str| entries.iter().find(|e| e.name == n);
    let console = find("dev/console").expect("console");
    assert_eq!((console.mode, console.rdev), (0o020600, (5, 1)));
    for d in ["banger/modules", "dev", "proc", "sys", "run"] {
        assert_eq!(find(d).expect(d).mode, 0o040755, "{d}");
    }
    let list =
        String::from_utf8(find("banger/modules.list").expect("list").data.clone()).expect("utf8");
    let entries_listed = ModuleEntry::parse_list(&list);
    let listed: Vec<&str> = entries_listed.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(listed.first(), Some(&"virtio_ring.ko"));
    assert_eq!(listed.len(), 13, "{list}");
    assert!(list.contains("\nvirtio_net.ko virtio_net\n"), "{list}");
    for f in &listed {
        let e = find(&format!("banger/modules/{f}")).expect(f);
        assert_eq!(e.mode, 0o100644);
        // Decompressed on the host.
        assert_eq!(
            e.data,
            format!("\x7fELF:{}", f.trim_end_matches(".ko")).into_bytes()
        );
    }
    let inos: HashSet<u32> = entries.iter().map(|e| e.ino).collect();
    assert_eq!(inos.len(), entries.len(), "inode numbers repeat");
}

#[test]
fn modules_cpio_from_a_directory_and_assembled_with_the_agent() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("lib/modules/6.1.0-x");
    module_tree(&dir);
    let out = t.path().join(MODULES_CPIO_FILE);
    let m = build_modules_cpio(&DirSource { dir }, "6.1.0-x", &out).expect("build");
    assert_eq!(m.builtin, ["ext4"]);
    assert_eq!(m.modules.len(), 13);
    assert!(m.modules.contains(&"virtio_blk".to_string()));
    let bytes = std::fs::read(&out).expect("read");
    check_modules_cpio(&bytes);

    let agent = t.path().join("agent");
    std::fs::write(&agent, b"\x7fELF static agent").expect("agent");
    let initrd = t.path().join("initrd.img");
    assemble(&agent, &out, &initrd).expect("assemble");
    let all = std::fs::read(&initrd).expect("read");
    let (entries, used) = read_cpio(&all);
    assert_eq!(used, all.len());
    assert_eq!(entries[0].name, "init");
    assert_eq!(entries[0].mode, 0o100755);
    assert_eq!(entries[0].data, b"\x7fELF static agent");
    // The rest is the modules part, unchanged.
    assert_eq!(&all[all.len() - bytes.len()..], bytes.as_slice());
    let inos: HashSet<u32> = entries.iter().map(|e| e.ino).collect();
    assert_eq!(inos.len(), entries.len(), "inode numbers repeat");

    std::fs::write(&out, b"not cpio").expect("w");
    assert!(assemble(&agent, &out, &initrd).is_err());
}

#[test]
fn modules_cpio_from_an_ext4_image() {
    let (Some(mkfs), Some(_)) = (
        banger_ext4::find_tool("mkfs.ext4"),
        banger_ext4::find_tool("debugfs"),
    ) else {
        panic!("mkfs.ext4 and debugfs are needed (apt-get install e2fsprogs)");
    };
    let t = tempfile::tempdir().expect("tmp");
    // A merged-/usr tree: /lib is a link into /usr/lib, as in Debian.
    let tree = t.path().join("tree");
    module_tree(&tree.join("usr/lib/modules/6.1.0-x"));
    std::os::unix::fs::symlink("usr/lib", tree.join("lib")).expect("link");
    let image = t.path().join("rootfs.ext4");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let st = std::process::Command::new(mkfs)
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .status()
        .expect("mkfs");
    assert!(st.success());

    let out = t.path().join("from-ext4.cpio");
    let src = Ext4Source::new(&image, "6.1.0-x").expect("source");
    build_modules_cpio(&src, "6.1.0-x", &out).expect("build");
    let from_ext4 = std::fs::read(&out).expect("read");
    check_modules_cpio(&from_ext4);
    let out2 = t.path().join("from-dir.cpio");
    let dir = DirSource {
        dir: tree.join("usr/lib/modules/6.1.0-x"),
    };
    build_modules_cpio(&dir, "6.1.0-x", &out2).expect("build");
    assert_eq!(from_ext4, std::fs::read(&out2).expect("read"));

    // No modules for another release: said, nothing written.
    let out3 = t.path().join("none.cpio");
    let src = Ext4Source::new(&image, "6.9.9-other").expect("source");
    let e = build_modules_cpio(&src, "6.9.9-other", &out3).expect_err("none");
    assert!(matches!(e, InitramfsError::NoModules { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("has no modules for kernel 6.9.9-other"),
        "{e}"
    );
    assert!(!out3.exists());
}

#[test]
fn a_module_file_missing_from_the_tree_is_named() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("m");
    module_tree(&dir);
    std::fs::remove_file(dir.join("kernel/fs/overlayfs/overlay.ko")).expect("rm");
    let out = t.path().join("x.cpio");
    let e = build_modules_cpio(&DirSource { dir }, "r", &out).expect_err("missing");
    assert!(
        e.to_string().contains(
            "module file kernel/fs/overlayfs/overlay.ko listed in modules.dep is missing"
        ),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn untrusted_paths_and_releases_are_refused() {
    for bad in [
        "../etc/shadow",
        "/etc/shadow",
        "kernel/../../x.ko",
        "a b.ko",
        "a\"b",
    ] {
        assert!(check_rel(bad).is_err(), "{bad}");
    }
    check_rel("kernel/drivers/char/hw_random/virtio-rng.ko.xz").expect("plain");
    for bad in ["..", "", "a/b", "6.1 x"] {
        assert!(check_release(bad).is_err(), "{bad:?}");
    }
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("m");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let dep = DEP.replace(
        "kernel/fs/overlayfs/overlay.ko:",
        "../../outside/overlay.ko:",
    );
    std::fs::write(dir.join("modules.dep"), dep).expect("dep");
    std::fs::write(dir.join("modules.builtin"), BUILTIN).expect("builtin");
    let e =
        build_modules_cpio(&DirSource { dir }, "r", &t.path().join("x")).expect_err("traversal");
    assert!(e.to_string().contains("not a plain relative path"), "{e}");
}

#[test]
fn compressed_modules_are_decompressed_and_unknown_ones_refused() {
    let mut w =
        lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).expect("xz");
    w.write_all(b"module").expect("xz");
    let xz = w.finish().expect("xz");
    assert_eq!(decompress_module("a.ko.xz", xz).expect("xz"), b"module");
    assert!(decompress_module("a.ko.xz", b"garbage".to_vec()).is_err());
    assert!(decompress_module("a.ko.bz2", b"x".to_vec()).is_err());
    assert_eq!(
        decompress_module("a.ko", b"x".to_vec()).expect("plain"),
        b"x"
    );
}
