//! Images and kernels through the daemon's API, without booting guests:
//! register, update in place, in-use refusals, deletion, and the publish
//! path (bundle) served from a local HTTP server and pulled by a second
//! daemon through the catalog.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use banger_config::{Config, Paths};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tower::ServiceExt;

struct D {
    _t: tempfile::TempDir,
    paths: Paths,
    router: axum::Router,
}

fn daemon(config: Config) -> D {
    let t = tempfile::tempdir().expect("tmp");
    let paths = Paths::under(t.path());
    let d = banger_daemon::Daemon::new(config, paths.clone()).expect("daemon");
    let (router, _) = banger_daemon::server::router(d);
    D {
        _t: t,
        paths,
        router,
    }
}

impl D {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_default();
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes.to_vec())
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, bytes) = self.call(method.clone(), path, body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{method} {path}: {}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).expect("json")
    }

    /// Status and the daemon's error message.
    async fn err(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, String) {
        let (status, bytes) = self.call(method, path, body).await;
        let e: banger_api::ApiError = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not an ApiError: {}", String::from_utf8_lossy(&bytes)));
        (status, e.message)
    }

    /// Runs an NDJSON operation to its end; its final event.
    async fn operation(&self, path: &str, body: Value) -> Value {
        let (status, bytes) = self.call(Method::POST, path, Some(body)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let text = String::from_utf8(bytes).expect("utf8");
        let last = text
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .expect("events");
        serde_json::from_str(last).expect("event json")
    }
}

/// The fake vmlinux inside [`fake_bzimage`]'s payload.
const FAKE_VMLINUX: &[u8] = b"\x7fELF\x02\x01\x01\x00 a kernel that boots nothing";

/// A bzImage of release `release` whose payload is [`FAKE_VMLINUX`].
fn fake_bzimage(path: &Path, release: &str) {
    let img = banger_image::vmlinux::fake_bzimage(release, FAKE_VMLINUX);
    std::fs::write(path, img).expect("kernel");
}

/// Entries of a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Files {
    _t: tempfile::TempDir,
    rootfs: PathBuf,
    seed: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    dir: PathBuf,
}

fn files() -> Files {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().to_path_buf();
    let rootfs = dir.join("rootfs.ext4");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&rootfs, &data).expect("rootfs");
    let seed = dir.join("seed.ext4");
    std::fs::write(&seed, b"seed").expect("seed");
    let kernel = dir.join("bzImage");
    fake_bzimage(&kernel, "6.12.9-test");
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, b"initrd").expect("initrd");
    Files {
        _t: t,
        rootfs,
        seed,
        kernel,
        initrd,
        dir,
    }
}

#[tokio::test]
async fn register_update_refuse_and_delete() {
    let d = daemon(Config::default());
    let f = files();
    let reg = |extra: Value| {
        let mut base = json!({"name": "small", "rootfs": s(&f.rootfs), "kernel": s(&f.kernel), "initrd": s(&f.initrd)});
        for (k, v) in extra.as_object().expect("obj") {
            base[k] = v.clone();
        }
        base
    };
    let img = d
        .ok(Method::POST, "/v1/images/register", Some(reg(json!({}))))
        .await;
    assert_eq!(img["kernel"], "small");
    assert_eq!(img["managed"], false);
    assert_eq!(img["work_seed"], Value::Null);
    let k = d.ok(Method::GET, "/v1/kernels/small", None).await;
    assert_eq!(k["release"], "6.12.9-test");
    assert_eq!(k["initrd"], s(&f.initrd));
    // Firecracker's vmlinux, extracted into a directory banger made.
    let vmlinux = PathBuf::from(k["vmlinux"].as_str().expect("vmlinux recorded"));
    assert_eq!(std::fs::read(&vmlinux).expect("vmlinux"), FAKE_VMLINUX);
    assert_eq!(
        vmlinux.parent().and_then(Path::parent),
        Some(d.paths.kernels_dir.as_path())
    );
    assert_eq!(k["dir"], s(vmlinux.parent().expect("dir")));

    // Re-register: updated in place.
    let img = d
        .ok(
            Method::POST,
            "/v1/images/register",
            Some(reg(json!({"work_seed": s(&f.seed)}))),
        )
        .await;
    assert_eq!(img["work_seed"], s(&f.seed));
    let list = d.ok(Method::GET, "/v1/images", None).await;
    assert_eq!(list.as_array().expect("list").len(), 1);

    // Bad input, each with a message saying what is wrong.
    for (body, needle) in [
        (
            reg(json!({"rootfs": s(&f.dir.join("missing"))})),
            "does not exist",
        ),
        (reg(json!({"rootfs": s(&f.dir)})), "not a regular file"),
        (reg(json!({"rootfs": "rel/rootfs.ext4"})), "absolute path"),
        (reg(json!({"name": "Bad Name"})), "is not valid"),
        (reg(json!({"kernel_ref": "small"})), "not both"),
        (
            json!({"name": "x", "rootfs": s(&f.rootfs)}),
            "--kernel-ref NAME",
        ),
        (
            json!({"name": "x", "rootfs": s(&f.rootfs), "kernel_ref": "nope"}),
            "no kernel named nope",
        ),
    ] {
        let (status, msg) = d.err(Method::POST, "/v1/images/register", Some(body)).await;
        assert!(status.is_client_error(), "{status} {msg}");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }

    // A second image on the first one's kernel.
    d.ok(
        Method::POST,
        "/v1/images/register",
        Some(json!({"name": "other", "rootfs": s(&f.rootfs), "kernel_ref": "small"})),
    )
    .await;
    let (status, msg) = d.err(Method::DELETE, "/v1/kernels/small", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(msg.contains("in use by image other, image small"), "{msg}");

    // Unmanaged images lose only their record.
    d.ok(Method::DELETE, "/v1/images/other", None).await;
    d.ok(Method::DELETE, "/v1/images/small?force=false", None)
        .await;
    assert!(f.rootfs.is_file() && f.kernel.is_file());
    let (status, _) = d.err(Method::DELETE, "/v1/images/small", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    d.ok(Method::DELETE, "/v1/kernels/small", None).await;
    assert!(f.kernel.is_file(), "a registered kernel's file is not ours");
    assert!(
        !vmlinux.exists(),
        "the vmlinux banger extracted goes with it"
    );
    assert_eq!(entries(&d.paths.kernels_dir), Vec::<String>::new());
    let (status, msg) = d.err(Method::GET, "/v1/kernels/small", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{msg}");
}

/// Ids of the templates the API lists for `image`.
async fn template_ids(d: &D, image: &str) -> Vec<String> {
    let list = d
        .ok(Method::GET, &format!("/v1/images/{image}/templates"), None)
        .await;
    list.as_array()
        .expect("array")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_string())
        .collect()
}

/// Warm-start templates go with their image: registering it again (its
/// files may have changed) or deleting it removes each template's row and
/// directory, and leaves other images' templates alone. (A template of an
/// image whose files changed under the same record is refused by its key
/// at the next use: `warm::header` tests, e2e `warm`.)
#[tokio::test]
async fn templates_go_with_their_image() {
    let d = daemon(Config::default());
    let f = files();
    let reg = |name: &str| json!({"name": name, "rootfs": s(&f.rootfs), "kernel": s(&f.kernel), "initrd": s(&f.initrd)});
    for name in ["small", "other"] {
        d.ok(Method::POST, "/v1/images/register", Some(reg(name)))
            .await;
    }
    // A template as a build leaves it: a row and a directory of files. The
    // daemon's store is SQLite; a second connection sees its writes.
    let store = banger_store::Store::open(&d.paths.db).expect("store");
    let plant = |id: &str, image: &str| -> PathBuf {
        let dir = d.paths.state_dir.join("templates").join(id);
        std::fs::create_dir_all(&dir).expect("template dir");
        for file in ["template.json", "memory", "overlay.ext4", "work.ext4"] {
            std::fs::write(dir.join(file), file).expect("template file");
        }
        let t = banger_model::TemplateRecord {
            id: id.into(),
            image: image.into(),
            backend: banger_model::VmBackend::Qemu,
            shape: banger_model::TemplateShape {
                vcpu: 1,
                memory_mib: 1024,
            },
            disk_bytes: 8 << 30,
            dir: dir.clone(),
            state: banger_model::TemplateState::Ready,
            size_bytes: 4096,
            build_ms: Some(1000),
            created_at: "2026-12-06T08:00:00Z".into(),
            last_used_at: None,
            uses: 0,
        };
        store.upsert_template(&t, "{}").expect("template row");
        dir
    };
    let small = plant("00000000000000a1", "small");
    let other = plant("00000000000000b1", "other");
    assert_eq!(template_ids(&d, "small").await, ["00000000000000a1"]);

    // Registered again: the old contents' templates are gone.
    d.ok(Method::POST, "/v1/images/register", Some(reg("small")))
        .await;
    assert_eq!(template_ids(&d, "small").await, Vec::<String>::new());
    assert!(!small.exists(), "template directory left behind");
    assert_eq!(template_ids(&d, "other").await, ["00000000000000b1"]);
    assert!(other.is_dir());

    // Deleted: its templates go with it, the other image's stay.
    let small = plant("00000000000000a2", "small");
    d.ok(Method::DELETE, "/v1/images/small", None).await;
    assert!(!small.exists(), "template directory left behind");
    let (status, msg) = d.err(Method::GET, "/v1/images/small/templates", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{msg}");
    let rows: Vec<String> = store
        .list_templates(None)
        .expect("rows")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(rows, ["00000000000000b1"]);
    assert!(other.is_dir());

    // Dropped through the API: row and directory.
    let dropped = d
        .ok(Method::DELETE, "/v1/images/other/templates", None)
        .await;
    assert_eq!(dropped[0]["id"], "00000000000000b1");
    assert!(!other.exists(), "template directory left behind");
    assert_eq!(template_ids(&d, "other").await, Vec::<String>::new());
}

#[tokio::test]
async fn registered_kernels_for_firecracker() {
    let d = daemon(Config::default());
    let f = files();
    let reg = |name: &str, kernel: &Path| json!({"name": name, "rootfs": s(&f.rootfs), "kernel": s(kernel)});

    // An ELF vmlinux is Firecracker's kernel as it is; nothing is copied.
    let elf = f.dir.join("vmlinux");
    std::fs::write(&elf, FAKE_VMLINUX).expect("elf");
    d.ok(Method::POST, "/v1/images/register", Some(reg("elf", &elf)))
        .await;
    let k = d.ok(Method::GET, "/v1/kernels/elf", None).await;
    assert_eq!(k["vmlinux"], s(&elf));
    assert_eq!(k["dir"], Value::Null);
    assert_eq!(entries(&d.paths.kernels_dir), Vec::<String>::new());

    // A kernel no vmlinux can be taken from is refused, and nothing stays.
    let bad = f.dir.join("bad-bzImage");
    let mut junk = std::fs::read(&f.kernel).expect("kernel");
    let end = junk.len();
    junk[0xa00..end].fill(0x5a);
    std::fs::write(&bad, junk).expect("bad kernel");
    let (status, msg) = d
        .err(Method::POST, "/v1/images/register", Some(reg("bad", &bad)))
        .await;
    // The request is well formed; the file it names is no kernel.
    assert_eq!(status, StatusCode::CONFLICT, "{msg}");
    assert!(msg.contains("cannot be booted by Firecracker"), "{msg}");
    assert!(msg.contains("unknown format"), "{msg}");
    assert_eq!(
        msg.matches("cannot be booted").count(),
        1,
        "said once: {msg}"
    );
    for path in ["/v1/images/bad", "/v1/kernels/bad"] {
        let (status, _) = d.err(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(entries(&d.paths.kernels_dir), Vec::<String>::new());

    // Ownership comes from the record, never from where a path points:
    // a kernel registered from inside another kernel's directory is the
    // user's file, and deleting it leaves that directory alone.
    d.ok(
        Method::POST,
        "/v1/images/register",
        Some(reg("bz", &f.kernel)),
    )
    .await;
    let bz = d.ok(Method::GET, "/v1/kernels/bz", None).await;
    let bz_vmlinux = PathBuf::from(bz["vmlinux"].as_str().expect("vmlinux"));
    d.ok(
        Method::POST,
        "/v1/images/register",
        Some(reg("borrower", &bz_vmlinux)),
    )
    .await;
    d.ok(Method::DELETE, "/v1/images/borrower", None).await;
    d.ok(Method::DELETE, "/v1/kernels/borrower", None).await;
    assert!(bz_vmlinux.is_file(), "kernel bz's vmlinux was removed");
    // The review's case: `--kernel kernels/K/vmlinuz`, a bzImage in another
    // kernel's directory. Its vmlinux goes to a directory of its own, and
    // deleting the borrower removes that one only.
    let k_dir = bz_vmlinux.parent().expect("bz's dir").to_path_buf();
    let k_bzimage = k_dir.join("vmlinuz");
    std::fs::copy(&f.kernel, &k_bzimage).expect("copy");
    d.ok(
        Method::POST,
        "/v1/images/register",
        Some(reg("borrower2", &k_bzimage)),
    )
    .await;
    let b2 = d.ok(Method::GET, "/v1/kernels/borrower2", None).await;
    assert_ne!(b2["dir"], s(&k_dir), "{b2}");
    d.ok(Method::DELETE, "/v1/images/borrower2", None).await;
    d.ok(Method::DELETE, "/v1/kernels/borrower2", None).await;
    assert!(
        k_bzimage.is_file() && bz_vmlinux.is_file(),
        "K's directory was removed"
    );
    std::fs::remove_file(&k_bzimage).expect("rm");

    // Re-registering a name replaces its extracted vmlinux.
    let before = entries(&d.paths.kernels_dir);
    assert_eq!(before.len(), 1, "{before:?}");
    d.ok(
        Method::POST,
        "/v1/images/register",
        Some(reg("bz", &f.kernel)),
    )
    .await;
    let after = entries(&d.paths.kernels_dir);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(before, after);
}

/// Serves the files of `dir` on 127.0.0.1 (no directory listing).
async fn serve_dir(dir: PathBuf) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/{file}",
        axum::routing::get(
            move |axum::extract::Path(file): axum::extract::Path<String>| {
                let dir = dir.clone();
                async move {
                    if file.contains('/') || file.starts_with('.') {
                        return Err(StatusCode::NOT_FOUND);
                    }
                    tokio::fs::read(dir.join(file))
                        .await
                        .map_err(|_| StatusCode::NOT_FOUND)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), h)
}

#[tokio::test]
async fn bundle_serve_and_pull_through_the_catalog() {
    let f = files();
    let publisher = daemon(Config::default());
    publisher
        .ok(
            Method::POST,
            "/v1/images/register",
            Some(
                json!({"name": "small", "rootfs": s(&f.rootfs), "work_seed": s(&f.seed),
                        "kernel": s(&f.kernel), "initrd": s(&f.initrd)}),
            ),
        )
        .await;
    let out = tempfile::tempdir().expect("out");
    let (base, server) = serve_dir(out.path().to_path_buf()).await;
    let index = out.path().join("index.json");
    // An image bundle needs its kernel in the index first.
    let ev = publisher
        .operation(
            "/v1/images/small/bundle",
            json!({"out_dir": s(out.path()), "base_url": base, "index": s(&index)}),
        )
        .await;
    let msg = ev["error"]["message"].as_str().expect("error");
    assert!(msg.contains("banger kernel bundle small"), "{msg}");
    for path in ["/v1/kernels/small/bundle", "/v1/images/small/bundle"] {
        let ev = publisher
            .operation(
                path,
                json!({"out_dir": s(out.path()), "base_url": base, "index": s(&index),
                       "description": "a test image"}),
            )
            .await;
        let done = &ev["done"];
        assert!(done.is_object(), "{ev}");
        assert!(done["url"].as_str().expect("url").starts_with(&base));
        assert!(Path::new(done["path"].as_str().expect("path")).is_file());
    }
    let ix: Value =
        serde_json::from_str(&std::fs::read_to_string(&index).expect("index")).expect("json");
    assert_eq!(ix["images"][0]["name"], "small");
    assert_eq!(ix["kernels"][0]["release"], "6.12.9-test");

    let consumer = daemon(Config {
        catalog_url: Some(format!("{base}/index.json")),
        ..Config::default()
    });
    // Not in the catalog: one line naming what it has.
    let ev = consumer
        .operation("/v1/images/pull", json!({"reference": "nope"}))
        .await;
    let msg = ev["error"]["message"].as_str().expect("error");
    assert!(
        msg.contains("not in the catalog") && msg.contains("small"),
        "{msg}"
    );

    let ev = consumer
        .operation("/v1/images/pull", json!({"reference": "small"}))
        .await;
    let img = &ev["done"];
    assert_eq!(img["managed"], true, "{ev}");
    assert_eq!(img["kernel"], "small");
    let rootfs = PathBuf::from(img["rootfs"].as_str().expect("rootfs"));
    assert!(rootfs.starts_with(&consumer.paths.images_dir));
    assert_eq!(
        std::fs::read(&rootfs).expect("pulled"),
        std::fs::read(&f.rootfs).expect("orig")
    );
    assert!(PathBuf::from(img["work_seed"].as_str().expect("seed")).is_file());
    let k = consumer.ok(Method::GET, "/v1/kernels/small", None).await;
    let kfile = PathBuf::from(k["kernel"].as_str().expect("kernel"));
    assert!(kfile.starts_with(&consumer.paths.kernels_dir));

    // A second pull of the same name is refused, before any stream.
    let (status, msg) = consumer
        .err(
            Method::POST,
            "/v1/images/pull",
            Some(json!({"reference": "small"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{msg}");
    assert!(msg.contains("already exists"), "{msg}");

    // Managed: deleting removes the files.
    let (status, _) = consumer
        .err(Method::DELETE, "/v1/kernels/small", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    consumer.ok(Method::DELETE, "/v1/images/small", None).await;
    assert!(!rootfs.exists() && !rootfs.parent().expect("dir").exists());
    consumer.ok(Method::DELETE, "/v1/kernels/small", None).await;
    assert!(!kfile.exists());
    server.abort();
}

#[test]
fn image_and_kernel_routes_are_documented() {
    let t = tempfile::tempdir().expect("tmp");
    let d = banger_daemon::Daemon::new(Config::default(), Paths::under(t.path())).expect("daemon");
    let (_, doc) = banger_daemon::server::router(d);
    let doc = serde_json::to_value(doc).expect("doc");
    for (path, method) in [
        ("/v1/images/{image}", "get"),
        ("/v1/images/{image}", "delete"),
        ("/v1/images/pull", "post"),
        ("/v1/images/register", "post"),
        ("/v1/images/{image}/bundle", "post"),
        ("/v1/kernels/pull", "post"),
        ("/v1/kernels/{kernel}", "get"),
        ("/v1/kernels/{kernel}", "delete"),
        ("/v1/kernels/{kernel}/bundle", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
}
