//! The nonce stores: one conformance suite run against both backends (memory, and a real
//! `redis-server`), then what only Redis can do wrong: die mid-test, come back, or be absent
//! when the proxy starts.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::config::{OnStoreError, StoreBackend, StoreConfig};
use portcullis::store::{self, NonceOutcome, NonceStore};
use support::redis::{free_port, RedisServer, ReplyCutter};
use tokio::sync::Barrier;

use NonceOutcome::{Fresh, Replayed};

const TTL: Duration = Duration::from_secs(600);

fn store_config(backend: StoreBackend) -> StoreConfig {
    StoreConfig {
        backend,
        on_error: OnStoreError::Deny,
        // Generous, so that a loaded machine does not turn a slow answer into an error; the
        // tests of a Redis that is down use a short one (redis_store_failing_fast).
        timeout: Duration::from_secs(2),
        revocation_max_lag: Duration::from_secs(5),
        max_nonces: store::memory::DEFAULT_CAPACITY,
    }
}

async fn memory_store() -> Arc<dyn NonceStore> {
    store::connect(&store_config(StoreBackend::Memory))
        .await
        .expect("the memory store always builds")
}

async fn redis_store(url: String) -> Arc<dyn NonceStore> {
    let store = store::connect(&store_config(StoreBackend::Redis { url }))
        .await
        .expect("a redis:// url to 127.0.0.1 is valid");
    // connect waits a moment for the connections, not until they are up: the suite starts
    // once Redis answers through the store.
    let start = Instant::now();
    while store.ping().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "redis never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store
}

/// A store with a 100 ms timeout, for the tests of a Redis that is down or comes back.
async fn redis_store_failing_fast(url: String) -> Arc<dyn NonceStore> {
    let mut config = store_config(StoreBackend::Redis { url });
    config.timeout = Duration::from_millis(100);
    store::connect(&config)
        .await
        .expect("a redis:// url to 127.0.0.1 is valid")
}

// ---- the conformance suite: every function takes any store ----

async fn first_use_is_fresh_and_second_is_replayed(store: Arc<dyn NonceStore>) {
    let nonce = "q3J8x0bV2mN5pL7tK9wZ";
    assert_eq!(
        store.record_once("client-42-2026-11", nonce, TTL).await,
        Ok(Fresh)
    );
    assert_eq!(
        store.record_once("client-42-2026-11", nonce, TTL).await,
        Ok(Replayed)
    );
    assert_eq!(
        store.record_once("client-42-2026-11", nonce, TTL).await,
        Ok(Replayed)
    );
}

async fn the_same_nonce_under_distinct_key_ids_does_not_collide(store: Arc<dyn NonceStore>) {
    let nonce = "shared-nonce-0000000001";
    assert_eq!(store.record_once("client-a", nonce, TTL).await, Ok(Fresh));
    assert_eq!(store.record_once("client-b", nonce, TTL).await, Ok(Fresh));
    // A key id that is a prefix of another, with the nonce shifted, is still another pair.
    assert_eq!(
        store
            .record_once("client", "-a-0000000000000001", TTL)
            .await,
        Ok(Fresh)
    );
    assert_eq!(
        store.record_once("client-a", nonce, TTL).await,
        Ok(Replayed)
    );
    assert_eq!(
        store.record_once("client-b", nonce, TTL).await,
        Ok(Replayed)
    );
}

async fn a_nonce_is_forgotten_after_its_ttl(store: Arc<dyn NonceStore>) {
    // A TTL long enough that the replay below is checked inside it on a loaded machine.
    let ttl = Duration::from_secs(1);
    let nonce = "short-lived-nonce-000001";
    assert_eq!(store.record_once("k", nonce, ttl).await, Ok(Fresh));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.record_once("k", nonce, ttl).await, Ok(Replayed));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.record_once("k", nonce, ttl).await, Ok(Fresh));
    assert_eq!(store.record_once("k", nonce, ttl).await, Ok(Replayed));
}

async fn fifty_concurrent_uses_of_one_nonce_give_exactly_one_fresh(store: Arc<dyn NonceStore>) {
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.record_once("k", "raced-nonce-0000000001", TTL).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        let outcome = task.await.expect("a record_once task panicked");
        outcomes.push(outcome.expect("record_once failed"));
    }
    let fresh = outcomes.iter().filter(|o| **o == Fresh).count();
    assert_eq!(fresh, 1, "{outcomes:?}");
}

async fn ping_answers_when_the_store_is_up(store: Arc<dyn NonceStore>) {
    assert_eq!(store.ping().await, Ok(()));
}

/// Runs every suite function against a memory store and against a fresh redis-server each.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::memory_store().await).await;
                }
            )*
        }
        mod redis {
            use super::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = RedisServer::start().await;
                    super::$name(super::redis_store(server.url()).await).await;
                    drop(server);
                }
            )*
        }
        /// One cluster for the whole suite (the nonces differ between functions).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cluster_passes_the_suite() {
            let cluster = support::redis::RedisCluster::start().await;
            let store = redis_store(cluster.url()).await;
            $(
                $name(store.clone()).await;
            )*
        }
    };
}

conformance!(
    first_use_is_fresh_and_second_is_replayed,
    the_same_nonce_under_distinct_key_ids_does_not_collide,
    a_nonce_is_forgotten_after_its_ttl,
    fifty_concurrent_uses_of_one_nonce_give_exactly_one_fresh,
    ping_answers_when_the_store_is_up,
);

// ---- redis only ----

/// Calls `record_once` with a new nonce every 50 ms until it is Ok, for at most `limit`.
async fn wait_until_ok(store: &Arc<dyn NonceStore>, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let nonce = format!("recovery-nonce-{attempt:08}");
        if store.record_once("k", &nonce, TTL).await.is_ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "the store did not recover within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_gives_errors_within_a_second_and_recovers_after_restart() {
    let mut server = RedisServer::start().await;
    let store = redis_store_failing_fast(server.url()).await;
    wait_until_ok(&store, Duration::from_secs(5)).await;
    assert_eq!(
        store.record_once("k", "before-the-kill-000001", TTL).await,
        Ok(Fresh)
    );

    server.kill();
    let start = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(1),
        store.record_once("k", "after-the-kill-0000001", TTL),
    )
    .await
    .expect("record_once hung after redis was killed");
    let to_error = start.elapsed();
    assert!(result.is_err(), "{result:?}");
    eprintln!("record_once after kill: {result:?} in {to_error:?}");
    // Every later call fails as fast while redis stays down (2 s, long enough for the
    // reconnect backoff to reach its 1 s ceiling), ping included.
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        let nonce = format!("while-down-nonce-{i:06}");
        let result =
            tokio::time::timeout(Duration::from_secs(1), store.record_once("k", &nonce, TTL))
                .await
                .expect("record_once hung while redis was down");
        assert!(result.is_err(), "{result:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    let ping = tokio::time::timeout(Duration::from_secs(1), store.ping())
        .await
        .expect("ping hung while redis was down");
    assert!(ping.is_err(), "{ping:?}");

    server.restart().await;
    let to_recover = wait_until_ok(&store, Duration::from_secs(5)).await;
    eprintln!("record_once Ok again {to_recover:?} after redis answered PING");
    assert_eq!(store.ping().await, Ok(()));
    // And it still tells replays apart.
    assert_eq!(
        store.record_once("k", "after-restart-0000001", TTL).await,
        Ok(Fresh)
    );
    assert_eq!(
        store.record_once("k", "after-restart-0000001", TTL).await,
        Ok(Replayed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_start_does_not_block_startup() {
    // Nothing listens here: the port was free a moment ago and nobody started a server on it.
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let start = Instant::now();
    let store = redis_store_failing_fast(url).await;
    let startup = start.elapsed();
    eprintln!("connect to an unreachable redis returned in {startup:?}");
    assert!(startup < Duration::from_secs(2), "{startup:?}");

    let start = Instant::now();
    let result = store.record_once("k", "no-redis-nonce-000001", TTL).await;
    assert!(result.is_err(), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(store.ping().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_started_after_the_store_is_picked_up_without_reconnecting_by_hand() {
    let port = free_port();
    let store = redis_store_failing_fast(format!("redis://127.0.0.1:{port}/0")).await;
    assert!(store.ping().await.is_err());

    let _server = RedisServer::start_on(port).await;
    let to_recover = wait_until_ok(&store, Duration::from_secs(5)).await;
    eprintln!("record_once Ok {to_recover:?} after a late redis answered PING");
    assert_eq!(store.ping().await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_an_error_and_never_a_replay() {
    let server = RedisServer::start().await;
    let cutter = ReplyCutter::start(server.addr()).await;
    // A long timeout, so that a client that reconnected and sent the SET NX again would have
    // the time to do it and answer Replayed.
    let mut config = store_config(StoreBackend::Redis { url: cutter.url() });
    config.timeout = Duration::from_secs(3);
    let store = store::connect(&config)
        .await
        .expect("a redis:// url to 127.0.0.1 is valid");
    assert_eq!(
        store.record_once("k", "warm-up-nonce-0000001", TTL).await,
        Ok(Fresh)
    );

    cutter.cut_next_reply();
    let nonce = "reply-lost-nonce-00001";
    let result = store.record_once("k", nonce, TTL).await;
    assert!(
        matches!(result, Err(store::StoreError::Unavailable { .. })),
        "a SET NX whose reply was lost must be an error, got {result:?}"
    );
    // Redis did apply it: the client learns that only from a later use of the same nonce,
    // which is then a replay indeed.
    wait_until_ok(&store, Duration::from_secs(5)).await;
    assert_eq!(store.record_once("k", nonce, TTL).await, Ok(Replayed));
}

#[tokio::test]
async fn an_invalid_redis_url_is_an_error_at_connect() {
    let result = store::connect(&store_config(StoreBackend::Redis {
        url: "memcached://127.0.0.1:11211".to_owned(),
    }))
    .await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, store::StoreError::InvalidUrl { .. }),
        "{error:?}"
    );
}
