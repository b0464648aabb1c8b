//! The admin listener: `/healthz` (the process is alive), `/readyz` (every issuer's keys are
//! loaded; stale keys are reported but still ready while they are served) and `/metrics`
//! (Prometheus text). It listens on its own address, loopback by default.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::problem::full_body;
use crate::proxy::Body;
use crate::server::tls::TlsState;
use crate::store::NonceStore;

/// `/readyz` warns (and stays ready) when the serving certificate expires within 7 days.
const CERTIFICATE_WARNING_SECONDS: i64 = 7 * 86_400;

/// The admin endpoints.
#[derive(Debug)]
pub struct Admin {
    keys: Arc<KeyStore>,
    store: Arc<dyn NonceStore>,
    tls: Option<Arc<TlsState>>,
    /// Whether any route needs the store (only then does a down store make the proxy unready).
    store_needed: bool,
    metrics: Arc<Metrics>,
}

impl Admin {
    /// Builds the admin endpoints over the proxy's key store and metrics.
    pub fn new(
        keys: Arc<KeyStore>,
        store: Arc<dyn NonceStore>,
        tls: Option<Arc<TlsState>>,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            keys,
            store,
            tls,
            store_needed: config.routes.iter().any(|r| r.require.signature),
            metrics,
        }
    }

    /// Answers one admin request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => self.readyz().await,
            "/metrics" => {
                self.metrics.refresh_certificate_expiry();
                for status in self.keys.status() {
                    if let Some(age) = status.age {
                        self.metrics.set_keys_age(&status.issuer, age);
                    }
                }
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    async fn readyz(&self) -> Response<Body> {
        let statuses = self.keys.status();
        let store = self.store.ping().await;
        if store.is_err() {
            self.metrics.store_error("ping");
        }
        let store_ok = store.is_ok() || !self.store_needed;
        let ready = statuses.iter().all(|s| s.loaded) && store_ok;
        let issuers: Vec<serde_json::Value> = statuses
            .iter()
            .map(|s| {
                let state = match (s.loaded, s.stale) {
                    (false, _) => "unavailable",
                    (true, true) => "stale",
                    (true, false) => "fresh",
                };
                serde_json::json!({
                    "issuer": s.issuer,
                    "keys": state,
                    "age_seconds": s.age.map(|a| a.as_secs()),
                    "last_error": s.last_error,
                })
            })
            .collect();
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "not_ready" },
            "issuers": issuers,
            "certificate": self.tls.as_ref().map(|tls| {
                let expires_in = tls.expires_in();
                let mut c = serde_json::json!({"expires_in_seconds": expires_in});
                if expires_in < CERTIFICATE_WARNING_SECONDS {
                    c["warning"] = serde_json::Value::String(if expires_in <= 0 {
                        "the serving certificate has expired".to_owned()
                    } else {
                        format!("the serving certificate expires in {} days", expires_in / 86_400)
                    });
                }
                c
            }),
            "store": match &store {
                Ok(()) => serde_json::json!({"state": "ok"}),
                Err(e) => serde_json::json!({"state": "unavailable", "error": e.to_string()}),
            },
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, "application/json", format!("{body}\n"))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(full_body(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
