//! Shared harness of the integration tests: a private Redis per test, the
//! real `conveyor` binary as a daemon or a command, a progress subscriber and
//! small polling helpers. Every test gets its own Redis, temp dir and key
//! prefix, so the tests run in parallel.
//!
//! This file owns the polling helpers and random names; the rest lives in
//! one module per thing started or read, all re-exported here so a test
//! imports `common::X` whatever module `X` lives in:
//! - `redis`: `redis-server` processes, key names, list reads and pushes;
//! - `daemon`: the binary as a worker daemon or a one-shot command;
//! - `harness`: what one test owns (Redis, temp dir, prefix, config) and
//!   the CLI calls made through it;
//! - `ledger`: SQLite reads and the ledger files stage scripts write;
//! - `progress`: the progress subscriber;
//! - `http`: the dashboard process and a small HTTP client;
//! - `certs`: test certificates (openssl) and TLS server arguments;
//! - `cluster`, `sentinel`: Redis Cluster and Sentinel setups, plain or TLS;
//! - `failover`: the report of a failover test;
//! - `pools`: stage pools' job type, hosts and reads of one host's file.

// Each test binary uses a subset of the harness.
#![allow(dead_code, unused_imports)]

mod certs;
mod cluster;
mod daemon;
mod failover;
mod harness;
mod http;
mod ledger;
mod pools;
mod progress;
mod redis;
mod sentinel;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// `self::`: a bare `redis` would also name the redis crate.
pub use self::certs::{have_tool, make_certs, tls_args, tls_config};
pub use self::cluster::TestCluster;
pub use self::daemon::{Daemon, children_of, process_group, run_with_timeout};
pub use self::failover::report_failover;
pub use self::harness::{Harness, enqueue, ledger_stage, toml_str};
pub use self::http::{DashboardProc, GatewayProc, HttpResponse, ServerProc, SseReader, http};
pub use self::ledger::{
    ledger_count, ledger_counts, ledger_counts_by_stage, ledger_lines, ledger_pid,
    open_sqlite_read_only,
};
pub use self::pools::{
    StageRow, chain_config, chain_stage, job_status_in, pool_host, pool_key, pool_len,
    stage_result, stage_rows,
};
pub use self::progress::ProgressSub;
pub use self::redis::TestRedis;
pub use self::sentinel::{SENTINEL_MASTER, TestSentinels};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_conveyor");
/// The crate root: daemons run there so `examples/stages/*.sh` resolve.
pub const CRATE_ROOT: &str = env!("CARGO_MANIFEST_DIR");

// ---------------------------------------------------------------- polling

/// Polls `cond` every 25 ms until it holds or `timeout` passes; returns
/// whether it held. Ends as soon as the condition is true.
/// A command's standard output, as text.
pub fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's standard error, as text.
pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`poll_until`], but panics with `what` when the time is up.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut out = None;
    wait_until(timeout, what, || {
        out = f();
        out.is_some()
    });
    out.expect("set when the wait succeeded")
}

// ---------------------------------------------------------------- names

/// A random hex string (std's `RandomState` is randomly seeded per process,
/// mixed with a counter, the pid and the time).
pub fn random_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// A key prefix of its own for one test.
pub fn unique_prefix() -> String {
    format!("t{}", random_hex())
}

/// A free loopback port (free when asked: bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}
