//! The `jwt` check: verifies a compact JWS bearer token against the configured issuers.
//!
//! The proxy calls [`JwtVerifier::verify`] after the mTLS and signature checks and before the
//! revocation and permission checks; what it returns becomes `x-auth-subject`, `x-auth-issuer`,
//! `x-auth-permissions` and `x-auth-claims`. The token is decoded exactly once, with a JSON
//! reader that refuses duplicate keys, so the proxy and the upstream can never read a claim
//! differently (the reader, in `jwt/json.rs`, keeps only the members the checks read). The
//! rules of DESIGN.md's "JWT rules that are never configurable" are applied in this order:
//! size, shape and JSON types first (cheap and reveal nothing), then the signature, then the
//! claims whose outcome depends on time or audience. A token that passed is kept in a cache
//! keyed by its SHA-256 until its `exp`, so a client reusing a token pays for the signature
//! once; the entry goes as soon as the key that verified it leaves the issuer's JWKS, and is
//! not used while that JWKS is older than `jwks_max_stale`.

mod json;

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64_simd::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use sha2::{Digest, Sha256};

use self::json::{Key, Member, Members, Place};
use crate::auth::AuthError;
use crate::config::{IssuerConfig, JwtConfig};
use crate::keys::{parse_algorithm, KeyKind, KeyStore, VerificationKey};
use crate::metrics::{CacheCounters, Metrics};

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `iss`, shared with the issuer's configuration.
    pub issuer: Arc<str>,
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
    /// `jti`, when present (for revocation); a `jti` that is not a string is malformed.
    pub token_id: Option<String>,
    /// `cnf.x5t#S256` (RFC 8705): the token is bound to the client certificate with this
    /// thumbprint (base64url of the DER's SHA-256).
    pub cnf_x5t_s256: Option<String>,
    /// The key that verified the signature. A reload of the issuer's JWKS keeps a key that is
    /// still there as the same `Arc`, so this is dead once the key has been removed (rotated
    /// out, or withdrawn because it leaked), and a cached token signed with it must not pass.
    verified_by: Weak<VerificationKey>,
    /// Whether that key came from the issuer's JWKS (not a configured secret): then a cache hit
    /// also needs the JWKS to be within `jwks_max_stale`.
    from_jwks: bool,
}

/// Verifies bearer tokens against the configured issuers.
pub struct JwtVerifier {
    keys: Arc<KeyStore>,
    issuers: Vec<IssuerRules>,
    /// Every issuer's `permissions_claim` that is not a registered claim: their values are
    /// kept while the payload is read, before its `iss` (which may come last) is known.
    permissions_claims: Vec<String>,
    leeway: i64,
    cache: Option<VerifiedCache>,
}

/// Tokens that passed, by the SHA-256 of the token, with the lookups counted.
struct VerifiedCache {
    tokens: moka::sync::Cache<[u8; 32], Arc<VerifiedToken>>,
    lookups: CacheCounters,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.len())
            .field("leeway", &self.leeway)
            .field(
                "cache",
                &self.cache.as_ref().map(|c| c.tokens.entry_count()),
            )
            .finish_non_exhaustive()
    }
}

/// What one issuer's tokens must satisfy, taken from its configuration.
#[derive(Debug)]
struct IssuerRules {
    issuer: Arc<str>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    permissions_claim: String,
    required_claims: Vec<String>,
    max_lifetime: i64,
}

impl IssuerRules {
    fn new(c: &IssuerConfig) -> Self {
        Self {
            issuer: Arc::from(c.issuer.as_str()),
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
            .map(secs)
            .unwrap_or(0);
        let left = token.exp.saturating_add(self.leeway).saturating_sub(now);
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

impl JwtVerifier {
    /// Builds the verifier. `keys` must have been loaded from the same configuration. With the
    /// verified-token cache on, its lookups are counted in `metrics`.
    pub fn new(config: &JwtConfig, keys: Arc<KeyStore>, metrics: &Metrics) -> Self {
        let leeway = secs(config.leeway);
        let cache = (config.verified_cache > 0).then(|| VerifiedCache {
            tokens: moka::sync::Cache::builder()
                .max_capacity(config.verified_cache)
                .expire_after(ExpireAtExp { leeway })
                .build(),
            lookups: metrics.verified_cache_counters(),
        });
        let mut permissions_claims: Vec<String> = Vec::new();
        for issuer in &config.issuers {
            let name = &issuer.permissions_claim;
            if registered_slot(name).is_none() && !permissions_claims.contains(name) {
                permissions_claims.push(name.clone());
            }
        }
        Self {
            keys,
            issuers: config.issuers.iter().map(IssuerRules::new).collect(),
            permissions_claims,
            leeway,
            cache,
        }
    }

    /// Verifies `token` at time `now` (Unix seconds).
    ///
    /// Errors, each a stable code of DESIGN.md:
    /// - [`AuthError::MalformedToken`]: over 8 KiB, not three base64url segments (five: JWE),
    ///   header or payload not a JSON object, a duplicate JSON key, `crit`, `cty: JWT` (or
    ///   `application/jwt`), a claim of the wrong JSON type (`exp`/`nbf`/`iat` not an integer,
    ///   `sub` not a string, `aud` not a string or strings, permissions not a string or
    ///   strings), a permission that `x-auth-permissions` could not carry as itself (empty, a
    ///   comma or control character, white space at an end).
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
            if let Some(hit) = cache.tokens.get(key) {
                if hit.verified_by.strong_count() > 0
                    && (!hit.from_jwks || self.keys.jwks_usable(&hit.issuer))
                {
                    cache.lookups.hit.inc();
                    self.check_times(hit.exp, hit.not_before, hit.issued_at, now)?;
                    return Ok(hit);
                }
                // Its key has left the JWKS, or the JWKS is older than `jwks_max_stale`: verify
                // again, against the keys held now (none, in the second case: keys_unavailable).
                cache.tokens.invalidate(key);
            }
            cache.lookups.miss.inc();
        }
        let verified = Arc::new(self.verify_uncached(token, now).await?);
        if let (Some(cache), Some(key)) = (&self.cache, cache_key) {
            cache.tokens.insert(key, verified.clone());
        }
        Ok(verified)
    }

    async fn verify_uncached(&self, token: &str, now: i64) -> Result<VerifiedToken, AuthError> {
        let mut decoded = Vec::new();
        let token = self.read_unverified(token, &mut decoded)?;
        let keys = self
            .keys
            .keys_for(&token.issuer.issuer, token.kid.as_deref(), token.alg)
            .await?;
        let Some(verified_by) = keys.iter().find(|k| {
            k.verify(
                token.signing_input.as_bytes(),
                token.signature_b64,
                token.signature,
                token.alg,
            )
        }) else {
            return Err(AuthError::InvalidTokenSignature);
        };
        let from_jwks = verified_by.kind != KeyKind::Hmac;
        let verified_by = Arc::downgrade(verified_by);

        // Only a token signed by the issuer gets to learn which of its claims fail.
        let issuer = token.issuer;
        let Some(exp) = token.exp else {
            return Err(AuthError::MissingClaim("the token has no exp claim".into()));
        };
        if let Some(name) = token.missing_claim {
            return Err(AuthError::MissingClaim(format!(
                "the token has no {name} claim"
            )));
        }
        self.check_times(exp, token.nbf, token.iat, now)?;
        let lifetime = exp.saturating_sub(token.iat.unwrap_or(now));
        if lifetime > issuer.max_lifetime {
            return Err(AuthError::TokenLifetimeExceeded(format!(
                "the token is valid for {lifetime}s; at most {}s is accepted",
                issuer.max_lifetime
            )));
        }
        match token.audience {
            Audience::Accepted => {}
            Audience::Missing => {
                return Err(AuthError::InvalidAudience(
                    "the token has no aud claim".into(),
                ))
            }
            Audience::Other => {
                return Err(AuthError::InvalidAudience(
                    "the token is not meant for this service (aud)".into(),
                ))
            }
            Audience::Unexpected => return Err(AuthError::InvalidAudience(
                "the token names an audience (aud), and this issuer has no audiences configured"
                    .into(),
            )),
        }
        let permissions_header = token.permissions.join(",");
        Ok(VerifiedToken {
            issuer: issuer.issuer.clone(),
            subject: token.subject,
            permissions: token.permissions,
            permissions_header,
            payload_b64: token.payload_b64.to_owned(),
            exp,
            not_before: token.nbf,
            issued_at: token.iat,
            token_id: token.token_id,
            cnf_x5t_s256: token.cnf_x5t_s256,
            verified_by,
            from_jwks,
        })
    }

    /// Everything checked before the signature: the shape, the header, the issuer and the
    /// claims' JSON types. Also works out, without reporting them yet, the outcomes of the
    /// checks that only a signed token may learn, so that nothing borrowed from the JSON has
    /// to be kept while the keys are looked up.
    fn read_unverified<'a>(
        &'a self,
        token: &'a str,
        decoded: &'a mut Vec<u8>,
    ) -> Result<Unverified<'a>, AuthError> {
        let parsed = parse_compact(token, decoded, &self.permissions_claims)?;
        let mut header = parsed.header;
        let Header { alg, kid } = Header::read(&mut header)?;
        let payload = &parsed.payload;
        let issuer = self.issuer_of(payload)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!(
                "{alg:?} is not accepted for this issuer"
            )));
        }
        let claims = Claims::read(payload, &issuer.permissions_claim)?;
        let audience = if issuer.audiences.is_empty() {
            // RFC 7519 section 4.1.3: a token that names its audience is refused by any
            // service that is not in it, and one without `audiences` is in none.
            match claims.aud {
                None => Audience::Accepted,
                Some(_) => Audience::Unexpected,
            }
        } else {
            let meant_for_us = |aud: &str| issuer.audiences.iter().any(|a| a == aud);
            match claims.aud {
                None => Audience::Missing,
                Some(Strings::One(aud)) if meant_for_us(aud) => Audience::Accepted,
                Some(Strings::Many(auds)) if auds.iter().any(|a| meant_for_us(a)) => {
                    Audience::Accepted
                }
                Some(_) => Audience::Other,
            }
        };
        let permissions: Vec<String> = match claims.permissions {
            None => Vec::new(),
            // RFC 6749 section 3.3: scope tokens are separated by spaces (U+0020) only.
            Some(Strings::One(words)) => words
                .split(' ')
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(Strings::Many(items)) => items.iter().map(|p| String::from(&**p)).collect(),
        };
        // `x-auth-permissions` joins them with commas, and an upstream reads it as a list,
        // trimming spaces and tabs around each item (RFC 9110 section 5.6.1): a permission
        // holding a comma, empty, or with white space at an end would reach it as another
        // than the one the proxy checked.
        if let Some(bad) = permissions.iter().find(|p| !is_list_safe(p)) {
            return Err(AuthError::MalformedToken(format!(
                "the {} claim holds {bad:?}; a permission must not be empty, hold a comma or a control character, or start or end with white space",
                issuer.permissions_claim
            )));
        }
        Ok(Unverified {
            issuer,
            alg,
            kid,
            signing_input: parsed.signing_input,
            signature_b64: parsed.signature_b64,
            signature: parsed.signature,
            payload_b64: parsed.payload_b64,
            exp: claims.exp,
            nbf: claims.nbf,
            iat: claims.iat,
            missing_claim: issuer
                .required_claims
                .iter()
                .find(|name| !payload.contains(name))
                .map(String::as_str),
            audience,
            subject: claims.sub.map(str::to_owned),
            permissions,
            token_id: claims.jti.map(str::to_owned),
            cnf_x5t_s256: claims.cnf_x5t_s256.map(str::to_owned),
        })
    }

    /// The rules of the issuer named by `iss`, which must be a string equal to a configured
    /// issuer (never an array, never a substring).
    fn issuer_of(&self, payload: &Payload<'_>) -> Result<&IssuerRules, AuthError> {
        let iss = match payload.claim("iss") {
            Some(Member::Str(s)) => s,
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
            .find(|i| *i.issuer == **iss)
            .ok_or_else(|| AuthError::InvalidIssuer("the token's issuer is not accepted".into()))
    }

    fn check_times(
        &self,
        exp: i64,
        nbf: Option<i64>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<(), AuthError> {
        // RFC 7519 section 4.1.4: the current time must be before `exp` (plus the leeway).
        if exp.saturating_add(self.leeway) <= now {
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

/// A compact JWS split and read, borrowing from the token and from its decoded header and
/// payload.
struct Compact<'t, 'd> {
    header: HeaderMembers<'d>,
    payload: Payload<'d>,
    payload_b64: &'t str,
    /// `header.payload`, as signed.
    signing_input: &'t str,
    /// The signature segment as sent, and decoded.
    signature_b64: &'t str,
    signature: &'d [u8],
}

/// Splits `token` and reads its header and payload, decoding both into `decoded`.
/// `permissions_claims`: the payload members to keep besides the registered claims.
fn parse_compact<'t, 'd>(
    token: &'t str,
    decoded: &'d mut Vec<u8>,
    permissions_claims: &[String],
) -> Result<Compact<'t, 'd>, AuthError> {
    // The dots are found with SIMD (`memchr`) and the segments decoded with SIMD
    // (`base64-simd`, strict: no padding, no other alphabet, no stray trailing bits): byte
    // by byte, they were the largest piece of a JWT route's own work besides the signature.
    let mut dots = memchr::memchr_iter(b'.', token.as_bytes());
    let (header_b64, payload_b64, signature) = match (dots.next(), dots.next(), dots.next()) {
        (Some(first), Some(second), None) => (
            &token[..first],
            &token[first + 1..second],
            &token[second + 1..],
        ),
        (Some(_), Some(_), Some(_)) if dots.count() == 1 => {
            return Err(malformed("encrypted tokens (JWE) are not accepted"))
        }
        _ => return Err(malformed("a token has three dot-separated segments")),
    };
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];

    // The three segments go into one buffer, so that the members and the signature can
    // borrow from it; the errors still come in the order header (base64, JSON), payload
    // (base64, JSON), signature.
    decoded.clear();
    decoded.reserve(
        URL_SAFE_NO_PAD.estimated_decoded_length(header_b64.len())
            + URL_SAFE_NO_PAD.estimated_decoded_length(payload_b64.len())
            + URL_SAFE_NO_PAD.estimated_decoded_length(signature.len()),
    );
    URL_SAFE_NO_PAD
        .decode_append(header_b64, decoded)
        .map_err(|_| malformed("the header is not base64url without padding"))?;
    let header_len = decoded.len();
    let payload_decoded = URL_SAFE_NO_PAD.decode_append(payload_b64, decoded);
    let payload_end = decoded.len();
    // 1,400 characters hold an RSA-8192 signature; anything longer is not one.
    let signature_decoded =
        signature.len() <= 1400 && URL_SAFE_NO_PAD.decode_append(signature, decoded).is_ok();
    let decoded: &'d Vec<u8> = decoded;
    let (header_json, rest) = decoded.split_at(header_len);
    let (payload_json, signature_bytes) = rest.split_at(payload_end - header_len);

    let mut keys = Vec::with_capacity(16);
    let mut header = HeaderMembers::default();
    read_object(header_json, &mut keys, &mut header, "header")?;
    payload_decoded.map_err(|_| malformed("the payload is not base64url without padding"))?;
    keys.clear();
    let mut members = PayloadMembers {
        registered: Default::default(),
        permissions_claims,
    };
    read_object(payload_json, &mut keys, &mut members, "payload")?;
    let payload = Payload {
        registered: members.registered,
        keys,
    };

    if !signature_decoded {
        return Err(malformed("the signature is not base64url without padding"));
    }
    Ok(Compact {
        header,
        payload,
        payload_b64,
        signing_input,
        signature_b64: signature,
        signature: signature_bytes,
    })
}

/// A JSON object without duplicate keys, its members placed by `members`; `what` names the
/// segment in errors.
fn read_object<'d, M: Members<'d>>(
    json: &'d [u8],
    keys: &mut Vec<Key<'d>>,
    members: &mut M,
    what: &str,
) -> Result<(), AuthError> {
    match json::read_object(json, keys, members) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AuthError::MalformedToken(format!(
            "the {what} is not a JSON object"
        ))),
        Err(e) if e.is_data() => Err(AuthError::MalformedToken(format!("the {what}: {e}"))),
        Err(_) => Err(AuthError::MalformedToken(format!(
            "the {what} is not valid JSON"
        ))),
    }
}

/// The header members the checks read; the rest are checked for duplicate keys and dropped.
#[derive(Default)]
struct HeaderMembers<'d> {
    alg: Option<Member<'d>>,
    kid: Option<Member<'d>>,
    crit: Option<Member<'d>>,
    cty: Option<Member<'d>>,
}

impl<'d> Members<'d> for HeaderMembers<'d> {
    fn place(&mut self, key: &str) -> Place<'_, 'd> {
        match key {
            "alg" => Place::Slot(&mut self.alg),
            "kid" => Place::Slot(&mut self.kid),
            "crit" => Place::Slot(&mut self.crit),
            "cty" => Place::Slot(&mut self.cty),
            _ => Place::Skip,
        }
    }
}

/// How many registered claims the checks read; see [`registered_slot`].
const REGISTERED: usize = 8;

/// The slot of a registered claim the checks read (a `match` rather than a search of a list:
/// it runs for every payload member).
fn registered_slot(name: &str) -> Option<usize> {
    match name {
        "iss" => Some(0),
        "sub" => Some(1),
        "aud" => Some(2),
        "exp" => Some(3),
        "nbf" => Some(4),
        "iat" => Some(5),
        "jti" => Some(6),
        "cnf" => Some(7),
        _ => None,
    }
}

/// Places payload members while the payload is read: registered claims into their slots, the
/// members named by a `permissions_claim` into their keys, the rest nowhere.
struct PayloadMembers<'d, 'c> {
    registered: [Option<Member<'d>>; REGISTERED],
    permissions_claims: &'c [String],
}

impl<'d> Members<'d> for PayloadMembers<'d, '_> {
    fn place(&mut self, key: &str) -> Place<'_, 'd> {
        if let Some(i) = registered_slot(key) {
            Place::Slot(&mut self.registered[i])
        } else if self.permissions_claims.iter().any(|p| p == key) {
            Place::Key
        } else {
            Place::Skip
        }
    }
}

/// The payload as read: registered claims in slots, and every top-level key (with the value
/// of those named by a `permissions_claim`).
struct Payload<'d> {
    registered: [Option<Member<'d>>; REGISTERED],
    keys: Vec<Key<'d>>,
}

impl<'d> Payload<'d> {
    /// The claim `name`, if the token has it and it was kept: registered claims and every
    /// issuer's `permissions_claim` are.
    fn claim(&self, name: &str) -> Option<&Member<'d>> {
        match registered_slot(name) {
            Some(i) => self.registered[i].as_ref(),
            None => self
                .keys
                .iter()
                .find(|k| k.name == name)
                .and_then(|k| k.value.as_ref()),
        }
    }

    /// Whether the token has the claim `name` (of any type, kept or not).
    fn contains(&self, name: &str) -> bool {
        match registered_slot(name) {
            Some(i) => self.registered[i].is_some(),
            None => self.keys.iter().any(|k| k.name == name),
        }
    }
}

/// The header members portcullis acts on.
struct Header<'d> {
    alg: Algorithm,
    /// Moved out of the header's members, so that only it is kept during the key look-up.
    kid: Option<Cow<'d, str>>,
}

impl<'d> Header<'d> {
    fn read(h: &mut HeaderMembers<'d>) -> Result<Header<'d>, AuthError> {
        let alg = match &h.alg {
            Some(Member::Str(a)) => a,
            Some(_) => return Err(malformed("the alg header is not a string")),
            None => return Err(malformed("the token has no alg header")),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::AlgorithmNotAllowed(
                "unsigned tokens (alg none) are never accepted".into(),
            ));
        }
        if h.crit.is_some() {
            return Err(malformed("tokens with a crit header are not accepted"));
        }
        match &h.cty {
            None => {}
            // RFC 7515 section 4.1.10: `JWT` is `application/jwt` with the prefix left out.
            Some(Member::Str(c)) if is_jwt_media_type(c) => {
                return Err(malformed("nested tokens (cty JWT) are not accepted"))
            }
            Some(Member::Str(_)) => {}
            Some(_) => return Err(malformed("the cty header is not a string")),
        }
        let kid = match h.kid.take() {
            None => None,
            Some(Member::Str(k)) => Some(k),
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

/// A token read and checked up to its signature, holding only what the checks after it need.
struct Unverified<'a> {
    issuer: &'a IssuerRules,
    alg: Algorithm,
    kid: Option<Cow<'a, str>>,
    /// `header.payload`, as signed.
    signing_input: &'a str,
    /// The signature segment as sent, and decoded.
    signature_b64: &'a str,
    signature: &'a [u8],
    payload_b64: &'a str,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    /// The first of the issuer's `required_claims` the token lacks.
    missing_claim: Option<&'a str>,
    audience: Audience,
    subject: Option<String>,
    permissions: Vec<String>,
    token_id: Option<String>,
    cnf_x5t_s256: Option<String>,
}

/// The outcome of the `aud` check, reported only once the signature verified.
enum Audience {
    /// `aud` names this service, or the issuer has no `audiences` and the token no `aud`.
    Accepted,
    Missing,
    Other,
    /// The token names an audience, and the issuer has no `audiences`.
    Unexpected,
}

/// A claim that is a string or an array of strings, as sent.
#[derive(Clone, Copy)]
enum Strings<'a> {
    One(&'a str),
    Many(&'a [Cow<'a, str>]),
}

impl<'a> Strings<'a> {
    fn of(member: &'a Member<'_>) -> Option<Strings<'a>> {
        match member {
            Member::Str(s) => Some(Strings::One(s)),
            Member::Strings(items) => Some(Strings::Many(items)),
            _ => None,
        }
    }
}

/// The payload claims portcullis acts on, with their JSON types checked.
struct Claims<'a> {
    sub: Option<&'a str>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    aud: Option<Strings<'a>>,
    jti: Option<&'a str>,
    /// A string (of space-separated permissions, as OAuth's `scope`) or strings.
    permissions: Option<Strings<'a>>,
    cnf_x5t_s256: Option<&'a str>,
}

impl<'a> Claims<'a> {
    fn read(p: &'a Payload<'_>, permissions_claim: &str) -> Result<Claims<'a>, AuthError> {
        let sub = match p.claim("sub") {
            None => None,
            Some(Member::Str(s)) => Some(&**s),
            Some(_) => return Err(malformed("the sub claim is not a string")),
        };
        let aud = match p.claim("aud") {
            None => None,
            Some(m) => Some(
                Strings::of(m)
                    .ok_or_else(|| malformed("the aud claim is not a string or strings"))?,
            ),
        };
        let permissions = match p.claim(permissions_claim) {
            None => None,
            Some(m) => Some(Strings::of(m).ok_or_else(|| {
                AuthError::MalformedToken(format!(
                    "the {permissions_claim} claim is not a string or strings"
                ))
            })?),
        };
        // A confirmation the proxy cannot check must not be ignored: `cnf` with members other
        // than x5t#S256 (a jkt, a jwk) is refused rather than passed as an unbound token.
        let cnf_x5t_s256 = match p.claim("cnf") {
            None => None,
            Some(Member::Thumbprint(t)) => Some(&**t),
            Some(Member::Object) => {
                return Err(malformed(
                    "the cnf claim holds a confirmation other than x5t#S256",
                ))
            }
            Some(_) => return Err(malformed("the cnf claim is not an object")),
        };
        Ok(Claims {
            cnf_x5t_s256,
            sub,
            exp: time_claim(p, "exp")?,
            nbf: time_claim(p, "nbf")?,
            iat: time_claim(p, "iat")?,
            aud,
            // RFC 7519 section 4.1.7: a string. A number could not be revoked by jti (the
            // admin API takes strings), so it is refused rather than read as no jti.
            jti: match p.claim("jti") {
                None => None,
                Some(Member::Str(s)) => Some(s),
                Some(_) => return Err(malformed("the jti claim is not a string")),
            },
            permissions,
        })
    }
}

/// A NumericDate claim, which must be a JSON integer that fits i64 (not a string, a float,
/// `1e10` or a huge number).
fn time_claim(p: &Payload<'_>, name: &str) -> Result<Option<i64>, AuthError> {
    match p.claim(name) {
        None => Ok(None),
        Some(Member::Int(n)) => Ok(Some(*n)),
        Some(_) => Err(AuthError::MalformedToken(format!(
            "the {name} claim is not an integer number of seconds"
        ))),
    }
}

/// Whether a permission reads the same as an item of the comma-separated `x-auth-permissions`.
fn is_list_safe(permission: &str) -> bool {
    let edge = |c: char| c == ' ' || c == '\t';
    !permission.is_empty()
        && !permission.starts_with(edge)
        && !permission.ends_with(edge)
        && !permission.contains(|c: char| c == ',' || c.is_control())
}

/// `JWT` or `application/jwt`, in any case of letters, with or without media type parameters
/// (`application/jwt; charset=utf-8`) and the whitespace around them: a nested token's `cty`.
fn is_jwt_media_type(cty: &str) -> bool {
    let essence = cty.split(';').next().unwrap_or(cty);
    let cty = essence.trim_matches([' ', '\t']);
    let subtype = match cty.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &cty[12..],
        _ => cty,
    };
    subtype.eq_ignore_ascii_case("JWT")
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};

    use super::*;
    use crate::config::IssuerConfig;
    use crate::keys::testing::*;
    use crate::metrics::Metrics;

    const NOW: i64 = 1_800_000_000;

    struct Keys {
        rs256: TestKey,
        ps256: TestKey,
        es256: TestKey,
        es384: TestKey,
        eddsa: TestKey,
        hs256: TestKey,
    }

    static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
        rs256: TestKey::rs256(),
        ps256: TestKey::ps256(),
        es256: TestKey::es256(),
        es384: TestKey::es384(),
        eddsa: TestKey::eddsa(),
        hs256: TestKey::hs256(b"0123456789abcdef0123456789abcdef-hs256"),
    });

    /// A verifier for [`ISSUER`] holding every key of [`KEYS`]; `tweak` adjusts the issuer.
    async fn verifier_with(
        cache: u64,
        tweak: impl FnOnce(&mut IssuerConfig),
    ) -> (JwtVerifier, tempfile::TempDir) {
        let (v, _, dir) = verifier_counted(cache, tweak).await;
        (v, dir)
    }

    /// [`verifier_with`], and the metrics its cache counts in.
    async fn verifier_counted(
        cache: u64,
        tweak: impl FnOnce(&mut IssuerConfig),
    ) -> (JwtVerifier, Metrics, tempfile::TempDir) {
        let k = &*KEYS;
        let body = jwks(&[&k.rs256, &k.ps256, &k.es256, &k.es384, &k.eddsa]).to_string();
        let (dir, source) = jwks_file(&body);
        let mut issuer = issuer(source, &[&k.hs256]);
        tweak(&mut issuer);
        let config = jwt_config(vec![issuer], cache);
        let store = KeyStore::load(&config, Arc::new(Metrics::new())).await;
        let metrics = Metrics::new();
        (JwtVerifier::new(&config, store, &metrics), metrics, dir)
    }

    async fn verifier() -> (JwtVerifier, tempfile::TempDir) {
        verifier_with(0, |_| {}).await
    }

    fn claims() -> Value {
        json!({"iss": ISSUER, "sub": "user-1", "iat": NOW - 10, "exp": NOW + 600,
               "permissions": ["read:data", "write:data"]})
    }

    fn with(mut claims: Value, name: &str, value: Value) -> Value {
        claims[name] = value;
        claims
    }

    fn without(mut claims: Value, name: &str) -> Value {
        claims.as_object_mut().unwrap().remove(name);
        claims
    }

    async fn check(token: &str) -> Result<Arc<VerifiedToken>, AuthError> {
        let (v, _dir) = verifier().await;
        v.verify(token, NOW).await
    }

    macro_rules! assert_err {
        ($result:expr, $variant:ident) => {
            match $result {
                Err(AuthError::$variant(..)) => {}
                other => panic!("expected {}, got {other:?}", stringify!($variant)),
            }
        };
    }

    #[tokio::test]
    async fn valid_token_yields_identity() {
        let token = KEYS.rs256.sign(&claims());
        let v = check(&token).await.unwrap();
        assert_eq!(&*v.issuer, ISSUER);
        assert_eq!(v.subject.as_deref(), Some("user-1"));
        assert_eq!(v.permissions, ["read:data", "write:data"]);
        assert_eq!(v.permissions_header, "read:data,write:data");
        assert_eq!(v.payload_b64, token.split('.').nth(1).unwrap());
        assert_eq!(v.exp, NOW + 600);
    }

    #[tokio::test]
    async fn every_supported_algorithm_verifies() {
        let k = &*KEYS;
        let (v, _dir) = verifier().await;
        for key in [&k.rs256, &k.ps256, &k.es256, &k.es384, &k.eddsa, &k.hs256] {
            let result = v.verify(&key.sign(&claims()), NOW).await;
            assert!(result.is_ok(), "{:?}: {result:?}", key.alg());
        }
    }

    #[tokio::test]
    async fn alg_none_in_any_case_is_rejected() {
        let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg}).to_string());
            assert_err!(
                check(&format!("{header}.{payload}.")).await,
                AlgorithmNotAllowed
            );
            let signed = KEYS
                .hs256
                .sign_with_header(&json!({"alg": alg, "kid": KEYS.hs256.kid()}), &claims());
            assert_err!(check(&signed).await, AlgorithmNotAllowed);
        }
    }

    #[tokio::test]
    async fn alg_outside_the_issuers_list_is_rejected() {
        let (v, _dir) = verifier_with(0, |i| i.algorithms = vec![Algorithm::ES256]).await;
        assert_err!(
            v.verify(&KEYS.rs256.sign(&claims()), NOW).await,
            AlgorithmNotAllowed
        );
    }

    #[tokio::test]
    async fn unknown_alg_name_is_rejected() {
        let header = json!({"alg": "rs256", "kid": KEYS.rs256.kid()});
        assert_err!(
            check(&KEYS.rs256.sign_with_header(&header, &claims())).await,
            AlgorithmNotAllowed
        );
    }

    #[tokio::test]
    async fn a_jti_that_is_not_a_string_is_malformed() {
        // A numeric jti could never be revoked by jti: the admin API takes strings.
        for jti in [json!(12345), json!(["a"]), json!(null)] {
            let token = KEYS.rs256.sign(&with(claims(), "jti", jti.clone()));
            match check(&token).await {
                Err(AuthError::MalformedToken(why)) => {
                    assert_eq!(why, "the jti claim is not a string", "{jti}");
                }
                other => panic!("{jti}: expected MalformedToken, got {other:?}"),
            }
        }
        let token = KEYS.rs256.sign(&with(claims(), "jti", json!("12345")));
        assert_eq!(
            check(&token).await.unwrap().token_id.as_deref(),
            Some("12345")
        );
        let token = KEYS.rs256.sign(&claims());
        assert_eq!(check(&token).await.unwrap().token_id, None);
    }

    #[tokio::test]
    async fn duplicate_claim_is_malformed() {
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid()}).to_string();
        let payload = format!(
            r#"{{"iss":"{ISSUER}","sub":"user-1","sub":"admin","iat":{},"exp":{}}}"#,
            NOW - 10,
            NOW + 600
        );
        assert_err!(
            check(&sign_raw(&header, &payload, &KEYS.es256)).await,
            MalformedToken
        );
    }

    #[tokio::test]
    async fn duplicate_key_at_any_depth_is_malformed() {
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid()}).to_string();
        let payload = format!(
            r#"{{"iss":"{ISSUER}","sub":"u","iat":{},"exp":{},"ctx":[{{"a":1,"\u0061":2}}]}}"#,
            NOW - 10,
            NOW + 600
        );
        assert_err!(
            check(&sign_raw(&header, &payload, &KEYS.es256)).await,
            MalformedToken
        );
    }

    #[tokio::test]
    async fn duplicate_header_key_is_malformed() {
        let header = format!(
            r#"{{"alg":"ES256","alg":"HS256","kid":"{}"}}"#,
            KEYS.es256.kid()
        );
        assert_err!(
            check(&sign_raw(&header, &claims().to_string(), &KEYS.es256)).await,
            MalformedToken
        );
    }

    #[tokio::test]
    async fn embedded_jwk_header_is_never_used() {
        let attacker = TestKey::es256();
        // The attacker's own key, embedded, under its own kid: not a configured key.
        let header = json!({"alg": "ES256", "kid": attacker.kid(), "jwk": attacker.jwk()});
        assert_err!(
            check(&attacker.sign_with_header(&header, &claims())).await,
            UnknownKey
        );
        // Under a configured kid: the configured key is used, so the signature fails.
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid(), "jwk": attacker.jwk()});
        assert_eq!(
            check(&attacker.sign_with_header(&header, &claims()))
                .await
                .err(),
            Some(AuthError::InvalidTokenSignature)
        );
    }

    #[tokio::test]
    async fn jku_x5u_and_x5c_headers_are_never_followed() {
        let attacker = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&attacker])).await;
        let header = json!({"alg": "ES256", "jku": server.url, "x5u": server.url,
                            "x5c": ["MIIB"], "kid": attacker.kid()});
        assert_err!(
            check(&attacker.sign_with_header(&header, &claims())).await,
            UnknownKey
        );
        let header = json!({"alg": "ES256", "jku": server.url});
        assert_eq!(
            check(&attacker.sign_with_header(&header, &claims()))
                .await
                .err(),
            Some(AuthError::InvalidTokenSignature)
        );
        assert_eq!(server.fetches(), 0);
    }

    #[tokio::test]
    async fn rsa_public_key_is_never_an_hmac_secret() {
        // The classic confusion: HS256 "signed" with the RSA public key as the secret.
        let forger = TestKey::hs256(&KEYS.rs256.public_key_bytes());
        let header = json!({"alg": "HS256", "kid": KEYS.rs256.kid()});
        assert_err!(
            check(&forger.sign_with_header(&header, &claims())).await,
            AlgorithmNotAllowed
        );
        // Without a kid only the configured HMAC secrets are tried.
        let header = json!({"alg": "HS256"});
        assert_eq!(
            check(&forger.sign_with_header(&header, &claims()))
                .await
                .err(),
            Some(AuthError::InvalidTokenSignature)
        );
    }

    #[tokio::test]
    async fn kid_of_another_key_type_is_not_allowed() {
        let header = json!({"alg": "ES256", "kid": KEYS.rs256.kid()});
        assert_err!(
            check(&KEYS.es256.sign_with_header(&header, &claims())).await,
            AlgorithmNotAllowed
        );
    }

    #[tokio::test]
    async fn string_exp_is_malformed() {
        let token = KEYS
            .es256
            .sign(&with(claims(), "exp", json!((NOW + 600).to_string())));
        assert_err!(check(&token).await, MalformedToken);
    }

    #[tokio::test]
    async fn float_and_exponent_and_huge_times_are_malformed() {
        for (name, value) in [
            ("exp", "1800000600.5"),
            ("exp", "1e10"),
            ("exp", "99999999999999999999999"),
            ("exp", "18446744073709551615"),
            ("nbf", "1.0"),
            ("iat", "\"1800000000\""),
            ("exp", "null"),
        ] {
            let mut payload = claims();
            payload[name] = json!("PLACEHOLDER");
            let payload = payload.to_string().replace("\"PLACEHOLDER\"", value);
            let header = json!({"alg": "ES256", "kid": KEYS.es256.kid()}).to_string();
            let result = check(&sign_raw(&header, &payload, &KEYS.es256)).await;
            assert!(
                matches!(result, Err(AuthError::MalformedToken(_))),
                "{name}={value}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn five_segment_jwe_is_rejected() {
        assert_eq!(
            check("eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d").await.err(),
            Some(AuthError::MalformedToken(
                "encrypted tokens (JWE) are not accepted".into()
            ))
        );
    }

    #[tokio::test]
    async fn wrong_segment_counts_are_malformed() {
        let token = KEYS.es256.sign(&claims());
        let two = token.rsplit_once('.').unwrap().0;
        for t in [
            "",
            "abc",
            two,
            &format!("{token}."),
            &format!("{token}.x.y.z"),
        ] {
            assert_err!(check(t).await, MalformedToken);
        }
    }

    #[tokio::test]
    async fn padded_or_non_url_base64_is_malformed() {
        let token = KEYS.es256.sign(&claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1].push('=');
        assert_err!(check(&parts.join(".")).await, MalformedToken);
        let token = KEYS.es256.sign(&claims());
        let std_b64 = token.replace('-', "+").replace('_', "/");
        if std_b64 != token {
            assert_err!(check(&std_b64).await, MalformedToken);
        }
        let token = KEYS.es256.sign(&claims());
        assert_err!(check(&format!("{token}=")).await, MalformedToken);
    }

    #[tokio::test]
    async fn non_object_header_or_payload_is_malformed() {
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid()}).to_string();
        for payload in ["[1]", "\"x\"", "{", "{\"a\":1} x"] {
            assert_err!(
                check(&sign_raw(&header, payload, &KEYS.es256)).await,
                MalformedToken
            );
        }
        assert_err!(
            check(&sign_raw("[]", &claims().to_string(), &KEYS.es256)).await,
            MalformedToken
        );
    }

    #[tokio::test]
    async fn crit_header_is_rejected() {
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid(), "crit": ["exp"]});
        assert_err!(
            check(&KEYS.es256.sign_with_header(&header, &claims())).await,
            MalformedToken
        );
    }

    #[tokio::test]
    async fn nested_cty_jwt_is_rejected() {
        let nested = [
            "JWT",
            "jwt",
            "application/jwt",
            "Application/JWT",
            "application/jwt; charset=utf-8",
            " JWT ;x=y",
            "jwt\t;",
        ];
        for cty in nested {
            let header = json!({"alg": "ES256", "kid": KEYS.es256.kid(), "cty": cty});
            assert_err!(
                check(&KEYS.es256.sign_with_header(&header, &claims())).await,
                MalformedToken
            );
        }
        // Other content types are not nested tokens.
        for cty in ["application/json", "jwt-claims", "application/jwtx; a=jwt"] {
            let header = json!({"alg": "ES256", "kid": KEYS.es256.kid(), "cty": cty});
            let token = KEYS.es256.sign_with_header(&header, &claims());
            assert!(check(&token).await.is_ok(), "{cty}");
        }
    }

    #[tokio::test]
    async fn oversized_token_is_rejected_before_decoding() {
        // Not base64 at all: only the size can be the reason.
        let token = "!".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            check(&token).await.err(),
            Some(AuthError::MalformedToken(
                "the token is larger than 8 KiB".into()
            ))
        );
        let padded = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_BYTES)));
        assert_err!(check(&KEYS.es256.sign(&padded)).await, MalformedToken);
    }

    #[tokio::test]
    async fn iss_array_is_rejected() {
        let token = KEYS.es256.sign(&with(claims(), "iss", json!([ISSUER])));
        assert_err!(check(&token).await, InvalidIssuer);
    }

    #[tokio::test]
    async fn iss_must_equal_a_configured_issuer_exactly() {
        for iss in [
            json!(format!("{ISSUER}/")),
            json!("https://issuer"),
            json!("HTTPS://ISSUER.TEST"),
            json!(42),
            json!(null),
        ] {
            let token = KEYS.es256.sign(&with(claims(), "iss", iss.clone()));
            assert!(
                matches!(check(&token).await, Err(AuthError::InvalidIssuer(_))),
                "{iss}"
            );
        }
        assert_err!(
            check(&KEYS.es256.sign(&without(claims(), "iss"))).await,
            InvalidIssuer
        );
    }

    #[tokio::test]
    async fn non_string_sub_is_malformed() {
        let token = KEYS.es256.sign(&with(claims(), "sub", json!(12)));
        assert_err!(check(&token).await, MalformedToken);
    }

    #[tokio::test]
    async fn missing_exp_is_rejected_even_when_not_listed() {
        let (v, _dir) = verifier_with(0, |i| i.required_claims = Vec::new()).await;
        let token = KEYS.es256.sign(&without(claims(), "exp"));
        assert_err!(v.verify(&token, NOW).await, MissingClaim);
    }

    #[tokio::test]
    async fn missing_required_claim_is_rejected() {
        let token = KEYS.es256.sign(&without(claims(), "sub"));
        assert_err!(check(&token).await, MissingClaim);
    }

    #[tokio::test]
    async fn expired_token_is_rejected_with_its_expiry() {
        let exp = 1_795_514_400; // 2026-11-24T10:00:00Z
        let token = KEYS.es256.sign(&with(
            with(claims(), "exp", json!(exp)),
            "iat",
            json!(exp - 60),
        ));
        assert_eq!(
            check(&token).await.err(),
            Some(AuthError::TokenExpired(
                "token expired at 2026-11-24T10:00:00Z".into()
            ))
        );
    }

    #[tokio::test]
    async fn leeway_accepts_a_token_just_expired() {
        let token = KEYS.es256.sign(&with(claims(), "exp", json!(NOW - 20)));
        assert!(check(&token).await.is_ok());
        let token = KEYS.es256.sign(&with(claims(), "exp", json!(NOW - 31)));
        assert_err!(check(&token).await, TokenExpired);
        // RFC 7519: the time must be before `exp` (here, `exp` plus the 30 s leeway).
        let token = KEYS.es256.sign(&with(claims(), "exp", json!(NOW - 29)));
        assert!(check(&token).await.is_ok());
        let token = KEYS.es256.sign(&with(claims(), "exp", json!(NOW - 30)));
        assert_err!(check(&token).await, TokenExpired);
    }

    #[tokio::test]
    async fn future_nbf_is_not_yet_valid() {
        let token = KEYS.es256.sign(&with(claims(), "nbf", json!(NOW + 60)));
        assert_err!(check(&token).await, TokenNotYetValid);
        let token = KEYS.es256.sign(&with(claims(), "nbf", json!(NOW + 20)));
        assert!(check(&token).await.is_ok(), "within leeway");
    }

    #[tokio::test]
    async fn future_iat_is_not_yet_valid() {
        let token = KEYS.es256.sign(&with(claims(), "iat", json!(NOW + 60)));
        assert_err!(check(&token).await, TokenNotYetValid);
    }

    #[tokio::test]
    async fn lifetime_over_max_is_rejected() {
        let token = KEYS
            .es256
            .sign(&with(claims(), "exp", json!(NOW - 10 + 24 * 3600 + 1)));
        assert_err!(check(&token).await, TokenLifetimeExceeded);
        let token = KEYS
            .es256
            .sign(&with(claims(), "exp", json!(NOW - 10 + 24 * 3600)));
        assert!(check(&token).await.is_ok(), "exactly max_lifetime");
    }

    #[tokio::test]
    async fn lifetime_without_iat_counts_from_now() {
        let (v, _dir) = verifier_with(0, |i| i.required_claims = vec!["exp".into()]).await;
        let far = without(with(claims(), "exp", json!(NOW + 24 * 3600 + 5)), "iat");
        assert_err!(
            v.verify(&KEYS.es256.sign(&far), NOW).await,
            TokenLifetimeExceeded
        );
        let near = without(with(claims(), "exp", json!(NOW + 3600)), "iat");
        assert!(v.verify(&KEYS.es256.sign(&near), NOW).await.is_ok());
    }

    #[tokio::test]
    async fn audience_must_match_when_configured() {
        let (v, _dir) = verifier_with(0, |i| i.audiences = vec!["api".into()]).await;
        for (aud, ok) in [
            (json!("api"), true),
            (json!(["other", "api"]), true),
            (json!("other"), false),
            (json!([]), false),
        ] {
            let token = KEYS.es256.sign(&with(claims(), "aud", aud.clone()));
            let result = v.verify(&token, NOW).await;
            if ok {
                assert!(result.is_ok(), "{aud}: {result:?}");
            } else {
                assert_err!(result, InvalidAudience);
            }
        }
        assert_err!(
            v.verify(&KEYS.es256.sign(&claims()), NOW).await,
            InvalidAudience
        );
    }

    #[tokio::test]
    async fn without_configured_audiences_a_token_naming_one_is_refused() {
        // The test issuer has no `audiences`.
        let (v, _dir) = verifier().await;
        assert!(v.verify(&KEYS.es256.sign(&claims()), NOW).await.is_ok());
        for aud in [json!("billing"), json!(["billing", "api"]), json!([])] {
            let token = KEYS.es256.sign(&with(claims(), "aud", aud.clone()));
            match v.verify(&token, NOW).await {
                Err(AuthError::InvalidAudience(detail)) => {
                    assert!(detail.contains("no audiences configured"), "{detail}")
                }
                other => panic!("{aud}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn aud_of_the_wrong_type_is_malformed() {
        for aud in [json!(1), json!(["api", 2]), json!({"a": "api"})] {
            let token = KEYS.es256.sign(&with(claims(), "aud", aud));
            assert_err!(check(&token).await, MalformedToken);
        }
    }

    #[tokio::test]
    async fn signature_segment_must_be_base64url_of_sane_length() {
        let token = KEYS.rs256.sign(&claims());
        let (signed, signature) = token.rsplit_once('.').unwrap();
        for (bad, why) in [
            (format!("{signed}.{signature}="), "padding"),
            (
                format!("{signed}.{}+", &signature[1..]),
                "standard alphabet",
            ),
            (
                format!("{signed}.{}", "A".repeat(1401)),
                "longer than RSA-8192",
            ),
        ] {
            match check(&bad).await {
                Err(AuthError::MalformedToken(detail)) => assert!(
                    detail.contains("signature is not base64url"),
                    "{why}: {detail}"
                ),
                other => panic!("{why}: expected malformed_token, got {other:?}"),
            }
        }
        // The decoded signature reaches public keys, the segment as sent HMAC secrets.
        assert!(check(&token).await.is_ok());
        assert!(check(&KEYS.hs256.sign(&claims())).await.is_ok());
        assert!(check(&KEYS.es256.sign(&claims())).await.is_ok());
    }

    #[tokio::test]
    async fn bad_signature_is_rejected() {
        let token = KEYS.es256.sign(&claims());
        let other = KEYS
            .es256
            .sign(&with(claims(), "sub", json!("someone-else")));
        let forged = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            token.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            check(&forged).await.err(),
            Some(AuthError::InvalidTokenSignature)
        );
    }

    #[tokio::test]
    async fn signature_is_checked_before_claims_are_reported() {
        let stranger = TestKey::es256().with_kid(KEYS.es256.kid());
        let expired = with(claims(), "exp", json!(NOW - 3600));
        assert_eq!(
            check(&stranger.sign(&expired)).await.err(),
            Some(AuthError::InvalidTokenSignature)
        );
        let (v, _dir) = verifier_with(0, |i| i.audiences = vec!["api".into()]).await;
        assert_eq!(
            v.verify(&stranger.sign(&claims()), NOW).await.err(),
            Some(AuthError::InvalidTokenSignature)
        );
    }

    #[tokio::test]
    async fn permissions_come_from_an_array_or_a_scope_string() {
        let (v, _dir) = verifier_with(0, |i| i.permissions_claim = "scope".into()).await;
        let token = KEYS
            .es256
            .sign(&with(claims(), "scope", json!("read:data  write:data")));
        let verified = v.verify(&token, NOW).await.unwrap();
        assert_eq!(verified.permissions, ["read:data", "write:data"]);
        let token = KEYS.es256.sign(&without(claims(), "scope"));
        assert!(v.verify(&token, NOW).await.unwrap().permissions.is_empty());
    }

    #[tokio::test]
    async fn permissions_of_the_wrong_type_are_malformed() {
        for p in [json!(1), json!(["a", 1]), json!({"a": true})] {
            let token = KEYS.es256.sign(&with(claims(), "permissions", p));
            assert_err!(check(&token).await, MalformedToken);
        }
    }

    #[tokio::test]
    async fn token_without_kid_is_verified_by_a_fitting_key() {
        for key in [&KEYS.es256, &KEYS.hs256, &KEYS.rs256] {
            let header = json!({"alg": alg_name(key.alg())});
            assert!(check(&key.sign_with_header(&header, &claims()))
                .await
                .is_ok());
        }
    }

    #[tokio::test]
    async fn unknown_kid_is_rejected() {
        let header = json!({"alg": "HS256", "kid": "nope"});
        assert_err!(
            check(&KEYS.hs256.sign_with_header(&header, &claims())).await,
            UnknownKey
        );
    }

    /// The value of `portcullis_jwt_verified_cache_lookups_total{result="<result>"}`, if the
    /// series is there.
    fn cache_lookups(metrics: &Metrics, result: &str) -> Option<u64> {
        let series = format!("portcullis_jwt_verified_cache_lookups_total{{result=\"{result}\"}} ");
        let text = metrics.encode();
        let value = text.lines().find_map(|l| l.strip_prefix(&series))?;
        Some(value.parse().unwrap())
    }

    #[tokio::test]
    async fn cached_token_skips_verification_but_not_expiry_or_stale_keys() {
        let (v, metrics, _dir) =
            verifier_counted(100, |i| i.jwks_max_stale = Duration::from_secs(1)).await;
        // A real clock, since the cache expires entries at exp in real time.
        let now = crate::store::revocation::unix_now();
        let claims = json!({"iss": ISSUER, "sub": "u", "iat": now, "exp": now + 60});
        let token = KEYS.es256.sign(&claims);
        let first = v.verify(&token, now).await.unwrap();
        let again = v.verify(&token, now).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "answered from the cache");
        assert_err!(v.verify(&token, now + 120).await, TokenExpired);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // The keys are now too stale to serve, and so is what they verified.
        assert_err!(v.verify(&token, now).await, KeysUnavailable);
        let other = KEYS.es256.sign(&with(claims.clone(), "sub", json!("v")));
        assert_err!(v.verify(&other, now).await, KeysUnavailable);
        // Hits: the second look-up, and the expired one (found, then refused on its time).
        // Misses: the first, the entry that stale keys made unusable, and the other token.
        assert_eq!(
            (
                cache_lookups(&metrics, "hit"),
                cache_lookups(&metrics, "miss")
            ),
            (Some(2), Some(3)),
            "{}",
            metrics.encode()
        );
    }

    #[tokio::test]
    async fn cached_token_goes_when_its_key_leaves_the_jwks() {
        let k = &*KEYS;
        let (dir, source) = jwks_file(&jwks(&[&k.es256, &k.rs256]).to_string());
        let mut issuer = issuer(source, &[]);
        issuer.jwks_refresh = Duration::from_millis(50);
        let config = jwt_config(vec![issuer], 100);
        let store = KeyStore::load(&config, Arc::new(Metrics::new())).await;
        let v = JwtVerifier::new(&config, store, &Metrics::new());
        let now = crate::store::revocation::unix_now();
        let claims = json!({"iss": ISSUER, "sub": "u", "iat": now, "exp": now + 60});
        let withdrawn = k.es256.sign(&claims);
        let kept = k.rs256.sign(&claims);
        v.verify(&withdrawn, now).await.unwrap();
        let first = v.verify(&kept, now).await.unwrap();

        // The issuer withdraws its ES256 key (it leaked, say); the RSA key stays as it was.
        std::fs::write(dir.path().join("jwks.json"), jwks(&[&k.rs256]).to_string()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let outcome = loop {
            match v.verify(&withdrawn, now).await {
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                outcome => break outcome,
            }
        };
        assert_err!(outcome, UnknownKey);
        let again = v.verify(&kept, now).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "a token whose key is still in the JWKS stays cached across reloads"
        );
    }

    #[tokio::test]
    async fn cache_off_verifies_every_time() {
        let (v, metrics, _dir) =
            verifier_counted(0, |i| i.jwks_max_stale = Duration::from_secs(1)).await;
        let token = KEYS.es256.sign(&claims());
        v.verify(&token, NOW).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_err!(v.verify(&token, NOW).await, KeysUnavailable);
        // No cache, so no series that would read as a cache that never hits.
        let text = metrics.encode();
        assert!(!text.contains("verified_cache"), "{text}");
    }

    /// `payload` (raw JSON) signed with ES256 under the test key's kid.
    fn raw_token(payload: &str) -> String {
        let header = json!({"alg": "ES256", "kid": KEYS.es256.kid()}).to_string();
        sign_raw(&header, payload, &KEYS.es256)
    }

    #[tokio::test]
    async fn duplicate_key_inside_a_skipped_header_member_is_malformed() {
        let header = format!(
            r#"{{"alg":"ES256","kid":"{}","jwk":{{"kty":"EC","kty":"RSA"}}}}"#,
            KEYS.es256.kid()
        );
        match check(&sign_raw(&header, &claims().to_string(), &KEYS.es256)).await {
            Err(AuthError::MalformedToken(why)) => {
                assert!(
                    why.starts_with("the header: duplicate key \"kty\""),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn duplicate_key_inside_a_kept_claim_is_malformed() {
        for claim in [
            r#""cnf":{"x5t#S256":"a","x5t#S256":"b"}"#,
            r#""cnf":{"x5t#S256":"a","jwk":{"k":1,"k":2}}"#,
            r#""permissions":["read:data",{"a":1,"a":2}]"#,
            r#""aud":[{"a":1,"\u0061":2}]"#,
        ] {
            let payload = format!(
                r#"{{"iss":"{ISSUER}","sub":"u","iat":{},"exp":{},{claim}}}"#,
                NOW - 10,
                NOW + 600
            );
            match check(&raw_token(&payload)).await {
                Err(AuthError::MalformedToken(why)) => {
                    assert!(why.contains("duplicate key"), "{claim}: {why}")
                }
                other => panic!("{claim}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn escaped_keys_name_the_same_claim() {
        let payload = format!(
            r#"{{"\u0069ss":"{ISSUER}","s\u0075b":"u","iat":{},"exp":{}}}"#,
            NOW - 10,
            NOW + 600
        );
        let verified = check(&raw_token(&payload)).await.unwrap();
        assert_eq!(&*verified.issuer, ISSUER);
        assert_eq!(verified.subject.as_deref(), Some("u"));

        let payload = format!(
            r#"{{"iss":"{ISSUER}","sub":"u","iat":{},"exp":{},"\u0069ss":"{ISSUER}"}}"#,
            NOW - 10,
            NOW + 600
        );
        match check(&raw_token(&payload)).await {
            Err(AuthError::MalformedToken(why)) => {
                assert!(
                    why.starts_with("the payload: duplicate key \"iss\""),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn escaped_strings_are_read_unescaped() {
        let payload = format!(
            r#"{{"iss":"{ISSUER}","sub":"user\u002d1","iat":{},"exp":{},"jti":"t\"1","permissions":["re\u0061d:data","write:data"]}}"#,
            NOW - 10,
            NOW + 600
        );
        let verified = check(&raw_token(&payload)).await.unwrap();
        assert_eq!(verified.subject.as_deref(), Some("user-1"));
        assert_eq!(verified.token_id.as_deref(), Some("t\"1"));
        assert_eq!(verified.permissions, ["read:data", "write:data"]);
    }

    #[tokio::test]
    async fn permissions_before_iss_are_read() {
        let payload = format!(
            r#"{{"permissions":["read:data"],"exp":{},"iat":{},"sub":"u","iss":"{ISSUER}"}}"#,
            NOW + 600,
            NOW - 10
        );
        let verified = check(&raw_token(&payload)).await.unwrap();
        assert_eq!(verified.permissions, ["read:data"]);
        assert_eq!(verified.permissions_header, "read:data");
    }

    #[tokio::test]
    async fn only_the_issuers_permissions_claim_is_type_checked() {
        let (v, _dir) = verifier_with(0, |i| i.permissions_claim = "scope".into()).await;
        let token = KEYS.es256.sign(&with(
            with(claims(), "permissions", json!(1)),
            "scope",
            json!("a b"),
        ));
        assert_eq!(v.verify(&token, NOW).await.unwrap().permissions, ["a", "b"]);
    }

    #[tokio::test]
    async fn permissions_are_read_as_the_upstream_reads_them() {
        let (v, _dir) = verifier().await;
        let token = KEYS
            .es256
            .sign(&with(claims(), "permissions", json!(["read:data,admin"])));
        match v.verify(&token, NOW).await {
            Err(AuthError::MalformedToken(detail)) => assert!(detail.contains("comma"), "{detail}"),
            other => panic!("{other:?}"),
        }
        // What an upstream would trim, or read as no permission at all.
        for bad in [
            json!(["read:data", " admin"]),
            json!(["admin\t"]),
            json!([""]),
            json!(["a\u{1}b"]),
        ] {
            let token = KEYS.es256.sign(&with(claims(), "permissions", bad.clone()));
            assert_err!(v.verify(&token, NOW).await, MalformedToken);
        }
        let (v, _dir) = verifier_with(0, |i| i.permissions_claim = "scope".into()).await;
        let token = KEYS
            .es256
            .sign(&with(claims(), "scope", json!("read:data,admin write")));
        assert_err!(v.verify(&token, NOW).await, MalformedToken);
        // A tab after a space: `\tadmin`, which an upstream would read as `admin`.
        let token = KEYS
            .es256
            .sign(&with(claims(), "scope", json!("read \tadmin")));
        assert_err!(v.verify(&token, NOW).await, MalformedToken);
        // Spaces separate scope tokens; other white space (here a no-break space) does not.
        let token = KEYS
            .es256
            .sign(&with(claims(), "scope", json!("  a  b\u{a0}c ")));
        assert_eq!(
            v.verify(&token, NOW).await.unwrap().permissions,
            ["a", "b\u{a0}c"]
        );
    }

    #[tokio::test]
    async fn permissions_claim_may_be_a_registered_claim() {
        let (v, _dir) = verifier_with(0, |i| {
            i.permissions_claim = "aud".into();
            // A token that names an audience needs the issuer to have one.
            i.audiences = vec!["a".into()];
        })
        .await;
        let token = KEYS.es256.sign(&with(claims(), "aud", json!(["a", "b"])));
        assert_eq!(v.verify(&token, NOW).await.unwrap().permissions, ["a", "b"]);
        let token = KEYS.es256.sign(&with(claims(), "aud", json!({"a": 1})));
        assert_eq!(
            v.verify(&token, NOW).await.err(),
            Some(AuthError::MalformedToken(
                "the aud claim is not a string or strings".into()
            ))
        );
    }

    #[tokio::test]
    async fn cnf_must_hold_only_an_x5t_s256_string() {
        let token = KEYS
            .es256
            .sign(&with(claims(), "cnf", json!({"x5t#S256": "thumb"})));
        let verified = check(&token).await.unwrap();
        assert_eq!(verified.cnf_x5t_s256.as_deref(), Some("thumb"));
        let escaped = format!(
            r#"{{"iss":"{ISSUER}","sub":"u","iat":{},"exp":{},"cnf":{{"x5t\u0023S256":"thumb"}}}}"#,
            NOW - 10,
            NOW + 600
        );
        let verified = check(&raw_token(&escaped)).await.unwrap();
        assert_eq!(verified.cnf_x5t_s256.as_deref(), Some("thumb"));

        let other = "the cnf claim holds a confirmation other than x5t#S256";
        let not_object = "the cnf claim is not an object";
        for (cnf, why) in [
            (json!({"x5t#S256": "thumb", "jkt": "k"}), other),
            (json!({"jkt": "k"}), other),
            (json!({}), other),
            (json!({"x5t#S256": 1}), other),
            (json!({"x5t#S256": ["thumb"]}), other),
            (json!("thumb"), not_object),
            (json!(["thumb"]), not_object),
            (json!(null), not_object),
        ] {
            let token = KEYS.es256.sign(&with(claims(), "cnf", cnf.clone()));
            assert_eq!(
                check(&token).await.err(),
                Some(AuthError::MalformedToken(why.into())),
                "{cnf}"
            );
        }
    }

    #[tokio::test]
    async fn header_errors_come_before_payload_errors() {
        let header = URL_SAFE_NO_PAD.encode("{");
        assert_eq!(
            check(&format!("{header}.!.c2ln")).await.err(),
            Some(AuthError::MalformedToken(
                "the header is not valid JSON".into()
            ))
        );
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let payload = URL_SAFE_NO_PAD.encode("[]");
        assert_eq!(
            check(&format!("{header}.{payload}.!")).await.err(),
            Some(AuthError::MalformedToken(
                "the payload is not a JSON object".into()
            ))
        );
        assert_eq!(
            check(&format!("{header}.!.c2ln")).await.err(),
            Some(AuthError::MalformedToken(
                "the payload is not base64url without padding".into()
            ))
        );
    }

    #[test]
    fn rfc3339_never_panics() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1), "-1 (Unix time)");
        assert_eq!(rfc3339(i64::MAX), format!("{} (Unix time)", i64::MAX));
    }

    /// The segments are decoded with `base64-simd`; what it accepts and what it yields must
    /// be what the `base64` crate's strict URL-safe engine (no padding, no stray trailing
    /// bits) accepts and yields, for short texts of every shape and for longer ones, which
    /// take the SIMD path.
    #[test]
    fn segments_decode_as_the_strict_base64_engine_does() {
        fn same(text: &str) {
            let mut simd = Vec::new();
            let ours = base64_simd::URL_SAFE_NO_PAD.decode_append(text, &mut simd);
            let reference = URL_SAFE_NO_PAD.decode(text);
            match (ours, reference) {
                (Ok(()), Ok(bytes)) => assert_eq!(simd, bytes, "{text:?}"),
                (Err(_), Err(_)) => {}
                (ours, reference) => {
                    panic!("{text:?}: base64-simd {ours:?}, base64 {reference:?}")
                }
            }
        }
        // Every text of up to four characters over letters that end a group with and without
        // trailing bits, both alphabets' extra characters, padding, a dot, a space and a
        // non-ASCII letter.
        let alphabet = [
            "A", "B", "Q", "g", "w", "8", "-", "_", "+", "/", "=", ".", " ", "é",
        ];
        let mut texts = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = texts
                .iter()
                .filter(|t| t.chars().count() == texts.last().map_or(0, |l| l.chars().count()))
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            texts.extend(longer);
        }
        assert_eq!(
            texts.len(),
            1 + 14 + 14 * 14 + 14usize.pow(3) + 14usize.pow(4)
        );
        texts.iter().for_each(|t| same(t));

        // Longer texts (the SIMD loop takes 32 characters at a time): valid encodings of
        // every length up to 300 bytes, then each with one character changed.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            same(&text);
            if text.is_empty() {
                continue;
            }
            let at = next() as usize % text.len();
            for c in ["+", "/", "=", "\n", "A", "."] {
                let mut changed = text.clone();
                changed.replace_range(at..at + 1, c);
                same(&changed);
            }
        }
    }
}
