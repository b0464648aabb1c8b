//! Request signatures, scheme v1 (DESIGN.md): strict parsing of the `Signature v1, ...`
//! parameters, key lookup in the keyring, the timestamp window, and the HMAC over the string to
//! sign, compared in constant time. Everything here is pure: the caller hashes the body as it
//! streams in and records the nonce in the store only after [`SignatureVerifier::verify`] passed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

use crate::auth::AuthError;
use crate::config::{SignatureAlgorithm, SignatureConfig, SignatureKey};

/// The longest `Authorization`/`X-Signature` value looked at; anything longer is malformed.
const MAX_HEADER_LEN: usize = 1024;

/// The parameters of a scheme-v1 signature header, borrowed from the header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams<'a> {
    /// `keyId`
    pub key_id: &'a str,
    /// `ts`, Unix seconds.
    pub ts: u64,
    /// `nonce`
    pub nonce: &'a str,
    /// `signature`, lower-case hex as sent.
    pub signature: &'a str,
    /// `alg`, when sent.
    pub alg: Option<SignatureAlgorithm>,
}

fn malformed(reason: impl Into<String>) -> AuthError {
    AuthError::SignatureMalformed(reason.into())
}

/// Parses `Signature v1, keyId="...", ts="...", nonce="...", signature="..."`.
pub fn parse(value: &str) -> Result<SignatureParams<'_>, AuthError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(malformed(format!(
            "the signature header is over {MAX_HEADER_LEN} bytes"
        )));
    }
    let (scheme, rest) = value.split_once(' ').ok_or_else(|| {
        malformed("expected `Signature v1, keyId=..., ts=..., nonce=..., signature=...`")
    })?;
    if !scheme.eq_ignore_ascii_case("signature") {
        return Err(malformed(format!(
            "the scheme is {scheme:?}, not Signature"
        )));
    }
    let rest = rest.trim_start();
    let params = match rest.split_once(',') {
        Some(("v1", params)) => params,
        _ if rest == "v1" => "",
        _ => {
            return Err(malformed(
                "the version is missing or not v1: expected `Signature v1, ...`",
            ))
        }
    };

    let (mut key_id, mut ts, mut nonce, mut signature, mut alg) = (None, None, None, None, None);
    for param in params.split(',') {
        let param = param.trim_matches(|c| c == ' ' || c == '\t');
        let (name, raw_value) = param
            .split_once('=')
            .ok_or_else(|| malformed(format!("parameter {param:?} is not name=value")))?;
        let v = match raw_value.strip_prefix('"') {
            Some(quoted) => quoted
                .strip_suffix('"')
                .filter(|inner| !inner.contains('"'))
                .ok_or_else(|| malformed(format!("parameter {name} has a broken quoted value")))?,
            None if raw_value.contains('"') => {
                return Err(malformed(format!(
                    "parameter {name} has a broken quoted value"
                )))
            }
            None => raw_value,
        };
        let slot = match name {
            "keyId" => &mut key_id,
            "ts" => &mut ts,
            "nonce" => &mut nonce,
            "signature" => &mut signature,
            "alg" => &mut alg,
            other => return Err(malformed(format!("unknown parameter {other:?}"))),
        };
        if slot.replace(v).is_some() {
            return Err(malformed(format!("parameter {name} is repeated")));
        }
    }
    let key_id = key_id.ok_or_else(|| malformed("keyId is missing"))?;
    let ts = ts.ok_or_else(|| malformed("ts is missing"))?;
    let nonce = nonce.ok_or_else(|| malformed("nonce is missing"))?;
    let signature = signature.ok_or_else(|| malformed("signature is missing"))?;

    if key_id.is_empty() || key_id.len() > 256 || !key_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("keyId must be 1 to 256 visible ASCII characters"));
    }
    let ts = parse_ts(ts)?;
    if !(16..=128).contains(&nonce.len())
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(malformed(
            "nonce must be 16 to 128 characters of A-Z a-z 0-9 - _",
        ));
    }
    if !matches!(signature.len(), 64 | 128)
        || !signature
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(malformed(
            "signature must be 64 or 128 lower-case hex characters",
        ));
    }
    let alg = match alg {
        None => None,
        Some("hmac-sha256") => Some(SignatureAlgorithm::HmacSha256),
        Some("hmac-sha512") => Some(SignatureAlgorithm::HmacSha512),
        Some(other) => {
            return Err(malformed(format!(
                "alg {other:?} is not hmac-sha256 or hmac-sha512"
            )))
        }
    };
    Ok(SignatureParams {
        key_id,
        ts,
        nonce,
        signature,
        alg,
    })
}

/// `ts` is plain decimal seconds: no sign, no fraction, no leading zeros, at most 10 digits.
fn parse_ts(text: &str) -> Result<u64, AuthError> {
    let plain = !text.is_empty()
        && text.len() <= 10
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !plain {
        return Err(malformed(
            "ts must be Unix seconds in plain decimal (at most 10 digits, no leading zeros)",
        ));
    }
    text.parse().map_err(|_| malformed("ts is not a number"))
}

/// The string to sign of scheme v1 (no trailing newline).
pub fn string_to_sign(
    method: &str,
    target: &str,
    host: &str,
    ts: u64,
    nonce: &str,
    body_sha256_hex: &str,
) -> String {
    let mut s = String::with_capacity(
        16 + method.len() + target.len() + host.len() + nonce.len() + 64 + 12,
    );
    s.push_str("v1\n");
    for c in method.chars() {
        s.push(c.to_ascii_uppercase());
    }
    s.push('\n');
    s.push_str(target);
    s.push('\n');
    for c in host.chars() {
        s.push(c.to_ascii_lowercase());
    }
    s.push('\n');
    s.push_str(&ts.to_string());
    s.push('\n');
    s.push_str(nonce);
    s.push('\n');
    s.push_str(body_sha256_hex);
    s
}

/// The HMAC of `message` in lower-case hex (for clients and tests; verification compares bytes).
pub fn sign(algorithm: SignatureAlgorithm, secret: &[u8], message: &[u8]) -> String {
    match algorithm {
        SignatureAlgorithm::HmacSha256 => hex::encode(mac::<Hmac<Sha256>>(secret, message)),
        SignatureAlgorithm::HmacSha512 => hex::encode(mac::<Hmac<Sha512>>(secret, message)),
    }
}

fn mac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut m =
        <M as hmac::digest::KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(message);
    m.finalize().into_bytes().to_vec()
}

/// Constant-time check of `expected_hex` (already validated as lower-case hex of the right
/// length) against the HMAC of `message`. `verify_slice` compares every byte.
fn verify_mac(
    algorithm: SignatureAlgorithm,
    secret: &[u8],
    message: &[u8],
    expected_hex: &str,
) -> bool {
    let Ok(expected) = hex::decode(expected_hex) else {
        return false;
    };
    match algorithm {
        SignatureAlgorithm::HmacSha256 => verify_with::<Hmac<Sha256>>(secret, message, &expected),
        SignatureAlgorithm::HmacSha512 => verify_with::<Hmac<Sha512>>(secret, message, &expected),
    }
}

fn verify_with<M: Mac + hmac::digest::KeyInit>(
    secret: &[u8],
    message: &[u8],
    expected: &[u8],
) -> bool {
    match <M as hmac::digest::KeyInit>::new_from_slice(secret) {
        Ok(mut m) => {
            m.update(message);
            m.verify_slice(expected).is_ok()
        }
        Err(_) => false,
    }
}

/// A signature that verified; the nonce still has to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The client the key belongs to, for `x-auth-client`.
    pub client: String,
    /// The key that signed, for `x-auth-key-id`.
    pub key_id: String,
    /// The nonce to record once.
    pub nonce: String,
    /// The signature's `ts`, Unix seconds.
    pub ts: u64,
}

/// The request as the signature covers it.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The request target exactly as on the request line.
    pub target: &'a str,
    pub host: &'a str,
    /// Lower-case hex SHA-256 of the body as received.
    pub body_sha256_hex: &'a str,
}

/// Verifies scheme-v1 signatures against the configured keys.
#[derive(Debug)]
pub struct SignatureVerifier {
    keys: HashMap<String, SignatureKey>,
    max_skew: Duration,
}

impl SignatureVerifier {
    /// Builds the keyring.
    pub fn new(config: &SignatureConfig) -> Self {
        Self {
            keys: config
                .keys
                .iter()
                .map(|k| (k.id.clone(), k.clone()))
                .collect(),
            max_skew: config.max_skew,
        }
    }

    /// The TTL of a recorded nonce: twice the window, so a nonce outlives every timestamp
    /// that could carry it.
    pub fn nonce_ttl(&self) -> Duration {
        // Configuration bounds every duration far below overflow; saturating all the same.
        self.max_skew.saturating_mul(2)
    }

    /// Checks in DESIGN.md's order: parse, key lookup, timestamp window, HMAC.
    pub fn verify(
        &self,
        header: &str,
        request: SignedRequest<'_>,
        now: SystemTime,
    ) -> Result<VerifiedSignature, AuthError> {
        let params = parse(header)?;
        let key = self.keys.get(params.key_id).ok_or_else(|| {
            AuthError::UnknownSigningKey(format!("no signing key {:?}", params.key_id))
        })?;
        if key.not_before.is_some_and(|nb| now < nb) || key.not_after.is_some_and(|na| now > na) {
            return Err(AuthError::UnknownSigningKey(format!(
                "signing key {:?} is outside its validity window",
                params.key_id
            )));
        }
        if let Some(alg) = params.alg {
            if alg != key.algorithm {
                return Err(malformed(format!(
                    "alg does not match the algorithm of key {:?}",
                    params.key_id
                )));
            }
        }
        let want_len = match key.algorithm {
            SignatureAlgorithm::HmacSha256 => 64,
            SignatureAlgorithm::HmacSha512 => 128,
        };
        if params.signature.len() != want_len {
            return Err(malformed(format!(
                "key {:?} signs with {want_len} hex characters",
                params.key_id
            )));
        }
        // To the clock's precision, not in whole seconds: a window of 300 s that let
        // `now - ts` reach 300.9 s would outlast the nonce recorded at its other edge, which
        // is kept for exactly twice the window.
        let now = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let ts = Duration::from_secs(params.ts);
        let (skew, direction) = if ts > now {
            (ts - now, "ahead of")
        } else {
            (now - ts, "behind")
        };
        if skew > self.max_skew {
            return Err(AuthError::TimestampOutOfWindow(format!(
                "ts is {:.3}s {direction} the proxy's clock; the window is {}s",
                skew.as_secs_f64(),
                self.max_skew.as_secs_f64()
            )));
        }
        let to_sign = string_to_sign(
            request.method,
            request.target,
            request.host,
            params.ts,
            params.nonce,
            request.body_sha256_hex,
        );
        if !verify_mac(
            key.algorithm,
            key.secret.expose(),
            to_sign.as_bytes(),
            params.signature,
        ) {
            return Err(AuthError::SignatureMismatch(to_sign));
        }
        Ok(VerifiedSignature {
            client: key.client.clone(),
            key_id: key.id.clone(),
            nonce: params.nonce.to_owned(),
            ts: params.ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &[u8] = b"client-42-secret-of-at-least-32-bytes";
    const NONCE: &str = "q3J8x0bV2mN5pL7tK9wZ";
    const BODY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

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

    fn verifier(keys: Vec<SignatureKey>) -> SignatureVerifier {
        SignatureVerifier::new(&SignatureConfig {
            max_skew: Duration::from_secs(300),
            keys,
        })
    }

    fn request() -> SignedRequest<'static> {
        SignedRequest {
            method: "POST",
            target: "/api/v1/tx?a=1",
            host: "API.example.com",
            body_sha256_hex: BODY_HASH,
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn header(
        key_id: &str,
        ts: u64,
        algorithm: SignatureAlgorithm,
        req: SignedRequest<'_>,
    ) -> String {
        let to_sign = string_to_sign(
            req.method,
            req.target,
            req.host,
            ts,
            NONCE,
            req.body_sha256_hex,
        );
        let sig = sign(algorithm, SECRET, to_sign.as_bytes());
        format!(r#"Signature v1, keyId="{key_id}", ts="{ts}", nonce="{NONCE}", signature="{sig}""#)
    }

    #[test]
    fn string_to_sign_has_seven_lines_and_no_trailing_newline() {
        let s = string_to_sign(
            "post",
            "/a?b=1",
            "Example.COM:8080",
            1764000000,
            NONCE,
            BODY_HASH,
        );
        assert_eq!(
            s,
            format!("v1\nPOST\n/a?b=1\nexample.com:8080\n1764000000\n{NONCE}\n{BODY_HASH}")
        );
    }

    #[test]
    fn parameters_parse_in_any_order_quoted_or_not() {
        let sig = "a".repeat(64);
        let text =
            format!("Signature v1,signature={sig} , nonce=\"{NONCE}\",ts=1764000000,keyId=\"k-1\"");
        let p = parse(&text).unwrap();
        assert_eq!(
            p,
            SignatureParams {
                key_id: "k-1",
                ts: 1764000000,
                nonce: NONCE,
                signature: &sig,
                alg: None
            }
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let sig = "a".repeat(64);
        let good = format!(r#"keyId="k", ts="1764000000", nonce="{NONCE}", signature="{sig}""#);
        let cases = [
            format!("Signature {good}"),
            format!("Signature v2, {good}"),
            format!("Bearer v1, {good}"),
            format!("Signature v1, {good}, keyId=\"k\""),
            format!("Signature v1, {good}, extra=\"1\""),
            format!("Signature v1, {good}, alg=\"hmac-md5\""),
            format!(
                "Signature v1, {}",
                good.replace("1764000000", "+1764000000")
            ),
            format!(
                "Signature v1, {}",
                good.replace("1764000000", "1764000000.5")
            ),
            format!(
                "Signature v1, {}",
                good.replace("1764000000", "01764000000")
            ),
            format!(
                "Signature v1, {}",
                good.replace("1764000000", "17640000000")
            ),
            format!("Signature v1, {}", good.replace("1764000000", "")),
            format!("Signature v1, {}", good.replace(NONCE, "short")),
            format!(
                "Signature v1, {}",
                good.replace(NONCE, "has space in the nonce!")
            ),
            format!("Signature v1, {}", good.replace(&sig, &"A".repeat(64))),
            format!("Signature v1, {}", good.replace(&sig, &"a".repeat(63))),
            format!("Signature v1, {}", good.replace(&sig, &"g".repeat(64))),
            format!("Signature v1, {}", good.replace("keyId=\"k\"", "keyId=\"k")),
            format!("Signature v1, {}", good.replace(", ts=\"1764000000\"", "")),
            format!("Signature v1, {good}, "),
            "Signature".to_owned(),
            String::new(),
            format!("Signature v1, {good}{}", " ".repeat(2000)),
        ];
        for case in &cases {
            assert!(
                matches!(parse(case), Err(AuthError::SignatureMalformed(_))),
                "{case:?} -> {:?}",
                parse(case)
            );
        }
    }

    #[test]
    fn a_valid_signature_verifies_with_sha256_and_sha512() {
        for alg in [
            SignatureAlgorithm::HmacSha256,
            SignatureAlgorithm::HmacSha512,
        ] {
            let v = verifier(vec![key("k-1", alg)]);
            let h = header("k-1", 1764000000, alg, request());
            let ok = v.verify(&h, request(), at(1764000100)).unwrap();
            assert_eq!(
                ok,
                VerifiedSignature {
                    client: "client-42".into(),
                    key_id: "k-1".into(),
                    nonce: NONCE.into(),
                    ts: 1764000000,
                }
            );
        }
    }

    #[test]
    fn each_changed_line_is_a_mismatch_showing_the_string_to_sign() {
        let v = verifier(vec![key("k-1", SignatureAlgorithm::HmacSha256)]);
        let h = header("k-1", 1764000000, SignatureAlgorithm::HmacSha256, request());
        let other_body = "0".repeat(64);
        let changed = [
            SignedRequest {
                method: "PUT",
                ..request()
            },
            SignedRequest {
                target: "/api/v1/tx?a=2",
                ..request()
            },
            SignedRequest {
                target: "/api/v1/other?a=1",
                ..request()
            },
            SignedRequest {
                host: "evil.example.com",
                ..request()
            },
            SignedRequest {
                body_sha256_hex: &other_body,
                ..request()
            },
        ];
        for req in changed {
            match v.verify(&h, req, at(1764000000)) {
                Err(AuthError::SignatureMismatch(shown)) => {
                    assert_eq!(
                        shown,
                        string_to_sign(
                            req.method,
                            req.target,
                            req.host,
                            1764000000,
                            NONCE,
                            req.body_sha256_hex
                        )
                    );
                }
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn timestamps_outside_the_window_are_refused_both_ways() {
        let v = verifier(vec![key("k-1", SignatureAlgorithm::HmacSha256)]);
        let h = header("k-1", 1764000000, SignatureAlgorithm::HmacSha256, request());
        assert!(v.verify(&h, request(), at(1764000300)).is_ok());
        assert!(v.verify(&h, request(), at(1763999700)).is_ok());
        assert!(matches!(
            v.verify(&h, request(), at(1764000301)),
            Err(AuthError::TimestampOutOfWindow(_))
        ));
        assert!(matches!(
            v.verify(&h, request(), at(1763999699)),
            Err(AuthError::TimestampOutOfWindow(_))
        ));
    }

    #[test]
    fn the_window_is_kept_to_the_clocks_precision_within_the_nonces_lifetime() {
        let v = verifier(vec![key("k-1", SignatureAlgorithm::HmacSha256)]);
        let h = header("k-1", 1764000000, SignatureAlgorithm::HmacSha256, request());
        let ms = |m: u64| Duration::from_millis(m);
        // A request first seen at the window's early edge, `ts - 300 s`, has its nonce kept
        // until `ts + 300 s`. Half a second later it must no longer verify (it did when the
        // window was counted in whole seconds), or a replay would find its nonce gone.
        let first = at(1763999700);
        assert!(v.verify(&h, request(), first).is_ok());
        let nonce_gone = first + v.nonce_ttl();
        assert_eq!(nonce_gone, at(1764000300));
        for late in [ms(1), ms(500), ms(999)] {
            match v.verify(&h, request(), nonce_gone + late) {
                Err(AuthError::TimestampOutOfWindow(detail)) => {
                    assert!(detail.contains("behind"), "{detail}")
                }
                other => panic!("{late:?} past the window: {other:?}"),
            }
        }
        // And ahead: 300.5 s before `ts` is outside as well.
        assert!(matches!(
            v.verify(&h, request(), at(1763999700) - ms(500)),
            Err(AuthError::TimestampOutOfWindow(_))
        ));
        assert!(v.verify(&h, request(), at(1763999700) + ms(1)).is_ok());
    }

    #[test]
    fn unknown_and_out_of_window_keys_are_refused() {
        let mut rotating = key("k-old", SignatureAlgorithm::HmacSha256);
        rotating.not_after = Some(at(1764000000));
        let mut future = key("k-new", SignatureAlgorithm::HmacSha256);
        future.not_before = Some(at(1764000500));
        let v = verifier(vec![rotating, future]);
        for id in ["k-old", "k-new", "k-none"] {
            let h = header(id, 1764000100, SignatureAlgorithm::HmacSha256, request());
            assert!(
                matches!(
                    v.verify(&h, request(), at(1764000100)),
                    Err(AuthError::UnknownSigningKey(_))
                ),
                "{id}"
            );
        }
    }

    #[test]
    fn alg_parameter_must_match_the_key() {
        let v = verifier(vec![key("k-1", SignatureAlgorithm::HmacSha256)]);
        let h = header("k-1", 1764000000, SignatureAlgorithm::HmacSha256, request())
            + r#", alg="hmac-sha512""#;
        assert!(matches!(
            v.verify(&h, request(), at(1764000000)),
            Err(AuthError::SignatureMalformed(_))
        ));
        let h = header("k-1", 1764000000, SignatureAlgorithm::HmacSha512, request());
        assert!(matches!(
            v.verify(&h, request(), at(1764000000)),
            Err(AuthError::SignatureMalformed(_))
        ));
    }

    /// The vectors the Python SDK signs with (sdk/python/tests/vectors.json) verify here too.
    #[test]
    fn sdk_test_vectors_verify() {
        let text = include_str!("../../sdk/python/tests/vectors.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 3);
        for v in vectors {
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            let algorithm = match s("algorithm").as_str() {
                "hmac-sha256" => SignatureAlgorithm::HmacSha256,
                _ => SignatureAlgorithm::HmacSha512,
            };
            let body_hash = hex::encode(<Sha256 as sha2::Digest>::digest(s("body").as_bytes()));
            assert_eq!(body_hash, s("body_sha256"));
            let ts = v["ts"].as_u64().unwrap();
            let to_sign = string_to_sign(
                &s("method"),
                &s("target"),
                &s("host"),
                ts,
                &s("nonce"),
                &body_hash,
            );
            assert_eq!(to_sign, s("string_to_sign"));
            assert_eq!(
                sign(algorithm, s("secret").as_bytes(), to_sign.as_bytes()),
                s("signature")
            );
            let mut k = key(&s("key_id"), algorithm);
            k.secret = Secret::new(s("secret").into_bytes());
            let verified = verifier(vec![k])
                .verify(
                    &s("header"),
                    SignedRequest {
                        method: &s("method"),
                        target: &s("target"),
                        host: &s("host"),
                        body_sha256_hex: &body_hash,
                    },
                    at(ts),
                )
                .unwrap();
            assert_eq!(verified.key_id, s("key_id"));
        }
    }
}
