//! Prometheus metrics, served by the admin listener at `/metrics`. One registry per running
//! proxy (so tests that start several proxies in one process do not share counters).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value from the configuration (a route name, an issuer), written escaped.
///
/// prometheus-client writes label values as they are, and OpenMetrics ends a value at its first
/// `"`: a route named `say "hi"` would make the whole scrape unparsable, and Prometheus drops
/// all of it. Route names may hold `"` and `\`, issuers anything. The values the proxy makes
/// itself (codes, results, operations) need no escaping.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Escaped<T>(T);

impl<T> EncodeLabelValue for Escaped<T>
where
    T: std::ops::Deref,
    T::Target: AsRef<str>,
{
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        let text = (*self.0).as_ref();
        let mut start = 0;
        // OpenMetrics escapes exactly these three in a label value.
        for (at, found) in text.match_indices(['\\', '"', '\n']) {
            encoder.write_str(&text[start..at])?;
            encoder.write_str(match found {
                "\\" => "\\\\",
                "\"" => "\\\"",
                _ => "\\n",
            })?;
            start = at + found.len();
        }
        encoder.write_str(&text[start..])
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Option<Escaped<Arc<String>>>,
    code: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwksLabels {
    issuer: Escaped<String>,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: Escaped<String>,
}

/// The statuses whose counters [`RouteCounters`] keeps (others are counted through the family).
const FIRST_STATUS: u16 = 100;
const LAST_STATUS: u16 = 599;

/// One route's request counters for forwarded requests, by status, each taken from the family
/// the first time it is needed (the slots, 8 KiB, with the route's first forwarded request).
/// Made by [`Metrics::route_counters`], and only to be used with the same `Metrics`.
#[derive(Debug)]
pub(crate) struct RouteCounters {
    route: Arc<String>,
    by_status: OnceLock<Box<[OnceLock<Counter>]>>,
}

/// The verified-token cache's lookup counters, from [`Metrics::verified_cache_counters`].
#[derive(Debug, Clone)]
pub struct CacheCounters {
    /// A token found in the cache and still usable: its signature was not checked again.
    pub hit: Counter,
    /// A token not in the cache, or whose entry could no longer be used.
    pub miss: Counter,
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    // The registry is only locked at scrape time, never on the request path.
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    jwks_refreshes: Family<JwksLabels, Counter>,
    keys_age: Family<IssuerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    signatures: Family<ResultLabels, Counter>,
    store_errors: Family<OperationLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    certificate_not_after: Gauge,
    certificate_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, outcome code (ok when forwarded) and status",
            requests.clone(),
        );
        let duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, in seconds",
            duration.clone(),
        );
        let jwks_refreshes = Family::<JwksLabels, Counter>::default();
        registry.register(
            "jwks_refreshes",
            "JWKS loads by issuer and result (ok, error, invalid)",
            jwks_refreshes.clone(),
        );
        let keys_age = Family::<IssuerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "jwks_keys_age_seconds",
            "Seconds since the issuer's keys were last loaded successfully",
            keys_age.clone(),
        );
        let signatures = Family::<ResultLabels, Counter>::default();
        registry.register(
            "signature_checks",
            "Request-signature checks by result (ok or the rejection code)",
            signatures.clone(),
        );
        let store_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store commands that failed or timed out, by operation",
            store_errors.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Certificate reloads by result (ok, or error: the old set kept serving)",
            tls_reloads.clone(),
        );
        // Registered by `register_certificate_metrics` when TLS is on: a plain-HTTP proxy has
        // no certificate, and a 0 would read as "expired".
        let certificate_not_after = Gauge::default();
        let certificate_expiry = Gauge::default();
        Self {
            signatures,
            store_errors,
            tls_reloads,
            certificate_not_after,
            certificate_expiry,
            registry: Mutex::new(registry),
            requests,
            duration,
            jwks_refreshes,
            keys_age,
        }
    }

    /// Counts one finished request (`route` is `None` when no route matched). Allocates
    /// nothing once the label set has been seen.
    pub fn request(
        &self,
        route: Option<&Arc<String>>,
        code: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.cloned().map(Escaped),
                code,
                status,
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// A cache of `route`'s counters for forwarded requests (code `ok`), for
    /// [`Metrics::forwarded`].
    pub(crate) fn route_counters(&self, route: &Arc<String>) -> RouteCounters {
        RouteCounters {
            route: route.clone(),
            by_status: OnceLock::new(),
        }
    }

    /// Counts one request forwarded on `counters`' route and answered with `status`: the same
    /// series as [`Metrics::request`] with code `ok`, but after the first request of a status
    /// it costs an atomic add instead of hashing the labels to find the counter.
    pub(crate) fn forwarded(&self, counters: &RouteCounters, status: u16, elapsed: Duration) {
        let slots = counters.by_status.get_or_init(|| {
            (FIRST_STATUS..=LAST_STATUS)
                .map(|_| OnceLock::new())
                .collect()
        });
        match status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| slots.get(usize::from(i)))
        {
            Some(slot) => {
                slot.get_or_init(|| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            route: Some(Escaped(counters.route.clone())),
                            code: "ok",
                            status,
                        })
                        .clone()
                })
                .inc();
                self.duration.observe(elapsed.as_secs_f64());
            }
            None => self.request(Some(&counters.route), "ok", status, elapsed),
        }
    }

    /// Counts one JWKS load attempt; `result` is `ok`, `error` (fetch failed) or `invalid`
    /// (fetched but unusable).
    pub fn jwks_refresh(&self, issuer: &str, result: &str) {
        self.jwks_refreshes
            .get_or_create(&JwksLabels {
                issuer: Escaped(issuer.to_owned()),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one signature check; `result` is `ok` or the rejection code.
    pub fn signature(&self, result: &str) {
        self.signatures
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one failed store command.
    pub fn store_error(&self, operation: &str) {
        self.store_errors
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// Counts one certificate reload.
    pub fn tls_reload(&self, result: &str) {
        self.tls_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Registers the verified-token cache's lookup counter (`jwt.verified_cache` is above 0)
    /// and returns its two series, which the verifier adds to with one atomic add a lookup.
    /// Called once, by the verifier that owns the cache.
    pub fn verified_cache_counters(&self) -> CacheCounters {
        let lookups = Family::<ResultLabels, Counter>::default();
        self.registry().register(
            "jwt_verified_cache_lookups",
            "Verified-token cache lookups by result (hit: no signature check; miss: the token \
             was verified in full)",
            lookups.clone(),
        );
        let series = |result: &str| {
            lookups
                .get_or_create(&ResultLabels {
                    result: result.to_owned(),
                })
                .clone()
        };
        CacheCounters {
            hit: series("hit"),
            miss: series("miss"),
        }
    }

    /// Registers the serving-certificate gauges (TLS is on).
    pub fn register_certificate_metrics(&self) {
        let mut registry = self.registry();
        registry.register(
            "certificate_not_after_seconds",
            "notAfter of the serving certificate, Unix seconds",
            self.certificate_not_after.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the serving certificate expires",
            self.certificate_expiry.clone(),
        );
    }

    /// Records the serving certificate's notAfter (Unix seconds).
    pub fn set_certificate_expiry(&self, not_after: i64) {
        self.certificate_not_after.set(not_after);
    }

    /// Refreshes the seconds-to-expiry gauge (called at scrape time).
    pub fn refresh_certificate_expiry(&self) {
        let not_after = self.certificate_not_after.get();
        if not_after != 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            self.certificate_expiry.set(not_after - now);
        }
    }

    /// Sets the age of an issuer's keys (called at scrape time).
    pub fn set_keys_age(&self, issuer: &str, age: Duration) {
        self.keys_age
            .get_or_create(&IssuerLabels {
                issuer: Escaped(issuer.to_owned()),
            })
            .set(age.as_secs_f64());
    }

    /// The registry, locked. A panic while it was held (none is expected) leaves it as it
    /// was, so a poisoned lock is taken over rather than failing every scrape after it.
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        match self.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn label_values_from_the_configuration_are_escaped() {
        let metrics = Metrics::new();
        // Route names may hold `"` and `\`; an issuer may hold anything, a newline too.
        let route = Arc::new(r#"say "hi" \ bye"#.to_string());
        let ms = Duration::from_millis(1);
        metrics.request(Some(&route), "token_expired", 401, ms);
        metrics.forwarded(&metrics.route_counters(&route), 200, ms);
        metrics.jwks_refresh("https://i.test/\"x\"\nend", "ok");
        metrics.set_keys_age("https://i.test/\"x\"\nend", Duration::from_secs(3));

        let text = metrics.encode();
        for want in [
            r#"portcullis_requests_total{route="say \"hi\" \\ bye",code="token_expired",status="401"} 1"#,
            r#"portcullis_requests_total{route="say \"hi\" \\ bye",code="ok",status="200"} 1"#,
            r#"portcullis_jwks_refreshes_total{issuer="https://i.test/\"x\"\nend",result="ok"} 1"#,
            r#"portcullis_jwks_keys_age_seconds{issuer="https://i.test/\"x\"\nend"} 3.0"#,
        ] {
            assert!(text.lines().any(|l| l == want), "no line {want}\n{text}");
        }
        // Every line is a comment, a sample whose labels close where they should, or the end.
        for l in text.lines() {
            let valid = l.starts_with("# ")
                || l.rsplit_once(' ').is_some_and(|(series, value)| {
                    value.parse::<f64>().is_ok()
                        && series.find('{').is_none_or(|open| {
                            series.ends_with('}') && labels_close(&series[open + 1..])
                        })
                });
            assert!(valid, "not OpenMetrics: {l:?}\n{text}");
        }
    }

    /// Whether `labels` (what follows a series' `{`) is `name="value",...}` with every value
    /// closed at its unescaped `"` and nothing after the `}`.
    fn labels_close(labels: &str) -> bool {
        let mut rest = labels;
        loop {
            let Some((name, value)) = rest.split_once("=\"") else {
                return false;
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return false;
            }
            let mut chars = value.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => {
                        if !matches!(chars.next(), Some((_, '\\' | '"' | 'n'))) {
                            return false;
                        }
                    }
                    Some((_, '\n')) | None => return false,
                    Some((i, '"')) => break i,
                    Some(_) => {}
                }
            };
            match &value[end + 1..] {
                "}" => return true,
                more => match more.strip_prefix(',') {
                    Some(next) => rest = next,
                    None => return false,
                },
            }
        }
    }

    #[test]
    fn forwarded_requests_are_counted_in_the_series_of_any_other_request() {
        let metrics = Metrics::new();
        let route = Arc::new("orders".to_string());
        let counters = metrics.route_counters(&route);
        let ms = Duration::from_millis(1);
        metrics.request(Some(&route), "ok", 200, ms);
        metrics.forwarded(&counters, 200, ms);
        metrics.forwarded(&counters, 200, ms);
        metrics.forwarded(&counters, 503, ms);
        // Outside the statuses the cache keeps: counted through the family.
        metrics.forwarded(&counters, 999, ms);
        metrics.forwarded(&counters, 999, ms);
        metrics.request(Some(&route), "token_expired", 401, ms);

        let text = metrics.encode();
        let series = |status: &str, code: &str| {
            line(
                &text,
                &format!(
                    "portcullis_requests_total{{route=\"orders\",code=\"{code}\",status=\"{status}\"}} "
                ),
            )
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(series("200", "ok").as_deref(), Some("3"), "{text}");
        assert_eq!(series("503", "ok").as_deref(), Some("1"), "{text}");
        assert_eq!(series("999", "ok").as_deref(), Some("2"), "{text}");
        assert_eq!(
            series("401", "token_expired").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            text.matches("portcullis_requests_total{").count(),
            4,
            "one series per label set: {text}"
        );
        assert_eq!(
            line(&text, "portcullis_request_duration_seconds_count"),
            Some("portcullis_request_duration_seconds_count 7"),
            "{text}"
        );
    }
}
