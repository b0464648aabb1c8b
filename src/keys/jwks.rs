//! Turning a JWKS document (RFC 7517) or a configured HMAC secret into [`VerificationKey`]s.
//!
//! Parsing is lenient per key and strict per document: a key that is malformed, unsupported,
//! not for signatures or symmetric is skipped (and logged) without spoiling the others, while a
//! document that is not a JSON object with a `keys` array, or that yields no usable key, is an
//! error so that the caller keeps the keys it already has. Each key's [`DecodingKey`] is built
//! here, once per load, never on the request path.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// What kind of key a [`VerificationKey`] is; an algorithm only fits a key of its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// An RSA public key (RS256/384/512, PS256/384/512).
    Rsa,
    /// A P-256 public key (ES256).
    EcP256,
    /// A P-384 public key (ES384).
    EcP384,
    /// An Ed25519 public key (EdDSA).
    Ed25519,
    /// A configured HMAC secret (HS256/384/512). Never taken from a JWKS.
    Hmac,
}

impl KeyKind {
    /// Whether `alg` can be verified with a key of this kind.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
            KeyKind::Hmac => matches!(alg, HS256 | HS384 | HS512),
        }
    }

    /// A short name for error details and logs.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "a P-256 key",
            KeyKind::EcP384 => "a P-384 key",
            KeyKind::Ed25519 => "an Ed25519 key",
            KeyKind::Hmac => "an HMAC secret",
        }
    }
}

/// One key that can verify token signatures, ready for use.
#[derive(Debug)]
pub struct VerificationKey {
    /// The `kid` it is selected by; `None` for a JWK without one.
    pub kid: Option<String>,
    /// Its kind, which decides the algorithms it may verify.
    pub kind: KeyKind,
    /// The JWK's own `alg` member: when set, the key verifies only this algorithm.
    pub alg: Option<Algorithm>,
    key: DecodingKey,
    /// The public key as parsed (PKCS#1 DER, SEC1 point or raw Ed25519); empty for an HMAC
    /// secret. With `kid`, `kind` and `alg` it tells whether a reloaded JWKS still holds this key.
    public: Vec<u8>,
    /// The public key parsed once per algorithm it fits. jsonwebtoken's `crypto::verify` builds
    /// the key anew on every call, which for RSA includes its Montgomery context: about a third
    /// of an RS256 verification. HMAC secrets go through jsonwebtoken.
    parsed: Vec<(Algorithm, Parsed)>,
}

/// An aws-lc-rs public key ready to verify (its `Debug` shows nothing of the key).
struct Parsed(aws_lc_rs::signature::ParsedPublicKey);

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParsedPublicKey")
    }
}

/// The aws-lc-rs algorithm of a JOSE asymmetric algorithm (the ones jsonwebtoken's aws-lc
/// backend uses too).
fn aws_algorithm(
    alg: Algorithm,
) -> Option<&'static dyn aws_lc_rs::signature::VerificationAlgorithm> {
    use aws_lc_rs::signature as s;
    Some(match alg {
        Algorithm::RS256 => &s::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &s::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &s::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &s::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &s::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &s::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &s::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &s::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &s::ED25519,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => return None,
    })
}

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Parses `public` (PKCS#1 RSAPublicKey DER, an uncompressed SEC1 point, or a raw Ed25519 key)
/// for every algorithm of `kind` that `own_alg` allows.
fn parse_for(
    kind: KeyKind,
    own_alg: Option<Algorithm>,
    public: &[u8],
) -> Result<Vec<(Algorithm, Parsed)>, String> {
    let mut out = Vec::new();
    for alg in ASYMMETRIC {
        if !kind.fits(alg) || own_alg.is_some_and(|own| own != alg) {
            continue;
        }
        let Some(algorithm) = aws_algorithm(alg) else {
            continue;
        };
        let parsed = aws_lc_rs::signature::ParsedPublicKey::new(algorithm, public)
            .map_err(|e| format!("the public key is unusable for {alg:?} ({e})"))?;
        out.push((alg, Parsed(parsed)));
    }
    Ok(out)
}

/// DER of a PKCS#1 RSAPublicKey from big-endian `n` and `e`.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn integer(bytes: &[u8]) -> Vec<u8> {
        let trimmed = match bytes.iter().position(|b| *b != 0) {
            Some(i) => &bytes[i..],
            None => &[0u8][..],
        };
        let mut content = Vec::with_capacity(trimmed.len() + 1);
        if trimmed[0] & 0x80 != 0 {
            content.push(0);
        }
        content.extend_from_slice(trimmed);
        tlv(0x02, &content)
    }
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let first = bytes
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(bytes.len() - 1);
            out.push(0x80 | (bytes.len() - first) as u8);
            out.extend_from_slice(&bytes[first..]);
        }
        out.extend_from_slice(content);
        out
    }
    let mut seq = integer(n);
    seq.extend(integer(e));
    tlv(0x30, &seq)
}

impl VerificationKey {
    /// An HMAC key from a configured secret.
    pub fn hmac(kid: &str, secret: &[u8]) -> Self {
        Self {
            kid: Some(kid.to_owned()),
            kind: KeyKind::Hmac,
            alg: None,
            key: DecodingKey::from_secret(secret),
            public: Vec::new(),
            parsed: Vec::new(),
        }
    }

    /// Whether `other` is the same public key under the same name and use: a JWKS reloaded
    /// with this key unchanged keeps the key (and the tokens verified with it) as they are.
    /// Always `false` for HMAC secrets, which are never reloaded.
    pub fn same_public_key(&self, other: &VerificationKey) -> bool {
        self.kind != KeyKind::Hmac
            && self.kind == other.kind
            && self.kid == other.kid
            && self.alg == other.alg
            && self.public == other.public
    }

    /// Whether this key may verify a signature made with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }

    /// Checks the signature over `signing_input`: `signature`, the decoded bytes, against a
    /// public key; `signature_b64`, the segment as sent, against an HMAC secret (through
    /// jsonwebtoken). `false` for a wrong signature, and also for an algorithm the key does
    /// not fit (callers check [`Self::fits`] first).
    pub fn verify(
        &self,
        signing_input: &[u8],
        signature_b64: &str,
        signature: &[u8],
        alg: Algorithm,
    ) -> bool {
        if !self.fits(alg) {
            return false;
        }
        if let Some((_, parsed)) = self.parsed.iter().find(|(a, _)| *a == alg) {
            return parsed.0.verify_sig(signing_input, signature).is_ok();
        }
        matches!(
            jsonwebtoken::crypto::verify(signature_b64, signing_input, &self.key, alg),
            Ok(true)
        )
    }
}

/// Parses a JWKS document into its usable signature keys. Skipped keys are logged with
/// `issuer`. An error means the document as a whole is unusable.
pub fn parse_jwks(issuer: &str, bytes: &[u8]) -> Result<Vec<VerificationKey>, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
        return Err("the JWKS has no \"keys\" array".into());
    };
    let mut keys: Vec<VerificationKey> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        match parse_jwk(entry) {
            Ok(key) => {
                if key.kid.is_some() && keys.iter().any(|k| k.kid == key.kid) {
                    tracing::warn!(issuer, index = i, kid = ?key.kid, "JWKS key skipped: its kid is used by an earlier key");
                    continue;
                }
                keys.push(key);
            }
            Err(reason) => {
                let kid = entry.get("kid").and_then(Value::as_str);
                tracing::warn!(issuer, index = i, kid, reason, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS holds no usable signature key ({} entries)",
            entries.len()
        ));
    }
    Ok(keys)
}

/// One JWK, or why it is not used.
fn parse_jwk(jwk: &Value) -> Result<VerificationKey, String> {
    let Some(obj) = jwk.as_object() else {
        return Err("not a JSON object".into());
    };
    let text = |name: &str| -> Result<Option<&str>, String> {
        match obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("\"{name}\" is not a string")),
        }
    };
    if let Some(usage) = text("use")? {
        if usage != "sig" {
            return Err(format!("\"use\" is {usage:?}, not \"sig\""));
        }
    }
    if let Some(ops) = obj.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("\"key_ops\" does not include \"verify\"".into());
        }
    }
    let kid = text("kid")?.map(str::to_owned);
    let alg = match text("alg")? {
        None => None,
        Some(name) => Some(
            parse_algorithm(name).ok_or_else(|| format!("\"alg\" {name:?} is not supported"))?,
        ),
    };
    let kty = text("kty")?.ok_or("\"kty\" is missing")?;
    let member = |name: &str, what: &str| -> Result<Vec<u8>, String> {
        let value = text(name)?.ok_or_else(|| format!("\"{name}\" is missing"))?;
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| format!("\"{name}\" ({what}) is not base64url without padding"))
    };
    let (kind, key, public) = match kty {
        "RSA" => {
            let n = member("n", "modulus")?;
            let e = member("e", "exponent")?;
            let bits = significant_bits(&n);
            if bits < 2048 {
                return Err(format!(
                    "the RSA modulus has {bits} bits; at least 2048 are required"
                ));
            }
            if e.is_empty() || significant_bits(&e) > 33 {
                return Err("the RSA exponent is out of range".into());
            }
            let der = rsa_public_key_der(&n, &e);
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_raw_components(&n, &e),
                der,
            )
        }
        "EC" => {
            let (kind, len) = match text("crv")? {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                Some(other) => return Err(format!("curve {other:?} is not supported")),
                None => return Err("\"crv\" is missing".into()),
            };
            let x = member("x", "coordinate")?;
            let y = member("y", "coordinate")?;
            if x.len() != len || y.len() != len {
                return Err(format!("the coordinates are not {len} bytes each"));
            }
            // The uncompressed SEC1 point, as the ECDSA verifier expects it.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point), point)
        }
        "OKP" => {
            match text("crv")? {
                Some("Ed25519") => {}
                Some(other) => return Err(format!("curve {other:?} is not supported")),
                None => return Err("\"crv\" is missing".into()),
            }
            let x = member("x", "public key")?;
            if x.len() != 32 {
                return Err("the Ed25519 public key is not 32 bytes".into());
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x), x)
        }
        "oct" => {
            return Err(
                "symmetric keys are never taken from a JWKS; configure HMAC secrets instead".into(),
            )
        }
        other => return Err(format!("key type {other:?} is not supported")),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err(format!("\"alg\" {alg:?} does not fit {}", kind.name()));
        }
    }
    let parsed = parse_for(kind, alg, &public)?;
    Ok(VerificationKey {
        kid,
        kind,
        alg,
        key,
        public,
        parsed,
    })
}

/// The number of bits of a big-endian unsigned integer, leading zeros ignored.
fn significant_bits(bytes: &[u8]) -> usize {
    match bytes.iter().position(|b| *b != 0) {
        None => 0,
        Some(i) => (bytes.len() - i - 1) * 8 + (8 - bytes[i].leading_zeros() as usize),
    }
}

/// The algorithm a JOSE `alg` name stands for, when portcullis supports it. Case-sensitive, as
/// RFC 7515 requires.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        _ => return None,
    })
}
