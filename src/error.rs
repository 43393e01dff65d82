//! Error classification shared by the daemon's loops.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::RedisError;

/// Redis errors worth retrying: connection trouble, timeouts, and the server
/// states that pass (loading a dataset, busy script, failover, out of memory
/// under `noeviction`).
pub fn is_transient(err: &RedisError) -> bool {
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        return true;
    }
    if let Some(code) = err.code()
        && matches!(
            code,
            "LOADING" | "BUSY" | "OOM" | "UNBLOCKED" | "MASTERDOWN" | "READONLY" | "TRYAGAIN"
        )
    {
        return true;
    }
    !matches!(err.retry_method(), redis::RetryMethod::NoRetry)
}

/// Backoff for reconnect loops: 100 ms doubling to 5 s, with jitter so many
/// daemons do not reconnect in lockstep, and no limit on attempts (callers
/// race it against their cancellation token).
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Backoff for one state change of one job (ack, requeue, dead-letter):
/// about 30 s in all. Giving up is safe: the job stays in the active list,
/// is recovered later, and SQLite deduplicates what was already finished.
pub fn job_op_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_max_times(10)
}
