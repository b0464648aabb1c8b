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
#[cfg(test)]
pub(crate) mod testing;

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

/// Every issuer's keys. Dropping the store stops its background refresh tasks; a refetch for an
/// unknown `kid` that is under way still runs to its end (at most [`FETCH_TIMEOUT`]).
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

/// The keys that may verify a token: the one its `kid` names or, without a `kid`, every key
/// that fits its `alg`. Never empty; a single key (the usual case) needs no allocation.
#[derive(Debug)]
pub struct CandidateKeys {
    first: Arc<VerificationKey>,
    rest: Vec<Arc<VerificationKey>>,
}

impl CandidateKeys {
    /// The keys, in the order they are held: configured secrets first, then the JWKS.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<VerificationKey>> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }
}

/// The outcome of one look-up in the keys held now.
enum Lookup {
    Found(CandidateKeys),
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
    /// Shared so that an on-miss fetch's task can own the lock until the fetch ends.
    fetch: Arc<tokio::sync::Mutex<Option<Instant>>>,
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

    /// Whether keys from `issuer`'s JWKS may still be trusted: loaded, and the last good load
    /// not older than `jwks_max_stale`. Asked on a verified-cache hit, which must not outlast
    /// the keys it was verified with.
    pub fn jwks_usable(&self, issuer: &str) -> bool {
        self.issuers
            .get(issuer)
            .is_some_and(|keys| keys.jwks.load().as_ref().is_some_and(|set| keys.fresh(set)))
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
    ) -> Result<CandidateKeys, AuthError> {
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
            // HMAC secrets do not come from the JWKS, so they stay usable without it.
            let secrets_suffice = alg_is_hmac(alg) && !keys.secrets.is_empty();
            if keys.usable_jwks().is_none() && !secrets_suffice {
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

/// Reads a JWKS file on the runtime's own thread, refusing one over [`MAX_JWKS_BYTES`].
///
/// It runs at start-up, at each refresh and on a refetch for an unknown `kid` (at most once per
/// `jwks_min_refetch`). The file is local and a JWKS a few KiB, so the read takes microseconds
/// (a 1 MiB file from the page cache: under a tenth of a millisecond). `tokio::fs`
/// would hand it to a blocking-pool thread, and once a process has started a second thread,
/// glibc takes the multi-threaded path of every `send` and `recv` for the rest of the process's
/// life (their cancellation-point bookkeeping: about 0.2 µs of a public request on the
/// benchmark machine).
pub(crate) fn read_jwks_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut body = Vec::new();
    // One byte over the limit tells a file at the limit from a larger one.
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(cannot_read)?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "{}: the JWKS is over {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    Ok(body)
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
            fetch: Arc::new(tokio::sync::Mutex::new(None)),
            generation: AtomicU64::new(0),
            last_error: Mutex::new(None),
            created: Instant::now(),
            client,
            metrics,
        }
    }

    /// The JWKS keys, unless never loaded or older than `jwks_max_stale`.
    fn usable_jwks(&self) -> Option<Arc<KeySet>> {
        self.jwks.load_full().filter(|set| self.fresh(set))
    }

    /// Whether `set` is within `jwks_max_stale` of its load.
    fn fresh(&self, set: &KeySet) -> bool {
        set.loaded_at.elapsed() <= self.max_stale
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        match kid {
            Some(kid) => {
                // Secrets first, as they are listed before the JWKS; the JWKS (and the clock, for
                // its age) only when no secret has this kid.
                let named = |k: &&Arc<VerificationKey>| k.kid.as_deref() == Some(kid);
                let jwks;
                let key = match self.secrets.iter().find(named) {
                    Some(k) => k,
                    None => {
                        jwks = self.usable_jwks();
                        match jwks.as_ref().and_then(|s| s.keys.iter().find(named)) {
                            Some(k) => k,
                            None => return Lookup::Missing,
                        }
                    }
                };
                if key.fits(alg) {
                    Lookup::Found(CandidateKeys {
                        first: key.clone(),
                        rest: Vec::new(),
                    })
                } else if key.kind.fits(alg) {
                    Lookup::WrongType(format!(
                        "key {kid:?} only verifies {:?}, not {alg:?}",
                        key.alg
                    ))
                } else {
                    Lookup::WrongType(format!(
                        "key {kid:?} is {}; {alg:?} does not fit it",
                        key.kind.name()
                    ))
                }
            }
            None => {
                let jwks = self.usable_jwks();
                let jwks_keys = jwks.as_ref().map(|s| s.keys.as_slice()).unwrap_or(&[]);
                let mut fitting = self
                    .secrets
                    .iter()
                    .chain(jwks_keys.iter())
                    .filter(|k| k.fits(alg));
                match fitting.next() {
                    Some(first) => Lookup::Found(CandidateKeys {
                        first: first.clone(),
                        rest: fitting.cloned().collect(),
                    }),
                    None => Lookup::Missing,
                }
            }
        }
    }

    /// A refetch for a token whose key is missing: skipped when another load finished while we
    /// waited for the lock (the caller just looks again), or when the last load started less
    /// than `jwks_min_refetch` ago.
    ///
    /// The fetch runs in a task of its own, which holds the fetch lock until the load is stored.
    /// The request only waits for it: hyper drops a request's future when the client hangs up
    /// or resets its stream, and a fetch dropped half-way would leave the throttle set with
    /// nothing loaded, so that every unknown `kid` got unknown_key without a fetch for the next
    /// `jwks_min_refetch`. Misses that arrive meanwhile wait for the lock and then see the new
    /// generation, whether or not the request that started the fetch is still there.
    async fn refetch_on_miss(self: &Arc<Self>) {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last_start = self.fetch.clone().lock_owned().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return;
        }
        if last_start.is_some_and(|t| t.elapsed() < self.min_refetch) {
            return;
        }
        let keys = Arc::clone(self);
        let fetch = tokio::spawn(async move {
            keys.reload_locked(&mut last_start, FETCH_TIMEOUT).await;
        });
        // A panic in the load is not the request's to report; the lock went with the task, and
        // the caller looks again at whatever keys are held.
        if let Err(e) = fetch.await {
            tracing::error!(issuer = %self.issuer, error = %e, "JWKS refetch task failed");
        }
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
                // A key that is still in the set stays the same `Arc`: tokens verified with it
                // stay in the verified cache, which drops those whose key is gone
                // (`JwtVerifier::verify`).
                let held = self.jwks.load_full();
                let held = held.as_ref().map(|set| set.keys.as_slice()).unwrap_or(&[]);
                let keys = keys
                    .into_iter()
                    .map(|key| match held.iter().find(|h| h.same_public_key(&key)) {
                        Some(same) => same.clone(),
                        None => Arc::new(key),
                    })
                    .collect();
                self.jwks.store(Some(Arc::new(KeySet {
                    keys,
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
            Some(JwksSource::File(path)) => read_jwks_file(path),
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
            loaded: held.as_deref().is_some_and(|set| self.fresh(set)),
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

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;

    async fn store(issuer: IssuerConfig) -> (Arc<KeyStore>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let store = KeyStore::load(&jwt_config(vec![issuer], 0), metrics.clone()).await;
        (store, metrics)
    }

    async fn find(store: &KeyStore, key: &TestKey) -> Result<usize, AuthError> {
        store
            .keys_for(ISSUER, Some(key.kid()), key.alg())
            .await
            .map(|k| k.iter().count())
    }

    fn count(metrics: &Metrics, result: &str) -> usize {
        let needle = format!("result=\"{result}\"");
        metrics
            .encode()
            .lines()
            .filter(|l| l.contains(&needle) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    }

    #[tokio::test]
    async fn one_bad_key_does_not_spoil_the_set() {
        let good = TestKey::es256();
        let mut short_rsa = TestKey::rs256().jwk();
        short_rsa["n"] = json!("AQAB");
        short_rsa["kid"] = json!("short");
        let mut encryption = TestKey::es256().jwk();
        encryption["use"] = json!("enc");
        let body = json!({"keys": [
            short_rsa,
            {"kty": "EC", "kid": "bad-b64", "crv": "P-256", "x": "!!", "y": "!!"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            encryption,
            "not an object",
            good.jwk(),
        ]});
        let (_dir, source) = jwks_file(&body.to_string());
        let (store, metrics) = store(issuer(source, &[])).await;
        assert_eq!(find(&store, &good).await, Ok(1));
        let status = &store.status()[0];
        assert!(status.loaded && !status.stale && status.last_error.is_none());
        assert_eq!(count(&metrics, "ok"), 1);
    }

    #[tokio::test]
    async fn jwks_file_over_the_size_limit_is_refused() {
        let key = TestKey::es256();
        let body = jwks(&[&key]).to_string();
        // JSON allows trailing whitespace: the same key set, padded to the limit and one over.
        let padded = |len: usize| format!("{body}{}", " ".repeat(len - body.len()));

        let (_dir, source) = jwks_file(&padded(MAX_JWKS_BYTES));
        let (at_limit, _) = store(issuer(source, &[])).await;
        assert_eq!(
            find(&at_limit, &key).await,
            Ok(1),
            "a file at the limit loads"
        );

        let (_dir, source) = jwks_file(&padded(MAX_JWKS_BYTES + 1));
        let (over, metrics) = store(issuer(source, &[])).await;
        assert!(find(&over, &key).await.is_err());
        let status = &over.status()[0];
        assert!(!status.loaded);
        let error = status.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("the JWKS is over 1048576 bytes"), "{error}");
        assert_eq!(count(&metrics, "ok"), 0);
    }

    #[tokio::test]
    async fn symmetric_jwk_is_never_loaded() {
        let body = json!({"keys": [{"kty": "oct", "kid": "sym", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]});
        let server = JwksServer::start(&body).await;
        let (store, metrics) = store(issuer(url(&server), &[])).await;
        assert!(matches!(
            store.keys_for(ISSUER, Some("sym"), Algorithm::HS256).await,
            Err(AuthError::KeysUnavailable(_))
        ));
        assert!(count(&metrics, "invalid") >= 1);
        assert!(!store.status()[0].loaded);
    }

    #[tokio::test]
    async fn invalid_jwks_never_replaces_good_keys() {
        let old = TestKey::rs256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_min_refetch = Duration::ZERO;
        let (store, metrics) = store(config).await;
        assert_eq!(find(&store, &old).await, Ok(1));

        for bad in ["not json", "{\"keys\": []}", "{\"nokeys\": 1}", "[1, 2]"] {
            server.serve(200, bad);
            let unknown = TestKey::es256();
            assert!(matches!(
                find(&store, &unknown).await,
                Err(AuthError::UnknownKey(_))
            ));
            assert_eq!(find(&store, &old).await, Ok(1), "after {bad:?}");
        }
        assert_eq!(count(&metrics, "invalid"), 4);
        let status = &store.status()[0];
        assert!(status.loaded && status.stale);
        assert!(status.last_error.as_deref().unwrap().contains("JWKS"));
    }

    #[tokio::test]
    async fn failed_fetch_keeps_last_good_keys() {
        let old = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_min_refetch = Duration::ZERO;
        let (store, metrics) = store(config).await;
        server.serve(500, "oops");
        let unknown = TestKey::es256();
        assert!(matches!(
            find(&store, &unknown).await,
            Err(AuthError::UnknownKey(_))
        ));
        assert_eq!(find(&store, &old).await, Ok(1));
        assert_eq!(count(&metrics, "error"), 1);
        let status = &store.status()[0];
        assert!(status.stale && status.loaded);
        assert!(status.last_error.as_deref().unwrap().contains("500"));
    }

    #[tokio::test]
    async fn unknown_kid_is_found_after_rotation() {
        let old = TestKey::es256();
        let new = TestKey::eddsa();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_min_refetch = Duration::ZERO;
        let (store, _) = store(config).await;
        server.serve(200, &jwks(&[&old, &new]).to_string());
        assert_eq!(find(&store, &new).await, Ok(1));
        assert_eq!(server.fetches(), 2);
    }

    #[tokio::test]
    async fn unknown_kid_refetch_is_throttled() {
        let old = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let (store, _) = store(issuer(url(&server), &[])).await; // min_refetch 30s
        let new = TestKey::es256();
        server.serve(200, &jwks(&[&old, &new]).to_string());
        for _ in 0..3 {
            assert!(matches!(
                find(&store, &new).await,
                Err(AuthError::UnknownKey(_))
            ));
        }
        assert_eq!(server.fetches(), 1, "only the start-up load");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_unknown_kids_share_one_fetch() {
        let old = TestKey::es256();
        let new = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_min_refetch = Duration::ZERO;
        let (store, _) = store(config).await;
        server.serve(200, &jwks(&[&old, &new]).to_string());
        server.delay(Duration::from_millis(300));
        let lookups: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                let kid = new.kid().to_owned();
                tokio::spawn(async move {
                    store
                        .keys_for(ISSUER, Some(&kid), Algorithm::ES256)
                        .await
                        .map(|k| k.iter().count())
                })
            })
            .collect();
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap(), Ok(1));
        }
        assert_eq!(server.fetches(), 2, "start-up load plus one shared refetch");
    }

    /// A client that hangs up (or a caller whose timeout fires) drops the lookup's future in the
    /// middle of its refetch. The fetch must finish anyway: otherwise it would leave the throttle
    /// set without loading anything, and every unknown `kid` would get unknown_key without a
    /// fetch for the next `jwks_min_refetch`, each time an attacker repeats the trick.
    #[tokio::test]
    async fn refetch_completes_when_the_lookup_that_started_it_is_dropped() {
        let old = TestKey::es256();
        let new = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_min_refetch = Duration::from_secs(1);
        let (store, _) = store(config).await;
        // Past the start-up load's throttle window, so that the next miss fetches.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        server.serve(200, &jwks(&[&old, &new]).to_string());
        server.delay(Duration::from_millis(300));
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            store.keys_for(ISSUER, Some(new.kid()), Algorithm::ES256),
        )
        .await;
        assert!(dropped.is_err(), "the lookup was dropped mid-fetch");
        // The refetch reached the server (which, on this single-threaded runtime, has already
        // read its 300 ms delay) before the lookup was dropped.
        assert_eq!(
            server.fetches(),
            2,
            "start-up load plus the dropped refetch"
        );
        server.delay(Duration::ZERO);

        assert_eq!(
            find(&store, &new).await,
            Ok(1),
            "the new key is found once the dropped lookup's fetch completes"
        );
        assert_eq!(server.fetches(), 2, "the later lookup shared that fetch");
        // The fetch still counts for the throttle.
        let unknown = TestKey::es256();
        assert!(matches!(
            find(&store, &unknown).await,
            Err(AuthError::UnknownKey(_))
        ));
        assert_eq!(server.fetches(), 2, "no refetch within jwks_min_refetch");
    }

    #[tokio::test]
    async fn keys_older_than_max_stale_are_not_served() {
        let key = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&key])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_max_stale = Duration::from_secs(1);
        let (store, _) = store(config).await;
        assert_eq!(find(&store, &key).await, Ok(1));
        server.serve(503, "down");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(matches!(
            find(&store, &key).await,
            Err(AuthError::KeysUnavailable(_))
        ));
        assert!(!store.status()[0].loaded);
    }

    #[tokio::test]
    async fn issuer_never_loaded_is_unavailable() {
        let key = TestKey::es256();
        let server = JwksServer::start(&json!({})).await;
        server.serve(500, "no");
        let (store, metrics) = store(issuer(url(&server), &[])).await;
        assert!(matches!(
            find(&store, &key).await,
            Err(AuthError::KeysUnavailable(_))
        ));
        let status = &store.status()[0];
        assert!(!status.loaded && !status.stale && status.age.is_none());
        assert!(status.last_error.is_some());
        assert_eq!(count(&metrics, "error"), 1);
    }

    #[tokio::test]
    async fn background_refresh_loads_new_keys_and_retries_failures() {
        let old = TestKey::es256();
        let new = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&old])).await;
        server.serve(500, "starting");
        let mut config = issuer(url(&server), &[]);
        config.jwks_refresh = Duration::from_millis(300);
        config.jwks_min_refetch = Duration::from_millis(200); // failures retried this often
        let (store, metrics) = store(config).await;
        assert!(!store.status()[0].loaded);
        server.serve(200, &jwks(&[&old, &new]).to_string());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            store.status()[0].loaded,
            "the background retry loaded the keys"
        );
        assert_eq!(find(&store, &new).await, Ok(1));
        assert_eq!(count(&metrics, "error"), 1);
        assert!(count(&metrics, "ok") >= 1);
        let before = server.fetches();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(server.fetches() > before, "refreshed every jwks_refresh");
    }

    #[tokio::test]
    async fn dropping_the_store_stops_refreshing() {
        let key = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&key])).await;
        let mut config = issuer(url(&server), &[]);
        config.jwks_refresh = Duration::from_millis(100);
        let (store, _) = store(config).await;
        // Refreshing: three fetches (about 300 ms, longer on a loaded machine).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.fetches() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never refreshed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after_drop = server.fetches();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(server.fetches(), after_drop);
    }

    #[tokio::test]
    async fn startup_load_is_bounded_when_the_issuer_hangs() {
        let key = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&key])).await;
        server.delay(Duration::from_secs(30));
        let started = std::time::Instant::now();
        let (store, metrics) = store(issuer(url(&server), &[])).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!store.status()[0].loaded);
        assert_eq!(count(&metrics, "error"), 1);
    }

    #[tokio::test]
    async fn kid_naming_a_key_of_another_type_is_not_allowed() {
        let rsa = TestKey::rs256();
        let (_dir, source) = jwks_file(&jwks(&[&rsa]).to_string());
        let (store, _) = store(issuer(source, &[])).await;
        for alg in [Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA] {
            assert!(matches!(
                store.keys_for(ISSUER, Some(rsa.kid()), alg).await,
                Err(AuthError::AlgorithmNotAllowed(_))
            ));
        }
    }

    #[tokio::test]
    async fn jwk_alg_member_limits_the_key_to_that_alg() {
        let rsa = TestKey::rs256(); // its JWK says "alg": "RS256"
        let (_dir, source) = jwks_file(&jwks(&[&rsa]).to_string());
        let (store, _) = store(issuer(source, &[])).await;
        assert_eq!(find(&store, &rsa).await, Ok(1));
        assert!(matches!(
            store
                .keys_for(ISSUER, Some(rsa.kid()), Algorithm::PS256)
                .await,
            Err(AuthError::AlgorithmNotAllowed(_))
        ));
    }

    #[tokio::test]
    async fn token_without_kid_gets_every_key_that_fits_the_alg() {
        let (a, b, c) = (TestKey::es256(), TestKey::es256(), TestKey::rs256());
        let (_dir, source) = jwks_file(&jwks(&[&a, &b, &c]).to_string());
        let (store, _) = store(issuer(source, &[])).await;
        let found = store
            .keys_for(ISSUER, None, Algorithm::ES256)
            .await
            .unwrap();
        assert_eq!(found.iter().count(), 2);
        assert!(matches!(
            store.keys_for(ISSUER, None, Algorithm::ES384).await,
            Err(AuthError::UnknownKey(_))
        ));
    }

    #[tokio::test]
    async fn hmac_secrets_are_served_while_the_jwks_is_too_stale() {
        let secret = TestKey::hs256(&[7u8; 32]);
        let key = TestKey::es256();
        let server = JwksServer::start(&jwks(&[&key])).await;
        let mut config = issuer(url(&server), &[&secret]);
        config.jwks_max_stale = Duration::from_secs(1);
        let (store, _) = store(config).await;
        server.serve(503, "down");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(find(&store, &secret).await, Ok(1));
        assert!(matches!(
            find(&store, &key).await,
            Err(AuthError::KeysUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn hmac_secrets_are_served_without_a_jwks() {
        let secret = TestKey::hs256(&[7u8; 32]);
        let (store, _) = store(issuer(None, &[&secret])).await;
        assert_eq!(find(&store, &secret).await, Ok(1));
        assert!(matches!(
            store
                .keys_for(ISSUER, Some("other"), Algorithm::HS256)
                .await,
            Err(AuthError::UnknownKey(_))
        ));
        assert!(store.status()[0].loaded);
    }
}
