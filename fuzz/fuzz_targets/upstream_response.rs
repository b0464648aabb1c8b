//! Fuzzes the reading of an upstream's response (`portcullis::proxy::read_response`): the head
//! parser and the chunked decoder of the proxy's own HTTP/1.1 client, fed in pieces.
//!
//! Besides "never panics": a final head is never interim (`1xx`), a connection is left for
//! another request only after a body delimited by its length or by chunks, a length is never
//! passed on beside chunks, a chunked body never decodes to more bytes than came in, and the
//! same input read in other pieces gives the same answer (inputs under the 64 KiB head bound).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::read_response;

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(control >> 1) + 1;
    let head_request = control & 1 == 1;
    let read = read_response(input, piece, head_request);
    // (Past the 64 KiB head bound, a head cut off there and one read whole to a later error can
    // fail differently; libFuzzer's inputs are far shorter.)
    if input.len() < 64 * 1024 {
        let whole = read_response(input, input.len().max(1), head_request);
        assert_eq!(
            format!("{read:?}"),
            format!("{whole:?}"),
            "pieces of {piece} and the whole input read differently"
        );
    }
    let Ok(Some(response)) = read else {
        return;
    };
    assert!(
        (200..1000).contains(&response.status),
        "final status {}",
        response.status
    );
    if response.reusable {
        assert!(
            response.chunked || response.length.is_some(),
            "reusable without a delimited body: {response:?}"
        );
    }
    if response.chunked {
        assert!(
            !response.content_length,
            "a length beside chunks: {response:?}"
        );
    }
    if let Some(body) = &response.body {
        assert!(body.len() <= input.len(), "decoded more than came in");
    }
});
