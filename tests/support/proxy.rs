//! A proxy started in-process (the library's own `Server`), on free loopback ports, with a
//! temporary folder for key files and its own environment for secrets. A panic on any of the
//! runtime's worker threads (where the proxy serves) fails the test at `stop`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use portcullis::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_worker_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("tokio-runtime-worker") {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

/// The number of panics seen on runtime worker threads so far (in this test binary).
pub fn worker_panics() -> usize {
    WORKER_PANICS.load(Ordering::SeqCst)
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A config with both listeners on free loopback ports, the given upstream and `rest`.
pub fn config_text(upstream: SocketAddr, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ndrain_timeout = \"5s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstream]\nurl = \"http://{upstream}\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"2s\"\n\n{rest}"
    )
}

impl TestProxy {
    pub async fn start(toml: &str, dir: &Path, env: &[(&str, &str)]) -> TestProxy {
        watch_worker_panics();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::parse(toml, dir, &|name| env.get(name).cloned())
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
        let server = portcullis::Server::bind(config).await.unwrap();
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestProxy {
            addr,
            admin,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Stops the proxy, waits for its drain, and fails the test if a worker thread panicked.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        assert_eq!(worker_panics(), 0, "a proxy worker thread panicked");
    }
}

/// A `portcullis proxy` process of the real binary, for tests that need separate processes.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Every line the process logged so far (JSON, one object a line).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `toml` to a temporary file and starts the binary on it with `env`; waits until
    /// it logs its listen addresses.
    pub fn spawn(toml: &str, env: &[(&str, &str)]) -> ProxyProcess {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("portcullis.toml");
        std::fs::write(&file, toml).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command
            .args(["--log-format", "json", "proxy", "--config"])
            .arg(&file)
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log_sink = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_sink.lock().unwrap().push(line.clone());
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        let f = &v["fields"];
                        if let (Some(l), Some(a)) = (f["listen"].as_str(), f["admin"].as_str()) {
                            let _ = tx.send((l.parse().unwrap(), a.parse().unwrap()));
                            sent = true;
                        }
                    }
                }
            }
        });
        let (addr, admin) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the proxy process did not start");
        ProxyProcess {
            addr,
            admin,
            logs,
            child,
            _dir: dir,
        }
    }

    /// The process id, to read its CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis store may still be connecting when the proxy starts (its requests then get 503):
/// waits until the proxy's `/readyz` (at `readyz_url`) says it is ready.
pub async fn wait_ready(readyz_url: &str) {
    let started = std::time::Instant::now();
    while super::http::get(readyz_url, &[]).await.status != 200 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "not ready within 5s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
