//! JWT validation end to end: a real JWKS served over HTTP, a real upstream, real clients.
//! Every rule of DESIGN.md's "JWT rules that are never configurable" has its own test here,
//! asserting status and `code`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use support::http::{get, raw, send, RawResponse};
use support::jwks::JwksServer;
use support::keys::{jwks, sign_raw, TestKey};
use support::proxy::{config_text, TestProxy};
use support::upstream::Upstream;

const ISSUER: &str = "https://issuer.test";
const INTERNAL: &str = "https://internal.test";
const SCOPED: &str = "https://scoped.test";
const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";
const SCOPE_SECRET: &str = "another-hs256-secret-of-32-bytes-or-more";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(iss: &str) -> Value {
    json!({
        "iss": iss,
        "sub": "user-7",
        "aud": "api_clients",
        "iat": now(),
        "exp": now() + 600,
        "permissions": ["read:data", "write:data"],
    })
}

struct Setup {
    upstream: Upstream,
    jwks: JwksServer,
    proxy: TestProxy,
    rs256: TestKey,
    es256: TestKey,
    eddsa: TestKey,
    ps256: TestKey,
    hs256: TestKey,
    scoped: TestKey,
    _dir: tempfile::TempDir,
}

fn issuers(jwks_url: &str, jwks_refresh: &str, jwks_min_refetch: &str) -> String {
    format!(
        r#"
[jwt]
leeway = "5s"

[[jwt.issuers]]
issuer = "{ISSUER}"
audiences = ["api_clients"]
algorithms = ["RS256", "ES256", "EdDSA", "PS256"]
jwks_url = "{jwks_url}"
max_lifetime = "1h"
jwks_refresh = "{jwks_refresh}"
jwks_min_refetch = "{jwks_min_refetch}"

[[jwt.issuers]]
issuer = "{INTERNAL}"
audiences = ["api_clients"]
algorithms = ["HS256"]
secrets = [{{ kid = "internal-1", env = "HS_SECRET" }}]
required_claims = ["sub", "exp"]

[[jwt.issuers]]
issuer = "{SCOPED}"
audiences = ["api_clients"]
algorithms = ["HS256"]
secrets = [{{ kid = "scoped-1", env = "SCOPE_SECRET" }}]
permissions_claim = "scope"

[[routes]]
name = "read"
path_prefix = "/api"
methods = ["GET"]
require = ["jwt"]
permissions = ["read:data"]

[[routes]]
name = "admin"
path_prefix = "/admin"
require = ["jwt"]
permissions = ["admin"]

[[routes]]
name = "public"
path_prefix = "/public"
"#
    )
}

async fn setup_with(jwks_refresh: &str, jwks_min_refetch: &str) -> Setup {
    let rs256 = TestKey::rs256();
    let es256 = TestKey::es256();
    let eddsa = TestKey::eddsa();
    let ps256 = TestKey::ps256();
    let hs256 = TestKey::hs256(HS_SECRET.as_bytes()).with_kid("internal-1");
    let scoped = TestKey::hs256(SCOPE_SECRET.as_bytes()).with_kid("scoped-1");
    let jwks_server = JwksServer::start(jwks(&[&rs256, &es256, &eddsa, &ps256])).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        upstream.addr,
        &issuers(&jwks_server.url(), jwks_refresh, jwks_min_refetch),
    );
    let proxy = TestProxy::start(
        &text,
        dir.path(),
        &[("HS_SECRET", HS_SECRET), ("SCOPE_SECRET", SCOPE_SECRET)],
    )
    .await;
    Setup {
        upstream,
        jwks: jwks_server,
        proxy,
        rs256,
        es256,
        eddsa,
        ps256,
        hs256,
        scoped,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with("1s", "1s").await
}

impl Setup {
    async fn call(&self, token: &str) -> RawResponse {
        get(
            &self.proxy.url("/api/data"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
    }

    /// Asserts a 401 with `code` and an RFC 6750 invalid_token challenge, and that nothing
    /// reached the upstream.
    async fn refused(&self, token: &str, code: &str) {
        let before = self.upstream.count();
        let response = self.call(token).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (401, code),
            "{}",
            response.body
        );
        let challenge = response.header("www-authenticate").unwrap_or("");
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(!response.body.contains(token), "the body echoes the token");
        assert_eq!(
            self.upstream.count(),
            before,
            "a refused request reached the upstream"
        );
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_of_every_algorithm_pass_with_identity_headers() {
    let s = setup().await;
    for key in [&s.rs256, &s.es256, &s.eddsa, &s.ps256, &s.hs256] {
        let iss = if key.kid() == "internal-1" {
            INTERNAL
        } else {
            ISSUER
        };
        let claims = claims(iss);
        let token = key.sign(&claims);
        let response = s.call(&token).await;
        assert_eq!(response.status, 200, "{}: {}", key.kid(), response.body);

        let seen = s.upstream.last();
        assert_eq!(seen.header("x-auth-subject"), Some("user-7"));
        assert_eq!(seen.header("x-auth-issuer"), Some(iss));
        assert_eq!(
            seen.header("x-auth-permissions"),
            Some("read:data,write:data")
        );
        let payload = URL_SAFE_NO_PAD
            .decode(seen.header("x-auth-claims").unwrap())
            .unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), claims);
        assert_eq!(seen.header("x-request-id"), response.header("x-request-id"));
    }
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_strings_give_permissions_and_missing_ones_are_403() {
    let s = setup().await;
    let mut c = claims(SCOPED);
    c.as_object_mut().unwrap().remove("permissions");
    c["scope"] = json!("read:data profile");
    let response = s.call(&s.scoped.sign(&c)).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        s.upstream.last().header("x-auth-permissions"),
        Some("read:data,profile")
    );

    let response = get(
        &s.proxy.url("/admin"),
        &[("authorization", &format!("Bearer {}", s.scoped.sign(&c)))],
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (403, "insufficient_permissions")
    );
    let challenge = response.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_remove_the_identity_the_proxy_adds() {
    let s = setup().await;
    let token = s.rs256.sign(&claims(ISSUER));
    let response = raw(
        s.proxy.addr,
        &format!(
            "GET /api/x HTTP/1.1\nAuthorization: Bearer {token}\n\
             Connection: x-auth-subject, x-auth-permissions, x-auth-claims\n\
             X-Auth-Subject: admin"
        ),
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = s.upstream.last();
    assert_eq!(seen.header("x-auth-subject"), Some("user-7"));
    assert_eq!(
        seen.header("x-auth-permissions"),
        Some("read:data,write:data")
    );
    assert!(seen.header("x-auth-claims").is_some());
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_non_bearer_credentials_are_401_with_a_bare_challenge() {
    let s = setup().await;
    for headers in [vec![], vec![("authorization", "Basic dXNlcjpwYXNz")]] {
        let response = get(&s.proxy.url("/api/x"), &headers).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (401, "missing_credentials")
        );
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer realm=\"portcullis\"")
        );
    }
    assert_eq!(s.upstream.count(), 0);
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_are_enforced() {
    let s = setup().await;
    let mut c = claims(ISSUER);
    c["exp"] = json!(now() - 60);
    c["iat"] = json!(now() - 120);
    s.refused(&s.rs256.sign(&c), "token_expired").await;

    let mut c = claims(ISSUER);
    c["nbf"] = json!(now() + 120);
    s.refused(&s.rs256.sign(&c), "token_not_yet_valid").await;

    // Within the 5s leeway both are fine.
    let mut c = claims(ISSUER);
    c["nbf"] = json!(now() + 2);
    assert_eq!(s.call(&s.rs256.sign(&c)).await.status, 200);

    // max_lifetime is 1h for this issuer: exp - iat above it is refused.
    let mut c = claims(ISSUER);
    c["exp"] = json!(now() + 7200);
    s.refused(&s.rs256.sign(&c), "token_lifetime_exceeded")
        .await;
    // Without iat, exp - now counts.
    let mut c = claims(INTERNAL);
    c.as_object_mut().unwrap().remove("iat");
    c["exp"] = json!(now() + 25 * 3600);
    s.refused(&s.hs256.sign(&c), "token_lifetime_exceeded")
        .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_must_be_json_integers() {
    let s = setup().await;
    for (claim, value) in [
        ("exp", json!("9999999999")),
        ("exp", json!(1.5e9)),
        ("exp", json!(99999999999999999999999.0)),
        ("iat", json!("0")),
        ("nbf", json!(true)),
        ("exp", json!(null)),
    ] {
        let mut c = claims(ISSUER);
        c[claim] = value.clone();
        let response = s.call(&s.rs256.sign(&c)).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (401, "malformed_token"),
            "{claim}={value}: {}",
            response.body
        );
    }
    // A number too large for i64, written out in full.
    let payload = format!(
        r#"{{"iss":"{ISSUER}","sub":"u","aud":"api_clients","iat":1,"exp":123456789012345678901234567890}}"#
    );
    let header = format!(r#"{{"alg":"RS256","kid":"{}"}}"#, s.rs256.kid());
    s.refused(&sign_raw(&header, &payload, &s.rs256), "malformed_token")
        .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_and_required_claims_must_be_present() {
    let s = setup().await;
    let mut c = claims(ISSUER);
    c.as_object_mut().unwrap().remove("exp");
    s.refused(&s.rs256.sign(&c), "missing_claim").await;
    let mut c = claims(ISSUER);
    c.as_object_mut().unwrap().remove("sub");
    s.refused(&s.rs256.sign(&c), "missing_claim").await;
    // This issuer does not require iat, but exp is never optional.
    let mut c = claims(INTERNAL);
    c.as_object_mut().unwrap().remove("exp");
    s.refused(&s.hs256.sign(&c), "missing_claim").await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_must_be_a_configured_string_exactly() {
    let s = setup().await;
    for iss in [
        json!("https://issuer.test/"),
        json!("https://issuer.tes"),
        json!("https://issuer.test.evil"),
        json!([ISSUER]),
        json!(42),
        json!(null),
    ] {
        let mut c = claims(ISSUER);
        c["iss"] = iss.clone();
        let response = s.call(&s.rs256.sign(&c)).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (401, "invalid_issuer"),
            "iss={iss}: {}",
            response.body
        );
    }
    let mut c = claims(ISSUER);
    c.as_object_mut().unwrap().remove("iss");
    s.refused(&s.rs256.sign(&c), "invalid_issuer").await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_must_be_a_string_and_aud_must_match() {
    let s = setup().await;
    let mut c = claims(ISSUER);
    c["sub"] = json!(7);
    s.refused(&s.rs256.sign(&c), "malformed_token").await;

    let mut c = claims(ISSUER);
    c["aud"] = json!("someone_else");
    s.refused(&s.rs256.sign(&c), "invalid_audience").await;
    c["aud"] = json!(["someone_else", "api_clients"]);
    assert_eq!(s.call(&s.rs256.sign(&c)).await.status, 200);
    c["aud"] = json!([1, 2]);
    s.refused(&s.rs256.sign(&c), "malformed_token").await;
    c.as_object_mut().unwrap().remove("aud");
    s.refused(&s.rs256.sign(&c), "invalid_audience").await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_is_never_accepted() {
    let s = setup().await;
    let c = claims(ISSUER);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": s.rs256.kid()});
        let token = format!("{}.{}.", b64(&header), b64(&c));
        s.refused(&token, "algorithm_not_allowed").await;
        // Even with a signature segment present.
        let token = format!("{}.{}.c2ln", b64(&header), b64(&c));
        s.refused(&token, "algorithm_not_allowed").await;
    }
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithms_outside_the_allow_list_are_refused() {
    let s = setup().await;
    // RS384 is a fine algorithm, but this issuer allows RS256, ES256, EdDSA and PS256 only.
    let rs384 = TestKey::rs384();
    s.jwks
        .set(jwks(&[&s.rs256, &s.es256, &s.eddsa, &s.ps256, &rs384]));
    s.refused(&rs384.sign(&claims(ISSUER)), "algorithm_not_allowed")
        .await;
    // HS256 is not allowed for this issuer at all.
    let header = json!({"alg": "HS256", "kid": s.rs256.kid()});
    s.refused(
        &s.hs256.sign_with_header(&header, &claims(ISSUER)),
        "algorithm_not_allowed",
    )
    .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_are_never_hmac_secrets() {
    // An issuer that allows both RS256 and HS256: the classic confusion attack signs with HS256
    // using the RSA public key as the secret, and names the RSA key's kid.
    let rs256 = TestKey::rs256();
    let jwks_server = JwksServer::start(jwks(&[&rs256])).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        upstream.addr,
        &format!(
            r#"
[[jwt.issuers]]
issuer = "{ISSUER}"
audiences = ["api_clients"]
algorithms = ["RS256", "HS256"]
jwks_url = "{}"
secrets = [{{ kid = "hmac-1", env = "HS_SECRET" }}]

[[routes]]
name = "api"
path_prefix = "/api"
require = ["jwt"]
"#,
            jwks_server.url()
        ),
    );
    let proxy = TestProxy::start(&text, dir.path(), &[("HS_SECRET", HS_SECRET)]).await;
    let forger = TestKey::hs256(&rs256.public_key_bytes());
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": rs256.kid()});
    let token = forger.sign_with_header(&header, &claims(ISSUER));
    let response = get(
        &proxy.url("/api"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (401, "algorithm_not_allowed")
    );
    // The genuine RS256 token passes on the same issuer.
    let good = rs256.sign(&claims(ISSUER));
    let response = get(
        &proxy.url("/api"),
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(upstream.count(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_key_headers_are_never_followed() {
    let s = setup().await;
    let attacker = TestKey::rs256();
    let c = claims(ISSUER);
    // The attacker's own key, offered in every header that some libraries trust.
    let offered = [
        json!({"alg": "RS256", "kid": attacker.kid(), "jwk": attacker.jwk()}),
        json!({"alg": "RS256", "kid": attacker.kid(), "jku": s.jwks.url().replace(".well-known", "evil")}),
        json!({"alg": "RS256", "kid": attacker.kid(), "x5u": "http://127.0.0.1:1/cert.pem"}),
        json!({"alg": "RS256", "kid": attacker.kid(), "x5c": ["MIIB"]}),
    ];
    for header in &offered {
        s.refused(&attacker.sign_with_header(header, &c), "unknown_key")
            .await;
    }
    // Naming a genuine kid while signing with the attacker's key fails the signature.
    let header = json!({"alg": "RS256", "kid": s.rs256.kid(), "jwk": attacker.jwk()});
    s.refused(
        &attacker.sign_with_header(&header, &c),
        "invalid_token_signature",
    )
    .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crit_jwe_and_nested_tokens_are_rejected() {
    let s = setup().await;
    let c = claims(ISSUER);
    let header = json!({"alg": "RS256", "kid": s.rs256.kid(), "crit": ["exp"], "exp": 1});
    s.refused(&s.rs256.sign_with_header(&header, &c), "malformed_token")
        .await;
    let header = json!({"alg": "RS256", "kid": s.rs256.kid(), "cty": "JWT"});
    s.refused(&s.rs256.sign_with_header(&header, &c), "malformed_token")
        .await;
    let jwe = "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.OKOawDo13gRp2ojaHV7LFpZcgV7T6DVZKTyKOMTYUmKoTCVJRgckCL9kiMT03JGeipsEdY3mx_etLbbWSrFr05kLzcSr4qKAq7YN7e9jwQRb23nfa6c9d-StnImGyFDbSv04uVuxIp5Zms1gNxKKK2Da14B8S4rzVRltdYwam_lDp5XnZAYpQdb76FdIKLaVmqgfwX7XWRxv2322i-vDxRfqNzo_tETKzpVLzfiwQyeyPGLBIO56YJ7eObdv0je81860ppamavo35UgoRdbYaBcoh9QcfylQr66oc6vFWXRcZ_ZT2LawVCWTIy3brGPi6UklfCpIMfIjf7iGdXKHzg.48V1_ALb6US04U3b.5eym8TW_c8SuK0ltJ3rpYIzOeDQz7TALvtu6UG9oMo4vpzs9tX_EFShS8iB7j6jiSdiwkIr3ajwQzaBtQD_A.XFBoMYUZodetZdvTiFvSkQ";
    s.refused(jwe, "malformed_token").await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_tokens_are_rejected() {
    let s = setup().await;
    let mut c = claims(ISSUER);
    c["padding"] = json!("x".repeat(9000));
    s.refused(&s.rs256.sign(&c), "malformed_token").await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys_are_malformed() {
    let s = setup().await;
    let kid = s.rs256.kid();
    let good_header = format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#);
    let exp = now() + 600;
    let iat = now();
    let payloads = [
        format!(
            r#"{{"iss":"{ISSUER}","sub":"user-7","sub":"admin","aud":"api_clients","iat":{iat},"exp":{exp}}}"#
        ),
        format!(
            r#"{{"iss":"{ISSUER}","sub":"u","aud":"api_clients","iat":{iat},"exp":{exp},"permissions":["read:data"],"permissions":["admin"]}}"#
        ),
        format!(
            r#"{{"iss":"{ISSUER}","sub":"u","aud":"api_clients","iat":{iat},"exp":{exp},"ctx":{{"a":1,"a":2}}}}"#
        ),
    ];
    for payload in &payloads {
        s.refused(
            &sign_raw(&good_header, payload, &s.rs256),
            "malformed_token",
        )
        .await;
    }
    let dup_header = format!(r#"{{"alg":"RS256","kid":"nope","kid":"{kid}"}}"#);
    let payload = claims(ISSUER).to_string();
    s.refused(
        &sign_raw(&dup_header, &payload, &s.rs256),
        "malformed_token",
    )
    .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_tokens_and_unknown_kids_are_refused() {
    let s = setup().await;
    let token = s.es256.sign(&claims(ISSUER));
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut c = claims(ISSUER);
    c["permissions"] = json!(["admin"]);
    let forged_payload = b64(&c);
    parts[1] = &forged_payload;
    s.refused(&parts.join("."), "invalid_token_signature").await;

    let stranger = TestKey::es256();
    s.refused(&stranger.sign(&claims(ISSUER)), "unknown_key")
        .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tokens_get_malformed_token_and_nothing_panics() {
    let s = setup().await;
    let long = "a".repeat(10_000);
    let garbage = [
        "x",
        "a.b.c",
        "..",
        "....",
        "a.b",
        "e30.e30.",
        "eyJhbGciOiJSUzI1NiJ9.!!!.sig",
        "eyJhbGciOiJSUzI1NiJ9==.e30.c2ln",
        "W10.e30.c2ln",
        "bnVsbA.e30.c2ln",
        "eyJhbGciOjF9.e30.c2ln",
        "\u{e9}t\u{e9}.a.b",
        long.as_str(),
    ];
    for token in garbage {
        let response = raw(
            s.proxy.addr,
            &format!("GET /api/x HTTP/1.1\nAuthorization: Bearer {token}"),
            b"",
        )
        .await;
        assert_eq!(response.status, 401, "{token:.40}: {}", response.body);
        assert!(
            ["malformed_token", "algorithm_not_allowed"].contains(&response.code().as_str()),
            "{token:.40}: {}",
            response.body
        );
    }
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_to_the_jwks_after_start_passes_once_refetched() {
    let s = setup().await;
    let rotated = TestKey::rs256();
    let token = rotated.sign(&claims(ISSUER));
    s.refused(&token, "unknown_key").await;

    s.jwks.set(jwks(&[&s.rs256, &rotated]));
    // jwks_min_refetch is 1s: the next unknown kid after it may refetch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = s.call(&token).await;
    assert_eq!(response.status, 200, "{}", response.body);
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_min_refetch() {
    // No scheduled refresh during the test; refetch on unknown kid at most every 5 s, long
    // enough that both floods fit in it on a slow machine.
    let s = setup_with("1h", "5s").await;
    let tokens: Vec<String> = (0..80)
        .map(|i| {
            let stranger_header = json!({"alg": "RS256", "kid": format!("unknown-{i}")});
            s.rs256.sign_with_header(&stranger_header, &claims(ISSUER))
        })
        .collect();
    // Past jwks_min_refetch since the fetch at start.
    tokio::time::sleep(Duration::from_millis(5100)).await;
    let before = s.jwks.fetches();
    let flood = |s: &Setup, tokens: &[String]| {
        let mut tasks = Vec::new();
        for token in tokens {
            let url = s.proxy.url("/api/x");
            let authorization = format!("Bearer {token}");
            tasks.push(tokio::spawn(async move {
                get(&url, &[("authorization", &authorization)]).await
            }));
        }
        tasks
    };
    for task in flood(&s, &tokens[..40]) {
        assert_eq!(task.await.unwrap().code(), "unknown_key");
    }
    assert_eq!(
        s.jwks.fetches() - before,
        1,
        "40 concurrent unknown kids share one fetch"
    );
    // Within jwks_min_refetch of that fetch, another flood fetches nothing.
    for task in flood(&s, &tokens[40..]) {
        assert_eq!(task.await.unwrap().code(), "unknown_key");
    }
    assert_eq!(
        s.jwks.fetches() - before,
        1,
        "a second flood refetched within jwks_min_refetch"
    );
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_after_start_keeps_serving_the_last_good_keys() {
    let s = setup().await;
    let token = s.rs256.sign(&claims(ISSUER));
    assert_eq!(s.call(&token).await.status, 200);

    s.jwks.fail(true);
    // jwks_refresh is 1s: let at least one refresh fail.
    let failed_before = s.jwks.fetches();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(s.jwks.fetches() > failed_before, "no refresh was tried");
    assert_eq!(s.call(&token).await.status, 200);

    let ready = get(&s.proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let issuers = ready.json()["issuers"].clone();
    let ours = issuers
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["issuer"] == ISSUER)
        .unwrap()
        .clone();
    assert_eq!(ours["keys"], "stale", "{}", ready.body);

    let metrics = get(&s.proxy.admin_url("/metrics"), &[]).await.body;
    assert!(
        metrics.contains(&format!(
            r#"portcullis_jwks_refreshes_total{{issuer="{ISSUER}",result="error"}}"#
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_jwks_keys_age_seconds"),
        "{metrics}"
    );
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_cache_lookups_are_counted_in_the_metrics() {
    // The default configuration: the verified-token cache is on.
    let s = setup().await;
    let reused = s.rs256.sign(&claims(ISSUER));
    let other = s.es256.sign(&claims(ISSUER));
    for token in [&reused, &reused, &reused, &other] {
        assert_eq!(s.call(token).await.status, 200);
    }
    // A token that fails its signature is looked up, missed, and never cached.
    let mut forged = reused.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    s.refused(&forged, "invalid_token_signature").await;
    s.refused(&forged, "invalid_token_signature").await;

    let metrics = get(&s.proxy.admin_url("/metrics"), &[]).await.body;
    let value = |result: &str| {
        let series = format!("portcullis_jwt_verified_cache_lookups_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.to_string())
    };
    assert_eq!(
        (value("hit").as_deref(), value("miss").as_deref()),
        (Some("2"), Some("4")),
        "{metrics}"
    );
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_at_start_is_503_keys_unavailable_never_a_pass() {
    let rs256 = TestKey::rs256();
    let jwks_server = JwksServer::start(jwks(&[&rs256])).await;
    jwks_server.fail(true);
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        upstream.addr,
        &format!(
            r#"
[[jwt.issuers]]
issuer = "{ISSUER}"
audiences = ["api_clients"]
algorithms = ["RS256"]
jwks_url = "{}"
jwks_min_refetch = "1s"

[[routes]]
name = "api"
path_prefix = "/api"
require = ["jwt"]
"#,
            jwks_server.url()
        ),
    );
    let proxy = TestProxy::start(&text, dir.path(), &[]).await;
    let token = rs256.sign(&claims(ISSUER));
    let response = get(
        &proxy.url("/api"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (503, "keys_unavailable")
    );
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(upstream.count(), 0);

    // Once the JWKS answers, the same token passes without a restart.
    jwks_server.fail(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut status = 0;
    for _ in 0..30 {
        status = get(
            &proxy.url("/api"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
        .status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(get(&proxy.admin_url("/readyz"), &[]).await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_no_route_allows_is_405_even_with_a_valid_token() {
    let s = setup().await;
    let token = s.hs256.sign(&claims(INTERNAL));
    // GET-only route: POST is 405 even with a valid token.
    let response = send(
        "POST",
        &s.proxy.url("/api/x"),
        &[("authorization", &format!("Bearer {token}"))],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(response.code(), "method_not_allowed");
    s.proxy.stop().await;
}
