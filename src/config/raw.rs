//! The serde mirror of the TOML file. Every section denies unknown keys; values that need
//! checking (durations, addresses, algorithms, enums) stay strings here so that
//! [`super::validate`] can report every bad value at once, each with its key path.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    pub(crate) upstream: Option<RawUpstream>,
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    #[serde(default)]
    pub(crate) store: RawStore,
    #[serde(default)]
    pub(crate) jwt: RawJwt,
    #[serde(default)]
    pub(crate) signature: RawSignature,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Option<String>,
    pub(crate) threads: Option<i64>,
    pub(crate) drain_timeout: Option<String>,
    pub(crate) max_body_bytes: Option<i64>,
    pub(crate) header_read_timeout: Option<String>,
    pub(crate) busy_poll: Option<bool>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) strip_headers: Option<Vec<String>>,
    pub(crate) max_connections: Option<i64>,
    pub(crate) tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: String,
    pub(crate) key: String,
    pub(crate) client_ca: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) min_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) url: String,
    pub(crate) connect_timeout: Option<String>,
    pub(crate) request_timeout: Option<String>,
    pub(crate) ca: Option<String>,
    #[serde(default)]
    pub(crate) pins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<String>,
    pub(crate) token_env: Option<String>,
    pub(crate) token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) backend: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) url_env: Option<String>,
    pub(crate) url_file: Option<String>,
    pub(crate) on_error: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) revocation_max_lag: Option<String>,
    pub(crate) max_nonces: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    pub(crate) leeway: Option<String>,
    pub(crate) verified_cache: Option<i64>,
    #[serde(default)]
    pub(crate) issuers: Vec<RawIssuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIssuer {
    pub(crate) issuer: String,
    #[serde(default)]
    pub(crate) audiences: Vec<String>,
    #[serde(default)]
    pub(crate) algorithms: Vec<String>,
    pub(crate) jwks_url: Option<String>,
    pub(crate) jwks_file: Option<String>,
    #[serde(default)]
    pub(crate) secrets: Vec<RawSecretRef>,
    pub(crate) permissions_claim: Option<String>,
    pub(crate) required_claims: Option<Vec<String>>,
    pub(crate) max_lifetime: Option<String>,
    pub(crate) jwks_refresh: Option<String>,
    pub(crate) jwks_min_refetch: Option<String>,
    pub(crate) jwks_max_stale: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecretRef {
    pub(crate) kid: String,
    pub(crate) env: Option<String>,
    pub(crate) file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSignature {
    pub(crate) max_skew: Option<String>,
    #[serde(default)]
    pub(crate) keys: Vec<RawSignatureKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSignatureKey {
    pub(crate) id: String,
    pub(crate) client: String,
    pub(crate) secret_env: Option<String>,
    pub(crate) secret_file: Option<String>,
    pub(crate) algorithm: Option<String>,
    pub(crate) not_before: Option<String>,
    pub(crate) not_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: String,
    pub(crate) path_prefix: String,
    pub(crate) methods: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) require: Vec<String>,
    #[serde(default)]
    pub(crate) permissions: Vec<String>,
    pub(crate) content_types: Option<Vec<String>>,
    pub(crate) rate_limit: Option<RawRateLimit>,
    pub(crate) client_certs: Option<RawClientCerts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) requests: i64,
    pub(crate) per: String,
    pub(crate) key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientCerts {
    #[serde(default)]
    pub(crate) dns: Vec<String>,
    #[serde(default)]
    pub(crate) uri: Vec<String>,
    #[serde(default)]
    pub(crate) spki_sha256: Vec<String>,
}
