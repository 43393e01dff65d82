//! conveyor: a Redis-backed job processing daemon.
//!
//! Producers in any language `LPUSH` a JSON job onto a Redis list; daemons
//! take jobs with `BLMOVE` into a per-worker list, run each job through its
//! pipeline of stages, publish progress over pub/sub, and keep job and
//! stage state in SQLite. A crash or a shutdown loses nothing.
//!
//! # Layout
//! - [`config`]: TOML file + environment + flags, validated with the key named.
//! - [`queue`]: Redis keys ([`queue::keys`]), Lua scripts, the job envelope
//!   ([`queue::job`]), and fetch / ack / requeue / dead-letter.
//! - [`pipeline`]: the [`pipeline::Stage`] trait, built-in stages, and
//!   external programs speaking the stage protocol ([`pipeline::exec`]).
//! - [`worker`]: the daemon: fetch loop, job runner, heartbeat, shutdown.
//! - [`store`]: SQLite state through one writer thread with group commit.
//! - [`progress`]: progress events and their publisher.
//! - [`shutdown`]: OS signals to a cancellation token.
//! - [`telemetry`]: structured logs.
//! - [`notify`]: systemd readiness, watchdog and status.
//! - [`cli`]: the `conveyor` command line (the binary is a thin wrapper);
//!   [`admin`]: its operator commands (cancel, retry, dead letters);
//!   [`mod@bench`]: `conveyor bench`, the benchmark.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod error;
pub mod notify;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod worker;

/// Current time as RFC 3339 UTC with milliseconds (sorts as text).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
