//! Graceful shutdown of the connections being served: when the drain begins, every connection
//! is told to finish the request it is on and close, and [`Drain::shutdown`] waits until all
//! of them have.
//!
//! hyper-util's `GracefulShutdown` does the same with a `watch` channel whose `changed()`
//! future every connection polls each time it is woken: a few hundred instructions on every
//! request (`bench/README.md`, "Hot path, twelfth pass"). Here a connection checks one atomic
//! flag per poll and only takes a lock when it starts, when its task's waker changes (never,
//! for a tokio task) and when it ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// The connections of one server, and the switch that tells them to close.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    /// The waker of every connection that has been polled, by connection id.
    wakers: Mutex<HashMap<u64, Waker>>,
    next_id: AtomicU64,
    live: AtomicUsize,
    /// Notified when the last connection ends.
    idle: Notify,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A place for one connection, taken as it is accepted: [`Drain::shutdown`] waits for it
    /// from now until it is dropped (a TLS handshake in progress counts).
    pub(crate) fn watcher(&self) -> Watcher {
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        Watcher {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            shared: self.shared.clone(),
        }
    }

    /// Serves `conn` under this drain (a watcher taken and used at once).
    pub(crate) fn watch<C: GracefulConnection>(&self, conn: C) -> Watched<C> {
        self.watcher().watch(conn)
    }

    /// How many connections are being served.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Tells every connection to close once its request is answered, and waits until all have
    /// ended.
    pub(crate) async fn shutdown(self) {
        self.begin();
        let shared = &self.shared;
        loop {
            let idle = shared.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so that the last connection's notice
            // between the two is not lost.
            idle.as_mut().enable();
            if shared.live.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drain {
    /// Sets the flag and wakes every connection, once.
    fn begin(&self) {
        if self.shared.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        let wakers: Vec<Waker> = lock(&self.shared.wakers).values().cloned().collect();
        for waker in wakers {
            waker.wake();
        }
    }
}

/// A drain dropped without [`Drain::shutdown`] (its server's future was cancelled) still tells
/// the connections to close, as hyper-util's did when its sender was dropped.
impl Drop for Drain {
    fn drop(&mut self) {
        self.begin();
    }
}

/// One connection's place in a [`Drain`].
#[derive(Debug)]
pub(crate) struct Watcher {
    id: u64,
    shared: Arc<Shared>,
}

impl Watcher {
    /// Serves `conn`: it runs as it would alone until the drain begins, then is shut down
    /// gracefully (hyper answers the request in flight and closes).
    pub(crate) fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        Watched {
            conn: Box::pin(conn),
            watcher: self,
            waker: None,
            shut_down: false,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.shared.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// A connection served under a [`Drain`].
pub(crate) struct Watched<C> {
    conn: Pin<Box<C>>,
    watcher: Watcher,
    /// The waker registered with the drain, kept to see whether the task's waker changed.
    waker: Option<Waker>,
    shut_down: bool,
}

impl<C: GracefulConnection> Watched<C> {
    /// Shuts this one connection down gracefully, as the drain would: the request in flight
    /// is answered (HTTP/2: the streams already open), then the connection closes.
    pub(crate) fn shut_down(self: Pin<&mut Self>) {
        self.get_mut().begin_shutdown();
    }

    fn begin_shutdown(&mut self) {
        if !self.shut_down {
            self.shut_down = true;
            self.conn.as_mut().graceful_shutdown();
        }
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.shut_down {
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                let waker = cx.waker().clone();
                let shared = &this.watcher.shared;
                lock(&shared.wakers).insert(this.watcher.id, waker.clone());
                this.waker = Some(waker);
            }
            // Read after the waker is registered: a drain that begins after this read wakes
            // the waker above, so the next poll sees it.
            if this.watcher.shared.draining.load(Ordering::Acquire) {
                this.begin_shutdown();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.waker.is_some() {
            lock(&self.watcher.shared.wakers).remove(&self.watcher.id);
        }
        // Then the watcher is dropped, which counts the connection out.
    }
}

impl<C> std::fmt::Debug for Watched<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("id", &self.watcher.id)
            .field("shut_down", &self.shut_down)
            .finish()
    }
}

/// The map holds wakers only; a panic while it was locked leaves nothing half-done in it.
fn lock(wakers: &Mutex<HashMap<u64, Waker>>) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
    wakers.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{oneshot, Notify};

    use super::*;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n";

    /// Serves one HTTP/1.1 connection under `drain` on a loopback port; each request waits for
    /// `release` (when given) before it is answered "done". Sends a notice on `entered` as the
    /// first request arrives.
    async fn serve(
        drain: &Drain,
        release: Option<Arc<Notify>>,
        entered: oneshot::Sender<()>,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let watcher = drain.watcher();
        let entered = Arc::new(Mutex::new(Some(entered)));
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let service = service_fn(move |_request| {
                let release = release.clone();
                let entered = entered.clone();
                async move {
                    if let Some(tx) = entered.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    if let Some(release) = release {
                        release.notified().await;
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("done"))))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service);
            let _ = watcher.watch(conn).await;
        });
        addr
    }

    /// Connects to `addr` and sends [`REQUEST`]; returns once the service has it.
    async fn send_request(addr: std::net::SocketAddr, entered: oneshot::Receiver<()>) -> TcpStream {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(REQUEST).await.unwrap();
        entered.await.unwrap();
        client
    }

    async fn read_to_close(client: &mut TcpStream) -> String {
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut seen))
            .await
            .expect("the connection was not closed within 5 s")
            .unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_request_in_flight_then_the_connection_closes() {
        let drain = Drain::new();
        let release = Arc::new(Notify::new());
        let (entered_tx, entered) = oneshot::channel();
        let addr = serve(&drain, Some(release.clone()), entered_tx).await;
        let mut client = send_request(addr, entered).await;

        let shutdown = tokio::spawn(drain.shutdown());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !shutdown.is_finished(),
            "shutdown returned while a request was in flight"
        );

        release.notify_one();
        let answer = read_to_close(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown did not return after the last connection ended")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_an_idle_keep_alive_connection() {
        let drain = Drain::new();
        let (entered_tx, entered) = oneshot::channel();
        let addr = serve(&drain, None, entered_tx).await;
        let mut client = send_request(addr, entered).await;
        // Read the answer; the connection then sits idle, kept alive.
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        while !seen.ends_with(b"done") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            seen.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain.count(), 1);

        // Only the wake-up from the drain makes the idle connection look again.
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("shutdown did not return: the idle connection was not closed");
        assert_eq!(read_to_close(&mut client).await, "");
    }

    #[tokio::test]
    async fn a_dropped_drain_still_closes_its_connections() {
        let drain = Drain::new();
        let (entered_tx, entered) = oneshot::channel();
        let addr = serve(&drain, None, entered_tx).await;
        let mut client = send_request(addr, entered).await;
        drop(drain);
        let answer = read_to_close(&mut client).await;
        assert!(answer.ends_with("done"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_with_no_connections_returns_at_once() {
        let drain = Drain::new();
        let watcher = drain.watcher();
        assert_eq!(drain.count(), 1);
        drop(watcher);
        assert_eq!(drain.count(), 0);
        tokio::time::timeout(Duration::from_secs(1), drain.shutdown())
            .await
            .expect("shutdown waited with nothing to wait for");
    }
}
