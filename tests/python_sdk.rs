//! Runs the Python SDK's pytest suite (sdk/python) against this build's binary, so that
//! `cargo test` is the one test command. Needs python3 with pytest, requests and httpx
//! (`.ci/run` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn python_sdk_suite_passes_against_the_real_proxy() {
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/python");
    let out = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(sdk)
        .env("PORTCULLIS_BIN", env!("CARGO_BIN_EXE_portcullis"))
        .output()
        .expect("python3 is needed for the SDK tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest failed (pip install pytest requests httpx if they are missing):\n{stdout}\n{stderr}"
    );
    // The proxy tests must have run, not skipped.
    assert!(
        !stdout.contains("skipped"),
        "pytest skipped tests:\n{stdout}"
    );
    assert!(stdout.contains(" passed"), "{stdout}");
}
