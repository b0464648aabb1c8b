//! The load itself: N HTTP/1.1 connections (hyper 1 client connections over tokio, plain or
//! rustls), each a task. Closed loop: a connection sends its next request when the previous
//! answer has arrived, and latency runs from the send. Fixed rate: request i is due at
//! start + i/R (released by a pacer thread), the first free connection takes the next released
//! request, and latency runs from the due time, so time spent queued behind busy connections counts
//! (no coordinated omission, as in wrk2).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, HOST};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::sign::Signer;

/// Bearer tokens, one per request, in file order or at random.
pub struct Tokens {
    pub values: Vec<HeaderValue>,
    pub random: bool,
    pub next: AtomicUsize,
}

impl Tokens {
    fn pick<R: Rng>(&self, rng: &mut R) -> &HeaderValue {
        let i = if self.random {
            rng.gen_range(0..self.values.len())
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % self.values.len()
        };
        &self.values[i]
    }
}

pub struct RunConfig {
    pub addr: SocketAddr,
    /// Host header (authority of the URL).
    pub authority: String,
    pub path_and_query: String,
    pub tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    pub connections: usize,
    pub duration: Duration,
    pub rate: Option<f64>,
    pub method: Method,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub tokens: Option<Tokens>,
    pub signer: Option<Signer>,
    pub new_connection_per_request: bool,
    pub timeout: Duration,
}

/// What one connection task saw.
pub struct Stats {
    pub hist: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub connects: u64,
    pub last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            // 1 µs .. 100 s, 3 significant figures; values in microseconds.
            hist: Histogram::new_with_bounds(1, 100_000_000, 3).expect("histogram bounds"),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            connects: 0,
            last_done: None,
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Stats) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.connects += other.connects;
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// The negotiated TLS parameters of the first connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub version: String,
    pub suite: String,
    pub group: String,
    pub alpn: String,
}

pub struct Outcome {
    pub stats: Stats,
    pub elapsed: Duration,
    /// Fixed rate: requests due before the end that no connection had started by then.
    pub due_not_sent: u64,
    pub sent: u64,
    pub tls_info: Option<TlsInfo>,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(cfg: &RunConfig) -> anyhow::Result<(Sender, Option<TlsInfo>)> {
    let tcp = TcpStream::connect(cfg.addr).await.context("connect")?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    if let Some((connector, name)) = &cfg.tls {
        let stream = connector
            .connect(name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        let conn = stream.get_ref().1;
        let info = TlsInfo {
            version: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            suite: conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default(),
            group: conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default(),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, Some(info)))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, None))
    }
}

fn build_request(cfg: &RunConfig, rng: &mut SmallRng) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(cfg.method.clone())
        .uri(cfg.path_and_query.as_str())
        .body(Full::new(cfg.body.clone()))?;
    let h = req.headers_mut();
    h.insert(HOST, HeaderValue::from_str(&cfg.authority)?);
    for (name, value) in &cfg.headers {
        h.append(name.clone(), value.clone());
    }
    let bearer = cfg.tokens.as_ref().map(|t| t.pick(rng).clone());
    if let Some(signer) = &cfg.signer {
        let sig = HeaderValue::from_str(&signer.header_now(rng))?;
        let name = if bearer.is_some() {
            HeaderName::from_static("x-signature")
        } else {
            AUTHORIZATION
        };
        h.insert(name, sig);
    }
    if let Some(bearer) = bearer {
        h.insert(AUTHORIZATION, bearer);
    }
    Ok(req)
}

/// Sends one request on `slot`'s connection (connecting first when there is none) and reads
/// the whole answer. Returns the status.
async fn one_request(
    cfg: &RunConfig,
    slot: &mut Option<Sender>,
    stats: &mut Stats,
    rng: &mut SmallRng,
) -> anyhow::Result<u16> {
    if slot.as_ref().is_none_or(|s| s.is_closed()) {
        *slot = None;
        let (sender, _) = connect(cfg).await?;
        stats.connects += 1;
        *slot = Some(sender);
    }
    let sender = slot.as_mut().expect("connected above");
    let result = async {
        sender.ready().await.context("connection not ready")?;
        let req = build_request(cfg, rng)?;
        let resp = sender.send_request(req).await.context("request")?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.context("response body")?;
        anyhow::Ok(status)
    }
    .await;
    if result.is_err() || cfg.new_connection_per_request {
        // Dropping the sender closes the connection (a TLS close_notify, then FIN).
        *slot = None;
    }
    result
}

/// The fixed-rate schedule: a plain OS thread (std's sleep has microsecond precision, tokio's
/// timer only 1 ms) releases request i at start + i/R into a queue; a connection that is free
/// takes the next released request. When the pacer wakes late it releases every request that is
/// due at once. Returns how many requests were due before the end.
fn pacer(
    rate: f64,
    start: std::time::Instant,
    end: std::time::Instant,
    tx: tokio::sync::mpsc::UnboundedSender<std::time::Instant>,
) -> u64 {
    let mut i: u64 = 0;
    loop {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if due >= end {
            return i;
        }
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        if tx.send(due).is_err() {
            return i;
        }
        i += 1;
    }
}

type Schedule = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>>>;

async fn worker(
    cfg: Arc<RunConfig>,
    schedule: Option<Schedule>,
    sent: Arc<AtomicU64>,
    mut slot: Option<Sender>,
    start: Instant,
    seed: u64,
) -> Stats {
    let mut stats = Stats::new();
    let mut rng = SmallRng::seed_from_u64(seed);
    let end = start + cfg.duration;
    loop {
        let from = match &schedule {
            Some(schedule) => {
                // The next released request, in order; None once the pacer has stopped.
                let due = schedule.lock().await.recv().await;
                let Some(due) = due else { break };
                if Instant::now() >= end {
                    // Due before the end but not sent by then: counted as backlog.
                    break;
                }
                Instant::from_std(due)
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        sent.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(
            cfg.timeout,
            one_request(&cfg, &mut slot, &mut stats, &mut rng),
        )
        .await;
        let done = Instant::now();
        let micros = (done - from).as_micros().clamp(1, 100_000_000) as u64;
        stats.hist.saturating_record(micros);
        stats.last_done = Some(done);
        match result {
            Ok(Ok(status)) => *stats.status.entry(status).or_default() += 1,
            Ok(Err(e)) => {
                stats.error(format!("{e:#}"));
                // Do not spin on a refused connection in closed-loop mode.
                if cfg.rate.is_none() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(_) => {
                slot = None;
                stats.error(format!("timeout after {:?}", cfg.timeout));
            }
        }
    }
    stats
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<Outcome> {
    let cfg = Arc::new(cfg);
    // One probe connection: fails fast on a wrong address or certificate, and tells the
    // negotiated TLS parameters. Keep-alive mode keeps it as connection 0 and opens the others
    // before the clock starts, so that their handshakes are not in the figures.
    let (first, tls_info) = connect(&cfg).await?;
    let mut initial: Vec<Option<Sender>> = Vec::with_capacity(cfg.connections);
    if cfg.new_connection_per_request {
        drop(first);
        initial.resize_with(cfg.connections, || None);
    } else {
        initial.push(Some(first));
        for _ in 1..cfg.connections {
            initial.push(Some(connect(&cfg).await?.0));
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (schedule, pacer_thread) = match cfg.rate {
        Some(rate) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (s, e) = (start.into_std(), (start + cfg.duration).into_std());
            let thread = std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pacer(rate, s, e, tx))?;
            (Some(Arc::new(tokio::sync::Mutex::new(rx))), Some(thread))
        }
        None => (None, None),
    };
    let seed: u64 = rand::random();
    let tasks: Vec<_> = initial
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            tokio::spawn(worker(
                cfg.clone(),
                schedule.clone(),
                sent.clone(),
                slot,
                start,
                seed.wrapping_add(i as u64),
            ))
        })
        .collect();
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(t.await?);
    }
    let elapsed = stats
        .last_done
        .map(|d| d - start)
        .unwrap_or(cfg.duration)
        .max(cfg.duration);
    let sent = sent.load(Ordering::Relaxed);
    let due_not_sent = match pacer_thread {
        Some(thread) => thread
            .join()
            .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?
            .saturating_sub(sent),
        None => 0,
    };
    Ok(Outcome {
        stats,
        elapsed,
        due_not_sent,
        sent,
        tls_info,
    })
}
