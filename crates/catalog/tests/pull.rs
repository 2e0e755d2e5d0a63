//! Bundles served by a real HTTP server on 127.0.0.1, pulled for real.

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use banger_catalog::{
    CatalogError, ImageBundleRequest, ImageEntry, IndexEntry, KernelBundleRequest, Progress,
    PullOptions, PulledImage, PulledKernel, bundle_image, bundle_kernel, load_index,
    merge_into_index_file, pull_image, pull_kernel,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// How the server answers the next bundle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Honours `Range: bytes=N-` with a 206.
    Normal,
    /// Always the whole file with a 200.
    IgnoreRange,
    /// Sends the first half, waits for the test's go, then drops the
    /// connection; later requests are answered `then`.
    DropHalfway { then: &'static str },
    /// Sends the first half and then nothing more.
    StallHalfway,
}

#[derive(Default)]
struct ServerState {
    files: Mutex<HashMap<String, Bytes>>,
    mode: Mutex<Option<Mode>>,
    /// The Range header of every request, in order.
    ranges: Mutex<Vec<Option<String>>>,
    /// Released by the test once the client has part of the body.
    go: Mutex<Option<oneshot::Receiver<()>>>,
}

struct Server {
    base: String,
    state: Arc<ServerState>,
}

impl Server {
    async fn start() -> Server {
        let state = Arc::new(ServerState::default());
        let app = axum::Router::new()
            .route("/{file}", axum::routing::get(serve))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server {
            base: format!("http://{addr}"),
            state,
        }
    }

    fn put(&self, name: &str, data: impl Into<Bytes>) {
        self.state
            .files
            .lock()
            .expect("lock")
            .insert(name.to_string(), data.into());
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("lock") = Some(mode);
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.state.ranges.lock().expect("lock").clone()
    }

    /// A sender that lets a halfway-dropping answer go on to drop.
    fn gate(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.state.go.lock().expect("lock") = Some(rx);
        tx
    }
}

async fn serve(
    State(s): State<Arc<ServerState>>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.ranges.lock().expect("lock").push(range.clone());
    let Some(data) = s.files.lock().expect("lock").get(&file).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mode = s.mode.lock().expect("lock").unwrap_or(Mode::Normal);
    let len = data.len();
    match mode {
        Mode::DropHalfway { .. } | Mode::StallHalfway => {
            let next = match mode {
                Mode::DropHalfway {
                    then: "ignore-range",
                } => Mode::IgnoreRange,
                _ => Mode::Normal,
            };
            *s.mode.lock().expect("lock") = Some(next);
            let first = data.slice(..len / 2);
            let go = s.go.lock().expect("lock").take();
            let stall = mode == Mode::StallHalfway;
            let rest = async move {
                if stall {
                    std::future::pending::<()>().await;
                }
                if let Some(go) = go {
                    let _ = tokio::time::timeout(Duration::from_secs(60), go).await;
                }
                Err::<Bytes, _>(std::io::Error::other("test server drops the connection"))
            };
            let stream = futures::StreamExt::chain(
                futures::stream::once(async move { Ok::<_, std::io::Error>(first) }),
                futures::stream::once(rest),
            );
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, len)
                .body(Body::from_stream(stream))
                .expect("response")
        }
        Mode::Normal if range.is_some() => {
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            if start >= len {
                return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            }
            Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, len - start)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{len}", len - 1),
                )
                .body(Body::from(data.slice(start..)))
                .expect("response")
        }
        Mode::Normal | Mode::IgnoreRange => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from(data))
            .expect("response"),
    }
}

/// A sparse file of `size` bytes with random data in `extents` (offset, len).
fn sparse_file(path: &Path, size: u64, extents: &[(u64, usize)]) -> Vec<u8> {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    for &(off, len) in extents {
        let mut buf = vec![0u8; len];
        rand::rng().fill_bytes(&mut buf);
        f.write_all_at(&buf, off).expect("write");
    }
    std::fs::read(path).expect("read back")
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rand::rng().fill_bytes(&mut buf);
    std::fs::write(path, &buf).expect("write");
    buf
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    server: Server,
    rootfs: Vec<u8>,
    work_seed: Vec<u8>,
    kernel_files: Vec<(&'static str, Vec<u8>)>,
    image: ImageEntry,
    image_bundle: Vec<u8>,
    index_path: PathBuf,
}

impl Fixture {
    /// Bundles a 16 MiB sparse rootfs (~3 MiB of data), a work-seed and a
    /// kernel, serves the bundles and writes the index that lists them.
    async fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let src = root.join("src");
        std::fs::create_dir(&src).expect("mkdir");
        let rootfs = sparse_file(
            &src.join("rootfs.ext4"),
            16 * MIB,
            &[
                (0, 4096),
                (MIB, 2 * MIB as usize),
                (10 * MIB + 512, 700_000),
            ],
        );
        let work_seed = sparse_file(&src.join("seed.ext4"), 4 * MIB, &[(4096, 10_000)]);
        let mut kernel_files = Vec::new();
        for (name, len) in [
            ("vmlinuz", 300_000),
            ("initrd.img", 200_000),
            ("vmlinux", 500_000),
            ("modules.tar", 10_240),
        ] {
            kernel_files.push((name, random_file(&src.join(name), len)));
        }
        std::fs::write(src.join("config"), "CONFIG_VIRTIO=y\n").expect("write");
        kernel_files.push(("config", b"CONFIG_VIRTIO=y\n".to_vec()));

        let server = Server::start().await;
        let out = root.join("out");
        let cancel = CancellationToken::new();
        let kernel = bundle_kernel(
            &KernelBundleRequest {
                name: "generic-6.12".into(),
                description: "test kernel".into(),
                release: "6.12.8".into(),
                kernel: src.join("vmlinuz"),
                initrd: Some(src.join("initrd.img")),
                vmlinux: Some(src.join("vmlinux")),
                modules: Some(src.join("modules.tar")),
                config: Some(src.join("config")),
                out_dir: out.clone(),
                base_url: format!("{}/", server.base),
            },
            &cancel,
        )
        .await
        .expect("bundle kernel");
        let image = bundle_image(
            &ImageBundleRequest {
                name: "debian-bookworm".into(),
                description: "test image".into(),
                kernel: "generic-6.12".into(),
                rootfs: src.join("rootfs.ext4"),
                work_seed: Some(src.join("seed.ext4")),
                out_dir: out.clone(),
                base_url: server.base.clone(),
            },
            &cancel,
        )
        .await
        .expect("bundle image");
        for (path, entry_url) in [
            (&kernel.path, &kernel.entry.url),
            (&image.path, &image.entry.url),
        ] {
            let file_name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            assert_eq!(entry_url, &format!("{}/{file_name}", server.base));
            server.put(&file_name, std::fs::read(path).expect("read bundle"));
        }
        let image_bundle = std::fs::read(&image.path).expect("read");
        assert!(
            image_bundle.len() as u64 > 2 * MIB && (image_bundle.len() as u64) < 8 * MIB,
            "bundle is {} bytes",
            image_bundle.len()
        );
        let index_path = root.join("catalog/index.json");
        std::fs::create_dir_all(index_path.parent().expect("parent")).expect("mkdir");
        merge_into_index_file(
            &index_path,
            &[
                IndexEntry::Image(image.entry.clone()),
                IndexEntry::Kernel(kernel.entry.clone()),
            ],
        )
        .expect("write index");
        Fixture {
            _tmp: tmp,
            server,
            rootfs,
            work_seed,
            kernel_files,
            image: image.entry,
            image_bundle,
            index_path,
            root,
        }
    }

    fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    fn images(&self) -> PathBuf {
        self.root.join("state/images")
    }

    fn kernels(&self) -> PathBuf {
        self.root.join("state/kernels")
    }

    /// What the image store holds, hidden entries included.
    fn images_listing(&self) -> Vec<String> {
        listing(&self.images())
    }

    fn part_len(&self) -> Option<u64> {
        let entries = std::fs::read_dir(self.cache()).ok()?;
        let parts: Vec<_> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(parts.len() <= 1, "several .part files");
        parts.first().map(|e| e.metadata().expect("stat").len())
    }

    fn check_image(&self, dir: &Path) {
        let rootfs = dir.join("rootfs.ext4");
        assert!(std::fs::read(&rootfs).expect("rootfs") == self.rootfs);
        assert!(std::fs::read(dir.join("work-seed.ext4")).expect("seed") == self.work_seed);
        // ~2.7 MiB of data in a 16 MiB file: the copy must stay sparse.
        let used = std::fs::metadata(&rootfs).expect("stat").blocks() * 512;
        assert!(used < 4 * MIB, "rootfs uses {used} bytes on disk");
        let used = std::fs::metadata(dir.join("work-seed.ext4"))
            .expect("stat")
            .blocks()
            * 512;
        assert!(used < MIB, "work-seed uses {used} bytes on disk");
        assert!(dir.join("manifest.json").is_file());
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Records progress; fires `at_least` once the download has that many bytes.
fn recording_options(
    at_least: Option<(u64, oneshot::Sender<()>)>,
) -> (PullOptions, Arc<Mutex<Vec<Progress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let trigger = Mutex::new(at_least);
    let opts = PullOptions {
        progress: Arc::new({
            let seen = seen.clone();
            move |p| {
                seen.lock().expect("lock").push(p);
                if let Progress::Download { done, .. } = p {
                    let mut t = trigger.lock().expect("lock");
                    if t.as_ref().is_some_and(|(n, _)| done >= *n)
                        && let Some((_, tx)) = t.take()
                    {
                        let _ = tx.send(());
                    }
                }
            }
        }),
        cancel: CancellationToken::new(),
    };
    (opts, seen)
}

async fn with_timeout<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("pull finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_serve_pull_round_trip_keeps_files_identical_and_sparse() {
    let fx = Fixture::new().await;
    let url = url::Url::from_file_path(&fx.index_path)
        .expect("url")
        .to_string();
    let index = load_index(Some(&url)).await.expect("index from file://");
    let image = index.image("debian-bookworm").expect("image");
    let kernel = index.kernel(&image.kernel).expect("kernel");

    let (opts, seen) = recording_options(None);
    let pk = with_timeout(pull_kernel(kernel, &fx.cache(), &fx.kernels(), &opts))
        .await
        .expect("pull kernel");
    assert_eq!(pk.dir, fx.kernels().join("generic-6.12"));
    assert_eq!(pk.release, "6.12.8");
    for (name, data) in &fx.kernel_files {
        assert!(
            std::fs::read(pk.dir.join(name)).expect("kernel file") == *data,
            "{name}"
        );
    }
    assert_eq!(pk.kernel, pk.dir.join("vmlinuz"));
    assert_eq!(pk.initrd, Some(pk.dir.join("initrd.img")));
    assert_eq!(pk.vmlinux, Some(pk.dir.join("vmlinux")));
    assert_eq!(pk.modules, Some(pk.dir.join("modules.tar")));
    assert_eq!(pk.config, Some(pk.dir.join("config")));

    seen.lock().expect("lock").clear();
    let pi = with_timeout(pull_image(image, &fx.cache(), &fx.images(), &opts))
        .await
        .expect("pull image");
    assert_eq!(pi.dir, fx.images().join("debian-bookworm"));
    assert_eq!(pi.rootfs, pi.dir.join("rootfs.ext4"));
    assert_eq!(pi.work_seed, Some(pi.dir.join("work-seed.ext4")));
    assert_eq!(pi.size_bytes, 16 * MIB);
    assert_eq!(pi.manifest.kernel, "generic-6.12");
    fx.check_image(&pi.dir);
    assert_eq!(fx.images_listing(), ["debian-bookworm"]);
    assert_eq!(fx.part_len(), None, "the bundle is not kept after a pull");

    let seen = seen.lock().expect("lock").clone();
    let total = fx.image_bundle.len() as u64;
    assert_eq!(seen.first(), Some(&Progress::Download { done: 0, total }));
    assert!(seen.contains(&Progress::Download { done: total, total }));
    let unpacked = 20 * MIB;
    assert_eq!(
        seen.last(),
        Some(&Progress::Extract {
            done: unpacked,
            total: unpacked
        })
    );
    let downloads: Vec<u64> = seen
        .iter()
        .filter_map(|p| match p {
            Progress::Download { done, .. } => Some(*done),
            _ => None,
        })
        .collect();
    assert!(downloads.is_sorted(), "{downloads:?}");

    // A second pull does not overwrite what is there; what is there can be
    // opened as a complete pull, until a file goes missing.
    let err = pull_image(image, &fx.cache(), &fx.images(), &opts)
        .await
        .expect_err("exists");
    assert!(matches!(err, CatalogError::Exists(_)), "{err}");
    assert_eq!(
        PulledImage::open(&fx.images(), "debian-bookworm"),
        Some(pi.clone())
    );
    assert_eq!(PulledKernel::open(&fx.kernels(), "generic-6.12"), Some(pk));
    std::fs::remove_file(&pi.rootfs).expect("rm");
    assert_eq!(PulledImage::open(&fx.images(), "debian-bookworm"), None);
    assert_eq!(
        PulledImage::open(&fx.images(), "../images/debian-bookworm"),
        None
    );
    assert_eq!(fx.server.ranges(), [None, None]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_download_resumes_from_the_part_file() {
    let fx = Fixture::new().await;
    fx.server.set_mode(Mode::DropHalfway { then: "range" });
    let (tx_gate, go) = (fx.server.gate(), MIB);
    let (opts, _) = recording_options(Some((go, tx_gate)));
    let err = with_timeout(pull_image(&fx.image, &fx.cache(), &fx.images(), &opts))
        .await
        .expect_err("connection dropped");
    assert!(matches!(err, CatalogError::Incomplete { .. }), "{err}");
    assert!(
        err.to_string().contains("run the pull again to resume"),
        "{err}"
    );
    let kept = fx.part_len().expect("the .part is kept");
    let half = fx.image_bundle.len() as u64 / 2;
    assert!((MIB..=half).contains(&kept), "kept {kept} bytes");
    assert!(fx.images_listing().is_empty(), "{:?}", fx.images_listing());

    let (opts, seen) = recording_options(None);
    let pi = with_timeout(pull_image(&fx.image, &fx.cache(), &fx.images(), &opts))
        .await
        .expect("resumed pull");
    fx.check_image(&pi.dir);
    assert_eq!(fx.server.ranges(), [None, Some(format!("bytes={kept}-"))]);
    let first = seen.lock().expect("lock")[0];
    assert_eq!(
        first,
        Progress::Download {
            done: kept,
            total: fx.image_bundle.len() as u64
        }
    );
    assert_eq!(fx.part_len(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_range_makes_the_download_start_over() {
    let fx = Fixture::new().await;
    fx.server.set_mode(Mode::DropHalfway {
        then: "ignore-range",
    });
    let (opts, _) = recording_options(Some((MIB, fx.server.gate())));
    with_timeout(pull_image(&fx.image, &fx.cache(), &fx.images(), &opts))
        .await
        .expect_err("connection dropped");
    let kept = fx.part_len().expect("the .part is kept");
    assert!(kept >= MIB);

    let pi = with_timeout(pull_image(
        &fx.image,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    ))
    .await
    .expect("pull over a 200 answer");
    fx.check_image(&pi.dir);
    // The range was asked for, refused by a plain 200, and the file rewritten.
    assert_eq!(fx.server.ranges(), [None, Some(format!("bytes={kept}-"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_keeps_the_part_file_for_a_resume() {
    let fx = Fixture::new().await;
    fx.server.set_mode(Mode::StallHalfway);
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let (opts, _) = recording_options(Some((MIB, cancel_tx)));
    let cancel = opts.cancel.clone();
    let (cache, images, image) = (fx.cache(), fx.images(), fx.image.clone());
    let second = tokio::spawn(async move {
        cancel_rx.await.expect("the first pull got a MiB");
        // While the first pull holds the download, a second one is turned
        // away rather than writing into the same .part.
        let second = pull_image(&image, &cache, &images, &PullOptions::default()).await;
        cancel.cancel();
        second
    });
    let err = with_timeout(pull_image(&fx.image, &fx.cache(), &fx.images(), &opts))
        .await
        .expect_err("cancelled");
    assert!(matches!(err, CatalogError::Cancelled), "{err}");
    let second = second.await.expect("second pull");
    assert!(matches!(second, Err(CatalogError::Busy(_))), "{second:?}");
    let kept = fx.part_len().expect("the .part is kept");
    assert!(kept >= MIB, "kept {kept}");
    assert!(fx.images_listing().is_empty());
    let pi = with_timeout(pull_image(
        &fx.image,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    ))
    .await
    .expect("resumed");
    fx.check_image(&pi.dir);
    assert_eq!(fx.server.ranges()[1], Some(format!("bytes={kept}-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_bundle_is_refused_and_leaves_nothing() {
    let fx = Fixture::new().await;
    let file = fx
        .image
        .url
        .rsplit('/')
        .next()
        .expect("file name")
        .to_string();
    let mut bad = fx.image_bundle.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    fx.server.put(&file, bad);
    let err = with_timeout(pull_image(
        &fx.image,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    ))
    .await
    .expect_err("corrupt");
    match &err {
        CatalogError::Sha256Mismatch { expected, .. } => assert_eq!(expected, &fx.image.sha256),
        other => panic!("expected a sha256 error, got {other}"),
    }
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(fx.images_listing().is_empty(), "{:?}", fx.images_listing());
    assert_eq!(fx.part_len(), None, "a corrupt download is not resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_bundle_is_refused_and_leaves_nothing() {
    let fx = Fixture::new().await;
    let file = fx
        .image
        .url
        .rsplit('/')
        .next()
        .expect("file name")
        .to_string();
    let short = fx.image_bundle[..fx.image_bundle.len() - 1000].to_vec();
    fx.server.put(&file, short);
    let err = with_timeout(pull_image(
        &fx.image,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    ))
    .await
    .expect_err("truncated");
    assert!(
        matches!(err, CatalogError::SizeMismatch { actual, expected, .. }
            if actual + 1000 == expected),
        "{err}"
    );
    assert!(fx.images_listing().is_empty());
    assert_eq!(fx.part_len(), None);

    // A bundle missing from the server is a clear HTTP error.
    let mut gone = fx.image.clone();
    gone.url = format!("{}/nope.tar.zst", fx.server.base);
    let err = pull_image(&gone, &fx.cache(), &fx.images(), &PullOptions::default())
        .await
        .expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
    assert!(fx.images_listing().is_empty());
}

type TarEntry = (tar::Header, Vec<u8>);

/// A zstd tar of `entries` (header, data) and an index entry for it.
fn hostile_bundle(server: &Server, name: &str, entries: Vec<TarEntry>) -> ImageEntry {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    {
        let mut tar = tar::Builder::new(&mut enc);
        for (h, data) in entries {
            tar.append(&h, &data[..]).expect("append");
        }
        tar.finish().expect("finish");
    }
    let bytes = enc.finish().expect("zstd finish");
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = format!("{name}.tar.zst");
    let entry = ImageEntry {
        name: "debian-bookworm".into(),
        description: String::new(),
        url: format!("{}/{file}", server.base),
        sha256: sha,
        size: bytes.len() as u64,
        kernel: "generic-6.12".into(),
        arch: std::env::consts::ARCH.into(),
    };
    server.put(&file, bytes);
    entry
}

/// A header with a raw name (tar::Header::set_path refuses `..`).
fn raw_header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let gnu = h.as_gnu_mut().expect("gnu");
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

fn file_entry(name: &str, data: &[u8]) -> TarEntry {
    (
        raw_header(name, tar::EntryType::Regular, data.len() as u64),
        data.to_vec(),
    )
}

fn link_entry(name: &str, kind: tar::EntryType, target: &str) -> TarEntry {
    let mut h = raw_header(name, kind, 0);
    h.set_link_name(target).expect("link name");
    h.set_cksum();
    (h, Vec::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tar_entries_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start().await;
    let rootfs = vec![7u8; 8192];
    let manifest = |files: &[(&str, &[u8])]| {
        let files: Vec<_> = files
            .iter()
            .map(|(n, d)| {
                serde_json::json!({
                    "name": n,
                    "size": d.len(),
                    "sha256": Sha256::digest(d).iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    "data_bytes": d.len(),
                })
            })
            .collect();
        let m = serde_json::json!({
            "version": 1,
            "name": "debian-bookworm",
            "kernel": "generic-6.12",
            "files": files,
            "created_at": "2026-11-23T10:00:00Z",
            "banger_version": "v0.1.0",
        });
        file_entry("manifest.json", m.to_string().as_bytes())
    };
    let good_manifest = manifest(&[("rootfs.ext4", &rootfs)]);
    let good_rootfs = file_entry("rootfs.ext4", &rootfs);
    let cases: Vec<(&str, Vec<TarEntry>, &str)> = vec![
        (
            "dotdot",
            vec![
                good_manifest.clone(),
                file_entry("../evil", b"x"),
                good_rootfs.clone(),
            ],
            "climbs out",
        ),
        (
            "absolute",
            vec![
                good_manifest.clone(),
                file_entry("/tmp/evil", b"x"),
                good_rootfs.clone(),
            ],
            "absolute path",
        ),
        (
            "subdir",
            vec![good_manifest.clone(), file_entry("a/rootfs.ext4", &rootfs)],
            "not a plain file name",
        ),
        (
            "symlink",
            vec![
                good_manifest.clone(),
                link_entry("rootfs.ext4", tar::EntryType::Symlink, "/etc/passwd"),
            ],
            "symbolic link",
        ),
        (
            "hardlink",
            vec![
                good_manifest.clone(),
                link_entry("rootfs.ext4", tar::EntryType::Link, "/etc/passwd"),
            ],
            "hard link",
        ),
        (
            "device",
            vec![
                good_manifest.clone(),
                (
                    raw_header("rootfs.ext4", tar::EntryType::Block, 0),
                    Vec::new(),
                ),
            ],
            "a device",
        ),
        (
            "extra",
            vec![
                good_manifest.clone(),
                good_rootfs.clone(),
                file_entry("extra.txt", b"x"),
            ],
            "\"extra.txt\", which its manifest.json does not list",
        ),
        (
            "duplicate",
            vec![
                good_manifest.clone(),
                good_rootfs.clone(),
                good_rootfs.clone(),
            ],
            "\"rootfs.ext4\" twice",
        ),
        (
            "manifest-twice",
            vec![
                good_manifest.clone(),
                good_manifest.clone(),
                good_rootfs.clone(),
            ],
            "manifest.json twice",
        ),
        (
            "manifest-not-first",
            vec![good_rootfs.clone(), good_manifest.clone()],
            "first entry is \"rootfs.ext4\"",
        ),
        (
            "missing-file",
            vec![good_manifest.clone()],
            "ends without rootfs.ext4",
        ),
        (
            "content-differs",
            vec![
                good_manifest.clone(),
                file_entry("rootfs.ext4", &[8u8; 8192]),
            ],
            "rootfs.ext4 has sha256",
        ),
        (
            "unlisted-kind-of-file",
            vec![
                manifest(&[("rootfs.ext4", &rootfs), ("evil.sh", b"x")]),
                good_rootfs.clone(),
            ],
            "lists \"evil.sh\"; image bundles hold only",
        ),
    ];
    let (cache, images) = (tmp.path().join("cache"), tmp.path().join("images"));
    for (name, entries, expect) in cases {
        let entry = hostile_bundle(&server, name, entries);
        let err = with_timeout(pull_image(&entry, &cache, &images, &PullOptions::default()))
            .await
            .expect_err(name);
        assert!(
            matches!(err, CatalogError::BadBundle { .. }) && err.to_string().contains(expect),
            "{name}: {err}"
        );
        assert!(
            listing(&images).is_empty(),
            "{name}: {:?}",
            listing(&images)
        );
        assert!(listing(&cache).is_empty(), "{name}: {:?}", listing(&cache));
    }
    assert!(!tmp.path().join("evil").exists());
    assert!(!Path::new("/tmp/evil").exists());

    // The same set of entries, correctly formed, is accepted.
    let entry = hostile_bundle(&server, "good", vec![good_manifest, good_rootfs]);
    let pi = pull_image(&entry, &cache, &images, &PullOptions::default())
        .await
        .expect("good bundle");
    assert_eq!(std::fs::read(pi.rootfs).expect("read"), rootfs);
    assert_eq!(pi.work_seed, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_over_http_is_validated_and_bundles_may_be_file_urls() {
    let fx = Fixture::new().await;
    let text = std::fs::read_to_string(&fx.index_path).expect("read index");
    fx.server.put("index.json", text.clone());
    let url = format!("{}/index.json", fx.server.base);
    let index = load_index(Some(&url)).await.expect("index over http");
    assert_eq!(
        index.image("alpine").expect_err("missing").to_string(),
        r#"image "alpine" is not in the catalog (catalog has: debian-bookworm)"#
    );

    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["images"][0]["mirror"] = serde_json::json!("x");
    fx.server.put("bad.json", v.to_string());
    let err = load_index(Some(&format!("{}/bad.json", fx.server.base)))
        .await
        .expect_err("unknown field");
    assert!(
        matches!(err, CatalogError::BadIndex { .. })
            && err.to_string().contains("unknown field `mirror`"),
        "{err}"
    );
    let err = load_index(Some(&format!("{}/missing.json", fx.server.base)))
        .await
        .expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");

    // A bundle published on a local path pulls the same way.
    let bundle = fx.root.join("out/local.tar.zst");
    std::fs::File::create(&bundle)
        .and_then(|mut f| f.write_all(&fx.image_bundle))
        .expect("write");
    let mut local = fx.image.clone();
    local.url = url::Url::from_file_path(&bundle).expect("url").to_string();
    let pi = with_timeout(pull_image(
        &local,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    ))
    .await
    .expect("pull from file://");
    fx.check_image(&pi.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_do_not_match_their_bundle_are_refused() {
    let fx = Fixture::new().await;
    // Right bundle, wrong kernel in the entry: the bundle's manifest wins
    // nothing; the pull fails and the store stays empty.
    let mut wrong = fx.image.clone();
    wrong.kernel = "generic-6.1".into();
    let err = pull_image(&wrong, &fx.cache(), &fx.images(), &PullOptions::default())
        .await
        .expect_err("kernel mismatch");
    assert!(err.to_string().contains("\"generic-6.1\""), "{err}");
    assert!(fx.images_listing().is_empty());

    let mut other_arch = fx.image.clone();
    other_arch.arch = "riscv64".into();
    let err = pull_image(
        &other_arch,
        &fx.cache(),
        &fx.images(),
        &PullOptions::default(),
    )
    .await
    .expect_err("arch");
    assert!(matches!(err, CatalogError::WrongArch { .. }), "{err}");

    let mut renamed = fx.image.clone();
    renamed.name = "ubuntu".into();
    let err = pull_image(&renamed, &fx.cache(), &fx.images(), &PullOptions::default())
        .await
        .expect_err("name");
    assert!(err.to_string().contains("\"debian-bookworm\""), "{err}");
    assert!(fx.images_listing().is_empty());
}

fn run(tool: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (e2fsprogs) must be installed: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_ext4_image_survives_bundle_and_pull_sparse_and_clean() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(tree.join("etc/hostname"), "banger\n").expect("write");
    random_file(&tree.join("blob"), 300_000);
    let rootfs = tmp.path().join("rootfs.ext4");
    std::fs::File::create(&rootfs)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("create");
    run(
        "mkfs.ext4",
        &["-q", "-F", "-d"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([tree.as_os_str(), rootfs.as_os_str()])
            .collect::<Vec<_>>(),
    );
    let server = Server::start().await;
    let cancel = CancellationToken::new();
    let bundled = bundle_image(
        &ImageBundleRequest {
            name: "ext4-test".into(),
            description: String::new(),
            kernel: "generic-6.12".into(),
            rootfs: rootfs.clone(),
            work_seed: None,
            out_dir: tmp.path().join("out"),
            base_url: server.base.clone(),
        },
        &cancel,
    )
    .await
    .expect("bundle");
    let file = bundled
        .path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    server.put(&file, std::fs::read(&bundled.path).expect("read"));
    let rootfs_manifest = bundled
        .manifest
        .file("rootfs.ext4")
        .expect("listed")
        .clone();
    assert!(rootfs_manifest.data_bytes < 16 * MIB, "{rootfs_manifest:?}");

    let images = tmp.path().join("images");
    let pi = with_timeout(pull_image(
        &bundled.entry,
        &tmp.path().join("cache"),
        &images,
        &PullOptions::default(),
    ))
    .await
    .expect("pull");
    assert!(std::fs::read(&pi.rootfs).expect("read") == std::fs::read(&rootfs).expect("read"));
    let used = std::fs::metadata(&pi.rootfs).expect("stat").blocks() * 512;
    assert!(
        used <= rootfs_manifest.data_bytes + MIB,
        "pulled rootfs uses {used} bytes, {} of data",
        rootfs_manifest.data_bytes
    );
    run("e2fsck", &["-fn".as_ref(), pi.rootfs.as_os_str()]);
    let cat = run(
        "debugfs",
        &[
            "-R".as_ref(),
            "cat /etc/hostname".as_ref(),
            pi.rootfs.as_os_str(),
        ],
    );
    assert!(cat.contains("banger"), "{cat}");
}
