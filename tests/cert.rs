//! `portcullis cert` as an operator runs it: the real binary against certificates made here with
//! rcgen, with openssl as the independent judge of what the binary writes and reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::ca::{self, Issued, LeafSpec};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("cert")
        .args(args)
        .output()
        .unwrap()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed for these tests")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

/// Asserts exit code 1 with `reason` on stderr.
fn assert_rejected(out: &Output, reason: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {err}",
        stdout(out)
    );
    assert!(err.contains(reason), "expected {reason:?} in stderr: {err}");
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A PKI on disk: root -> intermediate -> leaf (api.example.test, 127.0.0.1), an expired leaf
/// under the same intermediate, and another root with its own leaf.
struct Pki {
    dir: tempfile::TempDir,
    leaf: Issued,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = ca::root("Portcullis Test Root");
        let intermediate = ca::intermediate("Portcullis Test Intermediate", &root);
        let leaf = ca::leaf(
            &LeafSpec::server("api.example.test", &["api.example.test", "127.0.0.1"]),
            &intermediate,
        );
        let mut expired = LeafSpec::server("expired.example.test", &["expired.example.test"]);
        expired.not_before = rcgen::date_time_ymd(2019, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let expired = ca::leaf(&expired, &intermediate);
        let other_root = ca::root("Some Other Root");
        let other_leaf = ca::leaf(
            &LeafSpec::server("api.example.test", &["api.example.test"]),
            &other_root,
        );
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("root.pem", root.pem());
        write("chain.pem", intermediate.pem());
        write("leaf.pem", leaf.pem());
        write("leaf.key", leaf.key_pem());
        write(
            "fullchain.pem",
            format!("{}{}", leaf.pem(), intermediate.pem()),
        );
        write("expired.pem", expired.pem());
        write("other-root.pem", other_root.pem());
        write("other-leaf.pem", other_leaf.pem());
        Self { dir, leaf }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `cert verify <cert> --chain chain.pem --roots <roots>` plus `extra`.
    fn verify(&self, cert: &str, roots: &str, extra: &[&str]) -> Output {
        let (cert, chain, roots) = (self.path(cert), self.path("chain.pem"), self.path(roots));
        let mut args = vec![
            "verify",
            path_str(&cert),
            "--chain",
            path_str(&chain),
            "--roots",
            path_str(&roots),
        ];
        args.extend_from_slice(extra);
        portcullis(&args)
    }
}

// ---- keygen ----

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_p256_writes_a_pkcs8_key_that_openssl_accepts_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("p256.key");
    assert_success(&portcullis(&[
        "keygen",
        "--type",
        "p256",
        "--out",
        path_str(&key),
    ]));
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let check = openssl(&["pkey", "-in", path_str(&key), "-noout", "-check"]);
    assert_success(&check);
    let text = openssl(&["pkey", "-in", path_str(&key), "-noout", "-text"]);
    assert!(stdout(&text).contains("prime256v1"), "{}", stdout(&text));
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn keygen_rsa2048_writes_a_pkcs8_key_that_openssl_rsa_check_accepts_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rsa.key");
    assert_success(&portcullis(&[
        "keygen",
        "--type",
        "rsa2048",
        "--out",
        path_str(&key),
    ]));
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let check = openssl(&["rsa", "-in", path_str(&key), "-check", "-noout"]);
    assert_success(&check);
    assert!(stdout(&check).contains("RSA key ok"), "{}", stdout(&check));
    let text = openssl(&["pkey", "-in", path_str(&key), "-noout", "-text"]);
    assert!(stdout(&text).contains("2048 bit"), "{}", stdout(&text));
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn keygen_refuses_to_overwrite_an_existing_file_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("taken.key");
    std::fs::write(&key, "precious").unwrap();
    let out = portcullis(&["keygen", "--type", "p256", "--out", path_str(&key)]);
    assert_rejected(&out, "exists; pass --force");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "precious");

    let out = portcullis(&[
        "keygen",
        "--type",
        "p256",
        "--out",
        path_str(&key),
        "--force",
    ]);
    assert_success(&out);
    assert_success(&openssl(&[
        "pkey",
        "-in",
        path_str(&key),
        "-noout",
        "-check",
    ]));
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
}

// ---- csr ----

fn csr_for(key_type: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let csr = dir.path().join("req.csr");
    assert_success(&portcullis(&[
        "keygen",
        "--type",
        key_type,
        "--out",
        path_str(&key),
    ]));
    assert_success(&portcullis(&[
        "csr",
        "--key",
        path_str(&key),
        "--cn",
        "api.example.test",
        "--san",
        "DNS:api.example.test",
        "--san",
        "IP:127.0.0.1",
        "--san",
        "URI:spiffe://example.test/api",
        "--out",
        path_str(&csr),
    ]));
    let verify = openssl(&["req", "-in", path_str(&csr), "-verify", "-noout"]);
    assert_success(&verify);
    let said = format!("{}{}", stdout(&verify), stderr(&verify));
    assert!(said.contains("verify OK"), "{said}");

    let text = stdout(&openssl(&["req", "-in", path_str(&csr), "-noout", "-text"]));
    assert!(
        text.contains("CN=api.example.test") || text.contains("CN = api.example.test"),
        "{text}"
    );
    assert!(text.contains("DNS:api.example.test"), "{text}");
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(text.contains("URI:spiffe://example.test/api"), "{text}");
    // The CSR carries the key it was made with.
    let csr_pub = openssl(&["req", "-in", path_str(&csr), "-noout", "-pubkey"]);
    let key_pub = openssl(&["pkey", "-in", path_str(&key), "-pubout"]);
    assert_eq!(stdout(&csr_pub), stdout(&key_pub));
}

#[test]
fn csr_from_a_p256_key_passes_openssl_verify_and_carries_dns_ip_and_uri_sans() {
    csr_for("p256");
}

#[test]
fn csr_from_an_rsa2048_key_passes_openssl_verify_and_carries_dns_ip_and_uri_sans() {
    csr_for("rsa2048");
}

#[test]
fn csr_rejects_a_san_without_a_kind_prefix() {
    let pki = Pki::new();
    let out = portcullis(&[
        "csr",
        "--key",
        path_str(&pki.path("leaf.key")),
        "--cn",
        "x",
        "--san",
        "api.example.test",
    ]);
    assert_rejected(&out, "invalid --san \"api.example.test\"");
}

// ---- inspect ----

/// (year, month, day, hour, minute, second) from openssl's `notAfter=Jan  1 00:00:00 2030 GMT`.
fn openssl_date(text: &str) -> (u32, u32, u32, String) {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[0])
    .unwrap() as u32
        + 1;
    assert_eq!(parts[4], "GMT", "{text}");
    (
        parts[3].parse().unwrap(),
        month,
        parts[1].parse().unwrap(),
        parts[2].to_owned(),
    )
}

/// The same tuple from RFC 3339 `2030-01-01T00:00:00Z`.
fn rfc3339_date(text: &str) -> (u32, u32, u32, String) {
    let (date, time) = text.trim_end_matches('Z').split_once('T').unwrap();
    let ymd: Vec<u32> = date.split('-').map(|p| p.parse().unwrap()).collect();
    (ymd[0], ymd[1], ymd[2], time.to_owned())
}

fn openssl_fields(file: &Path) -> std::collections::HashMap<String, String> {
    let out = openssl(&[
        "x509",
        "-noout",
        "-subject",
        "-issuer",
        "-enddate",
        "-serial",
        "-fingerprint",
        "-sha256",
        "-in",
        path_str(file),
    ]);
    assert_success(&out);
    stdout(&out)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn assert_inspect_agrees_with_openssl(file: &Path, subject_cn: &str, issuer_cn: &str, key: &str) {
    let out = portcullis(&["inspect", path_str(file), "--json"]);
    assert_success(&out);
    let ours: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let theirs = openssl_fields(file);

    assert_eq!(
        ours["sha256_fingerprint"].as_str().unwrap(),
        theirs["sha256 Fingerprint"],
        "fingerprints differ"
    );
    assert_eq!(ours["serial"].as_str().unwrap(), theirs["serial"]);
    let cn = |s: &str| format!("CN={s}");
    let spaced = |s: &str| format!("CN = {s}");
    assert!(
        ours["subject"].as_str().unwrap().contains(&cn(subject_cn)),
        "{ours}"
    );
    assert!(
        theirs["subject"].contains(&spaced(subject_cn))
            || theirs["subject"].contains(&cn(subject_cn)),
        "{theirs:?}"
    );
    assert!(
        ours["issuer"].as_str().unwrap().contains(&cn(issuer_cn)),
        "{ours}"
    );
    assert!(
        theirs["issuer"].contains(&spaced(issuer_cn)) || theirs["issuer"].contains(&cn(issuer_cn)),
        "{theirs:?}"
    );
    assert_eq!(
        rfc3339_date(ours["not_after"].as_str().unwrap()),
        openssl_date(&theirs["notAfter"])
    );
    assert_eq!(ours["key_type"], key);
    let days = ours["days_left"].as_i64().unwrap();
    assert!((88..=90).contains(&days), "days_left {days}");
}

#[test]
fn inspect_json_agrees_with_openssl_on_fingerprint_serial_names_and_end_date() {
    let pki = Pki::new();
    assert_inspect_agrees_with_openssl(
        &pki.path("leaf.pem"),
        "api.example.test",
        "Portcullis Test Intermediate",
        "EC P-256",
    );
}

#[test]
fn inspect_reports_rsa_key_size_and_agrees_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let root = ca::root("Portcullis Test Root");
    let mut spec = LeafSpec::server("rsa.example.test", &["rsa.example.test"]);
    spec.rsa = true;
    let leaf = ca::leaf(&spec, &root);
    let file = dir.path().join("rsa.pem");
    std::fs::write(&file, leaf.pem()).unwrap();
    assert_inspect_agrees_with_openssl(
        &file,
        "rsa.example.test",
        "Portcullis Test Root",
        "RSA 2048",
    );
}

#[test]
fn inspect_shows_the_first_certificate_of_a_bundle_with_sans_and_pin_in_text() {
    let pki = Pki::new();
    let out = portcullis(&["inspect", path_str(&pki.path("fullchain.pem"))]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains("subject:            O=Portcullis Tests, CN=api.example.test"),
        "{text}"
    );
    assert!(
        text.contains("DNS:api.example.test, IP:127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("key:                EC P-256"), "{text}");
    assert!(text.contains("spki pin:           sha256/"), "{text}");
    let theirs = openssl_fields(&pki.path("leaf.pem"));
    assert!(text.contains(&theirs["sha256 Fingerprint"]), "{text}");
}

#[test]
fn inspect_reports_negative_days_left_for_an_expired_certificate() {
    let pki = Pki::new();
    let out = portcullis(&["inspect", path_str(&pki.path("expired.pem")), "--json"]);
    assert_success(&out);
    let ours: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(ours["days_left"].as_i64().unwrap() < 0, "{ours}");
    assert_eq!(ours["not_after"], "2020-01-01T00:00:00Z");
}

// ---- verify ----

#[test]
fn verify_accepts_a_good_chain_for_its_dns_name_and_ip() {
    let pki = Pki::new();
    let out = pki.verify("leaf.pem", "root.pem", &["--host", "api.example.test"]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.starts_with("OK: verified for server authentication"),
        "{text}"
    );
    assert!(text.contains("host: api.example.test matches"), "{text}");

    let out = pki.verify("leaf.pem", "root.pem", &["--host", "127.0.0.1", "--json"]);
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["valid"], true);
    let path: Vec<&str> = json["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(path.len(), 3, "{path:?}");
    assert!(path[0].ends_with("CN=api.example.test"), "{path:?}");
    assert!(
        path[1].ends_with("CN=Portcullis Test Intermediate"),
        "{path:?}"
    );
    assert!(path[2].ends_with("CN=Portcullis Test Root"), "{path:?}");
}

#[test]
fn verify_accepts_a_leaf_file_holding_the_full_chain() {
    let pki = Pki::new();
    let full = pki.path("fullchain.pem");
    let roots = pki.path("root.pem");
    let out = portcullis(&[
        "verify",
        path_str(&full),
        "--chain",
        path_str(&full),
        "--roots",
        path_str(&roots),
    ]);
    assert_success(&out);
}

#[test]
fn verify_names_unknown_issuer_when_the_root_is_not_trusted() {
    let pki = Pki::new();
    let out = pki.verify("leaf.pem", "other-root.pem", &[]);
    assert_rejected(&out, "unknown issuer (no path to a trusted root)");
    // A leaf from another CA, against our root.
    let out = pki.verify(
        "other-leaf.pem",
        "root.pem",
        &["--host", "api.example.test"],
    );
    assert_rejected(&out, "unknown issuer (no path to a trusted root)");
}

#[test]
fn verify_names_unknown_issuer_when_the_intermediate_is_missing() {
    let pki = Pki::new();
    let (leaf, roots) = (pki.path("leaf.pem"), pki.path("root.pem"));
    let out = portcullis(&["verify", path_str(&leaf), "--roots", path_str(&roots)]);
    assert_rejected(&out, "unknown issuer (no path to a trusted root)");
}

#[test]
fn verify_names_the_expiry_time_of_an_expired_leaf() {
    let pki = Pki::new();
    let out = pki.verify("expired.pem", "root.pem", &[]);
    assert_rejected(&out, "certificate expired at 2020-01-01T00:00:00Z");
}

#[test]
fn verify_names_the_host_when_the_certificate_does_not_cover_it() {
    let pki = Pki::new();
    let out = pki.verify("leaf.pem", "root.pem", &["--host", "www.example.test"]);
    assert_rejected(&out, "not valid for host www.example.test");
    assert!(
        stderr(&out).contains("api.example.test"),
        "{}",
        stderr(&out)
    );

    let out = pki.verify("leaf.pem", "root.pem", &["--host", "10.0.0.1"]);
    assert_rejected(&out, "not valid for host 10.0.0.1");
}

#[test]
fn verify_client_checks_the_client_auth_extended_key_usage() {
    let pki = Pki::new();
    let out = pki.verify("leaf.pem", "root.pem", &["--client"]);
    assert_rejected(&out, "certificate not allowed for client authentication");
}

#[test]
fn verify_accepts_an_ecdsa_p256_chain_signed_with_sha512() {
    // openssl signs with a P-256 key and SHA-512, which the proxy's rustls (aws-lc-rs) accepts
    // in a handshake; `cert verify` must say the same.
    let dir = tempfile::tempdir().unwrap();
    let (leaf, root) = openssl_ca_and_leaf(dir.path(), P256, "sha512", "sha512.example.test");
    let text = stdout(&openssl(&[
        "x509",
        "-in",
        path_str(&leaf),
        "-noout",
        "-text",
    ]));
    assert!(text.contains("ecdsa-with-SHA512"), "{text}");

    let out = portcullis(&[
        "verify",
        path_str(&leaf),
        "--roots",
        path_str(&root),
        "--host",
        "sha512.example.test",
    ]);
    assert_success(&out);
    assert!(
        stdout(&out).starts_with("OK: verified for server authentication"),
        "{}",
        stdout(&out)
    );
}

/// `cert verify leaf --chain <chain...> --roots root` on PEM texts written to a fresh folder.
fn verify_pems(leaf: &str, chain: &[&str], root: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (leaf, chain, root) = (
        write("leaf.pem", leaf),
        write("chain.pem", &chain.concat()),
        write("root.pem", root),
    );
    portcullis(&[
        "verify",
        path_str(&leaf),
        "--chain",
        path_str(&chain),
        "--roots",
        path_str(&root),
    ])
}

/// webpki's own text for these is its `Debug` (`EndEntityUsedAsCa`); each must read as a reason.
fn assert_rejected_in_words(out: &Output, reason: &str, webpki_name: &str) {
    assert_rejected(out, reason);
    assert!(!stderr(out).contains(webpki_name), "{}", stderr(out));
}

#[test]
fn verify_names_an_issuer_that_is_not_a_ca() {
    let root = ca::root("Portcullis Test Root");
    // A server certificate (no basicConstraints CA:TRUE) used to sign another.
    let not_a_ca = ca::leaf(&LeafSpec::server("not-a-ca.example.test", &[]), &root);
    let leaf = ca::leaf(
        &LeafSpec::server("api.example.test", &["api.example.test"]),
        &not_a_ca,
    );
    let out = verify_pems(&leaf.pem(), &[&not_a_ca.pem()], &root.pem());
    assert_rejected_in_words(
        &out,
        "an issuer on the path is not a CA: it lacks basicConstraints CA:TRUE",
        "EndEntityUsedAsCa",
    );
}

#[test]
fn verify_names_a_path_longer_than_an_intermediates_path_length_allows() {
    let root = ca::root("Portcullis Test Root");
    // An intermediate that may sign leaves only (pathLenConstraint 0), over another CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Path Length Zero Intermediate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let zero = Issued {
        cert: params.signed_by(&key, &root.cert, &root.key).unwrap(),
        key,
    };
    let below = ca::intermediate("Intermediate Under Path Length Zero", &zero);
    let leaf = ca::leaf(
        &LeafSpec::server("api.example.test", &["api.example.test"]),
        &below,
    );
    let out = verify_pems(&leaf.pem(), &[&below.pem(), &zero.pem()], &root.pem());
    assert_rejected_in_words(
        &out,
        "the path is longer than an issuer's basicConstraints pathLenConstraint allows",
        "PathLenConstraintViolated",
    );
    // A leaf signed by the constrained intermediate itself is within the constraint.
    let direct = ca::leaf(
        &LeafSpec::server("api.example.test", &["api.example.test"]),
        &zero,
    );
    assert_success(&verify_pems(&direct.pem(), &[&zero.pem()], &root.pem()));
}

#[test]
fn verify_names_a_name_outside_the_issuers_name_constraints() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Constrained Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.test".to_owned())],
        excluded_subtrees: vec![],
    });
    let root = Issued {
        cert: params.self_signed(&key).unwrap(),
        key,
    };
    let outside = ca::leaf(
        &LeafSpec::server("api.other.test", &["api.other.test"]),
        &root,
    );
    let out = verify_pems(&outside.pem(), &[], &root.pem());
    assert_rejected_in_words(
        &out,
        "a name in the certificate is outside an issuer's name constraints",
        "NameConstraintViolation",
    );
    let inside = ca::leaf(
        &LeafSpec::server("api.example.test", &["api.example.test"]),
        &root,
    );
    assert_success(&verify_pems(&inside.pem(), &[], &root.pem()));
}

/// `openssl genpkey` arguments.
const RSA2048: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
const RSA1024: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"];
const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];

/// A CA with a key made by `openssl genpkey ca_key`, and a P-256 leaf for `cn` (serverAuth)
/// that it signs with `digest`, both made by openssl: `(leaf.pem, ca.pem)` in `dir`.
fn openssl_ca_and_leaf(dir: &Path, ca_key: &[&str], digest: &str, cn: &str) -> (PathBuf, PathBuf) {
    let path = |name: &str| dir.join(name);
    let ext = path("leaf.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:{cn}\n"
        ),
    )
    .unwrap();
    for (key, args) in [("ca.key", ca_key), ("leaf.key", P256)] {
        let out = path(key);
        let mut command = vec!["genpkey"];
        command.extend_from_slice(args);
        command.extend_from_slice(&["-out", path_str(&out)]);
        assert_success(&openssl(&command));
    }
    assert_success(&openssl(&[
        "req",
        "-x509",
        "-new",
        &format!("-{digest}"),
        "-key",
        path_str(&path("ca.key")),
        "-subj",
        "/CN=openssl Test Root",
        "-days",
        "3650",
        "-addext",
        "basicConstraints = critical, CA:TRUE",
        "-addext",
        "keyUsage = critical, keyCertSign, cRLSign",
        "-out",
        path_str(&path("ca.pem")),
    ]));
    assert_success(&openssl(&[
        "req",
        "-new",
        "-key",
        path_str(&path("leaf.key")),
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        path_str(&path("leaf.csr")),
    ]));
    assert_success(&openssl(&[
        "x509",
        "-req",
        &format!("-{digest}"),
        "-in",
        path_str(&path("leaf.csr")),
        "-CA",
        path_str(&path("ca.pem")),
        "-CAkey",
        path_str(&path("ca.key")),
        "-set_serial",
        "2",
        "-days",
        "365",
        "-extfile",
        path_str(&ext),
        "-out",
        path_str(&path("leaf.pem")),
    ]));
    (path("leaf.pem"), path("ca.pem"))
}

#[test]
fn verify_names_a_sha1_signature_by_its_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, root) = openssl_ca_and_leaf(dir.path(), RSA2048, "sha1", "sha1.example.test");
    let text = stdout(&openssl(&[
        "x509",
        "-in",
        path_str(&leaf),
        "-noout",
        "-text",
    ]));
    assert!(text.contains("sha1WithRSAEncryption"), "{text}");
    let out = portcullis(&["verify", path_str(&leaf), "--roots", path_str(&root)]);
    assert_rejected_in_words(
        &out,
        "signature algorithm sha1WithRSAEncryption is not accepted",
        "UnsupportedSignatureAlgorithm",
    );
    // The same CA signing with SHA-256 is accepted: the algorithm was the reason.
    let dir = tempfile::tempdir().unwrap();
    let (leaf, root) = openssl_ca_and_leaf(dir.path(), RSA2048, "sha256", "sha1.example.test");
    assert_success(&portcullis(&[
        "verify",
        path_str(&leaf),
        "--roots",
        path_str(&root),
    ]));
}

#[test]
fn verify_names_a_short_rsa_key_among_the_causes_of_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, root) = openssl_ca_and_leaf(dir.path(), RSA1024, "sha256", "rsa1024.example.test");
    let out = portcullis(&["verify", path_str(&leaf), "--roots", path_str(&root)]);
    assert_rejected_in_words(
        &out,
        "an RSA key shorter than 2048 bits",
        "InvalidSignatureForPublicKey",
    );
}

// ---- pin ----

fn openssl_pin(cert: &Path) -> String {
    let script = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
         | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert_success(&out);
    stdout(&out).trim().to_owned()
}

#[test]
fn pin_equals_the_openssl_spki_sha256_pipeline() {
    let pki = Pki::new();
    for name in ["leaf.pem", "root.pem", "other-leaf.pem"] {
        let out = portcullis(&["pin", path_str(&pki.path(name))]);
        assert_success(&out);
        assert_eq!(
            stdout(&out).trim(),
            format!("sha256/{}", openssl_pin(&pki.path(name))),
            "{name}"
        );
    }
}

#[test]
fn pin_of_the_private_key_and_public_key_equals_pin_of_the_certificate() {
    let pki = Pki::new();
    let public = pki.path("leaf.pub");
    std::fs::write(&public, pki.leaf.key.public_key_pem()).unwrap();
    let of = |name: &str| stdout(&portcullis(&["pin", path_str(&pki.path(name))]));
    let cert_pin = of("leaf.pem");
    assert!(cert_pin.starts_with("sha256/"), "{cert_pin}");
    assert_eq!(of("leaf.key"), cert_pin);
    assert_eq!(of("leaf.pub"), cert_pin);
}

// ---- timings (printed, never asserted) ----

/// Prints how long each operation takes in-process; run with `--nocapture` to see the figures.
#[test]
fn timings_are_printed_for_keygen_csr_inspect_and_verify() {
    use portcullis::cert::{csr, inspect, keygen, verify, KeyType};
    use std::time::Instant;

    fn report(what: &str, runs: u32, mut f: impl FnMut()) {
        f(); // warm up
        let mut all = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            f();
            all.push(start.elapsed());
        }
        all.sort();
        let mean = all.iter().sum::<std::time::Duration>() / runs;
        println!(
            "timing {what:<22} runs {runs:>4}  median {:>10.3?}  mean {:>10.3?}  max {:>10.3?}",
            all[all.len() / 2],
            mean,
            all[all.len() - 1]
        );
    }

    report("keygen rsa2048", 10, || {
        keygen::generate(KeyType::Rsa2048).unwrap();
    });
    report("keygen p256", 100, || {
        keygen::generate(KeyType::P256).unwrap();
    });
    let key = keygen::generate(KeyType::P256).unwrap();
    let sans = ["DNS:api.example.test".to_owned(), "IP:127.0.0.1".to_owned()];
    report("csr p256", 100, || {
        csr::build(&key, Path::new("k"), "api.example.test", &sans).unwrap();
    });
    let rsa_key = keygen::generate(KeyType::Rsa2048).unwrap();
    report("csr rsa2048", 50, || {
        csr::build(&rsa_key, Path::new("k"), "api.example.test", &sans).unwrap();
    });

    let root = ca::root("Portcullis Test Root");
    let intermediate = ca::intermediate("Portcullis Test Intermediate", &root);
    let leaf = ca::leaf(
        &LeafSpec::server("api.example.test", &["api.example.test", "127.0.0.1"]),
        &intermediate,
    );
    let leaf_der = leaf.cert.der().to_vec();
    let now = time::OffsetDateTime::now_utc();
    report("inspect (parse)", 1000, || {
        inspect::inspect_der(&leaf_der, Path::new("leaf"), now).unwrap();
    });
    let intermediates = vec![intermediate.cert.der().to_vec()];
    let roots = vec![root.cert.der().to_vec()];
    let request = verify::Request {
        leaf: &leaf_der,
        intermediates: &intermediates,
        roots: &roots,
        roots_path: Path::new("roots"),
        host: Some("api.example.test"),
        usage: verify::Usage::ServerAuth,
    };
    report("verify (3-cert chain)", 1000, || {
        verify::verify_chain(&request, now).unwrap();
    });
}
