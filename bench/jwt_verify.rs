//! `JwtVerifier::verify` per algorithm, with the verified-token cache off so that every call
//! parses the token and checks its signature. See bench/README.md for figures.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::auth::JwtVerifier;
use portcullis::config::Config;
use portcullis::keys::KeyStore;
use portcullis::metrics::Metrics;
use serde_json::json;

#[path = "../tests/support/keys.rs"]
#[allow(dead_code, unreachable_pub)]
mod keys;

use keys::{jwks, TestKey};

const ISSUER: &str = "https://issuer.bench";
const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

fn verify(c: &mut Criterion) {
    let rs256 = TestKey::rs256();
    let es256 = TestKey::es256();
    let hs256 = TestKey::hs256(SECRET.as_bytes());

    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("jwks.json"),
        jwks(&[&rs256, &es256]).to_string(),
    )
    .expect("write jwks");
    let toml = format!(
        r#"
[upstream]
url = "http://127.0.0.1:8000"

[jwt]
verified_cache = 0

[[jwt.issuers]]
issuer = "{ISSUER}"
algorithms = ["RS256", "ES256", "HS256"]
jwks_file = "jwks.json"
secrets = [{{ kid = "{}", env = "BENCH_HS256" }}]
"#,
        hs256.kid()
    );
    let config = Config::parse(&toml, dir.path(), &|name| {
        (name == "BENCH_HS256").then(|| SECRET.to_owned())
    })
    .expect("bench configuration");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let verifier = runtime.block_on(async {
        let store = KeyStore::load(&config.jwt, Arc::new(Metrics::new())).await;
        JwtVerifier::new(&config.jwt, store, &Metrics::new())
    });

    let now = 1_800_000_000;
    let claims = json!({"iss": ISSUER, "sub": "user-1", "iat": now - 10, "exp": now + 600,
                        "permissions": ["read:data", "write:data"]});
    let mut group = c.benchmark_group("jwt_verify");
    group.throughput(Throughput::Elements(1));
    for (name, key) in [("RS256", &rs256), ("ES256", &es256), ("HS256", &hs256)] {
        let token = key.sign(&claims);
        runtime
            .block_on(verifier.verify(&token, now))
            .expect("the bench token verifies");
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(verifier.verify(&token, now)))
        });
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
