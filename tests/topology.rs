//! Redis Sentinel: all three stores on one master, one replica and three sentinels; the master
//! is killed, and the stores fail closed during the failover (errors, never a false "Fresh",
//! "not revoked" or allowance) and work again after the promotion without being rebuilt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use portcullis::config::{OnStoreError, StoreBackend, StoreConfig};
use portcullis::store::{self, NonceOutcome, Revocation};
use support::redis::{redis_cli, RedisSentinel};

const TTL: Duration = Duration::from_secs(600);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_fails_closed_then_recovers_without_rebuilding_the_stores() {
    let mut sentinel = RedisSentinel::start().await;
    eprintln!("sentinel setup ready in {:?}", sentinel.started_in);
    let stores = store::connect_all(&StoreConfig {
        backend: StoreBackend::Redis {
            url: sentinel.url(),
        },
        on_error: OnStoreError::Deny,
        timeout: Duration::from_millis(100),
        revocation_max_lag: Duration::from_secs(1),
        max_nonces: store::memory::DEFAULT_CAPACITY,
    })
    .await
    .unwrap();
    let t = now();
    let revoked = Revocation::Token {
        jti: "jti-failover".into(),
        exp: t + 600,
    };
    let start = Instant::now();
    while stores
        .revocations
        .is_revoked(Some("x"), None, None, t)
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stores.revocations.revoke(&revoked).await.unwrap();
    assert_eq!(
        stores
            .nonces
            .record_once("k", "before-failover-0001", TTL)
            .await,
        Ok(NonceOutcome::Fresh)
    );
    let window = Duration::from_secs(60);
    for _ in 0..3 {
        assert!(
            stores
                .rate_limits
                .check("failover", 3, window)
                .await
                .unwrap()
                .allowed
        );
    }
    // Wait until the replica holds all of it, so that what was recorded survives the failover.
    let start = Instant::now();
    while redis_cli(
        sentinel.replica,
        &["hget", "{portcullis}:revocations", "jti:jti-failover"],
    )
    .trim()
    .is_empty()
        || redis_cli(sentinel.replica, &["exists", "portcullis:rl:{failover}"]).trim() != "1"
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the replica did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let old_master = sentinel.master;
    sentinel.kill_master();
    let killed = Instant::now();
    let mut errors = 0;
    let mut recovered = None;
    let mut attempt = 0u32;
    while killed.elapsed() < Duration::from_secs(30) {
        attempt += 1;
        // The nonce recorded before the kill must never come back as fresh.
        let replay = stores
            .nonces
            .record_once("k", "before-failover-0001", TTL)
            .await;
        assert_ne!(
            replay,
            Ok(NonceOutcome::Fresh),
            "a recorded nonce passed as fresh during the failover"
        );
        // The revoked token must never pass as not revoked.
        let check = stores
            .revocations
            .is_revoked(Some("jti-failover"), None, None, t);
        assert_ne!(
            check,
            Ok(false),
            "a revoked token passed during the failover"
        );
        // A revoked token is refused from the mirror however old it is; only a token never
        // revoked needs the mirror current, so it tells when the revocations are back.
        let current = stores
            .revocations
            .is_revoked(Some("jti-never-revoked"), None, None, t);
        assert_ne!(current, Ok(true), "a token never revoked passed as revoked");
        // The exhausted bucket must never allow.
        let limited = stores.rate_limits.check("failover", 3, window).await;
        assert!(
            !matches!(limited, Ok(ref d) if d.allowed),
            "the rate limit allowed during the failover: {limited:?}"
        );
        let fresh = stores
            .nonces
            .record_once("k", &format!("during-failover-{attempt:06}"), TTL)
            .await;
        if replay.is_ok() && check.is_ok() && current.is_ok() && limited.is_ok() && fresh.is_ok() {
            recovered = Some(killed.elapsed());
            break;
        }
        errors += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered =
        recovered.expect("the stores did not recover within 30 s of the master's death");
    let promoted = sentinel.current_master();
    eprintln!(
        "master {old_master} killed: {errors} rounds of errors, every store answering again after {recovered:?} (master now {promoted:?})"
    );
    assert_ne!(promoted, Some(old_master));
    assert!(errors > 0, "the failover cannot have been instant");
    // After the promotion: the same stores, with what was recorded before.
    assert_eq!(
        stores
            .nonces
            .record_once("k", "before-failover-0001", TTL)
            .await,
        Ok(NonceOutcome::Replayed)
    );
    assert_eq!(
        stores
            .revocations
            .is_revoked(Some("jti-failover"), None, None, t),
        Ok(true)
    );
    assert_eq!(
        stores
            .nonces
            .record_once("k", "after-failover-0001", TTL)
            .await,
        Ok(NonceOutcome::Fresh)
    );
    assert_eq!(stores.revocations.ping().await, Ok(()));
}
