//! systemd notifications (`Type=notify`). Each call is a no-op when the
//! daemon is not started by systemd (no `NOTIFY_SOCKET`).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::health::Health;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!(error = %err, "sd_notify_failed");
    }
}

/// Redis and SQLite are up; jobs are being taken.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Asks systemd for more time while draining, so `TimeoutStopSec` counts
/// from now rather than from the stop request.
pub fn extend_timeout(by: Duration) {
    send(&[NotifyState::ExtendTimeoutUsec(by.as_micros() as u32)]);
}

/// Pings the watchdog at half its interval, but only while the fetch loop
/// goes round and Redis answers: a wedged daemon stops pinging and systemd
/// restarts it.
pub async fn watchdog(health: Arc<Health>, token: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Alive within the whole interval: a wedge is noticed within about
        // two intervals, and a BLMOVE block never looks like one.
        if health.healthy(interval) {
            send(&[NotifyState::Watchdog]);
        }
    }
}
