//! The `portcullis` command: parses the command line, loads the configuration, starts logging
//! and calls the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use portcullis::config::Config;

/// mimalloc: the request path allocates many small short-lived buffers (headers, JSON claims),
/// where it is measurably faster than glibc's malloc (see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad configuration (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "A reverse-proxy sidecar that verifies every request before the service behind it sees it"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (SIGTERM or SIGINT: stop accepting, drain, exit 0).
    Proxy {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report every error with its key path.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Sign a request with scheme v1: print the Authorization header, or a curl command.
    Sign(SignArgs),
    /// Revoke a token (--jti/--exp) or a subject's earlier tokens (--sub/--before) through a
    /// running proxy's admin API; --undo takes a revocation back, --list pages through them.
    Revoke(RevokeArgs),
    /// Certificate tooling: keygen, csr, inspect, verify, pin.
    #[command(subcommand)]
    Cert(portcullis::cert::CertCommand),
}

#[derive(clap::Args, Debug)]
struct RevokeArgs {
    /// The admin listener, e.g. http://127.0.0.1:9901.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    admin_url: String,
    /// The environment variable holding the admin token.
    #[arg(long, default_value = "PORTCULLIS_ADMIN_TOKEN")]
    token_env: String,
    /// The token's jti (with --exp).
    #[arg(long, requires = "exp", conflicts_with_all = ["sub", "list"])]
    jti: Option<String>,
    /// The token's exp, Unix seconds (the revocation is kept until then).
    #[arg(long)]
    exp: Option<i64>,
    /// The subject whose tokens issued before --before are revoked.
    #[arg(long, requires = "before", conflicts_with = "list")]
    sub: Option<String>,
    /// Unix seconds; the subject's tokens with an earlier iat are revoked.
    #[arg(long)]
    before: Option<i64>,
    /// Take the revocation back instead (DELETE).
    #[arg(long)]
    undo: bool,
    /// List revocations (GET), one page.
    #[arg(long)]
    list: bool,
    /// With --list: the cursor a previous page returned.
    #[arg(long, requires = "list")]
    cursor: Option<String>,
}

#[derive(clap::Args, Debug)]
struct SignArgs {
    /// The signing key's id (`keyId`).
    #[arg(long)]
    key_id: String,
    /// The environment variable holding the secret.
    #[arg(
        long,
        conflicts_with = "secret_file",
        required_unless_present = "secret_file"
    )]
    secret_env: Option<String>,
    /// A file holding the secret (trailing newline trimmed).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// hmac-sha256 or hmac-sha512 (must be the key's algorithm).
    #[arg(long, default_value = "hmac-sha256")]
    algorithm: String,
    /// The request body.
    #[arg(long, conflicts_with = "data_file")]
    data: Option<String>,
    /// A file holding the request body, sent byte for byte.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Print `X-Signature: ...` (for requests that carry a bearer token in Authorization).
    #[arg(long)]
    x_signature: bool,
    /// Print a ready curl command instead of the header.
    #[arg(long)]
    curl: bool,
    /// The HTTP method.
    method: String,
    /// The full URL, exactly as the request will be sent.
    url: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Revoke(args) => match revoke(&args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis revoke: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Sign(args) => match sign(&args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis sign: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Cert(cmd) => match portcullis::cert::run(&cmd) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis cert: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Proxy { config } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{}: invalid configuration:", config.display());
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            match proxy(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            for warning in &config.warnings {
                println!("warning: {warning}");
            }
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("error: {e}");
            }
            println!(
                "{}: {} error{}",
                file.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn revoke(args: &RevokeArgs) -> anyhow::Result<String> {
    let token = std::env::var(&args.token_env).with_context(|| {
        format!(
            "environment variable {} (the admin token) is not set",
            args.token_env
        )
    })?;
    let url = format!("{}/revocations", args.admin_url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let request = if args.list {
        let mut query = Vec::new();
        if let Some(cursor) = &args.cursor {
            query.push(("cursor", cursor.clone()));
        }
        client.get(&url).query(&query)
    } else {
        let body = match (&args.jti, args.exp, &args.sub, args.before) {
            (Some(jti), Some(exp), None, _) => serde_json::json!({"jti": jti, "exp": exp}),
            (None, _, Some(sub), Some(before)) => serde_json::json!({"sub": sub, "before": before}),
            _ => anyhow::bail!("give --jti with --exp, --sub with --before, or --list"),
        };
        let method = if args.undo {
            reqwest::Method::DELETE
        } else {
            reqwest::Method::POST
        };
        client
            .request(method, &url)
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let response = request
            .bearer_auth(token)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            Ok(text.trim_end().to_owned())
        } else {
            anyhow::bail!("{status}: {}", text.trim_end())
        }
    })
}

fn sign(args: &SignArgs) -> anyhow::Result<String> {
    use portcullis::auth::signature;
    use portcullis::config::SignatureAlgorithm;
    use sha2::Digest;

    let algorithm = match args.algorithm.as_str() {
        "hmac-sha256" => SignatureAlgorithm::HmacSha256,
        "hmac-sha512" => SignatureAlgorithm::HmacSha512,
        other => anyhow::bail!("--algorithm {other:?} is not hmac-sha256 or hmac-sha512"),
    };
    let secret = match (&args.secret_env, &args.secret_file) {
        (Some(var), _) => std::env::var(var)
            .with_context(|| format!("environment variable {var} is not set"))?
            .into_bytes(),
        (None, Some(file)) => {
            let mut bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            bytes
        }
        (None, None) => anyhow::bail!("give --secret-env or --secret-file"),
    };
    let body = match (&args.data, &args.data_file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(file)) => {
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
        }
        (None, None) => Vec::new(),
    };
    let uri: http::Uri = args
        .url
        .parse()
        .with_context(|| format!("{:?} is not a URL", args.url))?;
    let host = uri
        .authority()
        .with_context(|| format!("{:?} has no host", args.url))?
        .as_str();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let method = args.method.to_ascii_uppercase();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let body_hash = hex::encode(sha2::Sha256::digest(&body));
    let to_sign = signature::string_to_sign(&method, target, host, ts, &nonce, &body_hash);
    let sig = signature::sign(algorithm, &secret, to_sign.as_bytes());
    let alg = match algorithm {
        SignatureAlgorithm::HmacSha256 => String::new(),
        SignatureAlgorithm::HmacSha512 => ", alg=\"hmac-sha512\"".to_owned(),
    };
    let value = format!(
        "Signature v1, keyId=\"{}\", ts=\"{ts}\", nonce=\"{nonce}\", signature=\"{sig}\"{alg}",
        args.key_id
    );
    let header = if args.x_signature {
        format!("X-Signature: {value}")
    } else {
        format!("Authorization: {value}")
    };
    if !args.curl {
        return Ok(header);
    }
    let mut cmd = format!(
        "curl -sS -X {} {} -H {}",
        shell_quote(&method),
        shell_quote(&args.url),
        shell_quote(&header)
    );
    match (&args.data, &args.data_file) {
        (Some(data), _) => cmd.push_str(&format!(" --data-binary {}", shell_quote(data))),
        (None, Some(file)) => cmd.push_str(&format!(
            " --data-binary {}",
            shell_quote(&format!("@{}", file.display()))
        )),
        (None, None) => {}
    }
    Ok(cmd)
}

/// Single-quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn proxy(config: Config) -> anyhow::Result<()> {
    // One thread: tokio's current-thread scheduler, which skips the work-stealing machinery
    // (cross-thread queues and wake-ups) that a single worker has no use for.
    let mut builder = if config.server.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.server.threads);
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        portcullis::run(config, shutdown_signal()).await?;
        tracing::info!("drained, exiting");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the proxy");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
