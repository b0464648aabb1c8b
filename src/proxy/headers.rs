//! Header hygiene: what never crosses the proxy in either direction, and the identity headers
//! the proxy adds. Stripping happens before any check reads a header, and the identity headers
//! are added after the `Connection`-named headers are gone, so a client cannot use
//! `Connection: x-auth-subject` to remove what the proxy adds.

use http::header::{Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the non-standard ones proxies still see),
/// as header names built once: removing by `&str` would parse the name on every request.
const HOP_BY_HOP_COUNT: usize = 9;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];

/// Identity headers the upstream trusts; only the proxy may set them.
pub(crate) const X_AUTH_SUBJECT: HeaderName = HeaderName::from_static("x-auth-subject");
pub(crate) const X_AUTH_ISSUER: HeaderName = HeaderName::from_static("x-auth-issuer");
pub(crate) const X_AUTH_PERMISSIONS: HeaderName = HeaderName::from_static("x-auth-permissions");
pub(crate) const X_AUTH_CLAIMS: HeaderName = HeaderName::from_static("x-auth-claims");
pub(crate) const X_AUTH_CLIENT: HeaderName = HeaderName::from_static("x-auth-client");
pub(crate) const X_AUTH_KEY_ID: HeaderName = HeaderName::from_static("x-auth-key-id");
pub(crate) const X_SIGNATURE: HeaderName = HeaderName::from_static("x-signature");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_FORWARDED_CLIENT_CERT: HeaderName =
    HeaderName::from_static("x-forwarded-client-cert");

/// Removes hop-by-hop headers and every header named in `Connection` (except `Host`, which is
/// end-to-end by definition and needed by the checks).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, None);
}

/// An HTTP/2 request's `cookie` fields as the one line an HTTP/1.1 request carries, joined with
/// "; " (RFC 9113 section 8.2.3).
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let Entry::Occupied(mut cookies) = headers.entry(http::header::COOKIE) else {
        return;
    };
    if cookies.iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
    // Valid field values joined by "; " make a valid field value.
    if let Ok(one) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        cookies.insert(one);
    }
}

/// The one length that every `Content-Length` value (and every item of a list) states; `None`
/// when there is none, or one is not a number, or two differ.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match length {
                Some(seen) if seen != n => return None,
                _ => length = Some(n),
            }
        }
    }
    length
}

/// A response's `Content-Length` as it goes to the client: one number (RFC 9110 section 8.6:
/// only `1*DIGIT` is passed on), so a list or several fields that agree become that number.
/// One that is not a number (possible only where no body follows: HEAD, 304) is dropped, and
/// so is a 204's, which states no length.
pub(crate) fn one_content_length(headers: &mut HeaderMap, status: http::StatusCode) {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let one = match (values.next(), values.next()) {
        (None, _) => return,
        (Some(value), None) => Some(value),
        _ => None,
    };
    let length = match one {
        _ if status == http::StatusCode::NO_CONTENT => None,
        // The common case, left as it is.
        Some(v) if !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit) => return,
        _ => content_length(headers),
    };
    match length {
        Some(n) => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.remove(CONTENT_LENGTH);
        }
    }
}

/// Removes hop-by-hop headers as [`remove_hop_by_hop`] does, every header a client could
/// use to pose as a verified identity (`x-auth-*` and `x-forwarded-client-cert`, and the
/// names the proxy sets spelled with `_` for `-`: `X_Auth_Subject`, `X_Forwarded_For`), every
/// header of [`FORWARDING`], and the names of `[server] strip_headers` (`configured`).
pub(crate) fn remove_hop_by_hop_and_spoofable(headers: &mut HeaderMap, configured: &[HeaderName]) {
    strip(headers, Some(configured));
}

/// Headers that say where a request came from or what it asked for, which a client could
/// use to mislead the upstream and the proxy never sends: the client's address other than in
/// `X-Forwarded-For` (`Forwarded`, `X-Real-IP` and the like), the rest of what a load
/// balancer in front may have seen, and a path some frameworks route on instead of the
/// request's own, which the route check never saw (`X-Original-URL`, `X-Rewrite-URL`).
pub(crate) const FORWARDING: [&str; 10] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
];

/// One look at every name first, then removal of only what is there: most messages carry
/// none of these headers, or only `Connection`, and a removal by name costs a hash look-up
/// where a comparison of names mostly does not. `spoofable`: also the headers a client could
/// spoof, with the configured names to strip.
fn strip(headers: &mut HeaderMap, spoofable: Option<&[HeaderName]>) {
    let mut present = [false; HOP_BY_HOP_COUNT];
    let mut spoofed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if let Some(configured) = spoofable {
            if is_spoofable(name) || configured.contains(name) {
                spoofed.push(name.clone());
            }
        }
    }
    // HOP_BY_HOP[0] is Connection: the names it lists go first, while it is still there.
    if present[0] {
        remove_connection_named(headers);
    }
    for (name, here) in HOP_BY_HOP.iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
    for name in spoofed {
        headers.remove(name);
    }
}

fn is_spoofable(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-auth-")
        || name == X_FORWARDED_CLIENT_CERT.as_str()
        || FORWARDING.contains(&name)
        || (name.contains('_') && is_lookalike(name))
}

/// Whether `name`, with `_` read as `-`, is one the proxy sets: CGI and WSGI servers map
/// `X_Auth_Subject` and `X-Auth-Subject` to the same `HTTP_X_AUTH_SUBJECT`, so an upstream of
/// that kind would read a client's own copy as the proxy's. nginx drops every name with `_` by
/// default, and Envoy's `headers_with_underscores_action` can; only these lookalikes go here.
fn is_lookalike(name: &str) -> bool {
    starts_with_dashed(name, "x-auth-")
        || [
            X_FORWARDED_CLIENT_CERT,
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_REQUEST_ID,
        ]
        .iter()
        .any(|own| own.as_str().len() == name.len() && starts_with_dashed(name, own.as_str()))
        || FORWARDING
            .iter()
            .any(|own| own.len() == name.len() && starts_with_dashed(name, own))
}

/// `name` starts with `prefix` when each `_` of `name` is read as `-`.
fn starts_with_dashed(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(n, p)| if n == b'_' { p == b'-' } else { n == p })
}

fn remove_connection_named(headers: &mut HeaderMap) {
    let mut values = headers.get_all(CONNECTION).iter();
    if let (Some(only), None) = (values.next(), values.next()) {
        // `Connection: keep-alive`, which nearly every HTTP/1.1 upstream sends, names only a
        // header removed anyway: nothing to split or parse.
        if only.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
            return;
        }
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // Compared as text, these cost no parsing and no allocation.
        .filter(|name| !is_kept_or_removed_anyway(name))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// `Host` (never removed: end-to-end by definition), `x-request-id` (the proxy's own: set on
/// the request before it is stripped, and always forwarded), or a hop-by-hop header (removed by
/// [`strip`] in any case), in any case of letters.
fn is_kept_or_removed_anyway(name: &str) -> bool {
    name.eq_ignore_ascii_case(HOST.as_str())
        || name.eq_ignore_ascii_case(X_REQUEST_ID.as_str())
        || HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// The request's id: a client-sent `x-request-id` is kept when it is short visible ASCII;
/// otherwise a new one (a UUID) is made. Either way the map is left holding exactly that one
/// value, which goes upstream, and it is returned for the response and the log. One look-up
/// in the map does both.
pub(crate) fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(mut sent) => {
            let text = sent.get().as_bytes();
            let sane =
                !text.is_empty() && text.len() <= 128 && text.iter().all(u8::is_ascii_graphic);
            if sane && sent.iter().nth(1).is_none() {
                return sent.get().clone();
            }
            let id = if sane {
                sent.get().clone()
            } else {
                new_request_id()
            };
            // Replaces every value sent.
            sent.insert(id.clone());
            id
        }
        Entry::Vacant(none) => none.insert(new_request_id()).clone(),
    }
}

fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id)
        // A hyphenated UUID is 36 characters of hex digits and hyphens.
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Sets `name` to `value` when it is a valid header value (identity values come from verified
/// tokens, which may still hold characters a header cannot carry: those are dropped, never sent
/// half-encoded).
pub(crate) fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) -> bool {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_length_goes_on_as_one_number() {
        use http::StatusCode;
        let passed = |values: &[&str], status: StatusCode| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            one_content_length(&mut h, status);
            h.get_all(CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(passed(&["12"], StatusCode::OK), ["12"]);
        assert_eq!(passed(&["0012"], StatusCode::OK), ["0012"]);
        assert_eq!(passed(&["2, 2"], StatusCode::OK), ["2"]);
        assert_eq!(passed(&["2", "2"], StatusCode::OK), ["2"]);
        assert_eq!(passed(&["five"], StatusCode::NOT_MODIFIED), [] as [&str; 0]);
        assert_eq!(passed(&["2", "3"], StatusCode::OK), [] as [&str; 0]);
        assert_eq!(passed(&["0"], StatusCode::NO_CONTENT), [] as [&str; 0]);
        assert_eq!(passed(&[], StatusCode::OK), [] as [&str; 0]);
    }

    #[test]
    fn connection_named_headers_and_hop_by_hop_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("x-secret, keep-alive, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert(HOST, HeaderValue::from_static("example"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get(CONNECTION).is_none());
        assert_eq!(h.get(HOST).unwrap(), "example");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn every_hop_by_hop_header_is_removed_when_connection_does_not_name_it() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
        ] {
            // Another name that differs in its first letter only.
            let twin = format!("x{}", &name[1..]);
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
            h.insert(
                HeaderName::from_bytes(twin.as_bytes()).unwrap(),
                HeaderValue::from_static("2"),
            );
            remove_hop_by_hop(&mut h);
            assert!(h.get(name).is_none(), "{name} is hop-by-hop");
            assert_eq!(h.get(&twin).unwrap(), "2", "{twin} is not");
            assert_eq!(h.len(), 1);
        }
    }

    #[test]
    fn connection_names_are_matched_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("Keep-Alive, HOST, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(HOST, HeaderValue::from_static("example"));
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get(HOST).unwrap(), "example");
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_single_connection_value_is_honoured() {
        // The lone `keep-alive` the fast path skips, and a lone name it must not skip.
        for (connection, named) in [("Keep-Alive", "keep-alive"), ("x-secret", "x-secret")] {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_static(connection));
            h.insert(named, HeaderValue::from_static("1"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "Connection: {connection}");
            assert_eq!(h.get("x-kept").unwrap(), "1");
        }
    }

    #[test]
    fn spoofable_identity_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-auth-subject", HeaderValue::from_static("admin"));
        h.append("x-auth-subject", HeaderValue::from_static("root"));
        h.insert("x-auth-anything", HeaderValue::from_static("1"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("Hash=00"),
        );
        h.insert("x-authority", HeaderValue::from_static("kept"));
        remove_hop_by_hop_and_spoofable(&mut h, &[]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("x-authority").unwrap(), "kept");
    }

    #[test]
    fn forwarding_headers_and_configured_names_are_removed() {
        let mut h = HeaderMap::new();
        for name in FORWARDING {
            h.insert(name, HeaderValue::from_static("spoofed"));
        }
        h.insert("x_real_ip", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-debug-user", HeaderValue::from_static("admin"));
        h.insert("x-forwarded-portal", HeaderValue::from_static("kept"));
        h.insert("x-real-ipv6", HeaderValue::from_static("kept"));
        let configured = [HeaderName::from_static("x-debug-user")];
        remove_hop_by_hop_and_spoofable(&mut h, &configured);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-forwarded-portal") && h.contains_key("x-real-ipv6"));

        // Hop-by-hop removal alone (responses) leaves them.
        let mut response = HeaderMap::new();
        response.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        response.insert("x-debug-user", HeaderValue::from_static("u"));
        remove_hop_by_hop(&mut response);
        assert_eq!(response.len(), 2);
    }

    #[test]
    fn request_id_is_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&mut h), "abc-123");
        assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);

        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        let replaced = request_id(&mut h);
        assert_ne!(replaced, "has space");
        assert_eq!(
            h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(),
            [&replaced]
        );

        let mut none = HeaderMap::new();
        let made = request_id(&mut none);
        assert_eq!(made.len(), 36);
        assert!(uuid::Uuid::parse_str(made.to_str().unwrap()).is_ok());
        assert_eq!(none.get(X_REQUEST_ID), Some(&made));
        assert_ne!(made, request_id(&mut HeaderMap::new()));
    }

    #[test]
    fn a_bad_first_request_id_is_replaced_even_when_a_later_one_is_sane() {
        let mut h = HeaderMap::new();
        h.append(X_REQUEST_ID, HeaderValue::from_static("has space"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("sane"));
        let id = request_id(&mut h);
        assert!(
            uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok(),
            "{id:?}"
        );
        assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn only_the_first_of_several_request_ids_is_kept() {
        let mut h = HeaderMap::new();
        h.append(X_REQUEST_ID, HeaderValue::from_static("first"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        assert_eq!(request_id(&mut h), "first");
        assert_eq!(
            h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(),
            [&HeaderValue::from_static("first")]
        );
    }

    #[test]
    fn only_names_that_read_as_the_proxys_own_with_underscores_are_lookalikes() {
        for name in [
            "x_auth_subject",
            "x-auth_permissions",
            "x_auth_",
            "x_forwarded_client_cert",
            "x_forwarded_for",
            "x-forwarded_proto",
            "x_forwarded_host",
            "x_request_id",
            // The forwarding headers the proxy removes read the same way.
            "x_forwarded_port",
            "x_real_ip",
            "x_original_url",
        ] {
            assert!(is_lookalike(name), "{name}");
        }
        for name in [
            "x_auth",
            "x_authorization",
            "x_forwarded_for_x",
            "x_forwarded_portal",
            "x_real_ipv6",
            "x_request",
            "x_",
            "my_x_auth_subject",
        ] {
            assert!(!is_lookalike(name), "{name}");
        }
    }
}
