//! Verification keys for the `jwt` check: each issuer's configured HMAC secrets plus its JWKS,
//! read from a file or fetched from a URL, cached, and refreshed in the background.
//!
//! On the request path [`KeyStore::keys_for`] finds the keys for a token's `kid` without taking
//! a lock: an issuer's current key set sits in an [`ArcSwapOption`]. Loading happens at start-up
//! ([`KeyStore::load`]), every `jwks_refresh` in a background task, and when a token names an
//! unknown `kid` (at most once per `jwks_min_refetch`; concurrent misses wait for one shared
//! fetch). A load that fails, or yields a document without a usable key, never replaces a good
//! set; the last good set is served until it is `jwks_max_stale` old, after which requests get
//! `keys_unavailable` (503) rather than verification with keys that may have been revoked.

mod jwks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::Algorithm;
use tokio::task::JoinHandle;

pub use jwks::{parse_algorithm, parse_jwks, KeyKind, VerificationKey};

use crate::auth::AuthError;
use crate::config::{IssuerConfig, JwksSource, JwtConfig};
use crate::metrics::Metrics;

/// The longest a JWKS fetch may take at start-up; all issuers are fetched in parallel, so this
/// bounds how long [`KeyStore::load`] waits.
const STARTUP_FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a background or on-demand JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest retry interval after a failed load (shortened to `jwks_min_refetch` if smaller).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The retry interval is never below this, so a `jwks_min_refetch` of 0s cannot spin.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The keys of one issuer as `/readyz` and `/metrics` see them.
#[derive(Debug, Clone)]
pub struct IssuerKeyStatus {
    /// The issuer's `iss` value.
    pub issuer: String,
    /// At least one usable key is held and it is not older than `jwks_max_stale`.
    pub loaded: bool,
    /// The last refresh failed; the keys served are older than one refresh interval.
    pub stale: bool,
    /// Since the keys were last loaded successfully.
    pub age: Option<Duration>,
    /// The last refresh error, if the last refresh failed.
    pub last_error: Option<String>,
}

/// Every issuer's keys. Dropping the store stops its background refresh tasks.
#[derive(Debug)]
pub struct KeyStore {
    issuers: HashMap<String, Arc<IssuerKeys>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KeyStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A set of keys loaded together, and when.
#[derive(Debug)]
struct KeySet {
    keys: Vec<Arc<VerificationKey>>,
    loaded_at: Instant,
}

/// The outcome of one look-up in the keys held now.
enum Lookup {
    Found(Vec<Arc<VerificationKey>>),
    /// A key with the token's `kid` exists but is of another kind (or pinned to another alg).
    WrongType(String),
    Missing,
}

/// One issuer's keys and the state of their loading.
#[derive(Debug)]
struct IssuerKeys {
    issuer: String,
    source: Option<JwksSource>,
    refresh: Duration,
    min_refetch: Duration,
    max_stale: Duration,
    /// Configured HMAC secrets; never stale.
    secrets: Vec<Arc<VerificationKey>>,
    /// The JWKS keys from the last successful load. Read without a lock on every request.
    jwks: ArcSwapOption<KeySet>,
    /// Serialises loads; holds when the last one started, for the `jwks_min_refetch` throttle.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Incremented after every finished load, so that a request that waited for the fetch lock
    /// can tell that someone else fetched meanwhile and only needs to look again.
    generation: AtomicU64,
    /// The last load's error (`None` after a success). Only touched by loads and `status`.
    last_error: Mutex<Option<String>>,
    created: Instant,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl KeyStore {
    /// Loads every issuer's keys once and starts their background refresh. Background tasks
    /// stop when the store is dropped.
    ///
    /// JWKS URLs are fetched in parallel, each bounded by a 3 s timeout, so this returns within
    /// a few seconds even when an issuer is unreachable; such an issuer is retried in the
    /// background and its tokens get `keys_unavailable` until a load succeeds.
    pub async fn load(config: &JwtConfig, metrics: Arc<Metrics>) -> Arc<KeyStore> {
        let client = match reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(STARTUP_FETCH_TIMEOUT)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                // Only a broken TLS backend makes the builder fail; the default client has the
                // same backend, so URL loads will then fail and be reported as errors.
                tracing::error!(error = %e, "cannot build the JWKS HTTP client");
                reqwest::Client::new()
            }
        };
        let issuers: Vec<Arc<IssuerKeys>> = config
            .issuers
            .iter()
            .map(|c| Arc::new(IssuerKeys::new(c, client.clone(), metrics.clone())))
            .collect();
        futures_util::future::join_all(
            issuers
                .iter()
                .filter(|k| k.source.is_some())
                .map(|k| k.reload(STARTUP_FETCH_TIMEOUT)),
        )
        .await;
        let tasks = issuers
            .iter()
            .filter(|k| k.source.is_some())
            .map(|k| tokio::spawn(refresh_loop(Arc::downgrade(k))))
            .collect();
        Arc::new(KeyStore {
            issuers: issuers.into_iter().map(|k| (k.issuer.clone(), k)).collect(),
            tasks,
        })
    }

    /// The state of every issuer's keys.
    pub fn status(&self) -> Vec<IssuerKeyStatus> {
        let mut all: Vec<IssuerKeyStatus> = self.issuers.values().map(|k| k.status()).collect();
        all.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        all
    }

    /// The keys of `issuer` that may verify a token signed with `alg`: the one named by `kid`,
    /// or without a `kid` every key that fits `alg`. An unknown `kid` triggers at most one
    /// throttled refetch before the answer.
    ///
    /// Errors:
    /// - [`AuthError::InvalidIssuer`]: `issuer` is not configured.
    /// - [`AuthError::AlgorithmNotAllowed`]: the `kid` names a key of another kind, or one whose
    ///   JWK pins another `alg` (an RSA key is never used as an HMAC secret).
    /// - [`AuthError::UnknownKey`]: no key has this `kid` (or, without `kid`, fits `alg`).
    /// - [`AuthError::KeysUnavailable`]: the issuer's JWKS was never loaded, or its last good
    ///   load is older than `jwks_max_stale`.
    pub async fn keys_for(
        &self,
        issuer: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerificationKey>>, AuthError> {
        let Some(keys) = self.issuers.get(issuer) else {
            return Err(AuthError::InvalidIssuer(
                "the token's issuer is not configured".into(),
            ));
        };
        match keys.lookup(kid, alg) {
            Lookup::Found(found) => return Ok(found),
            Lookup::WrongType(why) => return Err(AuthError::AlgorithmNotAllowed(why)),
            Lookup::Missing => {}
        }
        if keys.source.is_some() {
            keys.refetch_on_miss().await;
            match keys.lookup(kid, alg) {
                Lookup::Found(found) => return Ok(found),
                Lookup::WrongType(why) => return Err(AuthError::AlgorithmNotAllowed(why)),
                Lookup::Missing => {}
            }
            if keys.usable_jwks().is_none() && !(alg_is_hmac(alg) && !keys.secrets.is_empty()) {
                return Err(AuthError::KeysUnavailable(format!(
                    "the keys of issuer {:?} could not be loaded",
                    keys.issuer
                )));
            }
        }
        Err(AuthError::UnknownKey(match kid {
            Some(kid) => format!("no key of the issuer has kid {kid:?}"),
            None => format!("the token has no kid and no key of the issuer fits {alg:?}"),
        }))
    }
}

fn alg_is_hmac(alg: Algorithm) -> bool {
    KeyKind::Hmac.fits(alg)
}

/// Refreshes one issuer's JWKS every `jwks_refresh`, or sooner while loads fail. Holds only a
/// weak reference between loads, so it ends once the store is gone even without an abort.
async fn refresh_loop(keys: Weak<IssuerKeys>) {
    loop {
        let delay = match keys.upgrade() {
            Some(k) => k.next_refresh_delay(),
            None => return,
        };
        tokio::time::sleep(delay).await;
        let Some(k) = keys.upgrade() else { return };
        k.reload(FETCH_TIMEOUT).await;
    }
}

impl IssuerKeys {
    fn new(config: &IssuerConfig, client: reqwest::Client, metrics: Arc<Metrics>) -> Self {
        Self {
            issuer: config.issuer.clone(),
            source: config.jwks.clone(),
            refresh: config.jwks_refresh,
            min_refetch: config.jwks_min_refetch,
            max_stale: config.jwks_max_stale,
            secrets: config
                .secrets
                .iter()
                .map(|(kid, secret)| Arc::new(VerificationKey::hmac(kid, secret.expose())))
                .collect(),
            jwks: ArcSwapOption::empty(),
            fetch: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            last_error: Mutex::new(None),
            created: Instant::now(),
            client,
            metrics,
        }
    }

    /// The JWKS keys, unless never loaded or older than `jwks_max_stale`.
    fn usable_jwks(&self) -> Option<Arc<KeySet>> {
        self.jwks
            .load_full()
            .filter(|set| set.loaded_at.elapsed() <= self.max_stale)
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let jwks = self.usable_jwks();
        let jwks_keys = jwks.as_ref().map(|s| s.keys.as_slice()).unwrap_or(&[]);
        let all = || self.secrets.iter().chain(jwks_keys.iter());
        match kid {
            Some(kid) => match all().find(|k| k.kid.as_deref() == Some(kid)) {
                Some(k) if k.fits(alg) => Lookup::Found(vec![k.clone()]),
                Some(k) if k.kind.fits(alg) => Lookup::WrongType(format!(
                    "key {kid:?} only verifies {:?}, not {alg:?}",
                    k.alg
                )),
                Some(k) => Lookup::WrongType(format!(
                    "key {kid:?} is {}; {alg:?} does not fit it",
                    k.kind.name()
                )),
                None => Lookup::Missing,
            },
            None => {
                let found: Vec<_> = all().filter(|k| k.fits(alg)).cloned().collect();
                if found.is_empty() {
                    Lookup::Missing
                } else {
                    Lookup::Found(found)
                }
            }
        }
    }

    /// A refetch for a token whose key is missing: skipped when another load finished while we
    /// waited for the lock (the caller just looks again), or when the last load started less
    /// than `jwks_min_refetch` ago.
    async fn refetch_on_miss(&self) {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last_start = self.fetch.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return;
        }
        if last_start.is_some_and(|t| t.elapsed() < self.min_refetch) {
            return;
        }
        self.reload_locked(&mut last_start, FETCH_TIMEOUT).await;
    }

    /// One load, serialised with every other load of this issuer.
    async fn reload(&self, timeout: Duration) {
        let mut last_start = self.fetch.lock().await;
        self.reload_locked(&mut last_start, timeout).await;
    }

    async fn reload_locked(&self, last_start: &mut Option<Instant>, timeout: Duration) {
        *last_start = Some(Instant::now());
        let outcome = match self.read_source(timeout).await {
            Err(e) => Err(("error", e)),
            Ok(bytes) => parse_jwks(&self.issuer, &bytes).map_err(|e| ("invalid", e)),
        };
        let error = match outcome {
            Ok(keys) => {
                self.jwks.store(Some(Arc::new(KeySet {
                    keys: keys.into_iter().map(Arc::new).collect(),
                    loaded_at: Instant::now(),
                })));
                self.metrics.jwks_refresh(&self.issuer, "ok");
                None
            }
            Err((result, e)) => {
                tracing::warn!(issuer = %self.issuer, result, error = %e, "JWKS load failed; keeping the keys held");
                self.metrics.jwks_refresh(&self.issuer, result);
                Some(e)
            }
        };
        *lock(&self.last_error) = error;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn read_source(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        match &self.source {
            None => Err("no JWKS source is configured".into()),
            Some(JwksSource::File(path)) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
            Some(JwksSource::Url(url)) => {
                let mut response = self
                    .client
                    .get(url)
                    .timeout(timeout)
                    .header(http::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("GET {url}: status {}", response.status()));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?
                {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(format!(
                            "GET {url}: the JWKS is over {MAX_JWKS_BYTES} bytes"
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
        }
    }

    /// `jwks_refresh` while the last load succeeded; after a failure, retry sooner.
    fn next_refresh_delay(&self) -> Duration {
        if lock(&self.last_error).is_some() || self.jwks.load().is_none() {
            self.min_refetch.min(RETRY_AFTER_FAILURE).max(MIN_RETRY)
        } else {
            self.refresh
        }
    }

    fn status(&self) -> IssuerKeyStatus {
        let last_error = lock(&self.last_error).clone();
        if self.source.is_none() {
            return IssuerKeyStatus {
                issuer: self.issuer.clone(),
                loaded: !self.secrets.is_empty(),
                stale: false,
                age: Some(self.created.elapsed()),
                last_error: None,
            };
        }
        let held = self.jwks.load_full();
        let age = held.as_ref().map(|s| s.loaded_at.elapsed());
        IssuerKeyStatus {
            issuer: self.issuer.clone(),
            loaded: age.is_some_and(|a| a <= self.max_stale),
            stale: held.is_some() && last_error.is_some(),
            age,
            last_error,
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (it is replaced whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
