//! Test keys for every algorithm portcullis verifies: generate a key, publish its public half as
//! a JWK, and sign tokens with it, including tokens with hand-made headers and raw JSON (for
//! duplicate keys and other malformed input). Signing uses aws-lc-rs directly, so a test can
//! sign anything, whatever its header claims.
//!
//! Integration tests use it as `mod support;` (`support::keys::TestKey`); the crate's unit
//! tests include the same file.

use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

static NEXT_KID: AtomicUsize = AtomicUsize::new(1);

// Test-only and few in number: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Hmac(hmac::Key, Vec<u8>),
}

/// A private key of one algorithm with a unique `kid`.
pub struct TestKey {
    kid: String,
    alg: Algorithm,
    signer: Signer,
}

impl TestKey {
    fn new(alg: Algorithm, signer: Signer) -> Self {
        let n = NEXT_KID.fetch_add(1, Ordering::Relaxed);
        Self {
            kid: format!("{}-{n}", alg_name(alg).to_ascii_lowercase()),
            alg,
            signer,
        }
    }

    fn rsa(alg: Algorithm) -> Self {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation");
        Self::new(alg, Signer::Rsa(pair))
    }

    /// RS256 with a fresh 2048-bit key.
    pub fn rs256() -> Self {
        Self::rsa(Algorithm::RS256)
    }

    /// RS384 with a fresh 2048-bit key.
    pub fn rs384() -> Self {
        Self::rsa(Algorithm::RS384)
    }

    /// PS256 with a fresh 2048-bit key.
    pub fn ps256() -> Self {
        Self::rsa(Algorithm::PS256)
    }

    /// ES256 with a fresh P-256 key.
    pub fn es256() -> Self {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .expect("P-256 key generation");
        Self::new(Algorithm::ES256, Signer::Ec(pair))
    }

    /// ES384 with a fresh P-384 key.
    pub fn es384() -> Self {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)
            .expect("P-384 key generation");
        Self::new(Algorithm::ES384, Signer::Ec(pair))
    }

    /// EdDSA with a fresh Ed25519 key.
    pub fn eddsa() -> Self {
        let pair = Ed25519KeyPair::generate().expect("Ed25519 key generation");
        Self::new(Algorithm::EdDSA, Signer::Ed(pair))
    }

    /// HS256 with the given secret (any length: tests may need a short or odd one).
    pub fn hs256(secret: &[u8]) -> Self {
        Self::new(
            Algorithm::HS256,
            Signer::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret), secret.to_vec()),
        )
    }

    /// The same key under another `kid`.
    pub fn with_kid(mut self, kid: &str) -> Self {
        self.kid = kid.to_owned();
        self
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm it signs with.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The HMAC secret, for HS256 keys.
    pub fn secret(&self) -> Option<&[u8]> {
        match &self.signer {
            Signer::Hmac(_, secret) => Some(secret),
            _ => None,
        }
    }

    /// The public key bytes as a careless verifier might use them as an HMAC secret: the
    /// RSA modulus, the SEC1 point, the Ed25519 key; for HS256 the secret.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        match &self.signer {
            Signer::Rsa(pair) => RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key()).n,
            Signer::Ec(pair) => pair.public_key().as_ref().to_vec(),
            Signer::Ed(pair) => pair.public_key().as_ref().to_vec(),
            Signer::Hmac(_, secret) => secret.clone(),
        }
    }

    /// The public JWK with `kid`, `alg` and `use: sig`; `Value::Null` for HS256 (a secret is
    /// never published).
    pub fn jwk(&self) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let alg = alg_name(self.alg);
        match &self.signer {
            Signer::Rsa(pair) => {
                let c = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
                json!({"kty": "RSA", "kid": self.kid, "alg": alg, "use": "sig",
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(pair) => {
                let point = pair.public_key().as_ref();
                let len = (point.len() - 1) / 2;
                let crv = if len == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "kid": self.kid, "alg": alg, "use": "sig", "crv": crv,
                       "x": b64(&point[1..1 + len]), "y": b64(&point[1 + len..])})
            }
            Signer::Ed(pair) => {
                json!({"kty": "OKP", "kid": self.kid, "alg": alg, "use": "sig", "crv": "Ed25519",
                       "x": b64(pair.public_key().as_ref())})
            }
            Signer::Hmac(..) => Value::Null,
        }
    }

    /// A token with header `{"alg", "typ": "JWT", "kid"}` and these claims.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": alg_name(self.alg), "typ": "JWT", "kid": self.kid});
        self.sign_with_header(&header, claims)
    }

    /// A token with exactly this header (whatever its `alg` says, this key signs).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        sign_raw(&header.to_string(), &claims.to_string(), self)
    }

    /// The signature of `input` with this key, base64url.
    pub fn signature(&self, input: &[u8]) -> String {
        let rng = SystemRandom::new();
        let bytes = match &self.signer {
            Signer::Rsa(pair) => {
                let encoding: &'static dyn signature::RsaEncoding = match self.alg {
                    Algorithm::RS384 => &signature::RSA_PKCS1_SHA384,
                    Algorithm::RS512 => &signature::RSA_PKCS1_SHA512,
                    Algorithm::PS256 => &signature::RSA_PSS_SHA256,
                    Algorithm::PS384 => &signature::RSA_PSS_SHA384,
                    Algorithm::PS512 => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(encoding, &rng, input, &mut sig)
                    .expect("RSA signing");
                sig
            }
            Signer::Ec(pair) => pair
                .sign(&rng, input)
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
            Signer::Ed(pair) => pair.sign(input).as_ref().to_vec(),
            Signer::Hmac(key, _) => hmac::sign(key, input).as_ref().to_vec(),
        };
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// A JWKS document with the public JWKs of `keys` (HMAC keys are left out).
pub fn jwks(keys: &[&TestKey]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| k.jwk())
        .filter(|j| !j.is_null())
        .collect();
    json!({ "keys": keys })
}

/// A token from raw header and payload JSON text, signed by `key`: for duplicate keys and
/// other JSON that `serde_json::Value` cannot hold.
pub fn sign_raw(header_json: &str, payload_json: &str, key: &TestKey) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(payload_json)
    );
    let signature = key.signature(input.as_bytes());
    format!("{input}.{signature}")
}

/// The JOSE name of an algorithm.
pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}
