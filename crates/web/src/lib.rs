//! bangerd's web UI: a small single-page app served on `web_listen_addr`.
//!
//! The page's script is a client of the daemon's own JSON API: requests to
//! `/api/...` are handed in-process to the daemon's router (the same one that
//! serves the Unix socket), with the `/api` prefix stripped. There is no
//! second code path for any operation.
//!
//! Every request passes a [`Guard`]:
//! - the connection must come from a socket of the owner's uid on this
//!   machine ([`Peer`]): the UI (and the whole API under `/api`) is the
//!   owner's, like the daemon's 0600 socket, and other local users get 403
//!   even though they can reach the loopback port;
//! - the `Host` header must name the listen address or `localhost:<port>`
//!   (DNS rebinding: a foreign name that resolves to 127.0.0.1 is refused);
//! - an `Origin` header, when sent, must be this UI's own origin;
//! - state-changing requests (any method but GET/HEAD, and WebSocket
//!   upgrades) must carry the per-start random token that the served page
//!   embeds, in the [`TOKEN_HEADER`] header. Other sites cannot read the page
//!   (same-origin policy), so they cannot learn the token.

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Header that carries the same-origin token on state-changing requests.
pub const TOKEN_HEADER: &str = "x-banger-token";

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const TOKEN_PLACEHOLDER: &str = "{{BANGER_TOKEN}}";

/// Content security policy of every response: only this origin's own
/// script, style and API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Errors of starting the web UI.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(
        "cannot listen on {addr} for the web UI: {source}; set web_listen_addr in config.toml \
         to a free address, or to \"\" to disable the web UI"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `addr` keeps the web UI on this machine. Any other address makes
/// it reachable from the network, which only an explicit `web_listen_addr`
/// may ask for (and `banger doctor` warns about).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The random secret of one daemon run, embedded in the served page.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// 256 random bits, hex-encoded.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so response timing does not leak a prefix.
    fn matches(&self, candidate: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != candidate.len() {
            return false;
        }
        mine.iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// One accepted connection: its two ends and, once looked up, the uid that
/// owns the peer's socket (the same for every request on the connection).
#[derive(Debug, Clone)]
pub struct Peer {
    remote: SocketAddr,
    local: Option<SocketAddr>,
    uid: Arc<OnceCell<Option<u32>>>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            remote: *stream.remote_addr(),
            local: stream.io().local_addr().ok(),
            uid: Arc::new(OnceCell::new()),
        }
    }
}

impl Peer {
    /// The uid owning the peer's socket, looked up once per connection.
    /// `None` when the peer is not a socket on this machine (another
    /// machine, or a socket that closed meanwhile) or cannot be looked up.
    async fn uid(&self) -> Option<u32> {
        *self
            .uid
            .get_or_init(|| async {
                let (remote, local) = (self.remote, self.local);
                match tokio::task::spawn_blocking(move || socket_owner(remote, local)).await {
                    Ok(Ok(uid)) => uid,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %remote, error = %e, "web UI: cannot look up the peer's socket");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(peer = %remote, error = %e, "web UI: peer lookup failed");
                        None
                    }
                }
            })
            .await
    }
}

/// The uid owning the TCP socket of this machine (and network namespace)
/// whose local address is `peer` and which is connected to `local`: the
/// client's end of a connection accepted on `local`, as an identd would
/// find it, from `/proc/net/tcp` and `/proc/net/tcp6`. `None` when no such
/// socket exists (the peer is another machine, or has closed). Sockets in
/// TIME_WAIT have no owner and never match.
pub fn socket_owner(peer: SocketAddr, local: Option<SocketAddr>) -> std::io::Result<Option<u32>> {
    use procfs::net::TcpState;
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    let mut entries = procfs::net::tcp().map_err(std::io::Error::other)?;
    match procfs::net::tcp6() {
        Ok(v6) => entries.extend(v6),
        // A kernel without IPv6 has no tcp6 table.
        Err(procfs::ProcError::NotFound(_)) => {}
        Err(e) => return Err(std::io::Error::other(e)),
    }
    Ok(entries
        .into_iter()
        .find(|e| {
            !matches!(e.state, TcpState::TimeWait | TcpState::Listen)
                && same(e.local_address, peer)
                && local.is_none_or(|l| same(e.remote_address, l))
        })
        .map(|e| e.uid))
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The connection does not come from a socket of the owner's uid on
    /// this machine.
    Peer,
    /// The `Host` header is missing or names something else.
    Host,
    /// The `Origin` header names another site.
    Origin,
    /// A state-changing request without the right token.
    Token,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = match self {
            Refusal::Peer => {
                "this web UI serves only the user bangerd runs as, from this machine; other \
                 users and other machines are refused (from elsewhere, use ssh -L as that user)"
            }
            Refusal::Host => {
                "the Host header is not this web UI's address; open the UI by the address \
                 bangerd listens on (web_listen_addr) or localhost:<port>"
            }
            Refusal::Origin => "cross-origin requests are refused",
            Refusal::Token => {
                "missing or wrong x-banger-token header; reload the page (the token changes \
                 when bangerd restarts)"
            }
        };
        let body = serde_json::json!({ "code": "forbidden", "message": message });
        (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
    }
}

/// The request checks of one listen address, owner and token.
#[derive(Debug, Clone)]
pub struct Guard {
    listen: SocketAddr,
    owner_uid: u32,
    token: Token,
}

impl Guard {
    pub fn new(listen: SocketAddr, owner_uid: u32, token: Token) -> Self {
        Self {
            listen,
            owner_uid,
            token,
        }
    }

    /// Whether a connection whose peer socket belongs to `uid` (`None`:
    /// not a socket of this machine) may use the UI: only the owner's.
    pub fn peer_allowed(&self, uid: Option<u32>) -> bool {
        uid == Some(self.owner_uid)
    }

    /// Whether a `Host` header value names this UI: the listen address
    /// itself or `localhost` with its port. When listening on an unspecified
    /// address (`0.0.0.0`, `::`), any IP literal with the port is accepted:
    /// rebinding needs a DNS name, and IP literals have none.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        if port.unwrap_or(80) != self.listen.port() {
            return false;
        }
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match name.parse::<IpAddr>() {
            Ok(ip) => {
                ip.to_canonical() == self.listen.ip().to_canonical()
                    || self.listen.ip().is_unspecified()
            }
            Err(_) => false,
        }
    }

    /// Whether an `Origin` header value is this UI's own origin.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .is_some_and(|rest| self.host_allowed(rest))
    }

    /// Checks one request's method and headers.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if !host.is_some_and(|h| self.host_allowed(h)) {
            return Err(Refusal::Host);
        }
        if let Some(origin) = headers.get(header::ORIGIN)
            && !origin.to_str().is_ok_and(|o| self.origin_allowed(o))
        {
            return Err(Refusal::Origin);
        }
        // A WebSocket upgrade arrives as a GET but acts (exec runs commands),
        // and browsers do not apply CORS to it.
        let changes_state = !(method == Method::GET || method == Method::HEAD)
            || headers.contains_key(header::UPGRADE);
        if changes_state {
            let ok = headers
                .get(TOKEN_HEADER)
                .is_some_and(|v| self.token.matches(v.as_bytes()));
            if !ok {
                return Err(Refusal::Token);
            }
        }
        Ok(())
    }
}

/// Splits a `Host` value into its name (without IPv6 brackets) and port.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        match after {
            "" => (name, None),
            p => (name, Some(p.strip_prefix(':')?)),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if name.is_empty() || name.contains(':') && !host.starts_with('[') {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((name, port))
}

/// The web UI's router: the page and its assets, and the daemon's `api`
/// router under `/api`, all behind the [`Guard`] for `listen`, `owner_uid`
/// and `token`. Requests must carry `ConnectInfo<Peer>` (what [`start`]
/// serves with); those without it are refused.
pub fn app(api: Router, listen: SocketAddr, owner_uid: u32, token: Token) -> Router {
    let guard = Arc::new(Guard::new(listen, owner_uid, token));
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .with_state(guard.clone())
        .nest_service("/api", api)
        .layer(middleware::from_fn_with_state(guard, check))
}

async fn index(State(g): State<Arc<Guard>>) -> Response {
    let html = INDEX_HTML.replace(TOKEN_PLACEHOLDER, g.token.as_str());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The token changes with every daemon start.
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    let uid = match &peer {
        Some(p) => p.uid().await,
        None => None,
    };
    let verdict = if g.peer_allowed(uid) {
        g.check(req.method(), req.headers())
    } else {
        Err(Refusal::Peer)
    };
    if let Err(refusal) = verdict {
        tracing::warn!(
            method = %req.method(),
            path = %req.uri().path(),
            refusal = ?refusal,
            peer = ?peer.map(|p| p.remote),
            peer_uid = ?uid,
            "web UI refused a request"
        );
        return with_security_headers(refusal.into_response());
    }
    with_security_headers(next.run(req).await)
}

fn with_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Binds `addr` and serves the web UI over `api` to `owner_uid`'s
/// connections until `shutdown` resolves. Returns the bound address (its
/// port when `addr` asked for port 0).
pub async fn start(
    addr: SocketAddr,
    api: Router,
    owner_uid: u32,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, WebError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WebError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| WebError::Bind { addr, source })?;
    let app = app(api, bound, owner_uid, Token::generate());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, addr = %bound, "web UI stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn guard(listen: &str) -> Guard {
        Guard::new(addr(listen), 1000, Token("secret".into()))
    }

    /// A connection whose peer lookup already answered `uid`.
    fn peer(uid: Option<u32>) -> ConnectInfo<Peer> {
        ConnectInfo(Peer {
            remote: addr("127.0.0.1:50000"),
            local: Some(addr("127.0.0.1:7777")),
            uid: Arc::new(OnceCell::new_with(Some(uid))),
        })
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn only_the_owners_local_sockets_may_connect() {
        let g = guard("127.0.0.1:7777");
        assert!(g.peer_allowed(Some(1000)));
        assert!(!g.peer_allowed(Some(0)), "not even root");
        assert!(!g.peer_allowed(Some(1001)));
        assert!(!g.peer_allowed(None), "another machine, or unknown");
    }

    #[test]
    fn socket_owner_finds_the_uid_of_a_loopback_client_socket() {
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(listen) else {
                assert!(listen.starts_with('['), "binding {listen}");
                continue; // no IPv6 loopback here
            };
            let server = l.local_addr().expect("addr");
            let client = std::net::TcpStream::connect(server).expect("connect");
            let (_accepted, seen) = l.accept().expect("accept");
            assert_eq!(seen, client.local_addr().expect("client addr"));
            assert_eq!(
                socket_owner(seen, Some(server)).expect("lookup"),
                Some(me()),
                "{listen}"
            );
            assert_eq!(socket_owner(seen, None).expect("lookup"), Some(me()));
            // The server's own end is not the peer's, and a socket that is
            // not there has no owner.
            assert_eq!(socket_owner(seen, Some(seen)).expect("lookup"), None);
            let mut gone = seen;
            gone.set_port(seen.port().wrapping_add(1).max(1));
            assert_eq!(socket_owner(gone, Some(server)).expect("lookup"), None);
        }
    }

    /// Another uid on this machine gets 403 for the page and the API, over
    /// a real connection (curl run as that uid; needs root to switch).
    #[tokio::test]
    async fn another_local_uid_is_refused_and_the_owner_is_served() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs curl as another uid and needs root"
        );
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let bound = start(addr("127.0.0.1:0"), echo_api(), me(), async move {
            let _ = rx.await;
        })
        .await
        .expect("start");
        let curl = |uid: u32, path: &'static str| {
            let url = format!("http://{bound}{path}");
            tokio::task::spawn_blocking(move || {
                use std::os::unix::process::CommandExt;
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", &url])
                    .uid(uid)
                    .gid(uid)
                    .output()
                    .expect("spawn curl (apt-get install curl)");
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    out.status.success(),
                    "curl as {uid}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let (body, code) = stdout.rsplit_once('\n').expect("status line");
                (code.to_string(), body.to_string())
            })
        };
        // 65534 is nobody on Debian; any uid that is not ours will do.
        let stranger = if me() == 65534 { 65533 } else { 65534 };
        for path in ["/", "/api/v1/vms", "/app.js"] {
            let (code, body) = curl(stranger, path).await.expect("join");
            assert_eq!(code, "403", "{path}: {body}");
            assert!(body.contains("serves only the user"), "{body}");
            assert!(!body.contains("banger-token"), "{body}");
            let (code, body) = curl(me(), path).await.expect("join");
            assert_eq!(code, "200", "{path}: {body}");
        }
    }

    #[test]
    fn host_must_be_the_listen_address_or_localhost() {
        let g = guard("127.0.0.1:7777");
        for ok in ["127.0.0.1:7777", "localhost:7777", "LocalHost:7777"] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:7777",
            "127.0.0.1.nip.io:7777",
            "127.0.0.1:7778",
            "127.0.0.1",
            "localhost",
            "127.0.0.2:7777",
            "[::1]:7777",
            "",
            ":7777",
            "::1:7777",
            "127.0.0.1:77777",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn host_check_handles_ipv6_port_80_and_unspecified_addresses() {
        let g = guard("[::1]:7777");
        assert!(g.host_allowed("[::1]:7777"));
        assert!(g.host_allowed("localhost:7777"));
        assert!(!g.host_allowed("127.0.0.1:7777"));
        assert!(!g.host_allowed("[::1"));

        let g = guard("127.0.0.1:80");
        assert!(g.host_allowed("127.0.0.1"));
        assert!(g.host_allowed("localhost"));
        assert!(!g.host_allowed("evil.example"));

        let g = guard("0.0.0.0:7777");
        assert!(g.host_allowed("192.168.1.20:7777"));
        assert!(g.host_allowed("localhost:7777"));
        assert!(!g.host_allowed("evil.example:7777"));
        assert!(!g.host_allowed("192.168.1.20:8080"));
    }

    #[test]
    fn origin_must_be_this_ui() {
        let g = guard("127.0.0.1:7777");
        assert!(g.origin_allowed("http://127.0.0.1:7777"));
        assert!(g.origin_allowed("http://localhost:7777"));
        assert!(!g.origin_allowed("http://evil.example"));
        assert!(!g.origin_allowed("https://127.0.0.1:7777"));
        assert!(!g.origin_allowed("null"));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header value"));
        }
        h
    }

    #[test]
    fn state_changing_requests_need_the_token() {
        let g = guard("127.0.0.1:7777");
        let host = ("host", "127.0.0.1:7777");
        assert_eq!(g.check(&Method::GET, &headers(&[host])), Ok(()));
        assert_eq!(g.check(&Method::HEAD, &headers(&[host])), Ok(()));
        for m in [Method::POST, Method::DELETE, Method::PATCH, Method::PUT] {
            assert_eq!(g.check(&m, &headers(&[host])), Err(Refusal::Token), "{m}");
            let wrong = headers(&[host, (TOKEN_HEADER, "secreT")]);
            assert_eq!(g.check(&m, &wrong), Err(Refusal::Token), "{m}");
            let short = headers(&[host, (TOKEN_HEADER, "secre")]);
            assert_eq!(g.check(&m, &short), Err(Refusal::Token), "{m}");
            let right = headers(&[host, (TOKEN_HEADER, "secret")]);
            assert_eq!(g.check(&m, &right), Ok(()), "{m}");
        }
        // WebSocket upgrades (exec) are GETs that act.
        let ws = headers(&[host, ("upgrade", "websocket"), ("connection", "upgrade")]);
        assert_eq!(g.check(&Method::GET, &ws), Err(Refusal::Token));
    }

    #[test]
    fn host_is_checked_before_the_token_and_origin_too() {
        let g = guard("127.0.0.1:7777");
        let evil = headers(&[("host", "evil.example:7777"), (TOKEN_HEADER, "secret")]);
        assert_eq!(g.check(&Method::POST, &evil), Err(Refusal::Host));
        assert_eq!(g.check(&Method::GET, &HeaderMap::new()), Err(Refusal::Host));
        let cross = headers(&[
            ("host", "127.0.0.1:7777"),
            ("origin", "http://evil.example"),
            (TOKEN_HEADER, "secret"),
        ]);
        assert_eq!(g.check(&Method::POST, &cross), Err(Refusal::Origin));
        let same = headers(&[
            ("host", "127.0.0.1:7777"),
            ("origin", "http://127.0.0.1:7777"),
            (TOKEN_HEADER, "secret"),
        ]);
        assert_eq!(g.check(&Method::POST, &same), Ok(()));
    }

    #[test]
    fn only_loopback_addresses_count_as_local() {
        for a in [
            "127.0.0.1:7777",
            "127.8.9.10:1",
            "[::1]:7777",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback(&addr(a)), "{a}");
        }
        for a in [
            "0.0.0.0:7777",
            "[::]:7777",
            "192.168.1.2:7777",
            "[fe80::1]:7777",
        ] {
            assert!(!is_loopback(&addr(a)), "{a}");
        }
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (Token::generate(), Token::generate());
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
        assert!(a.matches(a.as_str().as_bytes()));
        assert!(!a.matches(b.as_str().as_bytes()));
    }

    /// A stand-in for the daemon's router: echoes method and path.
    fn echo_api() -> Router {
        Router::new().fallback(|req: Request| async move {
            format!("{} {}", req.method(), req.uri().path())
        })
    }

    async fn send(app: &Router, req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = app.clone().oneshot(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// A request over a connection of the owner (uid 1000 in these tests).
    fn request(method: &str, path: &str, host: &str) -> axum::http::request::Builder {
        axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .extension(peer(Some(1000)))
    }

    #[tokio::test]
    async fn page_embeds_the_token_and_api_requests_reach_the_daemon_router() {
        let app = app(
            echo_api(),
            addr("127.0.0.1:7777"),
            1000,
            Token("t0ken".into()),
        );
        let (status, headers, body) = send(
            &app,
            request("GET", "/", "127.0.0.1:7777")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#"content="t0ken""#), "{body}");
        assert!(!body.contains(TOKEN_PLACEHOLDER));
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        assert!(
            headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("csp")
                .contains("frame-ancestors 'none'")
        );

        for (path, ty) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
            let (status, headers, _) = send(
                &app,
                request("GET", path, "localhost:7777")
                    .body(Body::empty())
                    .expect("req"),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(
                headers[header::CONTENT_TYPE]
                    .to_str()
                    .expect("type")
                    .starts_with(ty)
            );
        }

        let (status, _, body) = send(
            &app,
            request("GET", "/api/v1/vms", "127.0.0.1:7777")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "GET /v1/vms"));

        let (status, _, body) = send(
            &app,
            request("POST", "/api/v1/vms/a/stop", "127.0.0.1:7777")
                .header(TOKEN_HEADER, "t0ken")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "POST /v1/vms/a/stop")
        );
    }

    #[tokio::test]
    async fn refused_requests_never_reach_the_daemon_router() {
        let app = app(
            echo_api(),
            addr("127.0.0.1:7777"),
            1000,
            Token("t0ken".into()),
        );
        let cases = [
            request("GET", "/", "attacker.example:7777"),
            request("GET", "/api/v1/vms", "attacker.example:7777"),
            request("POST", "/api/v1/vms/a/stop", "127.0.0.1:7777"),
            request("DELETE", "/api/v1/vms/a", "127.0.0.1:7777").header(TOKEN_HEADER, "nope"),
            request("POST", "/api/v1/vms/a/stop", "attacker.example:7777")
                .header(TOKEN_HEADER, "t0ken"),
            // Right host and token, wrong user or no known peer.
            request("GET", "/", "127.0.0.1:7777").extension(peer(Some(1001))),
            request("GET", "/api/v1/vms", "127.0.0.1:7777").extension(peer(None)),
            request("POST", "/api/v1/vms/a/stop", "127.0.0.1:7777")
                .header(TOKEN_HEADER, "t0ken")
                .extension(peer(Some(0))),
            axum::http::Request::builder()
                .uri("/")
                .header("host", "127.0.0.1:7777"),
        ];
        for req in cases {
            let (status, _, body) = send(&app, req.body(Body::empty()).expect("req")).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
            assert!(body.contains("\"forbidden\""), "{body}");
        }
    }

    #[tokio::test]
    async fn start_serves_on_the_bound_port_and_stops_on_shutdown() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let bound = start(addr("127.0.0.1:0"), echo_api(), me(), async move {
            let _ = rx.await;
        })
        .await
        .expect("start");
        assert_ne!(bound.port(), 0);
        let mut s = tokio::net::TcpStream::connect(bound)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET /api/x HTTP/1.1\r\nHost: {bound}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("GET /x"), "{out}");
        let _ = tx.send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while tokio::net::TcpStream::connect(bound).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the listener closes after shutdown");

        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = busy.local_addr().expect("addr");
        let e = start(taken, echo_api(), me(), std::future::pending())
            .await
            .expect_err("the port is in use");
        let msg = e.to_string();
        assert!(
            msg.contains(&taken.to_string()) && msg.contains("web_listen_addr"),
            "{msg}"
        );
    }
}
