//! Forwarding to the upstream: pools of HTTP/1.1 keep-alive connections with connect and
//! request timeouts, and a request body that streams through while counting bytes against
//! `max_body_bytes`. A request whose body is in hand (none, or one read for a signature check,
//! up to [`client::MAX_INLINE_BODY`]) goes on the proxy's own client ([`client`]); one whose
//! body streams goes on hyper's. Each has its pool.
//!
//! There is one upstream, so the pool is a stack of idle connections (the most recently used
//! first, so that surplus connections age out) rather than a map keyed by host. A connection
//! goes back on the stack when the response body it carried has been read to the end; a body
//! dropped half-read takes its connection with it (hyper then closes it). A reaper task closes
//! connections unused for [`IDLE_TIMEOUT`], a few each second.
//!
//! `request_timeout` bounds the wait for the response head (504), and then each wait for the
//! next piece of the response body: an upstream that falls silent mid-answer has the answer cut
//! off (the client sees it end early) and its connection closed, as nginx's
//! `proxy_read_timeout` does. A body that keeps coming streams for as long as it lasts.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::client::{self, ClientError, Conn};
use super::upstream_tls;
use super::BoxError;
use crate::config::UpstreamConfig;
use crate::problem::Rejection;
use crate::server::io::Coalesced;
use crate::server::timer::SleepPool;
use crate::server::tls::TlsError;

/// The body sent upstream: the client's body streamed through the limit, the body already read
/// (and hashed) for a signature check, or nothing (the client sent none).
pub(crate) type UpstreamBody = http_body_util::Either<LimitedBody, http_body_util::Full<Bytes>>;

type Sender = http1::SendRequest<UpstreamBody>;

/// Idle connections are closed after this long unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept; more are closed when they fall idle.
const MAX_IDLE: usize = 1024;
/// How often the pool's reaper looks for connections idle past [`IDLE_TIMEOUT`].
const REAP_EVERY: Duration = Duration::from_secs(1);
/// At most this many expired connections are closed each time the reaper looks. After a burst,
/// dozens of connections fall idle together and expire together. Closing them when traffic
/// comes back, all at once (63: the proxy ran 4.9 ms and the upstream 4.0 ms) or a few per
/// request (the same work within 6 ms at 5,000/s), stalled the first requests after a minute of
/// idle (`bench/README.md`, tenth and eleventh passes). The reaper closes them while the proxy
/// is idle, a few a second, so that under load too they go out spread over time.
const CLOSE_PER_REAP: usize = 8;

/// The upstream service: where to connect, and the idle connections to it.
#[derive(Debug)]
pub(crate) struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of `upstream.url`, what the connector dials.
    address: Uri,
    builder: http1::Builder,
    /// hyper's connections, for requests whose body streams.
    pool: Arc<Pool<Sender>>,
    /// The proxy's own connections, for requests whose body is in hand.
    lean: Arc<Pool<Conn>>,
    /// Whether the pools' reaper tasks run (started with the first connection, inside the
    /// runtime).
    reaper: AtomicBool,
    request_timeout: Duration,
    /// Timers for `request_timeout`, reused from request to request.
    timers: SleepPool,
}

/// Why the upstream could not answer.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(BoxError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Upstream {
    pub(crate) fn new(config: &UpstreamConfig) -> Result<Self, TlsError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let tls = upstream_tls::client_config(config)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let mut address = http::uri::Parts::default();
        address.scheme = config.url.scheme().cloned();
        address.authority = config.url.authority().cloned();
        address.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        // Configuration validation refuses an upstream URL without a scheme or host.
        let address = Uri::from_parts(address).unwrap_or_else(|_| config.url.clone());
        Ok(Self {
            connector,
            address,
            builder: http1::Builder::new(),
            pool: Arc::new(Pool::new(IDLE_TIMEOUT, MAX_IDLE)),
            lean: Arc::new(Pool::new(IDLE_TIMEOUT, MAX_IDLE)),
            reaper: AtomicBool::new(false),
            request_timeout: config.request_timeout,
            timers: SleepPool::default(),
        })
    }

    /// Reads a body that must be in hand before the checks (a signed route's), up to
    /// `request_timeout`: a client that stalls mid-body is answered 408 instead of holding its
    /// task and buffer without end.
    pub(crate) async fn read_body_in_time<T>(
        &self,
        read: impl Future<Output = Result<T, Rejection>>,
    ) -> Result<T, Rejection> {
        let deadline = self
            .timers
            .sleep_until(tokio::time::Instant::now() + self.request_timeout);
        // The body first: one that is already in hand never puts the timer in tokio's wheel.
        tokio::select! {
            biased;
            outcome = read => outcome,
            () = deadline => Err(Rejection::BodyTimeout(self.request_timeout)),
        }
    }

    /// Sends the request (origin-form target, `Host` set) and waits for the response head, up
    /// to `request_timeout`. `client_body` is the state of a body that streams from the client
    /// ([`LimitedBody`]): when the exchange fails or times out because of the client's body
    /// (over the limit, broken off, or stalled while the proxy waited for it), the answer says
    /// so (413, 400 body_incomplete, 408 body_timeout) rather than blaming the upstream.
    pub(crate) async fn send(
        &self,
        request: Request<UpstreamBody>,
        client_body: Option<Arc<ClientBodyState>>,
        limit: u64,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let deadline = self
            .timers
            .sleep_until(tokio::time::Instant::now() + self.request_timeout);
        // The exchange first, as `tokio::time::timeout` does: an answer that is ready when the
        // deadline is too is still taken.
        let outcome = tokio::select! {
            biased;
            outcome = self.exchange(request) => Some(outcome),
            () = deadline => None,
        };
        let client = client_body.as_deref().map(ClientBodyState::get);
        match outcome {
            None if client == Some(ClientBody::Awaited) => {
                tracing::debug!("the client's body stalled past request_timeout");
                Err(Rejection::BodyTimeout(self.request_timeout))
            }
            None => Err(Rejection::UpstreamTimeout),
            Some(Ok(mut response)) => {
                response.body_mut().silence = Some(Silence {
                    limit: self.request_timeout,
                    timers: self.timers.clone(),
                    timer: None,
                    armed: false,
                });
                Ok(response)
            }
            Some(Err(e)) => {
                match client {
                    Some(ClientBody::OverLimit) => return Err(Rejection::BodyTooLarge(limit)),
                    Some(ClientBody::Broken) => {
                        tracing::debug!(error = %e, "client body broke off");
                        return Err(Rejection::BodyIncomplete);
                    }
                    _ => {}
                }
                let connect = matches!(e, UpstreamError::Connect(_));
                tracing::warn!(error = %e, connect, "upstream request failed");
                Err(Rejection::UpstreamUnavailable)
            }
        }
    }

    async fn exchange(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let (parts, body) = request.into_parts();
        match body {
            Either::Right(full) => {
                let bytes = full_bytes(full);
                if bytes.len() <= client::MAX_INLINE_BODY {
                    return self.exchange_in_hand(&parts, &bytes).await;
                }
                let request = Request::from_parts(parts, Either::Right(Full::new(bytes)));
                self.exchange_streaming(request).await
            }
            streaming => {
                self.exchange_streaming(Request::from_parts(parts, streaming))
                    .await
            }
        }
    }

    /// A request whose body is in hand, on the proxy's own client. An idempotent request on a
    /// reused connection that closes before any answer is sent once more on a new one, as
    /// nginx and Envoy do (the same bytes: nothing is encoded twice); others get 502.
    async fn exchange_in_hand(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        // Let every request that became ready in this turn of the runtime finish its checks
        // before any of them writes upstream. The writes then leave together, and an upstream
        // that sleeps between requests (on another core) is woken once for the lot rather than
        // once a request; each such wake-up costs the sender a few microseconds of kernel time.
        // The requeue puts this task at the back of the run queue, behind the requests already
        // there, and costs no system call; `tokio::task::yield_now` batched the same way but
        // resumed the task only after a zero-timeout `epoll_wait`, about one system call for
        // every two requests at full load. It comes before the checkout, so that a pooled
        // connection is found usable just before the write, not a turn of the runtime earlier.
        // Measured in bench/README ("twenty-first pass", "twenty-third pass").
        super::RequeueOnce(false).await;
        let head_request = parts.method == Method::HEAD;
        let (mut conn, reused) = match self.lean.checkout() {
            Some(conn) => (conn, true),
            // Boxed: a new connection is the rare case (see `exchange_streaming`).
            None => (Box::pin(self.connect_lean()).await?, false),
        };
        conn.encode(parts, body);
        let head = match conn.round_trip(head_request).await {
            Ok(head) => head,
            Err(e) if reused && idempotent(&parts.method) && e.closed_without_answer() => {
                tracing::debug!(error = %e, "reused upstream connection closed without an answer; sending the request once more on a new one");
                let wire = conn.take_request();
                conn = Box::pin(self.connect_lean()).await?;
                conn.set_request(wire);
                conn.round_trip(head_request).await?
            }
            Err(e) => return Err(e.into()),
        };
        let pool = self.lean.clone();
        let body = head.body(conn, pool);
        let mut response = Response::new(ResponseBody::new(ResponseKind::Lean(body)));
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// A request whose body streams, on hyper's client.
    async fn exchange_streaming(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let (mut sender, reused) = match self.pool.checkout() {
            Some(sender) => (sender, true),
            // Boxed: a new connection is the rare case, and its future would otherwise make every
            // request's future larger (futures are moved, so their size is paid on each one).
            None => (Box::pin(self.connect()).await?, false),
        };
        // A reused connection may have been closed by the upstream an instant before the
        // request went out (its keep-alive timeout ran out): the request then fails with no
        // answer. An idempotent request whose body is in hand is sent once more on a new
        // connection, as nginx and Envoy do; others get 502.
        let replay = if reused { replay_copy(&request) } else { None };
        let head_request = request.method() == Method::HEAD;
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                let retry = match (e.take_message(), replay) {
                    // Closed before the request was written: nothing reached the upstream.
                    (Some(request), _) if reused => request,
                    (None, Some(request)) if closed_without_answer(e.error()) => request,
                    _ => return Err(e.into_error().into()),
                };
                tracing::debug!(error = %e.error(), "reused upstream connection closed without an answer; sending the request once more on a new one");
                sender = Box::pin(self.connect()).await?;
                sender.send_request(retry).await?
            }
        };
        let pool = self.pool.clone();
        let (mut head, body) = response.into_parts();
        // hyper's client decodes the chunks of an answer that has a length too, and leaves the
        // length in place: passed on, it would frame the decoded body wrongly for the client
        // (RFC 9112 section 6.3: an intermediary removes it). As on the proxy's own client,
        // such a connection is not trusted after.
        let mut sender = Some(sender);
        let bodiless = head_request
            || head.status == http::StatusCode::NO_CONTENT
            || head.status == http::StatusCode::NOT_MODIFIED;
        if !bodiless && head.headers.contains_key(http::header::TRANSFER_ENCODING) {
            client::only_chunked(&head.headers)?;
            if head.headers.remove(http::header::CONTENT_LENGTH).is_some() {
                sender = None;
            }
        }
        Ok(Response::from_parts(
            head,
            ResponseBody::new(ResponseKind::Hyper {
                inner: body,
                sender,
                pool,
            }),
        ))
    }

    /// Starts the pools' reapers, once.
    fn start_reapers(&self) {
        if !self.reaper.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(&self.pool), REAP_EVERY));
            tokio::spawn(reap(Arc::downgrade(&self.lean), REAP_EVERY));
        }
    }

    /// Dials the upstream (TCP, and TLS for an `https` upstream), starting the reapers with the
    /// first connection.
    async fn dial(&self) -> Result<MaybeHttpsStream<TokioIo<TcpStream>>, UpstreamError> {
        self.start_reapers();
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        connector
            .call(self.address.clone())
            .await
            .map_err(UpstreamError::Connect)
    }

    /// A new connection for the proxy's own client.
    async fn connect_lean(&self) -> Result<Conn, UpstreamError> {
        Ok(Conn::new(self.dial().await?))
    }

    /// A new connection for hyper's client, its task spawned.
    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let io = self.dial().await?;
        let (sender, connection) = self.builder.handshake(Coalesced(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A copy of `request` to send again, when that is safe: an idempotent method (RFC 9110
/// section 9.2.2) and a body already in hand (empty, or read for a signature check).
fn replay_copy(request: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let Either::Right(body) = request.body() else {
        return None;
    };
    if !idempotent(request.method()) {
        return None;
    }
    let mut copy = Request::new(Either::Right(body.clone()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Whether a request may be sent twice (RFC 9110 section 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The bytes of a complete body (a `Full` is always ready, with one frame or none).
fn full_bytes(full: Full<Bytes>) -> Bytes {
    let mut full = std::pin::pin!(full);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match full.as_mut().poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        Poll::Ready(Some(Err(never))) => match never {},
        Poll::Ready(None) | Poll::Pending => Bytes::new(),
    }
}

/// The connection ended before any answer: closed or reset by the upstream.
fn closed_without_answer(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        })
}

/// A connection that a [`Pool`] can hold.
trait Pooled: Send {
    /// Whether it can take a request now, is still busy with its last one, or is closed.
    fn check(&self) -> Checked;
    /// Whether it is known to be closed (without asking the socket).
    fn is_closed(&self) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    Ready,
    Busy,
    Closed,
}

impl Pooled for Sender {
    fn check(&self) -> Checked {
        if self.is_ready() {
            Checked::Ready
        } else if Sender::is_closed(self) {
            Checked::Closed
        } else {
            Checked::Busy
        }
    }

    fn is_closed(&self) -> bool {
        Sender::is_closed(self)
    }
}

impl Pooled for Conn {
    /// A connection of the proxy's own client goes back only once its exchange is over: it
    /// is never busy, and unusable means closed.
    fn check(&self) -> Checked {
        if self.usable() {
            Checked::Ready
        } else {
            Checked::Closed
        }
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// Idle connections, the most recently used at the back.
#[derive(Debug)]
struct Pool<T> {
    idle: Mutex<VecDeque<Idle<T>>>,
    /// [`IDLE_TIMEOUT`]; shorter in tests.
    idle_timeout: Duration,
    /// [`MAX_IDLE`]; smaller in tests.
    max_idle: usize,
}

#[derive(Debug)]
struct Idle<T> {
    conn: T,
    since: Instant,
}

impl<T: Pooled> Pool<T> {
    fn new(idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            idle: Mutex::default(),
            idle_timeout,
            max_idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle<T>>> {
        // The lock is never held across anything that can panic; a poisoned stack of
        // connections is still a stack of connections.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used connection that can take a request now. Closed ones are dropped;
    /// those still finishing their last exchange stay (a few are looked past, then a new
    /// connection is cheaper than searching further).
    fn checkout(&self) -> Option<T> {
        const LOOK_PAST: usize = 8;
        let mut idle = self.lock();
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(entry) = idle.pop_back() {
            match entry.conn.check() {
                Checked::Ready => {
                    found = Some(entry.conn);
                    break;
                }
                Checked::Busy => {
                    busy.push(entry);
                    if busy.len() == LOOK_PAST {
                        break;
                    }
                }
                Checked::Closed => {}
            }
        }
        for entry in busy.into_iter().rev() {
            idle.push_back(entry);
        }
        found
    }

    /// Puts a connection whose exchange is finished back on the stack, closing the oldest
    /// when there are [`MAX_IDLE`] (after the lock is let go).
    fn put(&self, conn: T) {
        if conn.is_closed() {
            return;
        }
        let surplus = {
            let mut idle = self.lock();
            let surplus = if idle.len() >= self.max_idle {
                idle.pop_front()
            } else {
                None
            };
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
            surplus
        };
        drop(surplus);
    }

    /// Closes up to `max` of the connections idle for longer than the idle timeout at `now`,
    /// the oldest first, after the lock is let go. Returns how many it closed.
    fn close_expired(&self, now: Instant, max: usize) -> usize {
        let expired =
            |entry: &Idle<T>| now.saturating_duration_since(entry.since) > self.idle_timeout;
        let mut closing = Vec::new();
        {
            let mut idle = self.lock();
            while closing.len() < max && idle.front().is_some_and(expired) {
                closing.extend(idle.pop_front());
            }
        }
        closing.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Every `every`, closes up to [`CLOSE_PER_REAP`] expired connections of the pool; ends once the
/// pool is gone.
async fn reap<T: Pooled>(pool: Weak<Pool<T>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.close_expired(Instant::now(), CLOSE_PER_REAP);
    }
}

/// The upstream's response body: streams through, and hands its connection back to its pool
/// once read to the end.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    kind: ResponseKind,
    /// The longest the upstream may stay silent mid-body; `None` until [`Upstream::send`] sets
    /// it.
    silence: Option<Silence>,
}

impl ResponseBody {
    fn new(kind: ResponseKind) -> Self {
        Self {
            kind,
            silence: None,
        }
    }
}

/// `request_timeout` as a limit on each wait for the next piece of a response body. The timer
/// is taken only when a read has to wait (most bodies are in hand with their head and never
/// take one), and is moved on, not replaced, from one wait to the next.
#[derive(Debug)]
struct Silence {
    limit: Duration,
    timers: SleepPool,
    timer: Option<crate::server::timer::PooledSleep>,
    /// Whether the timer is set for the current wait (a piece that arrives ends the wait).
    armed: bool,
}

impl Silence {
    /// Polls the timer of the current wait, setting it first when the wait has just begun.
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.reset(deadline),
                None => self.timer = Some(self.timers.sleep_until(deadline)),
            }
        }
        match &mut self.timer {
            Some(timer) => Pin::new(timer).poll(cx),
            None => Poll::Pending,
        }
    }
}

/// The upstream sent no part of the response body for `request_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing of the response body for {0:?}")]
pub(crate) struct BodySilent(Duration);

#[derive(Debug)]
enum ResponseKind {
    Hyper {
        inner: Incoming,
        sender: Option<Sender>,
        pool: Arc<Pool<Sender>>,
    },
    Lean(client::Body<Arc<Pool<Conn>>>),
}

impl client::Release for Arc<Pool<Conn>> {
    fn release(self, conn: Conn) {
        self.put(conn);
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_inner(cx);
        let Some(silence) = this.silence.as_mut() else {
            return polled;
        };
        if polled.is_ready() {
            silence.armed = false;
            return polled;
        }
        match silence.poll_elapsed(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let limit = silence.limit;
                // The connection is not handed back: its answer is unfinished.
                this.silence = None;
                if let ResponseKind::Hyper { sender, .. } = &mut this.kind {
                    *sender = None;
                }
                tracing::warn!(
                    timeout = ?limit,
                    "the upstream fell silent mid-answer; the answer is cut off"
                );
                Poll::Ready(Some(Err(Box::new(BodySilent(limit)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Hyper { inner, .. } => inner.is_end_stream(),
            ResponseKind::Lean(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Hyper { inner, .. } => inner.size_hint(),
            ResponseKind::Lean(body) => body.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            ResponseKind::Hyper {
                inner,
                sender,
                pool,
            } => {
                let polled = Pin::new(inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(sender) = sender.take() {
                            pool.put(sender);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => *sender = None,
                    Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
                }
                polled.map(|frame| frame.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
            }
            ResponseKind::Lean(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body read to its end (or empty from the start) leaves the connection reusable;
        // one dropped half-read does not, and its sender goes with it. (The proxy's own
        // client's body does the same in its own `Drop`.)
        if let ResponseKind::Hyper {
            inner,
            sender,
            pool,
        } = &mut self.kind
        {
            if inner.is_end_stream() {
                if let Some(sender) = sender.take() {
                    pool.put(sender);
                }
            }
        }
    }
}

/// The body is over the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub(crate) struct BodyTooLarge;

/// Where a streaming client body stands, as [`LimitedBody`] last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientBody {
    /// Its last piece came (or none was asked for yet).
    Flowing,
    /// The proxy asked for the next piece and it has not come.
    Awaited,
    /// It went past `max_body_bytes`.
    OverLimit,
    /// The client's side failed mid-body (reset, or a connection closed early).
    Broken,
}

/// A [`ClientBody`] shared between the [`LimitedBody`] that hyper's client reads and the
/// request that waits for the exchange.
#[derive(Debug, Default)]
pub(crate) struct ClientBodyState(AtomicU8);

impl ClientBodyState {
    fn set(&self, state: ClientBody) {
        self.0.store(state as u8, Ordering::Release);
    }

    fn get(&self) -> ClientBody {
        match self.0.load(Ordering::Acquire) {
            1 => ClientBody::Awaited,
            2 => ClientBody::OverLimit,
            3 => ClientBody::Broken,
            _ => ClientBody::Flowing,
        }
    }
}

/// Streams the client's body, failing once more than `limit` bytes have passed (the upstream
/// then sees an aborted request, never a truncated one that looks complete).
#[derive(Debug)]
pub(crate) struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    state: Arc<ClientBodyState>,
}

impl LimitedBody {
    pub(crate) fn new(inner: Incoming, limit: u64, state: Arc<ClientBodyState>) -> Self {
        Self {
            inner,
            remaining: limit,
            state,
        }
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.state.set(ClientBody::OverLimit);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                self.state.set(ClientBody::Flowing);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.state.set(ClientBody::Broken);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                self.state.set(ClientBody::Flowing);
                Poll::Ready(None)
            }
            Poll::Pending => {
                self.state.set(ClientBody::Awaited);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A real HTTP/1.1 server on loopback that answers 200 and counts the connections that
    /// have ended (closed by the client).
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let counter = closed.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    counter.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, closed)
    }

    async fn connection(addr: std::net::SocketAddr) -> Sender {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        sender
    }

    /// Puts `n` new connections to `addr` in the pool, one after the other.
    async fn fill(pool: &Pool<Sender>, addr: std::net::SocketAddr, n: usize) {
        for _ in 0..n {
            pool.put(connection(addr).await);
        }
    }

    async fn closed_reaches(closed: &AtomicUsize, want: usize) {
        for _ in 0..200 {
            if closed.load(Ordering::SeqCst) >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn expired_connections_are_closed_oldest_first_a_few_at_a_time() {
        let (addr, closed) = upstream().await;
        let pool = Pool::new(Duration::from_millis(200), MAX_IDLE);
        fill(&pool, addr, 10).await;
        let fresh = connection(addr).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(pool.close_expired(Instant::now(), 4), 4);
        assert_eq!(pool.len(), 6);
        closed_reaches(&closed, 4).await;
        assert_eq!(closed.load(Ordering::SeqCst), 4);

        // A connection put back now is not expired: only the six old ones go.
        pool.put(fresh);
        assert_eq!(pool.close_expired(Instant::now(), 4), 4);
        assert_eq!(pool.close_expired(Instant::now(), 4), 2);
        assert_eq!(pool.close_expired(Instant::now(), 4), 0);
        assert_eq!(pool.len(), 1);
        closed_reaches(&closed, 10).await;
        assert_eq!(closed.load(Ordering::SeqCst), 10);
        assert!(pool.checkout().is_some(), "the fresh connection stays");
    }

    #[tokio::test]
    async fn the_reaper_closes_expired_connections_a_few_per_tick_and_ends_with_the_pool() {
        let (addr, closed) = upstream().await;
        let pool = Arc::new(Pool::new(Duration::from_millis(100), MAX_IDLE));
        fill(&pool, addr, CLOSE_PER_REAP + 3).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Nothing is put back or taken out: only the reaper can close them. Its first tick
        // comes at once and closes CLOSE_PER_REAP; the rest wait for the next, a second later.
        let reaper = tokio::spawn(reap(Arc::downgrade(&pool), Duration::from_secs(1)));
        closed_reaches(&closed, CLOSE_PER_REAP).await;
        assert_eq!(pool.len(), 3, "one tick closes at most CLOSE_PER_REAP");
        closed_reaches(&closed, CLOSE_PER_REAP + 3).await;
        assert_eq!(closed.load(Ordering::SeqCst), CLOSE_PER_REAP + 3);
        assert_eq!(pool.len(), 0);

        drop(pool);
        tokio::time::timeout(Duration::from_secs(3), reaper)
            .await
            .expect("the reaper ends once the pool is gone")
            .unwrap();
    }

    #[tokio::test]
    async fn the_upstream_starts_the_reaper_with_its_first_connection() {
        use http_body_util::BodyExt;

        let (addr, closed) = upstream().await;
        let config = UpstreamConfig {
            url: format!("http://{addr}").parse().unwrap(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ca: None,
            pins: Vec::new(),
        };
        let mut upstream = Upstream::new(&config).unwrap();
        upstream.lean = Arc::new(Pool::new(Duration::from_millis(50), MAX_IDLE));
        let request = Request::get("/")
            .body(Either::Right(http_body_util::Full::new(Bytes::new())))
            .unwrap();
        let response = upstream.send(request, None, 1024).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(
            upstream.lean.len(),
            1,
            "read to the end, the connection is back"
        );

        // No request follows: only the reaper, within about REAP_EVERY, can close it.
        closed_reaches(&closed, 1).await;
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.lean.len(), 0);
    }

    #[tokio::test]
    async fn a_full_pool_closes_a_connection_instead_of_growing() {
        let (addr, closed) = upstream().await;
        let pool = Pool::new(Duration::from_secs(60), 3);
        fill(&pool, addr, 4).await;
        assert_eq!(pool.len(), 3);
        closed_reaches(&closed, 1).await;
        assert_eq!(closed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_within_the_idle_timeout_stay() {
        let (addr, closed) = upstream().await;
        let pool = Pool::new(Duration::from_secs(60), MAX_IDLE);
        fill(&pool, addr, 5).await;
        let sender = pool.checkout().expect("a ready connection");
        pool.put(sender);
        assert_eq!(pool.len(), 5);
        assert_eq!(pool.close_expired(Instant::now(), CLOSE_PER_REAP), 0);
        assert_eq!(pool.len(), 5);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 0);
    }
}
