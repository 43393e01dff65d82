//! Quiet: the daemon takes no new jobs but finishes its running ones and
//! stays alive (Sidekiq's TSTP). `conveyor worker` goes quiet on SIGTSTP
//! and takes jobs again on SIGCONT; a library user holds a [`Quiet`]
//! handle ([`crate::Worker::quiet_handle`]).
//!
//! While quiet the fetch loop sends no `BLMOVE` (a job its last one still
//! received goes back to pending at once); everything else keeps running:
//! the heartbeat (the daemon is alive and its running jobs keep their
//! leases), the reaper and the promoter (they keep the queues moving for
//! the other daemons and take no job themselves), periodic jobs (they
//! enqueue, they do not run), the control listener (cancels) and the HTTP
//! listener, whose `/readyz` answers 503 `not ready: quiet…`. systemd's
//! `STATUS=` says `quiet: N running, taking no jobs`. SIGTERM during quiet
//! drains and exits as usual.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::notify;
use super::runner::Stats;

/// A switch that quiets a running daemon and wakes it again; clones share
/// the switch.
#[derive(Debug, Clone)]
pub struct Quiet(Arc<watch::Sender<bool>>);

impl Default for Quiet {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Quiet {
    /// A switch that is off: the daemon takes jobs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take no new jobs; finish the running ones.
    pub fn quiet(&self) {
        self.0.send_replace(true);
    }

    /// Take jobs again.
    pub fn resume(&self) {
        self.0.send_replace(false);
    }

    pub fn is_quiet(&self) -> bool {
        *self.0.borrow()
    }
}

/// The fetch loop's gate: returns at once unless quiet; while quiet, waits
/// (saying so once in the log and to systemd) and keeps the fetch loop's
/// liveness fresh, so neither the watchdog nor `/healthz` takes a quiet
/// daemon for a wedged one. False when `shutdown` fires meanwhile.
pub(super) async fn gate(
    quiet: &Quiet,
    health: &Health,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> bool {
    if !quiet.is_quiet() {
        return true;
    }
    let running = stats.running.load(Relaxed);
    tracing::info!(running, "worker_quiet");
    notify::status(&status_line(running));
    let mut switch = quiet.0.subscribe();
    while *switch.borrow_and_update() {
        health.fetch_loop_alive();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return false,
            _ = switch.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    if shutdown.is_cancelled() {
        return false;
    }
    tracing::info!(running = stats.running.load(Relaxed), "worker_resumed");
    true
}

/// systemd's `STATUS=` while quiet.
pub(super) fn status_line(running: u64) -> String {
    format!("quiet: {running} running, taking no jobs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_waits_while_quiet_and_opens_on_resume_or_shutdown() {
        let (quiet, health, stats) = (Quiet::new(), Health::default(), Stats::default());
        let shutdown = CancellationToken::new();
        assert!(gate(&quiet, &health, &stats, &shutdown).await);

        quiet.quiet();
        let q = quiet.clone();
        let waker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(q.is_quiet());
            q.resume();
        });
        assert!(gate(&quiet, &health, &stats, &shutdown).await);
        waker.await.unwrap();
        assert!(!quiet.is_quiet());

        quiet.quiet();
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.cancel();
        });
        assert!(!gate(&quiet, &health, &stats, &shutdown).await);
    }
}
