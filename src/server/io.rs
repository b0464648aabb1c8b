//! A connection's writes, with small vectored writes sent as one plain write.
//!
//! hyper writes a message as a vector of buffers (the head, then the body's chunks) with one
//! `writev`. For a socket, `writev` goes through the kernel's file layer and copies the vector
//! in before it reaches TCP, while a plain write is a `send`, which goes straight to the socket.
//! On a small message that difference is a measurable part of the kernel's work (about 2% of
//! the proxy's CPU on the public route: bench/README.md, "Hot path, seventh pass"). So a write
//! of several buffers that together fit [`COALESCE_MAX`] bytes is copied into one buffer and
//! written once; anything larger still goes out as a vector, without a copy. On a TLS
//! connection this wraps the TLS stream, so a small message is one write into rustls (one
//! record); rustls's writes of records to the socket are its own.
//!
//! hyper's own switch, `writev(false)`, would copy every body into the connection's write
//! buffer, which then keeps the capacity of the largest body for as long as the connection
//! lives: an idle keep-alive connection that once carried a large response would hold that
//! much memory.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};

/// Vectored writes of at most this many bytes in all are copied and written as one.
pub(crate) const COALESCE_MAX: usize = 2048;

/// `T`, with vectored writes of up to [`COALESCE_MAX`] bytes sent as one write.
#[derive(Debug)]
pub(crate) struct Coalesced<T>(pub(crate) T);

impl<T: Read + Unpin> Read for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    /// Always: hyper then hands over its buffers as they are, and this decides how they go.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        let first = filled.next().map_or(&[][..], |b| &b[..]);
        if filled.next().is_none() {
            // One buffer with bytes in it (or none): a plain write of it.
            return Pin::new(&mut self.0).poll_write(cx, first);
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if total > COALESCE_MAX {
            return if self.0.is_write_vectored() {
                Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
            } else {
                Pin::new(&mut self.0).poll_write(cx, first)
            };
        }
        let mut joined = [0u8; COALESCE_MAX];
        let mut len = 0;
        for b in bufs {
            joined[len..len + b.len()].copy_from_slice(b);
            len += b.len();
        }
        // The bytes written are the first `n` of the buffers in order, which is what a
        // vectored write reports too.
        Pin::new(&mut self.0).poll_write(cx, &joined[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call; accepts at most `accept` bytes a call.
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
        vectored: bool,
        accept: usize,
    }

    impl Recorder {
        fn new(vectored: bool) -> Self {
            Self {
                calls: Vec::new(),
                vectored,
                accept: usize::MAX,
            }
        }
    }

    impl Write for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.accept);
            self.calls.push(("write", buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len().min(self.accept);
            self.calls.push(("writev", all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_vectored(io: &mut Coalesced<Recorder>, bufs: &[&[u8]]) -> usize {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(io).poll_write_vectored(&mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn small_buffers_go_out_as_one_plain_write() {
        let mut io = Coalesced(Recorder::new(true));
        let n = write_vectored(&mut io, &[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"ok"]);
        assert_eq!(n, 21);
        assert_eq!(
            io.0.calls,
            vec![("write", b"HTTP/1.1 200 OK\r\n\r\nok".to_vec())]
        );
    }

    #[test]
    fn one_buffer_is_written_as_it_is() {
        let mut io = Coalesced(Recorder::new(true));
        let big = vec![7u8; COALESCE_MAX * 2];
        assert_eq!(write_vectored(&mut io, &[b"", &big]), big.len());
        assert_eq!(io.0.calls, vec![("write", big)]);
    }

    #[test]
    fn large_messages_stay_vectored() {
        let mut io = Coalesced(Recorder::new(true));
        let body = vec![1u8; COALESCE_MAX];
        assert_eq!(write_vectored(&mut io, &[b"head", &body]), 4 + body.len());
        assert_eq!(io.0.calls.len(), 1);
        assert_eq!(io.0.calls[0].0, "writev");

        // A stream that cannot write vectors gets the first buffer, as hyper's fallback does.
        let mut io = Coalesced(Recorder::new(false));
        assert_eq!(write_vectored(&mut io, &[b"head", &body]), 4);
        assert_eq!(io.0.calls, vec![("write", b"head".to_vec())]);
    }

    #[test]
    fn a_short_write_reports_the_leading_bytes_written() {
        let mut io = Coalesced(Recorder::new(true));
        io.0.accept = 5;
        assert_eq!(write_vectored(&mut io, &[b"abc", b"defgh"]), 5);
        assert_eq!(io.0.calls, vec![("write", b"abcde".to_vec())]);
    }

    #[test]
    fn exactly_the_limit_is_still_joined() {
        let mut io = Coalesced(Recorder::new(true));
        let a = vec![b'a'; COALESCE_MAX - 1];
        assert_eq!(write_vectored(&mut io, &[&a, b"b"]), COALESCE_MAX);
        assert_eq!(io.0.calls.len(), 1);
        assert_eq!(io.0.calls[0].0, "write");
        assert_eq!(io.0.calls[0].1.len(), COALESCE_MAX);
    }
}
