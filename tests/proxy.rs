//! The proxy core against a real upstream: routing, path normalisation, header hygiene,
//! forwarding, body limits and upstream failures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::http::{get, raw, raw_exact, send};
use support::proxy::{config_text, TestProxy};
use support::upstream::Upstream;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn routes() -> String {
    r#"
[[jwt.issuers]]
issuer = "https://issuer.test"
algorithms = ["HS256"]
secrets = [{ kid = "k1", env = "HS_SECRET" }]

[[routes]]
name = "public"
path_prefix = "/public"
require = []

[[routes]]
name = "admin"
path_prefix = "/admin"
require = ["jwt"]

[[routes]]
name = "upload"
path_prefix = "/upload"
methods = ["POST", "PUT"]
require = []
content_types = ["application/json"]
"#
    .to_owned()
}

async fn start(upstream: &Upstream, extra_server: &str) -> (TestProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = config_text(upstream.addr, &routes());
    if !extra_server.is_empty() {
        text = text.replace("[server]\n", &format!("[server]\n{extra_server}\n"));
    }
    let proxy = TestProxy::start(&text, dir.path(), &[("HS_SECRET", SECRET)]).await;
    (proxy, dir)
}

/// A proxy with the test routes in front of an upstream at `addr` (the [`Upstream`] echo or a
/// bare socket of the test's own).
async fn start_at(addr: std::net::SocketAddr) -> (TestProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(addr, &routes());
    let proxy = TestProxy::start(&text, dir.path(), &[("HS_SECRET", SECRET)]).await;
    (proxy, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_route_forwards_with_request_id_and_forwarded_headers() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;

    let response = get(&proxy.url("/public/a/b?x=1&y=%20"), &[]).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-upstream"), Some("echo"));
    let request_id = response.header("x-request-id").unwrap().to_owned();

    let seen = upstream.last();
    assert_eq!(seen.target, "/public/a/b?x=1&y=%20");
    assert_eq!(seen.header("x-request-id"), Some(request_id.as_str()));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(proxy.addr.to_string().as_str())
    );

    // A sane client request id is kept end to end.
    let response = get(&proxy.url("/public"), &[("x-request-id", "req-42")]).await;
    assert_eq!(response.header("x-request-id"), Some("req-42"));
    assert_eq!(upstream.last().header("x-request-id"), Some("req-42"));
    proxy.stop().await;
}

/// `strip_headers = ["x-request-id"]`: clients do not choose ids. The proxy makes one for every
/// request, and the upstream still gets it (it is not stripped after being made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripped_request_id_is_replaced_by_the_proxys_own() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "strip_headers = [\"X-Request-Id\"]").await;
    let response = get(&proxy.url("/public"), &[("x-request-id", "req-42")]).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let id = response.header("x-request-id").unwrap().to_owned();
    assert_ne!(id, "req-42");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(upstream.last().header("x-request-id"), Some(id.as_str()));
    // Without one from the client, the same.
    let response = get(&proxy.url("/public"), &[]).await;
    let id = response.header("x-request-id").unwrap().to_owned();
    assert_eq!(upstream.last().header("x-request-id"), Some(id.as_str()));
    proxy.stop().await;
}

/// DESIGN.md, "Identity passed upstream": inbound copies of `x-forwarded-for` are removed
/// first. A client that is not a trusted proxy cannot put an address of its choosing in front
/// of its own, in one line or in several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_x_forwarded_for_is_replaced_by_its_address() {
    let upstream = Upstream::start().await;
    // The default (no trusted proxies), and trusted proxies that do not include the client.
    for extra in [
        "",
        "trusted_proxies = [\"10.0.0.0/8\", \"::1\", \"127.0.0.2\"]",
    ] {
        let (proxy, _dir) = start(&upstream, extra).await;
        for sent in [
            &[("x-forwarded-for", "203.0.113.7")][..],
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "198.51.100.2, 192.0.2.1"),
            ][..],
        ] {
            let response = get(&proxy.url("/public"), sent).await;
            assert_eq!(response.status, 200, "{}", response.body);
            assert_eq!(
                upstream.last().header_all("x-forwarded-for"),
                ["127.0.0.1"],
                "{extra:?} {sent:?}"
            );
        }
        proxy.stop().await;
    }
}

/// A load balancer in front, listed in `server.trusted_proxies`: its list is kept, in order,
/// and the balancer's own address (the proxy's peer) appended, as nginx and Envoy do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_x_forwarded_for_is_kept_and_its_address_appended() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "trusted_proxies = [\"127.0.0.0/8\"]").await;

    let response = get(&proxy.url("/public"), &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        upstream.last().header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );

    // Two lines (a balancer in front that adds its own): one list, in order, then the client.
    let response = get(
        &proxy.url("/public"),
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2, 192.0.2.1"),
        ],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        upstream.last().header("x-forwarded-for"),
        Some("203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1")
    );

    // An empty line adds no empty entry to the list.
    let response = raw(
        proxy.addr,
        "GET /public HTTP/1.1\nX-Forwarded-For: \nX-Forwarded-For: 198.51.100.2",
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        upstream.last().header("x-forwarded-for"),
        Some("198.51.100.2, 127.0.0.1")
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client.get(proxy.url("/public/h2")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let seen = upstream.last();
    assert_eq!(seen.target, "/public/h2");
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(proxy.addr.to_string().as_str())
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let response = raw(
        proxy.addr,
        "GET /public/x HTTP/1.1\n\
         X-Auth-Subject: admin\n\
         x-auth-subject: root\n\
         X-Auth-Permissions: write:everything\n\
         X-Auth-Claims: e30\n\
         X-Auth-Client: client-1\n\
         X-Auth-Key-Id: k\n\
         X-Auth-Issuer: https://issuer.test\n\
         X-Forwarded-Client-Cert: Hash=00;Subject=\"CN=admin\"\n\
         X_Auth_Subject: admin\n\
         x-auth_permissions: write:everything\n\
         X_Forwarded_Client_Cert: Hash=00\n\
         X_Forwarded_For: 10.9.9.9\n\
         X_Forwarded_Proto: https\n\
         X_Forwarded_Host: bank.example\n\
         X_Request_Id: forged\n\
         X-Custom: kept\n\
         X_Custom: kept too\n\
         X_Authorization_Hint: kept too",
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    // CGI and WSGI servers read `_` as `-`: no name that reads as one the proxy sets gets through.
    let own = [
        "x-forwarded-client-cert",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    for (name, value) in &seen.headers {
        let dashed = name.replace('_', "-");
        let lookalike = dashed != *name && own.contains(&dashed.as_str());
        assert!(
            !dashed.starts_with("x-auth-") && dashed != "x-forwarded-client-cert" && !lookalike,
            "{name}: {value} reached the upstream"
        );
    }
    for lookalike in ["x_auth_subject", "x_forwarded_for", "x_request_id"] {
        assert_eq!(
            seen.header(lookalike),
            None,
            "{lookalike} reached the upstream"
        );
    }
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("x_custom"), Some("kept too"));
    assert_eq!(seen.header("x_authorization_hint"), Some("kept too"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_configured_names_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "strip_headers = [\"X-Debug-User\"]").await;
    let response = raw(
        proxy.addr,
        "GET /public/x HTTP/1.1\n\
         Forwarded: for=10.0.0.1;proto=https;host=bank.example\n\
         X-Real-IP: 10.0.0.1\n\
         X-Client-IP: 10.0.0.1\n\
         True-Client-IP: 10.0.0.1\n\
         X-Forwarded-Port: 443\n\
         X-Forwarded-Prefix: /admin\n\
         X-Forwarded-Server: bank.example\n\
         X-Original-URL: /admin/delete\n\
         X-Original-URI: /admin/delete\n\
         X-Rewrite-URL: /admin/delete\n\
         X_Real_IP: 10.0.0.1\n\
         X-Debug-User: admin\n\
         X-Custom: kept",
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "forwarded",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x_real_ip",
        "x-debug-user",
    ] {
        assert!(
            !names.contains(&name),
            "{name} reached the upstream: {names:?}"
        );
    }
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_connection_named_headers_are_not_forwarded() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let response = raw(
        proxy.addr,
        "GET /public/x HTTP/1.1\n\
         Connection: x-private, keep-alive, x-request-id\n\
         X-Private: secret\n\
         X-Request-Id: req-7\n\
         Keep-Alive: timeout=5\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\n\
         TE: trailers",
        b"",
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.last();
    for name in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert_eq!(seen.header(name), None, "{name} was forwarded");
    }
    // The request id is the proxy's to forward: `Connection` cannot take it away.
    assert_eq!(seen.header("x-request-id"), Some("req-7"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_reach_a_route_other_than_the_checked_one() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;

    // Each of these names /admin (which needs a token) through /public: the proxy must check
    // the admin route, so without a token nothing reaches the upstream.
    for path in [
        "/public/../admin",
        "/public/./../admin/x",
        "/public/%2e%2e/admin",
        "/public/%2E%2e/admin",
        "/public/.%2e/admin",
        "//public/../admin",
        "/public//..//admin",
    ] {
        let response = raw(proxy.addr, &format!("GET {path} HTTP/1.1"), b"").await;
        assert_eq!(response.status, 401, "{path}: {}", response.body);
        assert_eq!(response.code(), "missing_credentials", "{path}");
    }
    // Encoded separators, backslashes, NULs and climbs above the root are refused outright.
    for path in [
        "/public/..%2fadmin",
        "/public%2f..%2fadmin",
        "/public/%2F../admin",
        "/public/..%5cadmin",
        "/public\\..\\admin",
        "/public/%00/x",
        "/public/../../admin",
        "/%2e%2e/admin",
        "/public/%zz",
        // Tomcat, Jetty and Spring strip `;x` from a segment before resolving dot segments.
        "/public/..;/admin",
        "/public/..;jsessionid=1/admin",
        "/public/.;x/../admin",
    ] {
        let response = raw(proxy.addr, &format!("GET {path} HTTP/1.1"), b"").await;
        assert_eq!(response.status, 400, "{path}: {}", response.body);
        assert_eq!(response.code(), "invalid_path", "{path}");
    }
    assert_eq!(upstream.count(), 0, "a trick path reached the upstream");

    // What passes goes upstream in exactly the normalised form that was checked.
    let response = raw(
        proxy.addr,
        "GET /admin/../public/%7Ex/./y//z?q=%2F HTTP/1.1",
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.last().target, "/public/~x/y/z?q=%2F");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_character_reaches_the_route_its_decoded_path_names() {
    // The upstream routes on the decoded path (`/api/users%3Apurge` is `/api/users:purge` to
    // uvicorn), so the check must too, whichever spelling the prefix or the request uses.
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = r#"
[[jwt.issuers]]
issuer = "https://issuer.test"
algorithms = ["HS256"]
secrets = [{ kid = "k1", env = "HS_SECRET" }]

[[routes]]
name = "purge"
path_prefix = "/api/users:purge"
require = ["jwt"]

[[routes]]
name = "me"
path_prefix = "/users/%40me"
require = ["jwt"]

[[routes]]
name = "menu"
path_prefix = "/caf\u00e9"
require = ["jwt"]

[[routes]]
name = "api"
path_prefix = "/api"
require = []

[[routes]]
name = "rest"
path_prefix = "/"
require = []
"#;
    let text = config_text(upstream.addr, routes);
    let proxy = TestProxy::start(&text, dir.path(), &[("HS_SECRET", SECRET)]).await;
    for path in [
        "/api/users%3Apurge",
        "/api/users%3apurge",
        "/api/users:purge/x",
        "/api/users%3Apurge/x",
        "/users/@me",
        "/users/%40me",
        "/caf%C3%A9/x",
        "/caf%c3%a9",
    ] {
        let response = raw(proxy.addr, &format!("GET {path} HTTP/1.1"), b"").await;
        assert_eq!(response.status, 401, "{path}: {}", response.body);
        assert_eq!(response.code(), "missing_credentials", "{path}");
    }
    // Escapes that do not decode to UTF-8 name no path the upstream would agree on.
    for path in ["/api/%FF", "/caf%C3"] {
        let response = raw(proxy.addr, &format!("GET {path} HTTP/1.1"), b"").await;
        assert_eq!(response.status, 400, "{path}: {}", response.body);
        assert_eq!(response.code(), "invalid_path", "{path}");
    }
    assert_eq!(
        upstream.count(),
        0,
        "an escaped path reached the upstream unchecked"
    );
    // Prefixes still match on segment boundaries, and the path goes upstream as it came.
    let response = raw(proxy.addr, "GET /api/users%3Apurged HTTP/1.1", b"").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.last().target, "/api/users%3Apurged");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_denied() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;

    let response = get(&proxy.url("/elsewhere"), &[]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (404, "no_route")
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json")
    );
    let problem = response.json();
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["type"], "about:blank");
    assert_eq!(
        problem["request_id"].as_str(),
        response.header("x-request-id")
    );

    // Segment boundaries: /publicity is not under /public.
    let response = get(&proxy.url("/publicity"), &[]).await;
    assert_eq!(response.code(), "no_route");

    let response = send("DELETE", &proxy.url("/upload/x"), &[], Vec::new()).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_types_are_enforced_per_route() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let json = [("content-type", "application/json; charset=utf-8")];
    let response = send("POST", &proxy.url("/upload"), &json, b"{}".to_vec()).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let response = send(
        "POST",
        &proxy.url("/upload"),
        &[("content-type", "text/plain")],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (415, "unsupported_media_type")
    );
    let response = send("POST", &proxy.url("/upload"), &[], b"x".to_vec()).await;
    assert_eq!(response.status, 415);
    // Two fields: the check would read one, and an upstream might read the other.
    let response = raw(
        proxy.addr,
        "POST /upload HTTP/1.1\nContent-Type: application/json\nContent-Type: text/xml\n\
         Content-Length: 2",
        b"<a",
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (415, "unsupported_media_type")
    );
    assert!(
        response.body.contains("more than one Content-Type field"),
        "{}",
        response.body
    );
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

/// RFC 9112 section 6.1: a transfer coding the proxy does not decode is refused with 501. hyper
/// decodes the `chunked` under `gzip`, and the gzip-coded bytes would reach the upstream as if
/// they were the body, their coding gone with the hop-by-hop headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_besides_chunked_gets_501() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    for coding in ["gzip, chunked", "deflate,chunked", "x-custom, Chunked"] {
        let response = raw(
            proxy.addr,
            &format!("POST /public HTTP/1.1\nTransfer-Encoding: {coding}"),
            b"5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (501, "unsupported_transfer_coding"),
            "{coding}: {}",
            response.body
        );
    }
    assert_eq!(upstream.count(), 0);
    // Plain chunked goes through, as a chunked body.
    let response = raw(
        proxy.addr,
        "POST /public HTTP/1.1\nTransfer-Encoding: chunked",
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.last().body.as_ref(), b"hello");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "max_body_bytes = 1024").await;
    let json = [("content-type", "application/json")];

    let response = send("POST", &proxy.url("/upload"), &json, vec![b'a'; 1024]).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.last().body.len(), 1024);

    // Declared too large: refused before the body is read.
    let response = send("POST", &proxy.url("/upload"), &json, vec![b'a'; 1025]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (413, "body_too_large")
    );

    // Chunked, no length: refused once the stream passes the limit.
    let mut chunked = String::new();
    for _ in 0..4 {
        chunked.push_str("200\r\n");
        chunked.push_str(&"b".repeat(0x200));
        chunked.push_str("\r\n");
    }
    chunked.push_str("0\r\n\r\n");
    let response = raw(
        proxy.addr,
        "POST /upload HTTP/1.1\nContent-Type: application/json\nTransfer-Encoding: chunked",
        chunked.as_bytes(),
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (413, "body_too_large")
    );
    assert!(upstream.received().iter().all(|r| r.body.len() <= 1024));
    proxy.stop().await;
}

/// A request body in pieces with no length known ahead (HTTP/2 DATA frames without a
/// content-length).
struct Pieces(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Pieces {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// hyper's client sends no body for a GET of unknown length unless the request says chunked:
/// a chunked GET and an HTTP/2 GET whose DATA comes without a content-length reach the
/// upstream with their bodies, as nginx and Envoy pass them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_of_unknown_length_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;

    let response = raw(
        proxy.addr,
        "GET /public/chunked HTTP/1.1\nTransfer-Encoding: chunked",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/public/chunked")
    );
    assert_eq!(&seen.body[..], b"hello world");

    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let pieces = ["from ", "an h2 ", "client"].map(|s| bytes::Bytes::from_static(s.as_bytes()));
    let request = http::Request::get(proxy.url("/public/h2"))
        .body(Pieces(pieces.into_iter().collect()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/public/h2");
    assert_eq!(&seen.body[..], b"from an h2 client");
    assert_eq!(seen.header("content-length"), None);

    // A GET without a body still goes without one.
    let response = get(&proxy.url("/public/none"), &[]).await;
    assert_eq!(response.status, 200);
    let seen = upstream.last();
    assert!(seen.body.is_empty());
    assert_eq!(seen.header("transfer-encoding"), None);
    proxy.stop().await;
}

/// Bytes that show where a piece went missing or came twice: a run of letters per position.
fn patterned(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i / 7 + seed) % 26) as u8)
        .collect()
}

/// Small messages are joined into one write and large ones go out as a vector (`server::io`):
/// request bodies of every size around that limit reach the upstream byte for byte, one after
/// another on one kept-alive client connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_of_every_size_reach_the_upstream_whole() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let client = reqwest::Client::new();
    for (seed, len) in [0, 1, 500, 1800, 2047, 2048, 2049, 4000, 70_000, 300_000]
        .into_iter()
        .enumerate()
    {
        let body = patterned(len, seed);
        let response = client
            .post(proxy.url("/upload"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{len} bytes");
        let received = upstream.last();
        assert_eq!(received.body.len(), len);
        assert!(
            received.body == body,
            "a body of {len} bytes changed on the way"
        );
    }
    proxy.stop().await;
}

/// The same for responses: a chunked response whose chunks run from 1 byte to 40 KB (so that
/// joined and vectored writes alternate), twice on one client connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_in_pieces_of_every_size_reach_the_client_whole() {
    const SIZES: [usize; 9] = [1, 7, 100, 1500, 2040, 2100, 3000, 40_000, 2];
    let expected: Vec<u8> = SIZES
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| patterned(n, i))
        .collect();
    let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for (i, &n) in SIZES.iter().enumerate() {
        answer.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        answer.extend_from_slice(&patterned(n, i));
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(b"0\r\n\r\n");
    // Written in pieces, so that the proxy reads the body in pieces too.
    let (addr, _) = raw_upstream(answer, 997, None).await;
    let (proxy, _dir) = start_at(addr).await;
    let client = reqwest::Client::new();
    for round in 0..2 {
        let response = client.get(proxy.url("/public/data")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), expected.len(), "round {round}");
        assert!(
            body == expected,
            "round {round}: the body changed on the way"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (proxy, _dir) = start_at(closed).await;
    let response = get(&proxy.url("/public"), &[]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );
    proxy.stop().await;
}

/// A bare HTTP/1.1 upstream on a socket: answers every request on a connection with `body`
/// (`Content-Length`, keep-alive), and counts connections. With `close_after_answer` it closes
/// each connection after its first answer without saying so (after `close_delay`), as an
/// upstream whose keep-alive timeout ran out does; a request that arrived meanwhile is never
/// read (the close then resets the connection).
async fn counting_upstream(
    close_after_answer: bool,
    body: &'static [u8],
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    counting_upstream_with_delay(close_after_answer, std::time::Duration::ZERO, body).await
}

async fn counting_upstream_with_delay(
    close_after_answer: bool,
    close_delay: std::time::Duration,
    body: &'static [u8],
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let mut answer =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    answer.extend_from_slice(body);
    let close = close_after_answer.then_some(close_delay);
    raw_upstream(answer, usize::MAX, close).await
}

/// A bare HTTP/1.1 upstream on a socket: writes `answer` (a whole response) for every request
/// head on a connection, in pieces of at most `piece` bytes, and counts connections. With
/// `close` it closes each connection after its first answer, after that delay, without saying
/// so. Requests are GETs without a body: one answer per head.
async fn raw_upstream(
    answer: Vec<u8>,
    piece: usize,
    close: Option<std::time::Duration>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let answer: Arc<[u8]> = answer.into();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        for part in answer.chunks(piece) {
                            if stream.write_all(part).await.is_err() {
                                return;
                            }
                            stream.flush().await.ok();
                        }
                        if let Some(delay) = close {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// `n` GETs through a proxy in front of a bare upstream that writes `answer` for each, in pieces
/// of `piece` bytes (closing after it with `close`): the status, body and `x-answer` header
/// of each, and the upstream connections made.
async fn answers(
    answer: &[u8],
    piece: usize,
    close: bool,
    method: &str,
    n: usize,
) -> (Vec<(u16, String)>, usize) {
    let (addr, connections) = raw_upstream(
        answer.to_vec(),
        piece,
        close.then_some(std::time::Duration::ZERO),
    )
    .await;
    let (proxy, _dir) = start_at(addr).await;
    let mut seen = Vec::new();
    for i in 0..n {
        let response = send(method, &proxy.url(&format!("/public/{i}")), &[], Vec::new()).await;
        seen.push((response.status, response.body));
    }
    proxy.stop().await;
    (seen, connections.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_in_any_pieces_reach_the_client_whole_on_one_connection() {
    let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
    for piece in [1, 7, usize::MAX] {
        let (seen, connections) = answers(answer, piece, false, "GET", 4).await;
        assert_eq!(
            seen,
            vec![(200, "hello world".to_owned()); 4],
            "pieces of {piece}"
        );
        assert_eq!(
            connections, 1,
            "pieces of {piece}: the connection is used again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_are_passed_over_for_the_final_one() {
    let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok";
    let (seen, connections) = answers(answer, 5, false, "GET", 3).await;
    assert_eq!(seen, vec![(201, "ok".to_owned()); 3]);
    assert_eq!(connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_length_ends_with_its_connection() {
    let (seen, connections) =
        answers(b"HTTP/1.1 200 OK\r\n\r\nuntil close", 4, true, "GET", 3).await;
    assert_eq!(seen, vec![(200, "until close".to_owned()); 3]);
    assert_eq!(connections, 3, "such a connection is never used again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_not_used_again_after_an_answer_it_cannot_trust() {
    let untrusted: [(&str, &[u8]); 3] = [
        (
            "bytes after the answer: they are not the next answer",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK",
        ),
        (
            "a length and chunks both: the chunks decide, and the connection goes",
            b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        (
            "Connection: close",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        ),
    ];
    for (case, answer) in untrusted {
        let (seen, connections) = answers(answer, usize::MAX, false, "GET", 3).await;
        assert_eq!(seen, vec![(200, "ok".to_owned()); 3], "{case}");
        assert_eq!(connections, 3, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_beside_chunks_is_not_passed_on_for_a_streamed_request_either() {
    // A request with a body on a route without a signature streams, on hyper's client: the
    // answer's chunks decide its length there too, and the connection is not used again.
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    let (addr, connections) = raw_upstream(answer.to_vec(), usize::MAX, None).await;
    let (proxy, _dir) = start_at(addr).await;
    for i in 0..3 {
        let head = format!("POST /public/{i} HTTP/1.1\nContent-Length: 3");
        let response = raw(proxy.addr, &head, b"abc").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));
        assert_ne!(response.header("content-length"), Some("50"));
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    proxy.stop().await;
}

/// A bare upstream that answers each request head with `pieces`, each written after its delay
/// in milliseconds, then holds the connection open and says nothing more.
async fn paced_upstream(pieces: Vec<(u64, &'static [u8])>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let pieces = pieces.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n @ 1..) => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                for (delay, piece) in pieces {
                    tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                }
                // Silent from here on, until the proxy lets go.
                while let Ok(1..) = stream.read(&mut buf).await {}
            });
        }
    });
    addr
}

/// Sends `request` and reads until the proxy closes or resets the connection: what arrived.
async fn read_whatever_arrives(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_silent_mid_answer_is_cut_off_and_a_slow_steady_one_is_not() {
    use std::time::{Duration, Instant};
    // request_timeout is 2 s here: it bounds each wait for the next piece of the body.
    let stalled = paced_upstream(vec![(
        0,
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
    )])
    .await;
    let (proxy, _dir) = start_at(stalled).await;
    // On the proxy's own client (no body) and on hyper's (a streamed body).
    for request in [
        &b"GET /public/x HTTP/1.1\r\nHost: t\r\n\r\n"[..],
        &b"POST /public/x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nxyz"[..],
    ] {
        let started = Instant::now();
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            read_whatever_arrives(proxy.addr, request),
        )
        .await
        .expect("an upstream silent mid-answer held the client's connection");
        let waited = started.elapsed();
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen:?}");
        assert!(seen.ends_with("\r\n\r\nabc"), "{seen:?}");
        assert!(
            waited >= Duration::from_millis(1900),
            "cut off after {waited:?}, before the timeout"
        );
    }
    proxy.stop().await;

    // Pieces 0.8 s apart, 3.2 s in all: longer than the timeout, no wait as long as it.
    let steady = paced_upstream(vec![
        (0, b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nab"),
        (800, b"cd"),
        (800, b"ef"),
        (800, b"gh"),
    ])
    .await;
    let (proxy, _dir) = start_at(steady).await;
    let response = raw(proxy.addr, "GET /public/x HTTP/1.1", b"").await;
    assert_eq!((response.status, response.body.as_str()), (200, "abcdefgh"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_the_client_breaks_off_or_stalls_is_the_clients_fault() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A route without a signature streams the body to the upstream as it comes: when the
    // client's side fails, the answer says so, not 502/504 as if the upstream had.
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let head = "POST /public/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n";

    // 10 of the 100 bytes, then the client closes its side.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 10]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen))
        .await
        .expect("no answer to a body that broke off");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 400"), "{seen}");
    assert!(seen.contains("\"code\":\"body_incomplete\""), "{seen}");

    // 10 of the 100 bytes, then nothing (request_timeout is 2 s here).
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(&[b'x'; 10]);
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the proxy waited for the rest of the body without end")
        .unwrap();
    let seen = String::from_utf8_lossy(&buf[..n]);
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("\"code\":\"body_timeout\""), "{seen}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_to_head_has_no_body_and_keeps_the_connection() {
    let (seen, connections) = answers(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        usize::MAX,
        false,
        "HEAD",
        3,
    )
    .await;
    assert_eq!(seen, vec![(200, String::new()); 3]);
    assert_eq!(connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_malformed_answers_are_502() {
    let malformed: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ];
    for answer in malformed {
        let (seen, _) = answers(answer, usize::MAX, false, "GET", 1).await;
        assert_eq!(seen[0].0, 502, "{:?}", String::from_utf8_lossy(answer));
        assert!(seen[0].1.contains("upstream_unavailable"), "{}", seen[0].1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_another_transfer_coding_than_chunked_is_502_on_either_client() {
    // `Transfer-Encoding` is hop-by-hop: passed on without it, gzip bytes would be taken for
    // the body itself. Without a request body (the proxy's own client) and with one (hyper's).
    let codings: [&[u8]; 3] = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ];
    for answer in codings {
        let (addr, _) =
            raw_upstream(answer.to_vec(), usize::MAX, Some(std::time::Duration::ZERO)).await;
        let (proxy, _dir) = start_at(addr).await;
        for (head, body) in [
            ("GET /public/x HTTP/1.1", &b""[..]),
            ("POST /public/x HTTP/1.1\nContent-Length: 3", &b"abc"[..]),
        ] {
            let response = raw(proxy.addr, head, body).await;
            assert_eq!(
                (response.status, response.code().as_str()),
                (502, "upstream_unavailable"),
                "{head}: {:?}",
                String::from_utf8_lossy(answer)
            );
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (addr, connections) = counting_upstream(false, b"ok").await;
    let (proxy, _dir) = start_at(addr).await;
    for i in 0..10 {
        let response = get(&proxy.url(&format!("/public/{i}")), &[]).await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one upstream connection for ten requests in a row"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let (addr, connections) = counting_upstream(true, b"ok").await;
    let (proxy, _dir) = start_at(addr).await;
    for i in 0..20 {
        let response = get(&proxy.url(&format!("/public/{i}")), &[]).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
    }
    // Every answer came on its own connection, and none of the closed ones was used again.
    assert_eq!(connections.load(Ordering::SeqCst), 20);
    // A POST is never sent twice: a closed connection must be noticed before it is used.
    for i in 0..20 {
        let response = send("POST", &proxy.url(&format!("/public/{i}")), &[], Vec::new()).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "POST {i}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 40);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_survive_an_upstream_closing_a_reused_connection_under_them() {
    // The upstream closes each connection 1 ms after its answer: back-to-back requests land
    // on a connection as it closes, and are reset without an answer. GETs are sent again.
    let (addr, connections) =
        counting_upstream_with_delay(true, std::time::Duration::from_millis(1), b"ok").await;
    let (proxy, _dir) = start_at(addr).await;
    for i in 0..50 {
        let response = get(&proxy.url(&format!("/public/{i}")), &[]).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
    }
    assert!(connections.load(Ordering::SeqCst) >= 50);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_abandons_does_not_poison_the_pool() {
    // A body far larger than what the sockets between the proxy and the client can hold: the
    // client reads the head and hangs up, so the proxy cannot have read the body to its end.
    // The client's receive buffer is fixed small (a kernel may let an autotuned one grow to
    // 32 MiB on loopback), and the proxy's send buffer grows to 4 MiB at most by default.
    let big: &'static [u8] = Box::leak(vec![b'x'; 16 << 20].into_boxed_slice());
    let (addr, connections) = counting_upstream(false, big).await;
    let (proxy, _dir) = start_at(addr).await;
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(proxy.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client
            .write_all(b"GET /public/big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 1024];
        let n = client.read(&mut head).await.unwrap();
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&head[..n])
        );
        drop(client);
    }
    // The abandoned exchanges' connections are not handed to later requests: each of these
    // gets the whole body.
    for _ in 0..3 {
        let response = get(&proxy.url("/public/big"), &[]).await;
        assert_eq!((response.status, response.body.len()), (200, big.len()));
    }
    assert!(connections.load(Ordering::SeqCst) >= 4);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_reaches_the_upstream_with_its_authority() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let response = raw_exact(proxy.addr, b"GET /public/old?q=1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    assert_eq!(seen.target, "/public/old?q=1");
    let authority = upstream.addr.to_string();
    assert_eq!(seen.header("host"), Some(authority.as_str()));
    assert_eq!(seen.header("x-forwarded-host"), None);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_request_timeout_is_504() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    // request_timeout is 2s in the test config.
    let started = std::time::Instant::now();
    let response = get(&proxy.url("/public/slow"), &[("x-test-delay-ms", "3500")]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (504, "upstream_timeout")
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(3400));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_timer_waits_the_whole_request_timeout() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    // A fast request leaves its 2 s timer in the pool; the slow one a second later reuses it,
    // and must be given its own 2 s, not what was left of the first request's.
    assert_eq!(get(&proxy.url("/public/fast"), &[]).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    let response = get(&proxy.url("/public/slow"), &[("x-test-delay-ms", "3500")]).await;
    let elapsed = started.elapsed();
    assert_eq!(
        (response.status, response.code().as_str()),
        (504, "upstream_timeout")
    );
    assert!(
        elapsed >= std::time::Duration::from_millis(1900),
        "timed out early, at the reused timer's old deadline: {elapsed:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_and_metrics() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    get(&proxy.url("/public"), &[]).await;
    get(&proxy.url("/nowhere"), &[]).await;
    get(&proxy.url("/admin/x"), &[]).await;

    let health = get(&proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(health.status, 200);
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains(r#"portcullis_requests_total{route="public",code="ok",status="200"} 1"#),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(r#"code="no_route",status="404"} 1"#),
        "{}",
        metrics.body
    );
    // A rejection on a matched route is counted under that route's name.
    assert!(
        metrics.body.contains(
            r#"portcullis_requests_total{route="admin",code="missing_credentials",status="401"} 1"#
        ),
        "{}",
        metrics.body
    );
    assert!(metrics
        .body
        .contains("portcullis_request_duration_seconds_bucket"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_parsable_with_quotes_and_backslashes_in_a_route_name() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A TOML literal string: the name holds `"` and `\` as they are.
    let text = config_text(
        upstream.addr,
        "[[routes]]\nname = 'say \"hi\" \\ bye'\npath_prefix = \"/\"\n",
    );
    let proxy = TestProxy::start(&text, dir.path(), &[]).await;
    assert_eq!(get(&proxy.url("/x"), &[]).await.status, 200);

    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.body;
    assert!(
        metrics.lines().any(|l| l
            == r#"portcullis_requests_total{route="say \"hi\" \\ bye",code="ok",status="200"} 1"#),
        "{metrics}"
    );
    // Each sample's labels end at the `}` before its value: no value was cut short by a `"`.
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_requests_total{"))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let labels = &series["portcullis_requests_total{".len()..];
        let unescaped_quotes = labels
            .replace("\\\\", "")
            .replace("\\\"", "")
            .matches('"')
            .count();
        assert_eq!(
            unescaped_quotes, 6,
            "three labels, each quoted once: {line}"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_head_on_a_keep_alive_connection_gets_the_whole_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "header_read_timeout = \"1s\"").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The first head comes in two parts, 600 ms apart: its timer starts with the first part and
    // goes back to the pool with 400 ms left. The second head's timer is that one, reset.
    stream.write_all(b"GET /public HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    stream.write_all(b"Host: x\r\n\r\n").await.unwrap();
    // The whole first answer: its head, then Content-Length bytes of body.
    let first = read_one_answer(&mut stream).await;
    let answered = std::time::Instant::now();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream
        .write_all(b"GET /public HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    read_until_closed(&mut stream).await;
    // Timed from when the answer was read, which is after the proxy's timer started: a late
    // reader sees less than 1 s. Broken, the cut comes 400 ms after the answer.
    let elapsed = answered.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(700),
        "cut off at the reused timer's old deadline: {elapsed:?}"
    );
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

/// Reads what the proxy sends until it closes the connection, which must be within 5 s (a
/// header-read timeout of 1 s, with room for a slow test machine).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the connection stayed open past the header-read timeout"
    );
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "header_read_timeout = \"1s\"").await;
    // Timed from before the connection, so that the proxy's clock (from accept) never starts
    // before the test's.
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /public HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let buf = read_until_closed(&mut stream).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(900),
        "cut off too early: {elapsed:?}"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed_at_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "header_read_timeout = \"1s\"").await;
    // Nothing at all; a byte that could still begin the HTTP/2 preface; the preface and an
    // empty SETTINGS frame (an HTTP/2 connection that never opens a stream).
    let openings: [&[u8]; 3] = [
        b"",
        b"P",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ];
    for opening in openings {
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        read_until_closed(&mut stream).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= std::time::Duration::from_millis(900),
            "{opening:?}: closed too early, {elapsed:?}"
        );
    }
    assert_eq!(upstream.count(), 0);

    // Once a request has come, the deadline is off: a keep-alive connection that sends a
    // request every 600 ms is still served 1.8 s after it opened.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        }
        stream
            .write_all(b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_one_answer(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    assert_eq!(upstream.count(), 4);
    proxy.stop().await;
}

/// An HTTP/2 connection is closed (GOAWAY) once no request began or ended on it for the
/// header-read timeout, as hyper closes an idle HTTP/1.1 one; one in use stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_and_a_busy_one_is_not() {
    use http_body_util::BodyExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "header_read_timeout = \"1s\"").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_millis(300))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    // A request every 600 ms for 3 s: the connection is in use, and stays open.
    for i in 0..6 {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        }
        let request = http::Request::get(format!("http://{}/public/{i}", proxy.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(upstream.count(), 6);
    // Then nothing but pings, which the client answers: closed after one to two timeouts.
    let idle_since = std::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(4), connection).await;
    let idle = idle_since.elapsed();
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection was still open after {idle:?}"
    );
    assert!(
        idle >= std::time::Duration::from_millis(900),
        "closed too early, after {idle:?}"
    );
    assert!(sender.is_closed() || sender.ready().await.is_err());
    proxy.stop().await;
}

/// An HTTP/2 connection (prior knowledge) to `addr`, its connection task running until the
/// connection ends.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

/// An upstream of the test's own, on keep-alive HTTP/1.1 connections: `/public/slow` answers
/// after 1.3 s, `/public/stream` streams seven chunks 200 ms apart, anything else answers at
/// once.
async fn slow_and_streaming_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).into_owned();
                    got.drain(..end + 4);
                    let sleep = |ms| tokio::time::sleep(std::time::Duration::from_millis(ms));
                    if head.starts_with("GET /public/slow ") {
                        sleep(1300).await;
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                            .await
                            .unwrap();
                    } else if head.starts_with("GET /public/stream ") {
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await
                            .unwrap();
                        for i in 0..7 {
                            sleep(200).await;
                            let chunk = format!("6\r\nchunk{i}\r\n");
                            socket.write_all(chunk.as_bytes()).await.unwrap();
                        }
                        socket.write_all(b"0\r\n\r\n").await.unwrap();
                    } else {
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nquick")
                            .await
                            .unwrap();
                    }
                }
            });
        }
    });
    addr
}

/// A request in flight, or an answer still streaming its body, keeps an HTTP/2 connection from
/// counting as idle: after a 1.3-s answer and a 1.4-s stream, both longer than two idle
/// timeouts, the next request is served on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_or_a_streaming_answer_keeps_an_http2_connection_open() {
    use http_body_util::BodyExt;
    let upstream = slow_and_streaming_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(upstream, &routes())
        .replace("[server]\n", "[server]\nheader_read_timeout = \"500ms\"\n");
    let proxy = TestProxy::start(&text, dir.path(), &[("HS_SECRET", SECRET)]).await;
    let (mut sender, connection) = h2_connect(proxy.addr).await;
    let mut get = async |path: &str| {
        let request = http::Request::get(format!("http://{}{path}", proxy.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let started = std::time::Instant::now();
    assert_eq!(get("/public/slow").await, (200, "slow".to_owned()));
    assert_eq!(get("/public/quick").await, (200, "quick".to_owned()));
    let streamed: String = (0..7).map(|i| format!("chunk{i}")).collect();
    assert_eq!(get("/public/stream").await, (200, streamed));
    assert_eq!(get("/public/quick").await, (200, "quick".to_owned()));
    assert!(started.elapsed() >= std::time::Duration::from_millis(2700));
    assert!(!connection.is_finished(), "the connection was closed");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_waits_until_one_ends() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "max_connections = 2").await;
    const REQUEST: &[u8] = b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two keep-alive connections, each answered once and held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(REQUEST).await.unwrap();
        assert!(read_one_answer(&mut stream)
            .await
            .starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    // A third connects (the kernel's backlog takes it) but is not served.
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    third.write_all(REQUEST).await.unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(700),
        tokio::io::AsyncReadExt::read(&mut third, &mut byte),
    )
    .await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");
    // The admin listener is not counted.
    let health = get(&format!("http://{}/healthz", proxy.admin), &[]).await;
    assert_eq!(health.status, 200);
    // Once one of the two ends, the third is served.
    drop(held.remove(0));
    let answer = read_one_answer(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.count(), 3);
    proxy.stop().await;
}

/// Reads one whole answer (its head, then `Content-Length` bytes of body) from a keep-alive
/// connection.
async fn read_one_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// An HTTPS upstream (certificate `cert`) that answers each request head on a connection with
/// `answer(i, path)`, the i-th answer on that connection, in one write (one TLS record).
async fn raw_tls_upstream(
    cert: &support::pki::Issued,
    answer: fn(usize, &str) -> Vec<u8>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = support::pki::server_acceptor(cert);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut seen, mut buf, mut i) = (Vec::new(), [0u8; 4096], 0);
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        seen.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        if tls.write_all(&answer(i, &path)).await.is_err() {
                            return;
                        }
                        tls.flush().await.ok();
                        i += 1;
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// Over TLS, bytes after an answer must disqualify the connection just as they do over plain
/// TCP (`a_connection_is_not_used_again_after_an_answer_it_cannot_trust`, "okJUNK"). Here the
/// first answer (head and body exactly 8 KiB, the proxy's first read) and what follows it come
/// in one TLS record: what follows stays inside rustls, the proxy's buffer is empty at the end
/// of the body, and the connection goes back to the pool with those bytes unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_bytes_after_an_answer_are_not_the_next_answer() {
    use support::pki::{Ca, Usage};
    fn answer(_i: usize, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if path == "/first" {
            let head_len = "HTTP/1.1 200 OK\r\ncontent-length: 0000\r\n\r\n".len();
            let body_len = 8192 - head_len;
            out.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len:04}\r\n\r\n").as_bytes(),
            );
            out.extend(std::iter::repeat_n(b'a', body_len));
            assert_eq!(out.len(), 8192);
            // Bytes after the answer: here, an answer of its own.
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled");
        } else {
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                    path.len()
                )
                .as_bytes(),
            );
        }
        out
    }
    let ca = Ca::new("upstream CA");
    let cert = ca.issue("localhost", &["localhost"], &[], Usage::Server, false);
    let (addr, connections) = raw_tls_upstream(&cert, answer).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"https://localhost:{}\"\nca = \"{}\"\n\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\n",
        addr.port(),
        ca_file.display()
    );
    let proxy = TestProxy::start(&text, dir.path(), &[]).await;
    let first = get(&proxy.url("/first"), &[]).await;
    assert_eq!((first.status, first.body.len()), (200, 8192 - 41));
    // Another client's request: it must get the upstream's answer to it.
    let second = get(&proxy.url("/second"), &[]).await;
    let third = get(&proxy.url("/third"), &[]).await;
    proxy.stop().await;
    assert_eq!(
        [(second.status, second.body), (third.status, third.body)],
        [(200, "/second".to_owned()), (200, "/third".to_owned())],
        "answers landed on the wrong requests"
    );
    // The first connection was closed after its answer; the second carried the other two.
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

/// CONNECT asks for a tunnel: a 2xx answer to it turns the upstream connection into one right
/// after its head (RFC 9112 section 6.3), so the connection could carry no other request. It
/// is refused before anything goes upstream, even on a route that takes any method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_never_reaches_the_upstream() {
    let (addr, connections) = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        usize::MAX,
        None,
    )
    .await;
    let (proxy, _dir) = start_at(addr).await;
    let refused = raw(proxy.addr, "CONNECT /public/tunnel HTTP/1.1", b"").await;
    let authority_form = raw(proxy.addr, "CONNECT example.com:443 HTTP/1.1", b"").await;
    let next = get(&proxy.url("/public/next"), &[]).await;
    proxy.stop().await;
    assert_eq!(refused.status, 405);
    assert_eq!(refused.code(), "method_not_allowed");
    assert_eq!(authority_form.status, 405);
    assert_eq!(authority_form.code(), "method_not_allowed");
    assert_eq!(next.status, 200);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "only the GET went upstream"
    );
}

/// RFC 9110 section 8.6: a sender must not forward a Content-Length that does not match
/// `1*DIGIT`; "2, 2" may be accepted but is then to be replaced by "2".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_list_is_passed_on_as_one_number() {
    let (addr, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok".to_vec(),
        usize::MAX,
        None,
    )
    .await;
    let (proxy, _dir) = start_at(addr).await;
    // A GET goes on the proxy's own client; a request whose body streams, on hyper's.
    let own = raw(proxy.addr, "GET /public/x HTTP/1.1", b"").await;
    let streamed = raw(
        proxy.addr,
        "POST /public/x HTTP/1.1\ncontent-type: text/plain\ncontent-length: 3",
        b"abc",
    )
    .await;
    proxy.stop().await;
    for response in [own, streamed] {
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("content-length"),
            Some("2"),
            "{:?}",
            response.headers
        );
        assert_eq!(response.body, "ok");
    }
}

/// The length of a HEAD answer (what a GET would get) goes on as one number too; one that is not
/// a number does not go on at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answer_passes_on_its_length_as_one_number_or_none() {
    for (stated, passed) in [("5, 5", Some("5")), ("5", Some("5")), ("five", None)] {
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {stated}\r\n\r\n");
        let (addr, _) = raw_upstream(answer.into_bytes(), usize::MAX, None).await;
        let (proxy, _dir) = start_at(addr).await;
        let response = raw(proxy.addr, "HEAD /public/x HTTP/1.1", b"").await;
        proxy.stop().await;
        assert_eq!(response.status, 200, "{stated}");
        assert_eq!(response.header("content-length"), passed, "{stated}");
    }
}

/// The same answer over plain TCP: the bytes after an answer that fills the proxy's first read
/// exactly stay in the socket, where the checkout finds them, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_bytes_after_an_8k_answer_are_not_the_next_answer() {
    let mut answer =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 8192 - 41).into_bytes();
    answer.extend(std::iter::repeat_n(b'a', 8192 - 41));
    answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled");
    let (seen, connections) = answers(&answer, usize::MAX, false, "GET", 3).await;
    assert!(
        seen.iter().all(|(s, b)| *s == 200 && b.len() == 8192 - 41),
        "{:?}",
        seen.iter().map(|(s, b)| (s, b.len())).collect::<Vec<_>>()
    );
    assert_eq!(connections, 3);
}

/// DESIGN.md, "Identity passed upstream": inbound copies of `x-forwarded-host` are always
/// removed first. A request that names no host (HTTP/1.0 without `Host`, or one in absolute
/// form) must not bring its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_cannot_bring_its_own_x_forwarded_host() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    for request in [
        &b"GET /public/old HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n"[..],
        &b"GET /public/new HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n"
            [..],
    ] {
        let before = upstream.count();
        raw_exact(proxy.addr, request).await;
        assert_eq!(upstream.count(), before + 1, "not forwarded");
        assert_eq!(
            upstream.last().header("x-forwarded-host"),
            None,
            "the client's x-forwarded-host reached the upstream: {}",
            String::from_utf8_lossy(request)
        );
    }
    proxy.stop().await;
}

/// RFC 9112 section 3.2: a request with more than one `Host` line is a 400. Forwarded, the
/// upstream gets both, while the proxy checked (and signed-request verification used) the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_two_hosts_is_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let response = raw(
        proxy.addr,
        "GET /public/x HTTP/1.1\nHost: a.example\nHost: b.example",
        b"",
    )
    .await;
    let forwarded: Vec<Vec<String>> = upstream
        .received()
        .iter()
        .map(|r| r.header_all("host").iter().map(|h| h.to_string()).collect())
        .collect();
    proxy.stop().await;
    assert_eq!(forwarded, Vec::<Vec<String>>::new(), "reached the upstream");
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.code(), "invalid_host");
    assert_eq!(
        response.json()["detail"],
        "the request has more than one Host header"
    );
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host` is a 400 (nginx and Envoy answer it
/// so); an HTTP/1.0 one is not, and goes upstream with the upstream's host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_is_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let mut answers = Vec::new();
    for request in [
        &b"GET /public/h11 HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        &b"GET http://a.example/public/abs HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        &b"GET /public/h10 HTTP/1.0\r\n\r\n"[..],
    ] {
        answers.push(raw_exact(proxy.addr, request).await);
    }
    let forwarded: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    proxy.stop().await;
    for answer in &answers[..2] {
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert_eq!(answer.code(), "invalid_host");
        assert_eq!(
            answer.json()["detail"],
            "an HTTP/1.1 request must have a Host header"
        );
    }
    assert_eq!(answers[2].status, 200, "{}", answers[2].body);
    assert_eq!(forwarded, ["/public/h10"]);
}

/// RFC 9112 section 3.2.2: a request in absolute form names its host in the target, and a
/// `Host` line beside it is ignored: the upstream gets the target's authority, in `Host` and
/// `X-Forwarded-Host`, whatever the HTTP version. User information in the target is a 400
/// (RFC 9110 section 4.2.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_targets_authority_is_the_host() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let mut answers = Vec::new();
    for request in [
        &b"GET http://a.example/public/abs11?q=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n"[..],
        &b"GET http://c.example:8080/public/abs10 HTTP/1.0\r\nHost: d.example\r\n\r\n"[..],
        &b"GET http://e.example/public/abs10-no-host HTTP/1.0\r\n\r\n"[..],
        &b"GET http://user:pw@a.example/public/userinfo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"[..],
    ] {
        answers.push(raw_exact(proxy.addr, request).await);
    }
    let forwarded: Vec<(String, String, String)> = upstream
        .received()
        .iter()
        .map(|r| {
            let header = |name| r.header(name).unwrap_or("-").to_owned();
            (r.target.clone(), header("host"), header("x-forwarded-host"))
        })
        .collect();
    proxy.stop().await;
    for answer in &answers[..3] {
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(answers[3].status, 400, "{}", answers[3].body);
    assert_eq!(answers[3].code(), "invalid_host");
    assert_eq!(
        answers[3].json()["detail"],
        "the request target names user information"
    );
    let expected = [
        ("/public/abs11?q=1", "a.example", "a.example"),
        ("/public/abs10", "c.example:8080", "c.example:8080"),
        ("/public/abs10-no-host", "e.example", "e.example"),
    ]
    .map(|(t, h, f)| (t.to_owned(), h.to_owned(), f.to_owned()));
    assert_eq!(forwarded, expected);
}

/// What the upstream received: each request's target and `Host` ("-" for none).
fn targets_and_hosts(upstream: &Upstream) -> Vec<(String, String)> {
    upstream
        .received()
        .iter()
        .map(|r| (r.target.clone(), r.header("host").unwrap_or("-").to_owned()))
        .collect()
}

/// RFC 9112 section 3.2: a `Host` that is not `host [":" port]` is a 400 (nginx answers it so),
/// and so is a target in absolute form that is not an http(s) URI: the checks and the upstream
/// must not read a host differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_host_or_target_scheme_is_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let refused: [(&[u8], &str); 5] = [
        (
            b"GET /public/a HTTP/1.1\r\nHost: a.example/evil\r\nConnection: close\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (
            b"GET /public/b HTTP/1.1\r\nHost: user@a.example\r\nConnection: close\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (
            b"GET /public/c HTTP/1.1\r\nHost: a.example b.example\r\nConnection: close\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (
            b"GET /public/d HTTP/1.1\r\nHost: a.ex\xffample\r\nConnection: close\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (
            b"GET ftp://a.example/public/e HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            "the request target is not an http or https URI",
        ),
    ];
    for (request, detail) in refused {
        let answer = raw_exact(proxy.addr, request).await;
        let shown = String::from_utf8_lossy(request);
        assert_eq!(answer.status, 400, "{shown}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_host", "{shown}");
        assert_eq!(answer.json()["detail"], detail, "{shown}");
    }
    let fine = raw_exact(
        proxy.addr,
        b"GET /public/f HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    let forwarded = targets_and_hosts(&upstream);
    proxy.stop().await;
    assert_eq!(fine.status, 200, "{}", fine.body);
    assert_eq!(
        forwarded,
        [("/public/f".to_owned(), "[::1]:8080".to_owned())]
    );
}

/// RFC 9113 section 8.3.1: an HTTP/2 request's `host` field may repeat `:authority` (in any
/// case), which is then the host; naming another host is a 400, never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_host_field_must_name_the_authority() {
    use http_body_util::BodyExt;
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let (mut sender, _connection) = h2_connect(proxy.addr).await;
    let mut answers = Vec::new();
    for (target, host) in [
        ("/public/same", "API.example:8443"),
        ("/public/other", "other.example"),
    ] {
        let request = http::Request::get(format!("http://api.example:8443{target}"))
            .header("host", host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    let forwarded = targets_and_hosts(&upstream);
    proxy.stop().await;
    assert_eq!(answers[0].0, 200, "{}", answers[0].1);
    assert_eq!(answers[1].0, 400, "{}", answers[1].1);
    assert!(
        answers[1]
            .1
            .contains("the host header names another host than :authority"),
        "{}",
        answers[1].1
    );
    assert_eq!(
        forwarded,
        [("/public/same".to_owned(), "api.example:8443".to_owned())]
    );
}

/// RFC 9113 section 8.2.3: the `cookie` fields of an HTTP/2 request are joined with "; "
/// before the request goes on over HTTP/1.1 (where a request has one `Cookie` line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_fields_reach_an_http11_upstream_as_one_line() {
    let upstream = Upstream::start().await;
    let (proxy, _dir) = start(&upstream, "").await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(proxy.url("/public/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let seen = upstream.last();
    proxy.stop().await;
    assert_eq!(seen.header_all("cookie"), ["a=1; b=2"]);
}
