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
//! - [`worker`]: the daemon: fetch loop, job runner, heartbeat, shutdown,
//!   periodic jobs ([`schedule`] says when they tick).
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
pub mod doctor;
pub mod error;
pub mod notify;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod schedule;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod watch;
pub mod worker;

/// Current time as RFC 3339 UTC with milliseconds (sorts as text).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_of_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
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
