//! The revocation stores: one conformance suite run against memory, a real `redis-server` and
//! a real three-master Redis Cluster, then what only the Redis mirror can get wrong: another
//! replica's revocation, a Redis that dies (errors after `revocation_max_lag`, not before) and
//! comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::config::{OnStoreError, StoreBackend, StoreConfig};
use portcullis::store::{self, Revocation, RevocationStore};
use support::redis::{free_port, RedisCluster, RedisServer};

fn store_config(backend: StoreBackend, max_lag: Duration) -> StoreConfig {
    StoreConfig {
        backend,
        on_error: OnStoreError::Deny,
        timeout: Duration::from_millis(100),
        revocation_max_lag: max_lag,
        max_nonces: store::memory::DEFAULT_CAPACITY,
    }
}

async fn memory_store() -> Arc<dyn RevocationStore> {
    store::connect_all(&store_config(StoreBackend::Memory, Duration::from_secs(5)))
        .await
        .unwrap()
        .revocations
}

async fn redis_store(url: String, max_lag: Duration) -> Arc<dyn RevocationStore> {
    store::connect_all(&store_config(StoreBackend::Redis { url }, max_lag))
        .await
        .expect("a redis url to 127.0.0.1 is valid")
        .revocations
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(jti: &str, exp: i64) -> Revocation {
    Revocation::Token {
        jti: jti.to_owned(),
        exp,
    }
}

fn subject(sub: &str, before: i64) -> Revocation {
    Revocation::Subject {
        sub: sub.to_owned(),
        before,
    }
}

/// Waits until the store answers `is_revoked` (a Redis mirror's first sync), for at most 5 s.
async fn wait_current(store: &Arc<dyn RevocationStore>) -> Duration {
    let start = Instant::now();
    while store.is_revoked(Some("probe"), None, None, now()).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the revocation store did not become current"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

// ---- the conformance suite: every function takes any store; ids differ between functions so
// ---- that the cluster can run them all on one store ----

async fn a_revoked_token_is_revoked_until_unrevoked(store: Arc<dyn RevocationStore>) {
    wait_current(&store).await;
    let t = now();
    let exp = t + 3600;
    assert_eq!(
        store.is_revoked(Some("jti-a1"), Some("alice"), Some(t), t),
        Ok(false)
    );
    store.revoke(&token("jti-a1", exp)).await.unwrap();
    assert_eq!(
        store.is_revoked(Some("jti-a1"), Some("alice"), Some(t), t),
        Ok(true)
    );
    assert_eq!(store.is_revoked(Some("jti-a1"), None, None, t), Ok(true));
    // Another jti of the same subject is not touched.
    assert_eq!(
        store.is_revoked(Some("jti-a2"), Some("alice"), Some(t), t),
        Ok(false)
    );
    assert_eq!(store.is_revoked(None, Some("alice"), None, t), Ok(false));

    store.unrevoke(&token("jti-a1", exp)).await.unwrap();
    assert_eq!(
        store.is_revoked(Some("jti-a1"), Some("alice"), Some(t), t),
        Ok(false)
    );
    // Undoing something that is not there is not an error.
    store.unrevoke(&token("jti-a1", exp)).await.unwrap();
}

async fn a_subject_revocation_covers_tokens_issued_before_and_tokens_without_iat(
    store: Arc<dyn RevocationStore>,
) {
    wait_current(&store).await;
    let t = now();
    let before = t - 100;
    store.revoke(&subject("bob", before)).await.unwrap();
    assert_eq!(
        store.is_revoked(Some("jti-b1"), Some("bob"), Some(before - 1), t),
        Ok(true)
    );
    assert_eq!(
        store.is_revoked(Some("jti-b1"), Some("bob"), Some(before), t),
        Ok(false),
        "iat == before is not covered"
    );
    assert_eq!(
        store.is_revoked(Some("jti-b1"), Some("bob"), Some(before + 1), t),
        Ok(false)
    );
    assert_eq!(
        store.is_revoked(Some("jti-b1"), Some("bob"), None, t),
        Ok(true),
        "a token without iat cannot prove it is newer"
    );
    assert_eq!(store.is_revoked(None, Some("bob"), None, t), Ok(true));
    assert_eq!(
        store.is_revoked(Some("jti-b1"), Some("bobby"), None, t),
        Ok(false)
    );
    assert_eq!(
        store.is_revoked(Some("jti-b1"), None, Some(before - 1), t),
        Ok(false)
    );
}

async fn the_latest_before_wins_and_undo_leaves_a_later_one(store: Arc<dyn RevocationStore>) {
    wait_current(&store).await;
    let t = now();
    store.revoke(&subject("carol", t - 100)).await.unwrap();
    store.revoke(&subject("carol", t - 50)).await.unwrap();
    // An earlier `before` posted later does not weaken the revocation.
    store.revoke(&subject("carol", t - 200)).await.unwrap();
    assert_eq!(
        store.is_revoked(None, Some("carol"), Some(t - 60), t),
        Ok(true)
    );
    assert_eq!(
        store.is_revoked(None, Some("carol"), Some(t - 50), t),
        Ok(false)
    );

    // Undoing the older one leaves the later one in force.
    store.unrevoke(&subject("carol", t - 100)).await.unwrap();
    assert_eq!(
        store.is_revoked(None, Some("carol"), Some(t - 60), t),
        Ok(true)
    );
    // Undoing the latest one removes it.
    store.unrevoke(&subject("carol", t - 50)).await.unwrap();
    assert_eq!(
        store.is_revoked(None, Some("carol"), Some(t - 60), t),
        Ok(false)
    );
    assert_eq!(store.is_revoked(None, Some("carol"), None, t), Ok(false));

    // For a jti the later exp is kept.
    store.revoke(&token("jti-c1", t + 1000)).await.unwrap();
    store.revoke(&token("jti-c1", t + 10)).await.unwrap();
    let listed = list_all(&store, 100).await;
    assert!(listed.contains(&token("jti-c1", t + 1000)), "{listed:?}");
}

async fn token_revocations_are_forgotten_after_their_exp(store: Arc<dyn RevocationStore>) {
    wait_current(&store).await;
    let t = now();
    let grace = portcullis::store::revocation::TOKEN_REVOCATION_GRACE_SECS;
    // Expired, but within the grace that covers the JWT leeway: still revoked.
    store.revoke(&token("jti-d1", t - 10)).await.unwrap();
    assert_eq!(store.is_revoked(Some("jti-d1"), None, None, t), Ok(true));
    // Past its exp and the grace: forgotten, and not listed.
    store
        .revoke(&token("jti-d2", t - grace - 10))
        .await
        .unwrap();
    assert_eq!(store.is_revoked(Some("jti-d2"), None, None, t), Ok(false));
    // The same revocation, seen from later: forgotten too.
    assert_eq!(
        store.is_revoked(Some("jti-d1"), None, None, t + grace + 20),
        Ok(false)
    );
    let listed = list_all(&store, 100).await;
    assert!(listed.contains(&token("jti-d1", t - 10)), "{listed:?}");
    assert!(
        !listed
            .iter()
            .any(|r| matches!(r, Revocation::Token { jti, .. } if jti == "jti-d2")),
        "{listed:?}"
    );
}

/// Every page of `list`, checking that pages hold at most `limit` and never repeat.
async fn list_all(store: &Arc<dyn RevocationStore>, limit: usize) -> Vec<Revocation> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let (page, next) = store.list(cursor.as_deref(), limit).await.unwrap();
        assert!(page.len() <= limit);
        for r in &page {
            assert!(!all.contains(r), "{r:?} listed twice");
        }
        all.extend(page);
        match next {
            Some(next) => cursor = Some(next),
            None => return all,
        }
    }
    panic!("list never ended");
}

async fn list_pages_in_a_stable_order(store: Arc<dyn RevocationStore>) {
    wait_current(&store).await;
    let t = now();
    let mut expected = Vec::new();
    for i in (0..7).rev() {
        let r = token(&format!("list-jti-{i}"), t + 1000 + i);
        store.revoke(&r).await.unwrap();
        expected.push(r);
    }
    for i in 0..4 {
        let r = subject(&format!("list-sub-{i}"), t - i);
        store.revoke(&r).await.unwrap();
        expected.push(r);
    }
    let ours = |all: Vec<Revocation>| -> Vec<Revocation> {
        all.into_iter()
            .filter(|r| match r {
                Revocation::Token { jti, .. } => jti.starts_with("list-jti-"),
                Revocation::Subject { sub, .. } => sub.starts_with("list-sub-"),
            })
            .collect()
    };
    // Tokens first, then subjects, each sorted by jti or sub.
    expected.sort_by_key(|r| match r {
        Revocation::Token { jti, .. } => (0, jti.clone()),
        Revocation::Subject { sub, .. } => (1, sub.clone()),
    });
    for limit in [1, 2, 3, 5, 100] {
        assert_eq!(
            ours(list_all(&store, limit).await),
            expected,
            "limit {limit}"
        );
    }
    let (first, next) = store.list(None, 1000).await.unwrap();
    assert!(next.is_none());
    assert_eq!(ours(first), expected);
    // A revocation removed between pages is simply not on the later page.
    let (page, cursor) = store.list(None, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    store.unrevoke(&token("list-jti-6", 0)).await.unwrap();
    let mut rest = list_all_from(&store, cursor).await;
    rest.extend(page);
    assert!(!rest.contains(&expected[6]), "list-jti-6 was undone");
}

async fn list_all_from(
    store: &Arc<dyn RevocationStore>,
    mut cursor: Option<String>,
) -> Vec<Revocation> {
    let mut all = Vec::new();
    while let Some(c) = cursor {
        let (page, next) = store.list(Some(&c), 2).await.unwrap();
        all.extend(page);
        cursor = next;
    }
    all
}

async fn ping_answers_when_the_store_is_up(store: Arc<dyn RevocationStore>) {
    wait_current(&store).await;
    assert_eq!(store.ping().await, Ok(()));
}

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
                    super::$name(super::redis_store(server.url(), std::time::Duration::from_secs(5)).await).await;
                    drop(server);
                }
            )*
        }
        /// One cluster for the whole suite (a cluster takes a couple of seconds to start).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cluster_passes_the_suite() {
            let cluster = RedisCluster::start().await;
            eprintln!("cluster of 3 masters ready in {:?}", cluster.started_in);
            let store = redis_store(cluster.url(), Duration::from_secs(5)).await;
            eprintln!("cluster mirror current after {:?}", wait_current(&store).await);
            $(
                $name(store.clone()).await;
            )*
            // And a second replica on the same cluster sees the first one's revocations.
            let other = redis_store(cluster.url(), Duration::from_secs(5)).await;
            propagates(&store, &other, "jti-cluster-1").await;
        }
    };
}

conformance!(
    a_revoked_token_is_revoked_until_unrevoked,
    a_subject_revocation_covers_tokens_issued_before_and_tokens_without_iat,
    the_latest_before_wins_and_undo_leaves_a_later_one,
    token_revocations_are_forgotten_after_their_exp,
    list_pages_in_a_stable_order,
    ping_answers_when_the_store_is_up,
);

// ---- redis only ----

/// The prune runs by the Redis server's clock (`TIME` in the script), and removes what it
/// prunes from Redis itself, not only from the replica's mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_revocations_are_pruned_from_redis_by_its_clock() {
    let server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&store).await;
    let t = now();
    let grace = portcullis::store::revocation::TOKEN_REVOCATION_GRACE_SECS;
    let hash = "{portcullis}:revocations";
    let port = server.addr().port();
    for (field, exp) in [("jti:old", t - grace - 100), ("jti:recent", t - 10)] {
        let exp = exp.to_string();
        support::redis::redis_cli(port, &["HSET", hash, field, &exp]);
    }
    let exists = |field: &str| support::redis::redis_cli(port, &["HEXISTS", hash, field]);
    assert_eq!(exists("jti:old").trim(), "1");
    // Listing loads the whole hash, pruning it first.
    store.list(None, 100).await.unwrap();
    assert_eq!(
        exists("jti:old").trim(),
        "0",
        "an expired revocation was kept in Redis"
    );
    assert_eq!(
        exists("jti:recent").trim(),
        "1",
        "a revocation within the grace was pruned"
    );
}

/// Revokes `jti` on `a` and waits for `b` (only ever asked `is_revoked`, a local lookup) to
/// see it, then the same for the undo. Returns both times; each must be under a second.
async fn propagates(
    a: &Arc<dyn RevocationStore>,
    b: &Arc<dyn RevocationStore>,
    jti: &str,
) -> (Duration, Duration) {
    wait_current(b).await;
    let t = now();
    assert_eq!(b.is_revoked(Some(jti), None, None, t), Ok(false));
    let start = Instant::now();
    a.revoke(&token(jti, t + 600)).await.unwrap();
    while b.is_revoked(Some(jti), None, None, t) != Ok(true) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the revocation did not reach the other replica within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let revoked = start.elapsed();
    let start = Instant::now();
    a.unrevoke(&token(jti, t + 600)).await.unwrap();
    while b.is_revoked(Some(jti), None, None, t) != Ok(false) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the undo did not reach the other replica within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let undone = start.elapsed();
    eprintln!("propagation to the other replica: revoke {revoked:?}, unrevoke {undone:?}");
    (revoked, undone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_rejects_the_token_on_another_within_a_second() {
    let server = RedisServer::start().await;
    let a = redis_store(server.url(), Duration::from_secs(5)).await;
    let b = redis_store(server.url(), Duration::from_secs(5)).await;
    for i in 0..5 {
        propagates(&a, &b, &format!("jti-prop-{i}")).await;
    }
    // A subject revocation too.
    let t = now();
    a.revoke(&subject("dave", t)).await.unwrap();
    let start = Instant::now();
    while b.is_revoked(None, Some("dave"), Some(t - 1), t) != Ok(true) {
        assert!(start.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Two replicas change the same entries at the same moment, one revoking and the other
/// undoing. Whichever order Redis runs them in, once both calls have returned and the events
/// have arrived, each replica's mirror holds what Redis holds: neither replica's own change
/// lands in its mirror on top of a later one from the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revokes_and_undos_on_two_replicas_leave_every_mirror_as_redis_holds_it() {
    let server = RedisServer::start().await;
    let a = redis_store(server.url(), Duration::from_secs(5)).await;
    let b = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&a).await;
    wait_current(&b).await;
    let t = now();
    const ROUNDS: usize = 400;
    for i in 0..ROUNDS {
        let revocation = token(&format!("jti-race-{i}"), t + 600);
        // Revoked to begin with; then one replica undoes it while the other revokes it again.
        a.revoke(&revocation).await.unwrap();
        let (undo, redo) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (undo, redo) = (undo.clone(), redo.clone());
        let (r1, r2) = (revocation.clone(), revocation.clone());
        let undone = tokio::spawn(async move { undo.unrevoke(&r1).await });
        let redone = tokio::spawn(async move { redo.revoke(&r2).await });
        undone.await.unwrap().unwrap();
        redone.await.unwrap().unwrap();
    }
    // Every event has arrived well before this (and before the 30-s resync that would mend a
    // wrong mirror). A replica started now loads what Redis holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&c).await;
    let mut wrong = Vec::new();
    for i in 0..ROUNDS {
        let jti = format!("jti-race-{i}");
        let held = c.is_revoked(Some(&jti), None, None, t).unwrap();
        for (name, replica) in [("a", &a), ("b", &b)] {
            let mirrored = replica.is_revoked(Some(&jti), None, None, t).unwrap();
            if mirrored != held {
                wrong.push(format!("{jti} on {name}: {mirrored}, redis {held}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "mirrors that differ from redis: {wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_loads_the_revocations_made_before() {
    let server = RedisServer::start().await;
    let a = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&a).await;
    let t = now();
    a.revoke(&token("jti-early", t + 600)).await.unwrap();
    a.revoke(&subject("erin", t)).await.unwrap();
    let b = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&b).await;
    assert_eq!(b.is_revoked(Some("jti-early"), None, None, t), Ok(true));
    assert_eq!(b.is_revoked(None, Some("erin"), None, t), Ok(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_answers_from_the_mirror_within_the_lag_then_fails_closed_until_restarted() {
    let max_lag = Duration::from_secs(1);
    let mut server = RedisServer::start().await;
    let a = redis_store(server.url(), max_lag).await;
    let b = redis_store(server.url(), max_lag).await;
    wait_current(&a).await;
    wait_current(&b).await;
    let t = now();
    a.revoke(&token("jti-k1", t + 600)).await.unwrap();
    let start = Instant::now();
    while b.is_revoked(Some("jti-k1"), None, None, t) != Ok(true) {
        assert!(start.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    server.kill();
    let killed = Instant::now();
    // Heartbeats go every max_lag / 4: the last confirmation is at most that old (plus a
    // round trip), so for at least half the lag the mirror still answers, rightly.
    // Each answer is timed twice: when it was asked for (the last answer must have been asked
    // for within the lag) and when it came (the mirror answered at least this long). A test
    // thread held up by a loaded machine only loosens these, it does not break them.
    let mut answered_until = Duration::ZERO;
    let mut last_asked = Duration::ZERO;
    let mut failed_at = None;
    while killed.elapsed() < Duration::from_secs(3) {
        let asked = killed.elapsed();
        // A revocation the mirror holds is enforced however old the mirror is: a stale
        // mirror can only lack newer ones, and with `on_error = "allow"` an error would pass
        // the token.
        assert_eq!(
            b.is_revoked(Some("jti-k1"), None, None, t),
            Ok(true),
            "the mirror must keep enforcing the revocation it holds"
        );
        match b.is_revoked(Some("jti-k2"), None, None, t) {
            Ok(revoked) => {
                assert!(!revoked, "a token never revoked is not revoked");
                assert!(
                    failed_at.is_none(),
                    "the mirror answered again after failing, with redis still down"
                );
                answered_until = killed.elapsed();
                last_asked = asked;
            }
            Err(_) => {
                failed_at.get_or_insert(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed_at = failed_at.expect("is_revoked never failed with redis down for 3 s");
    eprintln!(
        "redis killed: mirror answered for {answered_until:?} (last asked at {last_asked:?}), failed closed from {failed_at:?}"
    );
    assert!(
        answered_until >= max_lag / 2,
        "the mirror failed before the lag: {answered_until:?}"
    );
    assert!(
        last_asked <= max_lag + Duration::from_millis(100),
        "the mirror answered past the lag: asked {last_asked:?} after the kill"
    );
    assert!(b.ping().await.is_err());
    assert!(a.revoke(&token("jti-k3", t + 600)).await.is_err());

    server.restart().await;
    let restarted = Instant::now();
    // The restarted redis is empty (no persistence). The mirrors write back what they hold:
    // the revocation made before the restart is enforced still, and is in redis again.
    wait_current(&b).await;
    eprintln!(
        "mirror current again {:?} after redis answered PING",
        restarted.elapsed()
    );
    assert_eq!(b.is_revoked(Some("jti-k1"), None, None, t), Ok(true));
    assert_eq!(hget(server.port, "jti:jti-k1"), (t + 600).to_string());
    wait_current(&a).await;
    propagates(&a, &b, "jti-k4").await;
    assert_eq!(b.ping().await, Ok(()));
}

/// Runs a Lua script on the revocation hash (KEYS[1]) with one argument, in one atomic step,
/// as Redis left in another state would hold it; returns what `redis-cli` prints.
fn eval_on_hash(port: u16, script: &str, arg: &str) -> String {
    support::redis::redis_cli(
        port,
        &["eval", script, "1", "{portcullis}:revocations", arg],
    )
}

/// The field of the revocation hash, as `redis-cli` prints it ("" when there is none).
fn hget(port: u16, field: &str) -> String {
    support::redis::redis_cli(port, &["hget", "{portcullis}:revocations", field])
        .trim()
        .to_owned()
}

/// Asserts that every token of `jtis` is revoked at `t` on every replica of `replicas`.
fn assert_tokens_revoked(replicas: &[(&str, &store::Stores)], jtis: &[&str], t: i64) {
    for (name, stores) in replicas {
        for jti in jtis {
            assert_eq!(
                stores.revocations.is_revoked(Some(jti), None, None, t),
                Ok(true),
                "{jti} on {name}"
            );
        }
    }
}

async fn redis_stores(url: String) -> store::Stores {
    redis_stores_with_lag(url, Duration::from_secs(1)).await
}

async fn redis_stores_with_lag(url: String, max_lag: Duration) -> store::Stores {
    store::connect_all(&store_config(StoreBackend::Redis { url }, max_lag))
        .await
        .expect("a redis url to 127.0.0.1 is valid")
}

/// Waits up to 5 s for `what` to hold.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The TTL the nonces of these tests are recorded with (2 x max_skew in the proxy).
const NONCE_TTL: Duration = Duration::from_secs(2);

/// A nonce recorded before Redis lost its data could be replayed while its TTL runs, as could
/// any other: until then every nonce is refused, as unavailable (a 503, never a pass). After
/// it, nonces are recorded again.
async fn nonces_refused_until_the_ttl_has_passed(stores: &[&store::Stores], recorded: &str) {
    use portcullis::store::{NonceOutcome, StoreError};
    for (i, stores) in stores.iter().enumerate() {
        match stores
            .nonces
            .record_once("client-1", recorded, NONCE_TTL)
            .await
        {
            Err(StoreError::Unavailable { reason }) => {
                assert!(reason.contains("lost its data"), "{reason}")
            }
            other => panic!("replica {i}: a nonce from before the loss answered {other:?}"),
        }
        assert!(
            stores
                .nonces
                .record_once("client-1", &format!("never-seen-{i}"), NONCE_TTL)
                .await
                .is_err(),
            "replica {i}: a new nonce cannot be told from a lost one"
        );
    }
    // A signature made since the loss cannot replay a nonce recorded before it: only those
    // signed before the loss plus the window (TTL / 2, with a margin) are refused.
    let now = now() as u64;
    match stores[0]
        .nonces
        .record_signed("client-1", "signed-now", NONCE_TTL, now)
        .await
    {
        Err(StoreError::Unavailable { reason }) => {
            assert!(reason.contains("signed at or before"), "{reason}")
        }
        other => panic!("a request signed at the loss answered {other:?}"),
    }
    assert_eq!(
        stores[0]
            .nonces
            .record_signed("client-1", "signed-later", NONCE_TTL, now + 6)
            .await,
        Ok(NonceOutcome::Fresh),
        "a request signed after the window of the loss is not refused"
    );
    let refused = Instant::now();
    let mut n = 0;
    let fresh = loop {
        n += 1;
        let nonce = format!("after-{n}");
        let outcome = stores[0]
            .nonces
            .record_once("client-1", &nonce, NONCE_TTL)
            .await;
        if outcome == Ok(NonceOutcome::Fresh) {
            break nonce;
        }
        assert!(
            refused.elapsed() < NONCE_TTL + Duration::from_secs(4),
            "nonces still refused {:?} after the loss: {outcome:?}",
            refused.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "nonces recorded again {:?} after the refusal was seen",
        refused.elapsed()
    );
    assert_eq!(
        stores[0]
            .nonces
            .record_once("client-1", &fresh, NONCE_TTL)
            .await,
        Ok(NonceOutcome::Replayed),
        "the nonce store works as before"
    );
}

/// Redis restarted without persistence comes back empty. The replicas that held revocations
/// write them back, a replica started after the restart gets them, and nonces are refused
/// until those recorded before the restart can no longer be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_gets_the_revocations_back_and_refuses_nonces_meanwhile() {
    use portcullis::store::NonceOutcome;
    let mut server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    let b = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    wait_current(&b.revocations).await;
    let t = now();
    a.revocations
        .revoke(&token("jti-r1", t + 600))
        .await
        .unwrap();
    b.revocations
        .revoke(&subject("sub-r1", t - 5))
        .await
        .unwrap();
    let recorded = "nonce-before-the-restart";
    assert_eq!(
        a.nonces.record_once("client-1", recorded, NONCE_TTL).await,
        Ok(NonceOutcome::Fresh)
    );

    server.restart().await;
    let took = eventually("the revocations are back in redis", || {
        hget(server.port, "jti:jti-r1") == (t + 600).to_string()
            && hget(server.port, "sub:sub-r1") == (t - 5).to_string()
    })
    .await;
    eprintln!("revocations written back {took:?} after the restart");
    let c = redis_stores(server.url()).await;
    wait_current(&c.revocations).await;
    for (name, stores) in [("a", &a), ("b", &b), ("c, started after", &c)] {
        let revocations = &stores.revocations;
        assert_eq!(
            revocations.is_revoked(Some("jti-r1"), None, None, t),
            Ok(true),
            "replica {name}"
        );
        assert_eq!(
            revocations.is_revoked(None, Some("sub-r1"), Some(t - 60), t),
            Ok(true),
            "replica {name}"
        );
    }
    nonces_refused_until_the_ttl_has_passed(&[&a, &b, &c], recorded).await;
}

/// A FLUSHDB drops nothing the proxy's connections would notice: the heartbeats, which carry
/// the hash's epoch, tell the replicas within a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_gets_the_revocations_back_and_refuses_nonces_meanwhile() {
    use portcullis::store::NonceOutcome;
    let server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    a.revocations
        .revoke(&token("jti-f1", t + 600))
        .await
        .unwrap();
    let recorded = "nonce-before-the-flush";
    assert_eq!(
        a.nonces.record_once("client-1", recorded, NONCE_TTL).await,
        Ok(NonceOutcome::Fresh)
    );
    assert_eq!(
        support::redis::redis_cli(server.port, &["flushdb"]).trim(),
        "OK"
    );
    let took = eventually("the revocation is back in redis", || {
        hget(server.port, "jti:jti-f1") == (t + 600).to_string()
    })
    .await;
    eprintln!("revocation written back {took:?} after the flush");
    assert!(
        took < Duration::from_secs(2),
        "a flush is found by the heartbeats, not the 30 s resync: {took:?}"
    );
    assert_eq!(
        a.revocations.is_revoked(Some("jti-f1"), None, None, t),
        Ok(true)
    );
    nonces_refused_until_the_ttl_has_passed(&[&a], recorded).await;
}

/// Between Redis coming back empty and the mirror finding the loss, the nonce store's own
/// connections are up again: a nonce asked for then must not pass as fresh. After any loss or
/// reconnect of a connection, nonces wait for a resync that compared the hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_right_after_an_empty_restart_is_never_fresh() {
    use portcullis::store::NonceOutcome;
    let mut server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let recorded = "nonce-before-the-restart";
    assert_eq!(
        a.nonces.record_once("client-1", recorded, NONCE_TTL).await,
        Ok(NonceOutcome::Fresh)
    );
    server.restart().await;
    let restarted = Instant::now();
    let mut answers = 0;
    while restarted.elapsed() < Duration::from_secs(2) {
        let replay = a.nonces.record_once("client-1", recorded, NONCE_TTL).await;
        assert_ne!(
            replay,
            Ok(NonceOutcome::Fresh),
            "{:?} after the restart",
            restarted.elapsed()
        );
        let signed = a
            .nonces
            .record_signed("client-1", recorded, NONCE_TTL, now() as u64)
            .await;
        assert_ne!(
            signed,
            Ok(NonceOutcome::Fresh),
            "{:?} after the restart",
            restarted.elapsed()
        );
        answers += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(answers > 100, "only {answers} tries");
    assert!(
        !hget(server.port, "~lost").is_empty(),
        "the loss was found and recorded"
    );
}

/// Redis gone back to an older state of the same epoch (an older snapshot loaded in place, a
/// failover to a replica that had not caught up) with no connection lost: the heartbeats carry
/// the change count, and one below what the mirror has seen is a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_back_without_a_reconnect_is_found_by_the_heartbeats() {
    let server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    let exp = (t + 600).to_string();
    for jti in ["jti-b1", "jti-b2", "jti-b3"] {
        a.revocations.revoke(&token(jti, t + 600)).await.unwrap();
    }
    let changes: u64 = hget(server.port, "~gen").parse().unwrap();
    // As the older state would hold it: the first revocation, and the count it had then.
    let back = eval_on_hash(
        server.port,
        "redis.call('HDEL', KEYS[1], 'jti:jti-b2', 'jti:jti-b3'); redis.call('HSET', KEYS[1], '~gen', ARGV[1]); return 1",
        &(changes - 2).to_string(),
    );
    assert_eq!(back.trim(), "1");
    let took = eventually("the later revocations are back in redis", || {
        hget(server.port, "jti:jti-b2") == exp && hget(server.port, "jti:jti-b3") == exp
    })
    .await;
    eprintln!("written back {took:?} after redis went back");
    assert!(
        took < Duration::from_secs(3),
        "found by the heartbeats, not the 30 s resync: {took:?}"
    );
    assert_ne!(hget(server.port, "~lost"), "");
    wait_current(&a.revocations).await;
    assert_tokens_revoked(&[("a", &a)], &["jti-b1", "jti-b2", "jti-b3"], t);
}

/// Redis gone back one change, and another replica's change made before any heartbeat could
/// tell: the count is as high as the mirror's again, but the event reuses a number the mirror
/// applied, which is the loss. The lost revocation is written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_back_then_a_new_change_is_still_a_loss() {
    // A 5 s lag: heartbeats every second, so the new change comes before the next one.
    let server = RedisServer::start().await;
    let a = redis_stores_with_lag(server.url(), Duration::from_secs(5)).await;
    let b = redis_stores_with_lag(server.url(), Duration::from_secs(5)).await;
    wait_current(&a.revocations).await;
    wait_current(&b.revocations).await;
    let t = now();
    let exp = (t + 600).to_string();
    for jti in ["jti-n1", "jti-n2"] {
        a.revocations.revoke(&token(jti, t + 600)).await.unwrap();
    }
    let changes: u64 = hget(server.port, "~gen").parse().unwrap();
    let back = eval_on_hash(
        server.port,
        "redis.call('HDEL', KEYS[1], 'jti:jti-n2'); redis.call('HSET', KEYS[1], '~gen', ARGV[1]); return 1",
        &(changes - 1).to_string(),
    );
    assert_eq!(back.trim(), "1");
    b.revocations
        .revoke(&token("jti-n3", t + 600))
        .await
        .unwrap();
    eventually("the lost revocation is written back", || {
        hget(server.port, "jti:jti-n2") == exp
    })
    .await;
    assert_ne!(hget(server.port, "~lost"), "");
    wait_current(&a.revocations).await;
    wait_current(&b.revocations).await;
    assert_tokens_revoked(&[("a", &a), ("b", &b)], &["jti-n1", "jti-n2", "jti-n3"], t);
}

/// A resync that fails right after a reconnect is tried again at the next tick: nonces are
/// not held until the 30 s resync. Redis pauses writes (as `FAILOVER` does) just after the
/// proxy's connections were killed, so the first resync's dump times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_held_after_a_reconnect_pass_again_once_a_resync_works() {
    use portcullis::store::NonceOutcome;
    let server = RedisServer::start().await;
    let a = redis_stores_with_lag(server.url(), Duration::from_secs(5)).await;
    wait_current(&a.revocations).await;
    let killed = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'CLIENT KILL TYPE normal SKIPME yes\\r\\nCLIENT PAUSE 1000 WRITE\\r\\n' | redis-cli -p {}",
            server.port
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut n = 0;
    let mut held = false;
    loop {
        n += 1;
        let outcome = a
            .nonces
            .record_signed("client-1", &format!("paused-{n}"), NONCE_TTL, now() as u64)
            .await;
        match outcome {
            Ok(NonceOutcome::Fresh) if held => break,
            Ok(NonceOutcome::Fresh) => {}
            other => {
                assert!(other.is_err(), "{other:?}");
                held = true;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "nonces still held {:?} after a 1 s pause",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("nonces pass again {:?} after the kill", killed.elapsed());
    assert!(held, "the reconnect never held a nonce");
    assert!(
        hget(server.port, "~lost").is_empty(),
        "a reconnect is not a loss"
    );
}

/// Three replicas revoke and undo the same entries without a pause for 3 s, each recording
/// nonces as it goes, while their subscriptions are killed every 200 ms (each resyncs, with
/// events and heartbeats from before its dump still queued): no loss may be found (a false
/// one would refuse signed requests for `max_skew`), and no nonce refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_churn_on_three_replicas_never_finds_a_loss() {
    use portcullis::store::NonceOutcome;
    let server = RedisServer::start().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut config = store_config(
            StoreBackend::Redis { url: server.url() },
            Duration::from_millis(400),
        );
        config.timeout = Duration::from_millis(500);
        let stores = store::connect_all(&config).await.unwrap();
        wait_current(&stores.revocations).await;
        replicas.push(Arc::new(stores));
    }
    let stop = Instant::now() + Duration::from_secs(3);
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for (r, stores) in replicas.iter().enumerate() {
        for w in 0..2u64 {
            let stores = stores.clone();
            let failures = failures.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < stop {
                    i += 1;
                    let t = now();
                    let jti = format!("jti-churn-{}", i % 7);
                    let sub = format!("sub-churn-{}", (i + w) % 5);
                    let revocations = &stores.revocations;
                    let results = [
                        revocations.revoke(&token(&jti, t + 600)).await,
                        revocations.revoke(&subject(&sub, t - (i % 3) as i64)).await,
                        revocations.unrevoke(&token(&jti, t + 600)).await,
                        revocations.unrevoke(&subject(&sub, t)).await,
                    ];
                    for result in results {
                        if let Err(e) = result {
                            failures.lock().unwrap().push(format!("replica {r}: {e}"));
                        }
                    }
                    let nonce = format!("churn-{r}-{w}-{i}");
                    let outcome = stores
                        .nonces
                        .record_signed("client-1", &nonce, NONCE_TTL, now() as u64)
                        .await;
                    if outcome != Ok(NonceOutcome::Fresh) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("replica {r}: {outcome:?}"));
                    }
                }
                i
            }));
        }
    }
    let port = server.port;
    let kills = tokio::spawn(async move {
        let mut kills = 0;
        while Instant::now() < stop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let killed = tokio::task::spawn_blocking(move || {
                support::redis::redis_cli(port, &["client", "kill", "type", "pubsub"])
            })
            .await
            .unwrap();
            kills += killed.trim().parse::<u32>().unwrap_or(0);
        }
        kills
    });
    let mut rounds = 0;
    for task in tasks {
        rounds += task.await.unwrap();
    }
    let kills = kills.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "{rounds} rounds of four changes, {kills} subscriptions killed; ~gen {}",
        hget(server.port, "~gen")
    );
    assert!(rounds > 100, "only {rounds} rounds");
    assert!(kills >= 10, "only {kills} subscriptions killed");
    assert_eq!(
        hget(server.port, "~lost"),
        "",
        "a loss was found in normal churn"
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(10)]
    );
}

/// A value no script wrote (a hand edit) neither stops a revoke of its entry nor a write-back
/// over it: it counts as no value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_value_in_the_hash_is_replaced() {
    let server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    let exp = (t + 600).to_string();
    support::redis::redis_cli(
        server.port,
        &["hset", "{portcullis}:revocations", "jti:jti-u1", "soon"],
    );
    a.revocations
        .revoke(&token("jti-u1", t + 600))
        .await
        .unwrap();
    assert_eq!(hget(server.port, "jti:jti-u1"), exp);
    // The write-back after a flush, over a hand edit made right after it.
    assert_eq!(
        support::redis::redis_cli(server.port, &["flushdb"]).trim(),
        "OK"
    );
    support::redis::redis_cli(
        server.port,
        &["hset", "{portcullis}:revocations", "jti:jti-u1", "soon"],
    );
    eventually(
        "the revocation is written back over the unreadable value",
        || hget(server.port, "jti:jti-u1") == exp,
    )
    .await;
    // An undo over one: the entry goes.
    support::redis::redis_cli(
        server.port,
        &["hset", "{portcullis}:revocations", "sub:sub-u1", "soon"],
    );
    a.revocations.unrevoke(&subject("sub-u1", t)).await.unwrap();
    assert_eq!(hget(server.port, "sub:sub-u1"), "");
}

/// A hash made anew counts as a loss however many changes it has had since: a replica that
/// finds the loss late (another replica created the new hash and revoked more than this one
/// had seen) still writes back what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_made_anew_with_more_changes_is_still_a_loss() {
    let server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    a.revocations
        .revoke(&token("jti-e1", t + 600))
        .await
        .unwrap();
    let exp = (t + 600).to_string();
    // One atomic step, as the replica that made the new hash would have left it.
    let replaced = eval_on_hash(
        server.port,
        "redis.call('DEL', KEYS[1]); redis.call('HSET', KEYS[1], '~epoch', 'other', '~gen', '100', 'jti:jti-e2', ARGV[1]); return 1",
        &exp,
    );
    assert_eq!(replaced.trim(), "1");
    eventually("the lost revocation is back in redis", || {
        hget(server.port, "jti:jti-e1") == exp
    })
    .await;
    assert_eq!(hget(server.port, "~epoch"), "other");
    wait_current(&a.revocations).await;
    assert_tokens_revoked(&[("a", &a)], &["jti-e1", "jti-e2"], t);
    assert!(a
        .nonces
        .record_once("client-1", "nonce-after-the-loss", NONCE_TTL)
        .await
        .is_err());
}

/// An event whose change count skips one means events were lost on the way: the mirror
/// resyncs at once rather than at the next 30 s resync. The test makes two changes whose events
/// are never published, then one that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_skips_a_change_makes_the_mirror_resync() {
    let server = RedisServer::start().await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    a.revocations
        .revoke(&token("jti-g1", t + 600))
        .await
        .unwrap();
    let exp = (t + 600).to_string();
    let changed = eval_on_hash(
        server.port,
        "redis.call('HSET', KEYS[1], 'jti:jti-unannounced', ARGV[1]); \
             redis.call('HINCRBY', KEYS[1], '~gen', 1); \
             redis.call('HSET', KEYS[1], 'sub:sub-unannounced', ARGV[1]); \
             redis.call('HINCRBY', KEYS[1], '~gen', 1); \
             redis.call('HSET', KEYS[1], 'jti:jti-announced', ARGV[1]); \
             local gen = redis.call('HINCRBY', KEYS[1], '~gen', 1); \
             local epoch = redis.call('HGET', KEYS[1], '~epoch'); \
             return redis.call('PUBLISH', 'portcullis:revocations', 's:' .. epoch .. ':' .. gen .. ':' .. ARGV[1] .. ':jti:jti-announced')",
        &exp,
    );
    assert_eq!(changed.trim(), "1", "one subscriber got the event");
    let took = eventually("the mirror holds the changes never announced", || {
        a.revocations
            .is_revoked(Some("jti-unannounced"), None, None, t)
            == Ok(true)
            && a.revocations
                .is_revoked(None, Some("sub-unannounced"), Some(t), t)
                == Ok(true)
    })
    .await;
    eprintln!("resynced {took:?} after the event that skipped two changes");
    assert_tokens_revoked(&[("a", &a)], &["jti-g1", "jti-announced"], t);
    assert_eq!(hget(server.port, "~lost"), "", "a gap is not a loss");
}

/// Redis restarted from an older snapshot has the hash's epoch but not its latest changes (as
/// has a replica promoted before it caught up): the change count tells, and the mirror's
/// newer revocations are written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_from_an_older_snapshot_gets_the_later_revocations_back() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_owned();
    let mut server =
        RedisServer::start_with(support::redis::free_port(), &["--dir", &dir_arg]).await;
    let a = redis_stores(server.url()).await;
    wait_current(&a.revocations).await;
    let t = now();
    a.revocations
        .revoke(&token("jti-s1", t + 600))
        .await
        .unwrap();
    assert_eq!(
        support::redis::redis_cli(server.port, &["save"]).trim(),
        "OK"
    );
    a.revocations
        .revoke(&token("jti-s2", t + 600))
        .await
        .unwrap();
    a.revocations
        .unrevoke(&token("jti-s1", t + 600))
        .await
        .unwrap();

    server.restart().await;
    assert_eq!(
        hget(server.port, "jti:jti-s1"),
        (t + 600).to_string(),
        "the snapshot is the older one"
    );
    let took = eventually("the later revocation is back in redis", || {
        hget(server.port, "jti:jti-s2") == (t + 600).to_string()
    })
    .await;
    eprintln!("later revocation written back {took:?} after the restart");
    wait_current(&a.revocations).await;
    assert_eq!(
        a.revocations.is_revoked(Some("jti-s2"), None, None, t),
        Ok(true)
    );
    // The undo the snapshot lacks is not replayed: a write-back only adds. The token stays
    // revoked (the safe side) until it is undone again.
    assert_eq!(
        a.revocations.is_revoked(Some("jti-s1"), None, None, t),
        Ok(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_start_fails_closed_and_is_picked_up_later() {
    let port = free_port();
    let start = Instant::now();
    let store = redis_store(
        format!("redis://127.0.0.1:{port}/0"),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let t = now();
    assert!(
        store.is_revoked(Some("x"), Some("y"), None, t).is_err(),
        "never a 'not revoked' before the first sync"
    );
    assert!(store.revoke(&token("x", t + 60)).await.is_err());
    assert!(store.list(None, 10).await.is_err());
    assert!(store.ping().await.is_err());

    let _server = RedisServer::start_on(port).await;
    let took = wait_current(&store).await;
    eprintln!("a late redis picked up after {took:?}");
    store.revoke(&token("x", t + 60)).await.unwrap();
    assert_eq!(store.is_revoked(Some("x"), None, None, t), Ok(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_stops_its_subscriber() {
    let server = RedisServer::start().await;
    let count = || {
        support::redis::redis_cli(server.port, &["pubsub", "numsub", "portcullis:revocations"])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let store = redis_store(server.url(), Duration::from_secs(5)).await;
    wait_current(&store).await;
    assert_eq!(count(), 1);
    drop(store);
    let start = Instant::now();
    while count() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the subscriber outlived its store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
