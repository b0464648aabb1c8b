//! The shared nonce store: Redis (standalone, Sentinel or Cluster) through a small fred pool, so
//! that every replica of the proxy sees every nonce.
//!
//! The signature check calls [`RedisNonceStore::record_once`] after a valid HMAC; it sends one
//! `SET portcullis:nonce:{key_id}:{nonce} 1 NX PX <ttl>`, whose reply says fresh (`OK`) or
//! replayed (nil). Anything else (no connection, no reply within `[store] timeout`, an error
//! reply) is a [`StoreError`], which the proxy turns into 503 store_unavailable unless
//! `on_error = "allow"`.
//!
//! Three client settings carry the fail-closed rules:
//! - **No retries.** A `SET NX` whose reply was lost may have been applied; sent again it would
//!   answer nil and turn a first use into a replay. So every command is written at most once
//!   (`max_command_attempts = 1`, and per command `max_attempts = 1`), and a lost reply is an
//!   error. A command that timed out while still queued is never written later (fred drops
//!   timed-out commands from its queues). One that timed out or lost its reply after it was
//!   written may have been applied: a client that then retries with the same nonce gets
//!   nonce_replayed, which is the safe side; clients should sign each attempt with a new nonce.
//! - **Fail fast.** While disconnected, a command fails at once (`fail_fast` per command) instead
//!   of waiting in fred's queue for a reconnect; and no command waits longer than
//!   `[store] timeout`.
//! - **Lost data fails closed.** A Redis that loses writes (restarted without persistence,
//!   failed over to a replica that had not caught up, flushed) forgets nonces that may still
//!   be replayed. The revocation mirror finds such a loss (`redis_revocation`) and records it
//!   on the connection. [`NonceStore::record_signed`] then refuses, as unavailable, the nonce
//!   of a signature made no later than the loss plus the window (TTL / 2, and a margin), which
//!   could be a replay; [`NonceStore::record_once`], which has no signature time, refuses every
//!   nonce until those recorded before the loss have passed their TTL (2 x max_skew).
//! - **Reconnect forever.** Exponential backoff from 50 ms to 1 s, no attempt limit, also for
//!   the first connection, so a Redis that is down at start or restarted later is picked up
//!   without restarting the proxy.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::{EventInterface, LuaInterface};
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as FredError, ErrorKind, Expiration, FromValue,
    KeysInterface, Options, Pool, ReconnectPolicy, SetOptions,
};
use fred::types::config::UnresponsiveConfig;
use fred::types::ConnectHandle;

use super::{NonceOutcome, NonceStore, StoreError};

/// The url schemes `[store] url` may use.
const SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis-cluster://",
    "redis-sentinel://",
];

/// Connections in the pool. One Redis connection pipelines many commands; a second one keeps
/// commands flowing while the other reconnects.
const POOL_SIZE: usize = 2;

/// How long [`RedisNonceStore::connect`] waits for the first connection before returning a
/// store that is still connecting.
const CONNECT_GRACE: Duration = Duration::from_millis(500);

/// Limit on one TCP connect (and TLS handshake). A blackholed address must not stall reconnects
/// for fred's default of 10 s.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection with a command unanswered for this long is closed and reopened: this is what
/// notices a Redis that hangs (stopped, network partition) rather than closing the socket.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);

/// Capacity of fred's broadcast channels (pub/sub messages, connection events).
const BROADCAST_CAPACITY: usize = 4096;
/// How often Redis's eviction policy is read again once a read has succeeded.
const EVICTION_RECHECK: Duration = Duration::from_secs(300);

/// One started fred pool with the settings above, shared by the nonce store, the revocation
/// store and the rate limiter built by [`super::connect_all`]. Cheap to clone.
///
/// Dropping the last clone stops the background tasks that drive the pooled connections (and
/// with them the reconnect attempts).
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Shared>,
}

/// What the clones of a [`RedisConnection`] share.
struct Shared {
    pool: Pool,
    /// The tasks that drive each pooled connection and its reconnects.
    drivers: Vec<ConnectHandle>,
    /// Kept to build more clients with the same settings (the revocation subscriber).
    builder: Builder,
    /// Applied to every command; see the module doc for why these values.
    options: Options,
    timeout: Duration,
    /// Scheme and hosts only, for `Debug` and logs: never the password.
    target: String,
    /// When Redis was last found to have lost writes, in Unix seconds by this machine's clock
    /// ([`NO_LOSS`] when never): see [`RedisConnection::note_data_loss`].
    data_lost_at: AtomicI64,
    /// The pool's connection losses and reconnects, and how many the revocation mirror has
    /// checked: see [`RedisConnection::unchecked_reconnect`].
    continuity: Arc<Continuity>,
}

/// Connection events of the pool (errors and reconnects): after one, Redis may be another
/// server, or the same one restarted empty, until the revocation mirror has compared the hash
/// with what it saw.
#[derive(Debug, Default)]
pub(crate) struct Continuity {
    events: AtomicU64,
    checked: AtomicU64,
    /// A revocation mirror runs on this connection and checks: without one, nothing is held.
    watched: AtomicBool,
    /// Woken at each event, so that the mirror checks at once.
    pub(crate) changed: tokio::sync::Notify,
}

impl Continuity {
    fn record(&self) {
        self.events.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
    }
}

/// [`Shared::data_lost_at`] when no loss was ever seen.
const NO_LOSS: i64 = i64::MIN;

impl Drop for Shared {
    fn drop(&mut self) {
        // Without this a dropped store would go on reconnecting to a Redis nobody uses.
        for driver in &self.drivers {
            driver.abort();
        }
    }
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("target", &self.inner.target)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// The `maxmemory_policy` of an `INFO memory` reply when it lets Redis evict keys: a
/// `maxmemory` above 0 with any policy but `noeviction`.
fn evicting_policy(info: &str) -> Option<&str> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let limited = field("maxmemory").and_then(|m| m.parse::<u64>().ok())? > 0;
    let policy = field("maxmemory_policy")?;
    (limited && policy != "noeviction").then_some(policy)
}

impl RedisConnection {
    /// Parses `url` and starts connecting. Returns an error only for a url that cannot be used;
    /// an unreachable server gives a connection whose commands fail until it connects.
    ///
    /// Accepted: `redis://[user:pass@]host[:port][/db]`, `rediss://...` (TLS with the system
    /// roots), `redis-cluster://h1:p1,h2:p2` (or fred's `?node=h2:p2` form) and
    /// `redis-sentinel://h1:p1,h2:p2/db?sentinelServiceName=name`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let (builder, target) = builder(url, timeout)?;
        let pool = builder
            .build_pool(POOL_SIZE)
            .map_err(|e| StoreError::InvalidUrl {
                reason: e.details().to_owned(),
            })?;
        let continuity = Arc::new(Continuity::default());
        for client in pool.clients() {
            log_connection_events(client, &target);
            // Counted from their own tasks: an error comes when the connection goes, at least
            // the first reconnect delay (50 ms) before the next connection can carry a command.
            let on_error = continuity.clone();
            client.on_error(move |_| {
                on_error.record();
                async { Ok(()) }
            });
            let on_reconnect = continuity.clone();
            client.on_reconnect(move |_| {
                on_reconnect.record();
                async { Ok(()) }
            });
        }
        let drivers = pool.connect_pool();
        let connected = tokio::time::timeout(CONNECT_GRACE, pool.wait_for_connect())
            .await
            .is_ok();
        if !connected {
            tracing::warn!(%target, "redis is not reachable yet; requests that need it fail until it is");
        }
        let connection = Self {
            inner: Arc::new(Shared {
                pool,
                drivers,
                builder,
                options: command_options(timeout),
                timeout,
                target,
                data_lost_at: AtomicI64::new(NO_LOSS),
                continuity,
            }),
        };
        connection.watch_eviction_policy(connected).await;
        Ok(connection)
    }

    /// Nonces and revocations must never be evicted: an evicted nonce can be replayed while its
    /// timestamp is inside the signature window, and an evicted revocation lets the token
    /// through again. Redis evicts keys only under a `maxmemory` limit with a
    /// `maxmemory-policy` other than `noeviction` (every `volatile-*` policy included: every
    /// nonce has a TTL).
    ///
    /// Checked with `INFO memory` now when connected (so that the warning comes with the start
    /// logs), then in the background: every second until Redis answers (it may come up after
    /// the proxy), then every five minutes (the policy can be changed at run time). A warning
    /// is logged when what a check sees differs from the last one; a server that refuses
    /// `INFO` is not judged, and asked again every five minutes. The task holds the connection
    /// only while it checks, and ends once the connection is dropped.
    async fn watch_eviction_policy(&self, connected: bool) {
        // The last answer (`Some(policy)` when Redis may evict), and whether any check has
        // been answered: a server that refuses `INFO` counts as answered, not judged.
        let mut last: Option<Option<String>> = None;
        let mut answered = false;
        if connected {
            self.record_eviction_check(&mut last, &mut answered).await;
        }
        let shared = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let pause = if answered {
                    EVICTION_RECHECK
                } else {
                    Duration::from_secs(1)
                };
                tokio::time::sleep(pause).await;
                let Some(inner) = shared.upgrade() else {
                    return;
                };
                let connection = RedisConnection { inner };
                if connection.inner.pool.is_connected() {
                    connection
                        .record_eviction_check(&mut last, &mut answered)
                        .await;
                }
            }
        });
    }

    /// One `INFO memory` check. Logs a warning when Redis may evict and the last answer was
    /// different (or there was none), and a note when it no longer may.
    async fn record_eviction_check(&self, last: &mut Option<Option<String>>, answered: &mut bool) {
        let info: Result<String, _> = self
            .bounded(self.client().info(Some(fred::types::InfoKind::Memory)))
            .await;
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                *answered |= matches!(e, StoreError::Refused { .. });
                tracing::debug!(target = %self.inner.target, error = %e, "cannot read INFO memory; the eviction policy is not checked");
                return;
            }
        };
        *answered = true;
        let policy = evicting_policy(&info).map(str::to_owned);
        if last.as_ref() != Some(&policy) {
            if let Some(policy) = &policy {
                tracing::warn!(
                    target = %self.inner.target,
                    maxmemory_policy = %policy,
                    "redis may evict keys when it reaches maxmemory: an evicted nonce could be replayed and an evicted revocation lifted; set maxmemory-policy to noeviction (a full redis then refuses writes, which is 503 store_unavailable)"
                );
            } else if last.is_some() {
                tracing::info!(target = %self.inner.target, "redis no longer evicts keys");
            }
        }
        *last = Some(policy);
    }

    /// A pooled client that applies the per-command options (one attempt, fail fast, timeout).
    pub(crate) fn client(&self) -> fred::clients::WithOptions<Pool> {
        self.inner.pool.with_options(&self.inner.options)
    }

    /// A new, unconnected client with the same settings as the pool, for a connection that
    /// must stay apart from it (a pub/sub subscriber).
    pub(crate) fn new_client(&self) -> Result<Client, StoreError> {
        let client = self
            .inner
            .builder
            .build()
            .map_err(|e| StoreError::InvalidUrl {
                reason: e.details().to_owned(),
            })?;
        log_connection_events(&client, &self.inner.target);
        Ok(client)
    }

    /// The options applied to every command.
    pub(crate) fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Scheme and hosts, never a password.
    pub(crate) fn target(&self) -> &str {
        &self.inner.target
    }

    /// Maps a fred error to ours. A timeout is its own variant; connection trouble is
    /// unavailable; an error reply from the server is refused.
    pub(crate) fn error(&self, error: FredError) -> StoreError {
        match error.kind() {
            ErrorKind::Timeout => StoreError::Timeout(self.inner.timeout),
            ErrorKind::IO
            | ErrorKind::Canceled
            | ErrorKind::Routing
            | ErrorKind::Tls
            | ErrorKind::Cluster
            | ErrorKind::Sentinel
            | ErrorKind::Unknown
            | ErrorKind::Backpressure => StoreError::Unavailable {
                reason: error.details().to_owned(),
            },
            _ => StoreError::Refused {
                reason: error.details().to_owned(),
            },
        }
    }

    /// Runs `command` with a hard deadline of `timeout`, whatever fred does: the proxy must
    /// never wait on the store longer than configured.
    pub(crate) async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = Result<T, FredError>>,
    ) -> Result<T, StoreError> {
        // Boxed: fred's command futures are large, and unboxed they would be copied into every
        // future that awaits them (the request's among them).
        match tokio::time::timeout(self.inner.timeout, Box::pin(command)).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(StoreError::Timeout(self.inner.timeout)),
        }
    }

    /// Runs a Lua script by its SHA1 (`EVALSHA`), and sends its text (`EVAL`) only when the
    /// server answers NOSCRIPT: a script cache emptied by a restart, a failover or a node that
    /// never saw it. A NOSCRIPT reply means the script did not run, so the second command is
    /// not a retry of something that may have been applied. `EVAL` caches the script on the
    /// node that ran it, which in a cluster is the node that owns the keys: no `SCRIPT LOAD` on
    /// every node is needed.
    pub(crate) async fn run_script<R>(
        &self,
        script: &LuaScript,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, StoreError>
    where
        R: FromValue + Unpin + Send,
    {
        let client = self.client();
        let first = tokio::time::timeout(
            self.inner.timeout,
            Box::pin(client.evalsha::<R, _, _, _>(
                script.sha1.as_str(),
                keys.clone(),
                args.clone(),
            )),
        )
        .await;
        match first {
            Ok(Err(error)) if error.details().starts_with("NOSCRIPT") => {
                self.bounded(client.eval::<R, _, _, _>(script.source, keys, args))
                    .await
            }
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(StoreError::Timeout(self.inner.timeout)),
        }
    }

    /// Records that Redis lost writes at `at` (Unix seconds, this machine's clock): it was
    /// restarted without persistence, failed over to a replica that had not caught up, or
    /// flushed. The revocation mirror finds it (see `redis_revocation`); the nonce store then
    /// refuses the nonces that could replay one recorded before the loss, for as long as one
    /// could (see [`RedisConnection::nonces_lost`]). The latest loss seen counts.
    pub(crate) fn note_data_loss(&self, at: i64) {
        self.inner.data_lost_at.fetch_max(at, Ordering::Relaxed);
    }

    /// The pool's connection events so far; the mirror reads it before a resync.
    pub(crate) fn connection_events(&self) -> u64 {
        self.inner.continuity.events.load(Ordering::SeqCst)
    }

    /// Records that the mirror has compared the hash with what it saw after `events`
    /// connection events (and that a mirror watches this connection).
    pub(crate) fn checked_through(&self, events: u64) {
        let continuity = &self.inner.continuity;
        continuity.checked.fetch_max(events, Ordering::SeqCst);
        continuity.watched.store(true, Ordering::SeqCst);
    }

    /// What the mirror waits on to check again after a connection event.
    pub(crate) fn continuity(&self) -> Arc<Continuity> {
        self.inner.continuity.clone()
    }

    /// True after a connection loss or reconnect of the pool that the revocation mirror has
    /// not checked yet: Redis may have restarted empty, and a nonce recorded before could be
    /// replayed. Only with a mirror on the connection (the proxy's stores).
    fn unchecked_reconnect(&self) -> bool {
        let continuity = &self.inner.continuity;
        continuity.watched.load(Ordering::Relaxed)
            && continuity.events.load(Ordering::SeqCst) > continuity.checked.load(Ordering::SeqCst)
    }

    /// When writes were lost, if a nonce kept for `ttl` that was recorded before could still
    /// be replayed: `Some(LostNonces)`.
    fn nonces_lost(&self, ttl: Duration) -> Option<LostNonces> {
        let at = self.inner.data_lost_at.load(Ordering::Relaxed);
        if at == NO_LOSS {
            return None;
        }
        let now = super::revocation::unix_now();
        // Two seconds more than the TTL: the loss time is whole seconds, rounded down, and the
        // replicas' clocks may differ a little.
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let until = at.saturating_add(ttl_secs).saturating_add(2);
        (now < until).then(|| LostNonces {
            since: now.saturating_sub(at),
            left: until - now,
            // A nonce recorded at or before `at` passed the signature window then, so it was
            // signed no later than `at` plus the window (half the TTL).
            signed_until: at.saturating_add(ttl_secs / 2 + 1).saturating_add(2),
        })
    }

    /// PING through the pool, for `/readyz`.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.bounded(self.client().ping(None)).await?;
        Ok(())
    }
}

/// What [`RedisConnection::nonces_lost`] found, in seconds.
#[derive(Debug, Clone, Copy)]
struct LostNonces {
    /// How long ago the loss was found.
    since: i64,
    /// How much longer a nonce recorded before could be replayed.
    left: i64,
    /// The latest signature time (Unix seconds) a nonce recorded before can carry.
    signed_until: i64,
}

/// A Lua script and its SHA1, computed once.
#[derive(Debug)]
pub(crate) struct LuaScript {
    source: &'static str,
    sha1: String,
}

impl LuaScript {
    /// Hashes `source` for `EVALSHA`.
    pub(crate) fn new(source: &'static str) -> Self {
        Self {
            source,
            sha1: fred::util::sha1_hash(source),
        }
    }
}

/// The options applied to every command: see the module doc.
fn command_options(timeout: Duration) -> Options {
    Options {
        max_attempts: Some(1),
        timeout: Some(timeout),
        fail_fast: true,
        ..Options::default()
    }
}

/// Parses `url` as [`RedisConnection::connect`] does, without connecting: for the
/// configuration check, so that a url the proxy would refuse at start is a configuration error.
pub(crate) fn check_url(url: &str) -> Result<(), StoreError> {
    fred_config(url).map(drop)
}

/// fred's client configuration for `url`.
fn fred_config(url: &str) -> Result<Config, StoreError> {
    // fred builds its rustls context (rediss://) from the process default provider.
    crate::server::tls::install_default_provider();
    // fred reads any unknown scheme as plain redis://; the config layer only lets these
    // through, and a StoreConfig built by hand gets the same answer.
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(StoreError::InvalidUrl {
            reason: format!(
                "{} does not start with {}",
                redacted(url),
                SCHEMES.join(", ")
            ),
        });
    }
    Config::from_url(&fred_url(url)).map_err(|e| StoreError::InvalidUrl {
        reason: e.details().to_owned(),
    })
}

/// A fred builder with the settings of the module doc, and the redacted target for logs.
fn builder(url: &str, timeout: Duration) -> Result<(Builder, String), StoreError> {
    let target = redacted(url);
    let mut config = fred_config(url)?;
    // false: a failed first connection goes through the reconnect policy instead of
    // ending the client.
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.max_command_attempts = 1;
            c.connection_timeout = CONNECTION_TIMEOUT;
            c.internal_command_timeout = CONNECTION_TIMEOUT;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(UNRESPONSIVE_AFTER),
                interval: Duration::from_millis(500),
            };
            c.tcp.nodelay = Some(true);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
            // The revocation subscriber receives every event through this channel; a burst
            // larger than it makes the mirror resync rather than miss one.
            p.broadcast_channel_capacity = BROADCAST_CAPACITY;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2));
    Ok((builder, target))
}

/// Logs connection errors and (re)connections of `client`.
fn log_connection_events(client: &Client, target: &str) {
    let target = target.to_owned();
    client.on_error(move |(error, server)| {
        let target = target.clone();
        async move {
            let server = server.map(|s| s.to_string()).unwrap_or_default();
            tracing::warn!(%target, %server, kind = ?error.kind(), detail = error.details(), "redis connection error");
            Ok(())
        }
    });
    client.on_reconnect(move |server| async move {
        tracing::info!(%server, "redis connected");
        Ok(())
    });
}

/// Nonces in Redis, on a [`RedisConnection`].
///
/// Dropping it (and every other user of its connection) stops the background tasks.
#[derive(Debug, Clone)]
pub struct RedisNonceStore {
    connection: RedisConnection,
}

impl RedisNonceStore {
    /// Parses `url` and starts connecting. Returns an error only for a url that cannot be used;
    /// an unreachable server gives a store that reports errors until it connects. See
    /// [`RedisConnection::connect`] for the urls accepted.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::new(RedisConnection::connect(url, timeout).await?))
    }

    /// A nonce store on an existing connection.
    pub fn new(connection: RedisConnection) -> Self {
        Self { connection }
    }
}

#[async_trait::async_trait]
impl NonceStore for RedisNonceStore {
    async fn record_once(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<NonceOutcome, StoreError> {
        if let Some(lost) = self.connection.nonces_lost(ttl) {
            return Err(StoreError::Unavailable {
                reason: format!(
                    "redis lost its data {} s ago, and a nonce recorded before could be replayed for {} s more",
                    lost.since, lost.left
                ),
            });
        }
        self.set_once(key_id, nonce, ttl).await
    }

    async fn record_signed(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
        signed_at: u64,
    ) -> Result<NonceOutcome, StoreError> {
        let signed_at = i64::try_from(signed_at).unwrap_or(i64::MAX);
        match self.connection.nonces_lost(ttl) {
            Some(lost) if signed_at <= lost.signed_until => Err(StoreError::Unavailable {
                reason: format!(
                    "redis lost its data {} s ago, and a request signed at or before {} could replay a nonce recorded before (requests signed later pass)",
                    lost.since, lost.signed_until
                ),
            }),
            _ => self.set_once(key_id, nonce, ttl).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.connection.ping().await
    }
}

impl RedisNonceStore {
    /// The `SET NX` itself, once the connection is known to reach the data it had.
    async fn set_once(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<NonceOutcome, StoreError> {
        if self.connection.unchecked_reconnect() {
            return Err(StoreError::Unavailable {
                reason: "the connection to redis was lost and made again, and the revocation mirror has not yet checked that redis kept its data".to_owned(),
            });
        }
        // The nonce alphabet (A-Z a-z 0-9 - _) has no ':', so the last ':' splits the key
        // unambiguously whatever the key id holds.
        let key = format!("portcullis:nonce:{key_id}:{nonce}");
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let client = self.connection.client();
        let reply: Option<String> = self
            .connection
            .bounded(Box::pin(client.set(
                key,
                1,
                Some(Expiration::PX(ttl_ms)),
                Some(SetOptions::NX),
                false,
            )))
            .await?;
        Ok(match reply {
            Some(_) => NonceOutcome::Fresh,
            None => NonceOutcome::Replayed,
        })
    }
}

/// Rewrites the comma-separated host list of `redis-cluster://h1:p1,h2:p2` and
/// `redis-sentinel://h1:p1,h2:p2` into fred's form, `scheme://h1:p1?node=h2:p2`.
/// Other urls are returned unchanged.
fn fred_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user), hosts),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return url.to_owned();
    }
    let mut hosts = hosts.split(',').filter(|h| !h.is_empty());
    let first = hosts.next().unwrap_or_default();
    let nodes: Vec<String> = hosts.map(|h| format!("node={h}")).collect();
    let mut out = format!("{scheme}://");
    if let Some(user) = userinfo {
        out.push_str(user);
        out.push('@');
    }
    out.push_str(first);
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    out.push_str(path);
    out.push('?');
    out.push_str(&nodes.join("&"));
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        out.push('&');
        out.push_str(query);
    }
    out
}

/// The url without credentials or query (which may hold a sentinel password).
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable url>".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{hosts}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_memory_limit_with_an_evicting_policy_counts_as_evicting() {
        let info = |maxmemory: &str, policy: &str| {
            format!("# Memory\r\nused_memory:1024\r\nmaxmemory:{maxmemory}\r\nmaxmemory_human:x\r\nmaxmemory_policy:{policy}\r\n")
        };
        assert_eq!(
            evicting_policy(&info("67108864", "allkeys-lru")),
            Some("allkeys-lru")
        );
        assert_eq!(
            evicting_policy(&info("67108864", "volatile-ttl")),
            Some("volatile-ttl")
        );
        assert_eq!(evicting_policy(&info("67108864", "noeviction")), None);
        // No limit: Redis never evicts, whatever the policy says.
        assert_eq!(evicting_policy(&info("0", "allkeys-lru")), None);
        assert_eq!(evicting_policy("# Memory\r\nused_memory:1024\r\n"), None);
    }

    #[test]
    fn comma_separated_cluster_hosts_become_fred_node_parameters() {
        assert_eq!(
            fred_url("redis-cluster://h1:7000,h2:7001,h3:7002"),
            "redis-cluster://h1:7000?node=h2:7001&node=h3:7002"
        );
        assert_eq!(
            fred_url("redis-sentinel://u:p@s1:26379,s2:26379/2?sentinelServiceName=main"),
            "redis-sentinel://u:p@s1:26379/2?node=s2:26379&sentinelServiceName=main"
        );
        assert_eq!(
            fred_url("redis://u:p@h:6379/0"),
            "redis://u:p@h:6379/0",
            "single-host urls are left alone"
        );
    }

    #[test]
    fn urls_parse_for_every_documented_scheme() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://cache.example.org:6380/1",
            "redis-cluster://h1:7000,h2:7001",
            "redis-sentinel://s1:26379,s2:26379/0?sentinelServiceName=main",
        ] {
            assert!(Config::from_url(&fred_url(url)).is_ok(), "{url}");
        }
    }

    #[test]
    fn rediss_urls_use_tls() {
        let config = Config::from_url("rediss://cache.example.org:6380/1").unwrap();
        assert!(config.uses_tls());
        let config = Config::from_url("redis://cache.example.org:6379/1").unwrap();
        assert!(!config.uses_tls());
    }

    #[test]
    fn redacted_urls_hold_no_password() {
        assert_eq!(
            redacted("redis://user:hunter2@h:6379/0?x=1"),
            "redis://h:6379"
        );
        assert_eq!(
            redacted("redis-sentinel://s1:1,s2:2/0?sentinelPassword=hunter2"),
            "redis-sentinel://s1:1,s2:2"
        );
    }

    #[tokio::test]
    async fn an_unusable_url_is_an_invalid_url_error() {
        let error = RedisNonceStore::connect("http://h:1", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::InvalidUrl { .. }), "{error:?}");
    }
}
