//! Fuzzes request path normalisation.
//!
//! Besides "never panics": an accepted path normalises to an absolute path without empty, `.`
//! or `..` segments, backslashes, encoded separators or NULs, and normalising it again changes
//! nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = normalize(path) else {
        return;
    };

    assert!(out.starts_with('/'), "{path:?} -> {out:?}: not absolute");
    assert!(!out.contains("//"), "{path:?} -> {out:?}: holds //");
    assert!(
        !out.contains('\\'),
        "{path:?} -> {out:?}: holds a backslash"
    );
    assert!(!out.contains('\0'), "{path:?} -> {out:?}: holds a NUL");
    for bad in ["%2F", "%2f", "%5C", "%5c", "%00"] {
        assert!(!out.contains(bad), "{path:?} -> {out:?}: holds {bad}");
    }
    for segment in out.split('/') {
        assert!(
            segment != "." && segment != "..",
            "{path:?} -> {out:?}: holds a dot segment"
        );
    }
    // The spelled-out substrings too (the segment check above covers the ends).
    assert!(!out.contains("/./"), "{path:?} -> {out:?}: holds /./");
    assert!(!out.contains("/../"), "{path:?} -> {out:?}: holds /../");

    match normalize(&out) {
        Ok(again) => assert_eq!(again, out, "{path:?}: normalising twice changed the path"),
        Err(e) => panic!("{path:?} -> {out:?}, which is then refused: {e:?}"),
    }
});
