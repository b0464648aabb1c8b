//! The embedded nonce store: a bounded moka cache in this process, for a proxy that runs as one
//! replica. Two replicas with memory stores do not see each other's nonces, so a request
//! replayed to the other replica would pass; use the Redis store for more than one.
//!
//! The signature check calls [`MemoryNonceStore::record_once`] after a valid HMAC. Its only
//! failure is a full store (4,000,000 nonces within their TTL by default), which refuses new
//! nonces rather than forget recorded ones; like any store error that is 503 store_unavailable
//! unless `[store] on_error = "allow"`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use sha2::{Digest, Sha256};

use super::{NonceOutcome, NonceStore, StoreError};

/// How many nonces the default store holds (`[store] max_nonces` sets another bound).
///
/// Sized for 5,000 signed requests/s with the default TTL of 600 s (2 x max_skew of 300 s):
/// 3,000,000 live entries, under this bound with room to spare. Each entry is a 16-byte key and
/// a 16-byte TTL, but moka's bookkeeping around it brings the resident size to about 310 bytes
/// per nonce (measured: 311 bytes per nonce in a proxy holding 590,000, 312 bytes in moka alone
/// at 1,000,000; moka's own global TTL instead of the per-entry one saves under 5%). A full
/// store at this bound is therefore about 1.2 GiB; a smaller `max_nonces` bounds it for a
/// container with less memory (a 256 MiB container leaves room for about 500,000 beside the
/// rest of the proxy).
pub const DEFAULT_CAPACITY: u64 = 4_000_000;

/// Nonces in memory, each kept for the TTL it was recorded with.
///
/// When full, the store refuses new nonces with [`StoreError::Refused`] (503 store_unavailable,
/// unless `[store] on_error = "allow"`) until recorded ones expire. It never makes room by
/// forgetting a nonce early: a forgotten nonce could be replayed for the rest of its TTL while
/// its timestamp is still inside the signature window. A nonce already recorded is still
/// reported as replayed when the store is full. A proxy that expects more than the bound within
/// one TTL should raise `[store] max_nonces` (at about 310 bytes a nonce) or use the Redis store.
///
/// Keys are the first 16 bytes of SHA-256 over the key id and the nonce, not the strings
/// themselves: a fixed size, no allocation per entry, and a collision (which would make a fresh
/// nonce look replayed) is as likely as guessing a 128-bit value.
#[derive(Debug, Clone)]
pub struct MemoryNonceStore {
    nonces: Cache<[u8; 16], Duration>,
    /// Nonces held: counted up before each insert and down as moka removes entries. moka's
    /// own entry count is updated a little after inserts; this one never lags behind an
    /// insert (it may lag behind an expiry, which only makes the refusal early).
    held: Arc<AtomicU64>,
    /// New nonces are refused once this many are held.
    capacity: u64,
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
        let held = Arc::new(AtomicU64::new(0));
        let removed = held.clone();
        let nonces = Cache::builder()
            // `record_once` refuses new nonces at `max_entries`. moka's own bound is only a
            // backstop above it, for an entry count that lags behind the inserts (moka counts
            // them a little later): it should never be reached.
            .max_capacity(max_entries.saturating_add((max_entries / 4).max(1024)))
            // Plain LRU rather than moka's default TinyLFU, should the backstop ever act:
            // TinyLFU may refuse to admit a new key when the cache is full, which would leave
            // a fresh nonce unrecorded; LRU records it and gives up the oldest one instead.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(TtlFromValue)
            .eviction_listener(move |_key, _ttl, _cause| {
                removed.fetch_sub(1, Ordering::AcqRel);
            })
            .build();
        Self {
            nonces,
            held,
            capacity: max_entries,
        }
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
        let key = entry_key(key_id, nonce);
        if self.held.load(Ordering::Acquire) >= self.capacity {
            // Full or nearly: a recorded nonce is still a replay, whatever the room.
            if self.nonces.contains_key(&key) {
                return Ok(NonceOutcome::Replayed);
            }
            // Expired entries are removed (and counted down) by moka's pending tasks.
            self.nonces.run_pending_tasks().await;
            if self.held.load(Ordering::Acquire) >= self.capacity {
                return Err(StoreError::Refused {
                    reason: format!(
                        "the memory nonce store is full ({} nonces within their TTL, [store] max_nonces); the Redis store holds more",
                        self.capacity
                    ),
                });
            }
        }
        // Counted before the insert, so that the listener's count-down of this entry can
        // never come first.
        self.held.fetch_add(1, Ordering::AcqRel);
        // moka runs one initialiser per key at a time: of concurrent callers for the same key,
        // exactly one sees a fresh entry.
        let entry = self
            .nonces
            .entry(key)
            .or_insert_with(async move { ttl })
            .await;
        Ok(if entry.is_fresh() {
            NonceOutcome::Fresh
        } else {
            self.held.fetch_sub(1, Ordering::AcqRel);
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
    async fn a_full_store_refuses_new_nonces_and_forgets_none() {
        let store = MemoryNonceStore::with_capacity(10);
        let ttl = Duration::from_millis(300);
        for i in 0..10 {
            let nonce = format!("nonce-{i:04}-abcdefgh");
            assert_eq!(
                store.record_once("k", &nonce, ttl).await,
                Ok(NonceOutcome::Fresh)
            );
        }
        // Full: a new nonce is refused, not recorded at the price of an old one.
        for i in 10..20 {
            let nonce = format!("nonce-{i:04}-abcdefgh");
            match store.record_once("k", &nonce, ttl).await {
                Err(StoreError::Refused { reason }) => assert!(reason.contains("full"), "{reason}"),
                other => panic!("nonce {i}: expected a refusal, got {other:?}"),
            }
        }
        // Every recorded nonce is still known, so its replay is still caught.
        for i in 0..10 {
            let nonce = format!("nonce-{i:04}-abcdefgh");
            assert_eq!(
                store.record_once("k", &nonce, ttl).await,
                Ok(NonceOutcome::Replayed),
                "nonce {i}"
            );
        }
        // Once the recorded nonces expire there is room again (moka removes expired entries
        // on a timer wheel with ticks of about a second).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let outcome = loop {
            let outcome = store.record_once("k", "nonce-0010-abcdefgh", ttl).await;
            if outcome.is_ok() || std::time::Instant::now() > deadline {
                break outcome;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(outcome, Ok(NonceOutcome::Fresh));
    }
}
