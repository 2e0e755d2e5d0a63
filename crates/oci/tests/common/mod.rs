//! A real local registry (Debian's `docker-registry`), images written as
//! OCI layouts by hand and pushed with skopeo, and debugfs inspection.
#![allow(dead_code)]

use banger_oci::{Credentials, PullOptions};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const UNIT: &str = "[Unit]\nDescription=agent\n[Service]\nExecStart=/usr/local/bin/banger-agent\n[Install]\nWantedBy=sysinit.target\n";
pub const AGENT: &str = "#!/bin/sh\n# test agent\n";

fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).is_file())
}

/// docker-registry, skopeo and htpasswd, installed if missing. `None` (and
/// a printed reason) when they cannot be had: the caller skips.
pub fn tools() -> Option<()> {
    let missing = |t: &[&str]| t.iter().any(|x| !have(x));
    let needed = ["docker-registry", "skopeo", "htpasswd"];
    if missing(&needed) {
        let _ = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "docker-registry",
                "skopeo",
                "apache2-utils",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if missing(&needed) {
        println!(
            "SKIPPED: docker-registry, skopeo or htpasswd missing and apt-get could not install them"
        );
        return None;
    }
    Some(())
}

/// A docker-registry process on 127.0.0.1, killed when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    pub user: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Status line of `GET /v2/`, if the registry answers.
fn probe(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().map(String::from)
}

impl Registry {
    /// Starts a registry; with `user`, behind htpasswd basic auth.
    pub fn start(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("mkdir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((u, p)) = user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).expect("write");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                file.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut r = Registry {
            child,
            port,
            storage,
            user: user.map(|(u, p)| (u.to_string(), p.to_string())),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = probe(port) {
                assert!(
                    line.contains(" 200") || line.contains(" 401"),
                    "unexpected /v2/ answer: {line}"
                );
                break;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                let log =
                    std::fs::read_to_string(r._dir.path().join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer /v2/ in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = &mut r;
        r
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `layout:tag` as `repo:tag` with skopeo (`extra` flags added).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.user {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        let out = cmd.output().expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The stored data file of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Tar entries for test layers.
pub enum E<'a> {
    Dir(&'a str, u32, u64, u64),
    File(&'a str, &'a [u8], u32, u64, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
}

pub fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        match *e {
            E::Dir(p, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(mode);
                h.set_uid(uid);
                h.set_gid(gid);
                b.append_data(&mut h, p, &[][..]).expect("dir");
            }
            E::File(p, data, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_uid(uid);
                h.set_gid(gid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data).expect("file");
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, p, target).expect("symlink");
            }
            E::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, p, target).expect("link");
            }
            E::Char(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(major).expect("major");
                h.set_device_minor(minor).expect("minor");
                b.append_data(&mut h, p, &[][..]).expect("char");
            }
        }
    }
    b.into_inner().expect("tar")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

/// An OCI image layout being written.
pub struct Layout {
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

pub struct Layer {
    pub media_type: &'static str,
    pub blob: Vec<u8>,
    /// The uncompressed tar.
    pub tar: Vec<u8>,
}

pub const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn layer(media_type: &'static str, tar: Vec<u8>) -> Layer {
    let blob = match media_type {
        ZSTD => zstd::encode_all(&tar[..], 3).expect("zstd"),
        GZ => gzip(&tar),
        _ => tar.clone(),
    };
    Layer {
        media_type,
        blob,
        tar,
    }
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        Layout {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    pub fn blob(&self, data: &[u8]) -> (String, usize) {
        let d = sha256(data);
        std::fs::write(
            self.dir
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").expect("hex")),
            data,
        )
        .expect("blob");
        (d, data.len())
    }

    /// Writes an image manifest; returns its digest and size.
    pub fn image(&self, arch: &str, layers: &[Layer]) -> (String, usize) {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.tar)).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {}
        });
        let (cd, cs) = self.blob(config.to_string().as_bytes());
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let (d, s) = self.blob(&l.blob);
                serde_json::json!({"mediaType": l.media_type, "digest": d, "size": s})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs,
        });
        self.blob(manifest.to_string().as_bytes())
    }

    /// Tags a manifest (or index) in index.json.
    pub fn tag(&mut self, tag: &str, media_type: &str, (digest, size): (String, usize)) {
        self.index.push(serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }));
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(self.dir.join("index.json"), index.to_string()).expect("index");
    }

    /// Writes an image index of `(manifest, arch)`.
    pub fn index_of(&self, manifests: &[((String, usize), &str)]) -> (String, usize) {
        let entries: Vec<_> = manifests
            .iter()
            .map(|((d, s), arch)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d, "size": s,
                    "platform": {"os": "linux", "architecture": arch}
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries
        });
        self.blob(index.to_string().as_bytes())
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pull options for a test.
pub fn options(
    reference: String,
    cache: &Path,
    out: &Path,
    agent: &Path,
    auth: Credentials,
) -> PullOptions {
    PullOptions {
        reference,
        cache_dir: cache.to_path_buf(),
        out_dir: out.to_path_buf(),
        payload: banger_image::customize::GuestPayload {
            agent_binary: agent.to_path_buf(),
            agent_unit: UNIT.into(),
            agent_modules_conf: "vsock\n".into(),
        },
        min_size: 64 << 20,
        auth,
        progress: None,
        cancel: CancellationToken::new(),
    }
}

/// `debugfs -R 'stat <path>'` of an image: `None` if the path is missing.
pub fn stat(image: &Path, path: &str) -> Option<Stat> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat \"{}\"", path.replace('"', "\"\"")))
        .arg(image)
        .output()
        .expect("debugfs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains("Inode:") {
        return None;
    }
    let field = |name: &str| -> String {
        let i = text
            .find(name)
            .unwrap_or_else(|| panic!("{name} in {text}"));
        text[i + name.len()..]
            .split_whitespace()
            .next()
            .expect("value")
            .to_string()
    };
    Some(Stat {
        ino: field("Inode:").parse().expect("ino"),
        kind: field("Type:"),
        mode: u32::from_str_radix(&field("Mode:"), 8).expect("mode"),
        uid: field("User:").parse().expect("uid"),
        gid: field("Group:").parse().expect("gid"),
        text,
    })
}

#[derive(Debug)]
pub struct Stat {
    pub ino: u64,
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub text: String,
}

/// `debugfs -R 'cat <path>'`.
pub fn cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .expect("debugfs");
    out.stdout
}

pub fn fsck_clean(image: &Path) -> bool {
    Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("e2fsck")
        .success()
}

/// Names in `dir` (none if it is missing).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
