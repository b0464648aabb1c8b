//! A real `redis-server` of the test's own, on a free loopback port, with no persistence. The
//! test can kill it (SIGKILL: no goodbye on the sockets) and start it again on the same port.
//! It is killed when dropped. Tests never touch a Redis they did not start. [`ReplyCutter`]
//! sits in front of one to lose a reply on purpose.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        RedisServer::start_on(free_port()).await
    }

    /// Starts `redis-server` on `port` (one the test picked with [`free_port`]).
    pub async fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer { port, child: None };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers_ping(self.addr()).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago (bound to 127.0.0.1:0 and released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn answers_ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    let read = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await;
    matches!(read, Ok(Ok(_))) && &reply == b"+PONG\r\n"
}

/// A TCP relay in front of a Redis that can swallow one reply and cut that connection: what a
/// client sees when its connection drops after the server applied the command but before the
/// reply arrived.
pub struct ReplyCutter {
    pub port: u16,
    cut_next: Arc<AtomicBool>,
}

impl ReplyCutter {
    pub async fn start(redis: SocketAddr) -> ReplyCutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_next = Arc::new(AtomicBool::new(false));
        let cut = cut_next.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(redis).await else {
                    continue;
                };
                let cut = cut.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut redis_read, mut redis_write) = outbound.into_split();
                    let upstream = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut redis_write).await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match redis_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cut.swap(false, Ordering::SeqCst) {
                            break;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Dropping the halves closes both connections.
                    upstream.abort();
                });
            }
        });
        ReplyCutter { port, cut_next }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The next reply from Redis, on whichever connection, is dropped with its connection.
    pub fn cut_next_reply(&self) {
        self.cut_next.store(true, Ordering::SeqCst);
    }
}
