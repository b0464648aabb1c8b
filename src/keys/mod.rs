//! Verification keys: JWKS fetched and cached per issuer, static JWKS files, HMAC secrets.
//! (Interface stub: being written.)

use std::sync::Arc;
use std::time::Duration;

use crate::config::JwtConfig;
use crate::metrics::Metrics;

/// The keys of one issuer as `/readyz` and `/metrics` see them.
#[derive(Debug, Clone)]
pub struct IssuerKeyStatus {
    pub issuer: String,
    /// At least one usable key is held and it is not older than `jwks_max_stale`.
    pub loaded: bool,
    /// The last refresh failed; the keys served are older than one refresh interval.
    pub stale: bool,
    /// Since the keys were last loaded successfully.
    pub age: Option<Duration>,
    /// The last refresh error, if the last refresh failed.
    pub last_error: Option<String>,
}

/// Every issuer's keys.
#[derive(Debug)]
pub struct KeyStore {}

impl KeyStore {
    /// Loads every issuer's keys once and starts their background refresh. Background tasks
    /// stop when the store is dropped.
    pub async fn load(_config: &JwtConfig, _metrics: Arc<Metrics>) -> Arc<KeyStore> {
        Arc::new(KeyStore {})
    }

    /// The state of every issuer's keys.
    pub fn status(&self) -> Vec<IssuerKeyStatus> {
        Vec::new()
    }
}
