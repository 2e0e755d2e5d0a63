//! One error shape for the whole API: every error response leaves as an
//! [`ApiError`] JSON body, whether a handler made it ([`DaemonError`]) or
//! the framework did (JSON syntax, content type, missing or unknown fields,
//! query parsing, unknown route, wrong method, missing WebSocket upgrade).
//! [`document`] adds the statuses those framework rejections use to every
//! operation of the OpenAPI document, so the document lists them all.
//!
//! | status | code                     | when                                        |
//! |--------|--------------------------|---------------------------------------------|
//! | 400    | `invalid`                | bad JSON, body shape, query, path, upgrade   |
//! | 404    | `not_found`              | no such object, or no such route            |
//! | 405    | `method_not_allowed`     | the route exists, the method does not       |
//! | 409    | `conflict`               | the object's state forbids it               |
//! | 413    | `too_large`              | body over the limit                         |
//! | 415    | `unsupported_media_type` | body not sent as `application/json`         |
//! | 500    | `failed`                 | the daemon failed (a bug or the host)       |

use crate::{DaemonError, ErrorKind};
use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use banger_api::ApiError;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

/// Largest framework error body read to build the message.
const MAX_REJECTION_BODY: usize = 16 * 1024;

/// Middleware over every route: rewrites error responses that are not
/// already an `ApiError` into one.
pub(crate) async fn layer(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let req = match object_body(req).await {
        Ok(req) => req,
        Err((status, error)) => return (status, Json(error)).into_response(),
    };
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_REJECTION_BODY)
        .await
        .map(|b| one_line(&String::from_utf8_lossy(&b)))
        .unwrap_or_default();
    let allow = parts.headers.get(header::ALLOW).cloned();
    let (status, error) = rejection(status, &method, &path, &text, allow.as_ref());
    let mut out = (status, Json(error)).into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

/// Largest JSON request body (axum's own limit for its `Json` extractor).
const MAX_JSON_BODY: usize = 2 * 1024 * 1024;

/// Every request body of the API is a JSON object. serde's derived
/// structs also take an array of their fields in order (`[null, null]`
/// for two optional fields), which the schema does not allow: such a body
/// is refused here, once for every route.
async fn object_body(req: Request) -> Result<Request, (StatusCode, ApiError)> {
    if !is_json(req.headers()) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|_| {
            let error = ApiError {
                code: "too_large".into(),
                message: format!("the request body is over {MAX_JSON_BODY} bytes"),
            };
            (StatusCode::PAYLOAD_TOO_LARGE, error)
        })?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Some(_) => Err((
            StatusCode::BAD_REQUEST,
            ApiError {
                code: "invalid".into(),
                message: "the request body must be a JSON object".into(),
            },
        )),
    }
}

/// The router's fallback: a route the API does not have.
pub(crate) async fn no_route(method: Method, uri: axum::http::Uri) -> Response {
    let error = ApiError {
        code: "not_found".into(),
        message: format!(
            "no route {method} {}: the API's routes are listed in {}",
            uri.path(),
            banger_api::paths::OPENAPI
        ),
    };
    (StatusCode::NOT_FOUND, Json(error)).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `ApiError` (and status) of a framework rejection whose text body
/// was `text`.
fn rejection(
    status: StatusCode,
    method: &Method,
    path: &str,
    text: &str,
    allow: Option<&axum::http::HeaderValue>,
) -> (StatusCode, ApiError) {
    let reason = status.canonical_reason().unwrap_or("error");
    let said = if text.is_empty() { reason } else { text };
    let (status, code, message) = match status {
        StatusCode::NOT_FOUND => (
            status,
            "not_found",
            format!("no route {method} {path}: the API's routes are listed in /openapi.json"),
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.and_then(|a| a.to_str().ok()).unwrap_or("");
            (
                status,
                "method_not_allowed",
                format!("{method} is not allowed on {path}; allowed: {allowed}"),
            )
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            status,
            "unsupported_media_type",
            "the body must be JSON, sent with `Content-Type: application/json`".to_string(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (status, "too_large", said.to_string()),
        s if s.is_server_error() => {
            tracing::error!(%method, path, status = s.as_u16(), error = said, "request failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed",
                said.to_string(),
            )
        }
        // Everything else the framework refuses is a bad request: body
        // shape (422), JSON syntax, query, path, WebSocket upgrade (426).
        s => {
            let message = if s == StatusCode::UPGRADE_REQUIRED
                || text.contains("upgrade")
                || text.contains("WebSocket")
                || text.contains("Sec-WebSocket")
            {
                format!("{path} is a WebSocket endpoint: {said}")
            } else {
                said.to_string()
            };
            (StatusCode::BAD_REQUEST, "invalid", message)
        }
    };
    let error = ApiError {
        code: code.into(),
        message,
    };
    (status, error)
}

/// The edge mapping of the daemon's errors: the one place that decides the
/// status and the stable `code` of an [`ErrorKind`], and so of every typed
/// error the core returns (through [`DaemonError`]).
impl DaemonError {
    /// The `code` of the `ApiError` this error answers with.
    pub fn code(&self) -> &'static str {
        match self.kind() {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Failed => "failed",
        }
    }

    /// The `ApiError` body (or stream event) of this error.
    pub fn to_api(&self) -> ApiError {
        ApiError {
            code: self.code().to_string(),
            message: self.to_string(),
        }
    }

    fn status(&self) -> StatusCode {
        match self.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for DaemonError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        }
        (status, Json(self.to_api())).into_response()
    }
}

/// Adds to each operation of `api` the error statuses the framework (and
/// [`DaemonError::Failed`]) can answer it with, each with an `ApiError`
/// body: 400 for any operation taking parameters or a body, 413 and 415
/// for a JSON body, 400 for a WebSocket endpoint, and 500 for all but the
/// two that cannot fail.
pub(crate) fn document(api: &mut OpenApi) {
    for (path, item) in api.paths.paths.iter_mut() {
        let ops = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for op in ops.into_iter().flatten() {
            document_operation(path, op);
        }
    }
}

fn document_operation(path: &str, op: &mut Operation) {
    let params = op.parameters.as_ref().is_some_and(|p| {
        p.iter()
            .any(|p| matches!(p.parameter_in, ParameterIn::Query | ParameterIn::Path))
    });
    let websocket = op.responses.responses.contains_key("101");
    let json_body = op
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.contains_key("application/json"));
    if websocket {
        add_upgrade_headers(op);
    }
    let mut add = |status: u16, description: &str| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description).into());
    };
    if params || json_body || websocket {
        add(400, "Bad request: the message names the field or header");
    }
    if json_body {
        add(413, "The body is larger than the daemon accepts");
        add(415, "The body was not sent as application/json");
    }
    if path != banger_api::paths::INFO && path != banger_api::paths::SHUTDOWN {
        add(500, "The daemon failed; the message says where");
    }
    // The same description for every ApiError response a handler declared.
    for (status, r) in op.responses.responses.iter_mut() {
        if let utoipa::openapi::RefOr::T(r) = r
            && r.description.is_empty()
        {
            r.description = match status.as_str() {
                "400" => "Bad request: the message names the field",
                "404" => "No such object",
                "409" => "The object's state does not allow this now",
                _ => "",
            }
            .to_string();
        }
    }
}

/// The headers a WebSocket upgrade needs (RFC 6455), which the framework
/// checks before the handler runs; without them the answer is a 400.
fn add_upgrade_headers(op: &mut Operation) {
    use utoipa::openapi::Required;
    use utoipa::openapi::path::ParameterBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let headers = [
        ("Connection", Some("Upgrade"), None),
        ("Upgrade", Some("websocket"), None),
        ("Sec-WebSocket-Version", Some("13"), None),
        ("Sec-WebSocket-Key", None, Some("^[A-Za-z0-9+/]{22}==$")),
    ];
    let params = op.parameters.get_or_insert_with(Vec::new);
    for (name, value, pattern) in headers {
        let mut schema = ObjectBuilder::new().schema_type(Type::String);
        if let Some(v) = value {
            schema = schema.enum_values(Some([v]));
        }
        if let Some(p) = pattern {
            schema = schema.pattern(Some(p));
        }
        params.push(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some("WebSocket upgrade (RFC 6455)"))
                .schema(Some(schema.build()))
                .build(),
        );
    }
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ApiError")))
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_bodies_must_be_objects() {
        let req = |ctype: &str, body: &'static str| {
            Request::builder()
                .method(Method::POST)
                .uri("/v1/images/x/templates")
                .header(header::CONTENT_TYPE, ctype)
                .body(axum::body::Body::from(body))
                .expect("request")
        };
        for bad in ["[null, null]", " []", "1", "\"x\"", "null"] {
            let (s, e) = object_body(req("application/json", bad))
                .await
                .expect_err(bad);
            assert_eq!(
                (s, e.code.as_str()),
                (StatusCode::BAD_REQUEST, "invalid"),
                "{bad}"
            );
        }
        for good in [" {\"vcpu\": 1}", ""] {
            let r = object_body(req("application/json", good))
                .await
                .expect(good);
            let body = axum::body::to_bytes(r.into_body(), 1024)
                .await
                .expect("body");
            assert_eq!(body, good.as_bytes(), "the body is handed on as it was");
        }
        // Not JSON: the extractor's own 415 says so.
        assert!(object_body(req("text/plain", "[1]")).await.is_ok());
    }

    #[test]
    fn rejections_become_api_errors() {
        let m = Method::POST;
        let (s, e) = rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            &m,
            "/v1/vms",
            "Failed to deserialize the JSON body into the target type: missing field `name` at line 1 column 2",
            None,
        );
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, "invalid");
        assert!(e.message.contains("missing field `name`"), "{}", e.message);

        let (s, e) = rejection(
            StatusCode::UPGRADE_REQUIRED,
            &Method::GET,
            "/v1/vms/a/exec",
            "",
            None,
        );
        assert_eq!((s, e.code.as_str()), (StatusCode::BAD_REQUEST, "invalid"));
        assert!(e.message.contains("WebSocket"), "{}", e.message);

        let allow = axum::http::HeaderValue::from_static("GET,HEAD");
        let (s, e) = rejection(
            StatusCode::METHOD_NOT_ALLOWED,
            &Method::PUT,
            "/v1/vms",
            "",
            Some(&allow),
        );
        assert_eq!(
            (s, e.code.as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        );
        assert!(e.message.ends_with("allowed: GET,HEAD"), "{}", e.message);
    }

    #[test]
    fn each_kind_has_one_status_and_code() {
        let cases = [
            (
                crate::vm::LookupError::NotFound("gone".into()).into(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                crate::sessions::SessionError::Ended {
                    name: "busy".into(),
                }
                .into(),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                DaemonError::Invalid("bad".into()),
                StatusCode::BAD_REQUEST,
                "invalid",
            ),
            (
                DaemonError::Failed(anyhow::anyhow!("broke")),
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status(), e.code()), (status, code), "{e:?}");
            let api = e.to_api();
            assert_eq!((api.code.as_str(), api.message), (code, e.to_string()));
        }
    }

    /// One error of each typed image enum (and the VM delete they wrap):
    /// the status, `code` and message each had as a string variant.
    #[test]
    fn image_errors_keep_their_status_code_and_text() {
        use crate::images::{
            BuildError, BundleError, DeriveError, EnsureError, FileError, Missing, NameError,
            PullError, RegisterError,
        };
        use crate::vm::{CreateError, DeleteError};
        let (bad, missing, conflict, failed) = (
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::CONFLICT,
            StatusCode::INTERNAL_SERVER_ERROR,
        );
        let not_in_catalog = || banger_catalog::CatalogError::NotInCatalog {
            kind: "kernel",
            name: "k9".into(),
            available: "none".into(),
        };
        let cases: Vec<(DaemonError, StatusCode, &str)> = vec![
            (
                NameError::ImageExists("img".into()).into(),
                conflict,
                "image img already exists: delete it first (banger image delete img) or choose another name",
            ),
            (
                Missing::Kernel("k".into()).into(),
                missing,
                "no kernel named k: see `banger kernel list`",
            ),
            (
                EnsureError::NoImage("img".into()).into(),
                missing,
                "no image named img: see `banger image list`, or build it with `banger image build --name img`",
            ),
            (
                EnsureError::DefaultPull {
                    name: "deb".into(),
                    error: banger_catalog::CatalogError::Http {
                        url: "http://c/i".into(),
                        reason: "timed out".into(),
                    },
                }
                .into(),
                failed,
                "pulling default image deb: fetching http://c/i: timed out",
            ),
            (
                CreateError::Image(EnsureError::NoImage("img".into())).into(),
                missing,
                "no image named img: see `banger image list`, or build it with `banger image build --name img`",
            ),
            (
                PullError::KernelRefForCatalog("deb".into()).into(),
                bad,
                "--kernel-ref is for OCI images; catalog image deb boots the kernel its catalog entry names",
            ),
            (
                PullError::Name(NameError::KernelExists("k".into())).into(),
                conflict,
                "kernel k is already registered: delete it first (banger kernel delete k)",
            ),
            (
                PullError::Catalog(not_in_catalog()).into(),
                missing,
                "kernel \"k9\" is not in the catalog (catalog has: none)",
            ),
            (
                PullError::from(banger_oci::OciError::BadReference {
                    reference: "x y".into(),
                    reason: "spaces".into(),
                })
                .into(),
                bad,
                "image reference \"x y\" is not valid: spaces",
            ),
            (
                BundleError::Path(FileError::NotAbsolute {
                    what: "output directory",
                    path: "out".into(),
                })
                .into(),
                bad,
                "output directory \"out\" must be an absolute path",
            ),
            (
                BundleError::BadIndex {
                    error: banger_catalog::CatalogError::BadIndex {
                        source_name: "/i.json".into(),
                        reason: "no kernel k".into(),
                    },
                    hint: "; add its kernel".into(),
                }
                .into(),
                bad,
                "catalog index /i.json is not valid: no kernel k; add its kernel",
            ),
            (
                BuildError::SuiteWithBase.into(),
                bad,
                "--suite is for local Debian builds; a derived image keeps its base image's suite",
            ),
            (
                BuildError::NotDnsLabel("A_b".into()).into(),
                bad,
                "image name \"A_b\" must be a DNS label (a-z, 0-9, -)",
            ),
            (
                BuildError::from(DeriveError::SameAsBase("img".into())).into(),
                bad,
                "--name img is the base image: give the derived image another name",
            ),
            (
                DeriveError::Busy("img".into()).into(),
                conflict,
                "image img is being built right now: wait for that build to finish",
            ),
            (
                RegisterError::KernelUnusable {
                    kernel: "/k".into(),
                    why: "no magic".into(),
                }
                .into(),
                conflict,
                "kernel /k cannot be booted by Firecracker: no magic; give a bzImage compressed with gzip, xz, zstd, lz4 or lzma, or its uncompressed ELF vmlinux",
            ),
            (
                DeleteError::Failed(anyhow::anyhow!("disk gone").context("removing /v")).into(),
                failed,
                "removing /v: disk gone",
            ),
        ];
        for (e, status, message) in cases {
            let code = match status {
                StatusCode::BAD_REQUEST => "invalid",
                StatusCode::NOT_FOUND => "not_found",
                StatusCode::CONFLICT => "conflict",
                _ => "failed",
            };
            assert_eq!((e.status(), e.code()), (status, code), "{e:?}");
            let api = e.to_api();
            assert_eq!((api.code.as_str(), api.message.as_str()), (code, message));
        }
    }
    /// One error of each type the session, log, list/get and template
    /// checks gained: the status, `code` and message each had as a string
    /// variant.
    #[test]
    fn session_log_and_read_errors_keep_their_status_code_and_text() {
        use crate::images::Missing;
        use crate::sessions::SessionError;
        use crate::vm::LogsError;
        use crate::warm::TemplateError;
        use banger_store::StoreError;
        let vm = banger_model::VmName::parse("calm-otter").expect("name");
        let cases: Vec<(DaemonError, StatusCode, &str)> = vec![
            (
                SessionError::NoSession {
                    vm,
                    name: "web".into(),
                }
                .into(),
                StatusCode::NOT_FOUND,
                "VM calm-otter has no session named \"web\": `banger vm session list calm-otter` shows them",
            ),
            (
                SessionError::Ended { name: "web".into() }.into(),
                StatusCode::CONFLICT,
                "session \"web\" has ended: `banger vm session logs` shows its output",
            ),
            (
                LogsError::Invalid("--tail is at most 100000 lines".into()).into(),
                StatusCode::BAD_REQUEST,
                "--tail is at most 100000 lines",
            ),
            (
                LogsError::Read {
                    path: "/v/console.log".into(),
                    error: std::io::Error::other("disk full"),
                }
                .into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading /v/console.log: disk full",
            ),
            (
                StoreError::NotFound("no image named img".into()).into(),
                StatusCode::NOT_FOUND,
                "no image named img",
            ),
            (
                StoreError::CreateDir {
                    path: "/x".into(),
                    source: std::io::Error::other("disk full"),
                }
                .into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "creating /x: disk full",
            ),
            (
                TemplateError::from(Missing::Image("img".into())).into(),
                StatusCode::NOT_FOUND,
                "no image named img: see `banger image list`",
            ),
        ];
        for (e, status, message) in cases {
            assert_eq!(e.status(), status, "{e:?}");
            let api = e.to_api();
            assert_eq!(api.message, message);
        }
    }
}
