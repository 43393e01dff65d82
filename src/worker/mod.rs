//! The daemon: fetch jobs, run them, shut down without losing any.
//!
//! Components, all spawned on one [`TaskTracker`]:
//! - the fetch loop (`fetch.rs`): takes a free slot (semaphore permit), then
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
//!
//! This file owns the start and drain sequences, as named phases;
//! `background.rs` spawns the components that run beside the fetch loop.

mod background;
pub mod builder;
pub mod control;
pub(crate) mod events;
mod fetch;
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
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pipeline::Registry;
use crate::progress::Publisher;
use crate::queue::Broker;
use crate::queue::inspect::WorkerInfo;
use crate::store::{Store, StoreCloser};
use health::Health;
use inflight::InFlight;
use runner::{JobEnv, Stats};

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
    let http = match &config.worker.http {
        Some(addr) => Some(probe::bind(addr).await.map_err(WorkerError::Http)?),
        None => None,
    };
    let (store, store_closer, broker) = open(&config).await?;
    let info = register(&broker, &config, &worker_id).await?;
    let daemon = Daemon::start(&config, registry, &shutdown, broker, store, info);
    let tracker = TaskTracker::new();
    let background = CancellationToken::new();
    background::spawn(&tracker, &daemon, &config, http, &shutdown, &background);

    let w = &config.worker;
    tracing::info!(worker_id = %worker_id, queues = ?w.queues, concurrency = w.concurrency,
        pid = daemon.info.pid, version = %daemon.info.version, "worker_started");
    notify::ready();

    let jobs = daemon.fetch(&config, &shutdown).await;
    // Shutdown: the fetch loop has stopped taking jobs.
    daemon.wait_for_jobs(&config, jobs).await;
    background.cancel();
    tracker.close();
    tracker.wait().await;
    daemon.close(&config, store_closer).await;
    Ok(())
}

/// Opens SQLite, then Redis; both fail the start.
async fn open(config: &Config) -> Result<(Store, StoreCloser, Broker), WorkerError> {
    let db = config.store.path.clone();
    let (store, store_closer) = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| WorkerError::Registry(format!("SQLite open panicked: {e}")))??;
    let broker = Broker::connect_config(&config.redis, 6).await?;
    Ok((store, store_closer, broker))
}

/// Registers this daemon, then takes back what a previous run of its id
/// left behind.
async fn register(
    broker: &Broker,
    config: &Config,
    worker_id: &str,
) -> Result<WorkerInfo, WorkerError> {
    let w = &config.worker;
    let info = WorkerInfo {
        id: worker_id.to_owned(),
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
    heartbeat::register(broker, &info, ttl).await?;
    // Jobs a previous run of this id left behind (crash, SIGKILL) go back to
    // pending, each with a crash counted; SQLite tells where each stopped.
    let recovered = recover_active(broker, &w.queues, worker_id, true).await;
    if recovered > 0 {
        tracing::warn!(worker_id = %worker_id, recovered, "Recovered jobs left by a previous run of this worker");
    }
    Ok(info)
}

/// What the start sequence opened and the drain closes, in order.
struct Daemon {
    worker_id: String,
    broker: Broker,
    store: Store,
    info: WorkerInfo,
    env: Arc<JobEnv>,
    health: Arc<Health>,
    publisher: JoinHandle<()>,
    batcher: JoinHandle<()>,
}

impl Daemon {
    /// Starts the progress publisher and the settle batcher, and builds what
    /// every job task shares.
    fn start(
        config: &Config,
        registry: Registry,
        shutdown: &CancellationToken,
        broker: Broker,
        store: Store,
        info: WorkerInfo,
    ) -> Self {
        let w = &config.worker;
        let worker_id = info.id.clone();
        let (publisher, publisher_task) = Publisher::new(
            broker.keys().clone(),
            broker.conn(),
            broker.round_trip_counter(),
        );
        let publisher_handle = tokio::spawn(publisher_task.run());
        let (batcher, batcher_task) = crate::queue::batch::Batcher::new(broker.clone(), &worker_id);
        let batcher_handle = tokio::spawn(batcher_task.run());
        let env = Arc::new(JobEnv {
            broker: broker.clone(),
            batcher,
            store: store.clone(),
            publisher,
            registry,
            worker_id: worker_id.clone(),
            max_job_bytes: w.max_job_bytes,
            max_result_bytes: w.max_result_bytes,
            max_crashes: w.max_crashes,
            kill_grace: Duration::from_secs(w.kill_grace_secs),
            draining: shutdown.clone(),
            stop_stages: CancellationToken::new(),
            give_up: CancellationToken::new(),
            runs: Arc::new(InFlight::default()),
            stats: Stats::default(),
            slots: Arc::new(Semaphore::new(w.concurrency)),
            parking: Arc::new(Semaphore::new(w.concurrency)),
        });
        let health = Arc::new(Health::with_sqlite(store.health_flag()));
        health.redis_ok();
        health.fetch_loop_alive();
        Self {
            worker_id,
            broker,
            store,
            info,
            env,
            health,
            publisher: publisher_handle,
            batcher: batcher_handle,
        }
    }

    /// Runs the fetch loop until `shutdown`; the job tasks it spawned.
    async fn fetch(&self, config: &Config, shutdown: &CancellationToken) -> TaskTracker {
        let jobs = TaskTracker::new();
        let health = self.health.clone();
        fetch::Fetcher::new(&config.worker, self.env.clone(), health, jobs.clone())
            .run(shutdown.clone())
            .await;
        self.health.draining();
        jobs
    }

    /// Steps 2 and 3 of the shutdown: the grace period, then stopping the
    /// stages of the jobs still running.
    async fn wait_for_jobs(&self, config: &Config, jobs: TaskTracker) {
        let env = &self.env;
        notify::stopping();
        let grace = Duration::from_secs(config.worker.shutdown_grace_secs);
        let drain_budget = grace + env.kill_grace + Duration::from_secs(10);
        notify::extend_timeout(drain_budget);
        jobs.close();
        let running = env.stats.running.load(Relaxed);
        tracing::info!(
            running,
            grace_secs = grace.as_secs(),
            "Shutting down: waiting for running jobs"
        );
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            let running = env.stats.running.load(Relaxed);
            tracing::info!(
                running,
                "Grace period over: stopping stages and requeueing their jobs"
            );
            env.stop_stages.cancel();
            jobs.wait().await;
        }
    }

    /// Step 5 of the shutdown, once the background components have stopped.
    async fn close(self, config: &Config, store_closer: StoreCloser) {
        let (broker, worker_id) = (&self.broker, &self.worker_id);
        let left = recover_active(broker, &config.worker.queues, worker_id, false).await;
        if left > 0 {
            tracing::warn!(left, "Requeued jobs still listed as active");
        }
        if let Err(err) = heartbeat::deregister(broker, worker_id).await {
            tracing::warn!(error = %err, "Cannot remove worker registration; it expires by itself");
        }
        let stats = &self.env.stats;
        let (completed, failed, retried, requeued) = (
            stats.completed.load(Relaxed),
            stats.failed.load(Relaxed),
            stats.retried.load(Relaxed),
            stats.requeued.load(Relaxed),
        );
        let dropped = self.env.publisher.dropped();
        drop(self.env);
        drop(self.store);
        let _ = self.batcher.await;
        let _ = self.publisher.await;
        store_closer.close().await;
        tracing::info!(worker_id = %worker_id, completed, failed, retried, requeued,
            progress_events_dropped = dropped, redis_round_trips = broker.round_trips(),
            "worker_shutdown_complete");
    }
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
