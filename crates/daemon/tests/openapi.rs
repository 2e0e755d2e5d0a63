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
                    .unwrap_or_else(|_| panic!("{m} {path}: router 404, not documented route"));
                assert_eq!(err.code, "not_found");
            }
        }
    }
}

#[tokio::test]
async fn undocumented_paths_are_not_routed() {
    let (_t, router, doc) = daemon();
    let documented: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    for probe in ["/v1/nope", "/v1/vms/x/y/z", "/v2/vms"] {
        assert!(!documented.iter().any(|p| p.as_str() == probe));
        let (status, body) = send(&router, Method::GET, probe).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{probe}");
        assert!(
            serde_json::from_slice::<banger_api::ApiError>(&body).is_err(),
            "{probe} has a handler"
        );
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
