//! Shared parts of the integration tests: a real upstream that echoes what it received, a JWKS
//! server, a proxy started in-process on free loopback ports, a real `redis-server` on a port
//! the test picked, and raw HTTP clients.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod ca;
pub mod http;
pub mod jwks;
pub mod keys;
pub mod pki;
pub mod proxy;
pub mod redis;
pub mod upstream;
