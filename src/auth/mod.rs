//! The checks a route runs, and what they produce: an [`Identity`] to pass upstream, or an
//! [`AuthError`] that [`crate::problem`] turns into the response. The checks themselves are
//! pure where they can be: they take bytes and keys and return a typed result.

pub mod jwt;
pub mod mtls;
pub mod signature;

use std::sync::Arc;

pub use jwt::{JwtVerifier, VerifiedToken};

/// Why a request's credentials were refused. Each variant is one stable `code` of DESIGN.md;
/// the `String`s are the short reason shown to the client and never hold a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` token on a route that needs one.
    #[error("no bearer token was sent")]
    MissingCredentials,
    /// The token is not a well-formed compact JWS we accept (segments, base64url, JSON,
    /// duplicate keys, claim types, size, JWE, nested tokens, `crit`).
    #[error("{0}")]
    MalformedToken(String),
    /// `exp` (plus leeway) is in the past.
    #[error("{0}")]
    TokenExpired(String),
    /// `nbf` or `iat` (minus leeway) is in the future.
    #[error("{0}")]
    TokenNotYetValid(String),
    /// `exp - iat` (or `exp - now`) is above the issuer's `max_lifetime`.
    #[error("{0}")]
    TokenLifetimeExceeded(String),
    /// The signature does not verify with the selected key.
    #[error("the token signature does not verify")]
    InvalidTokenSignature,
    /// No configured key has the token's `kid` (after a refetch, where one was allowed).
    #[error("{0}")]
    UnknownKey(String),
    /// `iss` is missing, not a string, or not a configured issuer.
    #[error("{0}")]
    InvalidIssuer(String),
    /// `aud` names none of the issuer's audiences.
    #[error("{0}")]
    InvalidAudience(String),
    /// `alg` is `none`, outside the issuer's allow-list, or does not fit the key's type.
    #[error("{0}")]
    AlgorithmNotAllowed(String),
    /// A required claim is absent.
    #[error("{0}")]
    MissingClaim(String),
    /// The token lacks a permission the route requires.
    #[error("{0}")]
    InsufficientPermissions(String),
    /// The issuer's keys could not be loaded (never fetched, or stale past `jwks_max_stale`).
    #[error("{0}")]
    KeysUnavailable(String),
    /// No scheme-v1 signature header on a route that needs one.
    #[error("{0}")]
    SignatureMissing(String),
    /// The signature header breaks scheme v1's grammar (parameters, version, nonce, ts,
    /// signature length, several signature headers).
    #[error("{0}")]
    SignatureMalformed(String),
    /// No configured signing key has the `keyId`, or the key is outside its validity window.
    #[error("{0}")]
    UnknownSigningKey(String),
    /// `ts` is further from the proxy's clock than `signature.max_skew`.
    #[error("{0}")]
    TimestampOutOfWindow(String),
    /// The HMAC does not match; holds the string to sign the proxy computed (nothing secret),
    /// so that a client author can see which line differs.
    #[error("the signature does not match the request; compare string_to_sign with yours")]
    SignatureMismatch(String),
    /// The token, or every token of its subject issued before a time, was revoked.
    #[error("{0}")]
    TokenRevoked(String),
    /// The nonce was seen before with this key.
    #[error("the nonce was already used")]
    NonceReplayed,
    /// The nonce store did not answer (fail closed).
    #[error("{0}")]
    StoreUnavailable(String),
    /// An `mtls` route, and the connection carries no verified client certificate.
    #[error("{0}")]
    ClientCertificateRequired(String),
    /// The verified client certificate is outside the route's `client_certs` allow-list.
    #[error("{0}")]
    ClientCertificateRejected(String),
    /// The token is bound to a certificate (RFC 8705 `cnf.x5t#S256`) other than the
    /// connection's client certificate, or the connection has none.
    #[error("{0}")]
    CertificateBindingMismatch(String),
}

/// Who the request was verified to come from. Only fields whose check ran are set.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The verified JWT, when the route required one.
    pub token: Option<Arc<VerifiedToken>>,
    /// The verified request signature, when the route required one.
    pub signature: Option<signature::VerifiedSignature>,
}

/// The permissions `route_permissions` that `granted` lacks, in route order.
pub fn missing_permissions<'a>(
    route_permissions: &'a [String],
    granted: &[String],
) -> Vec<&'a str> {
    route_permissions
        .iter()
        .filter(|p| !granted.iter().any(|g| g == *p))
        .map(String::as_str)
        .collect()
}
