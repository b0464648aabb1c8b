//! A real JWKS endpoint over HTTP: the test can change the key set, make it fail, and count
//! how often the proxy fetched it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::http::{serve, Received};

#[derive(Clone)]
pub struct JwksServer {
    pub addr: SocketAddr,
    jwks: Arc<Mutex<serde_json::Value>>,
    failing: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(jwks: serde_json::Value) -> JwksServer {
        let jwks = Arc::new(Mutex::new(jwks));
        let failing = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (j, f, n) = (jwks.clone(), failing.clone(), fetches.clone());
        let addr = serve(move |_request: Received| {
            let (j, f, n) = (j.clone(), f.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    return Response::builder()
                        .status(503)
                        .body(Full::new(Bytes::from_static(b"down")))
                        .unwrap();
                }
                let body = j.lock().unwrap().to_string();
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            }
        })
        .await;
        JwksServer {
            addr,
            jwks,
            failing,
            fetches,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    pub fn set(&self, jwks: serde_json::Value) {
        *self.jwks.lock().unwrap() = jwks;
    }

    /// Answer 503 to every fetch from now on (or serve again with `false`).
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}
