//! Liveness of the fetch loop and of Redis (for the systemd watchdog), and
//! the daemon's readiness: Redis answering, SQLite writes going through,
//! not shutting down, not quiet (for `/readyz`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::quiet::Quiet;

/// Two timestamps, in milliseconds since the daemon started.
pub struct Health {
    epoch: Instant,
    /// Last time the fetch loop went round (or was waiting for a free slot).
    fetch_loop: AtomicU64,
    /// Last successful Redis round trip.
    redis: AtomicU64,
    /// Last heartbeat that went through.
    heartbeat: AtomicU64,
    /// Shutting down: the fetch loop is gone on purpose and the drain is
    /// bounded by the grace periods, so the watchdog keeps being fed.
    draining: AtomicBool,
    /// Cleared by the SQLite writer while its transactions fail.
    sqlite_ok: Option<Arc<AtomicBool>>,
    /// Taking no new jobs on purpose ([`Quiet`]).
    quiet: Quiet,
}

/// `/readyz`'s reason while quiet.
pub const QUIET: &str = "quiet: taking no new jobs";

impl Default for Health {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            fetch_loop: AtomicU64::new(0),
            redis: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            sqlite_ok: None,
            quiet: Quiet::default(),
        }
    }
}

impl Health {
    pub fn with_sqlite(sqlite_ok: Arc<AtomicBool>) -> Self {
        Self {
            sqlite_ok: Some(sqlite_ok),
            ..Self::default()
        }
    }

    /// The same, quieted and woken by `quiet`.
    pub fn with_quiet(self, quiet: Quiet) -> Self {
        Self { quiet, ..self }
    }

    /// The daemon's quiet switch.
    pub fn quiet(&self) -> &Quiet {
        &self.quiet
    }

    /// Ready to take jobs, or why not: shutting down, quiet, Redis silent
    /// for longer than `window`, or SQLite writes failing.
    pub fn readiness(&self, window: Duration) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if self.quiet.is_quiet() {
            return Err(QUIET.into());
        }
        let silent = self
            .now()
            .saturating_sub(self.redis.load(Ordering::Relaxed));
        if silent > window.as_millis() as u64 {
            return Err(format!("Redis has not answered for {} ms", silent));
        }
        if let Some(ok) = &self.sqlite_ok
            && !ok.load(Ordering::Relaxed)
        {
            return Err("SQLite writes are failing (locked or disk full); retrying".into());
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn fetch_loop_alive(&self) {
        self.fetch_loop.store(self.now(), Ordering::Relaxed);
    }

    pub fn redis_ok(&self) {
        self.redis.store(self.now(), Ordering::Relaxed);
    }

    /// A heartbeat went through (Redis answered too).
    pub fn heartbeat_ok(&self) {
        let now = self.now();
        self.heartbeat.store(now, Ordering::Relaxed);
        self.redis.store(now, Ordering::Relaxed);
    }

    /// Time since the last heartbeat went through (since start before one).
    pub fn heartbeat_age(&self) -> Duration {
        let last = self.heartbeat.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(last))
    }

    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Draining, or both seen within `window`.
    pub fn healthy(&self, window: Duration) -> bool {
        if self.draining.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.now();
        let window = window.as_millis() as u64;
        let fresh = |t: &AtomicU64| now.saturating_sub(t.load(Ordering::Relaxed)) <= window;
        fresh(&self.fetch_loop) && fresh(&self.redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_fetch_loop_is_unhealthy_unless_draining() {
        let h = Health::default();
        h.redis_ok();
        h.fetch_loop_alive();
        assert!(h.healthy(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        h.redis_ok();
        assert!(!h.healthy(Duration::from_millis(5)));
        h.draining();
        assert!(h.healthy(Duration::from_millis(5)));
    }

    #[test]
    fn readiness_names_the_reason() {
        let sqlite = Arc::new(AtomicBool::new(true));
        let h = Health::with_sqlite(sqlite.clone());
        h.redis_ok();
        assert_eq!(h.readiness(Duration::from_secs(10)), Ok(()));
        sqlite.store(false, Ordering::Relaxed);
        assert!(
            h.readiness(Duration::from_secs(10))
                .unwrap_err()
                .contains("SQLite")
        );
        sqlite.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            h.readiness(Duration::from_millis(5))
                .unwrap_err()
                .contains("Redis")
        );
        h.quiet().quiet();
        assert_eq!(h.readiness(Duration::from_secs(10)), Err(QUIET.into()));
        h.draining();
        assert_eq!(
            h.readiness(Duration::from_secs(10)),
            Err("shutting down".into())
        );
    }
}
