//! The catalog index: which images and kernels exist and where their bundles are.

use crate::CatalogError;
use crate::download::http_client;
use crate::names::{NAME_RULE, is_sha256_hex, is_valid_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use url::Url;

/// The index format this banger reads and writes.
pub const INDEX_VERSION: u32 = 1;

/// The index compiled into banger, used when config `catalog_url` is unset.
/// Entries are added from the output of `banger image bundle` and
/// `banger kernel bundle` once their bundles are published (see
/// docs/image-catalog.md).
pub const EMBEDDED_INDEX: &str = include_str!("../index.json");

/// Largest index accepted; a real one is a few KiB.
const MAX_INDEX_BYTES: u64 = 4 << 20;

/// A catalog index: `{"version":1,"images":[...],"kernels":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u32,
    pub images: Vec<ImageEntry>,
    pub kernels: Vec<KernelEntry>,
}

/// A root file system bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// e.g. `debian-bookworm`; also the image's name once pulled.
    pub name: String,
    pub description: String,
    /// Where the bundle is: http, https or file URL.
    pub url: String,
    /// sha256 of the whole bundle file, lowercase hex.
    pub sha256: String,
    /// Size of the bundle file in bytes.
    pub size: u64,
    /// Name of the kernel (an entry of `kernels`) the image boots with.
    pub kernel: String,
    /// CPU architecture, as Rust spells it (`x86_64`).
    pub arch: String,
}

/// A kernel bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelEntry {
    /// e.g. `generic-6.12`; also the kernel's name once pulled.
    pub name: String,
    pub description: String,
    /// Where the bundle is: http, https or file URL.
    pub url: String,
    /// sha256 of the whole bundle file, lowercase hex.
    pub sha256: String,
    /// Size of the bundle file in bytes.
    pub size: u64,
    /// Kernel release (`uname -r`), e.g. `6.12.8`.
    pub release: String,
    /// CPU architecture, as Rust spells it (`x86_64`).
    pub arch: String,
}

/// One entry of either kind, as `banger image bundle` / `banger kernel
/// bundle` print it: `{"image": {...}}` or `{"kernel": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum IndexEntry {
    Image(ImageEntry),
    Kernel(KernelEntry),
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            version: INDEX_VERSION,
            images: Vec::new(),
            kernels: Vec::new(),
        }
    }
}

impl Index {
    /// The index compiled into banger.
    pub fn embedded() -> Result<Index, CatalogError> {
        Index::parse(EMBEDDED_INDEX, "embedded in banger")
    }

    /// Parses and validates an index; `source_name` (a URL or path) names it
    /// in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Index, CatalogError> {
        let bad = |reason: String| CatalogError::BadIndex {
            source_name: source_name.to_string(),
            reason,
        };
        // The version first, so a newer index says so instead of failing on
        // its new fields.
        let v: VersionOnly = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if v.version != INDEX_VERSION {
            return Err(bad(format!(
                "it has format version {}, this banger reads version {INDEX_VERSION}: upgrade banger",
                v.version
            )));
        }
        let index: Index = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        index.validate().map_err(bad)?;
        Ok(index)
    }

    /// Checks names, digests, URLs and that every image's kernel is listed.
    pub fn validate(&self) -> Result<(), String> {
        let mut kernels = BTreeSet::new();
        for k in &self.kernels {
            check_common("kernel", &k.name, &k.url, &k.sha256, k.size, &k.arch)?;
            if k.release.is_empty() {
                return Err(format!("kernel {:?} has an empty release", k.name));
            }
            if !kernels.insert(k.name.as_str()) {
                return Err(format!("kernel {:?} is listed twice", k.name));
            }
        }
        let mut images = BTreeSet::new();
        for i in &self.images {
            check_common("image", &i.name, &i.url, &i.sha256, i.size, &i.arch)?;
            if !kernels.contains(i.kernel.as_str()) {
                return Err(format!(
                    "image {:?} boots kernel {:?}, which the index does not list",
                    i.name, i.kernel
                ));
            }
            if !images.insert(i.name.as_str()) {
                return Err(format!("image {:?} is listed twice", i.name));
            }
        }
        Ok(())
    }

    /// The image entry `name`; the error lists the images there are.
    pub fn image(&self, name: &str) -> Result<&ImageEntry, CatalogError> {
        self.images
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| not_in_catalog("image", name, self.images.iter().map(|i| &i.name)))
    }

    /// The kernel entry `name`; the error lists the kernels there are.
    pub fn kernel(&self, name: &str) -> Result<&KernelEntry, CatalogError> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| not_in_catalog("kernel", name, self.kernels.iter().map(|k| &k.name)))
    }

    /// Adds `entry`, replacing an entry of the same kind and name; entries
    /// stay sorted by name so the file diffs well.
    pub fn upsert(&mut self, entry: IndexEntry) {
        match entry {
            IndexEntry::Image(e) => {
                self.images.retain(|i| i.name != e.name);
                self.images.push(e);
                self.images.sort_by(|a, b| a.name.cmp(&b.name));
            }
            IndexEntry::Kernel(e) => {
                self.kernels.retain(|k| k.name != e.name);
                self.kernels.push(e);
                self.kernels.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
    }

    /// Pretty JSON with a trailing newline, as the index file is written.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn check_common(
    kind: &str,
    name: &str,
    url: &str,
    sha256: &str,
    size: u64,
    arch: &str,
) -> Result<(), String> {
    if !is_valid_name(name) {
        return Err(format!("{kind} name {name:?} is not valid: {NAME_RULE}"));
    }
    if !is_sha256_hex(sha256) {
        return Err(format!(
            "{kind} {name:?} has sha256 {sha256:?}: expected 64 lowercase hex digits"
        ));
    }
    if size == 0 {
        return Err(format!("{kind} {name:?} has size 0"));
    }
    if arch.is_empty() {
        return Err(format!("{kind} {name:?} has an empty arch"));
    }
    match Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https" | "file") => Ok(()),
        Ok(u) => Err(format!(
            "{kind} {name:?} has URL {url:?}: scheme {} is not http, https or file",
            u.scheme()
        )),
        Err(e) => Err(format!("{kind} {name:?} has URL {url:?}: {e}")),
    }
}

fn not_in_catalog<'a>(
    kind: &'static str,
    name: &str,
    names: impl Iterator<Item = &'a String>,
) -> CatalogError {
    let names: Vec<&str> = names.map(String::as_str).collect();
    CatalogError::NotInCatalog {
        kind,
        name: name.to_string(),
        available: if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        },
    }
}

/// The catalog index: the embedded one when `catalog_url` is `None`, else
/// the one at `catalog_url` (http, https or file URL).
pub async fn load_index(catalog_url: Option<&str>) -> Result<Index, CatalogError> {
    let Some(raw) = catalog_url else {
        return Index::embedded();
    };
    let bad = |reason: String| CatalogError::BadIndex {
        source_name: raw.to_string(),
        reason,
    };
    let url = Url::parse(raw).map_err(|e| bad(format!("not a URL: {e}")))?;
    let text = match url.scheme() {
        "file" => {
            let path = url
                .to_file_path()
                .map_err(|()| bad("not a local file path".into()))?;
            let path2 = path.clone();
            crate::blocking(move || read_limited_file(&path2)).await?
        }
        "http" | "https" => fetch_text(&url).await?,
        other => {
            return Err(bad(format!(
                "scheme {other} is not supported: use http, https or file"
            )));
        }
    };
    Index::parse(&text, raw)
}

fn read_limited_file(path: &Path) -> Result<String, CatalogError> {
    let ctx = || format!("reading catalog index {}", path.display());
    let len = std::fs::metadata(path)
        .map_err(CatalogError::io(ctx()))?
        .len();
    if len > MAX_INDEX_BYTES {
        return Err(CatalogError::BadIndex {
            source_name: path.display().to_string(),
            reason: format!("it is {len} bytes, more than the {MAX_INDEX_BYTES} accepted"),
        });
    }
    std::fs::read_to_string(path).map_err(CatalogError::io(ctx()))
}

async fn fetch_text(url: &Url) -> Result<String, CatalogError> {
    let http = |reason: String| CatalogError::Http {
        url: url.to_string(),
        reason,
    };
    let client = http_client()?;
    let mut resp = client
        .get(url.clone())
        .timeout(std::time::Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| http(crate::download::describe(&e)))?;
    if !resp.status().is_success() {
        return Err(http(format!("the server answered {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| http(crate::download::describe(&e)))?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_INDEX_BYTES {
            return Err(http(format!(
                "the index is more than {MAX_INDEX_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(body).map_err(|_| http("the index is not UTF-8".into()))
}

/// Adds `entries` to the index file at `path` (created if missing),
/// replacing entries of the same kind and name, and writes it back
/// atomically. Returns the new index.
pub fn merge_into_index_file(path: &Path, entries: &[IndexEntry]) -> Result<Index, CatalogError> {
    let mut index = match std::fs::read_to_string(path) {
        Ok(text) => Index::parse(&text, &path.display().to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
        Err(e) => {
            return Err(CatalogError::Io {
                context: format!("reading {}", path.display()),
                source: e,
            });
        }
    };
    for e in entries {
        index.upsert(e.clone());
    }
    index.validate().map_err(|reason| CatalogError::BadIndex {
        source_name: path.display().to_string(),
        reason: format!("after merging: {reason}"),
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut f = std::fs::File::create_new(&tmp)?;
        f.write_all(index.to_json().as_bytes())?;
        f.set_permissions(crate::bundle::publishable())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CatalogError::Io {
            context: format!("writing {}", path.display()),
            source: e,
        });
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn Fn(&mut Index)>;

    fn kernel(name: &str) -> KernelEntry {
        KernelEntry {
            name: name.into(),
            description: "a kernel".into(),
            url: format!("https://example.invalid/{name}.tar.zst"),
            sha256: "ab".repeat(32),
            size: 10,
            release: "6.12.8".into(),
            arch: "x86_64".into(),
        }
    }

    fn image(name: &str, kernel: &str) -> ImageEntry {
        ImageEntry {
            name: name.into(),
            description: "an image".into(),
            url: format!("file:///srv/{name}.tar.zst"),
            sha256: "cd".repeat(32),
            size: 20,
            kernel: kernel.into(),
            arch: "x86_64".into(),
        }
    }

    fn sample() -> Index {
        Index {
            version: 1,
            images: vec![image("debian-bookworm", "generic-6.12")],
            kernels: vec![kernel("generic-6.12")],
        }
    }

    #[test]
    fn the_embedded_index_is_valid() {
        let i = Index::embedded().expect("embedded index parses");
        assert_eq!(i.version, INDEX_VERSION);
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields_everywhere() {
        let i = sample();
        assert_eq!(Index::parse(&i.to_json(), "t").expect("parse"), i);
        let v = serde_json::to_value(&i).expect("value");
        for path in [&[][..], &["images", "0"][..], &["kernels", "0"][..]] {
            let mut v = v.clone();
            let mut at = &mut v;
            for p in path {
                at = match p.parse::<usize>() {
                    Ok(n) => &mut at[n],
                    Err(_) => &mut at[*p],
                };
            }
            at["mirror"] = serde_json::json!("x");
            let err = Index::parse(&v.to_string(), "idx.json").expect_err("unknown field");
            let msg = err.to_string();
            assert!(
                msg.contains("idx.json") && msg.contains("unknown field `mirror`"),
                "{msg}"
            );
        }
    }

    #[test]
    fn refuses_bad_values_naming_them() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.version = 2), "format version 2"),
            (Box::new(|i| i.images[0].name = "../x".into()), "\"../x\""),
            (
                Box::new(|i| i.kernels[0].sha256 = "TODO".into()),
                "\"TODO\"",
            ),
            (Box::new(|i| i.kernels[0].size = 0), "size 0"),
            (Box::new(|i| i.images[0].url = "ftp://x/y".into()), "ftp"),
            (
                Box::new(|i| i.images[0].url = "no url".into()),
                "\"no url\"",
            ),
            (Box::new(|i| i.images[0].kernel = "nope".into()), "\"nope\""),
            (
                Box::new(|i| i.kernels.push(i.kernels[0].clone())),
                "listed twice",
            ),
        ];
        for (change, expect) in cases {
            let mut i = sample();
            change(&mut i);
            let msg = Index::parse(&serde_json::to_string(&i).expect("json"), "t")
                .expect_err(expect)
                .to_string();
            assert!(msg.contains(expect), "{msg} lacks {expect}");
        }
        assert!(Index::parse(r#"{"version":1,"images":[]}"#, "t").is_err());
        assert!(Index::parse("not json", "t").is_err());
    }

    #[test]
    fn lookup_errors_list_what_there_is() {
        let mut i = sample();
        i.upsert(IndexEntry::Image(image("alpine", "generic-6.12")));
        assert_eq!(i.image("alpine").expect("found").name, "alpine");
        assert_eq!(
            i.image("x").expect_err("missing").to_string(),
            r#"image "x" is not in the catalog (catalog has: alpine, debian-bookworm)"#
        );
        assert_eq!(
            i.kernel("generic-6.1").expect_err("missing").to_string(),
            r#"kernel "generic-6.1" is not in the catalog (catalog has: generic-6.12)"#
        );
        assert_eq!(
            Index::default()
                .image("debian-bookworm")
                .expect_err("empty")
                .to_string(),
            r#"image "debian-bookworm" is not in the catalog (catalog has: none)"#
        );
    }

    #[test]
    fn merging_creates_replaces_and_checks_kernel_refs() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("index.json");
        let err = merge_into_index_file(&path, &[IndexEntry::Image(image("a", "k"))])
            .expect_err("kernel missing");
        assert!(err.to_string().contains("\"k\""), "{err}");
        assert!(!path.exists());

        merge_into_index_file(
            &path,
            &[
                IndexEntry::Image(image("a", "k")),
                IndexEntry::Kernel(kernel("k")),
            ],
        )
        .expect("merge");
        let mut newer = image("a", "k");
        newer.sha256 = "ef".repeat(32);
        let merged =
            merge_into_index_file(&path, &[IndexEntry::Image(newer.clone())]).expect("merge");
        assert_eq!(merged.images, [newer]);
        let on_disk = std::fs::read_to_string(&path).expect("read");
        assert_eq!(Index::parse(&on_disk, "t").expect("parse"), merged);
        let names: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["index.json"]);
    }

    #[test]
    fn entries_print_as_tagged_json() {
        let e = IndexEntry::Kernel(kernel("generic-6.12"));
        let text = serde_json::to_string(&e).expect("json");
        assert!(
            text.starts_with(r#"{"kernel":{"name":"generic-6.12""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<IndexEntry>(&text).expect("parse"), e);
    }

    #[tokio::test]
    async fn loads_from_a_file_url_and_refuses_other_schemes() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("index.json");
        std::fs::write(&path, sample().to_json()).expect("write");
        let url = Url::from_file_path(&path).expect("url").to_string();
        assert_eq!(load_index(Some(&url)).await.expect("load"), sample());
        assert_eq!(
            load_index(None).await.expect("embedded"),
            Index::embedded().expect("embedded")
        );
        let err = load_index(Some("ftp://host/index.json"))
            .await
            .expect_err("ftp");
        assert!(err.to_string().contains("scheme ftp"), "{err}");
        let missing = Url::from_file_path(t.path().join("nope.json"))
            .expect("url")
            .to_string();
        let err = load_index(Some(&missing)).await.expect_err("missing");
        assert!(err.to_string().contains("nope.json"), "{err}");
    }
}
