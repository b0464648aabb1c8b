//! Request signatures, scheme v1: the client-side signing of a request with a 1 KiB body, the
//! proxy-side verification of the same request, and `parse` alone. See bench/README.md for
//! figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::auth::signature::{parse, sign, string_to_sign, SignatureVerifier, SignedRequest};
use portcullis::config::{Secret, SignatureAlgorithm, SignatureConfig, SignatureKey};
use sha2::{Digest, Sha256};

const SECRET: &[u8] = b"bench-client-secret-of-at-least-32-bytes";
const NONCE: &str = "q3J8x0bV2mN5pL7tK9wZ";
const METHOD: &str = "POST";
const TARGET: &str = "/api/v1/tx?a=1";
const HOST: &str = "api.example.com";
const TS: u64 = 1_764_000_000;

fn body() -> Vec<u8> {
    (0..1024u32).map(|i| (i % 251) as u8).collect()
}

/// What a client does: hash the body, build the string to sign, HMAC it, format the header.
fn client_sign(algorithm: SignatureAlgorithm, key_id: &str, body: &[u8]) -> String {
    let body_hash = hex::encode(Sha256::digest(body));
    let to_sign = string_to_sign(METHOD, TARGET, HOST, TS, NONCE, &body_hash);
    let sig = sign(algorithm, SECRET, to_sign.as_bytes());
    format!(r#"Signature v1, keyId="{key_id}", ts="{TS}", nonce="{NONCE}", signature="{sig}""#)
}

fn key(id: &str, algorithm: SignatureAlgorithm) -> SignatureKey {
    SignatureKey {
        id: id.into(),
        client: "client-42".into(),
        secret: Secret::new(SECRET.to_vec()),
        algorithm,
        not_before: None,
        not_after: None,
    }
}

fn signatures(c: &mut Criterion) {
    let body = body();
    let algorithms = [
        ("hmac-sha256", "k-256", SignatureAlgorithm::HmacSha256),
        ("hmac-sha512", "k-512", SignatureAlgorithm::HmacSha512),
    ];
    let verifier = SignatureVerifier::new(&SignatureConfig {
        max_skew: Duration::from_secs(300),
        keys: algorithms
            .iter()
            .map(|&(_, id, alg)| key(id, alg))
            .collect(),
    });
    let now = UNIX_EPOCH + Duration::from_secs(TS + 10);

    let mut group = c.benchmark_group("signature");
    group.throughput(Throughput::Elements(1));
    for &(name, key_id, alg) in &algorithms {
        group.bench_function(format!("sign_1KiB/{name}"), |b| {
            b.iter(|| client_sign(alg, black_box(key_id), black_box(&body)))
        });
    }
    for &(name, key_id, alg) in &algorithms {
        let header = client_sign(alg, key_id, &body);
        let verify = |header: &str, body: &[u8], now: SystemTime| {
            let body_hash = hex::encode(Sha256::digest(body));
            verifier.verify(
                header,
                SignedRequest {
                    method: METHOD,
                    target: TARGET,
                    host: HOST,
                    body_sha256_hex: &body_hash,
                },
                now,
            )
        };
        verify(&header, &body, now).expect("the bench signature verifies");
        group.bench_function(format!("verify_1KiB/{name}"), |b| {
            b.iter(|| verify(black_box(&header), black_box(&body), black_box(now)))
        });
    }
    let header = client_sign(SignatureAlgorithm::HmacSha256, "k-256", &body);
    parse(&header).expect("the bench header parses");
    group.bench_function("parse", |b| b.iter(|| parse(black_box(&header))));
    group.finish();
}

criterion_group!(benches, signatures);
criterion_main!(benches);
