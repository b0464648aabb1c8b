//! Fuzzes the `Authorization: Signature v1, ...` header parser.
//!
//! Besides "never panics", every accepted header must satisfy the documented rules, and the
//! canonical spelling of what was parsed must parse back to the same parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::auth::signature::parse;
use portcullis::config::SignatureAlgorithm;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(params) = parse(header) else {
        return;
    };

    assert!(header.len() <= 1024, "accepted a header over 1024 bytes");
    assert!(
        !params.key_id.is_empty()
            && params.key_id.len() <= 256
            && params.key_id.bytes().all(|b| b.is_ascii_graphic()),
        "bad keyId accepted: {:?}",
        params.key_id
    );
    assert!(
        params.ts <= 9_999_999_999,
        "ts over 10 digits: {}",
        params.ts
    );
    assert!(
        (16..=128).contains(&params.nonce.len())
            && params
                .nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "bad nonce accepted: {:?}",
        params.nonce
    );
    assert!(
        matches!(params.signature.len(), 64 | 128)
            && params
                .signature
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "bad signature accepted: {:?}",
        params.signature
    );
    for value in [params.key_id, params.nonce, params.signature] {
        assert!(
            !value.contains(['"', ',']),
            "value holds a quote or comma: {value:?}"
        );
    }

    // Round trip through the canonical spelling.
    let mut canonical = format!(
        "Signature v1, keyId=\"{}\", ts=\"{}\", nonce=\"{}\", signature=\"{}\"",
        params.key_id, params.ts, params.nonce, params.signature
    );
    match params.alg {
        None => {}
        Some(SignatureAlgorithm::HmacSha256) => canonical.push_str(", alg=\"hmac-sha256\""),
        Some(SignatureAlgorithm::HmacSha512) => canonical.push_str(", alg=\"hmac-sha512\""),
    }
    if canonical.len() <= 1024 {
        let again = parse(&canonical)
            .unwrap_or_else(|e| panic!("canonical form {canonical:?} refused: {e:?}"));
        assert_eq!(
            again, params,
            "canonical form {canonical:?} parsed differently"
        );
    }
});
