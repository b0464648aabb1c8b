//! Listeners and connections: accept TCP, serve HTTP/1.1 and HTTP/2 with hyper-util, apply the
//! header-read timeout, and on shutdown stop accepting and let in-flight requests finish (up to
//! `server.drain_timeout`). [`Server::bind`] then [`Server::serve`] is what tests use; [`run`]
//! does both.

mod drain;
pub(crate) mod io;
pub(crate) mod timer;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use timer::PooledTimer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::Admin;
use crate::auth::mtls::ClientCert;
use crate::auth::JwtVerifier;
use crate::config::Config;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::proxy::{ConnectionInfo, Proxy};
use crate::store::{self, StoreError};
use drain::Drain;
use io::Coalesced;
use tls::{TlsError, TlsState};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address in the configuration.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The serving certificate set (`[server.tls]`) cannot be loaded.
    #[error("cannot load the serving TLS certificates: {0}")]
    Tls(TlsError),
    /// The roots that verify the upstream (`upstream.ca`) cannot be loaded.
    #[error("cannot load the upstream's TLS roots: {0}")]
    UpstreamTls(TlsError),
    /// The store named in `[store]` cannot be used (a bad URL; a store that is merely down
    /// does not stop the start).
    #[error("cannot use the store: {0}")]
    Store(#[from] StoreError),
}

/// A proxy whose listeners are bound and whose keys are loaded, ready to serve.
#[derive(Debug)]
pub struct Server {
    tls: Option<Arc<TlsState>>,
    listener: TcpListener,
    admin_listener: TcpListener,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    drain_timeout: Duration,
    header_read_timeout: Duration,
    busy_poll: bool,
    /// One permit for each client connection served (`server.max_connections`).
    connections: Arc<Semaphore>,
    // Held so that background key refreshes live as long as the server.
    _keys: Arc<KeyStore>,
}

impl Server {
    /// Binds both listeners and loads every issuer's keys (a JWKS that cannot be fetched yet
    /// leaves its issuer not ready; requests needing it get 503 keys_unavailable).
    pub async fn bind(config: Config) -> Result<Server, RunError> {
        let config = Arc::new(config);
        let listener = bind(config.server.listen).await?;
        let admin_listener = bind(config.admin.listen).await?;
        let metrics = Arc::new(Metrics::new());
        tls::install_default_provider();
        let tls = match &config.server.tls {
            Some(settings) => {
                Some(TlsState::load(settings, metrics.clone()).map_err(RunError::Tls)?)
            }
            None => None,
        };
        let stores = store::connect_all(&config.store).await?;
        let keys = KeyStore::load(&config.jwt, metrics.clone()).await;
        let jwt = JwtVerifier::new(&config.jwt, keys.clone(), &metrics);
        let proxy = Arc::new(
            Proxy::new(config.clone(), jwt, stores.clone(), metrics.clone())
                .map_err(RunError::UpstreamTls)?,
        );
        let admin = Arc::new(Admin::new(
            keys.clone(),
            stores,
            tls.clone(),
            &config,
            metrics,
        ));
        Ok(Server {
            tls,
            listener,
            admin_listener,
            proxy,
            admin,
            drain_timeout: config.server.drain_timeout,
            header_read_timeout: config.server.header_read_timeout,
            busy_poll: config.server.busy_poll,
            connections: Arc::new(Semaphore::new(config.server.max_connections)),
            _keys: keys,
        })
    }

    /// The address the proxy listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` resolves, then stops accepting and waits for in-flight requests
    /// up to the drain timeout.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        // One pool of reused timers for every connection's header-read timeout (see `timer`).
        let timer = PooledTimer::default();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(timer.clone())
            .header_read_timeout(self.header_read_timeout);
        builder
            .http2()
            .timer(timer.clone())
            .keep_alive_interval(Some(Duration::from_secs(30)));
        let builder = Arc::new(builder);
        let _reloader = self.tls.as_ref().map(|t| AbortOnDrop(t.spawn_reloader()));
        let _busy_poller = self
            .busy_poll
            .then(|| AbortOnDrop(tokio::spawn(busy_poll())));
        let drain = Drain::new();
        tokio::pin!(shutdown);
        tracing::info!(
            listen = %self.local_addr(),
            admin = %self.admin_addr(),
            "portcullis is serving"
        );
        let mut warned_full: Option<Instant> = None;
        loop {
            // At `max_connections`, new connections wait in the listen backlog (as with
            // HAProxy's `maxconn`) until one ends; the admin listener is served meanwhile.
            let full = self.connections.available_permits() == 0;
            if full && warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                tracing::warn!(
                    "server.max_connections reached: new connections wait until one ends"
                );
                warned_full = Some(Instant::now());
            }
            tokio::select! {
                () = &mut shutdown => break,
                // A connection ended: accept again.
                _ended = self.connections.acquire(), if full => continue,
                accepted = self.listener.accept(), if !full => {
                    let (stream, peer) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Only this loop takes permits, and one was free when it began.
                    let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let proxy = self.proxy.clone();
                    let builder = builder.clone();
                    let watcher = drain.watcher();
                    let acceptor = self.tls.as_ref().map(|t| t.acceptor());
                    let header_read_timeout = self.header_read_timeout;
                    tokio::spawn(async move {
                        // Held for as long as the connection is served.
                        let _permit = permit;
                        match acceptor {
                            None => {
                                let conn_info = ConnectionInfo::new(peer, false, None);
                                serve(&builder, watcher, Coalesced(TokioIo::new(stream)), proxy, conn_info, header_read_timeout).await;
                            }
                            Some(acceptor) => {
                                let tls_stream = match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(s)) => s,
                                    Ok(Err(e)) => {
                                        tracing::debug!(peer = %peer, error = %e, "TLS handshake refused");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                                        return;
                                    }
                                };
                                let client_cert = tls_stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .and_then(|der| ClientCert::from_der(der))
                                    .map(Arc::new);
                                let conn_info = ConnectionInfo::new(peer, true, client_cert);
                                serve(&builder, watcher, Coalesced(TokioIo::new(tls_stream)), proxy, conn_info, header_read_timeout).await;
                            }
                        }
                    });
                }
                accepted = self.admin_listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // As for the main listener: an error that repeats (out of file
                            // descriptors) must not turn this loop into a spin.
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let admin = self.admin.clone();
                    let service = service_fn(move |request| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.handle(request).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(timer.clone())
                        .header_read_timeout(self.header_read_timeout)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = drain.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            }
        }
        drop(self.listener);
        drop(self.admin_listener);
        tracing::info!(
            drain_timeout = ?self.drain_timeout,
            "shutting down: no new connections, draining in-flight requests"
        );
        if tokio::time::timeout(self.drain_timeout, drain.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; closing the remaining connections");
        }
        Ok(())
    }
}

/// How often, at most, reaching `server.max_connections` is logged.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Keeps the worker from sleeping: a task that is always ready to run, so that tokio's
/// scheduler, finding nothing else to do, polls for I/O with a zero timeout (`epoll_wait` with
/// timeout 0) instead of blocking in it. Costs a whole core; saves the wake-up from idle on
/// every request, which on a VM can cost more than the request (`bench/README.md`).
async fn busy_poll() {
    loop {
        tokio::task::yield_now().await;
    }
}

/// Aborts the task when dropped (the certificate reloader ends with the server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves one connection (plain or TLS) until it ends or the drain closes it.
///
/// A connection that has not sent a whole request head within `idle_timeout` (the
/// header-read timeout) is closed. hyper's own header-read timeout covers an HTTP/1.1
/// connection only once it is known to be one, which takes up to 24 bytes (the length of the
/// HTTP/2 preface), and HTTP/2 has none: without this, a client could hold a connection, and
/// its file descriptor, by sending nothing, or a few bytes, or only the HTTP/2 preface.
///
/// After that, a connection on which no request began or ended for a whole `idle_timeout`
/// is shut down gracefully (HTTP/2: GOAWAY), so it is closed after between one and two
/// timeouts without a request. hyper closes an idle HTTP/1.1 connection at its header-read
/// timeout already; an HTTP/2 client that answers pings would otherwise hold its connection
/// for ever.
async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: drain::Watcher,
    io: I,
    proxy: Arc<Proxy>,
    conn_info: ConnectionInfo,
    idle_timeout: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn_info.peer;
    let served = Arc::new(Served {
        info: conn_info,
        activity: AtomicU64::new(0),
    });
    let state = served.clone();
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        // Counted here, as hyper takes the request in, not when the task serving it (for
        // HTTP/2, a task of its own) first runs: the first-request deadline must see it.
        let in_flight = InFlight::begin(served.clone());
        async move {
            let response = proxy.handle(request, &in_flight.0.info).await;
            // In flight until the answer's body has been sent (or dropped), so a connection
            // that streams a long body is not idle.
            Ok::<_, Infallible>(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let conn = builder.serve_connection(io, service).into_owned();
    let mut conn = std::pin::pin!(watcher.watch(conn));
    // `None` once the connection is being shut down.
    let mut idle = Some(IdleTimer {
        sleep: Box::pin(tokio::time::sleep(idle_timeout)),
        armed: false,
        seen: 0,
    });
    let ended = std::future::poll_fn(|cx| loop {
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(result));
        }
        let Some(timer) = idle.as_mut() else {
            return Poll::Pending;
        };
        match timer.poll_idle(cx, &state.activity, idle_timeout) {
            Poll::Pending => return Poll::Pending,
            // No request yet: closed at once, there is nothing to finish.
            Poll::Ready(Idle::NoRequest) => return Poll::Ready(None),
            Poll::Ready(Idle::Idle) => {
                // Polled once more to act on it.
                idle = None;
                conn.as_mut().shut_down();
                tracing::debug!(peer = %peer, timeout = ?idle_timeout, "idle connection closed");
            }
        }
    })
    .await;
    match ended {
        Some(Err(e)) => {
            tracing::debug!(error = %e, peer = %peer, "connection ended with an error");
        }
        Some(Ok(())) => {}
        None => {
            tracing::debug!(
                peer = %peer,
                timeout = ?idle_timeout,
                "no request within the header-read timeout; connection closed"
            );
        }
    }
}

/// One connection's facts and the count its idle timer reads.
struct Served {
    info: ConnectionInfo,
    /// Requests in flight in the low 32 bits ([`IN_FLIGHT`]); above them, how many times a
    /// request began or ended. One atomic add a begin and one an end.
    activity: AtomicU64,
}

/// The bits of [`Served::activity`] that count requests in flight.
const IN_FLIGHT: u64 = u32::MAX as u64;

/// A request being served on a connection, from its head until its answer's body is sent.
struct InFlight(Arc<Served>);

impl InFlight {
    fn begin(served: Arc<Served>) -> Self {
        served.activity.fetch_add((1 << 32) + 1, Ordering::Relaxed);
        Self(served)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // One more event, one fewer in flight.
        self.0.activity.fetch_add((1 << 32) - 1, Ordering::Relaxed);
    }
}

/// An answer's body that keeps its request in flight until hyper drops it (sent, or the
/// stream reset).
struct Tracked {
    body: crate::proxy::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = <crate::proxy::Body as hyper::body::Body>::Data;
    type Error = <crate::proxy::Body as hyper::body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's idle deadline and the activity count it last saw.
struct IdleTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The sleep has been polled since it was last set, so it holds this task's waker.
    armed: bool,
    seen: u64,
}

/// Why a connection's idle timer ended it.
enum Idle {
    /// No request came within the first period.
    NoRequest,
    /// No request began or ended for a whole period, and none is in flight.
    Idle,
}

impl IdleTimer {
    /// Ready when the connection is to be closed; otherwise the deadline moves on a period
    /// whenever it passes with the connection in use.
    ///
    /// The sleep is polled once each time it is set, which hands the timer this task's
    /// waker; after that, until it fires, a wake-up of the connection only reads its state
    /// (`is_elapsed`, one atomic load) instead of polling it again, which would register the
    /// waker anew each time: about 360 instructions a request (`bench/README.md`). That
    /// relies on the waker staying the same, as a tokio task's does for its whole life (the
    /// accept loop spawns each connection as one).
    #[inline]
    fn poll_idle(
        &mut self,
        cx: &mut std::task::Context<'_>,
        activity: &AtomicU64,
        period: Duration,
    ) -> Poll<Idle> {
        if self.armed && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        self.poll_deadline(cx, activity, period)
    }

    /// The sleep is not armed, or has fired: what `poll_idle` does once a period.
    #[inline(never)]
    fn poll_deadline(
        &mut self,
        cx: &mut std::task::Context<'_>,
        activity: &AtomicU64,
        period: Duration,
    ) -> Poll<Idle> {
        // Each turn starts unarmed (or fired), so the sleep is polled.
        loop {
            // Outside tokio's cooperative budget: with the budget spent, `Sleep::poll` returns
            // Pending without registering the waker (or, before its first poll, creating the
            // timer at all), and `poll_idle`'s check would then wait for ever.
            let sleep = tokio::task::unconstrained(self.sleep.as_mut());
            if std::pin::pin!(sleep).poll(cx).is_pending() {
                self.armed = true;
                return Poll::Pending;
            }
            let now = activity.load(Ordering::Relaxed);
            // `seen` is 0 only until the first period has passed with a request (the count of
            // begins and ends wraps, and could read 0 again).
            if now == 0 && self.seen == 0 {
                return Poll::Ready(Idle::NoRequest);
            }
            if now == self.seen && now & IN_FLIGHT == 0 {
                return Poll::Ready(Idle::Idle);
            }
            self.seen = now;
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + period);
            self.armed = false;
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })
}

/// Binds, loads keys and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Server::bind(config).await?.serve(shutdown).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// An idle timer first polled when the task's cooperative budget is spent still fires:
    /// tokio's `Sleep` then returns Pending without registering anything, and a timer that
    /// took that for armed would only ever read `is_elapsed` = false.
    #[tokio::test]
    async fn an_idle_timer_armed_with_the_budget_spent_still_fires() {
        let period = Duration::from_millis(50);
        let activity = AtomicU64::new(0);
        let mut timer = IdleTimer {
            sleep: Box::pin(tokio::time::sleep(period)),
            armed: false,
            seen: 0,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1_000 {
            tx.send(()).unwrap();
        }
        std::future::poll_fn(|cx| {
            // Each message received takes a unit of the budget; Pending once it is spent.
            let mut received = 0;
            while rx.poll_recv(cx).is_ready() {
                received += 1;
            }
            assert!(received < 1_000, "the budget was never spent");
            assert!(timer.poll_idle(cx, &activity, period).is_pending());
            Poll::Ready(())
        })
        .await;
        let fired = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| timer.poll_idle(cx, &activity, period)),
        )
        .await;
        assert!(
            matches!(fired, Ok(Idle::NoRequest)),
            "the idle timer never fired"
        );
    }
}
