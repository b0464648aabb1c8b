//! State that must outlive one request: the nonces of request signatures, revoked tokens
//! ([`revocation`]) and rate-limit buckets ([`ratelimit`]).
//!
//! On the request path the signature check runs parse -> key lookup -> timestamp window -> HMAC,
//! and only for a valid signature calls [`NonceStore::record_once`] with a TTL of 2 x max_skew.
//! [`NonceOutcome::Fresh`] lets the request on; [`NonceOutcome::Replayed`] is 401
//! nonce_replayed; a [`StoreError`] is 503 store_unavailable, unless `[store] on_error = "allow"`
//! (the store never decides that itself: it reports, the caller chooses). `/readyz` calls
//! [`NonceStore::ping`].
//!
//! Two backends sit behind the one trait: [`memory`] (a sharded hash set in this process, one replica, the default) and
//! [`redis`] (fred; many replicas sharing one Redis, Sentinel or Cluster). Both pass the same
//! conformance suite in `tests/store.rs`. [`connect`] picks one from the `[store]` table;
//! [`connect_all`] builds all three stores, on one shared Redis connection for Redis.

pub mod memory;
pub mod ratelimit;
pub mod redis;
pub mod redis_ratelimit;
pub mod redis_revocation;
pub mod revocation;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{StoreBackend, StoreConfig};

pub use memory::MemoryNonceStore;
pub use ratelimit::{rate_limit_headers, MemoryRateLimiter, RateDecision, RateLimiter};
pub use redis::{RedisConnection, RedisNonceStore};
pub use redis_ratelimit::RedisRateLimiter;
pub use redis_revocation::RedisRevocationStore;
pub use revocation::{MemoryRevocationStore, Revocation, RevocationStore};

/// What [`NonceStore::record_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceOutcome {
    /// The nonce had not been seen for this key within its TTL; it is recorded now.
    Fresh,
    /// The nonce was already recorded for this key: the request is a replay.
    Replayed,
}

/// Why the store could not answer. Messages name the failure, never a URL password or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The command got no answer within `[store] timeout`. For a nonce this means "unknown":
    /// the nonce may or may not have been recorded, and the request must not pass as if it had
    /// been checked.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store cannot be reached (not connected, reconnecting, connection lost mid-command).
    #[error("the store is unavailable: {reason}")]
    Unavailable {
        /// What the client library reported.
        reason: String,
    },
    /// The store answered with an error (out of memory, read-only replica, wrong password...).
    #[error("the store refused the command: {reason}")]
    Refused {
        /// The server's error, without the command's arguments.
        reason: String,
    },
    /// `[store] url` cannot be used (bad scheme, missing port, unsupported option).
    #[error("the store url is invalid: {reason}")]
    InvalidUrl {
        /// What is wrong with it; the url itself is not repeated, as it may hold a password.
        reason: String,
    },
}

/// Remembers which nonces each signing key has used, each for a limited time.
///
/// Object-safe: the proxy holds an `Arc<dyn NonceStore>`.
#[async_trait::async_trait]
pub trait NonceStore: Send + Sync + std::fmt::Debug {
    /// Records `nonce` for `key_id` unless it is already recorded, atomically: of any number of
    /// concurrent calls with the same pair, exactly one gets [`NonceOutcome::Fresh`]. The record
    /// is forgotten after `ttl`.
    ///
    /// An error means "not known to be fresh"; it is never turned into `Fresh` or `Replayed`
    /// here.
    async fn record_once(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<NonceOutcome, StoreError>;

    /// [`NonceStore::record_once`] for the nonce of a signature made at `signed_at` (its `ts`,
    /// Unix seconds). A store that lost nonces uses the time to tell which requests could
    /// replay one of them (those signed before the loss plus `ttl / 2`, the signature
    /// window), and refuses only those, where `record_once` has to refuse every nonce until
    /// the lost ones are past their TTL.
    async fn record_signed(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
        _signed_at: u64,
    ) -> Result<NonceOutcome, StoreError> {
        self.record_once(key_id, nonce, ttl).await
    }

    /// Checks that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Builds the store that `[store]` names.
///
/// For Redis this returns as soon as the url is parsed and the connection is started (waiting a
/// moment for it to come up): a Redis that is down at start does not keep the proxy from
/// starting. Its store keeps reconnecting in the background and answers every call with an
/// error until it is up, so requests that need it fail closed meanwhile.
///
/// A Redis nonce store built alone has no revocation mirror to notice a Redis that lost its
/// data (see [`redis`]): the proxy builds its stores with [`connect_all`].
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn NonceStore>, StoreError> {
    match &config.backend {
        StoreBackend::Memory => Ok(Arc::new(MemoryNonceStore::with_capacity(config.max_nonces))),
        StoreBackend::Redis { url } => Ok(Arc::new(
            RedisNonceStore::connect(url, config.timeout).await?,
        )),
    }
}

/// The three stores the proxy uses, built together by [`connect_all`].
#[derive(Debug, Clone)]
pub struct Stores {
    /// Nonces of request signatures.
    pub nonces: Arc<dyn NonceStore>,
    /// Revoked tokens and subjects.
    pub revocations: Arc<dyn RevocationStore>,
    /// Rate-limit buckets.
    pub rate_limits: Arc<dyn RateLimiter>,
}

/// Builds the three stores that `[store]` names.
///
/// For Redis the nonce store and the rate limiter share one connection pool, and the
/// revocation store uses it too, plus the one subscriber connection its mirror needs. As with
/// [`connect`], a Redis that is down at start is not an error (only a url that cannot be used
/// is); this waits up to about 1.5 s for the connection and the mirror's first sync. The
/// mirror's background task stops when the revocation store is dropped; the pool's when the
/// last of the three is.
pub async fn connect_all(config: &StoreConfig) -> Result<Stores, StoreError> {
    match &config.backend {
        StoreBackend::Memory => Ok(Stores {
            nonces: Arc::new(MemoryNonceStore::with_capacity(config.max_nonces)),
            revocations: Arc::new(MemoryRevocationStore::new()),
            rate_limits: Arc::new(MemoryRateLimiter::new()),
        }),
        StoreBackend::Redis { url } => {
            let connection = RedisConnection::connect(url, config.timeout).await?;
            let revocations =
                RedisRevocationStore::new(connection.clone(), config.revocation_max_lag).await?;
            Ok(Stores {
                nonces: Arc::new(RedisNonceStore::new(connection.clone())),
                revocations: Arc::new(revocations),
                rate_limits: Arc::new(RedisRateLimiter::new(connection)),
            })
        }
    }
}
