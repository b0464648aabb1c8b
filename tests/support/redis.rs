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
    /// More `redis-server` arguments, kept for restarts.
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    ///
    /// The port was free when picked, but until redis-server binds it another socket of the
    /// machine can take it (a connection's local port, or a port another test picked): then this
    /// redis-server exits, and another port is tried.
    pub async fn start() -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                extra_args: Vec::new(),
            };
            match server.try_spawn().await {
                Ok(()) => return server,
                Err(why) => failures.push(why),
            }
        }
        panic!("redis-server did not start: {failures:?}");
    }

    /// Starts `redis-server` on `port` (one the test picked with [`free_port`]).
    pub async fn start_on(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[]).await
    }

    /// Starts `redis-server` on `port` with more arguments (`["--maxmemory", "64mb"]`).
    pub async fn start_with(port: u16, extra_args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port,
            child: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `CONFIG SET name value` (an inline command: neither may contain spaces).
    pub async fn config_set(&self, name: &str, value: &str) {
        let mut stream = TcpStream::connect(self.addr()).await.unwrap();
        stream
            .write_all(format!("CONFIG SET {name} {value}\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"+OK\r\n", "CONFIG SET {name} {value}");
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
        if let Err(why) = self.try_spawn().await {
            panic!("{why}");
        }
    }

    /// Runs redis-server on `self.port` and waits until it answers, as this process's child
    /// (not another test's server on the same port).
    async fn try_spawn(&mut self) -> Result<(), String> {
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
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server (is it installed?): {e}"));
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited at start ({status}): the port was taken",
                    self.port
                ));
            }
            if answers_ping(self.addr()).await && server_pid(self.addr()).await == Some(pid) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer PING",
            self.port
        ))
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

/// The `process_id` that `INFO server` gives, if a Redis answers at `addr`.
async fn server_pid(addr: SocketAddr) -> Option<u32> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(b"INFO server\r\n").await.ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // A bulk string: `$<length>\r\n<text>\r\n`.
    let read_all = async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            let (head, body) = text.split_once("\r\n")?;
            let length: usize = head.strip_prefix('$')?.parse().ok()?;
            if body.len() >= length + 2 {
                return Some(body[..length].to_owned());
            }
        }
    };
    let info = tokio::time::timeout(Duration::from_secs(1), read_all)
        .await
        .ok()??;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
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

/// A port `p` such that both `p` and `p + 10000` (a cluster node's bus port) were free a moment
/// ago. Both lie below the kernel's ephemeral range (32768 and up), so that no connection on
/// the machine can take either as its local port before the node binds it.
pub fn free_cluster_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    // Spread over the range by process id, so that test binaries running at once start apart.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 10_000 + (std::process::id() % 500) as u16 * 20;
    for _ in 0..2_000 {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % 10_000;
        let port = 10_000 + (base - 10_000 + offset) % 10_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn spawn_redis(args: &[&str]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-server (is it installed?): {e}"))
}

/// `redis-cli -p port args...`, its stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_for_ping(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if answers_ping(addr).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis on port {port} did not answer PING");
}

/// Kills every child it holds when dropped.
struct Children(Vec<(u16, Child)>);

impl Children {
    fn kill(&mut self, port: u16) {
        if let Some(i) = self.0.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.0.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real Redis Cluster of three masters (no replicas) on loopback, with its node files in a
/// temporary directory. Killed when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    /// How long `start` took, from the first spawn to `cluster_state:ok` on every node.
    pub started_in: Duration,
    _children: Children,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let begin = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_cluster_port()).collect();
        let mut children = Children(Vec::new());
        for &port in &ports {
            let p = port.to_string();
            let nodes = dir.path().join(format!("nodes-{port}.conf"));
            let child = spawn_redis(&[
                "--port",
                &p,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                nodes.to_str().unwrap(),
                "--dir",
                dir.path().to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            children.0.push((port, child));
        }
        for &port in &ports {
            wait_for_ping(port).await;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(nodes.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("cannot run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = ports
                .iter()
                .all(|&p| redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok"));
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        RedisCluster {
            ports,
            started_in: begin.elapsed(),
            _children: children,
            _dir: dir,
        }
    }

    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://{}", nodes.join(","))
    }
}

/// One master, one replica (`--replicaof`) and three sentinels watching them as `mymaster`
/// (quorum 2, down after 1 s, failover timeout 5 s), on loopback. Killed when dropped.
pub struct RedisSentinel {
    pub master: u16,
    pub replica: u16,
    pub sentinels: Vec<u16>,
    /// How long `start` took, until every sentinel knew the replica and the other sentinels.
    pub started_in: Duration,
    children: Children,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        let begin = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let (master, replica) = (free_port(), free_port());
        let mut children = Children(Vec::new());
        let base = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.path().to_str().unwrap(),
        ];
        let m = master.to_string();
        let mut args = vec!["--port", &m];
        args.extend(base);
        children.0.push((master, spawn_redis(&args)));
        wait_for_ping(master).await;
        let r = replica.to_string();
        let mut args = vec!["--port", &r, "--replicaof", "127.0.0.1", &m];
        args.extend(base);
        children.0.push((replica, spawn_redis(&args)));
        wait_for_ping(replica).await;
        let sentinels: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for &port in &sentinels {
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel resolve-hostnames no\n\
                     sentinel monitor mymaster 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 5000\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let child = spawn_redis(&[conf.to_str().unwrap(), "--sentinel"]);
            children.0.push((port, child));
        }
        for &port in &sentinels {
            wait_for_ping(port).await;
        }
        // A failover needs the sentinels to know each other (they find out through hello
        // messages every 2 s) and the replica to be in sync.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = sentinels.iter().all(|&s| {
                let info = redis_cli(s, &["sentinel", "master", "mymaster"]);
                let field = |name: &str| {
                    let lines: Vec<&str> = info.lines().collect();
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            }) && redis_cli(replica, &["info", "replication"])
                .contains("master_link_status:up");
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "the sentinels did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        RedisSentinel {
            master,
            replica,
            sentinels,
            started_in: begin.elapsed(),
            children,
            _dir: dir,
        }
    }

    /// `redis-sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/0?sentinelServiceName=mymaster`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-sentinel://{}/0?sentinelServiceName=mymaster",
            nodes.join(",")
        )
    }

    /// SIGKILL the current master.
    pub fn kill_master(&mut self) {
        self.children.kill(self.master);
    }

    /// The port of the master the sentinels name now.
    pub fn current_master(&self) -> Option<u16> {
        let reply = redis_cli(
            self.sentinels[0],
            &["sentinel", "get-master-addr-by-name", "mymaster"],
        );
        reply.lines().nth(1)?.trim().parse().ok()
    }
}
