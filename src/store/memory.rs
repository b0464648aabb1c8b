//! The embedded nonce store: a bounded moka cache in this process, for a proxy that runs as one
//! replica. Two replicas with memory stores do not see each other's nonces, so a request
//! replayed to the other replica would pass; use the Redis store for more than one.
//!
//! The signature check calls [`MemoryNonceStore::record_once`] after a valid HMAC; it never
//! fails, so `[store] on_error` never applies to it.

use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use sha2::{Digest, Sha256};

use super::{NonceOutcome, NonceStore, StoreError};

/// How many nonces the default store holds.
///
/// Sized for 5,000 signed requests/s with the default TTL of 600 s (2 x max_skew of 300 s):
/// 3,000,000 live entries, under this bound with room to spare. Each entry is a 16-byte key, a
/// 16-byte TTL and moka's own bookkeeping (an estimate of 150 to 200 bytes in all, not a
/// measurement), so a full store is in the order of 600 to 800 MB.
pub const DEFAULT_CAPACITY: u64 = 4_000_000;

/// Nonces in memory, each kept for the TTL it was recorded with.
///
/// When full, moka evicts the least recently used entries, which here are the oldest nonces.
/// An evicted nonce can be replayed for the rest of its TTL, as long as its timestamp is still
/// inside the signature window. That is why the bound is set well above the expected number of
/// live nonces; a proxy that expects more traffic should use [`MemoryNonceStore::with_capacity`]
/// or the Redis store. Moka applies the bound a little after inserts, so the count may briefly
/// pass it.
///
/// Keys are the first 16 bytes of SHA-256 over the key id and the nonce, not the strings
/// themselves: a fixed size, no allocation per entry, and a collision (which would make a fresh
/// nonce look replayed) is as likely as guessing a 128-bit value.
#[derive(Debug, Clone)]
pub struct MemoryNonceStore {
    nonces: Cache<[u8; 16], Duration>,
}

/// Expires each entry after the TTL stored as its value.
struct TtlFromValue;

impl Expiry<[u8; 16], Duration> for TtlFromValue {
    fn expire_after_create(
        &self,
        _key: &[u8; 16],
        ttl: &Duration,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(*ttl)
    }
}

impl MemoryNonceStore {
    /// A store bounded at [`DEFAULT_CAPACITY`] nonces.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A store bounded at `max_entries` nonces (see the type's doc for what happens when full).
    pub fn with_capacity(max_entries: u64) -> Self {
        let nonces = Cache::builder()
            .max_capacity(max_entries)
            // Plain LRU rather than moka's default TinyLFU: TinyLFU may refuse to admit a new
            // key when the cache is full, which would leave a fresh nonce unrecorded. LRU always
            // records it and gives up the oldest one instead.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(TtlFromValue)
            .build();
        Self { nonces }
    }
}

impl Default for MemoryNonceStore {
    fn default() -> Self {
        Self::new()
    }
}

/// A fixed-size key for the pair; the length prefix keeps ("ab", "c") apart from ("a", "bc").
fn entry_key(key_id: &str, nonce: &str) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update((key_id.len() as u64).to_be_bytes())
        .chain_update(key_id.as_bytes())
        .chain_update(nonce.as_bytes())
        .finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

#[async_trait::async_trait]
impl NonceStore for MemoryNonceStore {
    async fn record_once(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<NonceOutcome, StoreError> {
        // moka runs one initialiser per key at a time: of concurrent callers for the same key,
        // exactly one sees a fresh entry.
        let entry = self
            .nonces
            .entry(entry_key(key_id, nonce))
            .or_insert_with(async move { ttl })
            .await;
        Ok(if entry.is_fresh() {
            NonceOutcome::Fresh
        } else {
            NonceOutcome::Replayed
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_keep_the_boundary_between_key_id_and_nonce() {
        assert_ne!(entry_key("ab", "c"), entry_key("a", "bc"));
        assert_eq!(entry_key("a", "bc"), entry_key("a", "bc"));
    }

    #[tokio::test]
    async fn a_full_store_evicts_rather_than_refusing_new_nonces() {
        let store = MemoryNonceStore::with_capacity(10);
        let ttl = Duration::from_secs(60);
        for i in 0..100 {
            let nonce = format!("nonce-{i:04}-abcdefgh");
            assert_eq!(
                store.record_once("k", &nonce, ttl).await,
                Ok(NonceOutcome::Fresh)
            );
            // Every nonce is recorded when it is first used, however full the store is.
            assert_eq!(
                store.record_once("k", &nonce, ttl).await,
                Ok(NonceOutcome::Replayed)
            );
        }
        store.nonces.run_pending_tasks().await;
        assert!(store.nonces.entry_count() <= 10);
    }
}
