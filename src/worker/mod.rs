//! The daemon: fetch jobs, run them, shut down without losing any.
//!
//! Components, all spawned on one [`TaskTracker`]:
//! - the fetch loop (this file): takes a free slot (semaphore permit), then
//!   a job, and spawns the job's task with the permit;
//! - job tasks ([`runner`]);
//! - the progress publisher ([`crate::progress`]);
//! - the heartbeat ([`heartbeat::Heartbeat`]), which also checks the leases
//!   and cancellation flags of running jobs;
//! - the reaper ([`reaper::Reaper`]): recovers the jobs of dead daemons;
//! - the promoter ([`promoter::Promoter`]): due retries back to pending;
//! - periodic jobs ([`periodic::Periodic`]): `[[schedules]]` ticks, each
//!   enqueued once across all daemons;
//! - the control listener ([`control::Control`]): cancellations;
//! - the systemd watchdog.
//!
//! Shutdown, in order (producers of work stop before its consumers):
//! 1. the `shutdown` token fires (SIGTERM/SIGINT): the fetch loop stops
//!    after its current `BLMOVE` returns (at most `fetch_block_ms`); a job
//!    it still received goes straight back to pending;
//! 2. running stages get `shutdown_grace_secs` to finish; a job whose stage
//!    finished does not start its next one but is requeued at once, resuming
//!    there;
//! 3. then `stop_stages` fires: stages' process groups get SIGTERM, then
//!    SIGKILL after `kill_grace_secs`; each unfinished job is recorded as
//!    pending in SQLite and put back on the consuming end of its queue with
//!    its finished stages' results;
//! 4. if Redis is unreachable, state changes still waiting give up after
//!    `kill_grace_secs` + 10 s: those jobs stay listed as active and are
//!    recovered at the next start (or by the reaper);
//! 5. anything still in this daemon's active lists goes back to pending;
//!    the registration is removed, the publisher drained, SQLite closed.

pub mod builder;
pub mod control;
pub(crate) mod events;
pub mod health;
pub mod heartbeat;
pub mod inflight;
pub mod notify;
pub mod periodic;
pub mod probe;
pub mod promoter;
pub mod reaper;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pipeline::Registry;
use crate::progress::Publisher;
use crate::queue::{Broker, Fetched, Next};
use crate::retry::reconnect_backoff;
use crate::store::Store;
use health::Health;
use inflight::InFlight;
use runner::{JobEnv, Stats};

/// How often the fetch loop puts back entries of its active lists that no
/// run owns, even when no fetch failed.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Most jobs taken in one non-blocking round trip.
const FETCH_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Register(#[from] heartbeat::RegisterError),
    #[error("job types: {0}")]
    Registry(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Http(String),
}

/// Runs the daemon until `shutdown` fires, then drains as described in the
/// module docs. Errors only at start (bad Redis, SQLite, worker id).
///
/// This is what `conveyor worker` runs: built-in and external stages only.
/// [`crate::Worker`] runs the same engine with Rust stages added.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let registry = Registry::from_config(&config).map_err(WorkerError::Registry)?;
    run_with_registry(config, registry, shutdown).await
}

/// [`run`] with the job types already built from `config`.
pub(crate) async fn run_with_registry(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let worker_id = config.worker_id();
    let w = &config.worker;
    let http = match &w.http {
        Some(addr) => Some(probe::bind(addr).await.map_err(WorkerError::Http)?),
        None => None,
    };
    let db = config.store.path.clone();
    let (store, store_closer) = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| WorkerError::Registry(format!("SQLite open panicked: {e}")))??;
    let broker = Broker::connect_config(&config.redis, 6).await?;

    let info = crate::queue::inspect::WorkerInfo {
        id: worker_id.clone(),
        host: crate::config::hostname(),
        pid: std::process::id(),
        instance: uuid::Uuid::now_v7().to_string(),
        started_at: crate::time::now_rfc3339(),
        queues: w.queues.clone(),
        concurrency: w.concurrency,
        running: 0,
        completed: 0,
        failed: 0,
        version: env!("CARGO_PKG_VERSION").into(),
        ttl_ms: w.dead_after_secs.saturating_mul(1000),
    };
    let ttl = Duration::from_secs(w.dead_after_secs);
    heartbeat::register(&broker, &info, ttl).await?;
    // Jobs a previous run of this id left behind (crash, SIGKILL) go back to
    // pending, each with a crash counted; SQLite tells where each stopped.
    let recovered = recover_active(&broker, &w.queues, &worker_id, true).await;
    if recovered > 0 {
        tracing::warn!(worker_id = %worker_id, recovered, "Recovered jobs left by a previous run of this worker");
    }

    let tracker = TaskTracker::new();
    let (publisher, publisher_task) = Publisher::new(
        broker.keys().clone(),
        broker.conn(),
        broker.round_trip_counter(),
    );
    let publisher_handle = tokio::spawn(publisher_task.run());
    let (batcher, batcher_task) = crate::queue::batch::Batcher::new(broker.clone(), &worker_id);
    let batcher_handle = tokio::spawn(batcher_task.run());
    let stop_stages = CancellationToken::new();
    let give_up = CancellationToken::new();
    let env = Arc::new(JobEnv {
        broker: broker.clone(),
        batcher,
        store: store.clone(),
        publisher,
        registry,
        worker_id: worker_id.clone(),
        max_job_bytes: w.max_job_bytes,
        max_crashes: w.max_crashes,
        kill_grace: Duration::from_secs(w.kill_grace_secs),
        draining: shutdown.clone(),
        stop_stages: stop_stages.clone(),
        give_up: give_up.clone(),
        runs: Arc::new(InFlight::default()),
        stats: Stats::default(),
        slots: Arc::new(Semaphore::new(w.concurrency)),
        parking: Arc::new(Semaphore::new(w.concurrency)),
    });
    let health = Arc::new(Health::with_sqlite(store.health_flag()));
    health.redis_ok();
    health.fetch_loop_alive();
    let background = CancellationToken::new();
    tracker.spawn(
        heartbeat::Heartbeat {
            broker: broker.clone(),
            info: info.clone(),
            every: Duration::from_secs(w.heartbeat_secs),
            ttl,
            env: env.clone(),
            health: health.clone(),
        }
        .run(background.clone()),
    );
    tracker.spawn(notify::watchdog(health.clone(), background.clone()));
    if let Some(listener) = http {
        let in_flight = env.clone();
        let probe = probe::Probe {
            health: health.clone(),
            broker: broker.clone(),
            queues: w.queues.clone(),
            worker_id: worker_id.clone(),
            in_flight: Box::new(move || {
                in_flight
                    .stats
                    .running
                    .load(std::sync::atomic::Ordering::Relaxed)
            }),
            ready_window: Duration::from_secs(w.dead_after_secs),
        };
        // Up until the very end of the drain: `/readyz` says "shutting down".
        tracker.spawn(probe::serve(listener, probe, background.clone()));
    }
    tracker.spawn(
        reaper::Reaper {
            broker: broker.clone(),
            worker_id: worker_id.clone(),
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
            schedules: periodic::Schedule::from_config(&config),
        }
        .run(shutdown.clone()),
    );
    tracker.spawn(
        control::Control {
            broker: broker.clone(),
            runs: env.runs.clone(),
        }
        .run(background.clone()),
    );

    tracing::info!(worker_id = %worker_id, queues = ?w.queues, concurrency = w.concurrency,
        pid = info.pid, version = %info.version, "worker_started");
    notify::ready();

    let jobs = TaskTracker::new();
    Fetcher {
        env: env.clone(),
        queues: w.queues.clone(),
        weights: (!w.queue_weights.is_empty()).then(|| Weights::new(&w.queues, &w.queue_weights)),
        slots: env.slots.clone(),
        block: Duration::from_millis(w.fetch_block_ms),
        health: health.clone(),
        jobs: jobs.clone(),
    }
    .run(shutdown.clone())
    .await;
    health.draining();

    // Shutdown: the fetch loop has stopped taking jobs.
    notify::stopping();
    let grace = Duration::from_secs(w.shutdown_grace_secs);
    let drain_budget = grace + env.kill_grace + Duration::from_secs(10);
    notify::extend_timeout(drain_budget);
    jobs.close();
    let running = env.stats.running.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        running,
        grace_secs = grace.as_secs(),
        "Shutting down: waiting for running jobs"
    );
    if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
        let running = env.stats.running.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            running,
            "Grace period over: stopping stages and requeueing their jobs"
        );
        stop_stages.cancel();
        jobs.wait().await;
    }

    background.cancel();
    tracker.close();
    tracker.wait().await;
    let left = recover_active(&broker, &config.worker.queues, &worker_id, false).await;
    if left > 0 {
        tracing::warn!(left, "Requeued jobs still listed as active");
    }
    if let Err(err) = heartbeat::deregister(&broker, &worker_id).await {
        tracing::warn!(error = %err, "Cannot remove worker registration; it expires by itself");
    }
    let stats = &env.stats;
    let (completed, failed, retried, requeued) = (
        stats.completed.load(std::sync::atomic::Ordering::Relaxed),
        stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        stats.retried.load(std::sync::atomic::Ordering::Relaxed),
        stats.requeued.load(std::sync::atomic::Ordering::Relaxed),
    );
    let dropped = env.publisher.dropped();
    drop(env);
    drop(store);
    let _ = batcher_handle.await;
    let _ = publisher_handle.await;
    store_closer.close().await;
    tracing::info!(worker_id = %worker_id, completed, failed, retried, requeued,
        progress_events_dropped = dropped, redis_round_trips = broker.round_trips(),
        "worker_shutdown_complete");
    Ok(())
}

/// Moves every job in this worker's active lists back to pending.
async fn recover_active(broker: &Broker, queues: &[String], worker: &str, crashed: bool) -> u64 {
    let mut total = 0;
    for queue in queues {
        match broker.recover_active(queue, worker, crashed).await {
            Ok(n) => total += n,
            Err(err) => tracing::error!(error = %err, queue = %queue,
                "Cannot requeue active jobs; they will be recovered at next start"),
        }
    }
    total
}

/// Queue weights of the weighted mode, in the order of `worker.queues`.
#[derive(Debug, Clone)]
struct Weights(Vec<f64>);

impl Weights {
    fn new(queues: &[String], weights: &std::collections::BTreeMap<String, u32>) -> Self {
        Self(
            queues
                .iter()
                .map(|q| f64::from(*weights.get(q).unwrap_or(&1)))
                .collect(),
        )
    }

    /// The queues in a random order where each queue comes first with a
    /// probability proportional to its weight (and so on for the rest):
    /// weighted sampling without replacement, by keys `u^(1/w)`.
    fn order(&self, queues: &[String]) -> Vec<String> {
        let mut keyed: Vec<(f64, &String)> = queues
            .iter()
            .zip(&self.0)
            .map(|(q, w)| (fastrand::f64().powf(1.0 / w), q))
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed.into_iter().map(|(_, q)| q.clone()).collect()
    }
}

/// Takes jobs while slots are free; see the module docs.
struct Fetcher {
    env: Arc<JobEnv>,
    queues: Vec<String>,
    /// Weighted mode (`worker.queue_weights`); strict priority when `None`.
    weights: Option<Weights>,
    slots: Arc<Semaphore>,
    block: Duration,
    health: Arc<Health>,
    jobs: TaskTracker,
}

impl Fetcher {
    async fn run(self, shutdown: CancellationToken) {
        let mut blocking = None;
        let mut backoff = reconnect_backoff();
        let mut failing = false;
        let mut turn = 0usize;
        let mut probe = 1usize;
        let mut reconciled = tokio::time::Instant::now();
        loop {
            let Some(permits) = self.take_slots(&shutdown).await else {
                return;
            };
            let result = self
                .fetch(permits.len(), &mut blocking, &mut turn, &mut probe)
                .await;
            if shutdown.is_cancelled() {
                // A job taken while the stop arrived is not started.
                if let Ok(jobs) = result {
                    self.put_back(jobs).await;
                }
                return;
            }
            match result {
                Ok(jobs) => {
                    self.health.redis_ok();
                    self.spawn_jobs(jobs, permits);
                    if failing {
                        tracing::info!("Redis reachable again; fetching");
                        failing = false;
                        backoff = reconnect_backoff();
                        // A BLMOVE whose reply was lost may have moved a job
                        // into our active list with nobody told.
                        self.reconcile().await;
                        reconciled = tokio::time::Instant::now();
                    } else if reconciled.elapsed() >= RECONCILE_EVERY {
                        // The same, when a client retried a fetch by itself
                        // (the cluster client re-sends a command whose
                        // connection broke) and reported no error.
                        self.reconcile().await;
                        reconciled = tokio::time::Instant::now();
                    }
                }
                Err(err) => {
                    crate::telemetry::metrics::redis_error("fetch");
                    blocking = None;
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "Fetch failed");
                    failing = true;
                    drop(permits);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Waits for one free slot, then takes whatever other slots are free.
    async fn take_slots(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = loop {
            self.health.fetch_loop_alive();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                permit = self.slots.clone().acquire_owned() => break permit.ok()?,
                // All slots busy with long jobs is healthy: say so.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        let mut permits = vec![first];
        self.take_free(&mut permits);
        Some(permits)
    }

    fn take_free(&self, permits: &mut Vec<OwnedSemaphorePermit>) {
        while permits.len() < FETCH_BATCH {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
    }

    /// Up to `max` jobs without blocking, in priority order; when there are
    /// none, one blocking BLMOVE on one queue (rotating over the queues).
    async fn fetch(
        &self,
        max: usize,
        blocking: &mut Option<crate::queue::RedisConn>,
        turn: &mut usize,
        probe: &mut usize,
    ) -> redis::RedisResult<Vec<Fetched>> {
        let broker = &self.env.broker;
        let worker = &self.env.worker_id;
        // Ask for as many jobs as the queue has been giving: after it ran
        // dry one LMOVE probes it, and the batch doubles while it comes back
        // full. An idle daemon thus sends one non-blocking LMOVE per BLMOVE,
        // not one per free slot.
        let want = max.min(*probe);
        let weighted;
        let queues = match &self.weights {
            Some(w) => {
                weighted = w.order(&self.queues);
                &weighted
            }
            None => &self.queues,
        };
        // The latency of a fetch that finds jobs or not, without the
        // blocking wait for a job to arrive.
        let started = std::time::Instant::now();
        let jobs = broker.fetch_available(queues, worker, want).await?;
        crate::telemetry::metrics::fetched(started.elapsed());
        *probe = if jobs.len() == want {
            (*probe).max(want * 2).min(FETCH_BATCH)
        } else {
            jobs.len().max(1)
        };
        if !jobs.is_empty() {
            return Ok(jobs);
        }
        // With several queues, each block is shorter so that a job arriving
        // on any queue waits at most `fetch_block_ms` in all.
        let block = (self.block / self.queues.len() as u32).max(Duration::from_millis(10));
        let conn = match blocking {
            Some(conn) => conn,
            None => blocking.insert(broker.blocking_connection(self.block).await?),
        };
        let queue = match &self.weights {
            Some(_) => &queues[0],
            None => &self.queues[*turn % self.queues.len()],
        };
        *turn = turn.wrapping_add(1);
        self.health.fetch_loop_alive();
        let job = broker.fetch_blocking(conn, queue, worker, block).await?;
        Ok(job.into_iter().collect())
    }

    fn spawn_jobs(&self, jobs: Vec<Fetched>, mut permits: Vec<OwnedSemaphorePermit>) {
        for job in jobs {
            let Some(permit) = permits.pop() else {
                // Cannot happen: never more jobs than permits are fetched.
                tracing::error!("Fetched more jobs than free slots");
                break;
            };
            // Registered before the task starts: reconciliation must never
            // take a job in hand for an orphan.
            let guard = self.env.runs.register(&job.queue, &job.raw);
            let env = self.env.clone();
            self.jobs.spawn(async move {
                runner::handle(env, job, guard, permit).await;
            });
        }
    }

    /// Puts back on pending every entry of our active lists that no run
    /// owns. Runs in the fetch loop, between fetches, so every fetched entry
    /// is registered by then.
    async fn reconcile(&self) {
        let worker = &self.env.worker_id;
        let broker = &self.env.broker;
        for queue in &self.queues {
            let key = broker.keys().active(queue, worker);
            let mut conn = broker.conn();
            let entries: Vec<Vec<u8>> = match redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
            {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, "Cannot reconcile the active list");
                    return;
                }
            };
            for raw in entries {
                if self.env.runs.owns(queue, &raw) {
                    continue;
                }
                let moved = broker
                    .settle(queue, worker, &raw, "", "", Next::Requeue(&raw))
                    .await;
                if let Ok(true) = moved {
                    tracing::warn!(queue = %queue,
                        "Requeued an orphaned entry of our active list (a fetch reply was lost)");
                }
            }
        }
    }

    async fn put_back(&self, jobs: Vec<Fetched>) {
        let worker = &self.env.worker_id;
        for job in jobs {
            let next = Next::Requeue(&job.raw);
            let moved = self
                .env
                .broker
                .settle(&job.queue, worker, &job.raw, "", "", next)
                .await;
            if let Err(err) = moved {
                tracing::warn!(error = %err, "Cannot put back a job taken during shutdown; recovery will");
            }
        }
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;

    #[test]
    fn weighted_order_puts_each_queue_first_by_its_share() {
        let queues: Vec<String> = ["high", "mid", "low"].map(String::from).into();
        let weights = [("high".to_owned(), 6), ("mid".to_owned(), 3)].into();
        let w = Weights::new(&queues, &weights);
        let mut first = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let order = w.order(&queues);
            assert_eq!(order.len(), 3);
            *first.entry(order[0].clone()).or_insert(0u32) += 1;
        }
        // Weights 6 : 3 : 1 (low is unlisted, so 1).
        let share = |q: &str| f64::from(first[q]) / 20_000.0;
        assert!((share("high") - 0.6).abs() < 0.03, "{first:?}");
        assert!((share("mid") - 0.3).abs() < 0.03, "{first:?}");
        assert!((share("low") - 0.1).abs() < 0.03, "{first:?}");
    }
}
