//! Revocations in Redis, mirrored in each replica's memory so that the per-request check is a
//! local lookup.
//!
//! Layout: one hash, `{portcullis}:revocations`, with fields `jti:<jti>` -> exp and
//! `sub:<sub>` -> before, and three of its own: `~epoch` (a random id, made by the first script
//! that finds the hash without one), `~gen` (the changes made in that epoch) and `~lost` (when a
//! replica last wrote its mirror back, by the server's clock). One key means one slot in a
//! cluster: a resync is one script on one node, and every change and every event comes from
//! that node in one order. Changes are Lua scripts that update the hash, count the change and
//! `PUBLISH` the resulting entry on `portcullis:revocations` in the same atomic step ("durable,
//! then published"): `s:<epoch>:<gen>:<value>:<field>` for a set entry,
//! `d:<epoch>:<gen>:<field>` for a removed one.
//!
//! Lost writes: Redis restarted without persistence, failed over to a replica that had not
//! caught up, restarted from an older snapshot, or flushed. The mirror finds them when a dump
//! holds another epoch, or fewer changes than the mirror has applied, or when a message showed
//! Redis counting again changes the mirror applied. It is told to look by a heartbeat or an
//! event of another epoch, a heartbeat with fewer changes than applied, an event reusing an
//! applied change number, a skipped change, a reconnect of any connection, a failed resync (at
//! the next heartbeat), or the 30 s resync.
//! It then writes itself back into the hash, keeping the later value of each entry. Only then
//! does it load the hash, so that no replica ever takes the emptier hash as the truth. The
//! write-back records the loss in the hash, and every replica's dump passes it to the
//! connection: the nonce store refuses nonces until those recorded before it are past their TTL.
//!
//! Each store runs one background task with its own subscriber connection. It:
//! - subscribes, then loads the whole hash (pruning expired token revocations in the same
//!   script), on start, after every reconnect of the subscriber, when its event channel
//!   overflowed, and every [`RESYNC_EVERY`]. Subscribing first means no change falls between
//!   the snapshot and the events that follow it.
//! - publishes a heartbeat of its own every `revocation_max_lag / 4` (between 50 ms and 1 s),
//!   through the same script path as the changes, with the hash's epoch and change count (`h:<instance>:<sequence>:<epoch>:<changes>`).
//!   When its own heartbeat comes back on the
//!   subscription, every change published before that heartbeat was sent has been applied: the
//!   mirror is confirmed current as of the heartbeat's send time.
//!
//! The mirror changes only from events and resyncs, in the order Redis published them. A
//! revoke or unrevoke through this store asks the task for a heartbeat and returns once it
//! has come back (so the change's own event has been applied): a check on this replica right
//! after sees the change, and no change is written into the mirror out of order.
//!
//! [`RevocationStore::is_revoked`] answers from the mirror while the last confirmation is at most
//! `revocation_max_lag` old, and errs otherwise (and before the first one): a replica that lost
//! its subscription, or whose Redis is gone, fails closed after at most the lag, and keeps
//! answering from the mirror for at least `3/4` of it after the last heartbeat, so that a blip
//! shorter than that is not an outage.
//!
//! Cost: every replica receives every replica's heartbeats, `replicas^2 / interval` tiny
//! messages a second (400/s for 20 replicas at the default 5 s lag).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::ConnectHandle;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::redis::{LuaScript, RedisConnection};
use super::revocation::{
    unix_now, Revocation, RevocationSet, RevocationStore, TOKEN_REVOCATION_GRACE_SECS,
};
use super::StoreError;

/// The hash that holds every revocation (the braces make it its own hash tag).
const HASH: &str = "{portcullis}:revocations";

/// The pub/sub channel of revocation events and heartbeats.
const CHANNEL: &str = "portcullis:revocations";

/// A full resync this often, whatever the events say: a safety net for a change that somehow
/// never produced an event (a hand edit of the hash, say).
pub const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// How long [`RedisRevocationStore::new`] waits for the mirror's first confirmation.
const FIRST_SYNC_GRACE: Duration = Duration::from_secs(1);

/// Heartbeats sent and not yet seen back that are remembered; older ones are forgotten (they
/// would confirm an older state than a later one anyway).
const OUTSTANDING: usize = 64;

/// The start of every script that writes: `epoch()` returns the hash's epoch, and creates one
/// (ARGV[1], a new random id) with change 0 when the hash has none: on the first write ever,
/// or after Redis lost the hash (a restart without persistence, a flush).
macro_rules! with_epoch {
    ($body:literal) => {
        concat!(
            r"
local function epoch()
  local e = redis.call('HGET', KEYS[1], '~epoch')
  if not e then
    e = ARGV[1]
    redis.call('HDEL', KEYS[1], '~lost')
    redis.call('HSET', KEYS[1], '~epoch', e, '~gen', 0)
  end
  return e
end
",
            $body
        )
    };
}

/// KEYS[1]: the hash. ARGV: new epoch, field, value, channel. Keeps the later value; counts a
/// change and publishes the entry.
const REVOKE: &str = with_epoch!(
    r"
local e = epoch()
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[2]))
local value = ARGV[3]
if stored and stored >= tonumber(value) then
  value = tostring(stored)
else
  redis.call('HSET', KEYS[1], ARGV[2], value)
end
local gen = redis.call('HINCRBY', KEYS[1], '~gen', 1)
redis.call('PUBLISH', ARGV[4], 's:' .. e .. ':' .. gen .. ':' .. value .. ':' .. ARGV[2])
return tonumber(value)
"
);

/// KEYS[1]: the hash. ARGV: new epoch, field, the latest value to remove ('' = any), channel.
const UNREVOKE: &str = with_epoch!(
    r"
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then
  return 0
end
local stored = tonumber(raw)
if ARGV[3] ~= '' and stored and stored > tonumber(ARGV[3]) then
  return 0
end
local e = epoch()
redis.call('HDEL', KEYS[1], ARGV[2])
local gen = redis.call('HINCRBY', KEYS[1], '~gen', 1)
redis.call('PUBLISH', ARGV[4], 'd:' .. e .. ':' .. gen .. ':' .. ARGV[2])
return 1
"
);

/// KEYS[1]: the hash. ARGV: new epoch, the grace in seconds. Deletes the token revocations
/// whose exp is more than the grace before the Redis server's clock, and returns epoch, change,
/// the server's clock, the last loss ('' when none), then the entries as field, value, field,
/// value... The server's clock, not the replica's that runs the script: a replica whose clock
/// ran fast would otherwise delete revocations the others still need, and their next resync
/// would drop them too. Pruning is not a change: it removes only what no check can match.
const DUMP: &str = with_epoch!(
    r"
local e = epoch()
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(redis.call('TIME')[1])
local oldest = now - tonumber(ARGV[2])
local out = {e, '0', tostring(now), ''}
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  if string.sub(field, 1, 1) == '~' then
    if field == '~gen' then
      out[2] = value
    elseif field == '~lost' then
      out[4] = value
    end
  elseif string.sub(field, 1, 4) == 'jti:' and (tonumber(value) or oldest) < oldest then
    redis.call('HDEL', KEYS[1], field)
  else
    out[#out + 1] = field
    out[#out + 1] = value
  end
end
return out
"
);

/// KEYS[1]: the hash. ARGV: new epoch, the last change the replica saw, channel, then field,
/// value, field, value... Writes back a replica's mirror after Redis lost writes: each entry
/// keeps the later of the two values. Counts a change past both Redis's and the replica's,
/// records the loss by the server's clock and publishes `r:<epoch>` (every replica resyncs).
const RESTORE: &str = with_epoch!(
    r"
local e = epoch()
for i = 4, #ARGV, 2 do
  local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if not stored or stored < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local gen = tonumber(redis.call('HGET', KEYS[1], '~gen')) or 0
local seen = tonumber(ARGV[2]) or 0
if seen > gen then
  gen = seen
end
local now = tonumber(redis.call('TIME')[1])
local lost = tonumber(redis.call('HGET', KEYS[1], '~lost')) or 0
if now > lost then
  lost = now
end
redis.call('HSET', KEYS[1], '~gen', tostring(gen + 1), '~lost', tostring(lost))
redis.call('PUBLISH', ARGV[3], 'r:' .. e)
return gen + 1
"
);

/// KEYS[1]: the hash (to run on its node, and for its epoch). ARGV: channel, message. The
/// message goes out with `:<epoch>:<changes>` appended, both empty when the hash is gone.
const HEARTBEAT: &str = r"
local e = redis.call('HGET', KEYS[1], '~epoch') or ''
local gen = redis.call('HGET', KEYS[1], '~gen') or ''
return redis.call('PUBLISH', ARGV[1], ARGV[2] .. ':' .. e .. ':' .. gen)
";

/// Entries written back by one [`RESTORE`] call.
const RESTORE_CHUNK: usize = 500;

/// A new random epoch, offered to every script that may have to create one.
fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The scripts, hashed once.
#[derive(Debug)]
struct Scripts {
    revoke: LuaScript,
    unrevoke: LuaScript,
    dump: LuaScript,
    restore: LuaScript,
    heartbeat: LuaScript,
}

/// What the request path reads and the background task writes.
#[derive(Debug)]
struct Mirror {
    set: RwLock<RevocationSet>,
    /// The send time of the last heartbeat seen back; `None` until the first one.
    confirmed_at: Mutex<Option<Instant>>,
    /// Woken at each confirmation.
    confirmed: Notify,
    /// Tells the task to send a heartbeat now (a revoke or unrevoke waits for it).
    kick: Notify,
    max_lag: Duration,
}

impl Mirror {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, RevocationSet> {
        // Each update is one map operation or a whole replacement: a panic cannot leave a
        // half-updated set behind, so a poisoned lock still guards a consistent one.
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RevocationSet> {
        // See `read`.
        self.set.write().unwrap_or_else(|e| e.into_inner())
    }

    fn confirmed_at(&self) -> Option<Instant> {
        // Holds a plain Instant: never inconsistent.
        *self.confirmed_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn confirm(&self, at: Instant) {
        let mut slot = self.confirmed_at.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none_or(|t| t < at) {
            *slot = Some(at);
        }
        drop(slot);
        self.confirmed.notify_waiters();
    }

    /// Waits until the mirror is confirmed current as of `since`: a heartbeat sent after it
    /// has come back, so every event published before `since` has been applied, in order.
    ///
    /// False, at once, when the mirror is not current now, and otherwise once it stops being
    /// current without having caught up. Either way it fails closed meanwhile, so no check on
    /// this replica answers from it before the change is in it.
    async fn caught_up(&self, since: Instant) -> bool {
        let Some(last) = self
            .confirmed_at()
            .filter(|at| at.elapsed() <= self.max_lag)
        else {
            return false;
        };
        let deadline = last + self.max_lag;
        self.kick.notify_one();
        loop {
            let confirmed = self.confirmed.notified();
            tokio::pin!(confirmed);
            // Registered before the check, so that a confirmation between the two wakes it.
            confirmed.as_mut().enable();
            if self.confirmed_at().is_some_and(|at| at >= since) {
                return true;
            }
            if tokio::time::timeout_at(deadline, confirmed).await.is_err() {
                return false;
            }
        }
    }

    /// Ok when the mirror was confirmed current within `max_lag`.
    fn fresh(&self) -> Result<(), StoreError> {
        match self.confirmed_at() {
            None => Err(StoreError::Unavailable {
                reason: "the revocation mirror has not synced with redis yet".to_owned(),
            }),
            Some(at) if at.elapsed() > self.max_lag => Err(StoreError::Unavailable {
                reason: format!(
                    "the revocation mirror was last confirmed current {:?} ago (max lag {:?})",
                    at.elapsed(),
                    self.max_lag
                ),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// Revocations in Redis with a local mirror; see the module doc.
///
/// Dropping it stops its background task and its subscriber connection.
pub struct RedisRevocationStore {
    connection: RedisConnection,
    mirror: Arc<Mirror>,
    scripts: Arc<Scripts>,
    task: JoinHandle<()>,
    subscriber_driver: ConnectHandle,
}

impl std::fmt::Debug for RedisRevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRevocationStore")
            .field("target", &self.connection.target())
            .field("max_lag", &self.mirror.max_lag)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisRevocationStore {
    fn drop(&mut self) {
        self.task.abort();
        self.subscriber_driver.abort();
    }
}

impl RedisRevocationStore {
    /// Starts the mirror on `connection` (plus a subscriber connection of its own) and waits
    /// up to a second for its first sync; a Redis that is down gives a store whose
    /// `is_revoked` errs until it is up. `max_lag` is `[store] revocation_max_lag`.
    pub async fn new(connection: RedisConnection, max_lag: Duration) -> Result<Self, StoreError> {
        let subscriber = connection.new_client()?;
        let mirror = Arc::new(Mirror {
            set: RwLock::new(RevocationSet::default()),
            confirmed_at: Mutex::new(None),
            confirmed: Notify::new(),
            kick: Notify::new(),
            max_lag,
        });
        let scripts = Arc::new(Scripts {
            revoke: LuaScript::new(REVOKE),
            unrevoke: LuaScript::new(UNREVOKE),
            dump: LuaScript::new(DUMP),
            restore: LuaScript::new(RESTORE),
            heartbeat: LuaScript::new(HEARTBEAT),
        });
        // Receivers taken before connecting, so that the first connection's event is seen.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        let subscriber_driver = subscriber.connect();
        let task = MirrorTask {
            connection: connection.clone(),
            mirror: mirror.clone(),
            scripts: scripts.clone(),
            subscriber,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            heartbeat: (max_lag / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            subscribed: false,
            last_resync: None,
            sequence: 0,
            outstanding: VecDeque::new(),
            epoch: None,
            dumped: 0,
            dumped_at: None,
            evented: 0,
            suspect: false,
            gone_back: false,
        };
        let task = tokio::spawn(task.run(messages, reconnects));
        let store = Self {
            connection,
            mirror,
            scripts,
            task,
            subscriber_driver,
        };
        let deadline = Instant::now() + FIRST_SYNC_GRACE;
        while store.mirror.confirmed_at().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if store.mirror.confirmed_at().is_none() {
            tracing::warn!(
                target = store.connection.target(),
                "the revocation mirror has not synced yet; revocation checks fail until it does"
            );
        }
        Ok(store)
    }

    /// Parses `url`, starts connecting and starts the mirror; see [`RedisConnection::connect`].
    pub async fn connect(
        url: &str,
        timeout: Duration,
        max_lag: Duration,
    ) -> Result<Self, StoreError> {
        Self::new(RedisConnection::connect(url, timeout).await?, max_lag).await
    }

    /// The whole hash, pruned of expired token revocations.
    async fn dump(&self) -> Result<Dump, StoreError> {
        dump(&self.connection, &self.scripts.dump).await
    }
}

/// What [`DUMP`] returns: the entries, and where the hash stands.
#[derive(Debug)]
struct Dump {
    set: RevocationSet,
    /// The hash's epoch: a random id made when the hash was created.
    epoch: String,
    /// Changes made in this epoch (revokes, unrevokes and write-backs, each counted once).
    changes: u64,
    /// The Redis server's clock, in Unix seconds.
    server_now: i64,
    /// When a replica last wrote its mirror back after a loss, by the server's clock.
    lost_at: Option<i64>,
}

/// Runs the dump script and parses its reply.
async fn dump(connection: &RedisConnection, script: &LuaScript) -> Result<Dump, StoreError> {
    let flat: Vec<String> = connection
        .run_script(
            script,
            vec![HASH.to_owned()],
            vec![new_epoch(), TOKEN_REVOCATION_GRACE_SECS.to_string()],
        )
        .await?;
    let unreadable = || StoreError::Refused {
        reason: "the revocation dump script answered in an unknown shape".to_owned(),
    };
    let [epoch, changes, server_now, lost_at, entries @ ..] = flat.as_slice() else {
        return Err(unreadable());
    };
    let mut set = RevocationSet::default();
    for pair in entries.chunks_exact(2) {
        let parsed = pair[1]
            .parse()
            .ok()
            .and_then(|value| Revocation::from_field(&pair[0], value));
        match parsed {
            Some(r) => set.set(&r),
            None => {
                tracing::warn!(field = %pair[0], "ignoring an unreadable revocation entry in redis")
            }
        }
    }
    Ok(Dump {
        set,
        epoch: epoch.clone(),
        changes: changes.parse().map_err(|_| unreadable())?,
        server_now: server_now.parse().map_err(|_| unreadable())?,
        lost_at: lost_at.parse().ok(),
    })
}

#[async_trait::async_trait]
impl RevocationStore for RedisRevocationStore {
    async fn revoke(&self, r: &Revocation) -> Result<(), StoreError> {
        // The script answers with the value it kept (the later of the two); the event carries it.
        let _kept: i64 = self
            .connection
            .run_script(
                &self.scripts.revoke,
                vec![HASH.to_owned()],
                vec![
                    new_epoch(),
                    r.field(),
                    r.value().to_string(),
                    CHANNEL.to_owned(),
                ],
            )
            .await?;
        // Once this returns, a check on this replica must see the revocation. The mirror
        // takes it from the event, in the order Redis published it: written here instead, it
        // could land after a later event from another replica (an unrevoke) and undo it.
        if !self.mirror.caught_up(Instant::now()).await {
            tracing::warn!(
                "revocation events are late: checks on this replica fail closed until they come"
            );
        }
        Ok(())
    }

    async fn unrevoke(&self, r: &Revocation) -> Result<(), StoreError> {
        let latest = match r {
            Revocation::Token { .. } => String::new(),
            Revocation::Subject { before, .. } => before.to_string(),
        };
        let removed: i64 = self
            .connection
            .run_script(
                &self.scripts.unrevoke,
                vec![HASH.to_owned()],
                vec![new_epoch(), r.field(), latest, CHANNEL.to_owned()],
            )
            .await?;
        // As for a revoke, the mirror takes the removal from the event.
        if removed == 1 && !self.mirror.caught_up(Instant::now()).await {
            tracing::warn!(
                "revocation events are late: checks on this replica fail closed until they come"
            );
        }
        Ok(())
    }

    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Revocation>, Option<String>), StoreError> {
        // From Redis rather than the mirror: the admin API shows what is stored. One HGETALL
        // per page, fine for the thousands of entries this is made for.
        Ok(self.dump().await?.set.page(cursor, limit, unix_now()))
    }

    fn is_revoked(
        &self,
        jti: Option<&str>,
        sub: Option<&str>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<bool, StoreError> {
        // A stale mirror can only lack revocations made since (or hold one undone since, which
        // errs on the safe side): one it holds is enforced however old it is, so that
        // `on_error = "allow"` never passes a token this replica knows to be revoked.
        if self.mirror.read().is_revoked(jti, sub, iat, now) {
            return Ok(true);
        }
        self.mirror.fresh()?;
        Ok(false)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.connection.ping().await?;
        self.mirror.fresh()
    }
}

/// The background task of one store.
struct MirrorTask {
    connection: RedisConnection,
    mirror: Arc<Mirror>,
    scripts: Arc<Scripts>,
    subscriber: Client,
    /// Tells this store's heartbeats from other replicas'.
    instance: String,
    heartbeat: Duration,
    /// Subscribed and synced on the current subscriber connection.
    subscribed: bool,
    last_resync: Option<Instant>,
    sequence: u64,
    /// Heartbeats sent on the current subscription and not seen back yet, oldest first.
    outstanding: VecDeque<(u64, Instant)>,
    /// The hash's epoch the mirror holds; `None` before the first resync.
    epoch: Option<String>,
    /// The change count of the last dump: an event at or below it is in the mirror already.
    dumped: u64,
    /// When the last dump came back.
    dumped_at: Option<Instant>,
    /// The highest change applied from an event since the last dump (0 when none).
    evented: u64,
    /// A message said the mirror may not match Redis (another epoch, a change skipped, a
    /// write-back), or the last resync failed: resync before anything else.
    suspect: bool,
    /// A message showed Redis went back within the epoch (a change number applied already, a
    /// heartbeat with fewer changes than applied): the next dump is a loss whatever its count
    /// says, since new changes may have made up the count.
    gone_back: bool,
}

type Messages = tokio::sync::broadcast::Receiver<fred::types::Message>;
type Reconnects = tokio::sync::broadcast::Receiver<fred::types::config::Server>;

impl MirrorTask {
    async fn run(mut self, mut messages: Messages, mut reconnects: Reconnects) {
        let continuity = self.connection.continuity();
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                message = messages.recv() => match message {
                    Ok(message) => {
                        self.handle(&message);
                        if self.suspect && self.subscribed {
                            self.resync().await;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "revocation events overflowed; resyncing");
                        self.lost_subscription();
                    }
                    Err(RecvError::Closed) => return,
                },
                event = reconnects.recv() => match event {
                    // A new subscriber connection starts unsubscribed; anything may have
                    // changed while there was none.
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        self.lost_subscription();
                        self.establish(&mut messages).await;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let silent = self.outstanding.front().is_some_and(|(_, sent)| sent.elapsed() > self.mirror.max_lag);
                    if silent {
                        // Heartbeats go out but none come back: the subscription is gone
                        // without a reconnect to say so.
                        self.lost_subscription();
                    }
                    if !self.subscribed {
                        self.establish(&mut messages).await;
                    } else if self.suspect || self.last_resync.is_none_or(|t| t.elapsed() >= RESYNC_EVERY) {
                        self.resync().await;
                    }
                    if self.subscribed {
                        self.send_heartbeat().await;
                    }
                }
                // The pool lost or made a connection: nonces wait until a resync has compared
                // the hash with what the mirror saw.
                () = continuity.changed.notified(), if self.subscribed => {
                    self.resync().await;
                }
                // Last: a stream of admin calls must not hold up the resync, the check for a
                // silent subscription or a reconnect.
                () = self.mirror.kick.notified(), if self.subscribed => {
                    self.send_heartbeat().await;
                }
            }
        }
    }

    fn lost_subscription(&mut self) {
        self.subscribed = false;
        self.outstanding.clear();
    }

    /// Subscribes, then loads the whole hash. Events still queued from an older subscription
    /// are applied first, so that none of them lands on top of the newer snapshot.
    async fn establish(&mut self, messages: &mut Messages) {
        loop {
            match messages.try_recv() {
                Ok(message) => self.handle(&message),
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if !self.subscriber.is_connected() {
            return;
        }
        let subscriber = self.subscriber.with_options(self.connection.options());
        if let Err(error) = self.connection.bounded(subscriber.subscribe(CHANNEL)).await {
            tracing::warn!(%error, "cannot subscribe to revocation events");
            return;
        }
        if self.resync().await {
            self.subscribed = true;
        }
    }

    /// Replaces the mirror with the hash, after writing the mirror back if Redis lost writes
    /// the mirror holds. True when it worked.
    async fn resync(&mut self) -> bool {
        // Read before the dump: a connection event after it is checked by the next resync.
        let events = self.connection.connection_events();
        // Cleared only by a resync that works: a failed one is tried again at the next tick.
        self.suspect = true;
        let dumped = match dump(&self.connection, &self.scripts.dump).await {
            Ok(dumped) => dumped,
            Err(error) => {
                tracing::warn!(%error, "cannot load the revocations from redis");
                return false;
            }
        };
        let dumped = match self.lost_writes(&dumped) {
            None => dumped,
            Some(what) => {
                // Recorded here as well as in the hash: the nonces fail closed even when the
                // write-back below fails. The mirror is left as it is until the write-back is
                // done: it keeps enforcing what it holds meanwhile.
                self.connection.note_data_loss(unix_now());
                let entries = self.mirror.read().fields().count();
                tracing::error!(
                    "redis lost revocations ({what}): writing back the {entries} this replica holds; signed requests fail closed until nonces recorded before the loss can no longer be replayed"
                );
                if let Err(error) = self.write_back().await {
                    tracing::warn!(%error, "cannot write the revocations back to redis");
                    return false;
                }
                match dump(&self.connection, &self.scripts.dump).await {
                    Ok(dumped) => dumped,
                    Err(error) => {
                        tracing::warn!(%error, "cannot load the revocations from redis");
                        return false;
                    }
                }
            }
        };
        if let Some(lost_at) = dumped.lost_at {
            // The server's clock says how long ago; this machine's clock says when.
            let ago = dumped.server_now.saturating_sub(lost_at).max(0);
            self.connection
                .note_data_loss(unix_now().saturating_sub(ago));
        }
        *self.mirror.write() = dumped.set;
        self.epoch = Some(dumped.epoch);
        self.dumped = dumped.changes;
        self.dumped_at = Some(Instant::now());
        self.evented = 0;
        self.suspect = false;
        self.gone_back = false;
        self.last_resync = Some(Instant::now());
        self.connection.checked_through(events);
        true
    }

    /// What Redis lost, when the dump holds less than the mirror has seen: another epoch (the
    /// hash was gone: a restart without persistence, a flush, a failover to a replica that
    /// never had it), or an earlier change of the same one (a failover to a replica that had
    /// not caught up, a restart from an older snapshot). `None` before the first resync.
    fn lost_writes(&self, dumped: &Dump) -> Option<String> {
        let epoch = self.epoch.as_deref()?;
        if self.gone_back {
            Some(format!(
                "its revocation hash went back: it counted again changes the mirror had applied (now at {}, the mirror at {})",
                dumped.changes, self.changes()
            ))
        } else if dumped.epoch != epoch {
            Some(format!(
                "its revocation hash was made anew: epoch {epoch} is gone, {} is there",
                dumped.epoch
            ))
        } else if dumped.changes < self.changes() {
            Some(format!(
                "its revocation hash went back from change {} to change {}",
                self.changes(),
                dumped.changes
            ))
        } else {
            None
        }
    }

    /// Writes every entry of the mirror back to the hash ([`RESTORE`]), in chunks.
    async fn write_back(&self) -> Result<(), StoreError> {
        let entries: Vec<(String, i64)> = self.mirror.read().fields().collect();
        let mut chunks = entries.chunks(RESTORE_CHUNK).peekable();
        // At least one call, even with an empty mirror: it records the loss for the nonces.
        let empty: &[(String, i64)] = &[];
        let first = chunks.peek().is_none().then_some(empty);
        for chunk in first.into_iter().chain(chunks) {
            let mut args = vec![new_epoch(), self.changes().to_string(), CHANNEL.to_owned()];
            for (field, value) in chunk {
                args.push(field.clone());
                args.push(value.to_string());
            }
            let _changes: i64 = self
                .connection
                .run_script(&self.scripts.restore, vec![HASH.to_owned()], args)
                .await?;
        }
        Ok(())
    }

    async fn send_heartbeat(&mut self) {
        self.sequence += 1;
        let message = format!("h:{}:{}", self.instance, self.sequence);
        self.outstanding.push_back((self.sequence, Instant::now()));
        if self.outstanding.len() > OUTSTANDING {
            self.outstanding.pop_front();
        }
        let sent: Result<i64, StoreError> = self
            .connection
            .run_script(
                &self.scripts.heartbeat,
                vec![HASH.to_owned()],
                vec![CHANNEL.to_owned(), message],
            )
            .await;
        if let Err(error) = sent {
            tracing::debug!(%error, "revocation heartbeat not sent");
        }
    }

    fn handle(&mut self, message: &fred::types::Message) {
        if message.channel != CHANNEL {
            return;
        }
        let Ok(text) = message.value.clone().convert::<String>() else {
            return;
        };
        let Some(event) = parse_event(&text) else {
            tracing::warn!(event = %text, "ignoring an unreadable revocation event");
            return;
        };
        // Before the first resync there is nothing to compare with: the resync loads it all.
        let Some(epoch) = self.epoch.as_deref() else {
            return;
        };
        match event {
            Event::Set { epoch: e, .. } | Event::Removed { epoch: e, .. } if e != epoch => {
                // Changes of another epoch: Redis lost the hash this mirror came from.
                self.suspect = true;
            }
            Event::Set { change, .. } | Event::Removed { change, .. } if change <= self.dumped => {
                // Already in the mirror: published before the dump it holds was taken.
            }
            Event::Set { change, .. } | Event::Removed { change, .. }
                if change <= self.changes() =>
            {
                // A number the mirror has applied an event of already: Redis went back (a
                // failover to a replica that had not caught up, an older snapshot) and counts
                // again from there. The resync writes the mirror back.
                self.suspect = true;
                self.gone_back = true;
            }
            Event::Set { change, entry, .. } => {
                self.mirror.write().set(&entry);
                self.applied(change);
            }
            Event::Removed { change, field, .. } => {
                self.mirror.write().remove_field(field);
                self.applied(change);
            }
            Event::Heartbeat {
                instance,
                sequence,
                epoch: e,
                changes,
            } => {
                let own = if instance == self.instance {
                    self.outstanding
                        .iter()
                        .find(|(s, _)| *s == sequence)
                        .map(|&(_, sent)| sent)
                } else {
                    None
                };
                // The fewest changes the hash can have had when the heartbeat was sent: every
                // event before it on the channel has been applied, so at least the highest of
                // those; and for this replica's own heartbeat sent after the last dump came
                // back, at least the dump's. (Another replica's heartbeat, or an older one of
                // its own, may have been sent before the dump, with fewer changes.)
                let floor = match own {
                    Some(sent) if self.dumped_at.is_some_and(|at| sent >= at) => self.changes(),
                    _ => self.evented,
                };
                if e == epoch && changes.is_some_and(|c| c < floor) {
                    // Fewer changes than the mirror applied before this heartbeat was sent:
                    // Redis went back. The resync writes the mirror back.
                    self.suspect = true;
                    self.gone_back = true;
                } else if e != epoch || changes.is_none() {
                    // Redis holds another epoch (or none), or the heartbeat is older than the
                    // last resync: a resync tells which, and writes the mirror back if need be.
                    self.suspect = true;
                } else if let Some(sent) = own {
                    self.outstanding.retain(|(s, _)| *s > sequence);
                    self.mirror.confirm(sent);
                }
            }
            Event::WrittenBack => self.suspect = true,
        }
    }

    /// Records that change `change` is in the mirror; one skipped means an event was lost.
    fn applied(&mut self, change: u64) {
        if change > self.changes() + 1 {
            self.suspect = true;
        }
        self.evented = change;
    }

    /// The last change of the epoch the mirror holds: the dump's, or a later event's.
    fn changes(&self) -> u64 {
        self.dumped.max(self.evented)
    }
}

/// One message on [`CHANNEL`]. `epoch` and `change` say where the hash stood when it was sent.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// `s:<epoch>:<change>:<value>:<field>`: the entry now holds this.
    Set {
        epoch: &'a str,
        change: u64,
        entry: Revocation,
    },
    /// `d:<epoch>:<change>:<field>`: the entry is gone.
    Removed {
        epoch: &'a str,
        change: u64,
        field: &'a str,
    },
    /// `h:<instance>:<sequence>:<epoch>:<changes>` (both empty when the hash was gone).
    Heartbeat {
        instance: &'a str,
        sequence: u64,
        epoch: &'a str,
        /// `None` when the hash had no count.
        changes: Option<u64>,
    },
    /// `r:<epoch>`: a replica wrote its mirror back after a loss.
    WrittenBack,
}

fn parse_event(text: &str) -> Option<Event<'_>> {
    let (kind, rest) = text.split_once(':')?;
    match kind {
        "s" => {
            let (epoch, rest) = rest.split_once(':')?;
            let (change, rest) = rest.split_once(':')?;
            let (value, field) = rest.split_once(':')?;
            Some(Event::Set {
                epoch,
                change: change.parse().ok()?,
                entry: Revocation::from_field(field, value.parse().ok()?)?,
            })
        }
        "d" => {
            let (epoch, rest) = rest.split_once(':')?;
            let (change, field) = rest.split_once(':')?;
            Some(Event::Removed {
                epoch,
                change: change.parse().ok()?,
                field,
            })
        }
        "h" => {
            let (instance, rest) = rest.split_once(':')?;
            let (sequence, rest) = rest.split_once(':')?;
            let (epoch, changes) = rest.split_once(':')?;
            Some(Event::Heartbeat {
                instance,
                sequence: sequence.parse().ok()?,
                epoch,
                changes: match changes {
                    "" => None,
                    n => Some(n.parse().ok()?),
                },
            })
        }
        "r" => Some(Event::WrittenBack),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        assert_eq!(
            parse_event("s:e1:7:-5:sub:a:b"),
            Some(Event::Set {
                epoch: "e1",
                change: 7,
                entry: Revocation::Subject {
                    sub: "a:b".into(),
                    before: -5
                }
            })
        );
        assert_eq!(
            parse_event("d:e1:8:jti:x"),
            Some(Event::Removed {
                epoch: "e1",
                change: 8,
                field: "jti:x"
            })
        );
        assert_eq!(
            parse_event("h:abc:7:e1:12"),
            Some(Event::Heartbeat {
                instance: "abc",
                sequence: 7,
                epoch: "e1",
                changes: Some(12)
            })
        );
        assert_eq!(
            parse_event("h:abc:7::"),
            Some(Event::Heartbeat {
                instance: "abc",
                sequence: 7,
                epoch: "",
                changes: None
            })
        );
        assert_eq!(parse_event("h:abc:7:e1"), None);
        assert_eq!(parse_event("h:abc:7:e1:x"), None);
        assert_eq!(parse_event("r:e2"), Some(Event::WrittenBack));
        // The layout of earlier builds, and broken ones.
        assert_eq!(parse_event("s:-5:jti:a"), None);
        assert_eq!(parse_event("h:abc:7"), None);
        assert_eq!(parse_event("s:e1:x:5:jti:a"), None);
        assert_eq!(parse_event("z:1"), None);
    }
}
