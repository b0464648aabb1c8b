//! Configuration: the TOML file is read into the serde mirror in [`raw`], then checked and turned
//! into [`Config`], which holds only valid values (socket addresses, durations, loaded secrets).
//! Every problem is collected with its key path, so `check-config` reports them all at once.
//! What the proxy would refuse at start is refused here, with the code the proxy runs: the TLS
//! files are loaded (`server::tls::check`, `proxy::upstream_tls::check`) and the Redis URL is
//! parsed (`store::redis::check_url`, without connecting), so that a configuration
//! `check-config` accepts is one the proxy starts with.

mod raw;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Uri};
use jsonwebtoken::Algorithm;

use crate::proxy::path;

/// The smallest HMAC secret accepted anywhere (JWT HS* keys and request-signature keys), and
/// the shortest admin token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest duration the configuration takes (ten years): more than any timeout, window or
/// lifetime needs, and far enough from the limits of `Duration`, `Instant` and Redis's `PX`
/// that arithmetic on a configured duration cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// A validated configuration. Built only by [`Config::parse`] or [`Config::load`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[upstream]`
    pub upstream: UpstreamConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[jwt]`
    pub jwt: JwtConfig,
    /// `[signature]`
    pub signature: SignatureConfig,
    /// `[[routes]]`, in file order.
    pub routes: Vec<Route>,
    /// Things that are valid but probably not meant (a shadowed route, no routes at all).
    pub warnings: Vec<String>,
}

/// `[server]`
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub drain_timeout: Duration,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    /// The one worker never sleeps: it polls for I/O with a zero timeout whenever it has
    /// nothing to run, as HAProxy's `busy-polling` does. A whole core for lower latency on
    /// machines (VMs above all) where waking up is slow. Needs `threads = 1`.
    pub busy_poll: bool,
    /// Peers whose `X-Forwarded-For` is kept (the client's address is appended to it): load
    /// balancers in front of the proxy. From any other peer the header is replaced by the
    /// peer's own address, as DESIGN.md's "inbound copies are always removed first" has it.
    pub trusted_proxies: Vec<IpNetwork>,
    /// Request headers removed before anything reads them, besides the ones the proxy always
    /// removes (DESIGN.md's "configured names"): lower case, valid names, none that a check
    /// reads.
    pub strip_headers: Vec<http::HeaderName>,
    /// `x-request-id` was in `strip_headers`: a client's id is never kept, and the proxy makes
    /// a new one for every request, which still goes upstream (it is not stripped after).
    pub fresh_request_ids: bool,
    /// Client connections served at once; past it, new ones wait in the listen backlog until
    /// one ends (HAProxy's `maxconn`). The admin listener is not counted.
    pub max_connections: usize,
    pub tls: Option<TlsConfig>,
}

/// `[server] max_connections` when not set: about 40 KiB a connection (bench/README.md) makes
/// this some 400 MiB at the most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The largest `[server] max_connections` taken.
const MAX_MAX_CONNECTIONS: u64 = 1_000_000;

/// Request headers the checks read, which `[server] strip_headers` may not name.
const READ_BY_CHECKS: [&str; 6] = [
    "host",
    "authorization",
    "x-signature",
    "content-type",
    "content-length",
    "transfer-encoding",
];

/// Whether two listening sockets would take the same port on the same address: the same
/// address, or a wildcard (`0.0.0.0` covers IPv4, `[::]` both families, as Linux binds it).
fn listens_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Whether `uri`'s port, if it names one, is one a connection can be made to (1-65535): `http`
/// takes `:99999` and `:0` as written, and the failure would come only at the first request.
fn port_ok(uri: &Uri) -> bool {
    // `Uri::port` is `None` for a port that is not a `u16`, so the authority is read here.
    let Some(authority) = uri.authority().map(|a| a.as_str()) else {
        return true;
    };
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let after_host = host_port
        .rfind(']')
        .map_or(host_port, |end| &host_port[end..]);
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => port.parse::<u16>().is_ok_and(|port| port != 0),
    }
}

/// An address or a network (`10.0.0.0/8`, `fd00::/8`, `192.0.2.7`) in `server.trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    network: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Parses `ADDRESS` or `ADDRESS/PREFIX`. An address with bits set beyond its prefix
    /// (`10.0.0.1/8`) is refused: it is more likely a typo than the network it would mean.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| {
            format!("{text:?} is not an IP address or a network such as \"10.0.0.0/8\"")
        })?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(format!(
                        "{text:?}: the prefix must be a number from 0 to {bits}"
                    ))
                }
            },
        };
        let net = Self { network, prefix };
        if net.masked(network) != network {
            return Err(format!(
                "{text:?} has address bits set beyond its /{prefix} (the network is {}/{prefix})",
                net.masked(network)
            ));
        }
        Ok(net)
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_cert: ClientCertMode,
    pub min_version: TlsVersion,
}

/// Whether a client certificate is asked for or demanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    Optional,
    Required,
}

/// The lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `[upstream]`
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority of the service behind the proxy.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca: Option<PathBuf>,
    /// SHA-256 of the accepted SubjectPublicKeyInfo.
    pub pins: Vec<[u8; 32]>,
}

/// `[admin]`
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub on_error: OnStoreError,
    pub timeout: Duration,
    pub revocation_max_lag: Duration,
    /// How many nonces the memory store holds within their TTL before it refuses new ones
    /// (`backend = "memory"` only; Redis is bounded by its own `maxmemory`).
    pub max_nonces: u64,
}

/// Where nonces, revocations and rate-limit windows live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    Memory,
    Redis { url: String },
}

/// What a store error does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Deny,
    Allow,
}

/// `[jwt]`
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub leeway: Duration,
    /// How many verified tokens are remembered; 0 turns the cache off.
    pub verified_cache: u64,
    pub issuers: Vec<IssuerConfig>,
}

/// One `[[jwt.issuers]]` entry.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; empty means `aud` is not checked.
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub jwks: Option<JwksSource>,
    /// HMAC secrets by `kid`.
    pub secrets: Vec<(String, Secret)>,
    pub permissions_claim: String,
    pub required_claims: Vec<String>,
    pub max_lifetime: Duration,
    pub jwks_refresh: Duration,
    pub jwks_min_refetch: Duration,
    pub jwks_max_stale: Duration,
}

/// Where an issuer's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(String),
    File(PathBuf),
}

/// `[signature]`
#[derive(Debug, Clone)]
pub struct SignatureConfig {
    pub max_skew: Duration,
    pub keys: Vec<SignatureKey>,
}

/// One `[[signature.keys]]` entry.
#[derive(Debug, Clone)]
pub struct SignatureKey {
    pub id: String,
    pub client: String,
    pub secret: Secret,
    pub algorithm: SignatureAlgorithm,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

/// The MAC of a request signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureAlgorithm {
    HmacSha256,
    HmacSha512,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// Shared, so that metrics label a request with it without copying it.
    pub name: Arc<String>,
    /// Normalised, without a trailing slash (unless it is `/`), with its escapes decoded
    /// ([`path::decoded`]): the spelling [`Config::match_route`] compares.
    pub path_prefix: String,
    /// `None` = any method.
    pub methods: Option<Vec<Method>>,
    pub require: Requirements,
    pub permissions: Vec<String>,
    /// Lower-case media types (`type/subtype`); `None` = any.
    pub content_types: Option<Vec<String>>,
    pub rate_limit: Option<RateLimit>,
    pub client_certs: Option<ClientCertAllowList>,
}

/// The checks a route runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requirements {
    pub mtls: bool,
    pub signature: bool,
    pub jwt: bool,
}

impl Requirements {
    /// Whether the route checks anything at all (a public route does not).
    pub fn any(&self) -> bool {
        self.mtls || self.signature || self.jwt
    }
}

/// A route's rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u64,
    pub per: Duration,
    pub key: RateLimitKey,
}

/// What a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitKey {
    Subject,
    Client,
    Certificate,
    Ip,
}

/// Client certificates a route accepts.
#[derive(Debug, Clone, Default)]
pub struct ClientCertAllowList {
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    pub spki_sha256: Vec<[u8; 32]>,
}

/// Secret bytes. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where it is, as `upstream.url` or `routes[2].methods[0]`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a file. Relative paths inside it (`jwks_file`, `*_file`, TLS files)
    /// are taken relative to the file's folder.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read {}: {e}", file.display()),
            }])
        })?;
        let base = file.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base, &|name| std::env::var(name).ok())
    }

    /// Validates TOML text. `base` resolves relative paths; `env` looks up environment variables
    /// (tests pass their own).
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: e.to_string().trim_end().replace('\n', " | "),
            }])
        })?;
        let mut v = Validator {
            errors: Vec::new(),
            warnings: Vec::new(),
            base,
            env,
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            // Every field is filled when no error was recorded.
            config.ok_or(ConfigErrors(v.errors))
        } else {
            Err(ConfigErrors(v.errors))
        }
    }

    /// The first route whose prefix and methods both match, or why none does. `path` is the
    /// normalised path with its escapes decoded ([`path::decoded`]).
    pub fn match_route(&self, path: &str, method: &Method) -> RouteMatch<'_> {
        let mut path_matched = false;
        for (index, route) in self.routes.iter().enumerate() {
            if !path::prefix_matches(&route.path_prefix, path) {
                continue;
            }
            path_matched = true;
            match &route.methods {
                Some(methods) if !methods.contains(method) => {}
                _ => return RouteMatch::Found { index, route },
            }
        }
        if path_matched {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NoRoute
        }
    }
}

/// The result of [`Config::match_route`].
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// The first route that takes the request, and its place in [`Config::routes`].
    Found {
        index: usize,
        route: &'a Route,
    },
    MethodNotAllowed,
    NoRoute,
}

struct Validator<'a> {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    base: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Parses a duration, up to [`MAX_DURATION`].
    fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    path,
                    format!("{text:?} is longer than any duration here needs; at most 3650d"),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    path,
                    format!(
                        "{text:?} is not a duration ({e}); write it as \"30s\", \"15m\" or \"24h\""
                    ),
                );
                default
            }
        }
    }

    /// Parses a duration that must be more than zero: a timeout, a window or an interval of
    /// zero would fail every request or switch a check off.
    fn nonzero_duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(path, value, default);
        if d.is_zero() {
            self.error(path, "must be more than 0s");
            return default;
        }
        d
    }

    fn socket_addr(&mut self, path: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let text = value.unwrap_or(default);
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.error(
                    path,
                    format!("{text:?} is not an address:port such as \"0.0.0.0:8080\""),
                );
                // The default is a literal address that always parses.
                default
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            }
        }
    }

    fn file_path(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn existing_file(&mut self, path: &str, value: &str) -> PathBuf {
        let p = self.file_path(value);
        if !p.is_file() {
            self.error(path, format!("file {} does not exist", p.display()));
        }
        p
    }

    /// Reads and parses a `jwks_file` as the key store will, so that a file the proxy could not
    /// use is refused here rather than found at the first request (503 keys_unavailable). A
    /// `jwks_url` is fetched only at start: its server may not be up while the config is checked.
    fn jwks_file_keys(&mut self, key: &str, path: &Path, algorithms: &[Algorithm]) {
        let keys = crate::keys::read_jwks_file(path).and_then(|bytes| {
            // The issuer name is only for the parser's log lines about skipped keys.
            crate::keys::parse_jwks("(config check)", &bytes)
        });
        match keys {
            Err(e) => self.error(key, e),
            Ok(keys) if !keys.iter().any(|k| algorithms.iter().any(|a| k.fits(*a))) => self.error(
                key,
                format!(
                    "{} holds no key usable with the issuer's algorithms",
                    path.display()
                ),
            ),
            Ok(_) => {}
        }
    }

    /// Loads an HMAC secret named by an environment variable or a file (trailing newline
    /// trimmed). Its bytes are the key, whatever they are; only the length is checked.
    fn secret(
        &mut self,
        path: &str,
        env_key: &str,
        env: Option<&str>,
        file_key: &str,
        file: Option<&str>,
    ) -> Option<Secret> {
        let (bytes, _) = self.secret_bytes(path, env_key, env, file_key, file)?;
        if bytes.len() < MIN_SECRET_BYTES {
            self.error(
                path,
                format!(
                    "the secret is {} bytes; HMAC secrets must be at least {MIN_SECRET_BYTES} bytes",
                    bytes.len()
                ),
            );
            return None;
        }
        Some(Secret(bytes))
    }

    /// Loads the admin API's bearer token. Unlike an HMAC secret it is compared with what a
    /// client sends in `Authorization`, and a header value can neither start or end with
    /// whitespace (HTTP strips it, and so does the admin listener) nor hold control
    /// characters: such a token would load and then never match. It is refused instead.
    fn admin_token(&mut self, raw: &raw::RawAdmin) -> Option<Secret> {
        let (env, file) = (raw.token_env.as_deref(), raw.token_file.as_deref());
        let (bytes, at) = self.secret_bytes("admin", "token_env", env, "token_file", file)?;
        // The token itself is never repeated.
        let message = if bytes.first().is_some_and(u8::is_ascii_whitespace)
            || bytes.last().is_some_and(u8::is_ascii_whitespace)
        {
            "the admin token starts or ends with whitespace, which no Authorization header can carry; remove it".to_owned()
        } else if http::HeaderValue::from_bytes(&bytes).is_err() {
            "the admin token holds a control character, which no Authorization header can carry"
                .to_owned()
        } else if bytes.len() < MIN_SECRET_BYTES {
            format!(
                "the admin token is {} bytes; it must be at least {MIN_SECRET_BYTES} bytes",
                bytes.len()
            )
        } else {
            return Some(Secret(bytes));
        };
        self.error(at, message);
        None
    }

    /// Reads a secret named by an environment variable or a file (trailing newline trimmed),
    /// and the key path of the one given.
    fn secret_bytes(
        &mut self,
        path: &str,
        env_key: &str,
        env: Option<&str>,
        file_key: &str,
        file: Option<&str>,
    ) -> Option<(Vec<u8>, String)> {
        let bytes = match (env, file) {
            (Some(_), Some(_)) => {
                self.error(path, format!("give {env_key} or {file_key}, not both"));
                return None;
            }
            (None, None) => {
                self.error(
                    path,
                    format!("a secret is needed: give {env_key} (an environment variable) or {file_key} (a file)"),
                );
                return None;
            }
            (Some(var), None) => match (self.env)(var) {
                Some(value) => value.into_bytes(),
                None => {
                    self.error(
                        format!("{path}.{env_key}"),
                        format!("environment variable {var} is not set"),
                    );
                    return None;
                }
            },
            (None, Some(file)) => {
                let p = self.file_path(file);
                match std::fs::read(&p) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            bytes.pop();
                        }
                        bytes
                    }
                    Err(e) => {
                        self.error(
                            format!("{path}.{file_key}"),
                            format!("cannot read {}: {e}", p.display()),
                        );
                        return None;
                    }
                }
            }
        };
        let given = if env.is_some() { env_key } else { file_key };
        Some((bytes, format!("{path}.{given}")))
    }

    /// Loads a secret text (a URL with a password) from an environment variable or a file.
    fn secret_text(
        &mut self,
        path: &str,
        env_key: &str,
        env: Option<&str>,
        file_key: &str,
        file: Option<&str>,
    ) -> Option<String> {
        match (env, file) {
            (Some(var), None) => match (self.env)(var) {
                Some(value) => Some(value),
                None => {
                    self.error(
                        format!("{path}.{env_key}"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (None, Some(file)) => {
                let p = self.file_path(file);
                match std::fs::read_to_string(&p) {
                    Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_owned()),
                    Err(e) => {
                        self.error(
                            format!("{path}.{file_key}"),
                            format!("cannot read {}: {e}", p.display()),
                        );
                        None
                    }
                }
            }
            _ => {
                self.error(path, format!("give {env_key} or {file_key}, not both"));
                None
            }
        }
    }

    fn positive(&mut self, path: &str, value: Option<i64>, default: u64, allow_zero: bool) -> u64 {
        match value {
            None => default,
            Some(n) if n > 0 || (allow_zero && n == 0) => n as u64,
            Some(n) => {
                let want = if allow_zero {
                    "0 or more"
                } else {
                    "at least 1"
                };
                self.error(path, format!("{n} is out of range: it must be {want}"));
                default
            }
        }
    }

    fn config(&mut self, raw: raw::RawConfig) -> Option<Config> {
        let server = self.server(raw.server);
        let upstream = self.upstream(raw.upstream);
        let admin = self.admin(raw.admin);
        let store = self.store(raw.store);
        let jwt = self.jwt(raw.jwt);
        let signature = self.signature(raw.signature);
        for (i, route) in raw.routes.iter().enumerate() {
            // One name, one set of rate-limit buckets and metrics.
            if !route.name.is_empty() && raw.routes[..i].iter().any(|r| r.name == route.name) {
                self.error(
                    format!("routes[{i}].name"),
                    format!("{:?} is used by another route", route.name),
                );
            }
        }
        let routes: Vec<Route> = raw
            .routes
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(i, r, &jwt, &signature, server.tls.as_ref()))
            .collect();
        self.route_warnings(&routes);
        self.subject_limit_warnings(&routes, &jwt);
        if listens_clash(server.listen, admin.listen) {
            self.error(
                "admin.listen",
                format!(
                    "{} and server.listen {} cannot both be bound: one port, and addresses that overlap",
                    admin.listen, server.listen
                ),
            );
        }
        Some(Config {
            server,
            upstream: upstream?,
            admin,
            store,
            jwt,
            signature,
            routes,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let listen = self.socket_addr("server.listen", raw.listen.as_deref(), "0.0.0.0:8080");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = self.positive("server.threads", raw.threads, cores as u64, false);
        if threads > 1024 {
            self.error("server.threads", format!("{threads} is more than 1024"));
        }
        let drain_timeout = self.duration(
            "server.drain_timeout",
            raw.drain_timeout.as_deref(),
            Duration::from_secs(20),
        );
        let max_body_bytes =
            self.positive("server.max_body_bytes", raw.max_body_bytes, 1 << 20, true);
        let header_read_timeout = self.nonzero_duration(
            "server.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        );
        let busy_poll = raw.busy_poll.unwrap_or(false);
        if busy_poll && threads != 1 {
            self.error(
                "server.busy_poll",
                format!(
                    "needs threads = 1 (threads is {threads}): busy polling keeps one worker awake"
                ),
            );
        }
        let trusted_proxies = raw
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, text)| match IpNetwork::parse(text.trim()) {
                Ok(net) => Some(net),
                Err(e) => {
                    self.error(format!("server.trusted_proxies[{i}]"), e);
                    None
                }
            })
            .collect();
        let mut fresh_request_ids = false;
        let strip_headers = raw
            .strip_headers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let key = format!("server.strip_headers[{i}]");
                let lower = name.trim().to_ascii_lowercase();
                if READ_BY_CHECKS.contains(&lower.as_str()) {
                    self.error(key, format!("{name:?} is read by the proxy's checks"));
                    return None;
                }
                if lower == "x-request-id" {
                    fresh_request_ids = true;
                    return None;
                }
                match http::HeaderName::from_bytes(lower.as_bytes()) {
                    Ok(header) => Some(header),
                    Err(_) => {
                        self.error(key, format!("{name:?} is not a header name"));
                        None
                    }
                }
            })
            .collect();
        let mut max_connections = self.positive(
            "server.max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS as u64,
            false,
        );
        if max_connections > MAX_MAX_CONNECTIONS {
            self.error(
                "server.max_connections",
                format!("{max_connections} is more than {MAX_MAX_CONNECTIONS}"),
            );
            max_connections = DEFAULT_MAX_CONNECTIONS as u64;
        }
        let tls = raw.tls.map(|t| self.tls(t));
        ServerConfig {
            listen,
            threads: threads.min(1024) as usize,
            drain_timeout,
            max_body_bytes,
            header_read_timeout,
            busy_poll,
            trusted_proxies,
            strip_headers,
            fresh_request_ids,
            // At most MAX_MAX_CONNECTIONS, checked above.
            max_connections: max_connections as usize,
            tls,
        }
    }

    fn tls(&mut self, raw: raw::RawTls) -> TlsConfig {
        let errors_before = self.errors.len();
        let cert = self.existing_file("server.tls.cert", &raw.cert);
        let key = self.existing_file("server.tls.key", &raw.key);
        let client_ca = raw
            .client_ca
            .as_deref()
            .map(|ca| self.existing_file("server.tls.client_ca", ca));
        let client_cert = match raw.client_cert.as_deref() {
            None | Some("optional") => ClientCertMode::Optional,
            Some("required") => ClientCertMode::Required,
            Some(other) => {
                self.error(
                    "server.tls.client_cert",
                    format!("{other:?} is not \"optional\" or \"required\""),
                );
                ClientCertMode::Optional
            }
        };
        if raw.client_cert.is_some() && client_ca.is_none() {
            self.error(
                "server.tls.client_cert",
                "client certificates need server.tls.client_ca to verify them against",
            );
        }
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => TlsVersion::Tls12,
            Some("1.3") => TlsVersion::Tls13,
            Some(other) => {
                self.error(
                    "server.tls.min_version",
                    format!("{other:?} is not \"1.2\" or \"1.3\""),
                );
                TlsVersion::Tls12
            }
        };
        let tls = TlsConfig {
            cert,
            key,
            client_ca,
            client_cert,
            min_version,
        };
        // Loaded as the proxy will at start, so that a set it would refuse (not PEM, a key
        // that does not match the certificate, an empty CA bundle) is an error here.
        if self.errors.len() == errors_before {
            if let Err(e) = crate::server::tls::check(&tls) {
                self.error(e.setting(), e.to_string());
            }
        }
        tls
    }

    fn upstream(&mut self, raw: Option<raw::RawUpstream>) -> Option<UpstreamConfig> {
        let Some(raw) = raw else {
            self.error("upstream", "the [upstream] section with url is required");
            return None;
        };
        let url = match raw.url.parse::<Uri>() {
            Ok(uri) => {
                let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
                let https = matches!(uri.scheme_str(), Some("https"));
                let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
                if !https && (raw.ca.is_some() || !raw.pins.is_empty()) {
                    self.error("upstream", "ca and pins are for an https:// upstream url");
                }
                if !scheme_ok || uri.authority().is_none() {
                    self.error(
                        "upstream.url",
                        format!(
                            "{:?} is not an http:// or https:// URL with a host",
                            raw.url
                        ),
                    );
                } else if !port_ok(&uri) {
                    self.error(
                        "upstream.url",
                        format!("{:?}: the port is not a number from 1 to 65535", raw.url),
                    );
                } else if !path_ok {
                    self.error(
                        "upstream.url",
                        "the upstream URL takes no path or query: the request's own path is sent",
                    );
                }
                Some(uri)
            }
            Err(e) => {
                self.error("upstream.url", format!("{:?} is not a URL: {e}", raw.url));
                None
            }
        };
        let connect_timeout = self.nonzero_duration(
            "upstream.connect_timeout",
            raw.connect_timeout.as_deref(),
            Duration::from_secs(2),
        );
        let request_timeout = self.nonzero_duration(
            "upstream.request_timeout",
            raw.request_timeout.as_deref(),
            Duration::from_secs(30),
        );
        let errors_before = self.errors.len();
        let ca = raw
            .ca
            .as_deref()
            .map(|ca| self.existing_file("upstream.ca", ca));
        let ca_exists = self.errors.len() == errors_before;
        let mut pins = Vec::new();
        for (i, pin) in raw.pins.iter().enumerate() {
            match decode_pin(pin.strip_prefix("sha256/").unwrap_or("")) {
                Some(p) => pins.push(p),
                None => self.error(
                    format!("upstream.pins[{i}]"),
                    format!("{pin:?} is not \"sha256/\" followed by the base64 of 32 bytes"),
                ),
            }
        }
        let upstream = UpstreamConfig {
            url: url?,
            connect_timeout,
            request_timeout,
            ca,
            pins,
        };
        // Built as the proxy will at start, so that a CA bundle it would refuse is an error
        // here.
        if upstream.ca.is_some() && ca_exists {
            if let Err(e) = crate::proxy::upstream_tls::check(&upstream) {
                self.error(e.setting(), e.to_string());
            }
        }
        Some(upstream)
    }

    fn admin(&mut self, raw: raw::RawAdmin) -> AdminConfig {
        let listen = self.socket_addr("admin.listen", raw.listen.as_deref(), "127.0.0.1:9901");
        let token = if raw.token_env.is_some() || raw.token_file.is_some() {
            self.admin_token(&raw)
        } else {
            None
        };
        AdminConfig { listen, token }
    }

    fn store(&mut self, raw: raw::RawStore) -> StoreConfig {
        // A URL with a password is a secret: it comes from url_env or url_file, never the TOML.
        let url = match (raw.url, raw.url_env.as_deref(), raw.url_file.as_deref()) {
            (Some(url), None, None) => {
                if url
                    .split_once("://")
                    .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
                {
                    self.error(
                        "store.url",
                        "a URL with credentials is a secret: give it in url_env or url_file",
                    );
                }
                Some(url)
            }
            (None, None, None) => None,
            (None, env, file) => self
                .secret_text("store", "url_env", env, "url_file", file)
                .map(|u| u.trim().to_owned()),
            (Some(_), _, _) => {
                self.error("store", "give one of url, url_env or url_file");
                None
            }
        };
        let backend = match (raw.backend.as_deref(), url) {
            (None | Some("memory"), None) => StoreBackend::Memory,
            (None | Some("memory"), Some(_)) => {
                self.error("store.url", "store.url is for backend = \"redis\"");
                StoreBackend::Memory
            }
            (Some("redis"), Some(url)) => {
                let known = [
                    "redis://",
                    "rediss://",
                    "redis-cluster://",
                    "redis-sentinel://",
                ];
                if !known.iter().any(|p| url.starts_with(p)) {
                    // The URL itself is not repeated: it may hold a password.
                    self.error(
                        "store.url",
                        "the URL must start with redis://, rediss://, redis-cluster:// or redis-sentinel://",
                    );
                } else if let Err(e) = crate::store::redis::check_url(&url) {
                    // Parsed as the store will at start (no connection); the error does not
                    // repeat the URL either.
                    self.error("store.url", e.to_string());
                }
                StoreBackend::Redis { url }
            }
            (Some("redis"), None) => {
                self.error(
                    "store.url",
                    "backend = \"redis\" needs a url (or url_env / url_file)",
                );
                StoreBackend::Memory
            }
            (Some(other), _) => {
                self.error(
                    "store.backend",
                    format!("{other:?} is not \"memory\" or \"redis\""),
                );
                StoreBackend::Memory
            }
        };
        let on_error = match raw.on_error.as_deref() {
            None | Some("deny") => OnStoreError::Deny,
            Some("allow") => OnStoreError::Allow,
            Some(other) => {
                self.error(
                    "store.on_error",
                    format!("{other:?} is not \"deny\" or \"allow\""),
                );
                OnStoreError::Deny
            }
        };
        // 0s would time out every store command: with on_error = "allow", that silently turns
        // replay protection off.
        let timeout = self.nonzero_duration(
            "store.timeout",
            raw.timeout.as_deref(),
            Duration::from_millis(100),
        );
        let revocation_max_lag = self.nonzero_duration(
            "store.revocation_max_lag",
            raw.revocation_max_lag.as_deref(),
            Duration::from_secs(5),
        );
        if raw.max_nonces.is_some() && matches!(backend, StoreBackend::Redis { .. }) {
            self.error(
                "store.max_nonces",
                "max_nonces bounds the memory store; Redis is bounded by its own maxmemory",
            );
        }
        let max_nonces = self.positive(
            "store.max_nonces",
            raw.max_nonces,
            crate::store::memory::DEFAULT_CAPACITY,
            false,
        );
        StoreConfig {
            backend,
            on_error,
            timeout,
            revocation_max_lag,
            max_nonces,
        }
    }

    fn jwt(&mut self, raw: raw::RawJwt) -> JwtConfig {
        let leeway = self.duration("jwt.leeway", raw.leeway.as_deref(), Duration::from_secs(30));
        if leeway > Duration::from_secs(300) {
            self.error(
                "jwt.leeway",
                "a leeway above 300s would accept long-expired tokens",
            );
        }
        let verified_cache = self.positive("jwt.verified_cache", raw.verified_cache, 10_000, true);
        let mut issuers = Vec::new();
        for (i, r) in raw.issuers.into_iter().enumerate() {
            let issuer = self.issuer(&format!("jwt.issuers[{i}]"), r);
            if issuers
                .iter()
                .any(|other: &IssuerConfig| other.issuer == issuer.issuer)
            {
                self.error(
                    format!("jwt.issuers[{i}].issuer"),
                    format!("{:?} is configured twice", issuer.issuer),
                );
            }
            issuers.push(issuer);
        }
        JwtConfig {
            leeway,
            verified_cache,
            issuers,
        }
    }

    fn issuer(&mut self, at: &str, raw: raw::RawIssuer) -> IssuerConfig {
        if raw.issuer.is_empty() {
            self.error(format!("{at}.issuer"), "must not be empty");
        }
        let mut algorithms = Vec::new();
        for (j, name) in raw.algorithms.iter().enumerate() {
            match crate::keys::parse_algorithm(name) {
                Some(a) if !algorithms.contains(&a) => algorithms.push(a),
                Some(_) => {}
                None => self.error(
                    format!("{at}.algorithms[{j}]"),
                    format!("{name:?} is not one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256 HS384 HS512"),
                ),
            }
        }
        if raw.algorithms.is_empty() {
            self.error(
                format!("{at}.algorithms"),
                "list the accepted algorithms, e.g. [\"RS256\"]",
            );
        }
        let jwks = match (raw.jwks_url, raw.jwks_file) {
            (Some(_), Some(_)) => {
                self.error(at, "give jwks_url or jwks_file, not both");
                None
            }
            (Some(url), None) => {
                match url.parse::<Uri>() {
                    Ok(u)
                        if matches!(u.scheme_str(), Some("http" | "https"))
                            && u.authority().is_some()
                            && port_ok(&u) => {}
                    _ => self.error(
                        format!("{at}.jwks_url"),
                        format!("{url:?} is not an http(s) URL with a host (and a port from 1 to 65535, if any)"),
                    ),
                }
                Some(JwksSource::Url(url))
            }
            (None, Some(file)) => {
                let key = format!("{at}.jwks_file");
                let path = self.existing_file(&key, &file);
                if path.is_file() {
                    self.jwks_file_keys(&key, &path, &algorithms);
                }
                Some(JwksSource::File(path))
            }
            (None, None) => None,
        };
        let mut secrets = Vec::new();
        for (j, s) in raw.secrets.iter().enumerate() {
            let path = format!("{at}.secrets[{j}]");
            if s.kid.is_empty() {
                self.error(format!("{path}.kid"), "must not be empty");
            } else if raw.secrets[..j].iter().any(|earlier| earlier.kid == s.kid) {
                // Keys are looked up by kid: a second secret under one kid would never be tried.
                self.error(
                    format!("{path}.kid"),
                    format!("{:?} is the kid of an earlier secret", s.kid),
                );
            }
            if let Some(secret) =
                self.secret(&path, "env", s.env.as_deref(), "file", s.file.as_deref())
            {
                secrets.push((s.kid.clone(), secret));
            }
        }
        let has_hmac = algorithms.iter().any(is_hmac);
        let has_public = algorithms.iter().any(|a| !is_hmac(a));
        if has_hmac && raw.secrets.is_empty() {
            self.error(format!("{at}.secrets"), "HS* algorithms need secrets");
        }
        if has_public && jwks.is_none() {
            self.error(at, "public-key algorithms need jwks_url or jwks_file");
        }
        if !has_hmac && !raw.secrets.is_empty() {
            self.error(
                format!("{at}.secrets"),
                "secrets are only used with HS256, HS384 or HS512 in algorithms",
            );
        }
        if jwks.is_none()
            && raw.secrets.is_empty()
            && !raw.algorithms.is_empty()
            && algorithms.is_empty()
        {
            self.error(at, "no keys: give jwks_url, jwks_file or secrets");
        }
        let required_claims = raw
            .required_claims
            .unwrap_or_else(|| vec!["sub".into(), "exp".into(), "iat".into()]);
        let max_lifetime = self.nonzero_duration(
            &format!("{at}.max_lifetime"),
            raw.max_lifetime.as_deref(),
            Duration::from_secs(24 * 3600),
        );
        let jwks_refresh = self.nonzero_duration(
            &format!("{at}.jwks_refresh"),
            raw.jwks_refresh.as_deref(),
            Duration::from_secs(300),
        );
        let jwks_min_refetch = self.nonzero_duration(
            &format!("{at}.jwks_min_refetch"),
            raw.jwks_min_refetch.as_deref(),
            Duration::from_secs(30),
        );
        let jwks_max_stale = self.nonzero_duration(
            &format!("{at}.jwks_max_stale"),
            raw.jwks_max_stale.as_deref(),
            Duration::from_secs(24 * 3600),
        );
        if jwks.is_some() && jwks_max_stale <= jwks_refresh {
            self.error(
                format!("{at}.jwks_max_stale"),
                format!(
                    "{} is not longer than jwks_refresh ({}): the keys would go stale between \
                     two refreshes, and every token be refused until the next",
                    humantime::format_duration(jwks_max_stale),
                    humantime::format_duration(jwks_refresh)
                ),
            );
        }
        if raw.audiences.is_empty() {
            if raw.permissions_claim.as_deref() == Some("aud") {
                self.error(
                    format!("{at}.permissions_claim"),
                    "\"aud\" needs audiences: without them a token that names an audience is refused",
                );
            } else {
                self.warnings.push(format!(
                    "{at} has no audiences: its tokens that name an audience (aud) are refused (RFC 7519 section 4.1.3)"
                ));
            }
        }
        IssuerConfig {
            issuer: raw.issuer,
            audiences: raw.audiences,
            algorithms,
            jwks,
            secrets,
            permissions_claim: raw
                .permissions_claim
                .unwrap_or_else(|| "permissions".into()),
            required_claims,
            max_lifetime,
            jwks_refresh,
            jwks_min_refetch,
            jwks_max_stale,
        }
    }

    fn signature(&mut self, raw: raw::RawSignature) -> SignatureConfig {
        let max_skew = self.nonzero_duration(
            "signature.max_skew",
            raw.max_skew.as_deref(),
            Duration::from_secs(300),
        );
        let mut keys: Vec<SignatureKey> = Vec::new();
        for (i, k) in raw.keys.into_iter().enumerate() {
            let at = format!("signature.keys[{i}]");
            if k.id.is_empty() || k.client.is_empty() {
                self.error(&at, "id and client must not be empty");
            }
            // Both go upstream as header values (`x-auth-key-id`, `x-auth-client`).
            for (field, text) in [("id", &k.id), ("client", &k.client)] {
                if !text.bytes().all(|b| b.is_ascii_graphic()) {
                    self.error(
                        format!("{at}.{field}"),
                        format!("{text:?} must be visible ASCII without spaces: it is sent upstream in a header"),
                    );
                }
            }
            if keys.iter().any(|other| other.id == k.id) {
                self.error(
                    format!("{at}.id"),
                    format!("{:?} is used by another key", k.id),
                );
            }
            let algorithm = match k.algorithm.as_deref() {
                None | Some("hmac-sha256") => SignatureAlgorithm::HmacSha256,
                Some("hmac-sha512") => SignatureAlgorithm::HmacSha512,
                Some(other) => {
                    self.error(
                        format!("{at}.algorithm"),
                        format!("{other:?} is not \"hmac-sha256\" or \"hmac-sha512\""),
                    );
                    SignatureAlgorithm::HmacSha256
                }
            };
            let not_before = k
                .not_before
                .as_deref()
                .and_then(|t| self.timestamp(&format!("{at}.not_before"), t));
            let not_after = k
                .not_after
                .as_deref()
                .and_then(|t| self.timestamp(&format!("{at}.not_after"), t));
            if let (Some(a), Some(b)) = (not_before, not_after) {
                if b <= a {
                    self.error(format!("{at}.not_after"), "must be later than not_before");
                }
            }
            let secret = self.secret(
                &at,
                "secret_env",
                k.secret_env.as_deref(),
                "secret_file",
                k.secret_file.as_deref(),
            );
            if let Some(secret) = secret {
                keys.push(SignatureKey {
                    id: k.id,
                    client: k.client,
                    secret,
                    algorithm,
                    not_before,
                    not_after,
                });
            }
        }
        SignatureConfig { max_skew, keys }
    }

    fn timestamp(&mut self, path: &str, text: &str) -> Option<SystemTime> {
        match humantime::parse_rfc3339(text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(
                    path,
                    format!(
                        "{text:?} is not an RFC 3339 time such as \"2026-11-01T00:00:00Z\" ({e})"
                    ),
                );
                None
            }
        }
    }

    fn route(
        &mut self,
        i: usize,
        raw: raw::RawRoute,
        jwt: &JwtConfig,
        signature: &SignatureConfig,
        tls: Option<&TlsConfig>,
    ) -> Option<Route> {
        let at = format!("routes[{i}]");
        let errors_before = self.errors.len();
        if raw.name.is_empty() {
            self.error(format!("{at}.name"), "must not be empty");
        } else if raw.name.contains(':') || !raw.name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            // The name is quoted in the RateLimit headers (a structured-field string: printable
            // ASCII), and starts the route's rate-limit keys, `<route>:<caller>`, where a `:`
            // in it would let a caller of one route count against another's.
            self.error(
                format!("{at}.name"),
                format!("{:?} must be printable ASCII without ':'", raw.name),
            );
        }
        if raw.path_prefix.contains(['?', '#']) {
            self.error(
                format!("{at}.path_prefix"),
                format!(
                    "{:?} holds '?' or '#', which end a request's path: routes match the path \
                     alone, never the query",
                    raw.path_prefix
                ),
            );
        }
        let path_prefix = match path::normalize(&raw.path_prefix) {
            // Kept with its escapes decoded: requests are matched in that spelling.
            Ok(p) if p == raw.path_prefix && (p == "/" || !p.ends_with('/')) => {
                match path::decoded(&p) {
                    Ok(decoded) => decoded.into_owned(),
                    Err(e) => {
                        self.error(
                            format!("{at}.path_prefix"),
                            format!("{:?}: {e}", raw.path_prefix),
                        );
                        p.into_owned()
                    }
                }
            }
            Ok(p) => {
                self.error(
                    format!("{at}.path_prefix"),
                    format!(
                        "{:?} is not in normal form; write {:?}",
                        raw.path_prefix,
                        p.trim_end_matches('/')
                    ),
                );
                p.into_owned()
            }
            Err(e) => {
                self.error(
                    format!("{at}.path_prefix"),
                    format!("{:?}: {e}", raw.path_prefix),
                );
                raw.path_prefix.clone()
            }
        };
        let methods = raw.methods.as_ref().map(|ms| {
            let mut out = Vec::new();
            for (j, m) in ms.iter().enumerate() {
                let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
                match Method::from_bytes(m.as_bytes()) {
                    Ok(Method::CONNECT) => self.error(
                        format!("{at}.methods[{j}]"),
                        "CONNECT asks for a tunnel, which portcullis does not proxy",
                    ),
                    Ok(method) if valid => out.push(method),
                    _ => self.error(
                        format!("{at}.methods[{j}]"),
                        format!("{m:?} is not an upper-case HTTP method"),
                    ),
                }
            }
            if ms.is_empty() {
                self.error(
                    format!("{at}.methods"),
                    "an empty list allows nothing; leave methods out to allow any",
                );
            }
            out
        });
        let mut require = Requirements::default();
        for (j, r) in raw.require.iter().enumerate() {
            match r.as_str() {
                "jwt" => require.jwt = true,
                "signature" => require.signature = true,
                "mtls" => require.mtls = true,
                other => self.error(
                    format!("{at}.require[{j}]"),
                    format!("{other:?} is not \"mtls\", \"signature\" or \"jwt\""),
                ),
            }
        }
        if require.jwt && jwt.issuers.is_empty() {
            self.error(
                format!("{at}.require"),
                "\"jwt\" needs at least one [[jwt.issuers]]",
            );
        }
        if require.signature && signature.keys.is_empty() {
            self.error(
                format!("{at}.require"),
                "\"signature\" needs at least one [[signature.keys]]",
            );
        }
        if require.mtls && tls.and_then(|t| t.client_ca.as_ref()).is_none() {
            self.error(
                format!("{at}.require"),
                "\"mtls\" needs server.tls.client_ca",
            );
        }
        if !raw.permissions.is_empty() && !require.jwt {
            self.error(
                format!("{at}.permissions"),
                "permissions come from the JWT: add \"jwt\" to require",
            );
        }
        let content_types = raw.content_types.as_ref().map(|cts| {
            cts.iter()
                .enumerate()
                .filter_map(|(j, ct)| {
                    let lower = ct.trim().to_ascii_lowercase();
                    let valid = lower.split_once('/').is_some_and(|(a, b)| {
                        !a.is_empty()
                            && !b.is_empty()
                            && !lower.contains(';')
                            && !lower.contains(' ')
                    });
                    if valid {
                        Some(lower)
                    } else {
                        self.error(
                            format!("{at}.content_types[{j}]"),
                            format!("{ct:?} is not a media type such as \"application/json\""),
                        );
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        let rate_limit = raw.rate_limit.as_ref().map(|rl| {
            let per = self.duration(
                &format!("{at}.rate_limit.per"),
                Some(&rl.per),
                Duration::from_secs(60),
            );
            if rl.requests < 1 {
                self.error(format!("{at}.rate_limit.requests"), "must be at least 1");
            }
            if per < Duration::from_secs(1) {
                self.error(format!("{at}.rate_limit.per"), "must be at least 1s");
            } else if u128::try_from(rl.requests).is_ok_and(|n| n > per.as_micros()) {
                // The limiter spaces requests at least 1 µs apart (`store::ratelimit`): more
                // would pass fewer than the RateLimit-Policy header promises.
                self.error(
                    format!("{at}.rate_limit.requests"),
                    format!(
                        "route {:?} allows {} requests per {}: more than one a microsecond, the finest rate the limiter keeps",
                        raw.name, rl.requests, rl.per
                    ),
                );
            }
            let key = match rl.key.as_str() {
                "subject" => RateLimitKey::Subject,
                "client" => RateLimitKey::Client,
                "certificate" => RateLimitKey::Certificate,
                "ip" => RateLimitKey::Ip,
                other => {
                    self.error(
                        format!("{at}.rate_limit.key"),
                        format!(
                            "{other:?} is not \"subject\", \"client\", \"certificate\" or \"ip\""
                        ),
                    );
                    RateLimitKey::Ip
                }
            };
            let needs = match key {
                RateLimitKey::Subject if !require.jwt => {
                    Some("\"subject\" needs \"jwt\" in require")
                }
                RateLimitKey::Client if !require.signature => {
                    Some("\"client\" needs \"signature\" in require")
                }
                RateLimitKey::Certificate if !require.mtls => {
                    Some("\"certificate\" needs \"mtls\" in require")
                }
                _ => None,
            };
            if let Some(message) = needs {
                self.error(format!("{at}.rate_limit.key"), message);
            }
            RateLimit {
                requests: rl.requests.max(1) as u64,
                per,
                key,
            }
        });
        let client_certs = raw.client_certs.as_ref().map(|cc| {
            let mut spki = Vec::new();
            for (j, pin) in cc.spki_sha256.iter().enumerate() {
                match decode_pin(pin) {
                    Some(p) => spki.push(p),
                    None => self.error(
                        format!("{at}.client_certs.spki_sha256[{j}]"),
                        format!("{pin:?} is not the base64 of 32 bytes"),
                    ),
                }
            }
            if !require.mtls {
                self.error(
                    format!("{at}.client_certs"),
                    "client_certs needs \"mtls\" in require",
                );
            }
            ClientCertAllowList {
                dns: cc.dns.clone(),
                uri: cc.uri.clone(),
                spki_sha256: spki,
            }
        });
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route {
            name: Arc::new(raw.name),
            path_prefix,
            methods,
            require,
            permissions: raw.permissions,
            content_types,
            rate_limit,
            client_certs,
        })
    }

    /// A rate limit by subject refuses a token without `sub` (nobody to count), so an issuer
    /// that does not require `sub` has tokens such a route turns away.
    fn subject_limit_warnings(&mut self, routes: &[Route], jwt: &JwtConfig) {
        for (i, route) in routes.iter().enumerate() {
            let by_subject = route
                .rate_limit
                .as_ref()
                .is_some_and(|l| l.key == RateLimitKey::Subject);
            if !by_subject {
                continue;
            }
            for (j, issuer) in jwt.issuers.iter().enumerate() {
                if !issuer.required_claims.iter().any(|c| c == "sub") {
                    self.warnings.push(format!(
                        "routes[{i}] ({:?}) counts its rate limit by subject, and jwt.issuers[{j}] does not require sub: its tokens without one are refused there (401 missing_claim)",
                        route.name
                    ));
                }
            }
        }
    }

    fn route_warnings(&mut self, routes: &[Route]) {
        if routes.is_empty() {
            self.warnings
                .push("no [[routes]]: every request will be 404 no_route".into());
        }
        for (j, later) in routes.iter().enumerate() {
            for (i, earlier) in routes[..j].iter().enumerate() {
                let covers_path = path::prefix_matches(&earlier.path_prefix, &later.path_prefix);
                let covers_methods = match (&earlier.methods, &later.methods) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
                };
                if covers_path && covers_methods {
                    self.warnings.push(format!(
                        "routes[{j}] ({:?}) is shadowed by routes[{i}] ({:?}): it can never match",
                        later.name, earlier.name
                    ));
                    break;
                }
            }
        }
    }
}

fn is_hmac(a: &Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn decode_pin(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:8000\"\n";

    fn parse(extra: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Config::parse(&format!("{UPSTREAM}{extra}"), Path::new("."), &lookup)
    }

    fn errors(extra: &str, env: &[(&str, &str)]) -> Vec<String> {
        match parse(extra, env) {
            Ok(_) => panic!("accepted:\n{extra}"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn settings_the_proxy_could_only_fail_on_later_are_refused() {
        let issuer = |extra: &str| {
            format!(
                "[[jwt.issuers]]\nissuer = \"https://i.test\"\naudiences = [\"api\"]\n\
                 algorithms = [\"RS256\"]\njwks_url = \"https://i.test/jwks\"\n{extra}"
            )
        };
        // Keys refreshed every 10m but stale after 5m: refused between refreshes.
        let e = errors(
            &issuer("jwks_refresh = \"10m\"\njwks_max_stale = \"5m\"\n"),
            &[],
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "jwt.issuers[0].jwks_max_stale: 5m is not longer than jwks_refresh (10m)"
            ),
            "{e:?}"
        );
        let e = errors(
            &issuer("jwks_refresh = \"5m\"\njwks_max_stale = \"5m\"\n"),
            &[],
        );
        assert!(e[0].contains("is not longer than jwks_refresh"), "{e:?}");
        for key in ["jwks_max_stale", "max_lifetime"] {
            assert_eq!(
                errors(&issuer(&format!("{key} = \"0s\"\n")), &[]),
                [format!("jwt.issuers[0].{key}: must be more than 0s")]
            );
        }
        let c = parse(
            &issuer("jwks_refresh = \"5m\"\njwks_max_stale = \"6m\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.jwt.issuers[0].jwks_max_stale, Duration::from_secs(360));

        // Ports no connection can be made to.
        for port in ["99999", "0", "65536"] {
            let e = match Config::parse(
                &format!("[upstream]\nurl = \"http://127.0.0.1:{port}\"\n"),
                Path::new("."),
                &|_| None,
            ) {
                Ok(_) => panic!("port {port} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.starts_with("upstream.url:")
                    && e.contains("the port is not a number from 1 to 65535"),
                "{e}"
            );
            let e = errors(
                &format!(
                    "[[jwt.issuers]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\n\
                     jwks_url = \"https://i.test:{port}/jwks\"\n"
                ),
                &[],
            );
            assert!(
                e.iter().any(|e| e.starts_with("jwt.issuers[0].jwks_url:")),
                "{e:?}"
            );
        }
        assert_eq!(
            parse("", &[]).unwrap().upstream.url.port_u16(),
            Some(8000),
            "the test's own upstream has a port"
        );

        // Two kids alike: the second secret would never be tried.
        let e = errors(
            "[[jwt.issuers]]\nissuer = \"i\"\nalgorithms = [\"HS256\"]\n\
             secrets = [{kid = \"k\", env = \"A\"}, {kid = \"k\", env = \"B\"}]\n",
            &[("A", &"a".repeat(32)), ("B", &"b".repeat(32))],
        );
        assert_eq!(
            e,
            ["jwt.issuers[0].secrets[1].kid: \"k\" is the kid of an earlier secret"]
        );

        // A query or fragment in a route's prefix: never part of a request's path.
        for prefix in ["/health?x=1", "/a#b"] {
            let e = errors(
                &format!("[[routes]]\nname = \"r\"\npath_prefix = \"{prefix}\"\n"),
                &[],
            );
            assert!(
                e.iter().any(|e| e.starts_with("routes[0].path_prefix:")
                    && e.contains("which end a request's path")),
                "{prefix}: {e:?}"
            );
        }
    }

    #[test]
    fn listen_addresses_that_overlap_are_refused() {
        for (server, admin) in [
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("0.0.0.0:9000", "10.1.2.3:9000"),
            ("[::]:9000", "127.0.0.1:9000"),
            ("[::1]:9000", "[::]:9000"),
        ] {
            let e = errors(
                &format!("[server]\nlisten = \"{server}\"\n[admin]\nlisten = \"{admin}\"\n"),
                &[],
            );
            assert_eq!(e.len(), 1, "{server} {admin}: {e:?}");
            assert!(e[0].starts_with("admin.listen:"), "{e:?}");
        }
        for (server, admin) in [
            ("127.0.0.1:9000", "127.0.0.1:9001"),
            ("127.0.0.1:9000", "127.0.0.2:9000"),
            ("0.0.0.0:9000", "[::1]:9000"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            parse(
                &format!("[server]\nlisten = \"{server}\"\n[admin]\nlisten = \"{admin}\"\n"),
                &[],
            )
            .unwrap_or_else(|e| panic!("{server} {admin}: {e}"));
        }
    }

    #[test]
    fn a_jwks_file_the_key_store_could_not_use_is_refused() {
        // RFC 8037, appendix A: an Ed25519 public key.
        let ed25519 = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("good.json", ed25519),
            ("not-json.json", "-----BEGIN PUBLIC KEY-----"),
            ("no-keys.json", r#"{"keys": "nope"}"#),
            ("empty.json", r#"{"keys": []}"#),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let with = |file: &str, alg: &str| {
            Config::parse(
                &format!(
                    "{UPSTREAM}[[jwt.issuers]]\nissuer = \"i\"\nalgorithms = [\"{alg}\"]\n\
                     jwks_file = \"{file}\"\n"
                ),
                dir.path(),
                &|_| None,
            )
        };
        with("good.json", "EdDSA").unwrap();
        for (file, alg, why) in [
            ("not-json.json", "EdDSA", "the JWKS is not JSON"),
            ("no-keys.json", "EdDSA", "the JWKS has no \"keys\" array"),
            (
                "empty.json",
                "EdDSA",
                "the JWKS holds no usable signature key",
            ),
            (
                "good.json",
                "RS256",
                "holds no key usable with the issuer's algorithms",
            ),
        ] {
            let e = match with(file, alg) {
                Ok(_) => panic!("{file} accepted for {alg}"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.starts_with("jwt.issuers[0].jwks_file:") && e.contains(why),
                "{file}: {e}"
            );
        }
    }

    #[test]
    fn zero_durations_that_would_break_requests_are_refused() {
        // A zero store timeout fails every store command (with on_error = "allow": no replay
        // protection at all); zero upstream timeouts fail every request; a zero refetch
        // interval refetches the JWKS for every unknown kid.
        let issuer = |key: &str| {
            format!(
                "[[jwt.issuers]]\nissuer = \"https://i.test\"\naudiences = [\"api\"]\nalgorithms = [\"RS256\"]\n\
                 jwks_url = \"https://i.test/jwks\"\n{key} = \"0s\"\n"
            )
        };
        for (key, extra) in [
            ("store.timeout", "[store]\ntimeout = \"0s\"\n".to_owned()),
            (
                "store.revocation_max_lag",
                "[store]\nrevocation_max_lag = \"0ms\"\n".to_owned(),
            ),
            (
                "upstream.connect_timeout",
                "connect_timeout = \"0s\"\n".to_owned(),
            ),
            (
                "upstream.request_timeout",
                "request_timeout = \"0s\"\n".to_owned(),
            ),
            (
                "jwt.issuers[0].jwks_min_refetch",
                issuer("jwks_min_refetch"),
            ),
            ("jwt.issuers[0].jwks_refresh", issuer("jwks_refresh")),
            (
                "server.header_read_timeout",
                "[server]\nheader_read_timeout = \"0s\"\n".to_owned(),
            ),
            (
                "signature.max_skew",
                "[signature]\nmax_skew = \"0s\"\n".to_owned(),
            ),
        ] {
            assert_eq!(
                errors(&extra, &[]),
                [format!("{key}: must be more than 0s")],
                "{extra}"
            );
        }
        let c = parse(
            "connect_timeout = \"1ms\"\n[store]\ntimeout = \"1ms\"\nrevocation_max_lag = \"1ms\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(1));
        assert_eq!(c.store.timeout, Duration::from_millis(1));
    }

    #[test]
    fn an_admin_token_no_client_can_send_is_refused() {
        let token = "0123456789abcdef0123456789abcdef";
        for (value, why) in [
            (format!("{token}\n"), "starts or ends with whitespace"),
            (format!("{token} "), "starts or ends with whitespace"),
            (format!("\t{token}"), "starts or ends with whitespace"),
            (format!("{token}\u{7f}x"), "holds a control character"),
            (format!("{token}\nx"), "holds a control character"),
        ] {
            let e = errors("[admin]\ntoken_env = \"T\"\n", &[("T", value.as_str())]);
            assert_eq!(e.len(), 1, "{value:?}: {e:?}");
            assert!(
                e[0].starts_with(&format!("admin.token_env: the admin token {why}")),
                "{value:?}: {e:?}"
            );
            assert!(!e[0].contains(token), "the token is repeated: {e:?}");
        }
        // The file's trailing newline is trimmed; a space before it is not.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok"), format!("{token}\n")).unwrap();
        std::fs::write(dir.path().join("space"), format!("{token} \n")).unwrap();
        let from_file = |name: &str| {
            Config::parse(
                &format!("{UPSTREAM}[admin]\ntoken_file = \"{name}\"\n"),
                dir.path(),
                &|_| None,
            )
        };
        let c = from_file("ok").unwrap();
        assert_eq!(c.admin.token.unwrap().expose(), token.as_bytes());
        let e = from_file("space").unwrap_err().to_string();
        assert!(
            e.starts_with("admin.token_file: the admin token starts or ends with whitespace"),
            "{e}"
        );
        // Too short: the message is about the admin token, not HMAC secrets.
        assert_eq!(
            errors("[admin]\ntoken_env = \"T\"\n", &[("T", "short-token")]),
            ["admin.token_env: the admin token is 11 bytes; it must be at least 32 bytes"]
        );
        let c = parse(
            "[admin]\ntoken_env = \"T\"\n",
            &[("T", "a token with inner spaces, 32 bytes")],
        )
        .unwrap();
        assert!(c.admin.token.is_some());
    }

    #[test]
    fn a_rate_limit_of_more_than_one_request_a_microsecond_is_refused() {
        let route = |requests: u64, per: &str| {
            format!(
                "[[routes]]\nname = \"bulk\"\npath_prefix = \"/\"\n\
                 rate_limit = {{ requests = {requests}, per = \"{per}\", key = \"ip\" }}\n"
            )
        };
        assert_eq!(
            errors(&route(1_000_001, "1s"), &[]),
            ["routes[0].rate_limit.requests: route \"bulk\" allows 1000001 requests per 1s: more than one a microsecond, the finest rate the limiter keeps"]
        );
        let e = errors(&route(u64::MAX >> 1, "1h"), &[]);
        assert!(e[0].starts_with("routes[0].rate_limit.requests: "), "{e:?}");
        for (requests, per) in [(1_000_000, "1s"), (60_000_000, "1m")] {
            let c = parse(&route(requests, per), &[]).unwrap();
            let limit = c.routes[0].rate_limit.as_ref().unwrap();
            assert_eq!(limit.requests, requests);
            // What the limiter does with it: one request a microsecond, not fewer.
            assert_eq!(
                crate::store::ratelimit::emission_us(limit.requests, limit.per),
                1
            );
        }
    }

    #[test]
    fn redis_urls_are_parsed_as_the_store_parses_them() {
        for (url, why) in [
            ("redis-sentinel://127.0.0.1:26379", "sentinel service name"),
            ("redis://127.0.0.1:abc/0", "InvalidPort"),
            ("redis://127.0.0.1:6379/0/1", "Invalid database path"),
            ("redis-cluster://h1:7000,h2:x", ""),
        ] {
            let e = errors(
                &format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\n"),
                &[],
            );
            assert_eq!(e.len(), 1, "{url}: {e:?}");
            assert!(
                e[0].starts_with("store.url: the store url is invalid: ") && e[0].contains(why),
                "{url}: {e:?}"
            );
        }
        // From the environment, with a password that the error does not repeat.
        let e = errors(
            "[store]\nbackend = \"redis\"\nurl_env = \"R\"\n",
            &[("R", "redis-sentinel://:hunter2@127.0.0.1:26379")],
        );
        assert!(e[0].starts_with("store.url: "), "{e:?}");
        assert!(!e[0].contains("hunter2"), "{e:?}");
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://cache.example.org:6380/1",
            "redis-cluster://h1:7000,h2:7001",
            "redis-sentinel://s1:26379,s2:26379/0?sentinelServiceName=main",
        ] {
            let text = format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\n");
            assert!(parse(&text, &[]).is_ok(), "{url}");
        }
    }

    #[test]
    fn durations_past_ten_years_are_refused() {
        // 300000000000y would overflow `max_skew * 2` on every signed request.
        for (key, extra) in [
            (
                "signature.max_skew",
                "[signature]\nmax_skew = \"300000000000y\"\n",
            ),
            ("upstream.request_timeout", "request_timeout = \"3651d\"\n"),
            (
                "server.drain_timeout",
                "[server]\ndrain_timeout = \"11y\"\n",
            ),
        ] {
            let e = errors(extra, &[]);
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with(&format!("{key}: ")) && e[0].contains("at most 3650d"),
                "{e:?}"
            );
        }
        let c = parse("[signature]\nmax_skew = \"3650d\"\n", &[]).unwrap();
        assert_eq!(c.signature.max_skew, MAX_DURATION);
    }

    #[test]
    fn signing_key_ids_and_clients_must_be_header_safe() {
        let key = |id: &str, client: &str| {
            format!(
                "[signature]\n[[signature.keys]]\nid = \"{id}\"\nclient = \"{client}\"\nsecret_env = \"S\"\n"
            )
        };
        let secret = [("S", "0123456789abcdef0123456789abcdef")];
        for (id, client, path) in [
            ("k-1", "b\u{fc}ro-7", "signature.keys[0].client"),
            ("k-1", "client 42", "signature.keys[0].client"),
            ("k\u{e9}", "c", "signature.keys[0].id"),
        ] {
            let e = errors(&key(id, client), &secret);
            assert!(
                e.iter()
                    .any(|e| e.starts_with(&format!("{path}: ")) && e.contains("visible ASCII")),
                "{id:?} {client:?}: {e:?}"
            );
        }
        assert!(parse(&key("client-42-2026-11", "client-42"), &secret).is_ok());
    }

    #[test]
    fn route_names_are_unique_printable_and_without_colons() {
        // Route `i` on its own path, so that only its name can be wrong.
        let routes = |names: &[&str]| -> String {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    format!("[[routes]]\nname = \"{name}\"\npath_prefix = \"/r{i}\"\n")
                })
                .collect()
        };
        for (names, path, why) in [
            (&["api:v2"][..], "routes[0].name", "without ':'"),
            (&["b\u{fc}ro"], "routes[0].name", "without ':'"),
            (&["tab\there"], "routes[0].name", "without ':'"),
            (&["api", "api"], "routes[1].name", "used by another route"),
        ] {
            let e = errors(&routes(names), &[]);
            assert!(
                e.iter()
                    .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(why)),
                "{names:?}: {e:?}"
            );
        }
        assert!(parse(&routes(&["Transactions API v2", "api"]), &[]).is_ok());
    }

    #[test]
    fn a_subject_limit_with_an_issuer_that_does_not_require_sub_is_worth_a_warning() {
        let config = |claims: &str| {
            format!(
                "[[jwt.issuers]]\nissuer = \"https://i.test\"\naudiences = [\"api\"]\nalgorithms = [\"HS256\"]\n\
                 secrets = [{{ kid = \"k\", env = \"S\" }}]\n{claims}\n\
                 [[routes]]\nname = \"limited\"\npath_prefix = \"/\"\nrequire = [\"jwt\"]\n\
                 rate_limit = {{ requests = 10, per = \"1s\", key = \"subject\" }}\n"
            )
        };
        let secret = [("S", "0123456789abcdef0123456789abcdef")];
        let warned = |c: &Config| {
            c.warnings
                .iter()
                .any(|w| w.contains("does not require sub"))
        };
        let c = parse(&config("required_claims = [\"exp\"]"), &secret).unwrap();
        assert!(warned(&c), "{:?}", c.warnings);
        assert!(c.warnings.iter().any(|w| w.starts_with(
            "routes[0] (\"limited\") counts its rate limit by subject, and jwt.issuers[0]"
        )));
        // The default required claims include sub.
        let c = parse(&config(""), &secret).unwrap();
        assert!(!warned(&c), "{:?}", c.warnings);
    }

    #[test]
    fn an_issuer_without_audiences_is_worth_a_warning() {
        let issuer = |extra: &str| {
            format!(
                "[[jwt.issuers]]\nissuer = \"https://i.test\"\nalgorithms = [\"HS256\"]\nsecrets = [{{ kid = \"k\", env = \"S\" }}]\n{extra}"
            )
        };
        let secret = [("S", "0123456789abcdef0123456789abcdef")];
        let c = parse(&issuer(""), &secret).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("jwt.issuers[0] has no audiences")),
            "{:?}",
            c.warnings
        );
        let c = parse(&issuer("audiences = [\"api\"]\n"), &secret).unwrap();
        assert!(
            !c.warnings.iter().any(|w| w.contains("audiences")),
            "{:?}",
            c.warnings
        );
        let e = errors(&issuer("permissions_claim = \"aud\"\n"), &secret);
        assert!(
            e.iter()
                .any(|e| e.starts_with("jwt.issuers[0].permissions_claim: ")
                    && e.contains("needs audiences")),
            "{e:?}"
        );
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.store.on_error, OnStoreError::Deny);
        assert_eq!(c.server.max_body_bytes, 1 << 20);
        assert_eq!(c.admin.listen.ip().to_string(), "127.0.0.1");
        assert_eq!(c.warnings.len(), 1, "no routes is worth a warning");
    }

    #[test]
    fn redis_urls_with_credentials_come_from_the_environment() {
        let e = errors(
            "[store]\nbackend = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:6379/0\"\n",
            &[],
        );
        assert!(
            e[0].starts_with("store.url: a URL with credentials is a secret"),
            "{e:?}"
        );
        assert!(!e[0].contains("hunter2"));
        let c = parse(
            "[store]\nbackend = \"redis\"\nurl_env = \"REDIS_URL\"\n",
            &[("REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")],
        )
        .unwrap();
        assert_eq!(
            c.store.backend,
            StoreBackend::Redis {
                url: "redis://:hunter2@127.0.0.1:6379/0".into()
            }
        );
        let e = errors(
            "[store]\nbackend = \"redis\"\nurl_env = \"X\"\n",
            &[("X", "http://:pw@h")],
        );
        assert!(
            e[0].starts_with("store.url: the URL must start with"),
            "{e:?}"
        );
        assert!(!e[0].contains(":pw@"));
    }

    #[test]
    fn max_connections_is_positive_and_bounded() {
        assert_eq!(
            parse("", &[]).unwrap().server.max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        let c = parse("[server]\nmax_connections = 2\n", &[]).unwrap();
        assert_eq!(c.server.max_connections, 2);
        for (value, want) in [
            ("0", "0 is out of range: it must be at least 1"),
            ("-5", "-5 is out of range: it must be at least 1"),
            ("1000001", "1000001 is more than 1000000"),
        ] {
            let e = errors(&format!("[server]\nmax_connections = {value}\n"), &[]);
            assert_eq!(e, [format!("server.max_connections: {want}")], "{value}");
        }
    }

    #[test]
    fn strip_headers_are_header_names_the_checks_do_not_read() {
        let c = parse(
            "[server]\nstrip_headers = [\"X-Debug-User\", \" x-internal \"]\n",
            &[],
        )
        .unwrap();
        let names: Vec<&str> = c.server.strip_headers.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["x-debug-user", "x-internal"]);
        assert!(parse("", &[]).unwrap().server.strip_headers.is_empty());
        let e = errors(
            "[server]\nstrip_headers = [\"Authorization\", \"bad name\", \"\", \"x-ok\", \"host\"]\n",
            &[],
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with(
                "server.strip_headers[0]: \"Authorization\" is read by the proxy's checks"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("server.strip_headers[1]: \"bad name\" is not a header name"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("server.strip_headers[2]: \"\" is not a header name"),
            "{e:?}"
        );
        assert!(
            e[3].starts_with("server.strip_headers[4]: \"host\" is read"),
            "{e:?}"
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let c = parse(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\", \"0.0.0.0/0\"]\n",
            &[],
        )
        .unwrap();
        let nets = &c.server.trusted_proxies;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(nets[0].contains(ip("10.255.0.1")));
        assert!(!nets[0].contains(ip("11.0.0.1")));
        // An IPv4 client seen through an IPv6 socket is the same client.
        assert!(nets[0].contains(ip("::ffff:10.1.2.3")));
        assert!(nets[1].contains(ip("192.0.2.7")));
        assert!(!nets[1].contains(ip("192.0.2.8")));
        assert!(nets[2].contains(ip("fd12::1")));
        assert!(!nets[2].contains(ip("fe80::1")));
        assert!(!nets[2].contains(ip("10.0.0.1")));
        assert!(nets[3].contains(ip("203.0.113.9")));
        assert!(!nets[3].contains(ip("::1")));
        assert!(parse("", &[]).unwrap().server.trusted_proxies.is_empty());

        let e = errors(
            "[server]\ntrusted_proxies = [\"10.0.0.1/8\", \"10.0.0.0/33\", \"::/+8\", \"lb.internal\"]\n",
            &[],
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with("server.trusted_proxies[0]: \"10.0.0.1/8\" has address bits set beyond its /8 (the network is 10.0.0.0/8)"),
            "{e:?}"
        );
        assert!(e[1].contains("from 0 to 32"), "{e:?}");
        assert!(e[2].contains("from 0 to 128"), "{e:?}");
        assert!(e[3].contains("is not an IP address"), "{e:?}");
    }

    #[test]
    fn a_route_cannot_allow_connect() {
        let e = errors(
            "[[routes]]\nname = \"tunnel\"\npath_prefix = \"/\"\nmethods = [\"GET\", \"CONNECT\"]\n",
            &[],
        );
        assert_eq!(
            e,
            ["routes[0].methods[1]: CONNECT asks for a tunnel, which portcullis does not proxy"]
        );
    }

    #[test]
    fn max_nonces_bounds_the_memory_store_only() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.store.max_nonces, crate::store::memory::DEFAULT_CAPACITY);
        let c = parse("[store]\nmax_nonces = 250000\n", &[]).unwrap();
        assert_eq!(c.store.max_nonces, 250_000);
        assert_eq!(
            errors("[store]\nmax_nonces = 0\n", &[]),
            ["store.max_nonces: 0 is out of range: it must be at least 1"]
        );
        assert_eq!(
            errors(
                "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nmax_nonces = 1000\n",
                &[]
            ),
            ["store.max_nonces: max_nonces bounds the memory store; Redis is bounded by its own maxmemory"]
        );
    }

    #[test]
    fn issuer_key_sources_are_checked() {
        let e = errors(
            "[[jwt.issuers]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://a/j\"\njwks_file = \"j.json\"\n",
            &[],
        );
        assert!(
            e.iter()
                .any(|e| e == "jwt.issuers[0]: give jwks_url or jwks_file, not both"),
            "{e:?}"
        );
        let e = errors(
            "[[jwt.issuers]]\nissuer = \"i\"\nalgorithms = [\"HS256\", \"none\"]\n",
            &[],
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("jwt.issuers[0].algorithms[1]: \"none\" is not one of")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e == "jwt.issuers[0].secrets: HS* algorithms need secrets"),
            "{e:?}"
        );
    }

    #[test]
    fn signature_keys_need_long_secrets_and_sane_windows() {
        let e = errors(
            "[[signature.keys]]\nid = \"k\"\nclient = \"c\"\nsecret_env = \"S\"\nnot_before = \"2026-12-01T00:00:00Z\"\nnot_after = \"2026-11-01T00:00:00Z\"\n",
            &[("S", "short")],
        );
        assert!(
            e.iter()
                .any(|e| e == "signature.keys[0].not_after: must be later than not_before"),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("signature.keys[0]: the secret is 5 bytes")),
            "{e:?}"
        );
    }

    #[test]
    fn routes_are_checked_and_shadowing_is_warned() {
        let e = errors("[[routes]]\nname = \"a\"\npath_prefix = \"/api/../x/\"\nrequire = [\"jwt\", \"magic\"]\n", &[]);
        assert!(
            e.iter().any(|e| e.starts_with("routes[0].path_prefix: ")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.starts_with("routes[0].require[1]: ")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("routes[0].require: \"jwt\" needs")),
            "{e:?}"
        );
        let c = parse(
            "[[routes]]\nname = \"all\"\npath_prefix = \"/api\"\n[[routes]]\nname = \"sub\"\npath_prefix = \"/api/v1\"\nmethods = [\"GET\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("routes[1] (\"sub\") is shadowed by routes[0]"));
    }

    #[test]
    fn rate_limit_keys_need_the_check_that_provides_them() {
        for (key, needs) in [
            ("subject", "jwt"),
            ("client", "signature"),
            ("certificate", "mtls"),
        ] {
            let e = errors(
                &format!("[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nrate_limit = {{ requests = 1, per = \"1s\", key = \"{key}\" }}\n"),
                &[],
            );
            assert!(
                e.iter().any(|e| e
                    == &format!(
                        "routes[0].rate_limit.key: \"{key}\" needs \"{needs}\" in require"
                    )),
                "{e:?}"
            );
        }
        let c = parse("[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nrate_limit = { requests = 5, per = \"10s\", key = \"ip\" }\n", &[]).unwrap();
        assert_eq!(c.routes[0].rate_limit.as_ref().unwrap().requests, 5);
    }
}
