//! The rate limiters: one conformance suite run against memory, a real `redis-server` and a
//! real three-master Redis Cluster (exactly N of a burst, the decision and the headers at the
//! window's edges, with real sleeps), then two replicas sharing one Redis, and a Redis that
//! lost its script cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::config::{OnStoreError, StoreBackend, StoreConfig};
use portcullis::store::{self, rate_limit_headers, RateDecision, RateLimiter};
use support::redis::{redis_cli, RedisCluster, RedisServer};
use tokio::sync::Barrier;

fn store_config(backend: StoreBackend) -> StoreConfig {
    StoreConfig {
        backend,
        on_error: OnStoreError::Deny,
        // Generous: a burst of concurrent checks queues on two connections on a 2-core box.
        timeout: Duration::from_millis(500),
        revocation_max_lag: Duration::from_secs(5),
        max_nonces: store::memory::DEFAULT_CAPACITY,
    }
}

async fn memory_limiter() -> Arc<dyn RateLimiter> {
    store::connect_all(&store_config(StoreBackend::Memory))
        .await
        .unwrap()
        .rate_limits
}

async fn redis_limiter(url: String) -> Arc<dyn RateLimiter> {
    store::connect_all(&store_config(StoreBackend::Redis { url }))
        .await
        .expect("a redis url to 127.0.0.1 is valid")
        .rate_limits
}

/// Runs `n` checks of `key` at once, spread over `limiters`; returns how many were allowed.
async fn burst(
    limiters: &[Arc<dyn RateLimiter>],
    key: &str,
    n: usize,
    limit: u64,
    window: Duration,
) -> usize {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let limiter = limiters[i % limiters.len()].clone();
            let (barrier, key) = (barrier.clone(), key.to_owned());
            tokio::spawn(async move {
                barrier.wait().await;
                limiter.check(&key, limit, window).await
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        let decision = task.await.unwrap().expect("check failed");
        assert_eq!(decision.limit, limit);
        if decision.allowed {
            allowed += 1;
        } else {
            assert_eq!(decision.remaining, 0);
            assert!(decision.retry_after.is_some());
        }
    }
    allowed
}

/// One check, with the instants just before it was sent and just after it came back.
async fn timed(
    limiter: &Arc<dyn RateLimiter>,
    key: &str,
    limit: u64,
    window: Duration,
) -> (RateDecision, Instant, Instant) {
    let before = Instant::now();
    let decision = limiter.check(key, limit, window).await.unwrap();
    (decision, before, Instant::now())
}

/// `actual` lies in `[low, high]`, give or take 5 ms for the limiter's clock (Redis's `TIME`)
/// against this process's.
fn between(actual: Duration, low: Duration, high: Duration, what: &str) {
    let slack = Duration::from_millis(5);
    assert!(
        actual + slack >= low && actual <= high + slack,
        "{what}: {actual:?}, expected between {low:?} and {high:?}"
    );
}

// ---- the conformance suite; keys differ between functions so that the cluster can run them
// ---- all on one limiter ----

async fn exactly_n_of_n_plus_k_concurrent_checks_are_allowed(limiter: Arc<dyn RateLimiter>) {
    let window = Duration::from_secs(60);
    assert_eq!(
        burst(std::slice::from_ref(&limiter), "burst-a", 45, 30, window).await,
        30
    );
    // And nothing more in the same window.
    let d = limiter.check("burst-a", 30, window).await.unwrap();
    assert!(!d.allowed);
    // A limit of 1.
    assert_eq!(burst(&[limiter], "burst-b", 10, 1, window).await, 1);
}

async fn decisions_and_headers_are_right_at_the_window_edges(limiter: Arc<dyn RateLimiter>) {
    // 2 per 1 s: an emission interval of 500 ms. Every check is timed from just before it was
    // sent to just after it came back, and the limiter's answers are compared with what GCRA
    // gives for any moment inside those spans: a test thread that a loaded machine holds up
    // widens the span, it does not fail the test.
    let (limit, window) = (2, Duration::from_secs(1));
    let ms = Duration::from_millis;
    let key = "edges-a";
    let (first, b1, a1) = timed(&limiter, key, limit, window).await;
    assert!(first.allowed && first.retry_after.is_none());
    assert_eq!(first.remaining, 1);
    // The time until the whole quota is back: one interval from the first check, whenever it ran.
    between(first.reset_after, ms(500), ms(500), "reset after one");
    assert_eq!(
        rate_limit_headers("edges", &first, window),
        vec![
            ("RateLimit-Policy", "\"edges\";q=2;w=1".to_owned()),
            ("RateLimit", "\"edges\";r=1;t=1".to_owned()),
        ]
    );
    // The first check ran at t1 in [b1, a1]; the quota is whole again at t1 + 1 s, and one more
    // request is allowed from t1 + 500 ms.
    let (second, b2, a2) = timed(&limiter, key, limit, window).await;
    assert!(second.allowed);
    assert_eq!(second.remaining, 0);
    between(
        second.reset_after,
        (b1 + ms(1000)).saturating_duration_since(a2),
        (a1 + ms(1000)).saturating_duration_since(b2),
        "reset after two",
    );
    let (refused, b3, a3) = timed(&limiter, key, limit, window).await;
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after.unwrap();
    between(
        retry,
        (b1 + ms(500)).saturating_duration_since(a3),
        (a1 + ms(500)).saturating_duration_since(b3),
        "retry after",
    );
    let headers = rate_limit_headers("edges", &refused, window);
    assert_eq!(headers[1], ("RateLimit", "\"edges\";r=0;t=1".to_owned()));
    assert_eq!(headers[2], ("Retry-After", "1".to_owned()));

    // Halfway to Retry-After: still refused, with the rest of the wait to go. Just after: exactly
    // one more.
    tokio::time::sleep(retry / 2).await;
    let (early, b4, a4) = timed(&limiter, key, limit, window).await;
    assert!(!early.allowed, "allowed {early:?} before its Retry-After");
    between(
        early.retry_after.unwrap(),
        (b1 + ms(500)).saturating_duration_since(a4),
        (a1 + ms(500)).saturating_duration_since(b4),
        "retry after, halfway",
    );
    tokio::time::sleep(early.retry_after.unwrap() + ms(20)).await;
    let again = limiter.check(key, limit, window).await.unwrap();
    assert!(again.allowed, "refused after its Retry-After: {again:?}");
    assert_eq!(again.remaining, 0);
    assert!(!limiter.check(key, limit, window).await.unwrap().allowed);

    // A whole window after the last allowed request the full quota is back.
    tokio::time::sleep(window + ms(20)).await;
    let full = limiter.check(key, limit, window).await.unwrap();
    assert!(full.allowed);
    assert_eq!(full.remaining, 1);

    // A 1.5 s window rounds up in the headers; a refused decision never says Retry-After: 0.
    let (limit, window) = (3, Duration::from_millis(1500));
    let (_, b1, a1) = timed(&limiter, "edges-b", limit, window).await;
    for _ in 0..2 {
        assert!(
            limiter
                .check("edges-b", limit, window)
                .await
                .unwrap()
                .allowed
        );
    }
    let (refused, b4, a4) = timed(&limiter, "edges-b", limit, window).await;
    between(
        refused.retry_after.unwrap(),
        (b1 + ms(500)).saturating_duration_since(a4),
        (a1 + ms(500)).saturating_duration_since(b4),
        "retry after, 1.5 s window",
    );
    let headers = rate_limit_headers("b", &refused, window);
    assert_eq!(headers[0].1, "\"b\";q=3;w=2");
    assert_eq!(headers[1].1, "\"b\";r=0;t=2");
    assert_eq!(headers[2].1, "1");
}

async fn keys_are_counted_apart(limiter: Arc<dyn RateLimiter>) {
    let window = Duration::from_secs(60);
    for key in ["apart-a", "apart-b", "apart-{c}", "apart-a}"] {
        assert!(
            limiter.check(key, 1, window).await.unwrap().allowed,
            "{key}"
        );
    }
    for key in ["apart-a", "apart-b", "apart-{c}", "apart-a}"] {
        assert!(
            !limiter.check(key, 1, window).await.unwrap().allowed,
            "{key}"
        );
    }
}

async fn a_limit_of_zero_refuses_everything(limiter: Arc<dyn RateLimiter>) {
    let d: RateDecision = limiter
        .check("zero", 0, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_secs(10)));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::memory_limiter().await).await;
                }
            )*
        }
        mod redis {
            use super::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = RedisServer::start().await;
                    super::$name(super::redis_limiter(server.url()).await).await;
                    drop(server);
                }
            )*
        }
        /// One cluster for the whole suite.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cluster_passes_the_suite() {
            let cluster = RedisCluster::start().await;
            eprintln!("cluster of 3 masters ready in {:?}", cluster.started_in);
            let limiter = redis_limiter(cluster.url()).await;
            $(
                $name(limiter.clone()).await;
            )*
            // Keys spread over the three masters, each counted exactly.
            let other = redis_limiter(cluster.url()).await;
            for i in 0..6 {
                let key = format!("spread-{i}");
                assert_eq!(burst(&[limiter.clone(), other.clone()], &key, 15, 10, Duration::from_secs(60)).await, 10, "{key}");
            }
        }
    };
}

conformance!(
    exactly_n_of_n_plus_k_concurrent_checks_are_allowed,
    decisions_and_headers_are_right_at_the_window_edges,
    keys_are_counted_apart,
    a_limit_of_zero_refuses_everything,
);

// ---- redis only ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_allow_exactly_n_together() {
    let server = RedisServer::start().await;
    let a = redis_limiter(server.url()).await;
    let b = redis_limiter(server.url()).await;
    let window = Duration::from_secs(60);
    assert_eq!(
        burst(&[a.clone(), b.clone()], "shared", 60, 40, window).await,
        40
    );
    assert!(!a.check("shared", 40, window).await.unwrap().allowed);
    assert!(!b.check("shared", 40, window).await.unwrap().allowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_is_refilled_with_eval() {
    let server = RedisServer::start().await;
    let limiter = redis_limiter(server.url()).await;
    let window = Duration::from_secs(60);
    assert!(limiter.check("noscript", 2, window).await.unwrap().allowed);
    assert_eq!(redis_cli(server.port, &["script", "flush"]).trim(), "OK");
    let d = limiter.check("noscript", 2, window).await.unwrap();
    assert!(d.allowed && d.remaining == 0, "{d:?}");
    // The one after NOSCRIPT ran once, not twice: the third is refused.
    assert!(!limiter.check("noscript", 2, window).await.unwrap().allowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_an_error_never_an_allowance() {
    let mut server = RedisServer::start().await;
    let limiter = redis_limiter(server.url()).await;
    assert!(
        limiter
            .check("down", 5, Duration::from_secs(60))
            .await
            .unwrap()
            .allowed
    );
    server.kill();
    let start = Instant::now();
    let result = limiter.check("down", 5, Duration::from_secs(60)).await;
    assert!(result.is_err(), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(1));
}
