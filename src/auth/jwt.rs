//! The `jwt` check: verifies a compact JWS bearer token against the configured issuers.
//!
//! The proxy calls [`JwtVerifier::verify`] after the mTLS and signature checks and before the
//! revocation and permission checks; what it returns becomes `x-auth-subject`, `x-auth-issuer`,
//! `x-auth-permissions` and `x-auth-claims`. The token is decoded exactly once, with a JSON
//! reader that refuses duplicate keys, so the proxy and the upstream can never read a claim
//! differently. The rules of DESIGN.md's "JWT rules that are never configurable" are applied in
//! this order: size, shape and JSON types first (cheap and reveal nothing), then the signature,
//! then the claims whose outcome depends on time or audience. A token that passed is kept in a
//! cache keyed by its SHA-256 until its `exp`, so a client reusing a token pays for the
//! signature once.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::auth::AuthError;
use crate::config::{IssuerConfig, JwtConfig};
use crate::keys::{parse_algorithm, KeyStore};

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `iss`
    pub issuer: String,
    /// `sub`, when present.
    pub subject: Option<String>,
    /// From the issuer's `permissions_claim`.
    pub permissions: Vec<String>,
    /// `permissions` joined with `,`, ready for `x-auth-permissions`.
    pub permissions_header: String,
    /// The payload segment of the token as sent (base64url, no padding), for `x-auth-claims`.
    pub payload_b64: String,
    /// `exp`, Unix seconds.
    pub exp: i64,
    /// `nbf`, Unix seconds, when present (checked again on a cache hit).
    pub not_before: Option<i64>,
    /// `iat`, Unix seconds, when present (checked again on a cache hit).
    pub issued_at: Option<i64>,
    /// `jti`, when present and a string (for revocation).
    pub token_id: Option<String>,
}

/// Verifies bearer tokens against the configured issuers.
pub struct JwtVerifier {
    keys: Arc<KeyStore>,
    issuers: Vec<IssuerRules>,
    leeway: i64,
    cache: Option<moka::sync::Cache<[u8; 32], Arc<VerifiedToken>>>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.len())
            .field("leeway", &self.leeway)
            .field("cache", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish_non_exhaustive()
    }
}

/// What one issuer's tokens must satisfy, taken from its configuration.
#[derive(Debug)]
struct IssuerRules {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    permissions_claim: String,
    required_claims: Vec<String>,
    max_lifetime: i64,
}

impl IssuerRules {
    fn new(c: &IssuerConfig) -> Self {
        Self {
            issuer: c.issuer.clone(),
            audiences: c.audiences.clone(),
            algorithms: c.algorithms.clone(),
            permissions_claim: c.permissions_claim.clone(),
            required_claims: c.required_claims.clone(),
            max_lifetime: secs(c.max_lifetime),
        }
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Expires a cached token when it expires (plus the leeway it is accepted with).
struct ExpireAtExp {
    leeway: i64,
}

impl moka::Expiry<[u8; 32], Arc<VerifiedToken>> for ExpireAtExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        token: &Arc<VerifiedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| secs(d))
            .unwrap_or(0);
        let left = token.exp.saturating_add(self.leeway).saturating_sub(now);
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

impl JwtVerifier {
    /// Builds the verifier. `keys` must have been loaded from the same configuration.
    pub fn new(config: &JwtConfig, keys: Arc<KeyStore>) -> Self {
        let leeway = secs(config.leeway);
        let cache = (config.verified_cache > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.verified_cache)
                .expire_after(ExpireAtExp { leeway })
                .build()
        });
        Self {
            keys,
            issuers: config.issuers.iter().map(IssuerRules::new).collect(),
            leeway,
            cache,
        }
    }

    /// Verifies `token` at time `now` (Unix seconds).
    ///
    /// Errors, each a stable code of DESIGN.md:
    /// - [`AuthError::MalformedToken`]: over 8 KiB, not three base64url segments (five: JWE),
    ///   header or payload not a JSON object, a duplicate JSON key, `crit`, `cty: JWT`, a claim
    ///   of the wrong JSON type (`exp`/`nbf`/`iat` not an integer, `sub` not a string, `aud` not
    ///   a string or strings, permissions not a string or strings).
    /// - [`AuthError::AlgorithmNotAllowed`]: `alg` is `none` (any case), unknown, outside the
    ///   issuer's `algorithms`, or does not fit the key named by `kid`.
    /// - [`AuthError::InvalidIssuer`]: `iss` missing, not a string, or not a configured issuer.
    /// - [`AuthError::UnknownKey`], [`AuthError::KeysUnavailable`]: see [`KeyStore::keys_for`].
    /// - [`AuthError::InvalidTokenSignature`]: the signature does not verify.
    /// - [`AuthError::MissingClaim`]: `exp` or one of the issuer's `required_claims` is absent.
    /// - [`AuthError::TokenExpired`], [`AuthError::TokenNotYetValid`],
    ///   [`AuthError::TokenLifetimeExceeded`], [`AuthError::InvalidAudience`]: after the
    ///   signature verified, the claims do not hold at `now` (with the configured leeway).
    pub async fn verify(&self, token: &str, now: i64) -> Result<Arc<VerifiedToken>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("the token is larger than 8 KiB"));
        }
        let cache_key: Option<[u8; 32]> = self
            .cache
            .as_ref()
            .map(|_| Sha256::digest(token.as_bytes()).into());
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
            if let Some(hit) = cache.get(key) {
                self.check_times(hit.exp, hit.not_before, hit.issued_at, now)?;
                return Ok(hit);
            }
        }
        let verified = Arc::new(self.verify_uncached(token, now).await?);
        if let (Some(cache), Some(key)) = (&self.cache, cache_key) {
            cache.insert(key, verified.clone());
        }
        Ok(verified)
    }

    async fn verify_uncached(&self, token: &str, now: i64) -> Result<VerifiedToken, AuthError> {
        let parsed = parse_compact(token)?;
        let header = Header::read(&parsed.header)?;
        let issuer = self.issuer_of(&parsed.payload)?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!(
                "{:?} is not accepted for this issuer",
                header.alg
            )));
        }
        let claims = Claims::read(&parsed.payload, &issuer.permissions_claim)?;

        let keys = self
            .keys
            .keys_for(&issuer.issuer, header.kid.as_deref(), header.alg)
            .await?;
        let verified = keys.iter().any(|k| {
            k.verify(
                parsed.signing_input.as_bytes(),
                parsed.signature,
                header.alg,
            )
        });
        if !verified {
            return Err(AuthError::InvalidTokenSignature);
        }

        // Only a token signed by the issuer gets to learn which of its claims fail.
        let Some(exp) = claims.exp else {
            return Err(AuthError::MissingClaim("the token has no exp claim".into()));
        };
        for name in &issuer.required_claims {
            if !parsed.payload.contains_key(name) {
                return Err(AuthError::MissingClaim(format!(
                    "the token has no {name} claim"
                )));
            }
        }
        self.check_times(exp, claims.nbf, claims.iat, now)?;
        let lifetime = exp.saturating_sub(claims.iat.unwrap_or(now));
        if lifetime > issuer.max_lifetime {
            return Err(AuthError::TokenLifetimeExceeded(format!(
                "the token is valid for {lifetime}s; at most {}s is accepted",
                issuer.max_lifetime
            )));
        }
        if !issuer.audiences.is_empty() {
            match &claims.aud {
                None => {
                    return Err(AuthError::InvalidAudience(
                        "the token has no aud claim".into(),
                    ))
                }
                Some(auds) if !auds.iter().any(|a| issuer.audiences.contains(a)) => {
                    return Err(AuthError::InvalidAudience(
                        "the token is not meant for this service (aud)".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        let permissions_header = claims.permissions.join(",");
        Ok(VerifiedToken {
            issuer: issuer.issuer.clone(),
            subject: claims.sub,
            permissions: claims.permissions,
            permissions_header,
            payload_b64: parsed.payload_b64.to_owned(),
            exp,
            not_before: claims.nbf,
            issued_at: claims.iat,
            token_id: claims.jti,
        })
    }

    /// The rules of the issuer named by `iss`, which must be a string equal to a configured
    /// issuer (never an array, never a substring).
    fn issuer_of(&self, payload: &Map<String, Value>) -> Result<&IssuerRules, AuthError> {
        let iss = match payload.get("iss") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(AuthError::InvalidIssuer(
                    "the iss claim is not a string".into(),
                ))
            }
            None => {
                return Err(AuthError::InvalidIssuer(
                    "the token has no iss claim".into(),
                ))
            }
        };
        self.issuers
            .iter()
            .find(|i| i.issuer == *iss)
            .ok_or_else(|| AuthError::InvalidIssuer("the token's issuer is not accepted".into()))
    }

    fn check_times(
        &self,
        exp: i64,
        nbf: Option<i64>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<(), AuthError> {
        if exp.saturating_add(self.leeway) < now {
            return Err(AuthError::TokenExpired(format!(
                "token expired at {}",
                rfc3339(exp)
            )));
        }
        if let Some(nbf) = nbf {
            if nbf.saturating_sub(self.leeway) > now {
                return Err(AuthError::TokenNotYetValid(format!(
                    "token not valid before {}",
                    rfc3339(nbf)
                )));
            }
        }
        if let Some(iat) = iat {
            if iat.saturating_sub(self.leeway) > now {
                return Err(AuthError::TokenNotYetValid(format!(
                    "token issued in the future, at {}",
                    rfc3339(iat)
                )));
            }
        }
        Ok(())
    }
}

fn malformed(why: &str) -> AuthError {
    AuthError::MalformedToken(why.to_owned())
}

/// Unix seconds as RFC 3339, or as a plain number outside years 1970..=9999 (which
/// `humantime` cannot format).
fn rfc3339(unix: i64) -> String {
    const YEAR_10000: i64 = 253_402_300_800;
    match u64::try_from(unix) {
        Ok(s) if unix < YEAR_10000 => {
            humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => format!("{unix} (Unix time)"),
    }
}

/// A compact JWS split and decoded, borrowing from the token.
struct Compact<'a> {
    header: Map<String, Value>,
    payload: Map<String, Value>,
    payload_b64: &'a str,
    /// `header.payload`, as signed.
    signing_input: &'a str,
    signature: &'a str,
}

fn parse_compact(token: &str) -> Result<Compact<'_>, AuthError> {
    let mut parts = token.splitn(6, '.');
    let segments: [Option<&str>; 4] = [parts.next(), parts.next(), parts.next(), parts.next()];
    let (header_b64, payload_b64, signature) = match segments {
        [Some(h), Some(p), Some(s), None] => (h, p, s),
        _ if token.split('.').count() == 5 => {
            return Err(malformed("encrypted tokens (JWE) are not accepted"))
        }
        _ => return Err(malformed("a token has three dot-separated segments")),
    };
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    let header = decode_object(header_b64, "header")?;
    let payload = decode_object(payload_b64, "payload")?;
    if URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(malformed("the signature is not base64url without padding"));
    }
    Ok(Compact {
        header,
        payload,
        payload_b64,
        signing_input,
        signature,
    })
}

/// base64url (no padding, strict) of a JSON object without duplicate keys.
fn decode_object(segment: &str, what: &str) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        AuthError::MalformedToken(format!("the {what} is not base64url without padding"))
    })?;
    match serde_json::from_slice::<StrictValue>(&bytes) {
        Ok(StrictValue(Value::Object(map))) => Ok(map),
        Ok(_) => Err(AuthError::MalformedToken(format!(
            "the {what} is not a JSON object"
        ))),
        Err(e) if e.is_data() => Err(AuthError::MalformedToken(format!("the {what}: {e}"))),
        Err(_) => Err(AuthError::MalformedToken(format!(
            "the {what} is not valid JSON"
        ))),
    }
}

/// The header members portcullis acts on.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

impl Header {
    fn read(h: &Map<String, Value>) -> Result<Header, AuthError> {
        let alg = match h.get("alg") {
            Some(Value::String(a)) => a,
            Some(_) => return Err(malformed("the alg header is not a string")),
            None => return Err(malformed("the token has no alg header")),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::AlgorithmNotAllowed(
                "unsigned tokens (alg none) are never accepted".into(),
            ));
        }
        if h.contains_key("crit") {
            return Err(malformed("tokens with a crit header are not accepted"));
        }
        match h.get("cty") {
            None => {}
            Some(Value::String(c)) if c.eq_ignore_ascii_case("JWT") => {
                return Err(malformed("nested tokens (cty JWT) are not accepted"))
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(malformed("the cty header is not a string")),
        }
        let kid = match h.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(malformed("the kid header is not a string")),
        };
        // jku, x5u, x5c and jwk are deliberately ignored: keys come from configuration only.
        let Some(alg) = parse_algorithm(alg) else {
            return Err(AuthError::AlgorithmNotAllowed(format!(
                "{alg:?} is not a supported algorithm"
            )));
        };
        Ok(Header { alg, kid })
    }
}

/// The payload claims portcullis acts on, with their JSON types checked.
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    aud: Option<Vec<String>>,
    jti: Option<String>,
    permissions: Vec<String>,
}

impl Claims {
    fn read(p: &Map<String, Value>, permissions_claim: &str) -> Result<Claims, AuthError> {
        let sub = match p.get("sub") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(malformed("the sub claim is not a string")),
        };
        let aud = match p.get("aud") {
            None => None,
            Some(Value::String(a)) => Some(vec![a.clone()]),
            Some(Value::Array(items)) => Some(
                strings(items)
                    .ok_or_else(|| malformed("the aud claim is not a string or strings"))?,
            ),
            Some(_) => return Err(malformed("the aud claim is not a string or strings")),
        };
        let permissions = match p.get(permissions_claim) {
            None => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => strings(items).ok_or_else(|| {
                AuthError::MalformedToken(format!(
                    "the {permissions_claim} claim is not a string or strings"
                ))
            })?,
            Some(_) => {
                return Err(AuthError::MalformedToken(format!(
                    "the {permissions_claim} claim is not a string or strings"
                )))
            }
        };
        Ok(Claims {
            sub,
            exp: time_claim(p, "exp")?,
            nbf: time_claim(p, "nbf")?,
            iat: time_claim(p, "iat")?,
            aud,
            jti: p.get("jti").and_then(Value::as_str).map(str::to_owned),
            permissions,
        })
    }
}

fn strings(items: &[Value]) -> Option<Vec<String>> {
    items
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// A NumericDate claim, which must be a JSON integer that fits i64 (not a string, a float,
/// `1e10` or a huge number).
fn time_claim(p: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
    match p.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(_) => Err(AuthError::MalformedToken(format!(
            "the {name} claim is not an integer number of seconds"
        ))),
    }
}

/// A JSON value read with one rule more than `serde_json::Value`: an object with the same key
/// twice, at any depth, is an error (parsers disagree on which copy wins).
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // NaN and infinities cannot come out of JSON text; `from_f64` maps them to null anyway.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}
