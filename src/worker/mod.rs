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
//! Quiet ([`quiet`], SIGTSTP for `conveyor worker`): the fetch loop stops
//! taking jobs and the rest goes on; running jobs finish, the daemon stays.
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
//! 4. if the drain is still going [`GIVE_UP_AFTER`] (10 s) after step 3's
//!    `kill_grace_secs`, it gives up: the `give_up` token fires, so Redis
//!    state changes still retrying stop, and the SQLite writer stops
//!    retrying a failing transaction and answers its callers with an error
//!    ([`crate::store::GiveUp`]). Those jobs stay listed as active and are
//!    recovered at the next start of this worker id (or by the reaper);
//! 5. anything still in this daemon's active lists goes back to pending;
//!    the registration is removed, the publisher drained, SQLite closed.
//!
//! The whole drain is bounded: counted from the stop signal, it ends within
//! `fetch_block_ms` + `shutdown_grace_secs` + `kill_grace_secs` +
//! [`GIVE_UP_AFTER`] + [`LAST_STEPS`] (15 s of margin in all). A drain that
//! had to give up (step 4) ends with [`WorkerError::ShutdownGaveUp`]
//! (`conveyor worker` exits 1 and says why), and one still unfinished
//! [`LAST_STEPS`] after the give-up is abandoned where it stands: what it
//! has not recorded is left to the same recovery, and nothing it started
//! (tasks, the SQLite threads) keeps the process alive.
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
#[cfg(feature = "prometheus")]
pub mod probe;
pub mod promoter;
pub mod quiet;
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
    #[error(transparent)]
    Connect(#[from] crate::queue::ConnectError),
    #[error("{0}")]
    Register(#[from] heartbeat::RegisterError),
    #[error("job types: {0}")]
    Registry(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Http(String),
    /// The daemon serves none of the pools the config's stages run in.
    #[error("{0}")]
    NoPoolToRun(String),
    /// The drain did not finish within its bound (module docs, step 4).
    #[error(
        "shutdown gave up after {after_secs} s (fetch_block_ms + shutdown_grace_secs + kill_grace_secs + 10 s) with Redis or SQLite not answering; {}; jobs not recorded stay in this worker's active list and are recovered when it starts again with the same worker id (or by another daemon's reaper)",
        drain_end(.finished)
    )]
    ShutdownGaveUp { after_secs: u64, finished: bool },
}

fn drain_end(finished: &bool) -> &'static str {
    if *finished {
        "the drain then ended"
    } else {
        "the drain was abandoned 5 s later"
    }
}

/// How long the drain goes on after step 3's `kill_grace_secs` before it
/// gives up on Redis and SQLite (module docs, step 4).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// How long the drain may take after giving up before it is abandoned.
pub const LAST_STEPS: Duration = Duration::from_secs(5);

/// How long each remaining step of the drain is waited for once the drain
/// has given up.
const STEP_AFTER_GIVE_UP: Duration = Duration::from_secs(1);

/// Runs `step`; once `give_up` has fired, waits for it at most
/// [`STEP_AFTER_GIVE_UP`] more. False when it was cut short (and dropped).
async fn unless_given_up(
    give_up: &CancellationToken,
    step: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::pin!(step);
    tokio::select! {
        () = &mut step => return true,
        () = give_up.cancelled() => {}
    }
    tokio::time::timeout(STEP_AFTER_GIVE_UP, step).await.is_ok()
}

/// Runs the daemon until `shutdown` fires, then drains as described in the
/// module docs. Errors at start (bad Redis, SQLite, worker id), or
/// [`WorkerError::ShutdownGaveUp`] from a drain past its bound.
///
/// This is what `conveyor worker` runs: built-in and external stages only.
/// [`crate::Worker`] runs the same engine with Rust stages added.
///
/// While `quiet` is on it takes no new jobs ([`quiet`]).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    quiet: quiet::Quiet,
) -> Result<(), WorkerError> {
    let registry = Registry::from_config(&config).map_err(WorkerError::Registry)?;
    run_with_registry(config, registry, shutdown, quiet).await
}

/// [`run`] with the job types already built from `config`.
pub(crate) async fn run_with_registry(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
    quiet: quiet::Quiet,
) -> Result<(), WorkerError> {
    let worker_id = config.worker_id();
    let plans = fetch::plans(&config).map_err(WorkerError::NoPoolToRun)?;
    let http = background::bind_http(&config).await?;
    let Some((store, store_closer, broker)) = open(&config, &shutdown).await? else {
        tracing::info!("redis_wait_stopped");
        return Ok(());
    };
    let info = register(&broker, &config, &worker_id).await?;
    let daemon = Daemon::start(&config, registry, &shutdown, broker, store, info, quiet);
    let tracker = TaskTracker::new();
    let background = CancellationToken::new();
    background::spawn(&tracker, &daemon, &config, http, &shutdown, &background);

    let w = &config.worker;
    tracing::info!(worker_id = %worker_id, queues = ?w.queues, concurrency = w.concurrency,
        pid = daemon.info.pid, version = %daemon.info.version, "worker_started");
    notify::ready();

    let bound = Bound {
        give_up_after: give_up_after(&config),
        give_up: daemon.env.give_up.clone(),
        stop_stages: daemon.env.stop_stages.clone(),
        sqlite: daemon.store.give_up_switch(),
    };
    let drain = async {
        let jobs = daemon.fetch(&config, plans, &shutdown).await;
        // Shutdown: the fetch loop has stopped taking jobs.
        daemon.wait_for_jobs(&config, jobs).await;
        background.cancel();
        tracker.close();
        let give_up = &daemon.env.give_up;
        if !unless_given_up(give_up, tracker.wait()).await {
            tracing::warn!("shutdown_tasks_left_running");
        }
        daemon.close(&config, store_closer).await;
    };
    bound.run(drain, &shutdown).await
}

/// From the stop signal to the give-up (module docs, step 4).
fn give_up_after(config: &Config) -> Duration {
    let w = &config.worker;
    Duration::from_millis(w.fetch_block_ms)
        + Duration::from_secs(w.shutdown_grace_secs)
        + Duration::from_secs(w.kill_grace_secs)
        + GIVE_UP_AFTER
}

/// The bound of the drain (module docs): what gives up, and when.
struct Bound {
    give_up_after: Duration,
    give_up: CancellationToken,
    /// Fired by step 3 normally; at the give-up too, for stages still
    /// running because the fetch loop took long to stop (Redis slow to
    /// fail): they get SIGTERM and SIGKILL rather than outliving the
    /// daemon.
    stop_stages: CancellationToken,
    sqlite: crate::store::GiveUp,
}

impl Bound {
    /// Runs the daemon's whole life, `drain`, and bounds it once `shutdown`
    /// fires. Past the bound, `drain` is dropped where it stands: its
    /// spawned tasks end with the runtime.
    async fn run(
        self,
        drain: impl std::future::Future<Output = ()>,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        tokio::pin!(drain);
        tokio::select! {
            () = &mut drain => return Ok(()),
            () = shutdown.cancelled() => {}
        }
        let deadline = tokio::time::Instant::now() + self.give_up_after;
        tokio::select! {
            () = &mut drain => return Ok(()),
            () = tokio::time::sleep_until(deadline) => {}
        }
        tracing::warn!(
            after_secs = self.give_up_after.as_secs(),
            "shutdown_bound_passed"
        );
        self.give_up.cancel();
        self.stop_stages.cancel();
        self.sqlite.now();
        let finished = tokio::time::timeout(LAST_STEPS, &mut drain).await.is_ok();
        let err = WorkerError::ShutdownGaveUp {
            after_secs: self.give_up_after.as_secs(),
            finished,
        };
        tracing::error!(error = %err, "shutdown_gave_up");
        Err(err)
    }
}

/// Opens SQLite, then Redis, waiting (and saying so) while Redis is
/// unreachable; `None` when `shutdown` fires while waiting. A bad database
/// or refused Redis credentials fail the start.
async fn open(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(Store, StoreCloser, Broker)>, WorkerError> {
    let db = config.store.path.clone();
    let (store, store_closer) = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| WorkerError::Registry(format!("SQLite open panicked: {e}")))??;
    let Some(broker) = Broker::connect_waiting(&config.redis, shutdown).await? else {
        // The writer ends once every handle on the store is gone.
        drop(store);
        store_closer.close().await;
        return Ok(None);
    };
    Ok(Some((store, store_closer, broker)))
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
        pools: w.pools.clone(),
        concurrency: w.concurrency,
        running: 0,
        completed: 0,
        failed: 0,
        version: env!("CARGO_PKG_VERSION").into(),
        ttl_ms: w.dead_after_secs.saturating_mul(1000),
        quiet: false,
    };
    let ttl = Duration::from_secs(w.dead_after_secs);
    heartbeat::register(broker, &info, ttl).await?;
    // Jobs a previous run of this id left behind (crash, SIGKILL) go back to
    // pending, each with a crash counted; SQLite tells where each stopped.
    let recovered = recover_active(broker, &w.queues, worker_id, true).await;
    if recovered > 0 {
        tracing::warn!(worker_id = %worker_id, recovered, "previous_run_recovered");
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
        quiet: quiet::Quiet,
    ) -> Self {
        let w = &config.worker;
        let worker_id = info.id.clone();
        let (publisher, publisher_task) = Publisher::new(
            broker.keys().clone(),
            broker.conn(),
            broker.round_trip_counter(),
            &config.history,
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
            pools: w.pools.clone(),
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
        let health = Arc::new(Health::with_sqlite(store.health_flag()).with_quiet(quiet));
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

    /// Runs the fetch loop on `plans` until `shutdown`; the job tasks it
    /// spawned.
    async fn fetch(
        &self,
        config: &Config,
        plans: Vec<crate::queue::QueuePlan>,
        shutdown: &CancellationToken,
    ) -> TaskTracker {
        let jobs = TaskTracker::new();
        let health = self.health.clone();
        // Pool lists are read only when a stage names a pool other than
        // the default: a fleet with one pool fetches exactly as before.
        fetch::Fetcher::new(
            &config.worker,
            plans,
            self.env.clone(),
            health,
            jobs.clone(),
        )
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
        notify::extend_timeout(give_up_after(config) + LAST_STEPS);
        jobs.close();
        let running = env.stats.running.load(Relaxed);
        tracing::info!(running, grace_secs = grace.as_secs(), "shutdown_waiting");
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            let running = env.stats.running.load(Relaxed);
            tracing::info!(running, "shutdown_grace_over");
            env.stop_stages.cancel();
            if !unless_given_up(&env.give_up, jobs.wait()).await {
                tracing::warn!("shutdown_jobs_left_running");
            }
        }
    }

    /// Step 5 of the shutdown, once the background components have stopped.
    /// Once the drain has given up (step 4), each step here is waited for
    /// at most [`STEP_AFTER_GIVE_UP`]: Redis may be gone, and the writer
    /// thread is then left to end with the process.
    async fn close(self, config: &Config, store_closer: StoreCloser) {
        let (broker, worker_id) = (&self.broker, &self.worker_id);
        let give_up = self.env.give_up.clone();
        let redis_steps = async {
            let left = recover_active(broker, &config.worker.queues, worker_id, false).await;
            if left > 0 {
                tracing::warn!(left, "shutdown_requeue_incomplete");
            }
            if let Err(err) = heartbeat::deregister(broker, worker_id).await {
                tracing::warn!(error = %err, "worker_unregister_failed");
            }
        };
        if !unless_given_up(&give_up, redis_steps).await {
            tracing::warn!("shutdown_redis_unreachable");
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
        let (batcher, publisher) = (self.batcher, self.publisher);
        let (batcher_abort, publisher_abort) = (batcher.abort_handle(), publisher.abort_handle());
        let flushed = unless_given_up(&give_up, async {
            let _ = batcher.await;
            let _ = publisher.await;
        })
        .await;
        if !flushed {
            batcher_abort.abort();
            publisher_abort.abort();
        }
        if !unless_given_up(&give_up, store_closer.close()).await {
            tracing::warn!("shutdown_sqlite_writer_busy");
        }
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
                "shutdown_requeue_failed"),
        }
    }
    total
}
