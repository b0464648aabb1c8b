//! The memory nonce store as it grows: N fresh nonces recorded one after another on one thread
//! (as the proxy's one worker thread would), each insert timed. Prints the time per insert, how
//! many inserts took over 1 ms and over 5 ms, the longest, and the resident size per nonce.
//! Every insert that stalls holds up every request on the proxy's thread.
//!
//!   taskset -c 0 cargo bench --bench nonce_store_growth -- 2000000
//!
//! mimalloc, as in the proxy. Not a criterion bench: the figure is the tail of one pass.

use std::fmt::Write;
use std::time::{Duration, Instant};

use portcullis::store::{MemoryNonceStore, NonceStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; the first number among the arguments is N.
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let before = resident_kib();
    let store = MemoryNonceStore::new();
    let ttl = Duration::from_secs(600);
    let (mut over_1ms, mut over_5ms, mut longest) = (0u64, 0u64, Duration::ZERO);
    let mut nonce = String::with_capacity(64);
    let start = Instant::now();
    for i in 0..n {
        nonce.clear();
        write!(nonce, "nonce-{i:012}-abcdefghij").expect("writing to a String");
        let t = Instant::now();
        store
            .record_once("bench-1", &nonce, ttl)
            .await
            .expect("the store has room for N");
        let took = t.elapsed();
        over_1ms += u64::from(took > Duration::from_millis(1));
        over_5ms += u64::from(took > Duration::from_millis(5));
        longest = longest.max(took);
    }
    let total = start.elapsed();
    let grown = resident_kib().saturating_sub(before);
    println!(
        "{n} nonces in {total:.3?} ({:.0} ns each); over 1 ms: {over_1ms}, over 5 ms: {over_5ms}, longest {longest:.3?}; resident +{grown} KiB ({:.1} bytes a nonce)",
        total.as_nanos() as f64 / n as f64,
        grown as f64 * 1024.0 / n as f64
    );
}
