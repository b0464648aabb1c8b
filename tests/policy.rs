//! Revocation and rate limits at the proxy: the admin API, `portcullis revoke`, two replicas on
//! one Redis, Redis down within and past `revocation_max_lag`, 429 with the RateLimit headers,
//! and a Sentinel failover that fails closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::http::{get, send, RawResponse};
use support::keys::TestKey;
use support::proxy::{config_text, wait_ready, ProxyProcess, TestProxy};
use support::redis::{free_port, RedisSentinel, RedisServer};
use support::upstream::Upstream;

const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";
const ADMIN_TOKEN: &str = "admin-token-of-at-least-32-bytes-long!!";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn key() -> TestKey {
    TestKey::hs256(HS_SECRET.as_bytes()).with_kid("k1")
}

fn token(sub: &str, jti: &str, iat: i64) -> String {
    key().sign(&json!({"iss": "https://internal.test", "sub": sub, "jti": jti, "iat": iat, "exp": now() + 600}))
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("HS_SECRET", HS_SECRET), ("ADMIN_TOKEN", ADMIN_TOKEN)]
}

fn config(upstream: &Upstream, store: &str, extra_routes: &str) -> String {
    config_text(
        upstream.addr,
        &format!(
            r#"
{store}

[jwt]
verified_cache = 1000

[[jwt.issuers]]
issuer = "https://internal.test"
algorithms = ["HS256"]
secrets = [{{ kid = "k1", env = "HS_SECRET" }}]

[[routes]]
name = "api"
path_prefix = "/api"
require = ["jwt"]

[[routes]]
name = "limited"
path_prefix = "/limited"
require = ["jwt"]
rate_limit = {{ requests = 3, per = "2s", key = "subject" }}

[[routes]]
name = "by-ip"
path_prefix = "/by-ip"
rate_limit = {{ requests = 2, per = "2s", key = "ip" }}
{extra_routes}
"#
        ),
    )
    .replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ADMIN_TOKEN\"",
    )
}

fn redis_store(url: &str, lag: &str) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\ntimeout = \"100ms\"\nrevocation_max_lag = \"{lag}\"")
}

async fn call(addr: std::net::SocketAddr, path: &str, token: &str) -> RawResponse {
    get(
        &format!("http://{addr}{path}"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

async fn admin(
    admin: std::net::SocketAddr,
    method: &str,
    body: serde_json::Value,
    token: &str,
) -> RawResponse {
    send(
        method,
        &format!("http://{admin}/revocations"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        body.to_string().into_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_even_from_the_verified_cache_and_undo_restores_it() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    let t = token("user-1", "jti-1", now() - 10);
    // The first call verifies and caches the token.
    assert_eq!(call(proxy.addr, "/api", &t).await.status, 200);

    let r = admin(
        proxy.admin,
        "POST",
        json!({"jti": "jti-1", "exp": now() + 600}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let response = call(proxy.addr, "/api", &t).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (401, "token_revoked")
    );
    assert!(response
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));

    let listed = get(
        &format!("http://{}/revocations", proxy.admin),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["revocations"][0]["jti"], "jti-1");

    let r = admin(
        proxy.admin,
        "DELETE",
        json!({"jti": "jti-1", "exp": now() + 600}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(call(proxy.addr, "/api", &t).await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_revocation_covers_only_tokens_issued_before_it() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    let before = now();
    let old = token("user-2", "a", before - 60);
    let fresh = token("user-2", "b", before + 1);
    let other = token("user-3", "c", before - 60);
    let r = admin(
        proxy.admin,
        "POST",
        json!({"sub": "user-2", "before": before}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(call(proxy.addr, "/api", &old).await.code(), "token_revoked");
    assert_eq!(call(proxy.addr, "/api", &fresh).await.status, 200);
    assert_eq!(call(proxy.addr, "/api", &other).await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revocation_names_a_time_redis_holds_exactly_and_undo_takes_any() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    let forever = json!({"sub": "user-4", "before": i64::MAX});
    let r = admin(proxy.admin, "POST", forever.clone(), ADMIN_TOKEN).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_body"));
    assert!(r.body.contains("Unix times"), "{}", r.body);
    // Undoing is not held to the range: a revocation stored before it can still go.
    let r = admin(proxy.admin, "DELETE", forever, ADMIN_TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin(
        proxy.admin,
        "POST",
        json!({"sub": "user-4", "before": 253_402_300_799_i64}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token_and_is_off_without_one() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    let body = json!({"jti": "x", "exp": now() + 60});
    let r = admin(proxy.admin, "POST", body.clone(), "wrong-token").await;
    assert_eq!((r.status, r.code().as_str()), (401, "admin_unauthorized"));
    let r = send(
        "POST",
        &format!("http://{}/revocations", proxy.admin),
        &[],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = admin(proxy.admin, "POST", json!({"jti": "x"}), ADMIN_TOKEN).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_body"));
    let r = admin(
        proxy.admin,
        "POST",
        json!({"jti": "x", "exp": 1, "sub": "y"}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 400);
    // A body over the admin API's 64 KiB is 413, as on the proxy's own port.
    let huge = json!({"jti": "x".repeat(70_000), "exp": now() + 60});
    let r = admin(proxy.admin, "POST", huge, ADMIN_TOKEN).await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
    // A method the resource does not take: 405 with the ones it does (RFC 9110).
    let r = admin(proxy.admin, "PUT", body.clone(), ADMIN_TOKEN).await;
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST, DELETE"));
    proxy.stop().await;

    // Without admin.token_env the API does not exist.
    let text = config(&upstream, "", "").replace("\ntoken_env = \"ADMIN_TOKEN\"", "");
    let proxy = TestProxy::start(&text, dir.path(), &env()).await;
    let r = admin(proxy.admin, "POST", body, ADMIN_TOKEN).await;
    assert_eq!((r.status, r.code().as_str()), (404, "admin_api_off"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portcullis_revoke_calls_the_admin_api() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    let t = token("user-4", "jti-cli", now() - 5);
    assert_eq!(call(proxy.addr, "/api", &t).await.status, 200);
    let admin_url = format!("http://{}", proxy.admin);
    let exp = (now() + 600).to_string();
    let run = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("revoke")
            .args(args)
            .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    };
    let args: Vec<String> = ["--admin-url", &admin_url, "--jti", "jti-cli", "--exp", &exp]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = tokio::task::spawn_blocking(move || run(args))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(call(proxy.addr, "/api", &t).await.code(), "token_revoked");
    let out = tokio::task::spawn_blocking({
        let admin_url = admin_url.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["revoke", "--admin-url", &admin_url, "--list"])
                .env("PORTCULLIS_ADMIN_TOKEN", "wrong")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_posted_to_one_replica_rejects_at_the_other_within_a_second() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let text = config(&upstream, &redis_store(&redis.url(), "5s"), "");
    let a = ProxyProcess::spawn(&text, &env());
    let b = ProxyProcess::spawn(&text, &env());
    for replica in [&a, &b] {
        wait_ready(&format!("http://{}/readyz", replica.admin)).await;
    }
    let t = token("user-5", "jti-5", now() - 5);
    assert_eq!(call(b.addr, "/api", &t).await.status, 200);
    let r = admin(
        a.admin,
        "POST",
        json!({"jti": "jti-5", "exp": now() + 600}),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Timed from the 201 to when each request was sent, so that a slow answer on a loaded
    // machine does not count against the replica.
    let posted = Instant::now();
    loop {
        let sent = posted.elapsed();
        let response = call(b.addr, "/api", &t).await;
        if response.code() == "token_revoked" {
            break;
        }
        assert_eq!(response.status, 200);
        assert!(
            sent < Duration::from_secs(1),
            "not revoked at the other replica within 1s (still allowed a request sent {sent:?} after the 201)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_gets_a_warning_at_start() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let text = config(&upstream, &redis_store(&redis.url(), "5s"), "");
    let eviction_warnings = |proxy: &ProxyProcess| -> Vec<String> {
        let logs = proxy.logs.lock().unwrap();
        logs.iter()
            .filter(|l| l.contains("redis may evict keys"))
            .cloned()
            .collect()
    };

    // redis-server's default has no memory limit, so it never evicts.
    let quiet = ProxyProcess::spawn(&text, &env());
    assert_eq!(eviction_warnings(&quiet), Vec::<String>::new());
    drop(quiet);

    redis.config_set("maxmemory", "64mb").await;
    redis.config_set("maxmemory-policy", "volatile-lru").await;
    let warned = ProxyProcess::spawn(&text, &env());
    // Checked before the proxy listens when Redis answers at once; on a loaded machine the
    // check may come from the reconnect a moment later instead.
    let deadline = Instant::now() + Duration::from_secs(5);
    while eviction_warnings(&warned).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warnings = eviction_warnings(&warned);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("volatile-lru"), "{}", warnings[0]);
    // A warning, not a refusal: the proxy serves, once its revocation mirror has synced (until
    // then it answers 503, failing closed; on a loaded machine that can take over a second).
    wait_ready(&format!("http://{}/readyz", warned.admin)).await;
    let t = token("user-8", "jti-8", now() - 5);
    assert_eq!(call(warned.addr, "/api", &t).await.status, 200);
    drop(warned);

    redis.config_set("maxmemory-policy", "noeviction").await;
    let quiet = ProxyProcess::spawn(&text, &env());
    assert_eq!(eviction_warnings(&quiet), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_up_after_the_proxy_is_checked_for_eviction_too() {
    let port = free_port();
    let upstream = Upstream::start().await;
    let url = format!("redis://127.0.0.1:{port}/0");
    let proxy = ProxyProcess::spawn(&config(&upstream, &redis_store(&url, "5s"), ""), &env());
    let _redis = RedisServer::start_with(
        port,
        &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let warned = proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("redis may evict keys") && l.contains("allkeys-lru"));
        if warned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no eviction warning within 15 s of redis coming up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_within_the_lag_still_serves_then_fails_closed_and_says_so() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(
        &config(&upstream, &redis_store(&redis.url(), "2s"), ""),
        dir.path(),
        &env(),
    )
    .await;
    wait_ready(&proxy.admin_url("/readyz")).await;
    let t = token("user-6", "jti-6", now() - 5);
    assert_eq!(call(proxy.addr, "/api", &t).await.status, 200);

    redis.kill();
    let killed = Instant::now();
    // Within revocation_max_lag: the local mirror answers, no round trip to Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = call(proxy.addr, "/api", &t).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(killed.elapsed() < Duration::from_secs(2));

    // Past it: fail closed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let response = call(proxy.addr, "/api", &t).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (503, "store_unavailable")
    );
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["revocations"]["state"], "unconfirmed");

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(proxy.addr, "/api", &t).await.status != 200 {
        assert!(Instant::now() < deadline, "no recovery after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.stop().await;
}

fn header_param(value: &str, name: &str) -> Option<u64> {
    value
        .split(';')
        .find_map(|p| p.trim().strip_prefix(&format!("{name}="))?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_ratelimit_headers_at_the_edges() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&config(&upstream, "", ""), dir.path(), &env()).await;
    // 2 per 2s by ip.
    let first = get(&proxy.url("/by-ip/x"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("ratelimit-policy"), Some("\"by-ip\";q=2;w=2"));
    assert_eq!(
        header_param(first.header("ratelimit").unwrap(), "r"),
        Some(1)
    );
    let second = get(&proxy.url("/by-ip/x"), &[]).await;
    assert_eq!(
        header_param(second.header("ratelimit").unwrap(), "r"),
        Some(0)
    );
    let refused = get(&proxy.url("/by-ip/x"), &[]).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "rate_limited")
    );
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    assert_eq!(
        header_param(refused.header("ratelimit").unwrap(), "r"),
        Some(0)
    );
    let reset = header_param(refused.header("ratelimit").unwrap(), "t").unwrap();
    assert!((1..=2).contains(&reset), "t={reset}");
    assert_eq!(upstream.count(), 2);

    // Retry-After is honest: after it, one request passes.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(get(&proxy.url("/by-ip/x"), &[]).await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_limit_counts_each_issuers_subject_and_refuses_a_token_without_sub() {
    const PARTNER_SECRET: &str = "a-partner-hs256-secret-of-32-bytes-or-more";
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&upstream, "", "").replace(
        "[[routes]]\nname = \"api\"",
        "[[jwt.issuers]]\nissuer = \"https://partner.test\"\nalgorithms = [\"HS256\"]\n\
         secrets = [{ kid = \"p1\", env = \"PARTNER_SECRET\" }]\n\n[[routes]]\nname = \"api\"",
    );
    // The internal issuer takes tokens without `sub`, so that one reaches the rate limit.
    let text = text.replacen(
        "secrets = [{ kid = \"k1\", env = \"HS_SECRET\" }]",
        "secrets = [{ kid = \"k1\", env = \"HS_SECRET\" }]\nrequired_claims = [\"exp\"]",
        1,
    );
    assert!(text.contains("https://partner.test") && text.contains("required_claims"));
    let mut vars = env();
    vars.push(("PARTNER_SECRET", PARTNER_SECRET));
    let proxy = TestProxy::start(&text, dir.path(), &vars).await;

    // 3 per 2 s by subject: the fourth call of one subject is refused.
    let internal = token("user-1", "j1", now() - 5);
    for _ in 0..3 {
        assert_eq!(call(proxy.addr, "/limited/x", &internal).await.status, 200);
    }
    let refused = call(proxy.addr, "/limited/x", &internal).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "rate_limited")
    );

    // Another issuer's user of the same name is another caller.
    let partner = TestKey::hs256(PARTNER_SECRET.as_bytes())
        .with_kid("p1")
        .sign(&json!({"iss": "https://partner.test", "sub": "user-1", "iat": now() - 5, "exp": now() + 600}));
    let r = call(proxy.addr, "/limited/x", &partner).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A token without `sub` names no caller: refused, and the upstream never sees it.
    let before = upstream.count();
    let nameless = key().sign(&json!({"iss": "https://internal.test", "exp": now() + 600}));
    let r = call(proxy.addr, "/limited/x", &nameless).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "missing_claim"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("rate limit counts by subject"),
        "{}",
        r.body
    );
    assert_eq!(upstream.count(), before);
    // The same token passes a route without a subject limit.
    assert_eq!(call(proxy.addr, "/api/x", &nameless).await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_limit_behind_a_trusted_proxy_counts_each_client_it_forwards() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plain = config(&upstream, "", "");
    let behind = plain.replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
        1,
    );
    assert_ne!(plain, behind);
    let via = |xff: &'static str| [("x-forwarded-for", xff)];

    // 2 per 2 s by ip. The peer (127.0.0.1) is a trusted load balancer: each client it names
    // last, past the trusted hops, has an allowance of its own.
    let proxy = TestProxy::start(&behind, dir.path(), &env()).await;
    for _ in 0..2 {
        let r = get(&proxy.url("/by-ip/x"), &via("198.51.100.7")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = get(&proxy.url("/by-ip/x"), &via("198.51.100.7")).await;
    assert_eq!((r.status, r.code().as_str()), (429, "rate_limited"));
    // The same client through a second trusted hop; a forged address on the left is not read.
    let r = get(
        &proxy.url("/by-ip/x"),
        &via("203.0.113.99, 198.51.100.7, 10.1.2.3"),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    let r = get(&proxy.url("/by-ip/x"), &via("198.51.100.8")).await;
    assert_eq!(
        r.status, 200,
        "another client shares the first one's allowance"
    );
    // The IPv4-mapped form of a client is that client.
    let r = get(&proxy.url("/by-ip/x"), &via("::ffff:198.51.100.7")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    // An IPv6 client counts by its /64: another address in it shares the allowance, a
    // neighbouring /64 has its own.
    for client in ["2001:db8:1:2::a", "2001:db8:1:2:ffff:ffff:ffff:ffff"] {
        let r = get(&proxy.url("/by-ip/x"), &via(client)).await;
        assert_eq!(r.status, 200, "{client}: {}", r.body);
    }
    let r = get(&proxy.url("/by-ip/x"), &via("2001:db8:1:2:1234::7")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "rate_limited"),
        "a third address of the same /64 has an allowance of its own"
    );
    let r = get(&proxy.url("/by-ip/x"), &via("2001:db8:1:3::a")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    proxy.stop().await;

    // From a peer that is not trusted, X-Forwarded-For names nobody: one allowance.
    let proxy = TestProxy::start(&plain, dir.path(), &env()).await;
    let statuses = [
        get(&proxy.url("/by-ip/x"), &via("198.51.100.1"))
            .await
            .status,
        get(&proxy.url("/by-ip/x"), &via("198.51.100.2"))
            .await
            .status,
        get(&proxy.url("/by-ip/x"), &via("198.51.100.3"))
            .await
            .status,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_n_allows_exactly_n_across_two_replicas() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let text = config(&upstream, &redis_store(&redis.url(), "5s"), "").replace(
        "rate_limit = { requests = 3, per = \"2s\", key = \"subject\" }",
        "rate_limit = { requests = 10, per = \"60s\", key = \"subject\" }",
    );
    let a = ProxyProcess::spawn(&text, &env());
    let b = ProxyProcess::spawn(&text, &env());
    for replica in [&a, &b] {
        wait_ready(&format!("http://{}/readyz", replica.admin)).await;
    }
    let t = token("user-7", "jti-7", now() - 5);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let t = t.clone();
        tasks.push(tokio::spawn(
            async move { call(addr, "/limited/x", &t).await },
        ));
    }
    let mut passed = 0;
    for task in tasks {
        let r = task.await.unwrap();
        match r.status {
            200 => passed += 1,
            429 => assert_eq!(r.code(), "rate_limited"),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!(
        passed, 10,
        "a limit of 10 let {passed} through across two replicas"
    );
    // Another subject has its own allowance.
    assert_eq!(
        call(a.addr, "/limited/x", &token("user-8", "j8", now() - 5))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_fails_closed_then_passes_without_a_restart() {
    let mut sentinel = RedisSentinel::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &upstream,
        &redis_store(&sentinel.url(), "5s"),
        "\n[signature]\n[[signature.keys]]\nid = \"k\"\nclient = \"c\"\nsecret_env = \"HS_SECRET\"\n\n[[routes]]\nname = \"signed\"\npath_prefix = \"/signed\"\nrequire = [\"signature\"]\n",
    );
    let proxy = TestProxy::start(&text, dir.path(), &env()).await;
    wait_ready(&proxy.admin_url("/readyz")).await;
    let host = proxy.addr.to_string();
    let signed = |path: &str| {
        let ts = now() as u64;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let body_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b""));
        let to_sign =
            portcullis::auth::signature::string_to_sign("GET", path, &host, ts, &nonce, &body_hash);
        let sig = portcullis::auth::signature::sign(
            portcullis::config::SignatureAlgorithm::HmacSha256,
            HS_SECRET.as_bytes(),
            to_sign.as_bytes(),
        );
        format!(r#"Signature v1, keyId="k", ts="{ts}", nonce="{nonce}", signature="{sig}""#)
    };
    let send_signed = |path: &'static str| {
        let header = signed(path);
        let url = proxy.url(path);
        async move { get(&url, &[("authorization", &header)]).await }
    };
    assert_eq!(send_signed("/signed/a").await.status, 200);

    sentinel.kill_master();
    let killed = Instant::now();
    let mut saw_refusal = false;
    loop {
        let r = send_signed("/signed/a").await;
        match r.status {
            200 if saw_refusal => break,
            200 => {}
            503 => {
                assert_eq!(r.code(), "store_unavailable");
                saw_refusal = true;
            }
            other => panic!("during the failover: {other} {}", r.body),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no promotion within 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_refusal, "the failover was never seen as a refusal");
    assert_ne!(sentinel.current_master(), None);
    proxy.stop().await;
}
