//! Path normalisation (RFC 3986 section 6.2.2): the one spelling of a path that both the route
//! check and the upstream see. Percent-encoded unreserved characters are decoded, other escapes
//! are kept (with upper-case hex), `.` and `..` segments are removed and repeated slashes merged.
//! Anything that could let the upstream read the path differently from the check (an encoded
//! `/` or `\`, a `\`, a NUL, a `..` above the root, a broken escape) is refused.
//!
//! Routes are matched on the normalised path with its remaining escapes decoded
//! ([`decoded`]): the FastAPI upstream (like any ASGI or Go server) routes on the decoded path,
//! so `/users%3Apurge` and `/users:purge` are one path to it and must be one to the check.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidPath {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BrokenEscape,
    /// `%2F` or `%5C`: an encoded separator would split differently upstream.
    EncodedSeparator,
    /// A literal `\`, which some servers treat as `/`.
    Backslash,
    /// A NUL byte, literal or encoded.
    Nul,
    /// A `..` segment that would climb above the root.
    AboveRoot,
    /// A `.` or `..` segment with parameters (`..;x`): servers that strip a segment's
    /// parameters (Tomcat, Jetty, Spring) climb where the route check did not.
    DotSegmentWithParameters,
    /// Escapes that decode to bytes that are not UTF-8 (`%FF`, a lone `%C3`).
    NotUtf8,
}

impl fmt::Display for InvalidPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path must start with /",
            Self::BrokenEscape => "the path holds a % not followed by two hex digits",
            Self::EncodedSeparator => "the path holds an encoded / or \\",
            Self::Backslash => "the path holds a \\",
            Self::Nul => "the path holds a NUL",
            Self::AboveRoot => "the path climbs above the root with ..",
            Self::DotSegmentWithParameters => {
                "the path holds a . or .. segment with parameters (;)"
            }
            Self::NotUtf8 => "the path's escapes do not decode to UTF-8",
        })
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte that the escape `%XX` at `bytes[at]` stands for.
fn escaped_byte(bytes: &[u8], at: usize) -> Result<u8, InvalidPath> {
    match (
        bytes.get(at + 1).copied().and_then(hex_value),
        bytes.get(at + 2).copied().and_then(hex_value),
    ) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(InvalidPath::BrokenEscape),
    }
}

/// Returns the normalised form of `path` (the path part of a request target, without the query).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(InvalidPath::NotAbsolute);
    }
    // Fast path: most paths need no change at all.
    if !needs_work(bytes) {
        return Ok(Cow::Borrowed(path));
    }

    // First pass: decode what may be decoded, refuse what is dangerous.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(InvalidPath::Backslash),
            0 => return Err(InvalidPath::Nul),
            b'%' => {
                match escaped_byte(bytes, i)? {
                    b'/' | b'\\' => return Err(InvalidPath::EncodedSeparator),
                    0 => return Err(InvalidPath::Nul),
                    v if is_unreserved(v) => decoded.push(char::from(v)),
                    v => {
                        decoded.push('%');
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v & 0xf)]));
                    }
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        // Multi-byte UTF-8 is copied byte by byte through the char boundary below.
        let ch_len = utf8_len(b);
        decoded.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }

    // Second pass: segments.
    let trailing_slash = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/.."
        || decoded == "/.";
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(InvalidPath::AboveRoot);
                }
            }
            s if is_dot_with_parameters(s) => return Err(InvalidPath::DotSegmentWithParameters),
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// The normalised path `path` with every escape decoded: the spelling routes are matched on
/// (route prefixes are kept in it too). Borrowed when there is no escape. Escapes that decode
/// to a separator or a NUL (which [`normalize`] has refused already) or to bytes that are not
/// UTF-8 are refused: the upstream would read such a path in its own way.
pub fn decoded(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        match escaped_byte(bytes, i)? {
            b'/' | b'\\' => return Err(InvalidPath::EncodedSeparator),
            0 => return Err(InvalidPath::Nul),
            v => out.push(v),
        }
        i += 3;
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| InvalidPath::NotUtf8)
}

/// `.;x` or `..;x`: a dot segment once its parameters are stripped.
fn is_dot_with_parameters(segment: &str) -> bool {
    segment
        .split_once(';')
        .is_some_and(|(name, _)| name == "." || name == "..")
}

fn needs_work(bytes: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | 0 => return true,
            b'/' if prev == b'/' => return true,
            b'.' if prev == b'/' => {
                // "/." followed by end, "/" or "." is a dot segment.
                match bytes.get(i + 1) {
                    None | Some(b'/') | Some(b'.') | Some(b';') => return true,
                    _ => {}
                }
            }
            _ => {}
        }
        prev = b;
    }
    false
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Whether `prefix` (already normalised, no trailing slash unless it is `/`) matches `path` on a
/// segment boundary: `/api/v1` matches `/api/v1` and `/api/v1/x`, never `/api/v10`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/api/v1/x",
            "/a/b.json",
            "/a/.well-known/x",
            "/a/b/",
            "/a..b/c",
        ] {
            assert_eq!(normalize(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes_are_resolved() {
        let cases = [
            ("/public/../admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("//a///b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E/b", "/a/b"),
            ("/a/.%2e/b", "/b"),
            ("/%61dmin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/..a/b", "/..a/b"),
            ("/a;v=1/b", "/a;v=1/b"),
            ("/a/...;x/b", "/a/...;x/b"),
            ("/a/x..;/b", "/a/x..;/b"),
            ("/caf\u{e9}/x", "/caf\u{e9}/x"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn dangerous_paths_are_refused() {
        let cases = [
            ("/a%2fb", InvalidPath::EncodedSeparator),
            ("/a%2Fb", InvalidPath::EncodedSeparator),
            ("/a%5cb", InvalidPath::EncodedSeparator),
            ("/a\\b", InvalidPath::Backslash),
            ("/a%00b", InvalidPath::Nul),
            ("/..", InvalidPath::AboveRoot),
            ("/a/../../b", InvalidPath::AboveRoot),
            ("/%2e%2e/x", InvalidPath::AboveRoot),
            ("/a%zz", InvalidPath::BrokenEscape),
            ("/a%4", InvalidPath::BrokenEscape),
            ("/public/..;/admin", InvalidPath::DotSegmentWithParameters),
            ("/public/.;x/admin", InvalidPath::DotSegmentWithParameters),
            (
                "/public/%2e%2e;jsessionid=1/admin",
                InvalidPath::DotSegmentWithParameters,
            ),
            ("/a/..;", InvalidPath::DotSegmentWithParameters),
            ("a/b", InvalidPath::NotAbsolute),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), Err(want), "{input}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in ["/a/%2e%2e/b/./c//d", "/x%41y/%7e", "/a/b/../c/"] {
            let once = normalize(p).unwrap();
            assert_eq!(normalize(&once).unwrap(), once);
        }
    }

    #[test]
    fn routes_see_every_escape_decoded() {
        let cases = [
            ("/api/users", "/api/users"),
            ("/api/users%3Apurge", "/api/users:purge"),
            ("/users/%40me", "/users/@me"),
            ("/caf%C3%A9/x", "/caf\u{e9}/x"),
            ("/a%20b%2Bc%21", "/a b+c!"),
            // Decoded once, as the upstream does: `%2541` is `%41`, not `A`.
            ("/a%2541", "/a%41"),
        ];
        for (input, want) in cases {
            assert_eq!(decoded(input).as_deref(), Ok(want), "{input}");
        }
        assert!(matches!(decoded("/plain"), Ok(Cow::Borrowed(_))));
        let refused = [
            ("/a%FF", InvalidPath::NotUtf8),
            ("/caf%C3", InvalidPath::NotUtf8),
            ("/a%2Fb", InvalidPath::EncodedSeparator),
            ("/a%5Cb", InvalidPath::EncodedSeparator),
            ("/a%00", InvalidPath::Nul),
            ("/a%4", InvalidPath::BrokenEscape),
        ];
        for (input, want) in refused {
            assert_eq!(decoded(input), Err(want), "{input}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/api/v1", "/api/v1"));
        assert!(prefix_matches("/api/v1", "/api/v1/x"));
        assert!(!prefix_matches("/api/v1", "/api/v10"));
        assert!(!prefix_matches("/api/v1", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }
}
