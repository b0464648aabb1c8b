//! The one place where a rejection becomes an HTTP response: RFC 9457 problem+json with the
//! stable `code` of DESIGN.md, `WWW-Authenticate` per RFC 6750 for bearer-token failures. The
//! mapping is an exhaustive `match` so that a new error cannot silently become a 500.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::auth::AuthError;
use crate::proxy::path::InvalidPath;
use crate::proxy::Body;

/// Why a request was not forwarded, or why forwarding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The path cannot be normalised safely.
    #[error("{0}")]
    InvalidPath(InvalidPath),
    /// No route's prefix matches the path: default deny.
    #[error("no route matches {0}")]
    NoRoute(String),
    /// A route matches the path, but none allows the method; or the method is CONNECT,
    /// which is never proxied.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The body is larger than `server.max_body_bytes`.
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The client's body broke off before its end.
    #[error("the request body broke off before its end")]
    BodyIncomplete,
    /// A body that must be read before the checks (a signed route's) did not arrive within
    /// `upstream.request_timeout`.
    #[error("the request body did not arrive within {}s", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    /// More than one `Host` header, or none in an HTTP/1.1 request (RFC 9112 section 3.2);
    /// the text says which.
    #[error("{0}")]
    InvalidHost(&'static str),
    /// The route accepts other content types.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request's `Transfer-Encoding` names a coding besides `chunked`, which the proxy
    /// does not decode (RFC 9112 section 6.1: 501); the text names it.
    #[error("{0}")]
    UnsupportedTransferCoding(String),
    /// A check refused the credentials.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The route's rate limit is used up for this key; carries the RateLimit headers.
    #[error("{detail}")]
    RateLimited {
        /// The short reason.
        detail: String,
        /// `Retry-After`, `RateLimit-Policy`, `RateLimit`.
        headers: Vec<(&'static str, String)>,
    },
    /// The upstream could not be reached or broke the exchange.
    #[error("the upstream service is unavailable")]
    UpstreamUnavailable,
    /// The upstream did not answer within `upstream.request_timeout`.
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
}

impl Rejection {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidPath(_) => "invalid_path",
            Self::NoRoute(_) => "no_route",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::BodyIncomplete => "body_incomplete",
            Self::BodyTimeout(_) => "body_timeout",
            Self::InvalidHost(_) => "invalid_host",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            Self::RateLimited { .. } => "rate_limited",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Auth(e) => match e {
                AuthError::MissingCredentials => "missing_credentials",
                AuthError::MalformedToken(_) => "malformed_token",
                AuthError::TokenExpired(_) => "token_expired",
                AuthError::TokenNotYetValid(_) => "token_not_yet_valid",
                AuthError::TokenLifetimeExceeded(_) => "token_lifetime_exceeded",
                AuthError::InvalidTokenSignature => "invalid_token_signature",
                AuthError::UnknownKey(_) => "unknown_key",
                AuthError::InvalidIssuer(_) => "invalid_issuer",
                AuthError::InvalidAudience(_) => "invalid_audience",
                AuthError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
                AuthError::MissingClaim(_) => "missing_claim",
                AuthError::InsufficientPermissions(_) => "insufficient_permissions",
                AuthError::KeysUnavailable(_) => "keys_unavailable",
                AuthError::SignatureMissing(_) => "signature_missing",
                AuthError::SignatureMalformed(_) => "signature_malformed",
                AuthError::UnknownSigningKey(_) => "unknown_signing_key",
                AuthError::TimestampOutOfWindow(_) => "timestamp_out_of_window",
                AuthError::SignatureMismatch(_) => "signature_mismatch",
                AuthError::NonceReplayed => "nonce_replayed",
                AuthError::TokenRevoked(_) => "token_revoked",
                AuthError::StoreUnavailable(_) => "store_unavailable",
                AuthError::ClientCertificateRequired(_) => "client_certificate_required",
                AuthError::ClientCertificateRejected(_) => "client_certificate_rejected",
                AuthError::CertificateBindingMismatch(_) => "certificate_binding_mismatch",
            },
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyIncomplete | Self::InvalidHost(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Auth(e) => match e {
                AuthError::InsufficientPermissions(_) => StatusCode::FORBIDDEN,
                AuthError::KeysUnavailable(_) | AuthError::StoreUnavailable(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                AuthError::SignatureMissing(_)
                | AuthError::SignatureMalformed(_)
                | AuthError::UnknownSigningKey(_)
                | AuthError::TimestampOutOfWindow(_)
                | AuthError::SignatureMismatch(_)
                | AuthError::NonceReplayed
                | AuthError::TokenRevoked(_)
                | AuthError::ClientCertificateRequired(_)
                | AuthError::ClientCertificateRejected(_)
                | AuthError::CertificateBindingMismatch(_)
                | AuthError::MissingCredentials
                | AuthError::MalformedToken(_)
                | AuthError::TokenExpired(_)
                | AuthError::TokenNotYetValid(_)
                | AuthError::TokenLifetimeExceeded(_)
                | AuthError::InvalidTokenSignature
                | AuthError::UnknownKey(_)
                | AuthError::InvalidIssuer(_)
                | AuthError::InvalidAudience(_)
                | AuthError::AlgorithmNotAllowed(_)
                | AuthError::MissingClaim(_) => StatusCode::UNAUTHORIZED,
            },
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750), for bearer-token failures only.
    fn challenge(&self) -> Option<String> {
        let Self::Auth(e) = self else { return None };
        match e {
            AuthError::MissingCredentials => Some("Bearer realm=\"portcullis\"".to_owned()),
            AuthError::InsufficientPermissions(_) => Some(format!(
                "Bearer realm=\"portcullis\", error=\"insufficient_scope\", error_description=\"{}\"",
                quoted_string(&e.to_string())
            )),
            AuthError::KeysUnavailable(_) | AuthError::StoreUnavailable(_) => None,
            AuthError::ClientCertificateRequired(_) | AuthError::ClientCertificateRejected(_) => {
                Some("ClientCertificate realm=\"portcullis\"".to_owned())
            }
            AuthError::SignatureMissing(_)
            | AuthError::SignatureMalformed(_)
            | AuthError::UnknownSigningKey(_)
            | AuthError::TimestampOutOfWindow(_)
            | AuthError::SignatureMismatch(_)
            | AuthError::NonceReplayed => Some("Signature realm=\"portcullis\", version=\"v1\"".to_owned()),
            AuthError::CertificateBindingMismatch(_)
            | AuthError::TokenRevoked(_)
            | AuthError::MalformedToken(_)
            | AuthError::TokenExpired(_)
            | AuthError::TokenNotYetValid(_)
            | AuthError::TokenLifetimeExceeded(_)
            | AuthError::InvalidTokenSignature
            | AuthError::UnknownKey(_)
            | AuthError::InvalidIssuer(_)
            | AuthError::InvalidAudience(_)
            | AuthError::AlgorithmNotAllowed(_)
            | AuthError::MissingClaim(_) => Some(format!(
                "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                quoted_string(&e.to_string())
            )),
        }
    }

    /// The problem+json response for this rejection.
    pub fn to_response(&self, request_id: &str) -> Response<Body> {
        let status = self.status();
        let mut body = problem_body(status, self.code(), &self.to_string());
        body["request_id"] = serde_json::Value::String(request_id.to_owned());
        if let Self::Auth(AuthError::SignatureMismatch(string_to_sign)) = self {
            body["string_to_sign"] = serde_json::Value::String(string_to_sign.clone());
        }
        let mut response = Response::new(full_body(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Self::RateLimited { headers: extra, .. } = self {
            for (name, value) in extra {
                // The names are mixed case ("RateLimit-Policy"): from_bytes lower-cases them,
                // where a &'static str would have to be lower case already.
                if let (Ok(name), Ok(value)) = (
                    http::header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        if let Some(challenge) = self.challenge() {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// The RFC 9457 members every problem+json answer has (the proxy's and the admin API's).
pub(crate) fn problem_body(status: StatusCode, code: &str, detail: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    })
}

/// A complete body from bytes.
pub(crate) fn full_body(bytes: Bytes) -> Body {
    Body::full(bytes)
}

/// Makes `text` safe inside an RFC 7230 quoted-string of visible ASCII.
fn quoted_string(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}
