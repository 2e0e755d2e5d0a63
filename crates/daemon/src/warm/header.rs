//! `template.json`: what a template directory holds and for which key, and
//! [`Template::open`], the O(1) check every use of a template makes.

use super::key::{file_fp, key_id};
use banger_agent_proto::SealReport;
use banger_model::{TEMPLATE_FORMAT, TemplateKey};
use banger_storage::{DigestError, content_digest};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The header's file name in a template directory.
pub(crate) const HEADER_FILE: &str = "template.json";
/// The header's first field, so a stray JSON file is never taken for one.
pub(crate) const MAGIC: &str = "banger-template";
/// Largest header read; a real one is a few KiB.
pub(crate) const MAX_HEADER: u64 = 64 * 1024;
/// Files of a template directory.
pub(crate) const MEMORY_FILE: &str = "memory";
pub(crate) const VMSTATE_FILE: &str = "vmstate";
pub(crate) const CONSOLE_FILE: &str = "console.log";

/// One file of a template as sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileEntry {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) ino: u64,
    pub(crate) mtime_ns: i128,
    /// Its [`content_digest`] (reads only data, so a sparse 8 GiB disk
    /// costs what its few MiB of data do).
    pub(crate) digest: String,
}

/// `template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Header {
    pub(crate) magic: String,
    pub(crate) format: u32,
    pub(crate) id: String,
    pub(crate) key: TemplateKey,
    /// Size of the overlay and work disks at the seal.
    pub(crate) disk_bytes: u64,
    /// The MAC its guest booted with (clones start with it, then change it).
    pub(crate) template_mac: String,
    /// The exact extra kernel command line it booted with (restores reuse it).
    pub(crate) cmdline: String,
    /// The kernel file it booted.
    pub(crate) kernel: PathBuf,
    /// Its initrd: a file name in the template directory (banger's, kept
    /// from its boot) or the distribution's absolute path; `None` without.
    pub(crate) initrd: Option<String>,
    pub(crate) files: Vec<FileEntry>,
    /// What the guest reported at the seal (its own machine-id, how sshd
    /// was stopped).
    pub(crate) seal: SealReport,
    pub(crate) created_at: String,
    pub(crate) build_ms: u64,
    /// The banger that made it.
    pub(crate) banger: String,
}

/// Why a template cannot be used. Each message is one line for a user.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("template {dir}: cannot read {HEADER_FILE}: {source}")]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template header is {size} bytes, over the {MAX_HEADER}-byte limit")]
    TooLarge { size: u64 },
    #[error("template header is not banger's: {0}")]
    BadHeader(String),
    #[error("template format {found} is not this banger's ({expected}): it is rebuilt")]
    Format { found: u32, expected: u32 },
    #[error("template was made for another setup: {0}")]
    Foreign(String),
    #[error("template file {file} is missing")]
    Missing { file: String },
    #[error(
        "template file {file} is {size} bytes, expected {expected}: it was truncated or replaced"
    )]
    Truncated {
        file: String,
        size: u64,
        expected: u64,
    },
    #[error("template file {file} was changed after the template was sealed")]
    Changed { file: String },
    /// [`verify_contents`] was told to stop; nothing is known.
    #[error("checking the template's contents was stopped")]
    Stopped,
}

/// Words for what differs between the key a template was made for and the
/// current one, e.g. "made for QEMU 9.2.0, this host runs QEMU 10.0.2".
pub(crate) fn describe_diff(theirs: &TemplateKey, ours: &TemplateKey) -> String {
    theirs
        .diff(ours)
        .into_iter()
        .map(|field| match field {
            "VMM" => format!(
                "made for {} {}, this host runs {} {}",
                theirs.backend, theirs.backend_version, ours.backend, ours.backend_version
            ),
            "shape" => format!("made for {}, not {}", theirs.shape(), ours.shape()),
            "image" => format!("made for image {}, not {}", theirs.image, ours.image),
            "image files" => format!("image {} changed since", ours.image),
            "kernel" => format!("kernel {} changed since", ours.kernel),
            "initramfs" => format!(
                "made with the {} initramfs, this VM boots the {}",
                theirs.initramfs, ours.initramfs
            ),
            "agent" => "the guest agent changed since".into(),
            "host" => "made on another host CPU or kernel".into(),
            "network device" => "made for another network device".into(),
            "format" => format!("format {} is not {}", theirs.format, ours.format),
            other => format!("{other} changed"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A template that passed [`Template::open`].
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub(crate) dir: PathBuf,
    pub(crate) header: Header,
}

impl Template {
    /// Reads and checks `dir`'s header against the current key `expected`:
    /// magic, format, key, then each file's size, inode and mtime (and the
    /// small `vmstate`'s digest). Stat-only but for that one file.
    pub(crate) fn open(dir: &Path, expected: &TemplateKey) -> Result<Template, TemplateError> {
        let header = read_header(dir)?;
        if header.format != TEMPLATE_FORMAT {
            return Err(TemplateError::Format {
                found: header.format,
                expected: TEMPLATE_FORMAT,
            });
        }
        if header.key != *expected {
            return Err(TemplateError::Foreign(describe_diff(&header.key, expected)));
        }
        if header.id != key_id(&header.key) {
            return Err(TemplateError::BadHeader(format!(
                "id {} does not match its key",
                header.id
            )));
        }
        for f in &header.files {
            let path = dir.join(&f.name);
            let fp = file_fp(&path).map_err(|_| TemplateError::Missing {
                file: f.name.clone(),
            })?;
            if fp.size != f.size {
                return Err(TemplateError::Truncated {
                    file: f.name.clone(),
                    size: fp.size,
                    expected: f.size,
                });
            }
            if fp.ino != f.ino || fp.mtime_ns != f.mtime_ns {
                return Err(TemplateError::Changed {
                    file: f.name.clone(),
                });
            }
            if f.name == VMSTATE_FILE
                && content_digest(&path, &|| false).map_err(|_| TemplateError::Changed {
                    file: f.name.clone(),
                })? != f.digest
            {
                return Err(TemplateError::Changed {
                    file: f.name.clone(),
                });
            }
        }
        // Both backends map the memory file as the guest's RAM.
        let want = header.key.memory_mib << 20;
        if let Some(m) = header.files.iter().find(|f| f.name == MEMORY_FILE)
            && m.size != want
        {
            return Err(TemplateError::Truncated {
                file: MEMORY_FILE.into(),
                size: m.size,
                expected: want,
            });
        }
        Ok(Template {
            dir: dir.to_path_buf(),
            header,
        })
    }

    /// A file of the template.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Re-reads every file of the template in `dir` and compares its digest
/// with the header's (the full check [`Template::open`] leaves out: it
/// reads hundreds of MiB). `Err` names the first file that differs;
/// [`TemplateError::Stopped`] when `stop` said so.
pub(crate) fn verify_contents(dir: &Path, stop: &dyn Fn() -> bool) -> Result<(), TemplateError> {
    let header = read_header(dir)?;
    for f in &header.files {
        let sum = match content_digest(&dir.join(&f.name), stop) {
            Ok(sum) => sum,
            Err(DigestError::Stopped { .. }) => {
                return Err(TemplateError::Stopped);
            }
            Err(DigestError::Io { .. }) => {
                return Err(TemplateError::Missing {
                    file: f.name.clone(),
                });
            }
        };
        if sum != f.digest {
            return Err(TemplateError::Changed {
                file: f.name.clone(),
            });
        }
    }
    Ok(())
}

/// The header of `dir`, parsed (size-capped, magic checked) but not
/// compared with anything.
pub(crate) fn read_header(dir: &Path) -> Result<Header, TemplateError> {
    use std::io::Read;
    let path = dir.join(HEADER_FILE);
    let read_err = |source| TemplateError::Read {
        dir: dir.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(&path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    if size > MAX_HEADER {
        return Err(TemplateError::TooLarge { size });
    }
    let mut text = Vec::new();
    f.take(MAX_HEADER)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    // The magic first, so a foreign file says so rather than "missing field".
    let magic = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("magic").and_then(|m| m.as_str()).map(str::to_owned));
    if magic.as_deref() != Some(MAGIC) {
        return Err(TemplateError::BadHeader(format!(
            "{HEADER_FILE} has no \"magic\": \"{MAGIC}\""
        )));
    }
    let format = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_u64()));
    if let Some(found) = format
        && found != u64::from(TEMPLATE_FORMAT)
    {
        return Err(TemplateError::Format {
            found: u32::try_from(found).unwrap_or(u32::MAX),
            expected: TEMPLATE_FORMAT,
        });
    }
    serde_json::from_slice(&text).map_err(|e| TemplateError::BadHeader(e.to_string()))
}

/// Writes `header` into `dir` atomically (temporary file, fsync, rename).
pub(crate) fn write_header(dir: &Path, header: &Header) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let text = serde_json::to_vec_pretty(header).context("encoding the template header")?;
    let tmp = dir.join(format!("{HEADER_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(HEADER_FILE))
        .with_context(|| format!("renaming {}", tmp.display()))
}

/// The entry of file `name` in `dir` as it is now (hashing it until
/// `stop` says otherwise).
pub(crate) fn entry(dir: &Path, name: &str, stop: &dyn Fn() -> bool) -> anyhow::Result<FileEntry> {
    let path = dir.join(name);
    let fp = file_fp(&path)?;
    Ok(FileEntry {
        name: name.to_string(),
        size: fp.size,
        ino: fp.ino,
        mtime_ns: fp.mtime_ns,
        digest: content_digest(&path, stop)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_agent_proto::SshdPlan;

    fn setup() -> (tempfile::TempDir, Header) {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path();
        // A 1 MiB guest, so its memory file (exactly the guest's RAM) is
        // small.
        let mut key = super::super::key::tests::key();
        key.memory_mib = 1;
        let mut memory = vec![0u8; 1 << 20];
        memory[..4096].fill(1);
        std::fs::write(dir.join("memory"), memory).expect("w");
        std::fs::write(dir.join("overlay.ext4"), vec![2u8; 100]).expect("w");
        let header = Header {
            magic: MAGIC.into(),
            format: TEMPLATE_FORMAT,
            id: key_id(&key),
            key,
            disk_bytes: 8 << 30,
            template_mac: "06:00:00:00:00:01".into(),
            cmdline: "root=/dev/vda ro".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: Some("initrd.img".into()),
            files: vec![
                entry(dir, "memory", &|| false).expect("e"),
                entry(dir, "overlay.ext4", &|| false).expect("e"),
            ],
            seal: SealReport {
                sshd: SshdPlan::Unit("ssh.service".into()),
                machine_id: "0123456789abcdef0123456789abcdef".into(),
            },
            created_at: "2026-12-06T00:00:00Z".into(),
            build_ms: 1,
            banger: "test".into(),
        };
        write_header(dir, &header).expect("header");
        (t, header)
    }

    fn open(t: &tempfile::TempDir, h: &Header) -> Result<Template, TemplateError> {
        Template::open(t.path(), &h.key)
    }

    #[test]
    fn a_sealed_template_opens() {
        let (t, h) = setup();
        let got = open(&t, &h).expect("opens");
        assert_eq!(got.header, h);
        assert!(!t.path().join("template.json.tmp").exists());
    }

    #[test]
    fn foreign_keys_are_refused_naming_the_difference() {
        let (t, h) = setup();
        let mut ours = h.key.clone();
        ours.backend_version = "QEMU 10.1.0".into();
        let e = Template::open(t.path(), &ours).expect_err("foreign");
        assert_eq!(
            e.to_string(),
            "template was made for another setup: made for qemu QEMU 10.0.2, this host runs qemu QEMU 10.1.0"
        );
        let mut ours = h.key.clone();
        ours.vcpu = 2;
        ours.memory_mib = 2048;
        let e = Template::open(t.path(), &ours).expect_err("foreign");
        assert!(
            e.to_string()
                .ends_with("made for 1 vCPU/1 MiB, not 2 vCPU/2048 MiB"),
            "{e}"
        );
        let mut ours = h.key.clone();
        ours.agent_sha256 = "cd".repeat(32);
        let e = Template::open(t.path(), &ours).expect_err("foreign");
        assert!(e.to_string().contains("guest agent changed"), "{e}");
    }

    #[test]
    fn truncated_and_changed_files_are_refused() {
        let (t, h) = setup();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.path().join("memory"))
            .expect("open");
        f.set_len(100).expect("truncate");
        let e = open(&t, &h).expect_err("truncated");
        assert!(
            matches!(
                e,
                TemplateError::Truncated {
                    size: 100,
                    expected: 1048576,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "template file memory is 100 bytes, expected 1048576: it was truncated or replaced"
        );

        let (t, h) = setup();
        // Same size, new inode: replaced.
        let p = t.path().join("overlay.ext4");
        std::fs::remove_file(&p).expect("rm");
        std::fs::write(&p, vec![3u8; 100]).expect("w");
        let e = open(&t, &h).expect_err("changed");
        assert!(
            matches!(e, TemplateError::Changed { ref file } if file == "overlay.ext4"),
            "{e}"
        );

        let (t, h) = setup();
        std::fs::remove_file(t.path().join("memory")).expect("rm");
        assert!(matches!(open(&t, &h), Err(TemplateError::Missing { .. })));
    }

    #[test]
    fn contents_are_verified_by_hash() {
        let (t, h) = setup();
        verify_contents(t.path(), &|| false).expect("intact");
        // Same size, same inode, other bytes: only the hash sees it.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.path().join("overlay.ext4"))
            .expect("open");
        f.write_all_at(b"x", 10).expect("write");
        let e = verify_contents(t.path(), &|| false).expect_err("changed");
        assert!(
            matches!(e, TemplateError::Changed { ref file } if file == "overlay.ext4"),
            "{e}"
        );
        drop(h);
    }

    #[test]
    fn bad_headers_are_refused() {
        let (t, h) = setup();
        let path = t.path().join(HEADER_FILE);
        let text = std::fs::read_to_string(&path).expect("read");

        std::fs::write(&path, text.replace(MAGIC, "something-else")).expect("w");
        assert!(matches!(open(&t, &h), Err(TemplateError::BadHeader(_))));

        std::fs::write(
            &path,
            text.replace(&format!("\"format\": {TEMPLATE_FORMAT}"), "\"format\": 7"),
        )
        .expect("w");
        let e = open(&t, &h).expect_err("format");
        assert!(
            matches!(
                e,
                TemplateError::Format {
                    found: 7,
                    expected: TEMPLATE_FORMAT
                }
            ),
            "{e}"
        );

        std::fs::write(
            &path,
            text.replace("\"build_ms\"", "\"extra\": 1, \"build_ms\""),
        )
        .expect("w");
        let e = open(&t, &h).expect_err("unknown field");
        assert!(e.to_string().contains("unknown field"), "{e}");

        std::fs::write(&path, vec![b' '; (MAX_HEADER + 1) as usize]).expect("w");
        assert!(matches!(
            open(&t, &h),
            Err(TemplateError::TooLarge { size }) if size == MAX_HEADER + 1
        ));

        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(open(&t, &h), Err(TemplateError::Read { .. })));
    }
}
