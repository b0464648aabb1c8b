//! JWT validation. (Interface stub: the verifier is being written.)

use std::sync::Arc;

use crate::auth::AuthError;
use crate::config::JwtConfig;
use crate::keys::KeyStore;

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
}

/// Verifies bearer tokens against the configured issuers.
#[derive(Debug)]
pub struct JwtVerifier {
    _keys: Arc<KeyStore>,
}

impl JwtVerifier {
    /// Builds the verifier.
    pub fn new(_config: &JwtConfig, keys: Arc<KeyStore>) -> Self {
        Self { _keys: keys }
    }

    /// Verifies `token` at time `now` (Unix seconds).
    pub async fn verify(&self, _token: &str, _now: i64) -> Result<Arc<VerifiedToken>, AuthError> {
        Err(AuthError::KeysUnavailable("not built".into()))
    }
}
