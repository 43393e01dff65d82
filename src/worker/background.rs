//! The components that run beside the fetch loop, each a struct built from
//! the config with `async fn run(self, token)`, all spawned on the daemon's
//! background tracker: heartbeat, systemd watchdog, HTTP probe, reaper,
//! promoter, periodic jobs and the control listener.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::Health;
use super::{Daemon, control, heartbeat, notify, periodic, probe, promoter, reaper};
use crate::config::Config;

/// Spawns every background component on `tracker`. They stop when
/// `background` fires, at the end of the drain, except periodic jobs,
/// which stop with the fetch loop (`shutdown`).
pub(super) fn spawn(
    tracker: &TaskTracker,
    daemon: &Daemon,
    config: &Config,
    http: Option<TcpListener>,
    shutdown: &CancellationToken,
    background: &CancellationToken,
) {
    spawn_liveness(tracker, daemon, config, http, background);
    spawn_upkeep(tracker, daemon, config, shutdown, background);
}

/// What tells others this daemon is alive and well: the heartbeat, the
/// systemd watchdog and the HTTP probe.
fn spawn_liveness(
    tracker: &TaskTracker,
    daemon: &Daemon,
    config: &Config,
    http: Option<TcpListener>,
    background: &CancellationToken,
) {
    let w = &config.worker;
    tracker.spawn(
        heartbeat::Heartbeat {
            broker: daemon.broker.clone(),
            info: daemon.info.clone(),
            every: Duration::from_secs(w.heartbeat_secs),
            ttl: Duration::from_secs(w.dead_after_secs),
            env: daemon.env.clone(),
            health: daemon.health.clone(),
        }
        .run(background.clone()),
    );
    tracker.spawn(
        Watchdog {
            health: daemon.health.clone(),
        }
        .run(background.clone()),
    );
    if let Some(listener) = http {
        // Up until the very end of the drain: `/readyz` says "shutting down".
        tracker.spawn(ProbeServer::new(listener, daemon, config).run(background.clone()));
    }
}

/// The upkeep: reaping dead daemons, promoting due retries, periodic jobs,
/// and the control listener (cancellations).
fn spawn_upkeep(
    tracker: &TaskTracker,
    daemon: &Daemon,
    config: &Config,
    shutdown: &CancellationToken,
    background: &CancellationToken,
) {
    let w = &config.worker;
    let broker = &daemon.broker;
    tracker.spawn(
        reaper::Reaper {
            broker: broker.clone(),
            worker_id: daemon.worker_id.clone(),
            every: Duration::from_secs(w.heartbeat_secs),
        }
        .run(background.clone()),
    );
    tracker.spawn(
        promoter::Promoter {
            broker: broker.clone(),
            queues: w.queues.clone(),
            every: Duration::from_millis(w.promote_interval_ms),
        }
        .run(background.clone()),
    );
    // Periodic jobs stop with the fetch loop (SIGTERM): a draining daemon
    // enqueues nothing more; the other daemons go on ticking.
    tracker.spawn(
        periodic::Periodic {
            broker: broker.clone(),
            schedules: periodic::Schedule::from_config(config),
        }
        .run(shutdown.clone()),
    );
    tracker.spawn(
        control::Control {
            broker: broker.clone(),
            runs: daemon.env.runs.clone(),
        }
        .run(background.clone()),
    );
}

/// The systemd watchdog ([`notify::watchdog`]).
struct Watchdog {
    health: Arc<Health>,
}

impl Watchdog {
    async fn run(self, token: CancellationToken) {
        notify::watchdog(self.health, token).await;
    }
}

/// The HTTP listener of `worker.http` ([`probe::serve`]).
struct ProbeServer {
    listener: TcpListener,
    probe: probe::Probe,
}

impl ProbeServer {
    fn new(listener: TcpListener, daemon: &Daemon, config: &Config) -> Self {
        let w = &config.worker;
        let in_flight = daemon.env.clone();
        let probe = probe::Probe {
            health: daemon.health.clone(),
            broker: daemon.broker.clone(),
            queues: w.queues.clone(),
            worker_id: daemon.worker_id.clone(),
            in_flight: Box::new(move || in_flight.stats.running.load(Relaxed)),
            ready_window: Duration::from_secs(w.dead_after_secs),
        };
        Self { listener, probe }
    }

    async fn run(self, token: CancellationToken) {
        probe::serve(self.listener, self.probe, token).await;
    }
}
