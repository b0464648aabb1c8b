//! The upstream HTTP/1.1 client for requests whose body is in hand: no body, or one already read
//! (for a signature check) of up to [`MAX_INLINE_BODY`] bytes. That is every GET and every signed
//! request. Requests whose body streams through go on hyper's client (`forward.rs`).
//!
//! hyper's client runs each connection as a task of its own and hands requests and responses to
//! it through channels: five task polls and two channel hand-overs a request, and a `HeaderMap`
//! copied to send an idempotent request again. Here the request's own task writes the request
//! and reads the response head, and the response body reads the connection in place
//! (`bench/README.md`, "Hot path, nineteenth pass": 23.6% fewer instructions and 5-10% less
//! CPU a public request). The request goes out as one write of bytes encoded once; sending it
//! again on a new connection resends those bytes.
//!
//! What it reads is held to RFC 9112, strictly, since a response read wrong leaves the next
//! response on the connection answering the wrong request:
//! - a head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, parsed by `httparse`;
//! - interim `1xx` responses are skipped, `101 Switching Protocols` is refused;
//! - the body: none for `HEAD` and for `204` and `304`; chunked when `chunked` is the last
//!   transfer coding (`chunked` anywhere else is refused); else until the connection closes if
//!   there is a `Transfer-Encoding`; else `Content-Length`, whose values must all be the same
//!   number; else until the connection closes;
//! - a connection is used again only after an HTTP/1.1 response without `Connection: close`,
//!   delimited by its length or by chunks (never with both `Transfer-Encoding` and
//!   `Content-Length`), read to its end with nothing after it.
//!
//! An idle connection that the upstream closed (or wrote to) while it waited in the pool is
//! noticed before it is used, from the readiness the runtime's I/O driver has recorded for the
//! socket: no system call in the common case.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body::{Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::headers;

/// Bodies up to this size go on this client (written with the head in one write); larger ones
/// stream through hyper's client, which reads an early answer while it writes.
pub(crate) const MAX_INLINE_BODY: usize = 64 * 1024;
/// The largest response head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a response head may have (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// The most bytes of trailer fields read (and dropped) after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;
/// The longest chunk-size line (the size and any extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Room made in the read buffer before each read.
const READ_SPACE: usize = 8 * 1024;

/// Why a response could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("the connection closed before any answer")]
    ClosedWithoutAnswer,
    #[error("writing the request: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("the connection failed during the response: {0}")]
    Broken(#[source] std::io::Error),
    #[error("malformed response head: {0}")]
    Head(#[from] httparse::Error),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid response header field")]
    InvalidField,
    #[error("invalid Content-Length")]
    InvalidLength,
    #[error("Transfer-Encoding other than chunked (the proxy does not pass on transfer codings)")]
    InvalidTransferEncoding,
    #[error("101 Switching Protocols is not supported")]
    SwitchingProtocols,
    #[error("the response body ended early")]
    Incomplete,
    #[error("malformed chunked body")]
    InvalidChunk,
}

impl ClientError {
    /// The connection ended (closed or reset) before any byte of an answer: the request can be
    /// sent again on a new connection if it is idempotent.
    pub(crate) fn closed_without_answer(&self) -> bool {
        let io = match self {
            Self::ClosedWithoutAnswer => return true,
            Self::Write(e) => e,
            Self::Read(e) => e,
            _ => return false,
        };
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        )
    }
}

/// The socket, plain or under TLS.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0.inner().inner(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One upstream connection.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: Stream,
    /// What was read and not yet handed on.
    buf: BytesMut,
    /// The request as it goes out (kept to send again on a new connection).
    wire: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(io: MaybeHttpsStream<TokioIo<TcpStream>>) -> Self {
        let stream = match io {
            MaybeHttpsStream::Http(plain) => Stream::Plain(plain.into_inner()),
            MaybeHttpsStream::Https(tls) => Stream::Tls(Box::new(tls.into_inner())),
        };
        Self {
            stream,
            buf: BytesMut::new(),
            wire: Vec::new(),
        }
    }

    /// Whether the connection can take a request: nothing arrived on it (no data, no close)
    /// while it was idle. The runtime's recorded readiness answers without a system call; only
    /// when it says readable (which a read that filled the buffer exactly can leave behind) is
    /// the socket asked.
    pub(crate) fn usable(&self) -> bool {
        let tcp = self.stream.tcp();
        let mut cx = Context::from_waker(Waker::noop());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Whether the TLS layer holds nothing received and not yet handed on: no decrypted bytes
    /// waiting to be read, no close_notify. tokio-rustls decrypts whole records but hands on
    /// only what the read buffer has room for; the rest waits inside rustls, where neither
    /// `buf` nor the socket shows it. (rustls wants to read only when neither is the case.)
    fn tls_drained(&self) -> bool {
        match &self.stream {
            Stream::Plain(_) => true,
            Stream::Tls(tls) => tls.get_ref().1.wants_read(),
        }
    }

    /// Encodes the request (see [`encode_into`]).
    pub(crate) fn encode(&mut self, parts: &http::request::Parts, body: &[u8]) {
        encode_into(&mut self.wire, parts, body);
    }

    /// Takes the encoded request, to send on another connection.
    pub(crate) fn take_request(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.wire)
    }

    /// Puts an encoded request (from [`Conn::take_request`]) on this connection.
    pub(crate) fn set_request(&mut self, wire: Vec<u8>) {
        self.wire = wire;
    }

    /// Writes the encoded request and reads the final response head.
    pub(crate) async fn round_trip(&mut self, head_request: bool) -> Result<Head, ClientError> {
        self.stream
            .write_all(&self.wire)
            .await
            .map_err(ClientError::Write)?;
        if matches!(self.stream, Stream::Tls(_)) {
            self.stream.flush().await.map_err(ClientError::Write)?;
        }
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                match parse_head(&mut self.buf, head_request)? {
                    Some(Parsed::Final(head)) => return Ok(head),
                    Some(Parsed::Interim) => continue,
                    None if self.buf.len() >= MAX_HEAD => return Err(ClientError::HeadTooLarge),
                    None => {}
                }
            }
            self.buf.reserve(READ_SPACE);
            // A failure after part of an answer is not one to send the request again for.
            let read = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| match answered {
                    true => ClientError::Broken(e),
                    false => ClientError::Read(e),
                })?;
            if read == 0 {
                return Err(if answered {
                    ClientError::Incomplete
                } else {
                    ClientError::ClosedWithoutAnswer
                });
            }
        }
    }

    /// Reads more into the buffer; `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ClientError>> {
        self.buf.reserve(READ_SPACE);
        // `read_buf` is a single `poll_read` into the spare capacity: polled once here, and
        // made again on the next call.
        let read = std::pin::pin!(self.stream.read_buf(&mut self.buf));
        read.poll(cx).map_err(ClientError::Broken)
    }
}

/// Encodes a request into `wire`: `Content-Length` is the body's own (any the client sent is
/// dropped); `Transfer-Encoding`, hop-by-hop, was removed before and is dropped here too.
fn encode_into(wire: &mut Vec<u8>, parts: &http::request::Parts, body: &[u8]) {
    wire.clear();
    wire.reserve(256 + body.len());
    wire.extend_from_slice(parts.method.as_str().as_bytes());
    wire.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    wire.extend_from_slice(target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || expects_body(&parts.method) {
        wire.extend_from_slice(b"content-length: ");
        wire.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    wire.extend_from_slice(body);
}

/// Methods whose request carries a body by definition: an empty one is sent with
/// `Content-Length: 0` (as hyper's client does).
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// A final response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may take another request once the body is read.
    reusable: bool,
}

impl Head {
    /// The body that reads the rest of this response from `conn`.
    pub(crate) fn body<R: Release>(&self, conn: Conn, release: R) -> Body<R> {
        let state = match self.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::UntilClose => State::UntilClose,
        };
        Body {
            conn: Some(conn),
            state,
            reusable: self.reusable,
            release: Some(release),
        }
    }
}

/// How the body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

enum Parsed {
    Interim,
    Final(Head),
}

/// Parses a response head at the start of `buf` and takes it off: `None` while incomplete.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, ClientError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    )? {
        httparse::Status::Complete(len) if len > MAX_HEAD => return Err(ClientError::HeadTooLarge),
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    // A complete parse has both.
    let (Some(code), Some(version)) = (response.code, response.version) else {
        return Err(ClientError::Head(httparse::Error::Status));
    };
    let base = buf.as_ptr() as usize;
    let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = response.headers.len();
    for (slot, field) in fields.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        // Offsets within a head of at most MAX_HEAD bytes.
        *slot = (
            name as u32,
            (name + field.name.len()) as u32,
            value as u32,
            (value + field.value.len()) as u32,
        );
    }
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(ClientError::SwitchingProtocols);
        }
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| ClientError::Head(httparse::Error::Status))?;
    let head = buf.split_to(len).freeze();
    // Room for what the proxy adds to a response (the request id, rate-limit headers).
    let mut headers = HeaderMap::with_capacity(count + 4);
    for &(n0, n1, v0, v1) in &fields[..count] {
        let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize])
            .map_err(|_| ClientError::InvalidField)?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
            .map_err(|_| ClientError::InvalidField)?;
        headers.append(name, value);
    }
    let mut reusable = version == 1 && !has_token(&headers, &CONNECTION, "close");
    let framing = if head_request || code == 204 || code == 304 {
        // No body follows; the length (what a GET would get) is not checked here but passed
        // on by `headers::one_content_length`.
        Framing::Empty
    } else if headers.contains_key(TRANSFER_ENCODING) {
        only_chunked(&headers)?;
        // Length and chunks both: chunks decide, and the connection is not trusted after.
        if headers.remove(CONTENT_LENGTH).is_some() {
            reusable = false;
        }
        Framing::Chunked
    } else if headers.contains_key(CONTENT_LENGTH) {
        Framing::Length(headers::content_length(&headers).ok_or(ClientError::InvalidLength)?)
    } else {
        reusable = false;
        Framing::UntilClose
    };
    Ok(Some(Parsed::Final(Head {
        status,
        headers,
        framing,
        reusable,
    })))
}

/// Whether a comma-separated field lists `token` (in any case).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// That the response's transfer coding is `chunked` alone. Any other would reach the client
/// undeclared (`Transfer-Encoding` is hop-by-hop, and the proxy frames the body anew), its bytes
/// taken for the body itself; nginx and Envoy refuse such an answer too.
pub(crate) fn only_chunked(headers: &HeaderMap) -> Result<(), ClientError> {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    match (codings.next(), codings.next()) {
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ClientError::InvalidTransferEncoding),
    }
}

/// What [`read_response`] read.
#[doc(hidden)]
#[derive(Debug)]
pub struct ReadResponse {
    pub status: u16,
    /// Whether a `Content-Length` header is passed on.
    pub content_length: bool,
    /// The body's length if it is delimited by one, `None` for chunks or the connection's end.
    pub length: Option<u64>,
    pub chunked: bool,
    pub reusable: bool,
    /// The chunked body decoded, when the input held all of it.
    pub body: Option<Vec<u8>>,
}

/// Reads `input` as an upstream's answer (to a HEAD request when `head_request`), arriving
/// `piece` bytes at a time, as [`Conn::round_trip`] and the body do: interim heads skipped,
/// then the final head, then a chunked body decoded. `Ok(None)` when the input ends first.
/// For the fuzz target `upstream_response`; the proxy reads through [`Conn`].
#[doc(hidden)]
pub fn read_response(
    input: &[u8],
    piece: usize,
    head_request: bool,
) -> Result<Option<ReadResponse>, String> {
    let piece = piece.max(1);
    let mut fed = 0usize;
    let mut buf = BytesMut::new();
    let mut feed = |buf: &mut BytesMut| {
        let end = fed.saturating_add(piece).min(input.len());
        buf.extend_from_slice(&input[fed..end]);
        let more = end > fed;
        fed = end;
        more
    };
    let head = loop {
        match parse_head(&mut buf, head_request).map_err(|e| e.to_string())? {
            Some(Parsed::Final(head)) => break head,
            Some(Parsed::Interim) => continue,
            None if buf.len() >= MAX_HEAD => return Err(ClientError::HeadTooLarge.to_string()),
            None => {
                if !feed(&mut buf) {
                    return Ok(None);
                }
            }
        }
    };
    let mut read = ReadResponse {
        status: head.status.as_u16(),
        content_length: head.headers.contains_key(CONTENT_LENGTH),
        length: match head.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::UntilClose => None,
        },
        chunked: head.framing == Framing::Chunked,
        reusable: head.reusable,
        body: None,
    };
    if read.chunked {
        let mut state = Chunked::Size;
        let mut body = Vec::new();
        loop {
            match state.decode(&mut buf).map_err(|e| e.to_string())? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => break,
                Decoded::NeedMore => {
                    if !feed(&mut buf) {
                        return Ok(Some(read));
                    }
                }
            }
        }
        read.body = Some(body);
    }
    Ok(Some(read))
}

/// Where the body is.
#[derive(Debug)]
enum State {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes of it read.
    Trailers(usize),
}

/// What decoding the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

impl Chunked {
    /// Decodes from the front of `buf` as far as one piece of data or the end.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ClientError> {
        loop {
            match *self {
                Self::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Self::Trailers(0)
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Self::DataEnd
                    } else {
                        Self::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ClientError::InvalidChunk);
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers(read) => {
                    // `read` counts line ends too, so it can pass the bound by two.
                    let Some(line) = take_line(buf, MAX_TRAILERS.saturating_sub(read))? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        return Ok(Decoded::End);
                    }
                    // Trailer fields are dropped.
                    *self = Self::Trailers(read + line.len() + 2);
                }
            }
        }
    }
}

/// Takes a CRLF-ended line (without its CRLF) off the front of `buf`: `None` while no line end
/// has arrived, an error past `max` bytes or at a bare LF.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ClientError> {
    match memchr::memchr(b'\n', buf) {
        Some(end) if end == 0 || buf[end - 1] != b'\r' => Err(ClientError::InvalidChunk),
        Some(end) if end - 1 > max => Err(ClientError::InvalidChunk),
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end - 1);
            Ok(Some(line))
        }
        // The line so far and perhaps its CR.
        None if buf.len() > max.saturating_add(1) => Err(ClientError::InvalidChunk),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hexadecimal digits, then nothing or extensions after `;`.
fn chunk_size(line: &[u8]) -> Result<u64, ClientError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ClientError::InvalidChunk);
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(ClientError::InvalidChunk);
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        // At most 16 hexadecimal digits: fits in a u64.
        size = (size << 4) | u64::from(hex_value(d));
    }
    Ok(size)
}

fn hex_value(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        _ => d - b'A' + 10,
    }
}

/// Where a connection goes when its response has been read to the end and it can take another
/// request (the pool).
pub(crate) trait Release: Send + Unpin {
    fn release(self, conn: Conn);
}

/// The rest of a response: reads its connection in place, and hands the connection to its
/// [`Release`] when the body has been read to its end and the connection can be used again.
pub(crate) struct Body<R: Release> {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    release: Option<R>,
}

impl<R: Release> std::fmt::Debug for Body<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("state", &self.state)
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

impl<R: Release> Body<R> {
    /// At the end: the connection goes back if it can be used again, else it is closed.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable && conn.buf.is_empty() && conn.tls_drained() {
            if let Some(release) = self.release.take() {
                release.release(conn);
            }
        }
    }

    /// Fails the body: the connection is closed.
    fn fail(&mut self, e: ClientError) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(e)))
    }
}

impl<R: Release> http_body::Body for Body<R> {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .map_or(conn.buf.len(), |left| left.min(conn.buf.len()));
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunked) => match chunked.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => return this.fail(e),
                },
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, State::UntilClose) {
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    return this.fail(ClientError::Incomplete);
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            State::Chunked(_) | State::UntilClose => SizeHint::default(),
        }
    }
}

impl<R: Release> Drop for Body<R> {
    fn drop(&mut self) {
        // Read to its end (or empty from the start): the connection can go back. Dropped half
        // read: it is closed with the body.
        if matches!(self.state, State::Done) {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> Result<Option<Parsed>, ClientError> {
        parse_head(&mut BytesMut::from(text.as_bytes()), head_request)
    }

    fn final_head(text: &str) -> Head {
        match head(text, false) {
            Ok(Some(Parsed::Final(head))) => head,
            other => panic!("not a final head: {:?}", other.map(|p| p.is_some())),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            // Both: the chunks decide, and the connection is not trusted after.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive, Close\r\n\r\n",
                Framing::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                false,
            ),
        ];
        for (text, framing, reusable) in cases {
            let head = final_head(text);
            assert_eq!(
                (head.framing, head.reusable),
                (framing, reusable),
                "{text:?}"
            );
        }
        let both = final_head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert!(
            !both.headers.contains_key(CONTENT_LENGTH),
            "a length beside chunks is not passed on"
        );
        match head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true) {
            Ok(Some(Parsed::Final(head))) => {
                assert_eq!(head.framing, Framing::Empty, "the answer to HEAD")
            }
            _ => panic!("no head"),
        }
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_refused() {
        let refused = [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            // Another transfer coding would reach the client undeclared (the header is
            // hop-by-hop), its bytes taken for the body itself.
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: ,\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
        ];
        for text in refused {
            assert!(head(text, false).is_err(), "{text:?} was accepted");
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(head(&many, false).is_err(), "over {MAX_HEADERS} fields");
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "v".repeat(MAX_HEAD));
        assert!(matches!(head(&huge, false), Err(ClientError::HeadTooLarge)));
    }

    #[test]
    fn an_incomplete_head_waits_and_interim_heads_are_skipped() {
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\ncontent-len", false),
            Ok(None)
        ));
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"[..],
        );
        assert!(matches!(
            parse_head(&mut buf, false),
            Ok(Some(Parsed::Interim))
        ));
        assert!(matches!(
            parse_head(&mut buf, false),
            Ok(Some(Parsed::Interim))
        ));
        match parse_head(&mut buf, false) {
            Ok(Some(Parsed::Final(head))) => {
                assert_eq!(head.status, StatusCode::CREATED);
                assert_eq!(head.framing, Framing::Length(2));
            }
            _ => panic!("no final head"),
        }
        assert_eq!(&buf[..], b"ok", "the body stays in the buffer");
    }

    /// Decodes `wire` fed in pieces of `piece` bytes.
    fn dechunk(wire: &[u8], piece: usize) -> Result<(Vec<u8>, BytesMut), ClientError> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match state.decode(&mut buf)? {
                Decoded::Data(data) => out.extend_from_slice(&data),
                Decoded::End => return Ok((out, buf)),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Err(ClientError::Incomplete);
                    }
                    let end = (fed + piece).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces_they_arrive_in() {
        let wire = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, wire.len()] {
            let (body, left) = dechunk(wire, piece).unwrap();
            assert_eq!(body, b"hello world0123456789", "pieces of {piece}");
            // What follows the body (as much of "NEXT" as came in the last piece) is left.
            assert!(b"NEXT".starts_with(&left), "pieces of {piece}: {left:?}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let refused: [&[u8]; 8] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\nx: 1\n\r\n",
        ];
        for wire in refused {
            assert!(
                dechunk(wire, wire.len()).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(wire)
            );
        }
        // The largest size that fits in 16 hexadecimal digits parses.
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
        // A size line or trailers without end are cut off.
        let endless = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(dechunk(&endless, 64).is_err());
        let mut trailers = b"0\r\n".to_vec();
        trailers
            .extend(std::iter::repeat_n(b"x-t: 1\r\n".as_slice(), MAX_TRAILERS / 8 + 1).flatten());
        trailers.extend_from_slice(b"\r\n");
        assert!(dechunk(&trailers, 512).is_err());
    }

    #[test]
    fn trailers_up_to_the_bound_end_the_body() {
        // One trailer line as long as the bound allows, then the end: the count of what was
        // read passes the bound by the line's CRLF, and the empty line still ends the body.
        let mut wire = b"1\r\nx\r\n0\r\nx-t: ".to_vec();
        wire.extend(std::iter::repeat_n(b'v', MAX_TRAILERS - 5));
        wire.extend_from_slice(b"\r\n\r\n");
        for piece in [1, 100, wire.len()] {
            let (body, _) = dechunk(&wire, piece).unwrap();
            assert_eq!(body, b"x", "pieces of {piece}");
        }
    }

    /// Heads and chunked bodies put together from pieces of real ones and random bytes: the
    /// parser and the decoder answer (a head, a wait or an error), and never panic.
    #[test]
    fn random_heads_and_bodies_never_panic() {
        const PIECES: [&[u8]; 24] = [
            b"HTTP/1.1 ",
            b"HTTP/1.0 ",
            b"200 OK",
            b"101 ",
            b"100 Continue",
            b"204 ",
            b"\r\n",
            b"\n",
            b"\r",
            b"content-length: ",
            b"transfer-encoding: ",
            b"connection: close",
            b"chunked",
            b", ",
            b"5",
            b"0",
            b"ffffffffffffffff",
            b"18446744073709551616",
            b";x=y",
            b"0\r\n\r\n",
            b": ",
            b" ",
            b"\x00",
            b"\xff",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut heads = 0;
        for _ in 0..100_000 {
            let mut input = Vec::new();
            if next() % 2 == 0 {
                input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            }
            for _ in 0..next() % 24 {
                if next() % 4 == 0 {
                    input.push(next() as u8);
                } else {
                    input.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
                }
            }
            if next() % 2 == 0 {
                input.extend_from_slice(b"\r\n\r\n");
            }
            let mut buf = BytesMut::from(&input[..]);
            if let Ok(Some(Parsed::Final(head))) = parse_head(&mut buf, next() % 2 == 0) {
                heads += 1;
                // A body that ends with the connection never leaves it for another request.
                assert!(
                    !(head.reusable && head.framing == Framing::UntilClose),
                    "{:?}",
                    String::from_utf8_lossy(&input)
                );
            }
            let piece = 1 + (next() % 8) as usize;
            let _ = dechunk(&input, piece);
        }
        // The inputs reach past the parser's first checks: some are whole heads.
        assert!(heads > 1_000, "{heads} heads parsed");
    }

    #[test]
    fn the_request_carries_its_own_length() {
        let (mut parts, ()) = http::Request::post("/a?b=1")
            .header("host", "up")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts();
        let encode = |parts: &http::request::Parts, body: &[u8]| {
            let mut wire = Vec::new();
            encode_into(&mut wire, parts, body);
            String::from_utf8(wire).unwrap()
        };
        assert_eq!(
            encode(&parts, b"xyz"),
            "POST /a?b=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 3\r\n\r\nxyz"
        );
        assert_eq!(
            encode(&parts, b""),
            "POST /a?b=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
        );
        parts.method = Method::GET;
        assert_eq!(
            encode(&parts, b""),
            "GET /a?b=1 HTTP/1.1\r\nhost: up\r\n\r\n"
        );
    }
}
