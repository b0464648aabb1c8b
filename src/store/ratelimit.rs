//! Per-route rate limits: `rate_limit = { requests = N, per = "60s", key = ... }`.
//!
//! The proxy runs the rate limit last, after every other check passed, and calls
//! [`RateLimiter::check`] with a key built from the route and the caller (subject, client,
//! certificate or ip). A refused decision is 429 rate_limited with the headers of
//! [`rate_limit_headers`]; an allowed one adds the same `RateLimit-Policy` and `RateLimit`
//! headers to the upstream's response. A [`StoreError`] is 503 store_unavailable unless
//! `on_error = "allow"`.
//!
//! # The algorithm: GCRA
//!
//! Both backends use the generic cell rate algorithm (a leaky bucket kept as one number, the
//! "theoretical arrival time" TAT), with an emission interval `e = window / limit` and a burst
//! of `limit`. A request at `now` is allowed when `max(TAT, now) + e - window <= now`, and then
//! moves TAT to `max(TAT, now) + e`.
//!
//! Why GCRA rather than a sliding-window counter:
//! - **Exact answers at the edges.** Retry-After is the exact time until the next request is
//!   allowed (`TAT + e - window - now`), and the reset time is the exact time until the whole
//!   quota is back (`TAT - now`). The sliding-window counter estimates the previous window's
//!   requests as spread evenly, so its "remaining" and "retry after" are approximations that
//!   can be wrong either way right where a client looks at them.
//! - **One number per key**, one `GET` and one `SET PX` in one Lua script in Redis (the counter
//!   needs two keys per key, and a sliding log one entry per request).
//! - **Exactly N of a burst.** From an idle key, of any number of simultaneous requests exactly
//!   `limit` are allowed, across every replica sharing the store.
//!
//! What it is not: a log of the last window. After a burst of `limit`, the allowance refills at
//! one request per `e`, so a client that keeps the bucket drained gets `limit` requests per
//! window on average, and the worst window of length `window` holds `2 x limit - 1` requests
//! (a full burst, then one per `e`). A sliding-window counter has the same worst case (nearly
//! `2 x limit`); only a sliding log avoids it, at a cost in memory per request.
//!
//! In Redis the clock is the Redis server's (`TIME` inside the script), so replicas with
//! skewed clocks still share one limit.

use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;

use super::StoreError;

/// What [`RateLimiter::check`] decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may pass.
    pub allowed: bool,
    /// The limit it was checked against (requests per window).
    pub limit: u64,
    /// How many more requests would be allowed right now, after this one.
    pub remaining: u64,
    /// Time until the whole quota is available again (`limit` requests in a burst).
    pub reset_after: Duration,
    /// When refused: the time until one request will be allowed. `None` when allowed.
    pub retry_after: Option<Duration>,
}

/// Counts requests per key against a limit per window, atomically across everything that
/// shares the backend.
///
/// Object-safe: the proxy holds an `Arc<dyn RateLimiter>`.
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync + std::fmt::Debug {
    /// Counts one request for `key` and decides whether it passes `limit` per `window` (see the
    /// module doc for the algorithm). A refused request is not counted. `limit = 0` refuses
    /// everything. An error means "not known to be within the limit".
    async fn check(
        &self,
        key: &str,
        limit: u64,
        window: Duration,
    ) -> Result<RateDecision, StoreError>;
}

/// The response headers for a decision, per draft-ietf-httpapi-ratelimit-headers:
/// `RateLimit-Policy: "<policy>";q=<limit>;w=<window secs>`,
/// `RateLimit: "<policy>";r=<remaining>;t=<secs until reset, rounded up>`, and when refused
/// `Retry-After: <secs, rounded up, at least 1>`. Rounding up never tells a client to come back
/// before it would be allowed. `policy` must be a valid structured-field string (the route
/// name); a `"` or `\` in it is escaped.
pub fn rate_limit_headers(
    policy: &str,
    d: &RateDecision,
    window: Duration,
) -> Vec<(&'static str, String)> {
    let policy = policy.replace('\\', "\\\\").replace('"', "\\\"");
    let mut headers = vec![
        (
            "RateLimit-Policy",
            format!("\"{policy}\";q={};w={}", d.limit, ceil_secs(window)),
        ),
        (
            "RateLimit",
            format!(
                "\"{policy}\";r={};t={}",
                d.remaining,
                ceil_secs(d.reset_after)
            ),
        ),
    ];
    if let Some(retry) = d.retry_after {
        headers.push(("Retry-After", ceil_secs(retry).max(1).to_string()));
    }
    headers
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The emission interval in microseconds: `window / limit`, at least 1.
///
/// Rounded down, so the sustained rate is faster than `limit / window` by less than one
/// microsecond per request.
pub(crate) fn emission_us(limit: u64, window: Duration) -> u64 {
    (window_us(window) / limit.max(1)).max(1)
}

/// The burst tolerance in microseconds: `limit` emission intervals, so that a burst is exactly
/// `limit` requests. The window itself would let `window / emission` through, more than
/// `limit` whenever the division rounds (7,042 of a limit of 7,000 per second), and no more
/// than 1,000,000 a second of a larger limit.
pub(crate) fn burst_us(limit: u64, window: Duration) -> u64 {
    emission_us(limit, window).saturating_mul(limit.max(1))
}

/// The window in microseconds, at least 1.
fn window_us(window: Duration) -> u64 {
    u64::try_from(window.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// A decision that needs no store: `limit = 0`.
pub(crate) fn refuse_all(window: Duration) -> RateDecision {
    RateDecision {
        allowed: false,
        limit: 0,
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: Some(window),
    }
}

/// One GCRA step in microseconds: the decision, and the new TAT when the request is allowed.
/// `tat` is the stored TAT (`None` for an idle key), `now` the current time on the same clock.
/// The Lua script in `redis_ratelimit.rs` does the same arithmetic.
pub(crate) fn gcra(
    tat: Option<u64>,
    now: u64,
    limit: u64,
    window: Duration,
) -> (RateDecision, Option<u64>) {
    let e = emission_us(limit, window);
    let w = burst_us(limit, window);
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat.saturating_add(e);
    let allow_at = new_tat.saturating_sub(w);
    if allow_at > now {
        let decision = RateDecision {
            allowed: false,
            limit,
            remaining: 0,
            reset_after: Duration::from_micros(tat - now),
            retry_after: Some(Duration::from_micros(allow_at - now)),
        };
        return (decision, None);
    }
    let remaining = ((now + w - new_tat) / e).min(limit.saturating_sub(1));
    let decision = RateDecision {
        allowed: true,
        limit,
        remaining,
        reset_after: Duration::from_micros(new_tat - now),
        retry_after: None,
    };
    (decision, Some(new_tat))
}

/// How many keys the memory limiter tracks at most. A key is only kept while its bucket is not
/// full again (at most one window after its last request), so this bounds the number of
/// distinct callers per window; past it, the least recently used keys are forgotten, which
/// gives them a fresh quota.
pub const DEFAULT_RATE_KEYS: u64 = 1_000_000;

/// Rate limits in this process, for a proxy that runs as one replica (each replica with a
/// memory limiter allows the whole limit on its own). Never fails.
#[derive(Debug, Clone)]
pub struct MemoryRateLimiter {
    /// TAT by key, on [`MemoryRateLimiter::epoch`]'s clock, in microseconds.
    buckets: Cache<String, u64>,
    epoch: Instant,
}

/// Expires a bucket when it is full again: at its TAT.
struct UntilTat {
    epoch: Instant,
}

impl UntilTat {
    fn left(&self, tat: u64, at: Instant) -> Option<Duration> {
        let now =
            u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        Some(Duration::from_micros(tat.saturating_sub(now)))
    }
}

impl Expiry<String, u64> for UntilTat {
    fn expire_after_create(
        &self,
        _key: &String,
        tat: &u64,
        created_at: Instant,
    ) -> Option<Duration> {
        self.left(*tat, created_at)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        tat: &u64,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.left(*tat, updated_at)
    }
}

impl MemoryRateLimiter {
    /// A limiter tracking up to [`DEFAULT_RATE_KEYS`] keys.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_RATE_KEYS)
    }

    /// A limiter tracking up to `max_keys` keys.
    pub fn with_capacity(max_keys: u64) -> Self {
        let epoch = Instant::now();
        let buckets = Cache::builder()
            .max_capacity(max_keys)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(UntilTat { epoch })
            .build();
        Self { buckets, epoch }
    }
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(
        &self,
        key: &str,
        limit: u64,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        if limit == 0 {
            return Ok(refuse_all(window));
        }
        let mut decision = None;
        // moka runs one compute per key at a time, so concurrent checks of one key see each
        // other's updates: exactly `limit` of a burst pass.
        self.buckets
            .entry(key.to_owned())
            .and_compute_with(|entry| {
                let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                let (d, new_tat) = gcra(entry.map(|e| e.into_value()), now, limit, window);
                decision = Some(d);
                match new_tat {
                    Some(tat) => Op::Put(tat),
                    None => Op::Nop,
                }
            });
        // The closure above always runs once and sets it.
        decision.ok_or_else(|| StoreError::Unavailable {
            reason: "the rate limiter did not run".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    #[test]
    fn a_burst_of_limit_passes_and_the_next_is_refused_with_an_exact_retry_after() {
        let mut tat = None;
        let mut now = 1_000_000_000;
        for i in 0..10u64 {
            let (d, t) = gcra(tat, now, 10, W);
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i);
            tat = t;
        }
        let (d, t) = gcra(tat, now, 10, W);
        assert!(!d.allowed && t.is_none());
        assert_eq!(d.retry_after, Some(Duration::from_secs(6)));
        assert_eq!(d.reset_after, W);
        now += 6_000_000;
        let (d, _) = gcra(tat, now, 10, W);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn a_burst_is_exactly_the_limit_when_the_window_does_not_divide_evenly() {
        for (limit, window) in [
            (7_000, Duration::from_secs(1)),
            (3, Duration::from_secs(2)),
            (2_000, Duration::from_millis(2_001)),
            (600_000, Duration::from_secs(1)),
            (2_000_000, Duration::from_secs(1)),
            (1, Duration::from_secs(1)),
        ] {
            let (mut tat, now, mut passed) = (None, 5_000_000_000, 0u64);
            loop {
                let (d, t) = gcra(tat, now, limit, window);
                if !d.allowed {
                    break;
                }
                passed += 1;
                tat = t;
                assert!(
                    passed <= limit,
                    "{limit} per {window:?}: more than the limit"
                );
            }
            assert_eq!(passed, limit, "{limit} per {window:?}");
        }
    }

    #[test]
    fn headers_round_up_and_retry_after_is_at_least_one() {
        let d = RateDecision {
            allowed: false,
            limit: 100,
            remaining: 0,
            reset_after: Duration::from_millis(59_001),
            retry_after: Some(Duration::from_millis(1)),
        };
        assert_eq!(
            rate_limit_headers("transactions", &d, W),
            vec![
                ("RateLimit-Policy", "\"transactions\";q=100;w=60".to_owned()),
                ("RateLimit", "\"transactions\";r=0;t=60".to_owned()),
                ("Retry-After", "1".to_owned()),
            ]
        );
        let allowed = RateDecision {
            allowed: true,
            remaining: 99,
            reset_after: Duration::from_millis(600),
            retry_after: None,
            ..d
        };
        let h = rate_limit_headers("a\"b", &allowed, W);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].1, "\"a\\\"b\";r=99;t=1");
    }
}
