//! conveyor: a Redis-backed job processing daemon.
//!
//! Producers in any language `LPUSH` a JSON job onto a Redis list; daemons
//! take jobs with `BLMOVE` into a per-worker list, run each job through its
//! pipeline of stages, publish progress over pub/sub, and keep job and
//! stage state in SQLite. A crash or a shutdown loses nothing.
//!
//! # Library
//!
//! The `conveyor` binary is a thin wrapper around this crate; Rust programs
//! can use the same parts directly:
//!
//! - [`Client`] enqueues jobs (now, after a delay, or at a time; unique by
//!   id), cancels them, and looks them up in Redis and SQLite, as
//!   `conveyor enqueue`, `cancel` and `job` do.
//! - [`Stage`] is the trait every stage implements. Implement it to run a
//!   stage in-process, and register it under a name with
//!   [`Worker::builder`]: config stages written `builtin = "<name>"` run it.
//! - [`Worker`] runs the daemon, the same engine as `conveyor worker`, with
//!   those Rust stages added.
//!
//! ```no_run
//! use conveyor::client::EnqueueRequest;
//! use conveyor::config::Config;
//! use conveyor::{BoxFuture, Client, Stage, StageContext, StageError, Worker};
//! use serde_json::{Value, json};
//! use tokio_util::sync::CancellationToken;
//!
//! struct WordCount;
//!
//! impl Stage for WordCount {
//!     fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
//!         Box::pin(async move {
//!             let text = ctx.payload["text"].as_str().unwrap_or_default();
//!             Ok(json!({ "words": text.split_whitespace().count() }))
//!         })
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Config::from_toml(
//!         r#"
//!         [jobs."text.count"]
//!         stages = [{ name = "count", builtin = "wordcount" }]
//!         "#,
//!     )?;
//!     let client = Client::from_config(&config).await?;
//!     let job = client
//!         .enqueue(EnqueueRequest::new("text.count").payload(json!({ "text": "a b c" })))
//!         .await?;
//!
//!     let shutdown = CancellationToken::new();
//!     let worker = Worker::builder(config).stage("wordcount", WordCount).build()?;
//!     let daemon = tokio::spawn(worker.run(shutdown.clone()));
//!     // ... poll `client.job(&job.id)` until `is_final()`, then:
//!     shutdown.cancel();
//!     daemon.await??;
//!     Ok(())
//! }
//! ```
//!
//! `examples/rust_stage.rs` is a complete program: `cargo run --example
//! rust_stage`.
//!
//! # Layout
//! - [`config`]: TOML file + environment + flags, validated with the key named.
//! - [`client`]: [`Client`], enqueue / cancel / look up jobs from Rust.
//! - [`queue`]: Redis keys ([`queue::keys`]), Lua scripts, the job envelope
//!   ([`queue::job`]), and fetch / ack / requeue / dead-letter.
//! - [`pipeline`]: the [`pipeline::Stage`] trait, built-in stages, and
//!   external programs speaking the stage protocol ([`pipeline::exec`]).
//! - [`worker`]: the daemon: fetch loop, job runner, heartbeat, shutdown,
//!   periodic jobs ([`config::timing`] says when they tick); [`Worker`] runs it
//!   as a library ([`worker::builder`]).
//! - [`store`]: SQLite state through one writer thread with group commit.
//! - [`progress`]: progress events and their publisher.
//! - [`shutdown`]: OS signals to a cancellation token.
//! - [`telemetry`]: structured logs.
//! - [`notify`]: systemd readiness, watchdog and status.
//! - [`dashboard`]: `conveyor dashboard`, a web page and JSON API over
//!   Redis and SQLite, with live progress as server-sent events.
//! - [`cli`]: the `conveyor` command line (the binary is a thin wrapper);
//!   [`admin`]: its operator commands (cancel, retry, dead letters);
//!   [`mod@bench`]: `conveyor bench`, the benchmark.

pub mod admin;
pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod doctor;
pub mod error;
pub mod notify;
pub mod observe;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod watch;
pub mod worker;

pub use client::Client;
pub use pipeline::{BoxFuture, Stage, StageContext, StageError};
pub use worker::builder::Worker;

/// Current time as RFC 3339 UTC with milliseconds (sorts as text).
pub fn now_rfc3339() -> String {
    rfc3339_of(std::time::SystemTime::now())
}

/// Now, in Unix milliseconds (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, milliseconds) of a time.
pub fn rfc3339_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_of_ms(ms: u64) -> String {
    rfc3339_of(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Parses an RFC 3339 time, `Z` or a `+HH:MM` / `-HH:MM` offset, to Unix ms.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("`{s}` is not an RFC 3339 time like 2026-11-23T18:00:00Z: {why}");
    let s = s.trim();
    let (base, offset_secs) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((base, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let hours: i64 = off[1..3].parse().map_err(|_| bad("bad offset hours"))?;
            let minutes: i64 = off[4..6].parse().map_err(|_| bad("bad offset minutes"))?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{base}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (s.to_owned(), 0),
    };
    let t = humantime::parse_rfc3339_weak(&base).map_err(|e| bad(&e.to_string()))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("before 1970"))?
        .as_millis() as i64;
    u64::try_from(ms - offset_secs * 1000).map_err(|_| bad("before 1970"))
}
