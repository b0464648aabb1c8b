//! The admin listener: `/healthz` (the process is alive), `/readyz` (every issuer's keys are
//! loaded; stale keys are reported but still ready while they are served) and `/metrics`
//! (Prometheus text). It listens on its own address, loopback by default.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::config::Secret;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::problem::{full_body, problem_body};
use crate::proxy::Body;
use crate::server::tls::TlsState;
use crate::store::{Revocation, Stores};

/// `/readyz` warns (and stays ready) when the serving certificate expires within 7 days.
const CERTIFICATE_WARNING_SECONDS: i64 = 7 * 86_400;

/// The admin endpoints.
#[derive(Debug)]
pub struct Admin {
    keys: Arc<KeyStore>,
    stores: Stores,
    tls: Option<Arc<TlsState>>,
    /// The admin API's bearer token; `None` turns the API off.
    token: Option<Secret>,
    /// Whether any route checks JWTs (only then does a stale revocation mirror make the proxy
    /// unready).
    revocations_needed: bool,
    /// Whether any route needs the store (only then does a down store make the proxy unready).
    store_needed: bool,
    metrics: Arc<Metrics>,
}

impl Admin {
    /// Builds the admin endpoints over the proxy's key store and metrics.
    pub fn new(
        keys: Arc<KeyStore>,
        stores: Stores,
        tls: Option<Arc<TlsState>>,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            keys,
            stores,
            tls,
            token: config.admin.token.clone(),
            revocations_needed: config.routes.iter().any(|r| r.require.jwt),
            store_needed: config
                .routes
                .iter()
                .any(|r| r.require.signature || r.rate_limit.is_some()),
            metrics,
        }
    }

    /// Answers one admin request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        if request.uri().path() == "/revocations" {
            return self.revocations(request).await;
        }
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

    /// The revocation API: `POST` revokes, `DELETE` undoes, `GET` lists (paged with `cursor`
    /// and `limit`). Off (404) without `admin.token_env`/`token_file`; every call needs
    /// `Authorization: Bearer <admin token>`.
    async fn revocations(&self, request: Request<Incoming>) -> Response<Body> {
        let Some(token) = &self.token else {
            return problem(
                StatusCode::NOT_FOUND,
                "admin_api_off",
                "the admin API is off: set admin.token_env or admin.token_file",
            );
        };
        if !bearer_matches(request.headers(), token) {
            let mut response = problem(
                StatusCode::UNAUTHORIZED,
                "admin_unauthorized",
                "a valid admin bearer token is needed",
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
            );
            return response;
        }
        let method = request.method().clone();
        let query = request.uri().query().unwrap_or("").to_owned();
        match method {
            Method::POST | Method::DELETE => {
                let body = match read_limited(request.into_body(), ADMIN_BODY_LIMIT).await {
                    Ok(body) => body,
                    Err(BodyError::TooLarge) => {
                        return problem(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "body_too_large",
                            &format!("the body is larger than {ADMIN_BODY_LIMIT} bytes"),
                        )
                    }
                    Err(BodyError::Unreadable(reason)) => {
                        return problem(StatusCode::BAD_REQUEST, "invalid_body", &reason)
                    }
                };
                let revocation = match Revocation::from_json(&body) {
                    Ok(r) => r,
                    Err(reason) => {
                        return problem(StatusCode::BAD_REQUEST, "invalid_body", &reason)
                    }
                };
                // Only a new revocation is held to the time range: one stored before it
                // existed can still be undone.
                if method == Method::POST {
                    if let Err(reason) = revocation.check_time() {
                        return problem(StatusCode::BAD_REQUEST, "invalid_body", &reason);
                    }
                }
                let outcome = if method == Method::POST {
                    self.stores.revocations.revoke(&revocation).await
                } else {
                    self.stores.revocations.unrevoke(&revocation).await
                };
                match outcome {
                    Ok(()) => {
                        let action = if method == Method::POST {
                            "revoked"
                        } else {
                            "unrevoked"
                        };
                        tracing::info!(action, revocation = ?revocation, "admin API");
                        let body = serde_json::json!({ action: revocation });
                        let status = if method == Method::POST {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        text(status, "application/json", format!("{body}\n"))
                    }
                    Err(e) => {
                        self.metrics.store_error("revocation_write");
                        problem(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "store_unavailable",
                            &e.to_string(),
                        )
                    }
                }
            }
            Method::GET | Method::HEAD => {
                let mut cursor = None;
                let mut limit = 100usize;
                for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                    match k {
                        "cursor" => {
                            cursor = Some(
                                percent_encoding::percent_decode_str(v)
                                    .decode_utf8_lossy()
                                    .into_owned(),
                            )
                        }
                        "limit" => match v.parse::<usize>() {
                            Ok(n) if (1..=1000).contains(&n) => limit = n,
                            _ => {
                                return problem(
                                    StatusCode::BAD_REQUEST,
                                    "invalid_query",
                                    "limit must be 1 to 1000",
                                )
                            }
                        },
                        _ => {}
                    }
                }
                match self.stores.revocations.list(cursor.as_deref(), limit).await {
                    Ok((items, next)) => {
                        let body = serde_json::json!({ "revocations": items, "next_cursor": next });
                        text(StatusCode::OK, "application/json", format!("{body}\n"))
                    }
                    Err(e) => problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        &e.to_string(),
                    ),
                }
            }
            _ => {
                let mut response = problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use GET, POST or DELETE",
                );
                // RFC 9110 section 15.5.6: a 405 lists the methods the resource takes.
                response.headers_mut().insert(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, DELETE"),
                );
                response
            }
        }
    }

    async fn readyz(&self) -> Response<Body> {
        let statuses = self.keys.status();
        let store = self.stores.nonces.ping().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let revocations = self
            .stores
            .revocations
            .is_revoked(None, None, None, now)
            .map(|_| ());
        let revocations_ok = revocations.is_ok() || !self.revocations_needed;
        if store.is_err() {
            self.metrics.store_error("ping");
        }
        let store_ok = store.is_ok() || !self.store_needed;
        let ready = statuses.iter().all(|s| s.loaded) && store_ok && revocations_ok;
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
            "revocations": match &revocations {
                Ok(()) => serde_json::json!({"state": "current"}),
                Err(e) => serde_json::json!({"state": "unconfirmed", "error": e.to_string()}),
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

/// The largest admin request body read.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// One `Authorization: Bearer <token>` (the scheme in any case, RFC 9110 section 11.1) equal to
/// the admin token. The SHA-256 digests are compared, in constant time, so that not even the
/// token's length shows in the time taken.
fn bearer_matches(headers: &http::HeaderMap, token: &Secret) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let sent = value.as_bytes();
    let Some((scheme, sent)) = sent
        .iter()
        .position(|&b| b == b' ')
        .map(|space| (&sent[..space], sent[space + 1..].trim_ascii()))
    else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") || sent.is_empty() {
        return false;
    }
    bool::from(
        Sha256::digest(sent)
            .as_slice()
            .ct_eq(Sha256::digest(token.expose()).as_slice()),
    )
}

/// Why an admin request's body was not read.
enum BodyError {
    /// Over the limit: 413.
    TooLarge,
    /// Broken off or malformed: 400, with the reason.
    Unreadable(String),
}

async fn read_limited(body: Incoming, limit: usize) -> Result<bytes::Bytes, BodyError> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, limit);
    limited.collect().await.map(|c| c.to_bytes()).map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            BodyError::TooLarge
        } else {
            BodyError::Unreadable(format!("the body could not be read ({e})"))
        }
    })
}

/// An admin error as problem+json.
fn problem(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    let body = problem_body(status, code, detail);
    text(status, "application/problem+json", format!("{body}\n"))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(full_body(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&'static str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(http::header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_admin_bearer_scheme_is_read_in_any_case_and_the_token_must_be_equal() {
        let token = Secret::new("admin-token-of-at-least-32-bytes-long!!".into());
        for good in [
            "Bearer admin-token-of-at-least-32-bytes-long!!",
            "bearer admin-token-of-at-least-32-bytes-long!!",
            "BEARER  admin-token-of-at-least-32-bytes-long!! ",
        ] {
            assert!(bearer_matches(&headers(&[good]), &token), "{good}");
        }
        for bad in [
            &[][..],
            &["Bearer admin-token-of-at-least-32-bytes-long!"],
            &["Bearer admin-token-of-at-least-32-bytes-long!!x"],
            &["Basic admin-token-of-at-least-32-bytes-long!!"],
            &["Beareradmin-token-of-at-least-32-bytes-long!!"],
            &["admin-token-of-at-least-32-bytes-long!!"],
            &["Bearer "],
            &[
                "Bearer admin-token-of-at-least-32-bytes-long!!",
                "Bearer admin-token-of-at-least-32-bytes-long!!",
            ],
        ] {
            assert!(!bearer_matches(&headers(bad), &token), "{bad:?}");
        }
    }
}
