//! The `portcullis` binary as an operator runs it: check-config, exit codes, and SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::http::get;
use support::pki::{Ca, Usage};
use support::proxy::{config_text, ProxyProcess};
use support::upstream::Upstream;

fn portcullis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

/// Writes `text` to `name` in `dir` and runs `check-config` on it: the exit code and stdout.
fn check_config(dir: &std::path::Path, name: &str, text: &str) -> (Option<i32>, String) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let out = portcullis()
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Writes `text` to `name` in `dir` and runs `proxy --config` on it, for a configuration the
/// proxy must refuse: the exit code and stderr. A proxy still running after 20 s is killed and
/// fails the test.
fn proxy_refuses(dir: &std::path::Path, name: &str, text: &str) -> (Option<i32>, String) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let mut child = portcullis()
        .args(["proxy", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the proxy started on an invalid configuration:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_config_is_accepted_by_check_config() {
    let out = portcullis()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(!stdout.contains("warning"), "{stdout}");
}

#[test]
fn check_config_reports_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout) = check_config(
        dir.path(),
        "bad.toml",
        r#"
[server]
listen = "not-an-address"

[upstream]
url = "http://127.0.0.1:8000"
connect_timeout = "soon"

[[routes]]
name = "api"
path_prefix = "/api"
methods = ["get"]
"#,
    );
    assert_eq!(code, Some(64), "{stdout}");
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 3, "{stdout}");
    assert!(errors[0].starts_with("error: server.listen: "), "{stdout}");
    assert!(
        errors[1].starts_with("error: upstream.connect_timeout: "),
        "{stdout}"
    );
    assert!(
        errors[2].starts_with("error: routes[0].methods[0]: "),
        "{stdout}"
    );
}

#[test]
fn unknown_keys_and_short_secrets_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unknown.toml");
    std::fs::write(
        &file,
        "[upstream]\nurl = \"http://127.0.0.1:1\"\nconect_timeout = \"1s\"\n",
    )
    .unwrap();
    let out = portcullis()
        .args(["proxy", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("conect_timeout"));

    std::fs::write(dir.path().join("short.secret"), "too-short\n").unwrap();
    let (code, stdout) = check_config(
        dir.path(),
        "short.toml",
        r#"
[upstream]
url = "http://127.0.0.1:1"
[[jwt.issuers]]
issuer = "https://issuer.test"
algorithms = ["HS256"]
secrets = [{ kid = "k", file = "short.secret" }]
"#,
    );
    assert_eq!(code, Some(64), "{stdout}");
    assert!(
        stdout.contains("error: jwt.issuers[0].secrets[0]: the secret is 9 bytes"),
        "{stdout}"
    );
}

#[test]
fn values_that_would_break_every_request_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A token with a space before its newline loads, and then no client can ever send it.
    std::fs::write(
        dir.path().join("admin.token"),
        "0123456789abcdef0123456789abcdef \n",
    )
    .unwrap();
    let text = r#"
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

[upstream]
url = "http://127.0.0.1:1"

[store]
on_error = "allow"
timeout = "0s"

[[routes]]
name = "bulk"
path_prefix = "/"
rate_limit = { requests = 2000000, per = "1s", key = "ip" }
"#;
    let (code, stdout) = check_config(dir.path(), "breaks.toml", text);
    assert_eq!(code, Some(64), "{stdout}");
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        [
            "error: admin.token_file: the admin token starts or ends with whitespace, which no Authorization header can carry; remove it",
            "error: store.timeout: must be more than 0s",
            "error: routes[0].rate_limit.requests: route \"bulk\" allows 2000000 requests per 1s: more than one a microsecond, the finest rate the limiter keeps",
        ],
        "{stdout}"
    );
}

#[test]
fn tls_files_the_proxy_cannot_load_are_configuration_errors_of_both_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("portcullis test CA");
    ca.write(d, "ca");
    ca.issue("localhost", &["localhost"], &[], Usage::Server, false)
        .write(d, "tls");
    let (_, other_key) = ca
        .issue("other", &["other"], &[], Usage::Server, false)
        .write(d, "other");
    std::fs::write(d.join("garbage.pem"), "this is not PEM\n").unwrap();
    std::fs::write(d.join("empty.crt"), "").unwrap();
    let other_key = other_key.display().to_string();
    let config = |tls: &str, upstream: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{tls}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\n{upstream}\n"
        )
    };
    let server_tls = |cert: &str, key: &str, client_ca: &str| {
        format!("[server.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{client_ca}")
    };
    let plain = "url = \"http://127.0.0.1:1\"";

    // The good set is accepted, so each case below fails for its one bad file.
    let good = config(
        &server_tls("tls.crt", "tls.key", "client_ca = \"ca.crt\"\n"),
        "url = \"https://127.0.0.1:1\"\nca = \"ca.crt\"",
    );
    let (code, stdout) = check_config(d, "good.toml", &good);
    assert_eq!(code, Some(0), "{stdout}");

    for (name, text, want) in [
        (
            "cert.toml",
            config(&server_tls("garbage.pem", "tls.key", ""), plain),
            "server.tls.cert: ".to_owned(),
        ),
        (
            "key.toml",
            config(&server_tls("tls.crt", "garbage.pem", ""), plain),
            "server.tls.key: ".to_owned(),
        ),
        (
            "mismatch.toml",
            config(&server_tls("tls.crt", "other.key", ""), plain),
            format!(
                "server.tls: the private key in {other_key} does not match the certificate in "
            ),
        ),
        (
            "client-ca.toml",
            config(
                &server_tls("tls.crt", "tls.key", "client_ca = \"empty.crt\"\n"),
                plain,
            ),
            "server.tls.client_ca: ".to_owned(),
        ),
        (
            "upstream-ca.toml",
            config("", "url = \"https://127.0.0.1:1\"\nca = \"garbage.pem\""),
            "upstream.ca: ".to_owned(),
        ),
    ] {
        let (code, stdout) = check_config(d, name, &text);
        assert_eq!(code, Some(64), "{name}: {stdout}");
        let errors: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{name}: {stdout}");
        assert!(
            errors[0].starts_with(&format!("error: {want}")),
            "{name}: {stdout}"
        );
        // The upstream's CA is not the serving certificate.
        assert!(!errors[0].contains("serving"), "{name}: {stdout}");

        let (code, stderr) = proxy_refuses(d, name, &text);
        assert_eq!(code, Some(64), "{name}: {stderr}");
        assert!(stderr.contains(&format!("  {want}")), "{name}: {stderr}");
    }
}

#[test]
fn a_redis_url_the_store_cannot_parse_is_a_configuration_error_of_both_commands() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        // A sentinel URL names the service it asks the sentinels for.
        "redis-sentinel://127.0.0.1:26379/0",
        "redis://127.0.0.1:abc/0",
    ] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"http://127.0.0.1:1\"\n\
             [store]\nbackend = \"redis\"\nurl = \"{url}\"\n"
        );
        let (code, stdout) = check_config(dir.path(), "redis.toml", &text);
        assert_eq!(code, Some(64), "{url}: {stdout}");
        assert!(
            stdout.contains("error: store.url: the store url is invalid: "),
            "{url}: {stdout}"
        );
        let (code, stderr) = proxy_refuses(dir.path(), "redis.toml", &text);
        assert_eq!(code, Some(64), "{url}: {stderr}");
        assert!(stderr.contains("  store.url: "), "{url}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_request_lets_it_finish_then_exits_zero() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let text = config_text(
        upstream.addr,
        "[[routes]]\nname = \"all\"\npath_prefix = \"/\"\n",
    )
    .replace("request_timeout = \"2s\"", "request_timeout = \"10s\"");
    std::fs::write(&file, text).unwrap();
    let mut child = portcullis()
        .args(["--log-format", "json", "proxy", "--config"])
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The listen address is in the first log line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listen = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("proxy did not start");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(listen) = v["fields"]["listen"].as_str() {
            break listen.to_owned();
        }
    };

    let url = format!("http://{listen}/slow");
    let slow = tokio::spawn(async move { get(&url, &[("x-test-delay-ms", "1500")]).await });
    // In flight: through the proxy and waiting at the upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while upstream.arrived() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        upstream.count(),
        0,
        "the upstream answered before the delay"
    );
    let pid = child.id().to_string();
    // sh's built-in kill: no procps needed on a bare machine.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status();
    assert!(kill.unwrap().success());

    let response = slow.await.unwrap();
    assert_eq!(
        response.status, 200,
        "the in-flight request was cut: {}",
        response.body
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs: Vec<String> = rx.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("draining")), "{logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_log_lines_name_the_request_but_never_the_credential() {
    let upstream = Upstream::start().await;
    let text = config_text(
        upstream.addr,
        r#"
[[jwt.issuers]]
issuer = "https://internal.test"
algorithms = ["HS256"]
secrets = [{ kid = "k", env = "HS" }]

[[routes]]
name = "api"
path_prefix = "/api"
require = ["jwt"]
"#,
    );
    // One worker thread: the current-thread runtime path of the binary.
    let text = text.replace("threads = 2", "threads = 1");
    let proxy = ProxyProcess::spawn(&text, &[("HS", "an-hs256-secret-of-at-least-32-bytes!!")]);
    let token = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ1In0.c2VjcmV0LXNpZ25hdHVyZS1ieXRlcw";
    let response = get(
        &proxy.url("/api/x"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-request-id", "req-log-1"),
        ],
    )
    .await;
    assert_eq!(response.status, 401);
    // The line is written before the response; give the reader thread a moment.
    let mut line = None;
    for _ in 0..50 {
        line = proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("req-log-1"))
            .cloned();
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("no log line for the rejection");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["request_id"], "req-log-1");
    assert_eq!(v["fields"]["route"], "api");
    assert_eq!(v["fields"]["code"], response.code());
    let all = proxy.logs.lock().unwrap().join("\n");
    for part in token.split('.') {
        assert!(
            !all.contains(part),
            "the log holds part of the token: {part}"
        );
    }
}

/// User + system CPU time of a process, in clock ticks (USER_HZ, 100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Share of one core the process used over `over`, while nothing is sent to it.
async fn idle_cpu_share(pid: u32, over: Duration) -> f64 {
    let before = cpu_ticks(pid);
    tokio::time::sleep(over).await;
    (cpu_ticks(pid) - before) as f64 / 100.0 / over.as_secs_f64()
}

/// In how many of `samples` looks, `every` apart, some thread of the process was running or
/// ready to run (state `R` in `/proc/PID/task/TID/stat`). A thread that spins stays `R` while a
/// busy machine keeps it off the core, so unlike its CPU share this does not depend on what
/// else runs beside the test.
async fn runnable_samples(pid: u32, samples: u32, every: Duration) -> u32 {
    let mut runnable = 0;
    for _ in 0..samples {
        let any_running = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("stat")).ok())
            .any(|stat| stat[stat.rfind(')').unwrap() + 2..].starts_with('R'));
        runnable += u32::from(any_running);
        tokio::time::sleep(every).await;
    }
    runnable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_keeps_the_one_worker_awake_and_it_still_serves() {
    let upstream = Upstream::start().await;
    let text = config_text(
        upstream.addr,
        "[[routes]]\nname = \"public\"\npath_prefix = \"/\"\nrequire = []\n",
    )
    .replace("threads = 2", "threads = 1");
    let quiet = ProxyProcess::spawn(&text, &[]);
    let busy = ProxyProcess::spawn(
        &text.replace("threads = 1", "threads = 1\nbusy_poll = true"),
        &[],
    );
    for proxy in [&quiet, &busy] {
        assert_eq!(get(&proxy.url("/x"), &[]).await.status, 200);
    }
    // Busy polling keeps the worker running or ready to run all the time; without it an idle
    // proxy sleeps in epoll_wait and uses next to no CPU.
    let every = Duration::from_millis(50);
    let (quiet_share, quiet_runnable, busy_runnable) = tokio::join!(
        idle_cpu_share(quiet.pid(), Duration::from_secs(1)),
        runnable_samples(quiet.pid(), 20, every),
        runnable_samples(busy.pid(), 20, every)
    );
    assert!(
        busy_runnable >= 18,
        "busy_poll: running or ready in only {busy_runnable} of 20 looks"
    );
    assert!(
        quiet_runnable <= 4,
        "no busy_poll: running or ready in {quiet_runnable} of 20 looks"
    );
    assert!(
        quiet_share < 0.1,
        "no busy_poll: {quiet_share:.2} of a core"
    );
    for proxy in [&quiet, &busy] {
        assert_eq!(get(&proxy.url("/y"), &[]).await.status, 200);
    }
}

#[test]
fn busy_poll_needs_one_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout) = check_config(
        dir.path(),
        "busy.toml",
        "[server]\nthreads = 2\nbusy_poll = true\n\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n",
    );
    assert_eq!(code, Some(64), "{stdout}");
    assert!(
        stdout.contains("error: server.busy_poll: needs threads = 1 (threads is 2)"),
        "{stdout}"
    );
}

/// The numbers of the file descriptors the process has open.
fn open_fds(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The descriptor limit that leaves the process exactly `free` descriptors to open (a new
/// descriptor takes the lowest free number, which must be below the limit).
fn limit_leaving(pid: u32, free: u64) -> u64 {
    let open = open_fds(pid);
    (0..)
        .find(|&limit| limit - open.iter().filter(|&&fd| fd < limit).count() as u64 == free)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_neither_listener_spins_and_both_recover() {
    let upstream = Upstream::start().await;
    let text = config_text(
        upstream.addr,
        "[[routes]]\nname = \"public\"\npath_prefix = \"/\"\nrequire = []\n",
    )
    .replace(
        "drain_timeout = \"5s\"",
        "drain_timeout = \"5s\"\nheader_read_timeout = \"30s\"",
    );
    let proxy = ProxyProcess::spawn(&text, &[]);
    assert_eq!(get(&proxy.url("/x"), &[]).await.status, 200);
    let every = Duration::from_millis(50);
    // The soft limit the process started with, put back after each listener's turn.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap();
    for listener in [proxy.admin, proxy.addr] {
        // Room for two more descriptors: two connections are accepted and held, the rest wait
        // in the backlog, and every accept of them fails with EMFILE.
        let limit = limit_leaving(proxy.pid(), 2);
        let set = Command::new("prlimit")
            .arg(format!("--pid={}", proxy.pid()))
            .arg(format!("--nofile={limit}:"))
            .status()
            .unwrap();
        assert!(set.success(), "prlimit failed");
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(tokio::net::TcpStream::connect(listener).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let below = |limit: u64| {
            open_fds(proxy.pid())
                .iter()
                .filter(|&&fd| fd < limit)
                .count()
        };
        assert_eq!(below(limit), limit as usize, "{listener}: not at the limit");
        let refused = |what: &str| {
            let logs = proxy.logs.lock().unwrap();
            logs.iter().filter(|line| line.contains(what)).count()
        };
        let what = if listener == proxy.admin {
            "admin accept failed"
        } else {
            "\"accept failed"
        };
        assert!(refused(what) > 0, "{listener}: no accept failed");
        // A loop that retried at once would keep the worker running all the time.
        let runnable = runnable_samples(proxy.pid(), 20, every).await;
        assert!(
            runnable <= 6,
            "{listener}: out of descriptors, running or ready in {runnable} of 20 looks"
        );
        // Once descriptors are free again, the waiting connections are accepted and served.
        let unlimited = Command::new("prlimit")
            .arg(format!("--pid={}", proxy.pid()))
            .arg(format!("--nofile={soft}:"))
            .status()
            .unwrap();
        assert!(unlimited.success(), "prlimit failed");
        let mut last = held.pop().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut last, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_exact(&mut last, &mut answer),
        )
        .await
        .expect("no answer once descriptors were free")
        .unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200", "{listener}");
        drop(held);
        drop(last);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&proxy.url("/y"), &[]).await.status, 200);
}
