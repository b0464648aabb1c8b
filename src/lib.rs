//! portcullis: a reverse-proxy sidecar that verifies every request before the service behind it
//! sees it. [`run`] is what both the binary and the tests call.

pub mod admin;
pub mod auth;
pub mod cert;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod problem;
pub mod proxy;
pub mod server;
pub mod store;

pub use server::{run, RunError, Server};
