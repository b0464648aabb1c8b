//! Fuzzes JWT verification (`JwtVerifier::verify`) against two HS*-only issuers configured the
//! way an operator would, with the verified-token cache off so every input is fully verified.
//!
//! The first input byte picks the mode:
//! - even: the rest is the bearer token as sent (splitting, base64url, strict JSON, header
//!   rules, issuer look-up, key selection, signature check);
//! - odd: the rest is `header JSON` `\n` `payload JSON`, which the target encodes and signs
//!   with the issuer's real secret (HS256, or HS512 when the byte is 3 mod 4), so the claim
//!   checks that only run after a valid signature (exp/nbf/iat, lifetime, audience,
//!   permissions, required claims) are reached too.
//!
//! Besides "never panics": a token that verifies carries an issuer that is configured, and the
//! payload segment it reports is the one that was sent.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use portcullis::auth::signature::sign;
use portcullis::auth::JwtVerifier;
use portcullis::config::{Config, SignatureAlgorithm};
use portcullis::keys::KeyStore;
use portcullis::metrics::Metrics;

/// The time every token is checked at (2027-01-15).
const NOW: i64 = 1_800_000_000;
const SECRET_ENV: &str = "PORTCULLIS_FUZZ_HS_SECRET";
/// At least 32 bytes, as the configuration demands.
const SECRET: &str = "fuzz-hs-secret-0123456789abcdef-0123456789";
const ISSUERS: [&str; 2] = ["https://auth.fuzz.test", "https://scopes.fuzz.test"];

const CONFIG: &str = r#"
[upstream]
url = "http://127.0.0.1:8000"

[jwt]
leeway = "30s"
verified_cache = 0

[[jwt.issuers]]
issuer = "https://auth.fuzz.test"
audiences = ["fuzz-api"]
algorithms = ["HS256"]
secrets = [{ kid = "fuzz-1", env = "PORTCULLIS_FUZZ_HS_SECRET" }]
permissions_claim = "permissions"
required_claims = ["sub", "exp", "iat"]
max_lifetime = "24h"

[[jwt.issuers]]
issuer = "https://scopes.fuzz.test"
algorithms = ["HS256", "HS512"]
secrets = [{ kid = "fuzz-2", env = "PORTCULLIS_FUZZ_HS_SECRET" }]
permissions_claim = "scope"
max_lifetime = "1h"
"#;

struct Harness {
    runtime: tokio::runtime::Runtime,
    verifier: JwtVerifier,
    /// `PORTCULLIS_FUZZ_DEBUG` set: print each outcome (for checking seeds and reproducers).
    debug: bool,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let env = |name: &str| (name == SECRET_ENV).then(|| SECRET.to_owned());
        let config = Config::parse(CONFIG, Path::new("."), &env)
            .unwrap_or_else(|e| panic!("the fuzz configuration is invalid: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let keys = runtime.block_on(KeyStore::load(&config.jwt, Arc::new(Metrics::new())));
        let verifier = JwtVerifier::new(&config.jwt, keys);
        let debug = std::env::var_os("PORTCULLIS_FUZZ_DEBUG").is_some();
        Harness {
            runtime,
            verifier,
            debug,
        }
    })
}

/// `header.payload.signature` with the configured secret.
fn signed_token(header_json: &str, payload_json: &str, algorithm: SignatureAlgorithm) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(payload_json)
    );
    let mac = sign(algorithm, SECRET.as_bytes(), signing_input.as_bytes());
    let mac = hex::decode(mac).expect("sign returns hex");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let token = if mode & 1 == 0 {
        text.to_owned()
    } else {
        let (header_json, payload_json) = text.split_once('\n').unwrap_or((text, ""));
        let algorithm = if mode & 2 == 0 {
            SignatureAlgorithm::HmacSha256
        } else {
            SignatureAlgorithm::HmacSha512
        };
        signed_token(header_json, payload_json, algorithm)
    };

    let h = harness();
    let result = h.runtime.block_on(h.verifier.verify(&token, NOW));
    if h.debug {
        eprintln!("{token}\n  -> {result:?}");
    }
    if let Ok(verified) = result {
        assert!(
            ISSUERS.contains(&&*verified.issuer),
            "verified a token of an unknown issuer {:?}",
            verified.issuer
        );
        assert_eq!(
            Some(verified.payload_b64.as_str()),
            token.split('.').nth(1),
            "payload segment differs from the token's"
        );
        assert!(
            verified.exp.saturating_add(30) >= NOW,
            "an expired token verified"
        );
        assert_eq!(verified.permissions_header, verified.permissions.join(","));
    }
});
