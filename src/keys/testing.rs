//! Test helpers shared by the unit tests of `keys` and `auth::jwt`: the integration tests' key
//! module, a tiny JWKS server on 127.0.0.1 that counts fetches and can change what it serves,
//! and issuer configurations.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::config::{IssuerConfig, JwksSource, JwtConfig, Secret};

#[path = "../../tests/support/keys.rs"]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod test_keys;

#[allow(unused_imports)]
pub(crate) use test_keys::alg_name;
pub(crate) use test_keys::{jwks, sign_raw, TestKey};

/// What the server answers.
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

/// A JWKS endpoint on 127.0.0.1 that counts the requests it answers.
pub(crate) struct JwksServer {
    pub(crate) url: String,
    reply: Arc<Mutex<Reply>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub(crate) async fn start(body: &serde_json::Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let reply = Arc::new(Mutex::new(Reply {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (r, f) = (reply.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, f) = (r.clone(), f.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut read = 0;
                    while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    let (status, body, delay) = {
                        let r = r.lock().unwrap();
                        (r.status, r.body.clone(), r.delay)
                    };
                    tokio::time::sleep(delay).await;
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self {
            url,
            reply,
            fetches,
            task,
        }
    }

    pub(crate) fn serve(&self, status: u16, body: &str) {
        let mut r = self.reply.lock().unwrap();
        r.status = status;
        r.body = body.to_owned();
    }

    pub(crate) fn delay(&self, delay: Duration) {
        self.reply.lock().unwrap().delay = delay;
    }

    pub(crate) fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

pub(crate) const ISSUER: &str = "https://issuer.test";

/// An issuer with every algorithm allowed, no audiences, default rules, and this JWKS source.
pub(crate) fn issuer(jwks: Option<JwksSource>, secrets: &[&TestKey]) -> IssuerConfig {
    IssuerConfig {
        issuer: ISSUER.into(),
        audiences: Vec::new(),
        algorithms: vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::PS256,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
            Algorithm::HS256,
        ],
        jwks,
        secrets: secrets
            .iter()
            .map(|k| {
                (
                    k.kid().to_owned(),
                    Secret::new(k.secret().unwrap().to_vec()),
                )
            })
            .collect(),
        permissions_claim: "permissions".into(),
        required_claims: vec!["sub".into(), "exp".into(), "iat".into()],
        max_lifetime: Duration::from_secs(24 * 3600),
        jwks_refresh: Duration::from_secs(300),
        jwks_min_refetch: Duration::from_secs(30),
        jwks_max_stale: Duration::from_secs(24 * 3600),
    }
}

pub(crate) fn url(server: &JwksServer) -> Option<JwksSource> {
    Some(JwksSource::Url(server.url.clone()))
}

/// Writes `body` to a temporary JWKS file; keep the directory alive while it is used.
pub(crate) fn jwks_file(body: &str) -> (tempfile::TempDir, Option<JwksSource>) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("jwks.json");
    std::fs::write(&path, body).unwrap();
    (dir, Some(JwksSource::File(path)))
}

pub(crate) fn jwt_config(issuers: Vec<IssuerConfig>, verified_cache: u64) -> JwtConfig {
    JwtConfig {
        leeway: Duration::from_secs(30),
        verified_cache,
        issuers,
    }
}
