//! portcullis-loadgen: a load generator for portcullis (see bench/README.md).
//!
//! Three modes: a load run (`--url`), `--mint-tokens N` (write N unique JWTs) and
//! `--serve-upstream ADDR` (a fast upstream that answers 200 at once).

mod mint;
mod run;
mod sign;
mod tls;
mod upstream;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Uri};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "HTTP/1.1 load generator for portcullis: keep-alive or new connection per request, \
             closed loop or fixed rate (latency from the scheduled time), Bearer tokens, \
             scheme-v1 signatures, TLS and mTLS (rustls, aws-lc-rs)"
)]
struct Cli {
    /// Target URL, http:// or https://.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent connections (each carries one request at a time).
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// How long to send.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fixed rate in requests/s over all connections (schedule-based; latency counted from
    /// each request's due time). Without it: as fast as answers come back.
    #[arg(long, short = 'R')]
    rate: Option<f64>,
    /// Worker threads of the load generator's runtime (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// HTTP method.
    #[arg(long, short = 'm', default_value = "GET")]
    method: String,
    /// Request body (text).
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body read from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// File of Bearer tokens, one per line; each request carries one.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// How tokens are chosen.
    #[arg(long, default_value = "round-robin", value_parser = ["round-robin", "random"])]
    token_order: String,
    /// Sign every request with scheme v1 using this key id (fresh ts and nonce per request).
    #[arg(long, requires = "sign_secret_env")]
    sign_key_id: Option<String>,
    /// Environment variable that holds the signing secret (its bytes, as they are).
    #[arg(long, requires = "sign_key_id")]
    sign_secret_env: Option<String>,
    /// Signature algorithm.
    #[arg(long, default_value = "hmac-sha256", value_parser = ["hmac-sha256", "hmac-sha512"])]
    sign_alg: String,
    /// PEM file of the CA (or self-signed certificate) that https URLs are verified against.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS.
    #[arg(long, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// TLS versions offered.
    #[arg(long, default_value = "any", value_parser = ["1.2", "1.3", "any"])]
    tls_version: String,
    /// Allow TLS session resumption (off by default: every new connection is a full handshake).
    #[arg(long)]
    tls_resume: bool,
    /// BENCHMARK ONLY: accept any server certificate and handshake signature, which takes the
    /// client's own ECDSA/RSA verification out of a handshake-rate measurement.
    #[arg(long)]
    tls_insecure_no_verify: bool,
    /// Open a new connection (TCP, and TLS for https) for every request.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Per-request timeout (connect and handshake included); a timeout is an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Write N unique JWTs (one a line) to --out, then exit.
    #[arg(long, value_name = "N")]
    mint_tokens: Option<usize>,
    /// Minting: environment variable holding the HS256 secret.
    #[arg(long, conflicts_with = "rs256_key")]
    hs256_secret_env: Option<String>,
    /// Minting: PKCS#8 RSA private key (PEM) to sign RS256 with.
    #[arg(long)]
    rs256_key: Option<PathBuf>,
    /// Minting: `iss`.
    #[arg(long)]
    iss: Option<String>,
    /// Minting: `aud`.
    #[arg(long)]
    aud: Option<String>,
    /// Minting: `sub` is this prefix followed by the token's index.
    #[arg(long, default_value = "loadgen-")]
    sub_prefix: String,
    /// Minting: `kid` in the header.
    #[arg(long)]
    kid: Option<String>,
    /// Minting: lifetime (exp - iat).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Minting: permissions, comma-separated (a JSON array, or a space-separated string when
    /// --permissions-claim is `scope`).
    #[arg(long, value_delimiter = ',')]
    permissions: Vec<String>,
    /// Minting: the claim that carries the permissions.
    #[arg(long, default_value = "permissions")]
    permissions_claim: String,
    /// Minting: output file.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Serve a fast upstream on ADDR (answers 200 "ok" at once), until killed.
    #[arg(long, value_name = "ADDR")]
    serve_upstream: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.mint_tokens {
        return mint_tokens(&cli, n);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(threads) = cli.threads {
        rt.worker_threads(threads.max(1));
    }
    let rt = rt.build()?;
    if let Some(addr) = cli.serve_upstream {
        return rt.block_on(upstream::serve(addr));
    }
    let Some(url) = cli.url.clone() else {
        bail!("give --url (a load run), --mint-tokens N or --serve-upstream ADDR");
    };
    let cfg = run_config(&cli, &url)?;
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let cpu_before = cpu_seconds();
    let outcome = rt.block_on(run::run(cfg))?;
    let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    report(&cli, &url, threads, &outcome, cpu);
    Ok(())
}

fn mint_tokens(cli: &Cli, n: usize) -> anyhow::Result<()> {
    let key = match (&cli.hs256_secret_env, &cli.rs256_key) {
        (Some(var), None) => {
            let secret = std::env::var_os(var)
                .with_context(|| format!("environment variable {var} is not set"))?;
            mint::Key::Hs256(secret.into_encoded_bytes())
        }
        (None, Some(pem)) => mint::Key::rs256_from_pem(pem)?,
        _ => bail!("--mint-tokens needs --hs256-secret-env VAR or --rs256-key PEM"),
    };
    let opts = mint::MintOptions {
        count: n,
        iss: cli.iss.clone().context("--mint-tokens needs --iss")?,
        aud: cli.aud.clone(),
        sub_prefix: cli.sub_prefix.clone(),
        kid: cli.kid.clone(),
        ttl_secs: cli.ttl.as_secs(),
        permissions: cli.permissions.clone(),
        permissions_claim: cli.permissions_claim.clone(),
        out: cli.out.clone().context("--mint-tokens needs --out FILE")?,
    };
    let written = mint::mint(&key, &opts)?;
    eprintln!("wrote {written} tokens to {}", opts.out.display());
    Ok(())
}

fn run_config(cli: &Cli, url: &str) -> anyhow::Result<run::RunConfig> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("the URL must start with http:// or https://"),
    };
    let authority = uri.authority().context("the URL has no host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let method = Method::from_bytes(cli.method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("bad method {:?}", cli.method))?;
    let body = match (&cli.body, &cli.body_file) {
        (Some(text), _) => Bytes::from(text.clone().into_bytes()),
        (None, Some(path)) => Bytes::from(
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        ),
        (None, None) => Bytes::new(),
    };
    let mut headers = Vec::new();
    for h in &cli.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not `Name: value`"))?;
        headers.push((
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        ));
    }
    let tokens = match &cli.tokens {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let values = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
                .collect::<Result<Vec<_>, _>>()
                .context("a token is not a valid header value")?;
            if values.is_empty() {
                bail!("{}: no token", path.display());
            }
            Some(run::Tokens {
                values,
                random: cli.token_order == "random",
                next: AtomicUsize::new(0),
            })
        }
        None => None,
    };
    let signer = match (&cli.sign_key_id, &cli.sign_secret_env) {
        (Some(key_id), Some(var)) => {
            let secret = std::env::var_os(var)
                .with_context(|| format!("environment variable {var} is not set"))?;
            Some(sign::Signer {
                key_id: key_id.clone(),
                algorithm: sign::Algorithm::parse(&cli.sign_alg).context("--sign-alg")?,
                secret: secret.into_encoded_bytes(),
                method: method.as_str().to_owned(),
                target: path_and_query.clone(),
                host: authority.as_str().to_owned(),
                body_sha256_hex: sign::body_sha256_hex(&body),
            })
        }
        _ => None,
    };
    let tls = if https {
        let config = tls::client_config(&tls::TlsOptions {
            ca: cli.tls_ca.as_deref(),
            client_cert: cli.tls_client_cert.as_deref(),
            client_key: cli.tls_client_key.as_deref(),
            version: &cli.tls_version,
            resume: cli.tls_resume,
            insecure_no_verify: cli.tls_insecure_no_verify,
        })?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host} is not a valid TLS server name"))?;
        Some((tokio_rustls::TlsConnector::from(config), name))
    } else {
        None
    };
    if cli.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if let Some(rate) = cli.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be a positive number");
        }
    }
    Ok(run::RunConfig {
        addr,
        authority: authority.as_str().to_owned(),
        path_and_query,
        tls,
        connections: cli.connections,
        duration: cli.duration,
        rate: cli.rate,
        method,
        body,
        headers,
        tokens,
        signer,
        new_connection_per_request: cli.new_connection_per_request,
        timeout: cli.timeout,
    })
}

/// user + system CPU seconds of this process so far (Linux /proc; None elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

fn report(cli: &Cli, url: &str, threads: usize, o: &run::Outcome, cpu: Option<f64>) {
    let s = &o.stats;
    let completed: u64 = s.status.values().sum();
    let two_xx: u64 = s
        .status
        .iter()
        .filter(|(k, _)| (200..300).contains(*k))
        .map(|(_, v)| v)
        .sum();
    let non_2xx = completed - two_xx;
    let errors: u64 = s.errors.values().sum();
    let secs = o.elapsed.as_secs_f64();
    let rps = completed as f64 / secs;
    let q = |p: f64| s.hist.value_at_quantile(p) as f64 / 1000.0;
    let (p50, p90, p99, p999) = (q(0.5), q(0.9), q(0.99), q(0.999));
    let max = s.hist.max() as f64 / 1000.0;
    let mode = if cli.new_connection_per_request {
        "new connection per request"
    } else {
        "keep-alive"
    };
    let schedule = match cli.rate {
        Some(r) => format!("fixed rate {r} req/s, latency from each request's due time"),
        None => "closed loop (max throughput), latency from send".to_owned(),
    };
    let cpu_share = cpu.map(|c| c / secs);
    if cli.json {
        let mut v = serde_json::json!({
            "url": url,
            "method": cli.method.to_ascii_uppercase(),
            "mode": mode,
            "rate": cli.rate,
            "connections": cli.connections,
            "threads": threads,
            "duration_s": cli.duration.as_secs_f64(),
            "elapsed_s": secs,
            "requests": completed,
            "requests_per_s": rps,
            "status_2xx": two_xx,
            "non_2xx": non_2xx,
            "status": s.status.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "errors": errors,
            "error_kinds": s.errors,
            "sent": o.sent,
            "due_not_sent": o.due_not_sent,
            "connects": s.connects,
            "latency_ms": {
                "p50": p50, "p90": p90, "p99": p99, "p99_9": p999, "max": max,
                "mean": s.hist.mean() / 1000.0,
                "samples": s.hist.len(),
            },
            "loadgen_cpu_s": cpu,
            "loadgen_cpu_share": cpu_share,
        });
        if let Some(t) = &o.tls_info {
            v["tls"] = serde_json::json!({
                "version": t.version, "suite": t.suite, "group": t.group, "alpn": t.alpn,
                "resumption": cli.tls_resume, "verify": !cli.tls_insecure_no_verify,
            });
        }
        println!("{v}");
        return;
    }
    println!("{} {url}", cli.method.to_ascii_uppercase());
    println!(
        "  {mode}, {schedule}; {} connections, {threads} loadgen threads, {:?}",
        cli.connections, cli.duration
    );
    if let Some(t) = &o.tls_info {
        println!(
            "  TLS: {} {} {} alpn={} resumption={} verify={}",
            t.version,
            t.suite,
            t.group,
            t.alpn,
            if cli.tls_resume { "on" } else { "off" },
            if cli.tls_insecure_no_verify {
                "OFF"
            } else {
                "on"
            }
        );
    }
    println!("  requests: {completed} in {secs:.2} s = {rps:.1} req/s");
    let codes: Vec<String> = s.status.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    println!(
        "  2xx: {two_xx}  non-2xx: {non_2xx}  errors: {errors}  (status {})",
        codes.join(" ")
    );
    for (kind, n) in s.errors.iter().take(5) {
        println!("    error x{n}: {kind}");
    }
    if cli.rate.is_some() {
        println!(
            "  sent: {}  due but not sent by the end (backlog): {}",
            o.sent, o.due_not_sent
        );
    }
    println!("  connections opened during the run: {}", s.connects);
    println!(
        "  latency ms: p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  p99.9 {p999:.3}  max {max:.3}  (mean {:.3}, {} samples)",
        s.hist.mean() / 1000.0,
        s.hist.len()
    );
    if let (Some(c), Some(share)) = (cpu, cpu_share) {
        println!(
            "  loadgen CPU: {c:.2} s user+sys = {:.0}% of one core",
            share * 100.0
        );
    }
}
