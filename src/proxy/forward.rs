//! Forwarding to the upstream: a pooled hyper-util client with connect and request timeouts,
//! and a request body that streams through while counting bytes against `max_body_bytes`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use hyper_rustls::HttpsConnector;

use super::upstream_tls;
use crate::config::UpstreamConfig;
use crate::problem::Rejection;
use crate::server::tls::TlsError;

/// The body sent upstream: the client's body streamed through the limit, or the body already
/// read (and hashed) for a signature check.
pub(crate) type UpstreamBody = http_body_util::Either<LimitedBody, http_body_util::Full<Bytes>>;

/// The pooled client to the upstream service (plain HTTP, or TLS for an https URL).
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    request_timeout: Duration,
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            client,
            request_timeout: config.request_timeout,
        })
    }

    /// Sends the request and waits for the response head, up to `request_timeout`.
    pub(crate) async fn send(
        &self,
        request: Request<UpstreamBody>,
        limit_hit: Arc<AtomicBool>,
        limit: u64,
    ) -> Result<Response<Incoming>, Rejection> {
        match tokio::time::timeout(self.request_timeout, self.client.request(request)).await {
            Err(_) => Err(Rejection::UpstreamTimeout),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                if limit_hit.load(Ordering::Acquire) {
                    return Err(Rejection::BodyTooLarge(limit));
                }
                tracing::warn!(error = %e, connect = e.is_connect(), "upstream request failed");
                Err(Rejection::UpstreamUnavailable)
            }
        }
    }
}

/// The body is over the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub(crate) struct BodyTooLarge;

/// Streams the client's body, failing once more than `limit` bytes have passed (the upstream
/// then sees an aborted request, never a truncated one that looks complete).
#[derive(Debug)]
pub(crate) struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    limit_hit: Arc<AtomicBool>,
}

impl LimitedBody {
    pub(crate) fn new(inner: Incoming, limit: u64, limit_hit: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            remaining: limit,
            limit_hit,
        }
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.limit_hit.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
