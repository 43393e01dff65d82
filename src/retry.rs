//! When the daemon's loops try again: which Redis errors pass
//! ([`is_transient`]), and every backoff of the crate (reconnects, job
//! operations, SQLite), all `backon` exponentials with jitter so that many
//! daemons never retry in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
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
    fresh_reconnect()
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

/// Delay after a failed SQLite write transaction: 50 ms doubling to
/// 500 ms, jittered up to twice that, forever (the writer stops at
/// shutdown). The jittered bound keeps each pause under a second, as the
/// writer checks for a give-up only between pauses.
pub fn sqlite_write_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Delay while another process holds the lock that switching to WAL
/// needs: 10 ms doubling to 200 ms, jittered, ending (`None`) once 10 s
/// of pauses have passed. Daemons started together try at different
/// moments instead of colliding again.
pub fn wal_switch_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(200))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(Duration::from_secs(10)))
        .build()
}

/// A reconnect loop's backoff that starts over once the connection has
/// worked again, so a link that drops after an hour is retried after
/// 100 ms, not after the delay the last outage reached.
pub struct Reconnect {
    steps: ExponentialBackoff,
}

impl Reconnect {
    pub fn new() -> Self {
        Self {
            steps: fresh_reconnect(),
        }
    }

    /// The pause before the next attempt ([`reconnect_backoff`]'s steps).
    pub fn next_delay(&mut self) -> Duration {
        // The steps never end (no attempt limit); the fallback is their cap.
        self.steps.next().unwrap_or(Duration::from_secs(5))
    }

    /// The connection worked: the next outage starts from the first step.
    pub fn reset(&mut self) {
        self.steps = fresh_reconnect();
    }
}

fn fresh_reconnect() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// backon's jitter adds up to one more delay: step `d` is in [d, 2d).
    fn within(d: Duration, step: Duration) -> bool {
        d >= step && d < step * 2
    }

    #[test]
    fn reconnects_start_small_grow_and_stay_capped() {
        let mut r = Reconnect::new();
        let first: Vec<Duration> = (0..4).map(|_| r.next_delay()).collect();
        for (d, step) in first.iter().zip([100, 200, 400, 800]) {
            assert!(within(*d, step * MS), "{d:?} is not a jittered {step} ms");
        }
        assert!(within(r.next_delay(), 1600 * MS));
        assert!(within(r.next_delay(), 3200 * MS));
        for _ in 0..50 {
            assert!(within(r.next_delay(), 5000 * MS));
        }
    }

    #[test]
    fn a_reset_starts_the_next_outage_from_the_first_step() {
        let mut r = Reconnect::new();
        for _ in 0..20 {
            r.next_delay();
        }
        assert!(r.next_delay() >= 5000 * MS);
        r.reset();
        assert!(within(r.next_delay(), 100 * MS));
        assert!(within(r.next_delay(), 200 * MS));
    }

    #[test]
    fn delays_are_jittered() {
        // Forty daemons losing Redis at once must not all come back at once.
        let firsts: std::collections::HashSet<Duration> =
            (0..40).map(|_| Reconnect::new().next_delay()).collect();
        assert!(firsts.len() > 1, "every first delay was {firsts:?}");
        let writes: std::collections::HashSet<Duration> = (0..40)
            .filter_map(|_| sqlite_write_backoff().next())
            .collect();
        assert!(writes.len() > 1, "every first write delay was {writes:?}");
    }

    #[test]
    fn sqlite_write_pauses_stay_under_a_second_forever() {
        let mut b = sqlite_write_backoff();
        assert!(within(b.next().unwrap(), 50 * MS));
        for _ in 0..200 {
            let d = b.next().expect("the writer retries forever");
            assert!(d < 1000 * MS, "{d:?}");
        }
    }

    #[test]
    fn the_wal_switch_gives_up_after_ten_seconds_of_pauses() {
        let pauses: Vec<Duration> = wal_switch_backoff().collect();
        let total: Duration = pauses.iter().sum();
        assert!(total <= Duration::from_secs(10), "{total:?}");
        // Far more than the 2-3 tries a plain 10 x 1 s loop would give.
        assert!(pauses.len() >= 20, "{} pauses", pauses.len());
        assert!(within(pauses[0], 10 * MS));
        assert!(pauses.iter().all(|d| *d < 400 * MS));
    }
}
