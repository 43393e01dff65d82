//! Liveness of the fetch loop and of Redis, for the systemd watchdog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Two timestamps, in milliseconds since the daemon started.
pub struct Health {
    epoch: Instant,
    /// Last time the fetch loop went round (or was waiting for a free slot).
    fetch_loop: AtomicU64,
    /// Last successful Redis round trip.
    redis: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            fetch_loop: AtomicU64::new(0),
            redis: AtomicU64::new(0),
        }
    }
}

impl Health {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn fetch_loop_alive(&self) {
        self.fetch_loop.store(self.now(), Ordering::Relaxed);
    }

    pub fn redis_ok(&self) {
        self.redis.store(self.now(), Ordering::Relaxed);
    }

    /// Both seen within `window`.
    pub fn healthy(&self, window: Duration) -> bool {
        let now = self.now();
        let window = window.as_millis() as u64;
        let fresh = |t: &AtomicU64| now.saturating_sub(t.load(Ordering::Relaxed)) <= window;
        fresh(&self.fetch_loop) && fresh(&self.redis)
    }
}
