//! Unpacking a verified bundle into a staging directory: only the expected
//! regular files, each checked against the manifest, written sparse.

use crate::CatalogError;
use crate::download::check_space;
use crate::manifest::{MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, parse_manifest};
use crate::names::hex_digest;
use crate::pull::{Progress, ProgressFn};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path};
use tokio_util::sync::CancellationToken;

/// Unit of sparseness: a block of this many zero bytes is skipped, not written.
pub(crate) const BLOCK: usize = 4096;

/// Read and write buffer size.
const BUF: usize = 1 << 20;

/// Progress is reported at most once per this many bytes.
const PROGRESS_STEP: u64 = 8 << 20;

/// True when every byte of `b` is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed chunks vectorises; an early-exit scan does not.
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
        && chunks.remainder().iter().all(|x| *x == 0)
}

/// Unpacks the zstd tar `bundle` into the empty directory `dest`: the
/// manifest must come first and describe a `M::KIND` named `expected_name`;
/// then exactly the files it lists, as plain regular files, each once, with
/// the listed size and sha256. `check` compares the manifest with the
/// catalog entry before anything is written. Writes the manifest last and flushes
/// everything. `label` names the bundle in errors.
pub(crate) fn extract<M: Manifest>(
    bundle: &Path,
    label: &str,
    expected_name: &str,
    check: &(dyn Fn(&M) -> Result<(), String> + Send + Sync),
    dest: &Path,
    progress: &ProgressFn,
    cancel: &CancellationToken,
) -> Result<M, CatalogError> {
    let bad = |reason: String| CatalogError::bad_bundle(label, reason);
    let file =
        File::open(bundle).map_err(CatalogError::io(format!("reading {}", bundle.display())))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(|e| bad(format!("it is not zstd data: {e}")))?;
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("it is not a tar stream: {e}")))?;

    let mut first = entries
        .next()
        .ok_or_else(|| bad("it is empty".into()))?
        .map_err(|e| bad(format!("reading its first entry: {e}")))?;
    let name = entry_name(&first).map_err(&bad)?;
    if name != MANIFEST_FILE {
        return Err(bad(format!(
            "its first entry is {name:?}, expected {MANIFEST_FILE}"
        )));
    }
    let len = first.size();
    if len > MAX_MANIFEST_BYTES {
        return Err(bad(format!("its {MANIFEST_FILE} is {len} bytes")));
    }
    let mut manifest_bytes = Vec::new();
    first
        .read_to_end(&mut manifest_bytes)
        .map_err(|e| bad(format!("reading {MANIFEST_FILE}: {e}")))?;
    let manifest: M = parse_manifest(&manifest_bytes, expected_name).map_err(&bad)?;
    check(&manifest).map_err(&bad)?;

    let needed = manifest
        .files()
        .iter()
        .map(|f| f.data_bytes)
        .sum::<u64>()
        .saturating_add(manifest_bytes.len() as u64);
    check_space(dest, needed)?;
    let total: u64 = manifest.files().iter().map(|f| f.size).sum();
    let mut tracker = Tracker {
        progress,
        done: 0,
        reported: 0,
        total,
    };
    (progress)(Progress::Extract { done: 0, total });

    let mut written = BTreeSet::new();
    for entry in entries {
        if cancel.is_cancelled() {
            return Err(CatalogError::Cancelled);
        }
        let mut entry = entry.map_err(|e| bad(format!("reading it: {e}")))?;
        let name = entry_name(&entry).map_err(&bad)?;
        let Some(expected) = manifest.files().iter().find(|f| f.name == name) else {
            return Err(bad(if name == MANIFEST_FILE {
                format!("it holds {MANIFEST_FILE} twice")
            } else {
                format!("it holds {name:?}, which its {MANIFEST_FILE} does not list")
            }));
        };
        if !written.insert(name.clone()) {
            return Err(bad(format!("it holds {name:?} twice")));
        }
        if entry.size() != expected.size {
            return Err(bad(format!(
                "{name} is {} bytes, its {MANIFEST_FILE} says {}",
                entry.size(),
                expected.size
            )));
        }
        let path = dest.join(&name);
        let out = File::create_new(&path)
            .map_err(CatalogError::io(format!("creating {}", path.display())))?;
        let sha = write_sparse(&mut entry, &out, expected.size, &mut tracker, cancel).map_err(
            |e| match e {
                WriteError::Read(e) => bad(format!("reading {name}: {e}")),
                WriteError::Short(n) => {
                    bad(format!("{name} ends after {n} of {} bytes", expected.size))
                }
                WriteError::Write(e) => CatalogError::Io {
                    context: format!("writing {}", path.display()),
                    source: e,
                },
                WriteError::Cancelled => CatalogError::Cancelled,
            },
        )?;
        if sha != expected.sha256 {
            return Err(bad(format!(
                "{name} has sha256 {sha}, its {MANIFEST_FILE} says {}",
                expected.sha256
            )));
        }
        out.sync_all()
            .map_err(CatalogError::io(format!("flushing {}", path.display())))?;
    }
    if let Some(missing) = manifest.files().iter().find(|f| !written.contains(&f.name)) {
        return Err(bad(format!(
            "it ends without {}, which its {MANIFEST_FILE} lists",
            missing.name
        )));
    }

    let path = dest.join(MANIFEST_FILE);
    std::fs::write(&path, &manifest_bytes)
        .and_then(|()| File::open(&path)?.sync_all())
        .and_then(|()| File::open(dest)?.sync_all())
        .map_err(CatalogError::io(format!("writing {}", path.display())))?;
    Ok(manifest)
}

/// The file name of a tar entry, if it is a plain regular file at the top
/// of the archive; otherwise why not.
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, String> {
    let path = entry
        .path()
        .map_err(|e| format!("an entry has an unreadable path: {e}"))?;
    let shown = path.display().to_string();
    let comps: Vec<Component<'_>> = path.components().collect();
    if comps.iter().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("entry {shown:?} climbs out with '..'"));
    }
    if path.is_absolute() {
        return Err(format!("entry {shown:?} is an absolute path"));
    }
    let name = match comps.as_slice() {
        [Component::Normal(n)] => n
            .to_str()
            .ok_or_else(|| format!("entry {shown:?} is not UTF-8"))?,
        _ => return Err(format!("entry {shown:?} is not a plain file name")),
    };
    let t = entry.header().entry_type();
    let what = match t {
        tar::EntryType::Regular => return Ok(name.to_string()),
        tar::EntryType::Symlink => "a symbolic link",
        tar::EntryType::Link => "a hard link",
        tar::EntryType::Char | tar::EntryType::Block => "a device",
        tar::EntryType::Directory => "a directory",
        tar::EntryType::Fifo => "a FIFO",
        _ => "not a regular file",
    };
    Err(format!("entry {shown:?} is {what}"))
}

struct Tracker<'a> {
    progress: &'a ProgressFn,
    done: u64,
    reported: u64,
    total: u64,
}

impl Tracker<'_> {
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.done - self.reported >= PROGRESS_STEP || self.done == self.total {
            self.reported = self.done;
            (self.progress)(Progress::Extract {
                done: self.done,
                total: self.total,
            });
        }
    }
}

enum WriteError {
    Read(std::io::Error),
    Short(u64),
    Write(std::io::Error),
    Cancelled,
}

/// Copies `size` bytes from `r` to `out`, seeking over all-zero 4 KiB
/// blocks so they stay holes; returns the sha256 of what was read.
fn write_sparse(
    r: &mut impl Read,
    out: &File,
    size: u64,
    tracker: &mut Tracker<'_>,
    cancel: &CancellationToken,
) -> Result<String, WriteError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut offset = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err(WriteError::Cancelled);
        }
        // A full buffer each time keeps blocks aligned to the file offset.
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WriteError::Read(e)),
            }
        }
        if filled == 0 {
            break;
        }
        let data = &buf[..filled];
        hasher.update(data);
        let mut i = 0;
        while i < data.len() {
            let block_end = (i + BLOCK).min(data.len());
            if is_zero(&data[i..block_end]) {
                i = block_end;
                continue;
            }
            // Write a run of non-zero blocks in one call.
            let mut j = block_end;
            while j < data.len() {
                let e = (j + BLOCK).min(data.len());
                if is_zero(&data[j..e]) {
                    break;
                }
                j = e;
            }
            out.write_all_at(&data[i..j], offset + i as u64)
                .map_err(WriteError::Write)?;
            i = j;
        }
        offset += filled as u64;
        tracker.add(filled as u64);
    }
    if offset != size {
        return Err(WriteError::Short(offset));
    }
    // Trailing holes: the length comes from here, not from a write.
    out.set_len(size).map_err(WriteError::Write)?;
    Ok(hex_digest(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 4000, 4095] {
            let mut b = [0u8; 4096];
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
        }
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn sparse_writing_keeps_holes_and_content() {
        let t = tempfile::tempdir().expect("tempdir");
        let size = 40 * BUF as u64 + 100;
        let mut data = vec![0u8; size as usize];
        data[5] = 1;
        data[3 * BUF + 4096..3 * BUF + 3 * 4096].fill(7);
        data[size as usize - 1] = 9;
        let path = t.path().join("f");
        let out = File::create_new(&path).expect("create");
        let progress: ProgressFn = Arc::new(|_| {});
        let mut tracker = Tracker {
            progress: &progress,
            done: 0,
            reported: 0,
            total: size,
        };
        let sha = write_sparse(
            &mut &data[..],
            &out,
            size,
            &mut tracker,
            &CancellationToken::new(),
        )
        .ok()
        .expect("write");
        assert_eq!(sha, hex_digest(Sha256::new_with_prefix(&data)));
        assert_eq!(std::fs::read(&path).expect("read"), data);
        let md = std::fs::metadata(&path).expect("stat");
        assert!(md.blocks() * 512 <= 64 * 1024, "{} blocks", md.blocks());
        // Trailing zeros become a hole too, and the length is still right.
        let path = t.path().join("g");
        let out = File::create_new(&path).expect("create");
        let zeros = vec![0u8; 3 * BUF];
        write_sparse(
            &mut &zeros[..],
            &out,
            zeros.len() as u64,
            &mut tracker,
            &CancellationToken::new(),
        )
        .ok()
        .expect("write");
        let md = std::fs::metadata(&path).expect("stat");
        assert_eq!((md.len(), md.blocks()), (3 * BUF as u64, 0));
    }
}
