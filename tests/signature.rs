//! Request signatures (scheme v1) end to end: real upstream, real `redis-server` started by the
//! test, real proxy processes where the test is about processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis::auth::signature::{sign, string_to_sign};
use portcullis::config::SignatureAlgorithm;
use sha2::{Digest, Sha256};
use support::http::{get, raw, send, RawResponse};
use support::keys::TestKey;
use support::proxy::{config_text, wait_ready, ProxyProcess, TestProxy};
use support::redis::RedisServer;
use support::upstream::Upstream;

const CURRENT: &str = "client-42-secret-2026-12-of-32-bytes!";
const PREVIOUS: &str = "client-42-secret-2026-11-of-32-bytes!";
const EXPIRED: &str = "client-42-secret-2026-10-of-32-bytes!";
const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SIG_CURRENT", CURRENT),
        ("SIG_PREVIOUS", PREVIOUS),
        ("SIG_EXPIRED", EXPIRED),
        ("HS_SECRET", HS_SECRET),
    ]
}

fn config(upstream: &Upstream, store: &str) -> String {
    config_text(
        upstream.addr,
        &format!(
            r#"
{store}

[signature]
max_skew = "300s"

[[signature.keys]]
id = "client-42-2026-12"
client = "client-42"
secret_env = "SIG_CURRENT"

[[signature.keys]]
id = "client-42-2026-11"
client = "client-42"
secret_env = "SIG_PREVIOUS"
algorithm = "hmac-sha512"

[[signature.keys]]
id = "client-42-2026-10"
client = "client-42"
secret_env = "SIG_EXPIRED"
not_after = "2026-11-01T00:00:00Z"

[[jwt.issuers]]
issuer = "https://internal.test"
algorithms = ["HS256"]
secrets = [{{ kid = "internal-1", env = "HS_SECRET" }}]

[[routes]]
name = "signed"
path_prefix = "/signed"
require = ["signature"]

[[routes]]
name = "both"
path_prefix = "/both"
require = ["jwt", "signature"]
"#
        ),
    )
}

fn redis_store(redis: &RedisServer) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"100ms\"",
        redis.url()
    )
}

/// A signed request: everything the string to sign covers, and the header to send.
#[derive(Clone)]
struct Signed {
    method: String,
    target: String,
    host: String,
    body: Vec<u8>,
    header: String,
}

/// A signing key as a client holds it: id, secret, algorithm.
type ClientKey<'a> = (&'a str, &'a str, SignatureAlgorithm);

const KEY_CURRENT: ClientKey<'static> =
    ("client-42-2026-12", CURRENT, SignatureAlgorithm::HmacSha256);

fn signed_with(
    (key_id, secret, algorithm): ClientKey<'_>,
    method: &str,
    target: &str,
    host: &str,
    body: &[u8],
    ts: u64,
) -> Signed {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let to_sign = string_to_sign(
        method,
        target,
        host,
        ts,
        &nonce,
        &hex::encode(Sha256::digest(body)),
    );
    let sig = sign(algorithm, secret.as_bytes(), to_sign.as_bytes());
    Signed {
        method: method.into(),
        target: target.into(),
        host: host.into(),
        body: body.to_vec(),
        header: format!(
            r#"Signature v1, keyId="{key_id}", ts="{ts}", nonce="{nonce}", signature="{sig}""#
        ),
    }
}

fn signed(method: &str, target: &str, host: &str, body: &[u8]) -> Signed {
    signed_with(KEY_CURRENT, method, target, host, body, now())
}

/// Sends `s` byte for byte (the target exactly as signed), with `Authorization: <header>` and
/// any extra header lines.
async fn send_signed(addr: std::net::SocketAddr, s: &Signed, extra: &str) -> RawResponse {
    send_signed_in(addr, s, "Authorization", extra).await
}

/// [`send_signed`] with the signature in header `name` (`X-Signature` when `Authorization`
/// carries a bearer token).
async fn send_signed_in(
    addr: std::net::SocketAddr,
    s: &Signed,
    name: &str,
    extra: &str,
) -> RawResponse {
    let mut head = format!(
        "{} {} HTTP/1.1\nHost: {}\n{name}: {}\nContent-Length: {}",
        s.method,
        s.target,
        s.host,
        s.header,
        s.body.len()
    );
    if !extra.is_empty() {
        head.push('\n');
        head.push_str(extra);
    }
    raw(addr, &head, &s.body).await
}

fn assert_refused(response: &RawResponse, status: u16, code: &str) {
    assert_eq!(
        (response.status, response.code().as_str()),
        (status, code),
        "{}",
        response.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_signed_request_passes_with_client_identity() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        TestProxy::start(&config(&upstream, &redis_store(&redis)), dir.path(), &env()).await;
    wait_ready(&proxy.admin_url("/readyz")).await;
    let host = proxy.addr.to_string();

    let s = signed(
        "POST",
        "/signed/tx?account=42&note=a%20b",
        &host,
        br#"{"amount":"12.50"}"#,
    );
    let response = send_signed(
        proxy.addr,
        &s,
        "X-Auth-Client: spoofed\nContent-Type: application/json",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-client"), Some("client-42"));
    assert_eq!(seen.header("x-auth-key-id"), Some("client-42-2026-12"));
    assert_eq!(seen.body.as_ref(), br#"{"amount":"12.50"}"#);
    assert_eq!(seen.target, "/signed/tx?account=42&note=a%20b");

    // The same request again is a replay.
    let response = send_signed(proxy.addr, &s, "").await;
    assert_refused(&response, 401, "nonce_replayed");
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signature_failure_has_its_code() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let host = proxy.addr.to_string();

    let response = get(&proxy.url("/signed/x"), &[]).await;
    assert_refused(&response, 401, "signature_missing");
    assert!(response
        .header("www-authenticate")
        .unwrap()
        .starts_with("Signature "));

    let good = signed("GET", "/signed/x", &host, b"");
    let mut malformed = good.clone();
    malformed.header = good.header.replace("Signature v1,", "Signature v2,");
    assert_refused(
        &send_signed(proxy.addr, &malformed, "").await,
        401,
        "signature_malformed",
    );
    malformed.header = format!("{}, extra=\"1\"", good.header);
    assert_refused(
        &send_signed(proxy.addr, &malformed, "").await,
        401,
        "signature_malformed",
    );
    // Two signature headers at once.
    let response = send_signed(proxy.addr, &good, &format!("X-Signature: {}", good.header)).await;
    assert_refused(&response, 401, "signature_malformed");

    let unknown = signed_with(
        ("client-99", CURRENT, SignatureAlgorithm::HmacSha256),
        "GET",
        "/signed/x",
        &host,
        b"",
        now(),
    );
    assert_refused(
        &send_signed(proxy.addr, &unknown, "").await,
        401,
        "unknown_signing_key",
    );

    // One second past the 300 s skew either way. A timestamp ahead comes one second closer
    // when the clock ticks between signing and checking, so it is 302 ahead, not 301.
    for ts in [now() - 301, now() + 302] {
        let s = signed_with(KEY_CURRENT, "GET", "/signed/x", &host, b"", ts);
        assert_refused(
            &send_signed(proxy.addr, &s, "").await,
            401,
            "timestamp_out_of_window",
        );
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_changed_line_is_a_mismatch_that_shows_the_string_to_sign() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let original = signed("POST", "/signed/a?q=1", &host, b"body");

    let mut changed = Vec::new();
    let mut s = original.clone();
    s.body = b"BODY".to_vec();
    changed.push(("body", s));
    let mut s = original.clone();
    s.target = "/signed/b?q=1".into();
    changed.push(("path", s));
    let mut s = original.clone();
    s.target = "/signed/a?q=2".into();
    changed.push(("query", s));
    let mut s = original.clone();
    s.host = "other.example:80".into();
    changed.push(("host", s));
    let mut s = original.clone();
    s.method = "PUT".into();
    changed.push(("method", s));

    for (what, s) in changed {
        let response = send_signed(proxy.addr, &s, "").await;
        assert_refused(&response, 401, "signature_mismatch");
        let shown = response.json()["string_to_sign"]
            .as_str()
            .unwrap()
            .to_owned();
        let lines: Vec<&str> = shown.split('\n').collect();
        assert_eq!(lines.len(), 7, "{what}: {shown}");
        assert_eq!(lines[1], s.method, "{what}");
        assert_eq!(lines[2], s.target, "{what}");
        assert_eq!(lines[3], s.host.to_lowercase(), "{what}");
        assert_eq!(lines[6], hex::encode(Sha256::digest(&s.body)), "{what}");
        assert!(!response.body.contains(CURRENT));
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

/// A request in absolute form names its host in the target (RFC 9112 section 3.2.2): the
/// signature is checked against that host, the one the upstream gets, not against a `Host`
/// line sent beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_request_is_signed_for_the_targets_host() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let absolute = |s: &Signed, host_line: &str| {
        format!(
            "{} http://{}{} HTTP/1.1\nHost: {host_line}\nAuthorization: {}\nContent-Length: 0",
            s.method, s.host, s.target, s.header
        )
    };

    let s = signed("GET", "/signed/abs?q=1", "api.example", b"");
    let response = raw(proxy.addr, &absolute(&s, "other.example"), b"").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    assert_eq!(seen.header("host"), Some("api.example"));
    assert_eq!(seen.target, "/signed/abs?q=1");

    // Signed for the Host line instead: the proxy computed the string to sign with the target's.
    let s = signed("GET", "/signed/abs?q=2", "other.example", b"");
    let mut target_elsewhere = s.clone();
    target_elsewhere.host = "api.example".into();
    let response = raw(
        proxy.addr,
        &absolute(&target_elsewhere, "other.example"),
        b"",
    )
    .await;
    assert_refused(&response, 401, "signature_mismatch");
    let shown = response.json()["string_to_sign"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(shown.split('\n').nth(3), Some("api.example"), "{shown}");
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_keys_of_a_rotating_client_pass_and_an_expired_key_does_not() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    for (id, secret, alg) in [
        KEY_CURRENT,
        (
            "client-42-2026-11",
            PREVIOUS,
            SignatureAlgorithm::HmacSha512,
        ),
    ] {
        let s = signed_with((id, secret, alg), "GET", "/signed/r", &host, b"", now());
        let response = send_signed(proxy.addr, &s, "").await;
        assert_eq!(response.status, 200, "{id}: {}", response.body);
        assert_eq!(upstream.last().header("x-auth-key-id"), Some(id));
    }
    let s = signed_with(
        ("client-42-2026-10", EXPIRED, SignatureAlgorithm::HmacSha256),
        "GET",
        "/signed/r",
        &host,
        b"",
        now(),
    );
    assert_refused(
        &send_signed(proxy.addr, &s, "").await,
        401,
        "unknown_signing_key",
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_and_x_signature_pass_together() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let key = TestKey::hs256(HS_SECRET.as_bytes()).with_kid("internal-1");
    let token = key.sign(&serde_json::json!({
        "iss": "https://internal.test", "sub": "svc-a", "iat": now(), "exp": now() + 300,
    }));
    let s = signed("POST", "/both/x", &host, b"{}");
    let head = format!(
        "POST /both/x HTTP/1.1\nHost: {host}\nAuthorization: Bearer {token}\nX-Signature: {}\nContent-Length: 2",
        s.header
    );
    let response = raw(proxy.addr, &head, b"{}").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-subject"), Some("svc-a"));
    assert_eq!(seen.header("x-auth-client"), Some("client-42"));

    // Without the signature the route refuses even a valid token.
    let head = format!(
        "POST /both/x HTTP/1.1\nHost: {host}\nAuthorization: Bearer {token}\nContent-Length: 2"
    );
    assert_refused(
        &raw(proxy.addr, &head, b"{}").await,
        401,
        "signature_missing",
    );
    proxy.stop().await;
}

/// The nonce write and the token check overlap on a route that needs both; the answers must
/// still be those of DESIGN's order: signature, then nonce, then token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_with_a_token_is_answered_in_design_order() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        TestProxy::start(&config(&upstream, &redis_store(&redis)), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let key = TestKey::hs256(HS_SECRET.as_bytes()).with_kid("internal-1");
    let token = |exp: u64| {
        key.sign(&serde_json::json!({
            "iss": "https://internal.test", "sub": "svc-a", "iat": now() - 600, "exp": exp,
        }))
    };
    let (good, expired) = (token(now() + 300), token(now() - 300));
    let addr = proxy.addr;
    // The token as a bearer, the signature in X-Signature.
    let send = |s: Signed, t: String| async move {
        send_signed_in(
            addr,
            &s,
            "X-Signature",
            &format!("Authorization: Bearer {t}"),
        )
        .await
    };

    wait_ready(&proxy.admin_url("/readyz")).await;
    let fresh = signed("POST", "/both/a", &host, b"{}");
    assert_eq!(send(fresh, good.clone()).await.status, 200);

    // A good signature with an expired token: the token's answer, and the nonce is used up
    // all the same (it was recorded before the token was looked at).
    let s = signed("POST", "/both/b", &host, b"{}");
    assert_refused(
        &send(s.clone(), expired.clone()).await,
        401,
        "token_expired",
    );
    assert_refused(&send(s, good.clone()).await, 401, "nonce_replayed");

    // A bad signature is refused before either store or token is asked.
    let mut forged = signed("POST", "/both/c", &host, b"{}");
    forged.body = b"{1}".to_vec();
    assert_refused(
        &send(forged, expired.clone()).await,
        401,
        "signature_mismatch",
    );

    // The store cannot answer: 503 comes before the token's 401.
    redis.kill();
    let s = signed("POST", "/both/d", &host, b"{}");
    assert_refused(&send(s, expired).await, 503, "store_unavailable");
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bodies_over_the_limit_get_413() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&upstream, "").replace("[server]\n", "[server]\nmax_body_bytes = 64\n");
    let proxy = TestProxy::start(&text, dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let s = signed("POST", "/signed/big", &host, &[b'x'; 65]);
    assert_refused(
        &send_signed(proxy.addr, &s, "").await,
        413,
        "body_too_large",
    );
    // Chunked, no length: refused once the stream passes the limit.
    let head = format!(
        "POST /signed/big HTTP/1.1\nHost: {host}\nAuthorization: {}\nTransfer-Encoding: chunked",
        s.header
    );
    let body = format!("41\r\n{}\r\n0\r\n\r\n", "x".repeat(65));
    assert_refused(
        &raw(proxy.addr, &head, body.as_bytes()).await,
        413,
        "body_too_large",
    );
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_body_that_stalls_is_cut_off_at_the_request_timeout() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // `request_timeout` is 2 s in the test configuration.
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let s = signed("POST", "/signed/slow", &host, &[b'x'; 100]);
    // The head and 10 of the 100 bytes it announces, then nothing.
    let request = format!(
        "POST /signed/slow HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nContent-Length: 100\r\n\r\n{}",
        s.header,
        "x".repeat(10)
    );
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        support::http::raw_exact(proxy.addr, request.as_bytes()),
    )
    .await
    .expect("the proxy waited for the rest of the body without end");
    assert_refused(&response, 408, "body_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count(), 0);
    // A body that arrives in time still passes.
    let s = signed("POST", "/signed/ok", &host, b"{}");
    assert_eq!(send_signed(proxy.addr, &s, "").await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxy_processes_share_nonces_through_one_redis() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let text = config(&upstream, &redis_store(&redis));
    let a = ProxyProcess::spawn(&text, &env());
    let b = ProxyProcess::spawn(&text, &env());
    for replica in [&a, &b] {
        wait_ready(&format!("http://{}/readyz", replica.admin)).await;
    }
    // Both replicas sit behind one name, as behind a load balancer.
    let s = signed("POST", "/signed/once", "api.example.com", b"{}");
    let response = send_signed(a.addr, &s, "").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let response = send_signed(b.addr, &s, "").await;
    assert_refused(&response, 401, "nonce_replayed");
    assert_eq!(upstream.count(), 1);
}

/// Redis with an append-only file written before each reply: it comes back with everything
/// it answered, so the proxy has no lost nonces to fear after a restart.
async fn persistent_redis(dir: &std::path::Path) -> RedisServer {
    let dir = dir.to_str().unwrap();
    RedisServer::start_with(
        support::redis::free_port(),
        &[
            "--dir",
            dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_fast_and_recovers_without_a_restart() {
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = persistent_redis(redis_dir.path()).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        TestProxy::start(&config(&upstream, &redis_store(&redis)), dir.path(), &env()).await;
    wait_ready(&proxy.admin_url("/readyz")).await;
    let host = proxy.addr.to_string();
    assert_eq!(
        send_signed(proxy.addr, &signed("GET", "/signed/1", &host, b""), "")
            .await
            .status,
        200
    );
    assert_eq!(get(&proxy.admin_url("/readyz"), &[]).await.status, 200);

    redis.kill();
    let started = Instant::now();
    let response = send_signed(proxy.addr, &signed("GET", "/signed/2", &host, b""), "").await;
    assert_refused(&response, 503, "store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["store"]["state"], "unavailable");

    redis.restart().await;
    let restarted = Instant::now();
    loop {
        let response = send_signed(proxy.addr, &signed("GET", "/signed/3", &host, b""), "").await;
        if response.status == 200 {
            break;
        }
        assert_refused(&response, 503, "store_unavailable");
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no recovery within 5s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&proxy.admin_url("/readyz"), &[]).await.status, 200);
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.body;
    assert!(
        metrics.contains(r#"portcullis_store_errors_total{operation="record_nonce"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"portcullis_signature_checks_total{result="store_unavailable"}"#),
        "{metrics}"
    );
    proxy.stop().await;
}

/// Redis restarted without persistence has forgotten every nonce. The proxy finds the loss (the
/// revocation mirror's epoch) and refuses the requests that could replay a forgotten nonce:
/// those signed before the loss plus `max_skew`. A replay is refused, never passed; requests
/// signed later pass again, with no restart of the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_refuses_what_could_replay_a_lost_nonce() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text =
        config(&upstream, &redis_store(&redis)).replace("max_skew = \"300s\"", "max_skew = \"8s\"");
    let proxy = TestProxy::start(&text, dir.path(), &env()).await;
    wait_ready(&proxy.admin_url("/readyz")).await;
    let host = proxy.addr.to_string();
    let first = signed("GET", "/signed/before", &host, b"");
    assert_eq!(send_signed(proxy.addr, &first, "").await.status, 200);

    // A new request each time: a new nonce, signed now.
    let fresh = |n: u32| signed("GET", &format!("/signed/{n}"), &host, b"");
    redis.restart().await;
    let restarted = Instant::now();
    let mut n = 0;
    let found = loop {
        n += 1;
        let response = send_signed(proxy.addr, &fresh(n), "").await;
        if response.status == 503 && response.body.contains("lost its data") {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(2),
            "the loss was not found: {} {}",
            response.status,
            response.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("loss found {found:?} after the restart");
    assert_refused(
        &send_signed(proxy.addr, &first, "").await,
        503,
        "store_unavailable",
    );
    let passed = upstream.count();
    let recovered = loop {
        n += 1;
        let response = send_signed(proxy.addr, &fresh(n), "").await;
        if response.status == 200 {
            break restarted.elapsed();
        }
        assert_refused(&response, 503, "store_unavailable");
        // Refused until the loss plus max_skew plus a margin of 3 s: about 11 s. Not until
        // the lost nonces' TTL (2 x max_skew) has passed: only a request signed before the
        // loss plus max_skew can replay one.
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "still refused {:?} after the restart",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("signed requests pass again {recovered:?} after the restart");
    assert!(
        recovered >= Duration::from_secs(8),
        "refused for less than max_skew: {recovered:?}"
    );
    assert_eq!(upstream.count(), passed + 1);
    // The first request is now out of the window, as any replay of a lost nonce is.
    assert_refused(
        &send_signed(proxy.addr, &first, "").await,
        401,
        "timestamp_out_of_window",
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_allow_lets_signed_requests_through_while_the_store_is_down() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("{}\non_error = \"allow\"", redis_store(&redis));
    let proxy = TestProxy::start(&config(&upstream, &store), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    redis.kill();
    let response = send_signed(proxy.addr, &signed("GET", "/signed/x", &host, b""), "").await;
    assert_eq!(response.status, 200, "{}", response.body);
    // A bad signature is still refused: only the replay check is skipped.
    let mut bad = signed("GET", "/signed/x", &host, b"");
    bad.target = "/signed/y".into();
    assert_refused(
        &send_signed(proxy.addr, &bad, "").await,
        401,
        "signature_mismatch",
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_by_portcullis_sign_passes() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, ""), dir.path(), &env()).await;
    let url = proxy.url("/signed/cli?x=1");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "sign",
            "--key-id",
            "client-42-2026-12",
            "--secret-env",
            "SIG",
            "--data",
            "{\"a\":1}",
            "POST",
            &url,
        ])
        .env("SIG", CURRENT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let value = line
        .trim()
        .strip_prefix("Authorization: ")
        .unwrap()
        .to_owned();
    let response = send(
        "POST",
        &url,
        &[("authorization", &value)],
        b"{\"a\":1}".to_vec(),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.last().header("x-auth-client"), Some("client-42"));

    // --curl prints a command that curl runs as it is.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "sign",
            "--key-id",
            "client-42-2026-12",
            "--secret-env",
            "SIG",
            "--curl",
            "--data",
            "{}",
            "POST",
            &url,
        ])
        .env("SIG", CURRENT)
        .output()
        .unwrap();
    let cmd = String::from_utf8(out.stdout).unwrap();
    assert!(cmd.starts_with("curl -sS -X 'POST' "), "{cmd}");
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        let cmd = cmd.trim().to_owned();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .args(["-c", &format!("{cmd} -s -o /dev/null -w '%{{http_code}}'")])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "200");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_store_at_max_nonces_refuses_new_nonces_and_still_catches_replays() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = "[store]\nbackend = \"memory\"\nmax_nonces = 3";
    let proxy = TestProxy::start(&config(&upstream, store), dir.path(), &env()).await;
    let host = proxy.addr.to_string();
    let first = signed("GET", "/signed/0", &host, b"");
    let response = send_signed(proxy.addr, &first, "").await;
    assert_eq!(response.status, 200, "{}", response.body);
    for i in 1..3 {
        let s = signed("GET", &format!("/signed/{i}"), &host, b"");
        let response = send_signed(proxy.addr, &s, "").await;
        assert_eq!(response.status, 200, "request {i}: {}", response.body);
    }
    // Full: a fresh nonce is refused rather than recorded at the price of an old one.
    let response = send_signed(proxy.addr, &signed("GET", "/signed/3", &host, b""), "").await;
    assert_refused(&response, 503, "store_unavailable");
    // The nonces it holds are still caught when replayed.
    assert_refused(
        &send_signed(proxy.addr, &first, "").await,
        401,
        "nonce_replayed",
    );
    assert_eq!(upstream.count(), 3);
    proxy.stop().await;
}
