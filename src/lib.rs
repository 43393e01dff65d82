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

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod doctor;
pub mod gateway;
pub mod http;
pub mod job;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod worker;

pub use client::Client;
pub use pipeline::{BoxFuture, Stage, StageContext, StageError};
pub use worker::builder::Worker;
