//! Revocations in Redis, mirrored in each replica's memory so that the per-request check is a
//! local lookup.
//!
//! Layout: one hash, `{portcullis}:revocations`, with fields `jti:<jti>` -> exp and
//! `sub:<sub>` -> before. One key means one slot in a cluster: a resync is one script on one
//! node, and every change and every event comes from that node in one order. Changes are Lua
//! scripts that update the hash and `PUBLISH` the resulting entry on
//! `portcullis:revocations` in the same atomic step ("durable, then published"): `s:<value>:<field>`
//! for a set entry, `d:<field>` for a removed one.
//!
//! Each store runs one background task with its own subscriber connection. It:
//! - subscribes, then loads the whole hash (pruning expired token revocations in the same
//!   script), on start, after every reconnect of the subscriber, when its event channel
//!   overflowed, and every [`RESYNC_EVERY`]. Subscribing first means no change falls between
//!   the snapshot and the events that follow it.
//! - publishes a heartbeat of its own every `revocation_max_lag / 4` (between 50 ms and 1 s),
//!   through the same script path as the changes. When its own heartbeat comes back on the
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

/// KEYS[1]: the hash. ARGV: field, value, channel. Keeps the later value; publishes the entry.
const REVOKE: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local value = ARGV[2]
if stored and tonumber(stored) >= tonumber(value) then
  value = stored
else
  redis.call('HSET', KEYS[1], ARGV[1], value)
end
redis.call('PUBLISH', ARGV[3], 's:' .. value .. ':' .. ARGV[1])
return tonumber(value)
";

/// KEYS[1]: the hash. ARGV: field, the latest value to remove ('' = any), channel.
const UNREVOKE: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then
  return 0
end
if ARGV[2] ~= '' and tonumber(stored) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'd:' .. ARGV[1])
return 1
";

/// KEYS[1]: the hash. ARGV: the grace in seconds. Deletes the token revocations whose exp is
/// more than the grace before the Redis server's clock, and returns the rest as field, value,
/// field, value... The server's clock, not the replica's that runs the script: a replica whose
/// clock ran fast would otherwise delete revocations the others still need, and their next
/// resync would drop them too.
const DUMP: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local out = {}
local oldest = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[1])
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  if string.sub(field, 1, 4) == 'jti:' and (tonumber(value) or oldest) < oldest then
    redis.call('HDEL', KEYS[1], field)
  else
    out[#out + 1] = field
    out[#out + 1] = value
  end
end
return out
";

/// KEYS[1]: the hash (only to run on its node). ARGV: channel, message.
const HEARTBEAT: &str = r"
return redis.call('PUBLISH', ARGV[1], ARGV[2])
";

/// The scripts, hashed once.
#[derive(Debug)]
struct Scripts {
    revoke: LuaScript,
    unrevoke: LuaScript,
    dump: LuaScript,
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
    async fn dump(&self) -> Result<RevocationSet, StoreError> {
        dump(&self.connection, &self.scripts.dump).await
    }
}

/// Runs the dump script and parses its reply.
async fn dump(
    connection: &RedisConnection,
    script: &LuaScript,
) -> Result<RevocationSet, StoreError> {
    let flat: Vec<String> = connection
        .run_script(
            script,
            vec![HASH.to_owned()],
            vec![TOKEN_REVOCATION_GRACE_SECS.to_string()],
        )
        .await?;
    let mut set = RevocationSet::default();
    for pair in flat.chunks_exact(2) {
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
    Ok(set)
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
                vec![r.field(), r.value().to_string(), CHANNEL.to_owned()],
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
                vec![r.field(), latest, CHANNEL.to_owned()],
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
        Ok(self.dump().await?.page(cursor, limit, unix_now()))
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
}

type Messages = tokio::sync::broadcast::Receiver<fred::types::Message>;
type Reconnects = tokio::sync::broadcast::Receiver<fred::types::config::Server>;

impl MirrorTask {
    async fn run(mut self, mut messages: Messages, mut reconnects: Reconnects) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                message = messages.recv() => match message {
                    Ok(message) => self.handle(&message),
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
                    } else if self.last_resync.is_none_or(|t| t.elapsed() >= RESYNC_EVERY) {
                        self.resync().await;
                    }
                    if self.subscribed {
                        self.send_heartbeat().await;
                    }
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

    /// Replaces the mirror with the hash. True when it worked.
    async fn resync(&mut self) -> bool {
        match dump(&self.connection, &self.scripts.dump).await {
            Ok(set) => {
                *self.mirror.write() = set;
                self.last_resync = Some(Instant::now());
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot load the revocations from redis");
                false
            }
        }
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
        match parse_event(&text) {
            Some(Event::Set(r)) => self.mirror.write().set(&r),
            Some(Event::Removed(field)) => self.mirror.write().remove_field(field),
            Some(Event::Heartbeat { instance, sequence }) if instance == self.instance => {
                if let Some(&(_, sent)) = self.outstanding.iter().find(|(s, _)| *s == sequence) {
                    self.outstanding.retain(|(s, _)| *s > sequence);
                    self.mirror.confirm(sent);
                }
            }
            Some(Event::Heartbeat { .. }) => {}
            None => tracing::warn!(event = %text, "ignoring an unreadable revocation event"),
        }
    }
}

/// One message on [`CHANNEL`].
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// `s:<value>:<field>`: the entry now holds this.
    Set(Revocation),
    /// `d:<field>`: the entry is gone.
    Removed(&'a str),
    /// `h:<instance>:<sequence>`.
    Heartbeat { instance: &'a str, sequence: u64 },
}

fn parse_event(text: &str) -> Option<Event<'_>> {
    let (kind, rest) = text.split_once(':')?;
    match kind {
        "s" => {
            let (value, field) = rest.split_once(':')?;
            Revocation::from_field(field, value.parse().ok()?).map(Event::Set)
        }
        "d" => Some(Event::Removed(rest)),
        "h" => {
            let (instance, sequence) = rest.split_once(':')?;
            Some(Event::Heartbeat {
                instance,
                sequence: sequence.parse().ok()?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        assert_eq!(
            parse_event("s:-5:sub:a:b"),
            Some(Event::Set(Revocation::Subject {
                sub: "a:b".into(),
                before: -5
            }))
        );
        assert_eq!(parse_event("d:jti:x"), Some(Event::Removed("jti:x")));
        assert_eq!(
            parse_event("h:abc:7"),
            Some(Event::Heartbeat {
                instance: "abc",
                sequence: 7
            })
        );
        assert_eq!(parse_event("s:x:jti:a"), None);
        assert_eq!(parse_event("z:1"), None);
    }
}
