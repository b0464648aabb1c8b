//! Revoked tokens: one token by its `jti`, or every token of a subject issued before a time.
//!
//! On the request path the JWT check, once the token is verified, calls
//! [`RevocationStore::is_revoked`] with the token's `jti`, `sub` and `iat`. That call is a local
//! lookup with no I/O: the memory store holds the set itself, and the Redis store keeps a mirror
//! of it in each replica that pub/sub keeps current (see [`super::redis_revocation`]). `true` is
//! 401 token_revoked; an error (a mirror that cannot be confirmed current) is 503
//! store_unavailable unless `[store] on_error = "allow"`. The admin API calls
//! [`RevocationStore::revoke`], [`RevocationStore::unrevoke`] and [`RevocationStore::list`].

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::StoreError;

/// How long after its `exp` a token revocation is still kept and still answers "revoked".
///
/// The JWT check accepts a token up to `[jwt] leeway` after its `exp`; a revocation forgotten
/// at `exp` would let the token through again for that leeway. The store does not know the
/// leeway, so it keeps every token revocation this much longer, which covers any sensible one.
pub const TOKEN_REVOCATION_GRACE_SECS: i64 = 300;

/// One revocation, as the admin API takes it: `{"jti": "...", "exp": 1764003600}` or
/// `{"sub": "...", "before": 1764000000}`. Any other field is an error.
///
/// Serialises untagged to exactly those shapes. Deserialising denies unknown fields and a mix
/// of the two shapes (serde's derive cannot do that for an untagged enum, hence the hand-written
/// impl); [`Revocation::from_json`] also refuses an empty `jti` or `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Revocation {
    /// The token with this `jti`, kept until its `exp` (plus [`TOKEN_REVOCATION_GRACE_SECS`]).
    Token {
        /// The token's `jti` claim.
        jti: String,
        /// The token's `exp` (Unix seconds); after it the revocation is forgotten.
        exp: i64,
    },
    /// Every token of `sub` with `iat < before`, and every token of `sub` without `iat`.
    Subject {
        /// The subject (`sub` claim).
        sub: String,
        /// Unix seconds; tokens issued at or after it are not covered.
        before: i64,
    },
}

// serde's `deny_unknown_fields` does not reach the variants of an untagged enum, so
// deserialisation goes through one struct per shape that denies them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenShape {
    jti: String,
    exp: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectShape {
    sub: String,
    before: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Shape {
    Token(TokenShape),
    Subject(SubjectShape),
}

impl Revocation {
    /// Parses the admin API's JSON body, rejecting unknown fields, mixed shapes and an empty
    /// `jti` or `sub`.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        let revocation: Revocation = serde_json::from_slice(body).map_err(|_| SHAPES.to_owned())?;
        let empty = match &revocation {
            Revocation::Token { jti, .. } => jti.is_empty(),
            Revocation::Subject { sub, .. } => sub.is_empty(),
        };
        if empty {
            return Err("jti and sub must not be empty".to_owned());
        }
        Ok(revocation)
    }

    /// Refuses an `exp` or `before` outside 0 to 9999-12-31T23:59:59Z, for a new revocation.
    /// Redis's scripts compare these as Lua numbers (doubles): past 2^53 two different times
    /// could compare equal, or a revocation read back as another time. Undoing one is not
    /// checked, so that a revocation stored before this limit can still be removed.
    pub fn check_time(&self) -> Result<(), String> {
        if (0..=LATEST_TIME).contains(&self.value()) {
            Ok(())
        } else {
            Err(format!(
                "exp and before are Unix times in seconds, from 0 to {LATEST_TIME} (9999-12-31T23:59:59Z)"
            ))
        }
    }

    /// The key that orders [`RevocationStore::list`] and names the entry in Redis:
    /// `jti:<jti>` or `sub:<sub>`.
    pub(crate) fn field(&self) -> String {
        match self {
            Revocation::Token { jti, .. } => format!("jti:{jti}"),
            Revocation::Subject { sub, .. } => format!("sub:{sub}"),
        }
    }

    /// The number stored with the entry: `exp` or `before`.
    pub(crate) fn value(&self) -> i64 {
        match self {
            Revocation::Token { exp, .. } => *exp,
            Revocation::Subject { before, .. } => *before,
        }
    }

    /// Rebuilds a revocation from its field and value (the inverse of [`Self::field`] and
    /// [`Self::value`]); `None` for a field of neither kind.
    pub(crate) fn from_field(field: &str, value: i64) -> Option<Self> {
        if let Some(jti) = field.strip_prefix("jti:") {
            Some(Revocation::Token {
                jti: jti.to_owned(),
                exp: value,
            })
        } else {
            field.strip_prefix("sub:").map(|sub| Revocation::Subject {
                sub: sub.to_owned(),
                before: value,
            })
        }
    }
}

/// The latest `exp` or `before` a revocation may name: 9999-12-31T23:59:59Z.
const LATEST_TIME: i64 = 253_402_300_799;

/// What a revocation body must look like, for error messages.
const SHAPES: &str =
    "expected {\"jti\": string, \"exp\": integer} or {\"sub\": string, \"before\": integer}";

impl<'de> Deserialize<'de> for Revocation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let shape =
            Shape::deserialize(deserializer).map_err(|_| serde::de::Error::custom(SHAPES))?;
        Ok(match shape {
            Shape::Token(t) => Revocation::Token {
                jti: t.jti,
                exp: t.exp,
            },
            Shape::Subject(s) => Revocation::Subject {
                sub: s.sub,
                before: s.before,
            },
        })
    }
}

/// Remembers revoked tokens and subjects, and answers per request without I/O.
///
/// Object-safe: the proxy holds an `Arc<dyn RevocationStore>`.
#[async_trait::async_trait]
pub trait RevocationStore: Send + Sync + std::fmt::Debug {
    /// Records `r`, durably in the backend first, then tells every replica. A token revocation
    /// with an `exp` already more than [`TOKEN_REVOCATION_GRACE_SECS`] past is accepted and
    /// forgotten at once. For one `jti` the latest `exp` is kept; for one `sub` the latest
    /// `before` (a later revocation is never weakened by an earlier one posted after it).
    async fn revoke(&self, r: &Revocation) -> Result<(), StoreError>;

    /// Undoes a mistake: removes the revocation of `r`'s `jti` (whatever its `exp`), or the
    /// revocation of `r`'s `sub` if its `before` is not later than `r`'s (a later subject
    /// revocation than the one being undone stays). Unknown revocations are not an error.
    async fn unrevoke(&self, r: &Revocation) -> Result<(), StoreError>;

    /// Up to `limit` revocations after `cursor` (the opaque string a previous page returned;
    /// `None` for the first page), in a stable order (by kind, then `jti` or `sub`), and the
    /// cursor of the next page when there may be one. Expired token revocations are left out.
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Revocation>, Option<String>), StoreError>;

    /// Local, no I/O: is a token with this `jti` / `sub` / `iat` revoked at `now` (Unix
    /// seconds)? A subject revocation covers tokens with `iat < before`, and tokens without
    /// `iat` (they cannot prove they were issued later).
    ///
    /// `Err` when the answer cannot be trusted: for Redis, a mirror not confirmed current within
    /// `[store] revocation_max_lag` (or not synced yet). Never `Ok(false)` in that case; but
    /// `Ok(true)` for a revocation the mirror holds, however old it is.
    fn is_revoked(
        &self,
        jti: Option<&str>,
        sub: Option<&str>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Checks that the backend answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The revocation set itself: token `exp` by `jti`, subject `before` by `sub`. What the memory
/// store holds, and what the Redis store mirrors.
///
/// Ordered maps so that [`RevocationSet::page`] is stable; lookups are O(log n), which for the
/// thousands of revocations a deployment holds is a handful of string comparisons.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RevocationSet {
    tokens: BTreeMap<String, i64>,
    subjects: BTreeMap<String, i64>,
}

impl RevocationSet {
    /// Adds `r`, keeping the later value when one is already there.
    pub(crate) fn insert(&mut self, r: &Revocation) {
        let (map, key, value) = match r {
            Revocation::Token { jti, exp } => (&mut self.tokens, jti, *exp),
            Revocation::Subject { sub, before } => (&mut self.subjects, sub, *before),
        };
        let slot = map.entry(key.clone()).or_insert(value);
        *slot = (*slot).max(value);
    }

    /// Sets the entry of `r` to exactly `r`'s value (an event from Redis, which already
    /// applied the "latest wins" rule).
    pub(crate) fn set(&mut self, r: &Revocation) {
        match r {
            Revocation::Token { jti, exp } => self.tokens.insert(jti.clone(), *exp),
            Revocation::Subject { sub, before } => self.subjects.insert(sub.clone(), *before),
        };
    }

    /// The undo rule of [`RevocationStore::unrevoke`].
    pub(crate) fn remove(&mut self, r: &Revocation) {
        match r {
            Revocation::Token { jti, .. } => {
                self.tokens.remove(jti);
            }
            Revocation::Subject { sub, before } => {
                if self
                    .subjects
                    .get(sub)
                    .is_some_and(|stored| stored <= before)
                {
                    self.subjects.remove(sub);
                }
            }
        }
    }

    /// Removes the entry named by `field` (`jti:<jti>` or `sub:<sub>`), whatever its value.
    pub(crate) fn remove_field(&mut self, field: &str) {
        if let Some(jti) = field.strip_prefix("jti:") {
            self.tokens.remove(jti);
        } else if let Some(sub) = field.strip_prefix("sub:") {
            self.subjects.remove(sub);
        }
    }

    /// Every entry as its Redis field and value (`jti:<jti>` -> exp, `sub:<sub>` -> before).
    pub(crate) fn fields(&self) -> impl Iterator<Item = (String, i64)> + '_ {
        let tokens = self
            .tokens
            .iter()
            .map(|(jti, exp)| (format!("jti:{jti}"), *exp));
        let subjects = self
            .subjects
            .iter()
            .map(|(sub, before)| (format!("sub:{sub}"), *before));
        tokens.chain(subjects)
    }

    /// Forgets token revocations whose token can no longer pass the JWT check.
    pub(crate) fn prune(&mut self, now: i64) {
        self.tokens.retain(|_, exp| !expired(*exp, now));
    }

    /// See [`RevocationStore::is_revoked`].
    pub(crate) fn is_revoked(
        &self,
        jti: Option<&str>,
        sub: Option<&str>,
        iat: Option<i64>,
        now: i64,
    ) -> bool {
        let token = jti
            .and_then(|jti| self.tokens.get(jti))
            .is_some_and(|exp| !expired(*exp, now));
        let subject = sub
            .and_then(|sub| self.subjects.get(sub))
            .is_some_and(|before| iat.is_none_or(|iat| iat < *before));
        token || subject
    }

    /// One page of [`RevocationStore::list`]; the cursor is the last entry's field.
    pub(crate) fn page(
        &self,
        cursor: Option<&str>,
        limit: usize,
        now: i64,
    ) -> (Vec<Revocation>, Option<String>) {
        use std::ops::Bound::{Excluded, Unbounded};
        // Order: every `jti:` field, then every `sub:` field, as their field strings sort.
        let (token_from, subject_from) = match cursor {
            None => (Unbounded, Unbounded),
            Some(c) => match (c.strip_prefix("jti:"), c.strip_prefix("sub:")) {
                (Some(jti), _) => (Excluded(jti.to_owned()), Unbounded),
                (_, Some(sub)) => (Unbounded, Excluded(sub.to_owned())),
                // An unknown cursor starts after everything rather than at the beginning, so
                // that a client cannot loop forever on a bad one.
                _ => return (Vec::new(), None),
            },
        };
        let skip_tokens = cursor.is_some_and(|c| c.starts_with("sub:"));
        let tokens = self
            .tokens
            .range::<String, _>((token_from, Unbounded))
            .filter(|_| !skip_tokens)
            .filter(|(_, exp)| !expired(**exp, now))
            .map(|(jti, exp)| Revocation::Token {
                jti: jti.clone(),
                exp: *exp,
            });
        let subjects = self
            .subjects
            .range::<String, _>((subject_from, Unbounded))
            .map(|(sub, before)| Revocation::Subject {
                sub: sub.clone(),
                before: *before,
            });
        let mut items: Vec<Revocation> = tokens
            .chain(subjects)
            .take(limit.saturating_add(1))
            .collect();
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(Revocation::field)
        } else {
            None
        };
        (items, next)
    }
}

/// Whether a token revocation with this `exp` can be forgotten at `now`.
pub(crate) fn expired(exp: i64, now: i64) -> bool {
    exp.saturating_add(TOKEN_REVOCATION_GRACE_SECS) < now
}

/// The current Unix time in seconds.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Revocations in this process, for a proxy that runs as one replica (with several, each one
/// only knows what was posted to it: use Redis). Never fails, so `on_error` never applies.
///
/// Expired token revocations are pruned on every [`RevocationStore::revoke`]: O(n) per
/// revocation, which is fine for an admin operation and keeps the set from growing without
/// bound.
#[derive(Debug, Default)]
pub struct MemoryRevocationStore {
    set: RwLock<RevocationSet>,
}

impl MemoryRevocationStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RevocationSet> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is
        // one map operation), so a poisoned lock is still a consistent set.
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RevocationSet> {
        // See `read`.
        self.set.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl RevocationStore for MemoryRevocationStore {
    async fn revoke(&self, r: &Revocation) -> Result<(), StoreError> {
        let mut set = self.write();
        set.insert(r);
        set.prune(unix_now());
        Ok(())
    }

    async fn unrevoke(&self, r: &Revocation) -> Result<(), StoreError> {
        self.write().remove(r);
        Ok(())
    }

    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Revocation>, Option<String>), StoreError> {
        Ok(self.read().page(cursor, limit, unix_now()))
    }

    fn is_revoked(
        &self,
        jti: Option<&str>,
        sub: Option<&str>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.read().is_revoked(jti, sub, iat, now))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_round_trip_through_json_and_deny_unknown_fields() {
        let token = Revocation::from_json(br#"{"jti":"abc","exp":1764003600}"#).unwrap();
        assert_eq!(
            token,
            Revocation::Token {
                jti: "abc".into(),
                exp: 1764003600
            }
        );
        assert_eq!(
            serde_json::to_string(&token).unwrap(),
            r#"{"jti":"abc","exp":1764003600}"#
        );
        let subject = Revocation::from_json(br#"{"sub":"u1","before":1764000000}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&subject).unwrap(),
            r#"{"sub":"u1","before":1764000000}"#
        );
        for bad in [
            r#"{"jti":"abc","exp":1,"extra":true}"#,
            r#"{"jti":"abc","exp":1,"sub":"u"}"#,
            r#"{"sub":"u","before":"1"}"#,
            r#"{"jti":"abc"}"#,
            r#"{"jti":"","exp":1}"#,
            r#"[]"#,
        ] {
            assert!(Revocation::from_json(bad.as_bytes()).is_err(), "{bad}");
            if !bad.contains(r#""""#) {
                assert!(serde_json::from_str::<Revocation>(bad).is_err(), "{bad}");
            }
        }
        // Times Redis's scripts can hold exactly (Lua numbers are doubles).
        for bad in [
            r#"{"sub":"u","before":9223372036854775807}"#,
            r#"{"jti":"abc","exp":253402300800}"#,
            r#"{"jti":"abc","exp":-1}"#,
        ] {
            let parsed = Revocation::from_json(bad.as_bytes()).unwrap();
            let error = parsed.check_time().unwrap_err();
            assert!(error.contains("Unix times"), "{bad}: {error}");
        }
        for good in [
            r#"{"sub":"u","before":253402300799}"#,
            r#"{"jti":"abc","exp":0}"#,
        ] {
            let parsed = Revocation::from_json(good.as_bytes()).unwrap();
            assert_eq!(parsed.check_time(), Ok(()), "{good}");
        }
        let parsed: Revocation = serde_json::from_str(r#"{"sub":"u1","before":5}"#).unwrap();
        assert_eq!(
            parsed,
            Revocation::Subject {
                sub: "u1".into(),
                before: 5
            }
        );
    }

    #[test]
    fn fields_round_trip() {
        for r in [
            Revocation::Token {
                jti: "a:b".into(),
                exp: 7,
            },
            Revocation::Subject {
                sub: "jti:x".into(),
                before: 9,
            },
        ] {
            assert_eq!(Revocation::from_field(&r.field(), r.value()), Some(r));
        }
        assert_eq!(Revocation::from_field("x:y", 1), None);
    }
}
