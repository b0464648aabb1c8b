//! A real upstream service: answers every request with a JSON echo of what it received, and
//! keeps the requests for the test to inspect. `x-test-delay-ms` makes it answer late.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::http::{serve, Received};

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// Requests that reached the upstream, counted before any delay.
    arrived: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (log, arrivals) = (received.clone(), arrived.clone());
        let addr = serve(move |request: Received| {
            let log = log.clone();
            arrivals.fetch_add(1, Ordering::SeqCst);
            async move {
                let delay = request
                    .header("x-test-delay-ms")
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let echo = serde_json::json!({
                    "method": request.method,
                    "target": request.target,
                    "body_len": request.body.len(),
                });
                log.lock().unwrap().push(request);
                Response::builder()
                    .header("content-type", "application/json")
                    .header("x-upstream", "echo")
                    .body(Full::new(Bytes::from(echo.to_string())))
                    .unwrap()
            }
        })
        .await;
        Upstream {
            addr,
            received,
            arrived,
        }
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The last request received (panics when none came).
    pub fn last(&self) -> Received {
        self.received()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// Requests answered so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Requests that reached the upstream so far, answered or still waiting out their delay.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }
}
