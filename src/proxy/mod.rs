//! The per-request pipeline: strip spoofable and hop-by-hop headers, normalise the path, match
//! a route (default deny), run the route's checks cheapest first, then forward with the verified
//! identity attached. Every rejection leaves through [`crate::problem`].

mod client;
mod forward;
pub(crate) mod headers;
pub mod path;
pub(crate) mod upstream_tls;

/// The upstream response reader, for the fuzz target `upstream_response`.
#[doc(hidden)]
pub use client::{read_response, ReadResponse};

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{Entry, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::auth::mtls::{self, ClientCert};
use crate::auth::signature::{SignatureVerifier, SignedRequest, VerifiedSignature};
use crate::auth::{self, AuthError, Identity, JwtVerifier, VerifiedToken};
use crate::config::{Config, OnStoreError, RateLimitKey, Route, RouteMatch};
use crate::metrics::{Metrics, RouteCounters};
use crate::problem::Rejection;
use crate::server::tls::TlsError;
use crate::store::{
    rate_limit_headers, revocation, NonceOutcome, NonceStore, RateLimiter, RevocationStore,
    StoreError, Stores,
};
use forward::{ClientBodyState, LimitedBody, ResponseBody, Upstream};

/// Errors of a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of the proxy and the admin listener: a complete body (problem+json, admin
/// answers) or the upstream's, streamed through.
#[derive(Debug)]
pub struct Body(BodyKind);

/// Headers the proxy may add to a request on its way upstream once it is checked:
/// `x-forwarded-host`, `host`, `x-forwarded-for`, `x-forwarded-proto`,
/// `x-forwarded-client-cert` and the six `x-auth-*` identity headers (`x-request-id` is set when
/// the request arrives).
const ADDED_HEADERS: usize = 11;

#[derive(Debug)]
enum BodyKind {
    Full(Full<Bytes>),
    Upstream(ResponseBody),
}

impl Body {
    /// A complete body.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self(BodyKind::Full(Full::new(bytes)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            BodyKind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            BodyKind::Upstream(upstream) => Pin::new(upstream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Full(full) => full.is_end_stream(),
            BodyKind::Upstream(upstream) => upstream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            BodyKind::Full(full) => full.size_hint(),
            BodyKind::Upstream(upstream) => upstream.size_hint(),
        }
    }
}

/// What the proxy knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate rustls verified in the handshake, read once per connection.
    pub client_cert: Option<Arc<ClientCert>>,
    /// The client's IP address as an `X-Forwarded-For` value, made once per connection.
    pub peer_ip: HeaderValue,
}

impl ConnectionInfo {
    /// What is known of a connection from `peer`.
    pub fn new(peer: SocketAddr, tls: bool, client_cert: Option<Arc<ClientCert>>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            // An IP address is ASCII digits, dots, colons and hex letters.
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            tls,
            client_cert,
            peer_ip,
        }
    }
}

/// The request pipeline, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    config: Arc<Config>,
    jwt: JwtVerifier,
    signatures: SignatureVerifier,
    nonces: Arc<dyn NonceStore>,
    revocations: Arc<dyn RevocationStore>,
    rate_limits: Arc<dyn RateLimiter>,
    upstream: Upstream,
    /// `Host` for a request that came without one (HTTP/1.0): the upstream's own authority.
    upstream_host: HeaderValue,
    metrics: Arc<Metrics>,
    /// Each route's counters of forwarded requests, in the order of `config.routes`.
    forwarded: Vec<RouteCounters>,
}

impl Proxy {
    /// Builds the pipeline.
    pub fn new(
        config: Arc<Config>,
        jwt: JwtVerifier,
        stores: Stores,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        let upstream_host = config
            .upstream
            .url
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            // Config validation refuses an upstream URL without a host.
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        let forwarded = config
            .routes
            .iter()
            .map(|route| metrics.route_counters(&route.name))
            .collect();
        Ok(Self {
            upstream: Upstream::new(&config.upstream)?,
            signatures: SignatureVerifier::new(&config.signature),
            nonces: stores.nonces,
            revocations: stores.revocations,
            rate_limits: stores.rate_limits,
            config,
            jwt,
            upstream_host,
            metrics,
            forwarded,
        })
    }

    /// Handles one request end to end; never fails (a failure is a problem response).
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        conn: &ConnectionInfo,
    ) -> Response<Body> {
        let started = Instant::now();
        if self.config.server.fresh_request_ids {
            request.headers_mut().remove(headers::X_REQUEST_ID);
        }
        let request_id = headers::request_id(request.headers_mut());
        let mut outcome = Outcome::default();
        let mut response = match self.process(request, conn, &request_id, &mut outcome).await {
            Ok(response) => response,
            Err(rejection) => {
                let request_id = request_id.to_str().unwrap_or("-");
                tracing::info!(
                    request_id = %request_id,
                    route = self.route_name(outcome.route).map_or("-", |r| r.as_str()),
                    code = rejection.code(),
                    status = rejection.status().as_u16(),
                    subject = outcome.subject.as_deref().unwrap_or("-"),
                    client = outcome.client.as_deref().unwrap_or("-"),
                    detail = %rejection,
                    "request rejected"
                );
                outcome.code = rejection.code();
                rejection.to_response(request_id)
            }
        };
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID, request_id);
        let status = response.status().as_u16();
        match outcome.route.and_then(|i| self.forwarded.get(i)) {
            Some(counters) if outcome.code == "ok" => {
                self.metrics.forwarded(counters, status, started.elapsed());
            }
            _ => self.metrics.request(
                self.route_name(outcome.route),
                outcome.code,
                status,
                started.elapsed(),
            ),
        }
        response
    }

    /// The name of the route at `index` in the configuration.
    fn route_name(&self, index: Option<usize>) -> Option<&Arc<String>> {
        index
            .and_then(|i| self.config.routes.get(i))
            .map(|r| &r.name)
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        conn: &ConnectionInfo,
        request_id: &HeaderValue,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Rejection> {
        let (mut parts, body) = request.into_parts();
        // Read before the hop-by-hop headers go: hyper has decoded `chunked`, and a coding
        // under it (`gzip, chunked`) would reach the upstream undeclared.
        check_transfer_coding(&parts.headers)?;
        headers::remove_hop_by_hop_and_spoofable(
            &mut parts.headers,
            &self.config.server.strip_headers,
        );
        // CONNECT asks for a tunnel, which is not proxied: a 2xx answer to it would make the
        // upstream connection one (RFC 9112 section 6.3), whatever the route allows.
        if parts.method == http::Method::CONNECT {
            return Err(Rejection::MethodNotAllowed(parts.method.to_string()));
        }
        settle_host(&mut parts)?;

        let path = path::normalize(parts.uri.path()).map_err(Rejection::InvalidPath)?;
        // Matched with its escapes decoded, as the upstream will route it; forwarded as it is.
        let route_path = path::decoded(&path).map_err(Rejection::InvalidPath)?;
        let route = match self.config.match_route(&route_path, &parts.method) {
            RouteMatch::Found { index, route } => {
                outcome.route = Some(index);
                route
            }
            RouteMatch::MethodNotAllowed => {
                return Err(Rejection::MethodNotAllowed(parts.method.to_string()))
            }
            RouteMatch::NoRoute => return Err(Rejection::NoRoute(path.into_owned())),
        };

        let limit = self.config.server.max_body_bytes;
        if let Some(length) = headers::content_length(&parts.headers) {
            if length > limit {
                return Err(Rejection::BodyTooLarge(limit));
            }
        }
        check_content_type(route, &parts.headers)?;

        // The signature covers the body: on such routes it is read (hashed as it arrives,
        // bounded by the limit) before anything is forwarded. Elsewhere it streams.
        let mut client_body = None;
        let (body, body_sha256) = if route.require.signature {
            let (bytes, digest) = if body.is_end_stream() {
                // No body (a GET): nothing to wait for, no deadline to take.
                read_body(body, limit).await?
            } else {
                self.upstream
                    .read_body_in_time(read_body(body, limit))
                    .await?
            };
            (Either::Right(Full::new(bytes)), Some(digest))
        } else if body.is_end_stream() {
            (Either::Right(Full::new(Bytes::new())), None)
        } else {
            let state = Arc::new(ClientBodyState::default());
            client_body = Some(state.clone());
            (Either::Left(LimitedBody::new(body, limit, state)), None)
        };

        let request_id_text = request_id.to_str().unwrap_or("-");
        // Boxed when there is something to check: the checks' future is large, and a public
        // route should not move it around.
        let identity = if route.require.any() {
            Box::pin(self.check(
                route,
                &parts,
                body_sha256.as_ref().map(BodyDigest::as_str),
                request_id_text,
                conn,
            ))
            .await?
        } else {
            Identity::default()
        };
        outcome.subject = identity.token.as_ref().and_then(|t| t.subject.clone());
        outcome.client = identity.signature.as_ref().map(|s| s.client.clone());
        check_permissions(route, &identity)?;
        let rate_headers = self
            .check_rate_limit(route, &identity, conn, &parts.headers, request_id_text)
            .await?;

        // Forward in origin form: the normalised path, the original query.
        let target = match path {
            // Unchanged: the client's path and query as they are (no copy).
            Cow::Borrowed(_) => parts.uri.path_and_query().cloned(),
            Cow::Owned(normalised) => {
                let target = match parts.uri.query() {
                    Some(query) => format!("{normalised}?{query}"),
                    None => normalised,
                };
                Some(
                    PathAndQuery::try_from(target)
                        .map_err(|_| Rejection::InvalidPath(path::InvalidPath::BrokenEscape))?,
                )
            }
        };
        let mut uri = http::uri::Parts::default();
        uri.path_and_query = target;
        parts.uri = Uri::from_parts(uri)
            .map_err(|_| Rejection::InvalidPath(path::InvalidPath::BrokenEscape))?;
        if parts.version == Version::HTTP_2 {
            headers::join_cookies(&mut parts.headers);
        }
        parts.version = Version::HTTP_11;
        // Room for what is added below (the forwarding headers and the identity), made once:
        // the map hyper parsed is sized for the client's headers, and would otherwise grow,
        // rehashing, as they go in.
        parts.headers.reserve(ADDED_HEADERS);
        match parts.headers.get(HOST).cloned() {
            // `Host` (the target's authority where it has one) goes upstream as it is.
            Some(host) => {
                parts.headers.insert(headers::X_FORWARDED_HOST, host);
            }
            // No host named: none is forwarded either (the client's own is not passed on).
            None => {
                parts.headers.remove(headers::X_FORWARDED_HOST);
                parts.headers.insert(HOST, self.upstream_host.clone());
            }
        }
        add_identity(&mut parts.headers, &identity)?;
        if let Some(cert) = &conn.client_cert {
            // Built from a verified certificate: the subject RFC 4514-escaped to ASCII, control
            // characters removed from the SANs.
            headers::set(
                &mut parts.headers,
                headers::X_FORWARDED_CLIENT_CERT,
                &cert.xfcc,
            );
        }
        // A client's own `X-Forwarded-For` is replaced by its address (DESIGN.md: inbound
        // copies are removed first); only a trusted proxy's list is kept, and extended.
        match parts.headers.entry(headers::X_FORWARDED_FOR) {
            Entry::Occupied(mut earlier) => {
                let forwarded_for = if self.trusts(conn) {
                    forwarded_for(earlier.iter(), conn)
                } else {
                    conn.peer_ip.clone()
                };
                // Replaces every line sent with the one value.
                earlier.insert(forwarded_for);
            }
            Entry::Vacant(none) => {
                none.insert(conn.peer_ip.clone());
            }
        }
        parts.headers.insert(
            headers::X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
        // A body of unknown length (a chunked request, HTTP/2 DATA without a content-length)
        // goes upstream chunked. hyper's client picks chunked for it by itself except on GET,
        // HEAD and CONNECT, where it sends no body at all unless the request says chunked (the
        // client's own Transfer-Encoding went with the hop-by-hop headers).
        if let Either::Left(streaming) = &body {
            if streaming.size_hint().exact().is_none() {
                parts
                    .headers
                    .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        }

        let upstream_request = Request::from_parts(parts, body);
        let response = self
            .upstream
            .send(upstream_request, client_body, limit)
            .await?;
        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        headers::one_content_length(&mut parts.headers, parts.status);
        // The client's connection has its own version; an HTTP/1.0 upstream must not downgrade it.
        parts.version = Version::default();
        for (name, value) in rate_headers {
            if let (Ok(name), Ok(value)) = (
                http::header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                parts.headers.insert(name, value);
            }
        }
        Ok(Response::from_parts(parts, Body(BodyKind::Upstream(body))))
    }

    /// Runs the route's checks in DESIGN.md's order (cheapest first):
    /// signature (HMAC, then nonce store) -> jwt -> permissions.
    ///
    /// The nonce write and the token check overlap: the token is verified while the store
    /// answers, which takes a store round trip off the latency of a signed request with a
    /// token. The outcomes are taken in the order above, so the answer (and the nonce being
    /// used up) is what checking one after the other gives. A replayed request may cost a
    /// token verification (and a revocation look-up, counted in the store-error metric if the
    /// mirror is stale) that the sequential order would have skipped.
    async fn check(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        body_sha256: Option<&str>,
        request_id: &str,
        conn: &ConnectionInfo,
    ) -> Result<Identity, Rejection> {
        let mut identity = Identity::default();
        if route.require.mtls {
            mtls::check(conn.client_cert.as_deref(), route.client_certs.as_ref())?;
        }
        if !route.require.signature {
            if route.require.jwt {
                identity.token = Some(self.check_token(&parts.headers, conn, request_id).await?);
            }
            return Ok(identity);
        }
        let verified = match self.verify_signature(parts, body_sha256.unwrap_or_default()) {
            Ok(verified) => verified,
            Err(e) => {
                self.metrics.signature(e.code());
                return Err(e);
            }
        };
        let nonce = self.record_nonce(&verified, request_id);
        let (nonce, token) = if route.require.jwt {
            let mut nonce = std::pin::pin!(nonce);
            // The first poll hands the command to the store. A remote store's command then
            // waits until its connection task runs: requeueing this task once lets that task
            // write it before the token is verified, so that the store's round trip and the
            // token's signature check overlap. A store that answered at once needs no requeue.
            let early =
                std::future::poll_fn(|cx| Poll::Ready(Future::poll(nonce.as_mut(), cx))).await;
            let token = self.check_token(&parts.headers, conn, request_id);
            match early {
                Poll::Ready(nonce) => (nonce, Some(token.await)),
                Poll::Pending => {
                    RequeueOnce(false).await;
                    let (nonce, token) = tokio::join!(nonce, token);
                    (nonce, Some(token))
                }
            }
        } else {
            (nonce.await, None)
        };
        self.metrics.signature(match &nonce {
            Ok(()) => "ok",
            Err(e) => e.code(),
        });
        nonce?;
        identity.signature = Some(verified);
        if let Some(token) = token {
            identity.token = Some(token?);
        }
        Ok(identity)
    }

    /// The token check: a verified (or cached) token, bound to the connection's certificate
    /// when it says so, and not revoked.
    async fn check_token(
        &self,
        headers: &http::HeaderMap,
        conn: &ConnectionInfo,
        request_id: &str,
    ) -> Result<Arc<VerifiedToken>, Rejection> {
        let token = bearer_token(headers)?;
        let now = revocation::unix_now();
        let verified = self.jwt.verify(token, now).await?;
        check_certificate_binding(&verified, conn.client_cert.as_deref())?;
        self.check_revocation(&verified, now, request_id)?;
        Ok(verified)
    }
}

impl Proxy {
    /// A store error on the request path: 503 store_unavailable, or with `on_error = "allow"` a
    /// logged pass.
    fn store_failure(
        &self,
        operation: &'static str,
        e: &StoreError,
        request_id: &str,
    ) -> Result<(), Rejection> {
        self.metrics.store_error(operation);
        match self.config.store.on_error {
            OnStoreError::Deny => {
                Err(AuthError::StoreUnavailable(format!("the store is unavailable ({e})")).into())
            }
            OnStoreError::Allow => {
                tracing::warn!(
                    request_id = %request_id,
                    operation,
                    error = %e,
                    "store unavailable; passing the request unchecked (store.on_error = \"allow\")"
                );
                Ok(())
            }
        }
    }

    /// Revocation, after the token verified (cached or not): a local lookup, no I/O.
    fn check_revocation(
        &self,
        token: &VerifiedToken,
        now: i64,
        request_id: &str,
    ) -> Result<(), Rejection> {
        match self.revocations.is_revoked(
            token.token_id.as_deref(),
            token.subject.as_deref(),
            token.issued_at,
            now,
        ) {
            Ok(false) => Ok(()),
            Ok(true) => Err(AuthError::TokenRevoked("the token has been revoked".into()).into()),
            Err(e) => self.store_failure("revocation_check", &e, request_id),
        }
    }

    /// The route's rate limit, counted by the configured key. Returns the RateLimit headers to
    /// add to the response.
    async fn check_rate_limit(
        &self,
        route: &Route,
        identity: &Identity,
        conn: &ConnectionInfo,
        headers: &http::HeaderMap,
        request_id: &str,
    ) -> Result<Vec<(&'static str, String)>, Rejection> {
        let Some(limit) = &route.rate_limit else {
            return Ok(Vec::new());
        };
        // Configuration validation ties each key kind to the check that provides it, so only
        // a token without `sub` leaves the caller unnamed.
        let who = match limit.key {
            RateLimitKey::Subject => subject_bucket(identity.token.as_deref())?,
            RateLimitKey::Client => identity
                .signature
                .as_ref()
                .map(|s| s.client.clone())
                .unwrap_or_default(),
            RateLimitKey::Certificate => conn
                .client_cert
                .as_ref()
                .map(|c| hex::encode(c.der_sha256))
                .unwrap_or_default(),
            RateLimitKey::Ip => ip_bucket(self.client_ip(conn, headers)),
        };
        let key = format!("{}:{}", route.name, who);
        match self
            .rate_limits
            .check(&key, limit.requests, limit.per)
            .await
        {
            Ok(decision) => {
                let headers = rate_limit_headers(&route.name, &decision, limit.per);
                if decision.allowed {
                    Ok(headers)
                } else {
                    Err(Rejection::RateLimited {
                        detail: format!(
                            "more than {} requests per {}s",
                            limit.requests,
                            limit.per.as_secs()
                        ),
                        headers,
                    })
                }
            }
            Err(e) => self
                .store_failure("rate_limit", &e, request_id)
                .map(|()| Vec::new()),
        }
    }

    /// Verifies the scheme-v1 signature (no I/O).
    fn verify_signature(
        &self,
        parts: &http::request::Parts,
        body_sha256: &str,
    ) -> Result<VerifiedSignature, Rejection> {
        let header = signature_header(&parts.headers)?;
        // `settle_host` has left one `Host`, visible ASCII (so `to_str` holds), the target's
        // authority where there is one; none only for HTTP/1.0 without a host.
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let target = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
        let request = SignedRequest {
            method: parts.method.as_str(),
            target,
            host,
            body_sha256_hex: body_sha256,
        };
        Ok(self.signatures.verify(header, request, SystemTime::now())?)
    }

    /// The client's address: the connection's peer, or, when the peer is one of
    /// `server.trusted_proxies`, the last address of the `X-Forwarded-For` it sent that is not
    /// one of them (read from the right, as nginx's `real_ip_recursive` does: only what a
    /// trusted proxy appended can be believed). Behind a load balancer, the peer is the
    /// balancer, and one allowance for all its clients would let any of them use it up.
    fn client_ip(&self, conn: &ConnectionInfo, headers: &http::HeaderMap) -> std::net::IpAddr {
        let peer = conn.peer.ip();
        if !self.trusts(conn) {
            return peer;
        }
        let trusted = &self.config.server.trusted_proxies;
        let from_the_right = headers
            .get_all(headers::X_FORWARDED_FOR)
            .iter()
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|line| line.rsplit(','));
        for entry in from_the_right {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            match entry.parse::<std::net::IpAddr>() {
                Ok(ip) if trusted.iter().any(|net| net.contains(ip)) => {}
                Ok(ip) => return ip.to_canonical(),
                // Not an address: what is left of it cannot be believed either.
                Err(_) => return peer,
            }
        }
        peer
    }

    /// Whether the connection's peer is one of `server.trusted_proxies`.
    fn trusts(&self, conn: &ConnectionInfo) -> bool {
        let peer = conn.peer.ip();
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(peer))
    }

    /// Records a verified signature's nonce once: a second use is a replay.
    async fn record_nonce(
        &self,
        verified: &VerifiedSignature,
        request_id: &str,
    ) -> Result<(), Rejection> {
        match self
            .nonces
            .record_signed(
                &verified.key_id,
                &verified.nonce,
                self.signatures.nonce_ttl(),
                verified.ts,
            )
            .await
        {
            Ok(NonceOutcome::Fresh) => Ok(()),
            Ok(NonceOutcome::Replayed) => Err(AuthError::NonceReplayed.into()),
            Err(e) => self.store_failure("record_nonce", &e, request_id),
        }
    }
}

/// Leaves the request with at most one `Host`, the host the checks read and the upstream gets
/// (a signature covers it), or refuses it with 400 invalid_host (RFC 9112 section 3.2: a
/// missing, repeated or invalid `Host` in HTTP/1.1, as nginx and Envoy answer them).
///
/// A target with an authority (HTTP/1.x's absolute form, HTTP/2's `:authority`) names the
/// host: in HTTP/1.x it replaces the `Host` line, which must still be there, once (RFC 9112
/// section 3.2.2); in HTTP/2 a `host` field that names another host is refused (RFC 9113
/// section 8.3.1). HTTP/1.0 may name no host at all.
fn settle_host(parts: &mut http::request::Parts) -> Result<(), Rejection> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let sent = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(Rejection::InvalidHost(
                "the request has more than one Host header",
            ))
        }
        (None, _) if parts.version == Version::HTTP_11 => {
            return Err(Rejection::InvalidHost(
                "an HTTP/1.1 request must have a Host header",
            ))
        }
        (sent, _) => sent,
    };
    let Some(authority) = parts.uri.authority() else {
        // Empty is allowed: what a client sends for a target with no authority (RFC 9112
        // section 3.2).
        if sent.is_some_and(|host| !host.is_empty() && !is_host(host.as_bytes())) {
            return Err(Rejection::InvalidHost(
                "the Host header is not a valid host",
            ));
        }
        return Ok(());
    };
    if !matches!(parts.uri.scheme_str(), Some("http" | "https")) {
        return Err(Rejection::InvalidHost(
            "the request target is not an http or https URI",
        ));
    }
    // RFC 9110 section 4.2.4: user information in an http(s) URI is an error.
    if authority.as_str().contains('@') {
        return Err(Rejection::InvalidHost(
            "the request target names user information",
        ));
    }
    if parts.version == Version::HTTP_2
        && sent.is_some_and(|host| {
            !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        })
    {
        return Err(Rejection::InvalidHost(
            "the host header names another host than :authority",
        ));
    }
    // The http crate admits only visible ASCII in an authority, so this does not fail.
    let host = HeaderValue::from_str(authority.as_str()).map_err(|_| {
        Rejection::InvalidHost("the request target's authority is not a valid host")
    })?;
    parts.headers.insert(HOST, host);
    Ok(())
}

/// Whether `value` holds only what `uri-host [ ":" port ]` may (RFC 9112 section 3.2, RFC 3986
/// section 3.2.2: a name, an IPv4 address or a bracketed IP literal): no user information,
/// path, space or byte outside ASCII, nothing a reader could split differently.
fn is_host(value: &[u8]) -> bool {
    value.iter().all(|&b| HOST_BYTES[usize::from(b)])
}

/// The bytes [`is_host`] allows, one look-up a byte (it runs on every request).
const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        // `b < 256`, so the cast is exact.
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~%!$&'()*+,;=:[]";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// Puts the current task at the back of its thread's run queue once, so that the tasks already
/// queued there (a store's connection task, woken by a command; other requests' checks) run
/// before it goes on. Unlike `tokio::task::yield_now`, whose task is woken only after the
/// scheduler has polled for I/O, it costs no system call.
struct RequeueOnce(bool);

impl Future for RequeueOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The caller an `ip` rate limit counts: an IPv4 address (an IPv4-mapped IPv6 address counts
/// as the IPv4 address it maps), or the /64 an IPv6 address belongs to. A /64 is the
/// smallest network an IPv6 site is given, and one host can use any address in it: counted
/// one address at a time, a single client would have 2^64 allowances.
fn ip_bucket(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let network = u128::from(v6) & !(u128::MAX >> 64);
            format!("{}/64", std::net::Ipv6Addr::from(network))
        }
    }
}

/// The caller a subject-keyed rate limit counts: the token's issuer and `sub`, since two
/// issuers may each have a user of the same name. The issuer goes first with its length, so no
/// pair of issuer and subject reads as another. A token without `sub` names nobody: one
/// allowance shared by all such tokens would let any of them use up the others', so it is
/// refused.
fn subject_bucket(token: Option<&VerifiedToken>) -> Result<String, Rejection> {
    match token {
        Some(VerifiedToken {
            issuer,
            subject: Some(subject),
            ..
        }) => Ok(format!("{}:{issuer}:{subject}", issuer.len())),
        _ => Err(AuthError::MissingClaim(
            "this route's rate limit counts by subject, and the token has no sub".into(),
        )
        .into()),
    }
}

/// RFC 8705: a token bound to a certificate (`cnf.x5t#S256`) is only good on a connection
/// presenting that certificate.
fn check_certificate_binding(
    token: &VerifiedToken,
    cert: Option<&ClientCert>,
) -> Result<(), AuthError> {
    let Some(bound) = &token.cnf_x5t_s256 else {
        return Ok(());
    };
    match cert {
        Some(cert) if cert.x5t_s256() == *bound => Ok(()),
        Some(_) => Err(AuthError::CertificateBindingMismatch(
            "the token is bound to another client certificate".into(),
        )),
        None => Err(AuthError::CertificateBindingMismatch(
            "the token is bound to a client certificate and the connection presented none".into(),
        )),
    }
}

/// Every permission the route lists must be granted by the token (checked after the identity
/// is known, so that the log line of a 403 names the subject).
fn check_permissions(route: &Route, identity: &Identity) -> Result<(), Rejection> {
    if !route.permissions.is_empty() {
        let granted = identity
            .token
            .as_ref()
            .map(|t| t.permissions.as_slice())
            .unwrap_or_default();
        let missing = auth::missing_permissions(&route.permissions, granted);
        if !missing.is_empty() {
            return Err(AuthError::InsufficientPermissions(format!(
                "the token lacks {}",
                missing.join(", ")
            ))
            .into());
        }
    }
    Ok(())
}

/// The one header that carries the signature: `Authorization: Signature ...`, or `X-Signature`
/// beside a bearer token. Several signature headers are malformed.
fn signature_header(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let mut found = None;
    let mut count = 0;
    for value in headers.get_all(AUTHORIZATION) {
        let text = value.to_str().unwrap_or("");
        if text.len() >= 10 && text[..10].eq_ignore_ascii_case("signature ") {
            count += 1;
            found = Some(text);
        }
    }
    for value in headers.get_all(&headers::X_SIGNATURE) {
        count += 1;
        found = Some(
            value
                .to_str()
                .map_err(|_| AuthError::SignatureMalformed("X-Signature is not ASCII".into()))?,
        );
    }
    match (count, found) {
        (0, _) | (_, None) => Err(AuthError::SignatureMissing(
            "no `Authorization: Signature v1, ...` header (or X-Signature beside a bearer token)"
                .into(),
        )),
        (1, Some(value)) => Ok(value),
        _ => Err(AuthError::SignatureMalformed(
            "more than one signature header".into(),
        )),
    }
}

/// The lower-case hex SHA-256 of a request body, kept inline (no allocation, no per-character
/// collect).
struct BodyDigest([u8; 64]);

impl BodyDigest {
    /// The digest of the empty body, which every signed GET carries: no hashing needed.
    const EMPTY: BodyDigest =
        BodyDigest(*b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    fn of(hasher: Sha256) -> Self {
        let mut hex = [0u8; 64];
        // 32 bytes of SHA-256 fill the 64 places exactly, so this cannot fail; were it to, the
        // zeros left would match no signature (a refusal, never a pass).
        let _ = hex::encode_to_slice(hasher.finalize(), &mut hex);
        BodyDigest(hex)
    }

    fn as_str(&self) -> &str {
        // Hex digits only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Reads the whole body, hashing it as it arrives, refusing it past `limit`.
async fn read_body(mut body: Incoming, limit: u64) -> Result<(Bytes, BodyDigest), Rejection> {
    let mut hasher = Sha256::new();
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            tracing::debug!(error = %e, "client body broke off");
            Rejection::BodyIncomplete
        })?;
        if let Some(data) = frame.data_ref() {
            if (buf.len() + data.len()) as u64 > limit {
                return Err(Rejection::BodyTooLarge(limit));
            }
            hasher.update(data);
            buf.extend_from_slice(data);
        }
    }
    if buf.is_empty() {
        return Ok((Bytes::new(), BodyDigest::EMPTY));
    }
    Ok((buf.freeze(), BodyDigest::of(hasher)))
}

/// What the log line and metrics of a request say.
#[derive(Debug)]
struct Outcome {
    /// The route's place in `config.routes`, once one matched.
    route: Option<usize>,
    code: &'static str,
    subject: Option<String>,
    client: Option<String>,
}

impl Default for Outcome {
    fn default() -> Self {
        Self {
            route: None,
            code: "ok",
            subject: None,
            client: None,
        }
    }
}

/// `X-Forwarded-For` for the upstream: the addresses already listed, from every line sent, in
/// order, as one list (RFC 9110 section 5.3: lines of a list header are one list), then the
/// client's. A line that is empty or not text is left out; with none left, the client's address
/// alone.
fn forwarded_for<'a>(
    earlier: impl Iterator<Item = &'a HeaderValue>,
    conn: &ConnectionInfo,
) -> HeaderValue {
    let mut list = Vec::new();
    for line in earlier.filter_map(|v| v.to_str().ok()).map(str::trim) {
        if !line.is_empty() {
            list.extend_from_slice(line.as_bytes());
            list.extend_from_slice(b", ");
        }
    }
    if list.is_empty() {
        return conn.peer_ip.clone();
    }
    // The client's address as made once for the connection.
    list.extend_from_slice(conn.peer_ip.as_bytes());
    HeaderValue::from_bytes(&list).unwrap_or_else(|_| conn.peer_ip.clone())
}

/// Refuses a `Transfer-Encoding` with a coding besides `chunked` (RFC 9112 section 6.1: a
/// server answers 501 to a transfer coding it does not understand).
fn check_transfer_coding(headers: &http::HeaderMap) -> Result<(), Rejection> {
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("(not text)");
        for coding in text.split(',').map(str::trim) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(Rejection::UnsupportedTransferCoding(format!(
                    "transfer coding {coding:?} is not supported; send the body as is, or chunked"
                )));
            }
        }
    }
    Ok(())
}

fn check_content_type(route: &Route, headers: &http::HeaderMap) -> Result<(), Rejection> {
    let Some(allowed) = &route.content_types else {
        return Ok(());
    };
    // Only the first field is read here; an upstream that read another would see a type this
    // check never judged.
    if headers.get_all(CONTENT_TYPE).iter().nth(1).is_some() {
        return Err(Rejection::UnsupportedMediaType(format!(
            "more than one Content-Type field was sent; send one: {}",
            allowed.join(" or ")
        )));
    }
    let sent = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match sent {
        Some(media_type) if allowed.contains(&media_type) => Ok(()),
        Some(media_type) => Err(Rejection::UnsupportedMediaType(format!(
            "content type {media_type} is not accepted here; send {}",
            allowed.join(" or ")
        ))),
        None => Err(Rejection::UnsupportedMediaType(format!(
            "no content type was sent; send {}",
            allowed.join(" or ")
        ))),
    }
}

/// The token of the one `Authorization: Bearer` header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::MissingCredentials);
    };
    if values.next().is_some() {
        return Err(AuthError::MalformedToken(
            "more than one Authorization header".into(),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::MalformedToken("the Authorization header is not ASCII".into()))?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MissingCredentials);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedToken(
            "the bearer token is empty".into(),
        ));
    }
    Ok(token)
}

/// Adds the verified identity. A claim that a header cannot carry (a control character) refuses
/// the request: forwarding without it could read as an anonymous caller upstream.
fn add_identity(headers: &mut http::HeaderMap, identity: &Identity) -> Result<(), AuthError> {
    if let Some(token) = &identity.token {
        let unsendable = |claim: &str| {
            AuthError::MalformedToken(format!(
                "the {claim} claim holds characters a header cannot carry"
            ))
        };
        if let Some(subject) = &token.subject {
            if !headers::set(headers, headers::X_AUTH_SUBJECT, subject) {
                return Err(unsendable("sub"));
            }
        }
        if !headers::set(headers, headers::X_AUTH_ISSUER, &token.issuer) {
            return Err(unsendable("iss"));
        }
        if !headers::set(
            headers,
            headers::X_AUTH_PERMISSIONS,
            &token.permissions_header,
        ) {
            return Err(unsendable("permissions"));
        }
        if !headers::set(headers, headers::X_AUTH_CLAIMS, &token.payload_b64) {
            return Err(unsendable("payload"));
        }
    }
    if let Some(signature) = &identity.signature {
        // Key ids and client names come from the configuration, which holds only visible text.
        headers::set(headers, headers::X_AUTH_CLIENT, &signature.client);
        headers::set(headers, headers::X_AUTH_KEY_ID, &signature.key_id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_digests_are_the_lower_case_hex_sha256_of_the_body() {
        assert_eq!(
            BodyDigest::EMPTY.as_str(),
            hex::encode(Sha256::digest(b"")),
            "the empty body's digest"
        );
        let mut hasher = Sha256::new();
        hasher.update(b"{\"amount\":");
        hasher.update(b"12}");
        assert_eq!(
            BodyDigest::of(hasher).as_str(),
            hex::encode(Sha256::digest(b"{\"amount\":12}"))
        );
    }
}
