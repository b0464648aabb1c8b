//! The embedded nonce store: a set of recorded nonces in this process, for a proxy that runs as
//! one replica. Two replicas with memory stores do not see each other's nonces, so a request
//! replayed to the other replica would pass; use the Redis store for more than one.
//!
//! The signature check calls [`MemoryNonceStore::record_once`] after a valid HMAC. Its only
//! failure is a full store (4,000,000 nonces within their TTL by default), which refuses new
//! nonces rather than forget recorded ones; like any store error that is 503 store_unavailable
//! unless `[store] on_error = "allow"`.
//!
//! It is a plain hash set with an expiry per entry, split into [`SHARDS`] tables, each behind its
//! own lock, rather than a general cache: a nonce store needs no eviction policy (it must never
//! evict), no admission policy and no access order, and a cache's bookkeeping for them cost
//! about ten times the memory of the entries themselves and several microseconds a request. The
//! split keeps every pause small: a table that grows rehashes only its own share of the entries
//! (a single table of millions stalls the thread for milliseconds while it doubles), and expired
//! entries are swept out one table at a time.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use sha2::{Digest, Sha256};

use super::{NonceOutcome, NonceStore, StoreError};

/// How many nonces the default store holds (`[store] max_nonces` sets another bound).
///
/// Sized for 5,000 signed requests/s with the default TTL of 600 s (2 x max_skew of 300 s):
/// 3,000,000 live entries, under this bound with room to spare. Each entry is a 16-byte key and
/// an 8-byte expiry in a hash table that is between 44% and 88% full; with the allocator's
/// share, about 80 bytes a nonce resident (measured: 78-82 bytes a nonce at 2,000,000, against
/// 311 for the moka cache this replaced). A full store at this bound is therefore about
/// 320 MiB; a smaller `max_nonces` bounds it for a container with less memory.
pub const DEFAULT_CAPACITY: u64 = 4_000_000;

/// Tables the nonces are split into. At the default bound each holds about 16,000 nonces, so
/// growing one rehashes that many and sweeping one visits that many: tens of microseconds.
pub const SHARDS: usize = 256;

/// How often each table is swept of expired nonces, at most: when a request touches it and its
/// last sweep is older than this. Expired nonces can therefore stay counted for up to this long
/// after their TTL, which only makes a full store refuse a little early.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The least time between two sweeps of every table when the store is full: each costs time
/// in proportion to the whole store, and a full store must not let every refused request buy
/// one.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Nonces in memory, each kept for the TTL it was recorded with.
///
/// When full, the store refuses new nonces with [`StoreError::Refused`] (503 store_unavailable,
/// unless `[store] on_error = "allow"`) until recorded ones expire. It never makes room by
/// forgetting a nonce early: a forgotten nonce could be replayed for the rest of its TTL while
/// its timestamp is still inside the signature window. A nonce already recorded is still
/// reported as replayed when the store is full. A proxy that expects more than the bound within
/// one TTL should raise `[store] max_nonces` or use the Redis store.
///
/// Keys are the first 16 bytes of SHA-256 over the key id and the nonce, not the strings
/// themselves: a fixed size, no allocation per entry, and a collision (which would make a fresh
/// nonce look replayed) is as likely as guessing a 128-bit value. Tables and slots are chosen by
/// a keyed hash of that (SipHash with a key drawn at start), so a client that picks its nonces
/// cannot steer them into one table or one slot.
#[derive(Debug, Clone)]
pub struct MemoryNonceStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Nonces held in all tables, expired ones included until a sweep removes them. Never
    /// above `capacity`: a place is taken here before its nonce goes into a table.
    held: AtomicU64,
    /// New nonces are refused once this many are held.
    capacity: u64,
    /// Times are kept as milliseconds since this instant.
    epoch: Instant,
    /// When every table may next be swept because the store is full (milliseconds since epoch).
    next_full_sweep: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashTable<Entry>,
    /// When this table is next swept (milliseconds since the epoch).
    next_sweep: u64,
}

#[derive(Debug)]
struct Entry {
    key: [u8; 16],
    /// Milliseconds since the epoch at which the nonce may be used again.
    expires: u64,
}

impl MemoryNonceStore {
    /// A store bounded at [`DEFAULT_CAPACITY`] nonces.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A store bounded at `max_entries` nonces (see the type's doc for what happens when full).
    pub fn with_capacity(max_entries: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                held: AtomicU64::new(0),
                capacity: max_entries,
                epoch: Instant::now(),
                next_full_sweep: AtomicU64::new(0),
            }),
        }
    }

    /// Nonces held, expired ones included until their table is next swept.
    pub fn len(&self) -> u64 {
        self.inner.held.load(Ordering::Acquire)
    }

    /// Whether no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemoryNonceStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic inside a table operation (only an allocation failure, which aborts) cannot
        // leave a table half-changed, so a poisoned lock still guards a sound table.
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The table a key's hash belongs to. Bits 32..40 pick it; hashbrown takes a slot from the
    /// low bits and a tag from the top seven, so every table still sees evenly spread slots and
    /// tags.
    fn shard_of(&self, hash: u64) -> usize {
        (hash >> 32) as usize % self.shards.len()
    }

    /// Removes the nonces of `shard` whose TTL has passed, counts them out of `held`, and sets
    /// the table's next sweep.
    fn sweep(&self, shard: &mut Shard, now: u64) {
        let before = shard.entries.len();
        shard.entries.retain(|e| e.expires >= now);
        let removed = (before - shard.entries.len()) as u64;
        self.held.fetch_sub(removed, Ordering::AcqRel);
        shard.next_sweep = now + millis(SWEEP_EVERY);
    }

    /// Sweeps every table, at most once per [`FULL_SWEEP_EVERY`]; called with no lock held.
    fn sweep_all(&self, now: u64) {
        let due = self.next_full_sweep.load(Ordering::Acquire);
        if now < due
            || self
                .next_full_sweep
                .compare_exchange(
                    due,
                    now + millis(FULL_SWEEP_EVERY),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        for i in 0..self.shards.len() {
            self.sweep(&mut self.lock(i), now);
        }
    }

    /// What `record_once` does, without the async wrapper.
    fn record_once(&self, key: [u8; 16], ttl: Duration) -> Result<NonceOutcome, StoreError> {
        self.record_once_at(key, ttl, self.now())
    }

    /// `record_once` at `now` (milliseconds since `epoch`, rounded up).
    fn record_once_at(
        &self,
        key: [u8; 16],
        ttl: Duration,
        now: u64,
    ) -> Result<NonceOutcome, StoreError> {
        let hash = self.hasher.hash_one(key);
        let index = self.shard_of(hash);
        let mut swept_all = false;
        loop {
            let expires = now.saturating_add(millis(ttl)).max(now + 1);
            let mut shard = self.lock(index);
            if now >= shard.next_sweep {
                self.sweep(&mut shard, now);
            }
            if let Some(entry) = shard.entries.find_mut(hash, |e| e.key == key) {
                // Held through the millisecond it expires in: both instants are rounded up,
                // so a use up to exactly the TTL after the first (which the timestamp window
                // accepts) always finds it.
                if entry.expires >= now {
                    return Ok(NonceOutcome::Replayed);
                }
                // Recorded once, but its TTL has passed: fresh again, in the same slot.
                entry.expires = expires;
                return Ok(NonceOutcome::Fresh);
            }
            // Takes a place below the bound, or finds none: with several worker threads, a
            // load followed by an add could let each of them past a store with one place left.
            let reserved = self
                .held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    (held < self.capacity).then_some(held + 1)
                })
                .is_ok();
            if !reserved {
                if swept_all {
                    return Err(StoreError::Refused {
                        reason: format!(
                            "the memory nonce store is full ({} nonces within their TTL, [store] max_nonces); the Redis store holds more",
                            self.capacity
                        ),
                    });
                }
                // Expired nonces in other tables may make room. Sweeping them takes their
                // locks, so this table's is let go first and the lookup is done again after.
                drop(shard);
                self.sweep_all(now);
                swept_all = true;
                continue;
            }
            shard
                .entries
                .insert_unique(hash, Entry { key, expires }, |e| {
                    self.hasher.hash_one(e.key)
                });
            return Ok(NonceOutcome::Fresh);
        }
    }
}

/// Milliseconds, rounded up so that a TTL is never cut short, and saturating.
fn millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
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
        self.inner.record_once(entry_key(key_id, nonce), ttl)
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

    /// A refusal because the store is full.
    fn assert_full(outcome: Result<NonceOutcome, StoreError>, nonce: &str) {
        match outcome {
            Err(StoreError::Refused { reason }) => assert!(reason.contains("full"), "{reason}"),
            other => panic!("{nonce}: expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_nonces_and_forgets_none() {
        let store = MemoryNonceStore::with_capacity(10);
        // Long enough for the refusals and replays below to run inside it on a loaded machine.
        let ttl = Duration::from_secs(2);
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
            assert_full(store.record_once("k", &nonce, ttl).await, &nonce);
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
        // Once the recorded nonces expire there is room again: a full store sweeps every
        // table (at most once a second, and the refusals above took this second's sweep).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            let outcome = store.record_once("k", "nonce-0010-abcdefgh", ttl).await;
            if outcome.is_ok() || std::time::Instant::now() > deadline {
                break outcome;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(outcome, Ok(NonceOutcome::Fresh));
        // That first place may have come from sweeping only the new nonce's own table (when an
        // expired nonce shared it); the next refusal sweeps every table. Either way the expired
        // nonces are counted out, so nine more new ones fit, and the store is full again at ten.
        for i in 11..20 {
            let nonce = format!("nonce-{i:04}-abcdefgh");
            assert_eq!(
                store.record_once("k", &nonce, ttl).await,
                Ok(NonceOutcome::Fresh),
                "nonce {i}"
            );
        }
        assert_eq!(store.len(), 10);
        let nonce = "nonce-0020-abcdefgh";
        assert_full(store.record_once("k", nonce, ttl).await, nonce);
    }

    #[test]
    fn threads_racing_on_the_same_nonces_get_exactly_one_fresh_each() {
        let store = MemoryNonceStore::with_capacity(100_000);
        let ttl = Duration::from_secs(60);
        let fresh: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        let mut fresh = 0;
                        // Each thread walks the same nonces from a different place.
                        for i in 0..5_000u64 {
                            let nonce = format!("nonce-{:08}", (i + t * 625) % 5_000);
                            match store.inner.record_once(entry_key("k", &nonce), ttl) {
                                Ok(NonceOutcome::Fresh) => fresh += 1,
                                Ok(NonceOutcome::Replayed) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        fresh
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(fresh, 5_000);
        assert_eq!(store.len(), 5_000);
    }

    #[test]
    fn threads_filling_the_store_together_never_pass_its_bound() {
        let store = MemoryNonceStore::with_capacity(1_000);
        let ttl = Duration::from_secs(60);
        let (fresh, refused) = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        let (mut fresh, mut refused) = (0u64, 0u64);
                        for i in 0..500 {
                            let key = entry_key("k", &format!("nonce-{t}-{i:06}"));
                            match store.inner.record_once(key, ttl) {
                                Ok(NonceOutcome::Fresh) => fresh += 1,
                                Err(StoreError::Refused { .. }) => refused += 1,
                                other => panic!("a distinct nonce gave {other:?}"),
                            }
                        }
                        (fresh, refused)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .fold((0, 0), |(f, r), (f1, r1)| (f + f1, r + r1))
        });
        assert_eq!((fresh, refused), (1_000, 3_000));
        assert_eq!(store.len(), 1_000);
    }

    #[test]
    fn nonces_spread_over_every_table() {
        let store = MemoryNonceStore::with_capacity(1_000_000);
        for i in 0..100_000 {
            let key = entry_key("k", &format!("nonce-{i:08}"));
            assert_eq!(
                store.inner.record_once(key, Duration::from_secs(60)),
                Ok(NonceOutcome::Fresh)
            );
        }
        let sizes: Vec<usize> = (0..SHARDS)
            .map(|i| store.inner.lock(i).entries.len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 100_000);
        // 390 a table on average; a table twice that would mean the hash picks tables unevenly.
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*min > 250 && *max < 550, "table sizes from {min} to {max}");
    }

    #[test]
    fn an_expired_nonce_is_fresh_again_and_swept_out_of_the_count() {
        let store = MemoryNonceStore::with_capacity(1_000);
        // Long enough that a test thread descheduled for a while still sees the replay.
        let short = Duration::from_millis(200);
        let key = entry_key("k", "nonce-0001-abcdefgh");
        // Keys that fall in the same table, found before the clock matters.
        let index = |k: [u8; 16]| store.inner.shard_of(store.inner.hasher.hash_one(k));
        let target = index(key);
        let same_table: Vec<[u8; 16]> = (0..)
            .map(|i| entry_key("k", &format!("other-{i:08}")))
            .filter(|k| index(*k) == target)
            .take(20)
            .collect();
        assert_eq!(store.inner.record_once(key, short), Ok(NonceOutcome::Fresh));
        assert_eq!(
            store.inner.record_once(key, short),
            Ok(NonceOutcome::Replayed)
        );
        std::thread::sleep(Duration::from_millis(300));
        // Found in its slot with its TTL passed: recorded again in place, not a second entry.
        assert_eq!(store.inner.record_once(key, short), Ok(NonceOutcome::Fresh));
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.inner.record_once(key, short),
            Ok(NonceOutcome::Replayed)
        );

        // Nonces in one table, all expired: once its sweep is due, the next request that
        // touches the table removes them and counts them out.
        for k in &same_table[..10] {
            assert_eq!(store.inner.record_once(*k, short), Ok(NonceOutcome::Fresh));
        }
        assert_eq!(store.len(), 11);
        std::thread::sleep(SWEEP_EVERY + Duration::from_millis(50));
        assert_eq!(
            store
                .inner
                .record_once(same_table[10], Duration::from_secs(60)),
            Ok(NonceOutcome::Fresh)
        );
        assert_eq!(store.len(), 1, "the sweep left expired nonces counted");
        assert_eq!(store.inner.lock(target).entries.len(), 1);
    }

    #[test]
    fn a_nonce_is_held_for_its_whole_ttl_to_the_millisecond() {
        let store = MemoryNonceStore::with_capacity(1_000);
        let ttl = Duration::from_secs(600);
        let key = entry_key("k", "nonce-edge-abcdefgh");
        // First seen 0.9 ms after the epoch (1 when rounded up); a replay 599,999.9 ms later,
        // inside the TTL, reads 600,001 rounded up: still the nonce's last millisecond.
        assert_eq!(
            store.inner.record_once_at(key, ttl, 1),
            Ok(NonceOutcome::Fresh)
        );
        assert_eq!(
            store.inner.record_once_at(key, ttl, 600_001),
            Ok(NonceOutcome::Replayed)
        );
        // A sweep in that millisecond keeps it too.
        let index = store.inner.shard_of(store.inner.hasher.hash_one(key));
        store.inner.sweep(&mut store.inner.lock(index), 600_001);
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.inner.record_once_at(key, ttl, 600_001),
            Ok(NonceOutcome::Replayed)
        );
        // The millisecond after, it is gone.
        assert_eq!(
            store.inner.record_once_at(key, ttl, 600_002),
            Ok(NonceOutcome::Fresh)
        );
    }

    #[test]
    fn ttls_round_up_to_the_millisecond() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(600_000)), 600_000);
        assert_eq!(millis(Duration::from_nanos(1_000_001)), 2);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
