//! Request signatures, scheme v1 (shared/DESIGN.md), reimplemented here so that the load
//! generator does not depend on the portcullis crate. The unit test checks it against the SDK's
//! vectors (`sdk/python/tests/vectors.json`).

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256, Sha512};

/// The HMAC of scheme v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha256,
    HmacSha512,
}

impl Algorithm {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hmac-sha256" => Some(Self::HmacSha256),
            "hmac-sha512" => Some(Self::HmacSha512),
            _ => None,
        }
    }
}

/// Lower-case hex of SHA-256 of the body (the last line of the string to sign).
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The string to sign: `v1`, METHOD, target, host (lower case), ts, nonce, body hash, joined by
/// `\n`, no trailing newline.
pub fn string_to_sign(
    method: &str,
    target: &str,
    host: &str,
    ts: u64,
    nonce: &str,
    body_sha256_hex: &str,
) -> String {
    format!(
        "v1\n{}\n{target}\n{}\n{ts}\n{nonce}\n{body_sha256_hex}",
        method.to_ascii_uppercase(),
        host.to_ascii_lowercase()
    )
}

/// Lower-case hex of HMAC(secret, message).
pub fn sign(algorithm: Algorithm, secret: &[u8], message: &[u8]) -> String {
    fn mac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], message: &[u8]) -> String {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        let mut m = <M as hmac::digest::KeyInit>::new_from_slice(secret)
            .expect("HMAC takes keys of any length");
        m.update(message);
        hex::encode(m.finalize().into_bytes())
    }
    match algorithm {
        Algorithm::HmacSha256 => mac::<Hmac<Sha256>>(secret, message),
        Algorithm::HmacSha512 => mac::<Hmac<Sha512>>(secret, message),
    }
}

/// The header value. `alg` is sent only for hmac-sha512 (hmac-sha256 is the default).
pub fn header(key_id: &str, algorithm: Algorithm, ts: u64, nonce: &str, signature: &str) -> String {
    let mut h = format!(
        "Signature v1, keyId=\"{key_id}\", ts=\"{ts}\", nonce=\"{nonce}\", signature=\"{signature}\""
    );
    if algorithm == Algorithm::HmacSha512 {
        h.push_str(", alg=\"hmac-sha512\"");
    }
    h
}

const NONCE_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A random 22-character nonce (132 bits) from `A-Z a-z 0-9 - _`.
pub fn nonce<R: Rng>(rng: &mut R) -> String {
    (0..22)
        .map(|_| NONCE_CHARS[rng.gen_range(0..NONCE_CHARS.len())] as char)
        .collect()
}

/// Everything needed to sign each request of a run; the body hash is computed once.
#[derive(Debug, Clone)]
pub struct Signer {
    pub key_id: String,
    pub algorithm: Algorithm,
    pub secret: Vec<u8>,
    pub method: String,
    pub target: String,
    pub host: String,
    pub body_sha256_hex: String,
}

impl Signer {
    /// A fresh header: the current time and a new random nonce.
    pub fn header_now<R: Rng>(&self, rng: &mut R) -> String {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let nonce = nonce(rng);
        let sts = string_to_sign(
            &self.method,
            &self.target,
            &self.host,
            ts,
            &nonce,
            &self.body_sha256_hex,
        );
        let sig = sign(self.algorithm, &self.secret, sts.as_bytes());
        header(&self.key_id, self.algorithm, ts, &nonce, &sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_sdk_vectors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../sdk/python/tests/vectors.json"
        );
        let text = std::fs::read_to_string(path).expect("read vectors.json");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("parse vectors.json");
        assert_eq!(doc["scheme"], "v1");
        let vectors = doc["vectors"].as_array().expect("vectors array");
        assert!(!vectors.is_empty());
        for v in vectors {
            let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} missing"));
            let name = s("name");
            let alg = Algorithm::parse(s("algorithm")).expect("known algorithm");
            let ts = v["ts"].as_u64().expect("ts");
            let body_hash = body_sha256_hex(s("body").as_bytes());
            assert_eq!(body_hash, s("body_sha256"), "{name}: body hash");
            let sts = string_to_sign(
                s("method"),
                s("target"),
                s("host"),
                ts,
                s("nonce"),
                &body_hash,
            );
            assert_eq!(sts, s("string_to_sign"), "{name}: string to sign");
            let sig = sign(alg, s("secret").as_bytes(), sts.as_bytes());
            assert_eq!(sig, s("signature"), "{name}: signature");
            let h = header(s("key_id"), alg, ts, s("nonce"), &sig);
            assert_eq!(h, s("header"), "{name}: header");
        }
    }

    #[test]
    fn nonces_are_valid_and_fresh() {
        let mut rng = rand::thread_rng();
        let a = nonce(&mut rng);
        let b = nonce(&mut rng);
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
}
