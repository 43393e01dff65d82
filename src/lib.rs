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
//!   `conveyor enqueue`, `cancel` and `job` do; its [`inspect::Inspector`]
//!   reads the queues, workers and dead lists as `conveyor status` and the
//!   dashboard do.
//! - [`Stage`] is the trait every stage implements. Implement it to run a
//!   stage in-process, and register it under a name with
//!   [`Worker::builder`]: config stages written `builtin = "<name>"` run it.
//! - [`Worker`] runs the daemon, the same engine as `conveyor worker`, with
//!   those Rust stages added.
//!
//! ```no_run
//! use conveyor::{BoxFuture, Client, Config, EnqueueRequest, Stage, StageContext, StageError, Worker};
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
//! # Cargo features
//!
//! [`Client`] and [`Worker`] need none; `default-features = false` leaves
//! out what only the binary and the servers use. All are on by default.
//!
//! - `cli`: the `conveyor` binary and its commands (clap, indicatif);
//!   implies `dashboard` and `prometheus`.
//! - `dashboard`: `conveyor dashboard` and `conveyor gateway` (axum).
//! - `prometheus`: the daemon's `[worker] http` listener, `/metrics`,
//!   `/healthz` and `/readyz`. Without it the metrics calls are no-ops and
//!   a config that sets `worker.http` is refused at start.
//! - `http`: the HTTP server the two above share; nothing by itself.
//!
//! # Layout
//!
//! Every dependency points down (`tests/architecture.rs` checks it on each
//! `crate::` path):
//!
//! | layer | modules | what they hold |
//! |---|---|---|
//! | 5 | `cli` | the command line: arguments, printing, exit codes (only `main.rs` uses it) |
//! | 4 | `dashboard`, `gateway`, `bench`, `doctor` | the programs behind `conveyor dashboard`, `gateway`, `bench`, `doctor` |
//! | 3 | `client`, `worker` | [`Client`] (enqueue, cancel, look up, [`inspect`]) and the daemon ([`Worker`]) |
//! | 2 | `progress` | progress events and their publisher |
//! | 1 | `queue`, `store`, `pipeline` | Redis (keys, Lua scripts, connections, inspection), SQLite, stages |
//! | 0 | `job`, `time`, `config`, `telemetry`, `retry`, `shutdown`, `http` | the ground floor |
//!
//! Modules are private: what a library user needs is re-exported below.
//! `cli`, `queue`, `job` and `store` are public but hidden from the docs,
//! for the binary and the tests; they are not part of the library's API.

// What only the binary's commands use (the daemon's `run` from a config,
// log set-up, time parsing) is unused in a library build without `cli`;
// the default build, which CI lints, still reports dead code.
#![cfg_attr(not(feature = "cli"), allow(dead_code))]

// Cargo features (docs/stages.md#cargo-features) leave out whole modules:
// the programs behind the binary's commands, and the HTTP servers.
#[cfg(feature = "cli")]
mod bench;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
mod client;
mod config;
#[cfg(feature = "dashboard")]
mod dashboard;
#[cfg(feature = "cli")]
mod doctor;
#[cfg(feature = "dashboard")]
mod gateway;
#[cfg(feature = "http")]
mod http;
#[doc(hidden)]
pub mod job;
mod pipeline;
mod progress;
#[doc(hidden)]
pub mod queue;
mod retry;
mod shutdown;
#[doc(hidden)]
pub mod store;
mod telemetry;
mod time;
mod worker;

pub use client::inspect;
pub use client::{Cancelled, Client, ClientError, EnqueueRequest, Enqueued, JobInfo, LiveJob};
pub use config::{Config, ConfigError};
pub use job::Status;
pub use pipeline::{BoxFuture, Stage, StageContext, StageError};
pub use progress::ProgressEvent;
pub use queue::Keys;
pub use shutdown::on_signals;
pub use store::{AttemptRecord, JobRecord, StageRecord};
pub use worker::WorkerError;
pub use worker::builder::{Worker, WorkerBuilder};
pub use worker::quiet::Quiet;
