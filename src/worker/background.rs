//! The components that run beside the fetch loop, each a struct built from
//! the config with `async fn run(self, token)`, all spawned on the daemon's
//! background tracker: heartbeat, systemd watchdog, HTTP probe, reaper,
//! promoter, periodic jobs and the control listener.

#[cfg(feature = "prometheus")]
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
#[cfg(feature = "prometheus")]
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::Health;
#[cfg(feature = "prometheus")]
use super::probe;
use super::{Daemon, WorkerError, control, heartbeat, notify, periodic, promoter, reaper};
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
    spawn_probe(tracker, daemon, config, http, background);
}

/// Binds `[worker] http` before the daemon registers: a taken port fails
/// the start, with the key named.
#[cfg(feature = "prometheus")]
pub(super) async fn bind_http(config: &Config) -> Result<Option<TcpListener>, WorkerError> {
    match &config.worker.http {
        Some(addr) => Ok(Some(probe::bind(addr).await.map_err(WorkerError::Http)?)),
        None => Ok(None),
    }
}

/// This build has no HTTP listener: a config that asks for one is refused
/// at start rather than run without the probes it expects.
#[cfg(not(feature = "prometheus"))]
pub(super) async fn bind_http(config: &Config) -> Result<Option<TcpListener>, WorkerError> {
    match &config.worker.http {
        Some(addr) => Err(WorkerError::Http(format!(
            "config key `worker.http`: cannot listen on {addr}: this build of conveyor has \
             no HTTP listener (it needs the cargo feature `prometheus`)"
        ))),
        None => Ok(None),
    }
}

#[cfg(feature = "prometheus")]
fn spawn_probe(
    tracker: &TaskTracker,
    daemon: &Daemon,
    config: &Config,
    http: Option<TcpListener>,
    background: &CancellationToken,
) {
    if let Some(listener) = http {
        // Up until the very end of the drain: `/readyz` says "shutting down".
        tracker.spawn(ProbeServer::new(listener, daemon, config).run(background.clone()));
    }
}

/// Without the `prometheus` feature [`bind_http`] never gives a listener.
#[cfg(not(feature = "prometheus"))]
fn spawn_probe(
    _: &TaskTracker,
    _: &Daemon,
    _: &Config,
    _: Option<TcpListener>,
    _: &CancellationToken,
) {
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
#[cfg(feature = "prometheus")]
struct ProbeServer {
    listener: TcpListener,
    probe: probe::Probe,
}

#[cfg(feature = "prometheus")]
impl ProbeServer {
    fn new(listener: TcpListener, daemon: &Daemon, config: &Config) -> Self {
        let w = &config.worker;
        let in_flight = daemon.env.clone();
        let probe = probe::Probe {
            health: daemon.health.clone(),
            broker: daemon.broker.clone(),
            queues: w.queues.clone(),
            pools: metric_pools(config),
            worker_id: daemon.worker_id.clone(),
            in_flight: Box::new(move || in_flight.stats.running.load(Ordering::Relaxed)),
            ready_window: Duration::from_secs(w.dead_after_secs),
        };
        Self { listener, probe }
    }

    async fn run(self, token: CancellationToken) {
        probe::serve(self.listener, self.probe, token).await;
    }
}

/// The pool lists of the queues served whose depth `/metrics` shows: those
/// the queue's stages name and those this daemon serves; none when it does
/// not use pools.
#[cfg(feature = "prometheus")]
fn metric_pools(config: &Config) -> BTreeMap<String, BTreeSet<String>> {
    if !matches!(config.pool_lists(), Ok(lists) if !lists.is_empty()) {
        return BTreeMap::new();
    }
    let w = &config.worker;
    w.queues
        .iter()
        .map(|q| {
            let mut pools = config.stage_pools(q);
            pools.extend(w.pools.iter().cloned());
            (q.clone(), pools)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(http: Option<&str>) -> Config {
        let mut c = Config::from_toml("").unwrap();
        c.worker.http = http.map(str::to_owned);
        c
    }

    #[tokio::test]
    async fn no_listener_is_asked_for_none_is_bound() {
        assert!(bind_http(&config(None)).await.unwrap().is_none());
    }

    #[cfg(feature = "prometheus")]
    #[tokio::test]
    async fn the_listener_is_bound_before_the_start() {
        let bound = bind_http(&config(Some("127.0.0.1:0"))).await.unwrap();
        assert!(bound.is_some_and(|l| l.local_addr().unwrap().ip().is_loopback()));
    }

    #[cfg(not(feature = "prometheus"))]
    #[tokio::test]
    async fn a_build_without_the_listener_refuses_a_config_asking_for_it() {
        let Err(WorkerError::Http(msg)) = bind_http(&config(Some("127.0.0.1:0"))).await else {
            panic!("worker.http accepted in a build without the listener");
        };
        assert!(
            msg.contains("`worker.http`") && msg.contains("`prometheus`"),
            "{msg}"
        );
    }
}
