//! A reverse proxy with nothing but hyper in it, built as portcullis is (current-thread tokio,
//! mimalloc, thin LTO, hyper's HTTP/1.1 server and client connections, a stack of idle upstream
//! connections): what hyper itself costs per request, to hold portcullis's own work against
//! (`bench/README.md`, "Hot path, twelfth pass"). Not a product: it panics on any error.
//!
//!   bare-proxy LISTEN UPSTREAM [timer|auto]
//!
//! `timer` arms hyper's header-read timeout as portcullis does; `auto` also serves through
//! hyper-util's auto (HTTP/1.1 or HTTP/2) connection, as portcullis does.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Pool = Arc<Mutex<Vec<client::SendRequest<Incoming>>>>;

async fn forward(
    pool: Pool,
    upstream: &'static str,
    mut request: Request<Incoming>,
) -> Response<Incoming> {
    let mut sender = loop {
        let idle = pool.lock().unwrap().pop();
        match idle {
            Some(sender) if !sender.is_closed() => break sender,
            Some(_) => continue,
            None => {
                let stream = TcpStream::connect(upstream).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (sender, connection) = client::Builder::new()
                    .writev(false)
                    .handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
                tokio::task::spawn_local(async move {
                    let _ = connection.await;
                });
                break sender;
            }
        }
    };
    let target = request.uri().path_and_query().cloned().unwrap();
    *request.uri_mut() = target.into();
    let _ = sender.ready().await;
    let response = sender.send_request(request).await.unwrap();
    pool.lock().unwrap().push(sender);
    response
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args[1].clone();
    let upstream: &'static str = Box::leak(args[2].clone().into_boxed_str());
    let mode = args.get(3).cloned().unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&listen).await.unwrap();
        let pool: Pool = Pool::default();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let pool = pool.clone();
            let mode = mode.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |request| {
                    let pool = pool.clone();
                    async move { Ok::<_, Infallible>(forward(pool, upstream, request).await) }
                });
                let io = TokioIo::new(stream);
                if mode == "auto" {
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .writev(false);
                    let _ = builder.serve_connection(io, service).await;
                    return;
                }
                let mut builder = server::Builder::new();
                builder.writev(false);
                if mode == "timer" {
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10));
                }
                let _ = builder.serve_connection(io, service).await;
            });
        }
    });
}
