//! TLS and mutual TLS with real handshakes: certificates made in the test with rcgen, clients
//! tokio-rustls and curl, a real upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::DnType;
use serde_json::json;
use support::http::get;
use support::keys::TestKey;
use support::pki::{Ca, Issued, TlsClient, Usage};
use support::proxy::{config_text, TestProxy};
use support::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

struct Pki {
    ca: Ca,
    server: Issued,
    client: Issued,
    dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let ca = Ca::new("portcullis test CA");
    let server = ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        &[],
        Usage::Server,
        false,
    );
    let client = ca.issue(
        "client-42",
        &["client-42.example.org"],
        &["spiffe://example.org/client-42"],
        Usage::Client,
        false,
    );
    let dir = tempfile::tempdir().unwrap();
    server.write(dir.path(), "tls");
    ca.write(dir.path(), "client-ca");
    Pki {
        ca,
        server,
        client,
        dir,
    }
}

fn tls_config(upstream: &Upstream, dir: &Path, client_cert: &str, tls_extra: &str) -> String {
    let routes = r#"
[jwt]
[[jwt.issuers]]
issuer = "https://internal.test"
algorithms = ["HS256"]
secrets = [{ kid = "k1", env = "HS_SECRET" }]

[[routes]]
name = "public"
path_prefix = "/public"

[[routes]]
name = "mtls"
path_prefix = "/mtls"
require = ["mtls"]

[[routes]]
name = "allowed"
path_prefix = "/allowed"
require = ["mtls"]
client_certs = { uri = ["spiffe://example.org/client-42"] }

[[routes]]
name = "others"
path_prefix = "/others"
require = ["mtls"]
client_certs = { dns = ["client-43.example.org"] }

[[routes]]
name = "bound"
path_prefix = "/bound"
require = ["jwt"]
"#;
    // [server.tls] goes right after [server]'s own keys.
    config_text(upstream.addr, routes).replacen(
        "\n\n[admin]",
        &format!(
            "\n\n[server.tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\nclient_ca = \"{d}/client-ca.crt\"\nclient_cert = \"{client_cert}\"\n{tls_extra}\n\n[admin]",
            d = dir.display()
        ),
        1,
    )
}

async fn start(upstream: &Upstream, pki: &Pki, client_cert: &str) -> TestProxy {
    let text = tls_config(upstream, pki.dir.path(), client_cert, "");
    TestProxy::start(&text, pki.dir.path(), &[("HS_SECRET", HS_SECRET)]).await
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Waits until handshakes at `addr` show `cert`, for at most 5 s; `what` names it in the
/// failure.
async fn served_within_5s(
    client: &TlsClient,
    addr: std::net::SocketAddr,
    cert: &Issued,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = client.get(addr, "/public", &[]).await.unwrap();
        if now.server_cert_sha256 == cert.sha256_hex() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {what} certificate was not served within 5s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_public_route_is_served_and_marked_https() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let client = TlsClient::new(&pki.ca.pem(), None);
    let response = client.get(proxy.addr, "/public/x", &[]).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.server_cert_sha256, pki.server.sha256_hex());
    let seen = upstream.last();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    // No client certificate: no x-forwarded-client-cert, whatever the client sends.
    let response = client
        .get(
            proxy.addr,
            "/public/y",
            &[("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(upstream.last().header("x-forwarded-client-cert"), None);
    // Plain HTTP on the TLS port is refused.
    let plain = reqwest::Client::new()
        .get(proxy.url("/public"))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_route_needs_a_trusted_client_certificate() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;

    let anonymous = TlsClient::new(&pki.ca.pem(), None);
    let response = anonymous.get(proxy.addr, "/mtls/x", &[]).await.unwrap();
    assert_eq!(response.status, 401, "{}", response.body);
    let problem: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(problem["code"], "client_certificate_required");

    let trusted = TlsClient::new(&pki.ca.pem(), Some(&pki.client));
    let response = trusted
        .get(
            proxy.addr,
            "/mtls/x",
            &[("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let xfcc = upstream
        .last()
        .header("x-forwarded-client-cert")
        .unwrap()
        .to_owned();
    assert!(
        xfcc.starts_with(&format!("Hash={};Subject=\"", pki.client.sha256_hex())),
        "{xfcc}"
    );
    assert!(xfcc.contains("CN=client-42"), "{xfcc}");
    assert!(
        xfcc.contains(";URI=spiffe://example.org/client-42"),
        "{xfcc}"
    );
    assert!(xfcc.contains(";DNS=client-42.example.org"), "{xfcc}");
    assert!(
        !xfcc.contains("admin"),
        "the client's own header leaked: {xfcc}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_name_holding_a_comma_cannot_add_a_name_part_to_the_xfcc_subject() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let sneaky = pki.ca.issue_with_dn(
        &[
            (DnType::OrganizationName, "Example"),
            (DnType::CommonName, "alice,OU=admins"),
        ],
        &["alice.example.org"],
        &[],
        Usage::Client,
        false,
    );
    let client = TlsClient::new(&pki.ca.pem(), Some(&sneaky));
    let response = client.get(proxy.addr, "/mtls/x", &[]).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    // RFC 4514 escapes the comma (`CN=alice\,OU=admins`), most specific RDN first; the XFCC
    // quoting then escapes that backslash.
    assert_eq!(
        upstream.last().header("x-forwarded-client-cert"),
        Some(
            format!(
                r#"Hash={};Subject="CN=alice\\,OU=admins,O=Example";DNS=alice.example.org"#,
                sneaky.sha256_hex()
            )
            .as_str()
        )
    );
    // The allow-list refusal quotes the same subject.
    let response = client.get(proxy.addr, "/others/x", &[]).await.unwrap();
    assert_eq!(response.status, 401, "{}", response.body);
    let problem: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(problem["code"], "client_certificate_rejected");
    assert_eq!(
        problem["detail"],
        r#"the client certificate "CN=alice\\,OU=admins,O=Example" is not allowed on this route"#
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_expired_and_non_client_certificates_are_refused() {
    let pki = pki();
    let other_ca = Ca::new("someone else's CA");
    let foreign = other_ca.issue(
        "client-42",
        &["client-42.example.org"],
        &[],
        Usage::Client,
        false,
    );
    let expired = pki.ca.issue(
        "client-42",
        &["client-42.example.org"],
        &[],
        Usage::Client,
        true,
    );
    let no_eku = pki.ca.issue(
        "client-42",
        &["client-42.example.org"],
        &[],
        Usage::ClientWithoutEku,
        false,
    );
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    for (what, cert) in [
        ("other CA", &foreign),
        ("expired", &expired),
        ("no clientAuth", &no_eku),
    ] {
        let client = TlsClient::new(&pki.ca.pem(), Some(cert));
        match client.get(proxy.addr, "/public/x", &[]).await {
            Err(_) => {}
            Ok(r) => panic!(
                "{what}: the proxy answered {} instead of refusing the handshake",
                r.status
            ),
        }
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_required_refuses_the_handshake_without_one() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "required").await;
    let anonymous = TlsClient::new(&pki.ca.pem(), None);
    assert!(anonymous.get(proxy.addr, "/public/x", &[]).await.is_err());
    let trusted = TlsClient::new(&pki.ca.pem(), Some(&pki.client));
    assert_eq!(
        trusted
            .get(proxy.addr, "/public/x", &[])
            .await
            .unwrap()
            .status,
        200
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_1_client_hello_is_refused() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    // A ClientHello offering TLS 1.1 at most (no supported_versions extension).
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
                   // Suites a TLS 1.2 server would take, so that the version is the only thing wrong.
    hello.extend_from_slice(&[0x00, 0x08, 0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x13, 0x00, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
                                            // supported_groups (x25519, P-256), ec_point_formats, signature_algorithms (ECDSA P-256,
                                            // RSA-PSS): everything a TLS 1.2 handshake needs, so that only the version is wrong.
    let extensions: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, //
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, //
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04,
    ];
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(extensions);
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    // A fatal protocol_version alert (record 0x15, level 2, description 70), no ServerHello.
    assert!(
        answer.len() >= 7 && answer[0] == 0x15,
        "answer: {answer:02x?}"
    );
    assert_eq!(
        (answer[5], answer[6]),
        (2, 70),
        "expected a protocol_version alert: {answer:02x?}"
    );
    // TLS 1.2 and 1.3 clients are served.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let client = TlsClient::with_versions(&pki.ca.pem(), None, &[version]);
        assert_eq!(
            client.get(proxy.addr, "/public", &[]).await.unwrap().status,
            200
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_1_3_refuses_tls_1_2() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let text = tls_config(
        &upstream,
        pki.dir.path(),
        "optional",
        "min_version = \"1.3\"",
    );
    let proxy = TestProxy::start(&text, pki.dir.path(), &[("HS_SECRET", HS_SECRET)]).await;
    let tls12 = TlsClient::with_versions(&pki.ca.pem(), None, &[&rustls::version::TLS12]);
    assert!(tls12.get(proxy.addr, "/public", &[]).await.is_err());
    let tls13 = TlsClient::with_versions(&pki.ca.pem(), None, &[&rustls::version::TLS13]);
    assert_eq!(
        tls13.get(proxy.addr, "/public", &[]).await.unwrap().status,
        200
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_allow_list_admits_and_rejects() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let trusted = TlsClient::new(&pki.ca.pem(), Some(&pki.client));
    assert_eq!(
        trusted
            .get(proxy.addr, "/allowed/x", &[])
            .await
            .unwrap()
            .status,
        200
    );
    let response = trusted.get(proxy.addr, "/others/x", &[]).await.unwrap();
    assert_eq!(response.status, 401, "{}", response.body);
    assert!(
        response.body.contains("\"client_certificate_rejected\""),
        "{}",
        response.body
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_pass_only_with_their_certificate() {
    let pki = pki();
    let other = pki.ca.issue(
        "client-43",
        &["client-43.example.org"],
        &[],
        Usage::Client,
        false,
    );
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let key = TestKey::hs256(HS_SECRET.as_bytes()).with_kid("k1");
    let token = key.sign(&json!({
        "iss": "https://internal.test", "sub": "svc", "iat": now(), "exp": now() + 300,
        "cnf": {"x5t#S256": pki.client.x5t_s256()},
    }));
    let auth = format!("Bearer {token}");

    let bound = TlsClient::new(&pki.ca.pem(), Some(&pki.client));
    let response = bound
        .get(proxy.addr, "/bound", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);

    for client in [
        TlsClient::new(&pki.ca.pem(), Some(&other)),
        TlsClient::new(&pki.ca.pem(), None),
    ] {
        let response = client
            .get(proxy.addr, "/bound", &[("authorization", &auth)])
            .await
            .unwrap();
        assert_eq!(response.status, 401, "{}", response.body);
        assert!(
            response.body.contains("\"certificate_binding_mismatch\""),
            "{}",
            response.body
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_client_certificate_passes_an_mtls_route() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("curl is needed (.ci/run installs it)");
    }
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let (crt, key) = pki.client.write(pki.dir.path(), "curl-client");
    let ca = pki.dir.path().join("client-ca.crt");
    let url = format!("https://localhost:{}/mtls/curl", proxy.addr.port());
    let args = vec![
        "-sS".to_owned(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--resolve".into(),
        format!("localhost:{}:127.0.0.1", proxy.addr.port()),
        "--cacert".into(),
        ca.display().to_string(),
        "--cert".into(),
        crt.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        url,
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(upstream.last().header("x-forwarded-client-cert").is_some());
    proxy.stop().await;
}

/// Replaces `name` in `dir` atomically, as Kubernetes and cert-manager do.
fn swap_in(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_under_load_without_a_failed_request() {
    let pki = pki();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let addr = proxy.addr;
    let ca_pem = pki.ca.pem();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (stop, seen, failures, ca_pem) =
            (stop.clone(), seen.clone(), failures.clone(), ca_pem.clone());
        loops.push(tokio::spawn(async move {
            let client = TlsClient::new(&ca_pem, None);
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 100_000 {
                n += 1;
                match client.get(addr, "/public/load", &[]).await {
                    Ok(r) if r.status == 200 => seen
                        .lock()
                        .unwrap()
                        .push((Instant::now(), r.server_cert_sha256)),
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status)),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A renewed certificate, swapped in file by file with atomic renames.
    let renewed = pki.ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        &[],
        Usage::Server,
        false,
    );
    let swapped_at = Instant::now();
    swap_in(pki.dir.path(), "tls.key", &renewed.key_pem);
    swap_in(pki.dir.path(), "tls.crt", &renewed.cert_pem);
    let deadline = swapped_at + Duration::from_secs(5);
    loop {
        let latest = seen.lock().unwrap().last().cloned();
        if let Some((at, cert)) = latest {
            if cert == renewed.sha256_hex() && at > swapped_at {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 5s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A garbage certificate is refused; the renewed one keeps serving.
    swap_in(
        pki.dir.path(),
        "tls.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let garbage_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        failures.first()
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 20, "only {} requests were made", seen.len());
    assert!(seen
        .iter()
        .filter(|(at, _)| *at > garbage_at)
        .all(|(_, c)| *c == renewed.sha256_hex()));

    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.body;
    assert!(
        metrics.contains(r#"portcullis_tls_reloads_total{result="ok"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"portcullis_tls_reloads_total{result="error"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_certificate_expiry_seconds"),
        "{metrics}"
    );
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 200);
    assert!(
        ready.json()["certificate"]["expires_in_seconds"]
            .as_i64()
            .unwrap()
            > 7 * 86_400
    );
    proxy.stop().await;
}

/// The value of `portcullis_tls_reloads_total{result="<result>"}`, 0 when absent.
async fn tls_reloads(proxy: &TestProxy, result: &str) -> u64 {
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.body;
    let prefix = format!("portcullis_tls_reloads_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_unreadable_for_a_while_is_read_again_until_the_new_set_loads() {
    use std::os::unix::fs::symlink;
    let pki = pki();
    let dir = pki.dir.path();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let client = TlsClient::new(&pki.ca.pem(), None);

    // The key becomes a dangling symlink (unreadable even to root, unlike chmod 000) and a
    // renewed certificate arrives: several polls find the set unreadable.
    symlink("nowhere", dir.join(".tls.key.tmp")).unwrap();
    std::fs::rename(dir.join(".tls.key.tmp"), dir.join("tls.key")).unwrap();
    let renewed = pki.ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        &[],
        Usage::Server,
        false,
    );
    swap_in(dir, "tls.crt", &renewed.cert_pem);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let now = client.get(proxy.addr, "/public", &[]).await.unwrap();
    assert_eq!(now.server_cert_sha256, pki.server.sha256_hex());
    // Counted once, not at every poll.
    assert_eq!(tls_reloads(&proxy, "error").await, 1);

    // Once the key is readable again, the next look loads the set.
    swap_in(dir, "tls.key", &renewed.key_pem);
    served_within_5s(&client, proxy.addr, &renewed, "renewed").await;
    assert_eq!(tls_reloads(&proxy, "ok").await, 1);
    assert_eq!(tls_reloads(&proxy, "error").await, 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_expiring_within_a_week_is_a_readyz_warning() {
    let pki = pki();
    // A leaf valid until tomorrow.
    let soon = {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    std::fs::write(pki.dir.path().join("tls.crt"), &soon.0).unwrap();
    std::fs::write(pki.dir.path().join("tls.key"), &soon.1).unwrap();
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let warning = ready.json()["certificate"]["warning"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        warning.contains("expires in 0 days") || warning.contains("expires in 1 days"),
        "{}",
        ready.body
    );
    proxy.stop().await;
}

/// A proxy in `dir` with one open route to the HTTPS upstream at `url`, trusted through the CA
/// file `ca` and, when `pins` is not empty, pinned to those keys.
async fn start_with_upstream(url: &str, ca: &Path, pins: &[&str], dir: &Path) -> TestProxy {
    let pins = match pins {
        [] => String::new(),
        pins => format!("pins = [\"{}\"]\n", pins.join("\", \"")),
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{url}\"\nca = \"{}\"\n{pins}\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\n",
        ca.display()
    );
    TestProxy::start(&text, dir, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_their_ca_and_pins() {
    let ca = Ca::new("upstream CA");
    let cert = ca.issue("localhost", &["localhost"], &[], Usage::Server, false);
    let addr = support::pki::https_upstream(&cert).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca");
    let pin = {
        use base64::Engine;
        use sha2::Digest;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
        base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(parsed.public_key().raw))
    };
    let url = format!("https://localhost:{}", addr.port());

    // Trusted CA, no pins.
    let proxy = start_with_upstream(&url, &ca_file, &[], dir.path()).await;
    let response = get(&proxy.url("/x"), &[]).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "tls upstream")
    );
    proxy.stop().await;

    // The right pin passes; a wrong one is 502.
    let right = format!("sha256/{pin}");
    let proxy = start_with_upstream(&url, &ca_file, &[&right], dir.path()).await;
    assert_eq!(get(&proxy.url("/x"), &[]).await.status, 200);
    proxy.stop().await;
    let wrong = "sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let proxy = start_with_upstream(&url, &ca_file, &[wrong], dir.path()).await;
    let response = get(&proxy.url("/x"), &[]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );
    proxy.stop().await;

    // An upstream certificate from another CA is refused.
    let other = Ca::new("other CA");
    let other_file = other.write(dir.path(), "other-ca");
    let proxy = start_with_upstream(&url, &other_file, &[], dir.path()).await;
    let response = get(&proxy.url("/x"), &[]).await;
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_connection_is_used_again_after_its_session_tickets() {
    let ca = Ca::new("upstream CA");
    let cert = ca.issue("localhost", &["localhost"], &[], Usage::Server, false);
    let (addr, handshakes) = support::pki::https_upstream_counted(&cert).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca");
    let url = format!("https://localhost:{}", addr.port());
    let proxy = start_with_upstream(&url, &ca_file, &[], dir.path()).await;
    // One request after another: each finds the connection the last one read to its end, the
    // tickets the upstream sent after its handshake taken in on the way.
    for i in 0..20 {
        let response = get(&proxy.url(&format!("/x{i}")), &[]).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "tls upstream"),
            "request {i}"
        );
    }
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "TLS handshakes with the upstream for 20 requests in a row"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let pki = pki();
    let dir = pki.dir.path();
    // Kubernetes secret volume layout: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>.
    let first = dir.join("..2026_11_24_a");
    std::fs::create_dir(&first).unwrap();
    pki.server.write(&first, "tls");
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    std::fs::remove_file(dir.join("tls.key")).unwrap();
    symlink("..2026_11_24_a", dir.join("..data")).unwrap();
    symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    symlink("..data/tls.key", dir.join("tls.key")).unwrap();

    let upstream = Upstream::start().await;
    let proxy = start(&upstream, &pki, "optional").await;
    let client = TlsClient::new(&pki.ca.pem(), None);
    let before = client.get(proxy.addr, "/public", &[]).await.unwrap();
    assert_eq!(before.server_cert_sha256, pki.server.sha256_hex());

    let renewed = pki.ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        &[],
        Usage::Server,
        false,
    );
    let second = dir.join("..2026_11_24_b");
    std::fs::create_dir(&second).unwrap();
    renewed.write(&second, "tls");
    symlink("..2026_11_24_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();

    served_within_5s(&client, proxy.addr, &renewed, "swapped").await;
    proxy.stop().await;
}
