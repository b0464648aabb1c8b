//! A dudect-style timing-leak check of `SignatureVerifier::verify` (plain `main`, not criterion).
//!
//! Two classes of inputs, the same key, the same request and a timestamp inside the window, so
//! that both run the whole verify path up to the HMAC compare and fail with `SignatureMismatch`:
//! class A carries a signature that is wrong in its first byte (the first two hex characters
//! changed), class B one that is wrong in its last byte (the last two hex characters changed).
//! The two classes are interleaved in a random order fixed before measuring (to cancel drift),
//! and each sample is one `verify` call between two `std::time::Instant` readings. Welch's
//! t-statistic between the classes is computed on all samples and after cropping the samples
//! above the 50th, 75th, 90th, 95th and 99th percentile of the pooled samples; |t| < 4.5 at every
//! crop means no leak that this test can detect.
//!
//! As a control the same harness runs a deliberately leaky verifier, defined here and only here:
//! the same parse, string to sign and HMAC, then a naive early-exit comparison of the expected
//! and received hex strings. Its |t| must be large, or the test could not see a leak at all.
//!
//! `SAMPLES` (per class, default 1000000) overrides the sample count. See bench/README.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis::auth::signature::{parse, sign, string_to_sign, SignatureVerifier, SignedRequest};
use portcullis::auth::AuthError;
use portcullis::config::{Secret, SignatureAlgorithm, SignatureConfig, SignatureKey};

const SECRET: &[u8] = b"bench-client-secret-of-at-least-32-bytes";
const NONCE: &str = "q3J8x0bV2mN5pL7tK9wZ";
const METHOD: &str = "POST";
const TARGET: &str = "/api/v1/tx?a=1";
const HOST: &str = "api.example.com";
/// sha256 of the empty body; the body hash is an input of `verify`, computed by the caller.
const BODY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const TS: u64 = 1_764_000_000;
const KEY_ID: &str = "k-1";
const CROPS: [f64; 6] = [50.0, 75.0, 90.0, 95.0, 99.0, 100.0];
const WARM_UP: usize = 20_000;

fn request() -> SignedRequest<'static> {
    SignedRequest {
        method: METHOD,
        target: TARGET,
        host: HOST,
        body_sha256_hex: BODY_HASH,
    }
}

/// The next lower-case hex digit after `c`, wrapping `f` to `0`: always a different digit.
fn other_hex(c: u8) -> u8 {
    let v = match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => unreachable!("signatures are lower-case hex"),
    };
    b"0123456789abcdef"[usize::from((v + 1) % 16)]
}

/// The headers of class A (first signature byte wrong) and class B (last byte wrong).
fn headers(algorithm: SignatureAlgorithm) -> [String; 2] {
    let to_sign = string_to_sign(METHOD, TARGET, HOST, TS, NONCE, BODY_HASH);
    let good = sign(algorithm, SECRET, to_sign.as_bytes());
    let n = good.len();
    let mut first = good.clone().into_bytes();
    first[0] = other_hex(first[0]);
    first[1] = other_hex(first[1]);
    let mut last = good.into_bytes();
    last[n - 2] = other_hex(last[n - 2]);
    last[n - 1] = other_hex(last[n - 1]);
    [first, last].map(|sig| {
        let sig = String::from_utf8(sig).unwrap();
        format!(r#"Signature v1, keyId="{KEY_ID}", ts="{TS}", nonce="{NONCE}", signature="{sig}""#)
    })
}

/// splitmix64, enough to shuffle the class order without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `samples` calls of `f` per class, interleaved in a random order; returns the nanoseconds of
/// each call per class. `check` looks at every result outside the timed region.
fn measure<R>(
    inputs: &[String; 2],
    samples: usize,
    seed: u64,
    mut f: impl FnMut(&str) -> R,
    check: impl Fn(&R) -> bool,
) -> [Vec<u64>; 2] {
    // A shuffled sequence with exactly `samples` of each class (Fisher-Yates).
    let mut order: Vec<u8> = (0..2 * samples).map(|i| (i % 2) as u8).collect();
    let mut rng = SplitMix(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let inputs = [inputs[0].as_str(), inputs[1].as_str()];
    for i in 0..WARM_UP {
        let r = f(black_box(inputs[i % 2]));
        assert!(check(&r), "an unexpected result in the warm-up");
    }
    let mut times = [Vec::with_capacity(samples), Vec::with_capacity(samples)];
    for &class in &order {
        let input = inputs[usize::from(class)];
        let start = Instant::now();
        let r = f(black_box(input));
        let elapsed = start.elapsed();
        let r = black_box(r);
        times[usize::from(class)].push(elapsed.as_nanos() as u64);
        assert!(check(&r), "an unexpected result");
    }
    times
}

struct Stats {
    n: usize,
    mean: f64,
    var: f64,
}

fn stats(xs: impl Iterator<Item = u64> + Clone) -> Stats {
    let n = xs.clone().count();
    let mean = xs.clone().map(|x| x as f64).sum::<f64>() / n as f64;
    let var = xs.map(|x| (x as f64 - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    Stats { n, mean, var }
}

fn welch_t(a: &Stats, b: &Stats) -> f64 {
    (a.mean - b.mean) / (a.var / a.n as f64 + b.var / b.n as f64).sqrt()
}

/// Prints per-class figures and |t| per crop; returns the largest |t|.
fn report(name: &str, times: &[Vec<u64>; 2]) -> f64 {
    let mut pooled: Vec<u64> = times.iter().flatten().copied().collect();
    pooled.sort_unstable();
    println!("== {name}");
    for (label, t) in ["A (first byte wrong)", "B (last byte wrong) "]
        .iter()
        .zip(times)
    {
        let s = stats(t.iter().copied());
        let mut sorted = t.clone();
        sorted.sort_unstable();
        println!(
            "   class {label}: n = {}, mean = {:.1} ns, stddev = {:.1} ns, median = {} ns",
            s.n,
            s.mean,
            s.var.sqrt(),
            sorted[sorted.len() / 2]
        );
    }
    println!("   crop        threshold     n(A)      n(B)    mean A     mean B     |t|");
    let mut max_t: f64 = 0.0;
    for p in CROPS {
        let idx = ((p / 100.0) * (pooled.len() - 1) as f64).round() as usize;
        let threshold = pooled[idx];
        let keep = |c: usize| times[c].iter().copied().filter(move |&x| x <= threshold);
        let (a, b) = (stats(keep(0)), stats(keep(1)));
        let t = welch_t(&a, &b).abs();
        max_t = max_t.max(t);
        let crop = if p >= 100.0 {
            "none".to_owned()
        } else {
            format!("<= p{p}")
        };
        println!(
            "   {crop:<10} {threshold:>7} ns {:>9} {:>9} {:>8.1} ns {:>8.1} ns {t:>7.2}",
            a.n, b.n, a.mean, b.mean
        );
    }
    println!(
        "   max |t| = {max_t:.2} -> {}",
        if max_t < 4.5 {
            "no leak detected (< 4.5)"
        } else {
            "LEAK DETECTED (>= 4.5)"
        }
    );
    max_t
}

/// The control: the same work as `verify` up to the compare, then an early-exit compare.
fn leaky_verify(algorithm: SignatureAlgorithm, header: &str, req: SignedRequest<'_>) -> bool {
    let Ok(params) = parse(header) else {
        return false;
    };
    let to_sign = string_to_sign(
        req.method,
        req.target,
        req.host,
        params.ts,
        params.nonce,
        req.body_sha256_hex,
    );
    let expected = sign(algorithm, SECRET, to_sign.as_bytes());
    naive_eq(expected.as_bytes(), params.signature.as_bytes())
}

/// Deliberately not constant time: returns at the first differing byte.
fn naive_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return false;
        }
    }
    true
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let samples: usize = std::env::var("SAMPLES")
        .ok()
        .map(|s| s.parse().expect("SAMPLES is a number"))
        .unwrap_or(1_000_000);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!(
        "dudect-style check: {samples} samples per class, random interleaving (seed {seed:#x}), \
         {WARM_UP} warm-up calls per run"
    );

    let now = UNIX_EPOCH + Duration::from_secs(TS + 10);
    let mut results = Vec::new();
    for (name, algorithm) in [
        ("hmac-sha256", SignatureAlgorithm::HmacSha256),
        ("hmac-sha512", SignatureAlgorithm::HmacSha512),
    ] {
        let verifier = SignatureVerifier::new(&SignatureConfig {
            max_skew: Duration::from_secs(300),
            keys: vec![SignatureKey {
                id: KEY_ID.into(),
                client: "client-42".into(),
                secret: Secret::new(SECRET.to_vec()),
                algorithm,
                not_before: None,
                not_after: None,
            }],
        });
        let inputs = headers(algorithm);
        let times = measure(
            &inputs,
            samples,
            seed,
            |h| verifier.verify(h, request(), now),
            |r| matches!(r, Err(AuthError::SignatureMismatch(_))),
        );
        let label = format!("SignatureVerifier::verify, {name}");
        results.push((label.clone(), report(&label, &times)));

        let times = measure(
            &inputs,
            samples,
            seed ^ 1,
            |h| leaky_verify(algorithm, h, request()),
            |ok| !ok,
        );
        let label = format!("leaky control (early-exit hex compare), {name}");
        results.push((label.clone(), report(&label, &times)));
    }
    println!("== summary (max |t| over the crops)");
    for (label, t) in results {
        println!("   {t:>8.2}  {label}");
    }
}
