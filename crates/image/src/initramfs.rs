//! banger's own initramfs: the static guest agent as `/init` and the few
//! kernel modules it needs to assemble the VM's root, nothing else (no
//! udev, no shell, no scripts).
//!
//! It is made in two parts. The kernel's part, [`MODULES_CPIO_FILE`], is
//! made once per kernel, when the kernel comes with an image whose
//! `/lib/modules/<release>` holds its modules ([`build_modules_cpio`]): the
//! modules of [`WANTED_MODULES`] with their dependencies (from
//! `modules.dep` and the `pre:` soft dependencies of `modules.softdep`),
//! decompressed, and their load order in
//! [`INITRAMFS_MODULES_LIST`](banger_agent_proto::boot::INITRAMFS_MODULES_LIST).
//! Modules built into the kernel (`modules.builtin`) are left out; a kernel
//! with everything built in gets an empty list. The agent's part is added
//! at each boot ([`assemble`]), so a VM always boots the daemon's current
//! agent. Both are uncompressed `newc` cpio archives: a guest unpacks them
//! faster than it would decompress them.
//!
//! Module trees are read from a directory (an image being built) or from
//! an ext4 image with `debugfs` (no mount, no root). Their contents are
//! untrusted: paths from `modules.dep` must stay inside the module
//! directory and every read is capped.

use banger_agent_proto::boot::{INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_LIST, ModuleEntry};
use banger_ext4::debugfs;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// File name of a kernel's module part in its kernel directory.
pub const MODULES_CPIO_FILE: &str = "banger-modules.cpio";

/// The modules the agent needs, in the order it wants them loaded (each
/// after its dependencies): the virtio-mmio transport (QEMU microvm and
/// Firecracker), the disks and their file systems, the network card, and
/// both agent channels (virtio-serial under QEMU, vsock under Firecracker),
/// so one initramfs boots on either backend.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "ext4",
    "overlay",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// Loaded when the kernel has them, skipped otherwise: the entropy device
/// (Firecracker's, QEMU's when configured) seeds the guest's RNG sooner.
pub const OPTIONAL_MODULES: &[&str] = &["virtio_rng"];

/// Cap on one module, once decompressed (real ones are well under 10 MiB).
const MAX_MODULE_BYTES: u64 = 64 << 20;
/// Cap on an index file (`modules.dep` of a distribution kernel is ~1 MiB).
const MAX_INDEX_BYTES: u64 = 32 << 20;

/// Why no modules part could be made.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{source_desc} has no modules for kernel {release} (no modules.dep)")]
    NoModules {
        release: String,
        source_desc: String,
    },
    #[error(
        "kernel {release}: {source_desc} lacks the module{} {} (neither in modules.dep nor built in)",
        if .names.len() == 1 { "" } else { "s" },
        .names.join(", ")
    )]
    MissingModules {
        release: String,
        source_desc: String,
        names: Vec<String>,
    },
    #[error(
        "kernel {release}: module file {path} listed in modules.dep is missing from {source_desc}"
    )]
    MissingFile {
        release: String,
        source_desc: String,
        path: String,
    },
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Ext4(#[from] banger_ext4::Ext4Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitramfsError {
    let context = context.into();
    move |source| InitramfsError::Io { context, source }
}

/// Where a kernel's modules are read from.
pub trait ModuleSource {
    /// The files at these paths relative to the release's module directory
    /// (`modules.dep`, `kernel/fs/overlayfs/overlay.ko`), in order; `None`
    /// for a file that does not exist. Each read is capped at `cap` bytes.
    fn fetch(&self, rels: &[&str], cap: u64) -> Result<Vec<Option<Vec<u8>>>, InitramfsError>;
    /// For messages: what the modules come from.
    fn describe(&self) -> String;
}

/// A module directory on the host: `<tree>/lib/modules/<release>`.
pub struct DirSource {
    pub dir: PathBuf,
}

impl ModuleSource for DirSource {
    fn fetch(&self, rels: &[&str], cap: u64) -> Result<Vec<Option<Vec<u8>>>, InitramfsError> {
        rels.iter()
            .map(|rel| {
                check_rel(rel)?;
                let path = self.dir.join(rel);
                match std::fs::File::open(&path) {
                    Ok(f) => read_capped(f, cap, &path.display().to_string()).map(Some),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(format!("reading {}", path.display()))(e)),
                }
            })
            .collect()
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The module directory inside an ext4 image, read with `debugfs` (which
/// follows the image's own symlinks, such as `/lib -> usr/lib`, inside the
/// image).
pub struct Ext4Source {
    pub image: PathBuf,
    /// Absolute path inside the image, e.g. `/lib/modules/6.1.0-27-cloud-amd64`.
    pub dir: String,
}

impl Ext4Source {
    /// The modules of `release` in the ext4 `image`.
    pub fn new(image: &Path, release: &str) -> Result<Self, InitramfsError> {
        check_release(release)?;
        Ok(Self {
            image: image.to_path_buf(),
            dir: format!("/lib/modules/{release}"),
        })
    }
}

impl ModuleSource for Ext4Source {
    fn fetch(&self, rels: &[&str], cap: u64) -> Result<Vec<Option<Vec<u8>>>, InitramfsError> {
        let tmp = tempfile::Builder::new()
            .prefix("banger-modules-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        // One debugfs run dumps every file: `dump SRC DEST` per line.
        let mut script = String::new();
        for (i, rel) in rels.iter().enumerate() {
            check_rel(rel)?;
            let dest = tmp.path().join(i.to_string());
            let dest = dest
                .to_str()
                .filter(|d| !d.contains(['"', ' ', '\n']))
                .ok_or_else(|| InitramfsError::Bad(format!("unusable temporary path {dest:?}")))?;
            script.push_str(&format!(
                "dump {} {}\n",
                debugfs::quote_str(&format!("{}/{rel}", self.dir)),
                debugfs::quote_str(dest)
            ));
        }
        let cmds = tmp.path().join("commands");
        let out = debugfs::run_script_blocking(&self.image, &cmds, script.as_bytes(), false)?;
        if !out.status.success() {
            return Err(InitramfsError::Bad(format!(
                "debugfs could not read {}: {}",
                self.image.display(),
                out.messages.last().map_or("", |l| l.trim())
            )));
        }
        (0..rels.len())
            .map(|i| {
                let p = tmp.path().join(i.to_string());
                match std::fs::File::open(&p) {
                    Ok(f) => read_capped(f, cap, &format!("{}/{}", self.dir, rels[i])).map(Some),
                    // debugfs writes nothing for a path that does not exist.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(format!("reading {}", p.display()))(e)),
                }
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!("{} in {}", self.dir, self.image.display())
    }
}

/// A release must be one plain path component.
fn check_release(release: &str) -> Result<(), InitramfsError> {
    let ok = !release.is_empty()
        && release != "."
        && release != ".."
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InitramfsError::Bad(format!(
            "kernel release {release:?} is not a plain name"
        )))
    }
}

/// A path from `modules.dep`: relative, no `..`, nothing a debugfs command
/// line could misread.
fn check_rel(rel: &str) -> Result<(), InitramfsError> {
    let ok = !rel.is_empty()
        && !rel.starts_with('/')
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && rel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-/~,".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InitramfsError::Bad(format!(
            "module path {rel:?} is not a plain relative path"
        )))
    }
}

fn read_capped(r: impl Read, cap: u64, what: &str) -> Result<Vec<u8>, InitramfsError> {
    let mut buf = Vec::new();
    r.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(io(format!("reading {what}")))?;
    if buf.len() as u64 > cap {
        return Err(InitramfsError::Bad(format!(
            "{what} is larger than {cap} bytes"
        )));
    }
    Ok(buf)
}

/// The kernel's name for the module at `path` (`kernel/drivers/char/hw_random/virtio-rng.ko.xz`
/// is `virtio_rng`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(s, _)| s);
    stem.replace('-', "_")
}

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedModule {
    /// Its name, as in `lsmod`.
    pub name: String,
    /// Its file, relative to the release's module directory.
    pub path: String,
    /// The wanted modules it is loaded for.
    pub wanted_by: Vec<String>,
}

/// What the initramfs of a kernel loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    /// In load order: every module after those it needs.
    pub modules: Vec<PlannedModule>,
    /// Wanted modules the kernel has built in.
    pub builtin: Vec<String>,
    /// Optional modules the kernel has neither built in nor as a module.
    pub skipped: Vec<String>,
}

/// Works out the modules to load from the text of `modules.dep`,
/// `modules.builtin` and `modules.softdep` (empty when absent).
pub fn plan_modules(
    release: &str,
    source_desc: &str,
    dep: &str,
    builtin: &str,
    softdep: &str,
) -> Result<ModulePlan, InitramfsError> {
    // name -> (path, dependency paths)
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        let list = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.to_string(), list));
    }
    let built_in: HashSet<String> = builtin
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();
    // softdep NAME pre: A B post: C
    let mut pre: HashMap<String, Vec<String>> = HashMap::new();
    for line in softdep.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(name) = words.next() else { continue };
        let mut in_pre = false;
        for w in words {
            match w {
                "pre:" => in_pre = true,
                "post:" => in_pre = false,
                m if in_pre => pre
                    .entry(name.replace('-', "_"))
                    .or_default()
                    .push(m.replace('-', "_")),
                _ => {}
            }
        }
    }

    let mut plan = ModulePlan {
        modules: Vec::new(),
        builtin: Vec::new(),
        skipped: Vec::new(),
    };
    let mut missing = Vec::new();
    let wanted = WANTED_MODULES.iter().map(|m| (m, true));
    let optional = OPTIONAL_MODULES.iter().map(|m| (m, false));
    for (name, required) in wanted.chain(optional) {
        let name = name.to_string();
        if built_in.contains(&name) {
            plan.builtin.push(name);
        } else if deps.contains_key(&name) {
            let mut walk = HashSet::new();
            visit(
                &name,
                &deps,
                &pre,
                &built_in,
                &mut walk,
                &mut plan.modules,
                0,
            )?;
            for m in plan.modules.iter_mut().filter(|m| walk.contains(&m.name)) {
                m.wanted_by.push(name.clone());
            }
        } else if required {
            missing.push(name);
        } else {
            plan.skipped.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(InitramfsError::MissingModules {
            release: release.to_string(),
            source_desc: source_desc.to_string(),
            names: missing,
        });
    }
    Ok(plan)
}

/// Adds `name` after everything it needs (depth-first, post-order), once;
/// `walk` collects every module `name` needs, planned before or not.
fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    pre: &HashMap<String, Vec<String>>,
    built_in: &HashSet<String>,
    walk: &mut HashSet<String>,
    out: &mut Vec<PlannedModule>,
    depth: usize,
) -> Result<(), InitramfsError> {
    if walk.contains(name) || built_in.contains(name) {
        return Ok(());
    }
    if depth > 64 {
        return Err(InitramfsError::Bad(format!(
            "modules.dep: the dependencies of {name} go round in a circle"
        )));
    }
    let Some((path, needs)) = deps.get(name) else {
        // A soft dependency the kernel does not have: modprobe skips it too.
        return Ok(());
    };
    for soft in pre.get(name).into_iter().flatten() {
        visit(soft, deps, pre, built_in, walk, out, depth + 1)?;
    }
    for d in needs {
        visit(&module_name(d), deps, pre, built_in, walk, out, depth + 1)?;
    }
    walk.insert(name.to_string());
    if !out.iter().any(|m| m.name == name) {
        out.push(PlannedModule {
            name: name.to_string(),
            path: path.clone(),
            wanted_by: Vec::new(),
        });
    }
    Ok(())
}

/// Decompresses a module file by its extension (`.ko`, `.ko.xz`,
/// `.ko.zst`, `.ko.gz`).
fn decompress_module(path: &str, data: Vec<u8>) -> Result<Vec<u8>, InitramfsError> {
    let bad = |e: &dyn std::fmt::Display| InitramfsError::Bad(format!("decompressing {path}: {e}"));
    let out = if path.ends_with(".ko") {
        return Ok(data);
    } else if path.ends_with(".ko.xz") {
        read_capped(
            lzma_rust2::XzReader::new(data.as_slice(), false),
            MAX_MODULE_BYTES,
            path,
        )
    } else if path.ends_with(".ko.zst") {
        let d = ruzstd::decoding::StreamingDecoder::new(data.as_slice()).map_err(|e| bad(&e))?;
        read_capped(d, MAX_MODULE_BYTES, path)
    } else if path.ends_with(".ko.gz") {
        read_capped(
            flate2::read::GzDecoder::new(data.as_slice()),
            MAX_MODULE_BYTES,
            path,
        )
    } else {
        return Err(InitramfsError::Bad(format!(
            "module file {path} has an unknown extension (not .ko, .ko.xz, .ko.zst or .ko.gz)"
        )));
    };
    out.map_err(|e| match e {
        InitramfsError::Io { source, .. } => bad(&source),
        other => other,
    })
}

/// What a modules part holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulesCpio {
    pub path: PathBuf,
    /// The modules, in load order.
    pub modules: Vec<String>,
    /// Wanted modules the kernel has built in.
    pub builtin: Vec<String>,
}

/// Makes the modules part of banger's initramfs for kernel `release` from
/// `source` and writes it to `out` (through a temporary file and a
/// rename). Fails, writing nothing, when the source has no modules for the
/// release or lacks a wanted one.
pub fn build_modules_cpio(
    source: &dyn ModuleSource,
    release: &str,
    out: &Path,
) -> Result<ModulesCpio, InitramfsError> {
    check_release(release)?;
    let desc = source.describe();
    let index = source.fetch(
        &["modules.dep", "modules.builtin", "modules.softdep"],
        MAX_INDEX_BYTES,
    )?;
    let text = |i: usize| {
        index[i]
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let dep = text(0).ok_or_else(|| InitramfsError::NoModules {
        release: release.to_string(),
        source_desc: desc.clone(),
    })?;
    let plan = plan_modules(
        release,
        &desc,
        &dep,
        &text(1).unwrap_or_default(),
        &text(2).unwrap_or_default(),
    )?;
    let paths: Vec<&str> = plan.modules.iter().map(|m| m.path.as_str()).collect();
    let files = source.fetch(&paths, MAX_MODULE_BYTES)?;

    let mut w = CpioWriter::new(Vec::new());
    let dir = INITRAMFS_MODULES_DIR.trim_start_matches('/');
    // The directories the agent mounts on or moves, and the console the
    // kernel opens for /init before anything is mounted.
    for d in ["banger", dir, "dev", "proc", "sys", "run"] {
        w.dir(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    let mut list = String::new();
    for (m, data) in plan.modules.iter().zip(files) {
        let data = data.ok_or_else(|| InitramfsError::MissingFile {
            release: release.to_string(),
            source_desc: desc.clone(),
            path: m.path.clone(),
        })?;
        let data = decompress_module(&m.path, data)?;
        let entry = ModuleEntry {
            file: format!("{}.ko", m.name),
            wanted_by: m.wanted_by.clone(),
        };
        w.file(&format!("{dir}/{}", entry.file), 0o644, &data)?;
        list.push_str(&entry.to_line());
    }
    w.file(
        INITRAMFS_MODULES_LIST.trim_start_matches('/'),
        0o644,
        list.as_bytes(),
    )?;
    let bytes = w.finish()?;
    write_atomically(out, &[&bytes], true)?;
    Ok(ModulesCpio {
        path: out.to_path_buf(),
        modules: plan.modules.into_iter().map(|m| m.name).collect(),
        builtin: plan.builtin,
    })
}

/// Writes banger's initramfs to `out`: `agent` as `/init`, then the
/// kernel's modules part. The result is one `newc` archive (the modules
/// part ends it with its trailer). Made for one boot, so not flushed to
/// disk: the VMM reads it back from the page cache.
pub fn assemble(agent: &Path, modules_cpio: &Path, out: &Path) -> Result<(), InitramfsError> {
    let agent_bytes = std::fs::read(agent).map_err(io(format!("reading {}", agent.display())))?;
    let modules =
        std::fs::read(modules_cpio).map_err(io(format!("reading {}", modules_cpio.display())))?;
    if !modules.starts_with(NEWC_MAGIC) {
        return Err(InitramfsError::Bad(format!(
            "{} is not a cpio archive",
            modules_cpio.display()
        )));
    }
    let mut head = CpioWriter::new(Vec::with_capacity(agent_bytes.len() + 512));
    // Numbered after the modules part's inodes, which start at 1.
    head.next_ino = 1 << 20;
    head.file("init", 0o755, &agent_bytes)?;
    let head = head.into_entries();
    write_atomically(out, &[&head, &modules], false)
}

/// Writes `parts` to `out` through a temporary file renamed into place;
/// `durable` flushes it to disk first.
fn write_atomically(out: &Path, parts: &[&[u8]], durable: bool) -> Result<(), InitramfsError> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .tempfile_in(dir)
        .map_err(io(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;
    for p in parts {
        tmp.write_all(p)
            .map_err(io(format!("writing {}", out.display())))?;
    }
    if durable {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io(format!("flushing {}", out.display())))?;
    }
    tmp.persist(out)
        .map_err(|e| io(format!("writing {}", out.display()))(e.error))?;
    Ok(())
}

const NEWC_MAGIC: &[u8] = b"070701";

/// Writes a `newc` cpio archive (the format the kernel unpacks): every
/// entry owned by root, numbered from 1, padded to four bytes.
struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    fn new(out: Vec<u8>) -> Self {
        Self { out, next_ino: 1 }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), InitramfsError> {
        let size = u32::try_from(data.len())
            .map_err(|_| InitramfsError::Bad(format!("{name} is too large for a cpio archive")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.out.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str, perm: u32) -> Result<(), InitramfsError> {
        self.entry(name, 0o040000 | perm, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.entry(name, 0o020000 | perm, (major, minor), &[])
    }

    /// The entries written so far, without a trailer.
    fn into_entries(self) -> Vec<u8> {
        self.out
    }

    /// The archive, with its trailer.
    fn finish(mut self) -> Result<Vec<u8>, InitramfsError> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests;
