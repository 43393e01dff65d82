//! When the daemon's loops try again: which Redis errors pass
//! ([`is_transient`]), and the backoffs of reconnects and job operations.

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

/// Backoff for one state change of one job (claim, ack, requeue,
/// dead-letter): 50 ms doubling to 5 s, jittered, for as long as Redis is
/// away; the caller stops at shutdown. A job's state is never dropped
/// because Redis was down.
pub fn job_op_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// `base` stretched by a random factor in [0.8, 1.2], so that periodic
/// work of many daemons (promotion, reaping) does not run in lockstep.
pub fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.8 + fastrand::f64() * 0.4)
}
