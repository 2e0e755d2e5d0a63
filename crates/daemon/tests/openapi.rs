//! The OpenAPI document describes exactly the routes the daemon serves.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use banger_config::{Config, Paths};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn daemon() -> (tempfile::TempDir, axum::Router, serde_json::Value) {
    let t = tempfile::tempdir().expect("tmp");
    let paths = Paths::under(t.path());
    let d = banger_daemon::Daemon::new(Config::default(), paths).expect("daemon");
    let (router, doc) = banger_daemon::server::router(d);
    let doc = serde_json::to_value(doc).expect("doc json");
    (t, router, doc)
}

/// Sends `method path` with an empty body; returns status and body.
async fn send(router: &axum::Router, method: Method, path: &str) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, body)
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let (_t, router, doc) = daemon();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 8, "suspiciously few paths: {paths:?}");
    for (path, item) in paths {
        let concrete = path
            .replace("{vm}", "no-such-vm")
            .replace("{image}", "no-such-image");
        for (method, _) in item.as_object().expect("item") {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            if m == Method::POST && path == banger_api::paths::SHUTDOWN {
                continue; // would stop the daemon under test
            }
            let (status, body) = send(&router, m.clone(), &concrete).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path} documented but not routed"
            );
            if status == StatusCode::NOT_FOUND {
                // A 404 is fine only when it is the handler's own answer.
                let err: banger_api::ApiError = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| panic!("{m} {path}: 404 without an ApiError"));
                assert_eq!(err.code, "not_found");
                assert!(
                    !err.message.starts_with("no route"),
                    "{m} {path} documented but not routed"
                );
            }
        }
    }
}

#[tokio::test]
async fn undocumented_paths_are_not_routed() {
    let (_t, router, doc) = daemon();
    let documented: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    for probe in ["/v1/nope", "/v1/vms/{vm}/y/z", "/v2/vms"] {
        assert!(!documented.iter().any(|p| p.as_str() == probe));
        let (status, body) = send(&router, Method::GET, probe).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{probe}");
        // The router's own 404 speaks ApiError too, and says it is a route.
        let err: banger_api::ApiError = serde_json::from_slice(&body).expect("api error");
        assert_eq!(err.code, "not_found");
        assert!(err.message.starts_with("no route GET "), "{}", err.message);
    }
}

#[tokio::test]
async fn openapi_json_is_served_and_lists_the_vm_routes() {
    let (_t, router, doc) = daemon();
    let (status, body) = send(&router, Method::GET, banger_api::paths::OPENAPI).await;
    assert_eq!(status, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(served, doc);
    for p in [
        banger_api::paths::VMS,
        banger_api::paths::VM,
        banger_api::paths::VM_EXEC,
        banger_api::paths::INFO,
    ] {
        assert!(
            served["paths"].get(p).is_some(),
            "{p} missing from the document"
        );
    }
    assert!(served["components"]["schemas"].get("VmRecord").is_some());
}

#[tokio::test]
async fn errors_are_json_with_a_code() {
    let (_t, router, _) = daemon();
    let (status, body) = send(&router, Method::GET, "/v1/vms/ghost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err: banger_api::ApiError = serde_json::from_slice(&body).expect("api error");
    assert!(err.message.contains("ghost"), "{}", err.message);
}

/// The committed document (`docs/openapi.json`) is the served one: an API
/// change shows up in review as a change of that file. To accept a change,
/// run this test with `BANGER_UPDATE_OPENAPI=1` and commit the file.
#[tokio::test]
async fn committed_document_is_the_served_one() {
    let (_t, router, _) = daemon();
    let (status, body) = send(&router, Method::GET, banger_api::paths::OPENAPI).await;
    assert_eq!(status, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let pretty = serde_json::to_string_pretty(&served).expect("json") + "\n";
    if std::env::var_os("BANGER_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &pretty).expect("writing docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == pretty,
        "{} differs from the served document: if the API change is meant, run \
         `BANGER_UPDATE_OPENAPI=1 cargo test -p banger-daemon --test openapi` and commit the file",
        path.display()
    );
}

/// Sends `method path` with `content_type` and `body`; status and ApiError.
async fn send_body(
    router: &axum::Router,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (StatusCode, banger_api::ApiError, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method.clone()).uri(path);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{method} {path}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let err = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{method} {path}: not an ApiError: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, err, headers)
}

/// (method, path, content type, body, status, code, in message)
type Case<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    &'a str,
    u16,
    &'a str,
    &'a str,
);

/// Framework rejections answer with the same ApiError JSON as the
/// handlers, with a status the document lists, and a message naming what
/// was wrong.
#[tokio::test]
async fn framework_rejections_are_api_errors() {
    let (_t, router, doc) = daemon();
    let json = Some("application/json");
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (Method::POST, "/v1/vms", None, "{}", 415, "unsupported_media_type", "Content-Type"),
        (Method::POST, "/v1/vms", Some("text/plain"), "{}", 415, "unsupported_media_type", "application/json"),
        (Method::POST, "/v1/vms", json, "{not json", 400, "invalid", "JSON"),
        (Method::POST, "/v1/vms", json, r#"{"nmae": "x"}"#, 400, "invalid", "nmae"),
        (Method::POST, "/v1/vms", json, r#"{"vcpu": "two"}"#, 400, "invalid", "vcpu"),
        (Method::POST, "/v1/images/{image}/bundle", json, r#"{"out_dir": "/tmp"}"#, 400, "invalid", "base_url"),
        (Method::PATCH, "/v1/vms/{vm}", json, "{}", 400, "invalid", "nothing to change"),
        (Method::PATCH, "/v1/vms/{vm}", json, r#"{"vcpu": null}"#, 400, "invalid", "null"),
        (Method::POST, "/v1/vms/{vm}/kill", json, r#"{"signal": 99}"#, 400, "invalid", "signal 99"),
        (Method::POST, "/v1/vms/{vm}/kill", json, r#"{"signal": 24.5}"#, 400, "invalid", "not an integer"),
        // 24.0 is an integer to JSON Schema, so to the daemon too: the VM is what is missing.
        (Method::POST, "/v1/vms/{vm}/kill", json, r#"{"signal": 24.0}"#, 404, "not_found", "x"),
        (Method::PATCH, "/v1/vms/{vm}", json, r#"{"vcpu": 2.0}"#, 404, "not_found", "x"),
        (Method::POST, "/v1/vms/{vm}/sessions/{name}/attach", json, r#"{"size": {"rows": 70000, "cols": 80}}"#, 400, "invalid", "70000"),
        (Method::POST, "/v1/vms", json, r#"{"name": "Not_A_Label"}"#, 400, "invalid", "Not_A_Label"),
        (Method::POST, "/v1/vms", json, r#"{"disk_size": "16g"}"#, 400, "invalid", "disk size"),
        (Method::POST, "/v1/vms", json, r#"{"memory_mib": 99999999999}"#, 400, "invalid", "memory"),
        (Method::POST, "/v1/images/register", json, r#"{"name": "i", "rootfs": "/nonexistent", "kernel": "/k"}"#, 404, "not_found", "/nonexistent"),
        (Method::POST, "/v1/images/register", json, r#"{"name": "i", "rootfs": "/", "kernel": "/k"}"#, 409, "conflict", "not a regular file"),
        // Streamed operations refuse a bad request before their stream starts.
        (Method::POST, "/v1/images/pull", json, r#"{"reference": "a b"}"#, 400, "invalid", "reference"),
        (Method::POST, "/v1/images/pull", json, r#"{"reference": "debian", "kernel_ref": "k"}"#, 400, "invalid", "--kernel-ref"),
        (Method::POST, "/v1/kernels/pull", json, r#"{"name": "Bad Kernel"}"#, 400, "invalid", "kernel name"),
        (Method::POST, "/v1/images/build", json, r#"{"name": "-x"}"#, 400, "invalid", "image name"),
        (Method::POST, "/v1/images/{image}/bundle", json, r#"{"out_dir": "rel", "base_url": "file:///srv"}"#, 400, "invalid", "absolute"),
        (Method::POST, "/v1/images/{image}/bundle", json, r#"{"out_dir": "/tmp/o", "base_url": "file:///srv"}"#, 404, "not_found", "img"),
        (Method::POST, "/v1/kernels/{kernel}/bundle", json, r#"{"out_dir": "/tmp/o", "base_url": "ftp://x"}"#, 400, "invalid", "base URL"),
        (Method::GET, "/v1/vms/{vm}/stats?guest=maybe", None, "", 400, "invalid", "guest"),
        (Method::GET, "/v1/vms/{vm}/logs?source=disk", None, "", 400, "invalid", "source"),
        (Method::GET, "/v1/vms/{vm}/exec", None, "", 400, "invalid", "WebSocket"),
        (Method::GET, "/v1/vms/{vm}/files/put", None, "", 400, "invalid", "WebSocket"),
        (Method::POST, "/v1/vms/{vm}/sessions/{name}/stop", None, "", 400, "invalid", "session name"),
        (Method::PUT, "/v1/vms", None, "", 405, "method_not_allowed", "allowed"),
        (Method::DELETE, "/v1/info", None, "", 405, "method_not_allowed", "allowed"),
        (Method::GET, "/v1/no/such/route", None, "", 404, "not_found", "no route"),
    ];
    for (method, path, ct, body, status, code, needle) in cases {
        let concrete = path
            .replace("{image}", "img")
            .replace("{kernel}", "krn")
            .replace("{vm}", "x")
            .replace("{name}", "bad%20name");
        let (s, err, headers) = send_body(&router, method.clone(), &concrete, *ct, body).await;
        assert_eq!(
            (s.as_u16(), err.code.as_str()),
            (*status, *code),
            "{method} {path} {body}: {}",
            err.message
        );
        assert!(
            err.message.contains(needle),
            "{method} {path} {body}: {:?} does not say {needle:?}",
            err.message
        );
        assert!(!err.message.contains('\n'), "{}", err.message);
        if *status == 405 {
            assert!(
                headers.get("allow").is_some(),
                "{method} {path}: no Allow header"
            );
            continue;
        }
        if err.message.starts_with("no route") {
            continue;
        }
        // The document lists the status for this operation.
        let template = path.split('?').next().unwrap_or(path);
        let op = &doc["paths"][template][method.as_str().to_lowercase()];
        assert!(
            op["responses"].get(status.to_string()).is_some(),
            "{method} {path}: {status} is not in the document"
        );
    }
}

/// The rules the daemon checks are in the schema, from the same constants.
#[tokio::test]
async fn document_states_the_rules() {
    let (_t, _router, doc) = daemon();
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreateVmRequest"]["properties"];
    assert_eq!(create["name"]["pattern"], banger_model::VM_NAME_PATTERN);
    assert_eq!(create["name"]["maxLength"], banger_model::VM_NAME_MAX_LEN);
    assert_eq!(create["vcpu"]["maximum"], banger_api::rules::MAX_VCPU);
    assert_eq!(
        create["memory_mib"]["minimum"],
        banger_api::rules::MIN_MEMORY_MIB
    );
    assert_eq!(
        create["disk_size"]["pattern"],
        banger_api::rules::DISK_SIZE.pattern()
    );
    let set = &schemas["SetVmRequest"];
    assert_eq!(set["minProperties"], 1);
    assert_eq!(
        set["properties"]["vcpu"]["type"], "integer",
        "PATCH fields are never null"
    );
    let kill = &schemas["KillRequest"]["properties"]["signal"];
    assert_eq!(
        (kill["minimum"].clone(), kill["maximum"].clone()),
        (1.into(), 31.into())
    );
    let session = &schemas["StartSession"]["properties"];
    assert_eq!(session["argv"]["minItems"], 1);
    assert_eq!(
        session["name"]["pattern"],
        banger_api::rules::SESSION_NAME.pattern()
    );
    assert_eq!(
        session["env"]["items"]["$ref"],
        "#/components/schemas/EnvVar"
    );
    assert_eq!(
        schemas["NetworkStatus"]["properties"]["tap_pool"]["oneOf"][1]["$ref"],
        "#/components/schemas/TapPool"
    );
    let text = doc.to_string();
    assert!(!text.contains("prefixItems"), "tuples in the document");
    assert!(
        !text.contains("bench"),
        "bench operations in the public document"
    );
    // Every $ref names a schema the document defines.
    for r in text.split("\"$ref\":\"").skip(1) {
        let name = r.split('"').next().unwrap_or_default();
        let name = name.trim_start_matches("#/components/schemas/");
        assert!(schemas.get(name).is_some(), "$ref to missing schema {name}");
    }
}

/// A bad request changes nothing: a refused create leaves no VM behind.
#[tokio::test]
async fn refused_creates_leave_nothing() {
    let (t, router, _) = daemon();
    for body in [
        r#"{"name": "ok-name", "vcpu": 0}"#,
        r#"{"name": "ok-name", "image": "no-such-image", "start": false}"#,
        r#"{"name": "ok-name", "disk_size": "1K", "start": false}"#,
    ] {
        let (s, err, _) = send_body(
            &router,
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            body,
        )
        .await;
        assert!(s.is_client_error(), "{body}: {s} {}", err.message);
    }
    let (status, body) = send(&router, Method::GET, "/v1/vms").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("json"),
        serde_json::json!([])
    );
    let vms = Paths::under(t.path()).vms_dir;
    assert!(
        std::fs::read_dir(&vms).map_or(true, |mut d| d.next().is_none()),
        "{}",
        vms.display()
    );
}

/// The daemon serves no benchmark: `banger bench` measures from outside,
/// through the public API (the routes it once called are gone).
#[tokio::test]
async fn no_bench_routes() {
    let (_t, router, _doc) = daemon();
    for p in ["/internal/bench/network", "/internal/bench/image"] {
        let (status, body) = send(&router, Method::POST, p).await;
        let err: banger_api::ApiError = serde_json::from_slice(&body).expect("api error");
        assert_eq!(status, StatusCode::NOT_FOUND, "{p}: {}", err.message);
        assert!(err.message.starts_with("no route"), "{p}: {}", err.message);
    }
}
