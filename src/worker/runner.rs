//! The life of one delivery on this daemon.
//!
//! ```text
//! fetched ─parse─► poison? ───────────────────────────────► dead (reason)
//!            │
//!            └─► claim (lease token; id assigned) ─ duplicate / cancelled ─► dropped
//!                  │ crashed max_crashes times? ───────────► dead (quarantine)
//!                  ▼
//!               begin (SQLite: running; learn finished stages)
//!                  │ already finished? ─────────────────────► ack (duplicate)
//!                  ▼
//!               stages in order, from the first unfinished one
//!                  ├─ all done        ─► SQLite completed ─► ack
//!                  ├─ retryable fail  ─► SQLite retrying  ─► scheduled (backoff)
//!                  ├─ last/permanent  ─► SQLite failed    ─► dead
//!                  ├─ cancelled       ─► SQLite cancelled ─► ack
//!                  ├─ shutdown        ─► SQLite pending   ─► pending, with results
//!                  └─ lease lost      ─► nothing (another daemon has the job)
//! ```
//!
//! Every Redis change comes after the SQLite commit it depends on, and both
//! are fenced by the delivery's lease: a crash in between leaves the job in
//! the active list, it is delivered again, and `begin` recognises what was
//! done; a daemon that lost the lease writes nothing. Delivery is
//! at-least-once: a stage interrupted mid-run runs again, so stages must be
//! idempotent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::inflight::{InFlight, RunGuard, RunStop, StopReason};
use crate::config::RetryConfig;
use crate::error::{is_transient, job_op_backoff};
use crate::now_rfc3339;
use crate::observe;
use crate::pipeline::{FailureKind, Pipeline, ProgressFn, Registry, StageContext, StageError};
use crate::progress::{ProgressEvent, Publisher, Status};
use crate::queue::batch::Batcher;
use crate::queue::job::{Poison, poison_entry};
use crate::queue::{Broker, Claim, Fetched, Job, Next};
use crate::store::{BeginJob, FinishJob, Prior, RecordJob, StageUpdate, Store};

/// A stage still running after this long is recorded as running in SQLite;
/// quicker ones only get their end recorded (with their start time), which
/// halves the writes of short stages.
const RECORD_RUNNING_AFTER: Duration = Duration::from_millis(20);

/// What every job task of one daemon shares.
pub struct JobEnv {
    pub broker: Broker,
    /// Claims and settles go through it, batched per queue.
    pub batcher: Batcher,
    pub store: Store,
    pub publisher: Publisher,
    pub registry: Registry,
    pub worker_id: String,
    pub max_job_bytes: usize,
    pub max_crashes: u32,
    pub kill_grace: Duration,
    /// Fires on SIGTERM: running stages may finish, no new stage starts.
    pub draining: CancellationToken,
    /// Fires when the shutdown grace period is over: stages are stopped.
    pub stop_stages: CancellationToken,
    /// Fires when shutdown stops waiting for Redis: state changes still
    /// pending give up (their jobs stay listed as active and are recovered).
    pub give_up: CancellationToken,
    pub runs: Arc<InFlight>,
    pub stats: Stats,
    /// The daemon's job slots (`concurrency`): a job holds one while it runs.
    pub slots: Arc<Semaphore>,
    /// Room for jobs waiting on a limit (a stage's `max_concurrent`, a job
    /// type's `rate`) with their slot given back: at most `concurrency`, so
    /// a daemon never takes more than twice its concurrency in hand.
    pub parking: Arc<Semaphore>,
}

/// Counters for logs and systemd STATUS.
#[derive(Default)]
pub struct Stats {
    pub running: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub requeued: AtomicU64,
}

/// Handles one fetched entry to the end. Never panics on input.
pub async fn handle(
    env: Arc<JobEnv>,
    fetched: Fetched,
    guard: RunGuard,
    slot: OwnedSemaphorePermit,
) {
    env.stats.running.fetch_add(1, Ordering::Relaxed);
    match Job::parse(&fetched.raw, env.max_job_bytes) {
        Err(poison) => dead_letter_poison(&env, &fetched, poison).await,
        Ok(job) => match env.registry.get(&job.kind).cloned() {
            None => {
                let reason = format!("unknown job type `{}`", job.kind);
                let object = Some(job.to_object());
                dead_letter_poison(&env, &fetched, Poison { reason, object }).await
            }
            Some(pipeline) => claim_and_run(&env, job, fetched, pipeline, &guard, slot).await,
        },
    }
    env.stats.running.fetch_sub(1, Ordering::Relaxed);
}

/// Claims the delivery (giving an id-less job its id, so a redelivery after
/// a crash keeps it), then runs it unless it is a duplicate, cancelled or
/// quarantined.
async fn claim_and_run(
    env: &Arc<JobEnv>,
    mut job: Job,
    fetched: Fetched,
    pipeline: Arc<Pipeline>,
    guard: &RunGuard,
    slot: OwnedSemaphorePermit,
) {
    let queue = fetched.queue;
    let original = fetched.raw;
    let raw = match job.id {
        Some(_) => original.clone(),
        None => {
            job.id = Some(crate::queue::quick_uuid_v7().to_string());
            job.to_json().into_bytes()
        }
    };
    let token = Broker::new_token(&env.worker_id);
    let id = job.id().to_owned();
    guard.add_raw(&raw);
    let span = tracing::info_span!("job", job_id = %id, r#type = %job.kind,
        queue = %queue, worker_id = %env.worker_id);
    async {
        let claim = redis_op(env, "claim", || {
            env.batcher.claim(&queue, &original, &raw, &id, &token)
        })
        .await;
        let stop = RunStop::new(env.stop_stages.child_token());
        match claim {
            // Redis gave up on us during shutdown: the entry stays listed
            // as active and is recovered.
            None => {}
            Some(Claim::Gone) => {
                tracing::warn!("Fetched job vanished from the active list; skipping it");
            }
            Some(Claim::Duplicate) => {
                tracing::warn!("Duplicate of a job that is already running; dropping this copy");
                redis_op(env, "drop duplicate", || {
                    env.batcher.settle(&queue, &original, &id, "", Next::Drop)
                })
                .await;
            }
            Some(Claim::Cancelled) => cancel_unstarted(env, &job, &queue, &original).await,
            Some(Claim::Claimed { crashes }) => {
                guard.claimed(&id, &token, stop.clone());
                let mut run = Run::new(env.clone(), job, raw, queue, pipeline, token, stop);
                run.slot = Some(slot);
                run.start(crashes).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// A cancelled job taken before it ran: record it, drop the delivery.
async fn cancel_unstarted(env: &JobEnv, job: &Job, queue: &str, raw: &[u8]) {
    let now = now_rfc3339();
    let record = RecordJob {
        id: job.id().to_owned(),
        kind: job.kind.clone(),
        queue: queue.to_owned(),
        payload: job.payload.to_string(),
        status: Status::Cancelled,
        error: Some("cancelled before it ran".into()),
        worker_id: env.worker_id.clone(),
        at: now.clone(),
        overwrite: true,
    };
    if env.store.record(record).await.is_err() {
        return;
    }
    let settled = redis_op(env, "drop cancelled", || {
        env.batcher.settle(queue, raw, job.id(), "", Next::Finish)
    })
    .await;
    if settled == Some(true) {
        tracing::info!("job_cancelled");
        env.publisher.publish(&ProgressEvent {
            job_id: job.id().to_owned(),
            kind: job.kind.clone(),
            queue: queue.to_owned(),
            status: Status::Cancelled,
            event: "job_cancelled".into(),
            stage: None,
            stage_index: None,
            stages_total: 0,
            progress: 0.0,
            attempt: job.meta.attempt,
            worker_id: env.worker_id.clone(),
            message: Some("cancelled before it ran".into()),
            ts: now,
            seq: 1,
        });
    }
}

async fn dead_letter_poison(env: &JobEnv, fetched: &Fetched, poison: Poison) {
    let now = now_rfc3339();
    let field = |name: &str| {
        poison
            .object
            .as_ref()
            .and_then(|o| o.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let id = field("id").filter(|id| crate::queue::job::check_id(id).is_ok());
    let kind = field("type").unwrap_or_default();
    let reason = poison.reason.clone();
    tracing::warn!(queue = %fetched.queue, job_id = id.as_deref().unwrap_or(""),
        worker_id = %env.worker_id, reason = %reason, bytes = fetched.raw.len(), "job_dead_lettered");
    observe::dead_lettered(&fetched.queue);
    if let Some(id) = &id {
        let payload = poison
            .object
            .as_ref()
            .and_then(|o| o.get("payload"))
            .map(Value::to_string);
        let _ = env
            .store
            .record(RecordJob {
                id: id.clone(),
                kind: kind.clone(),
                queue: fetched.queue.clone(),
                payload: payload.unwrap_or_else(|| "null".into()),
                status: Status::Failed,
                error: Some(reason.clone()),
                worker_id: env.worker_id.clone(),
                at: now.clone(),
                overwrite: false,
            })
            .await;
    }
    let entry = poison_entry(&fetched.raw, poison, &env.worker_id, &now);
    // Never claimed: no lease. The id is not passed on purpose: a bad
    // message reusing a live job's id must not clear that job's crash count
    // or cancellation.
    redis_op(env, "dead-letter", || {
        let next = Next::Dead(entry.as_bytes());
        env.batcher
            .settle(&fetched.queue, &fetched.raw, "", "", next)
    })
    .await;
    env.stats.failed.fetch_add(1, Ordering::Relaxed);
    if let Some(id) = id {
        env.publisher.publish(&ProgressEvent {
            job_id: id,
            kind,
            queue: fetched.queue.clone(),
            status: Status::Failed,
            event: "job_failed".into(),
            stage: None,
            stage_index: None,
            stages_total: 0,
            progress: 0.0,
            attempt: 0,
            worker_id: env.worker_id.clone(),
            message: Some(reason),
            ts: now,
            seq: 1,
        });
    }
}

/// Runs one Redis state change of a job, retrying transient errors until
/// Redis answers (an outage only delays it), or until shutdown gives up on
/// Redis. `None` then: the job stays in the active list and is recovered
/// later (see the module docs).
async fn redis_op<T, F, Fut>(env: &JobEnv, what: &str, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = job_op_backoff();
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(op = what, failures, "Redis call went through");
                }
                return Some(v);
            }
            Err(err) if is_transient(&err) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                // One line per outage step, not per attempt.
                if failures.is_power_of_two() || failures == 0 {
                    tracing::warn!(error = %err, op = what, retry_in_ms = delay.as_millis() as u64,
                        "Redis call failed; retrying");
                }
                failures += 1;
                observe::redis_error(what);
                tokio::select! {
                    biased;
                    _ = env.give_up.cancelled() => {
                        tracing::error!(op = what, "Shutting down with Redis unreachable; the job stays listed as active and is recovered later");
                        return None;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => {
                tracing::error!(error = %err, op = what,
                    "Redis refused the call; the job stays listed as active and is recovered later");
                return None;
            }
        }
    }
}

/// How an attempt ended.
enum Outcome {
    Completed,
    Failed(StageError),
    Stopped(Stop),
}

/// Why an attempt stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Shutdown,
    Cancelled,
    LeaseLost,
}

/// One delivery of one job, from `begin` to its settlement.
struct Run {
    env: Arc<JobEnv>,
    job: Job,
    raw: Vec<u8>,
    queue: String,
    pipeline: Arc<Pipeline>,
    token: String,
    stop: Arc<RunStop>,
    /// This run's job slot; given back while it waits on a limit.
    slot: Option<OwnedSemaphorePermit>,
    /// Its place in the parking lot while it has no job slot.
    parked: Option<OwnedSemaphorePermit>,
    /// When the delivery was claimed (for the duration metrics).
    claimed_at: Instant,
    attempt: u32,
    results: Map<String, Value>,
    events: Arc<Events>,
}

impl Run {
    fn new(
        env: Arc<JobEnv>,
        job: Job,
        raw: Vec<u8>,
        queue: String,
        pipeline: Arc<Pipeline>,
        token: String,
        stop: Arc<RunStop>,
    ) -> Self {
        let attempt = job.meta.attempt.max(1);
        let events = Arc::new(Events::new(&env, &job, &queue, &pipeline, attempt));
        Self {
            results: job.meta.results.clone(),
            env,
            job,
            raw,
            queue,
            pipeline,
            token,
            stop,
            slot: None,
            parked: None,
            claimed_at: Instant::now(),
            attempt,
            events,
        }
    }

    /// The retry policy: the job type's, with the job's own overrides.
    fn retry(&self) -> RetryConfig {
        let mut r = self.pipeline.retry;
        if let Some(n) = self.job.max_attempts {
            r.max_attempts = n;
        }
        if let Some(ms) = self.job.backoff_ms {
            r.backoff_ms = ms;
        }
        if let Some(ms) = self.job.backoff_max_ms {
            r.backoff_max_ms = ms;
        }
        r
    }

    async fn start(mut self, crashes: u32) {
        let started = Instant::now();
        // A first delivery (never claimed before, never retried, requeued or
        // revived) is one SQLite cannot know anything of: its start is
        // queued, not awaited. Any other delivery first learns what SQLite
        // knows (finished stages, a completion the crash kept from acking).
        let meta = &self.job.meta;
        let first = crashes == 0
            && meta.attempt <= 1
            && meta.requeues == 0
            && meta.epoch == 0
            && meta.results.is_empty();
        let mut record = self.begin_record();
        record.first = first;
        let prior = if first {
            self.env
                .store
                .begin_first(record)
                .await
                .map(|()| Prior::default())
        } else {
            self.env.store.begin(record).await
        };
        let prior = match prior {
            Ok(prior) => prior,
            Err(err) => {
                // Only when the store is closing: leave the job to recovery.
                tracing::error!(error = %err, "Cannot record job start; leaving it for recovery");
                return;
            }
        };
        if prior.finished_for(self.job.meta.epoch) {
            let status = prior.status.map(Status::as_str).unwrap_or("?");
            tracing::warn!(status, "Job already finished; dropping duplicate delivery");
            self.settle("ack duplicate", Next::Finish).await;
            return;
        }
        for (name, result) in prior.results {
            self.results.entry(name).or_insert(result);
        }
        if crashes >= self.env.max_crashes {
            let err = StageError::permanent(format!(
                "quarantined: daemons died {crashes} times while running this job (max_crashes = {})",
                self.env.max_crashes
            ));
            tracing::error!(crashes, "job_quarantined");
            self.fail(err, started).await;
            return;
        }
        match self.rate_limit().await {
            Ok(()) => {}
            // Redis gave up on us during shutdown: recovery takes the job.
            Err(None) => return,
            Err(Some(stop)) => {
                self.stopped(stop).await;
                return;
            }
        }
        let start = self.pipeline.resume_index(&self.results);
        tracing::info!(
            attempt = self.attempt,
            resume_at = start,
            crashes,
            stages = self.pipeline.stages.len(),
            "job_started"
        );
        observe::job_started(&self.job.kind, &self.queue);
        let progress = self.pipeline.overall_progress(start, 0.0);
        self.events
            .emit(Status::Running, "job_started", None, progress, None);

        match self.run_stages(start).await {
            Outcome::Completed => self.complete(started).await,
            Outcome::Failed(err) => self.fail(err, started).await,
            Outcome::Stopped(stop) => self.stopped(stop).await,
        }
    }

    fn outcome(&self, outcome: &'static str) {
        observe::job_outcome(
            &self.job.kind,
            &self.queue,
            outcome,
            self.claimed_at.elapsed(),
        );
    }

    async fn stopped(self, stop: Stop) {
        match stop {
            Stop::Shutdown => self.requeue().await,
            Stop::Cancelled => self.cancelled().await,
            Stop::LeaseLost => {
                tracing::warn!(
                    "job_abandoned: the job was recovered and handed to another daemon; writing nothing"
                );
            }
        }
    }

    /// Waits for `wait`, with the job's slot given back first when the
    /// parking lot has room, so other jobs run meanwhile. The slot is not
    /// taken again here: a job that gets a stage's limit slot runs that
    /// stage on it, and takes a job slot again only for its next unlimited
    /// stage ([`Run::take_slot`]). So a job waiting for a job slot never
    /// holds a limit slot, and no two jobs can wait on each other.
    /// `Err` when the job must stop instead (shutdown, cancel, lease lost).
    async fn wait_unslotted<T>(
        &mut self,
        wait: impl std::future::Future<Output = T>,
    ) -> Result<T, Stop> {
        if self.slot.is_some()
            && self.parked.is_none()
            && let Ok(parked) = self.env.parking.clone().try_acquire_owned()
        {
            self.parked = Some(parked);
            self.slot = None;
        }
        let token = self.stop.token.clone();
        let draining = self.env.draining.clone();
        tokio::select! {
            biased;
            _ = token.cancelled() => Err(self.stop_cause()),
            _ = draining.cancelled() => Err(Stop::Shutdown),
            v = wait => Ok(v),
        }
    }

    /// Takes a job slot again after a wait that gave it back.
    async fn take_slot(&mut self) -> Result<(), Stop> {
        if self.slot.is_some() {
            return Ok(());
        }
        let slots = self.env.slots.clone();
        let token = self.stop.token.clone();
        let draining = self.env.draining.clone();
        let slot = tokio::select! {
            biased;
            _ = token.cancelled() => return Err(self.stop_cause()),
            _ = draining.cancelled() => return Err(Stop::Shutdown),
            p = slots.acquire_owned() => p.expect("the slot semaphore is never closed"),
        };
        self.slot = Some(slot);
        self.parked = None;
        Ok(())
    }

    /// Waits until the job type's `rate` lets this delivery start.
    async fn rate_limit(&mut self) -> Result<(), Option<Stop>> {
        let Some((limit, window)) = self.pipeline.rate else {
            return Ok(());
        };
        let mut said = false;
        loop {
            let wait = redis_op(&self.env, "rate limit", || {
                self.env
                    .broker
                    .rate_take(&self.job.kind, limit, window, &self.token)
            })
            .await
            .ok_or(None)?;
            let Some(wait) = wait else {
                return Ok(());
            };
            if !said {
                said = true;
                tracing::info!(rate = %format!("{limit}/{}", humantime::format_duration(window)),
                    wait_ms = wait.as_millis() as u64, "job_rate_limited");
                let message = format!(
                    "waiting: job type `{}` is limited to {limit} starts per {}",
                    self.job.kind,
                    humantime::format_duration(window)
                );
                let at = self.events.high_water();
                self.events
                    .emit(Status::Running, "progress", None, at, Some(message));
            }
            self.wait_unslotted(tokio::time::sleep(wait))
                .await
                .map_err(Some)?;
        }
    }

    fn begin_record(&self) -> BeginJob {
        BeginJob {
            id: self.job.id().to_owned(),
            kind: self.job.kind.clone(),
            queue: self.queue.clone(),
            payload: self.job.payload.to_string(),
            attempt: self.attempt,
            max_attempts: self.retry().max_attempts,
            epoch: self.job.meta.epoch,
            lease: self.token.clone(),
            carried: self.job.meta.results.keys().cloned().collect(),
            first: false,
            worker_id: self.env.worker_id.clone(),
            stages: self.pipeline.stage_names.clone(),
            at: now_rfc3339(),
        }
    }

    /// Why the run was stopped, once its token fired.
    fn stop_cause(&self) -> Stop {
        match self.stop.reason() {
            Some(StopReason::Cancelled) => Stop::Cancelled,
            Some(StopReason::LeaseLost) => Stop::LeaseLost,
            None => Stop::Shutdown,
        }
    }

    async fn run_stages(&mut self, start: usize) -> Outcome {
        let job_timeout = self
            .job
            .timeout_secs
            .map(Duration::from_secs)
            .or(self.pipeline.timeout);
        let job_deadline = job_timeout.map(|t| (Instant::now() + t, t));
        for index in start..self.pipeline.stages.len() {
            if self.stop.token.is_cancelled() {
                return Outcome::Stopped(self.stop_cause());
            }
            // Draining: the stage that was running finished; the next one
            // would only be cut short by the end of the grace period, so the
            // job goes back now, resuming here on the next daemon.
            if self.env.draining.is_cancelled() {
                return Outcome::Stopped(Stop::Shutdown);
            }
            let pipeline = self.pipeline.clone();
            let stage = &pipeline.stages[index];
            let name = stage.name.clone();
            // `max_concurrent`: held for the stage's run, dropped after it.
            let _slot = match &stage.limit {
                None => {
                    if let Err(stop) = self.take_slot().await {
                        return Outcome::Stopped(stop);
                    }
                    None
                }
                Some(limit) => match limit.try_acquire() {
                    Ok(Some(permit)) => Some(permit),
                    _ => {
                        let describe = limit.describe();
                        tracing::info!(stage = %name, stage_index = index, limit = %describe, "stage_waiting");
                        let at = self.pipeline.overall_progress(index, 0.0);
                        let message = format!("waiting for a `{name}` slot ({describe})");
                        self.events.emit(
                            Status::Running,
                            "progress",
                            Some(index),
                            at,
                            Some(message),
                        );
                        let limit = limit.clone();
                        match self
                            .wait_unslotted(async move { limit.acquire().await })
                            .await
                        {
                            Ok(permit) => Some(permit),
                            Err(stop) => return Outcome::Stopped(stop),
                        }
                    }
                },
            };
            let stage_started = Instant::now();
            let started_at = now_rfc3339();
            let at_start = self.pipeline.overall_progress(index, 0.0);
            tracing::info!(stage = %name, stage_index = index, attempt = self.attempt, "stage_started");
            self.events.emit(
                Status::Running,
                "stage_started",
                Some(index),
                at_start,
                None,
            );

            let ctx = self.stage_context(index);
            // The tighter of the stage's own timeout and what is left of the job's.
            let deadline = [stage.timeout.map(|t| (stage_started + t, t)), job_deadline]
                .into_iter()
                .flatten()
                .min_by_key(|(at, _)| *at);
            let run = run_with_deadline(stage.imp.as_ref(), &ctx, deadline);
            tokio::pin!(run);
            // A stage that ends at once (built-ins, quick programs) goes from
            // pending to its end in SQLite in one write; a longer one is
            // recorded as running once it has run for RECORD_RUNNING_AFTER.
            let result = tokio::select! {
                biased;
                result = &mut run => result,
                _ = tokio::time::sleep(RECORD_RUNNING_AFTER) => {
                    self.record_stage(index, "running", &started_at, None, None, at_start)
                        .await;
                    run.await
                }
            };
            let elapsed_ms = stage_started.elapsed().as_millis() as u64;
            match result {
                Ok(value) => {
                    let done = self.pipeline.overall_progress(index + 1, 0.0);
                    let stored = Some(value.to_string());
                    self.results.insert(name.clone(), value);
                    tracing::info!(stage = %name, stage_index = index, attempt = self.attempt, elapsed_ms, "stage_completed");
                    observe::stage_done(
                        &self.job.kind,
                        &name,
                        "completed",
                        stage_started.elapsed(),
                    );
                    self.record_stage(index, "completed", &started_at, stored, None, done)
                        .await;
                    self.events
                        .emit(Status::Running, "stage_completed", Some(index), done, None);
                }
                Err(err) if err.kind == FailureKind::Interrupted => {
                    let cause = self.stop_cause();
                    tracing::info!(stage = %name, stage_index = index, attempt = self.attempt,
                        elapsed_ms, cause = ?cause, "stage_interrupted");
                    observe::stage_done(
                        &self.job.kind,
                        &name,
                        "interrupted",
                        stage_started.elapsed(),
                    );
                    if cause != Stop::LeaseLost {
                        let at = self.events.high_water();
                        self.record_stage(index, "interrupted", &started_at, None, None, at)
                            .await;
                    }
                    return Outcome::Stopped(cause);
                }
                Err(err) => {
                    tracing::warn!(stage = %name, stage_index = index, attempt = self.attempt, elapsed_ms,
                        error = %err, permanent = err.kind == FailureKind::Permanent, "stage_failed");
                    observe::stage_done(&self.job.kind, &name, "failed", stage_started.elapsed());
                    let at = self.events.high_water();
                    let error = Some(err.message.clone());
                    self.record_stage(index, "failed", &started_at, None, error, at)
                        .await;
                    let message = format!("stage `{name}` failed: {}", err.message);
                    return Outcome::Failed(StageError {
                        kind: err.kind,
                        message,
                    });
                }
            }
        }
        Outcome::Completed
    }

    fn stage_context(&self, index: usize) -> StageContext {
        let stage = &self.pipeline.stages[index];
        let events = self.events.clone();
        let pipeline = self.pipeline.clone();
        let stop = self.stop.clone();
        let progress: ProgressFn = Arc::new(move |pct, message| {
            // A run that lost its lease publishes nothing more.
            if stop.reason() == Some(StopReason::LeaseLost) {
                return;
            }
            let overall = pipeline.overall_progress(index, pct);
            events.emit(Status::Running, "progress", Some(index), overall, message);
        });
        StageContext {
            job_id: self.job.id().to_owned(),
            job_type: self.job.kind.clone(),
            payload: self.job.payload.clone(),
            attempt: self.attempt,
            stage: stage.name.clone(),
            results: self.results.clone(),
            cancel: self.stop.token.child_token(),
            kill_grace: self.env.kill_grace,
            progress,
        }
    }

    async fn record_stage(
        &self,
        index: usize,
        status: &'static str,
        started_at: &str,
        result: Option<String>,
        error: Option<String>,
        progress: f64,
    ) {
        let update = StageUpdate {
            job_id: self.job.id().to_owned(),
            lease: self.token.clone(),
            index,
            name: self.pipeline.stages[index].name.clone(),
            attempt: self.attempt,
            status,
            result,
            error,
            progress,
            started_at: started_at.to_owned(),
            at: now_rfc3339(),
        };
        if let Err(err) = self.env.store.stage(update).await {
            tracing::error!(error = %err, "Cannot record stage state");
        }
    }

    /// Commits the end of the attempt in SQLite. False when nothing more may
    /// be done for this delivery (lease lost, store closing).
    async fn finish_record(&self, status: Status, progress: f64, error: Option<String>) -> bool {
        let record = FinishJob {
            id: self.job.id().to_owned(),
            lease: self.token.clone(),
            status,
            attempt: self.attempt,
            epoch: self.job.meta.epoch,
            progress,
            error,
            at: now_rfc3339(),
        };
        match self.env.store.finish(record).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    "job_abandoned: SQLite shows another delivery of this job; writing nothing"
                );
                false
            }
            Err(err) => {
                tracing::error!(error = %err, "Cannot record job state; leaving it for recovery");
                false
            }
        }
    }

    /// Settles the delivery in Redis (fenced by the lease). True when done.
    async fn settle(&self, what: &str, next: Next<'_>) -> bool {
        self.stop.begin_settling();
        let settled = redis_op(&self.env, what, || {
            let id = self.job.id();
            self.env
                .batcher
                .settle(&self.queue, &self.raw, id, &self.token, next)
        })
        .await;
        if settled == Some(false) {
            tracing::warn!(
                op = what,
                "job_abandoned: the lease is gone; another daemon has the job"
            );
        }
        settled == Some(true)
    }

    async fn complete(self, started: Instant) {
        if !self.finish_record(Status::Completed, 100.0, None).await {
            return;
        }
        if !self.settle("ack", Next::Finish).await {
            return;
        }
        self.env.stats.completed.fetch_add(1, Ordering::Relaxed);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(attempt = self.attempt, elapsed_ms, "job_completed");
        self.outcome("completed");
        self.events
            .emit(Status::Completed, "job_completed", None, 100.0, None);
    }

    async fn fail(mut self, err: StageError, started: Instant) {
        let retry = self.retry();
        let progress = self.events.high_water();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if err.kind == FailureKind::Retryable && self.attempt < retry.max_attempts {
            let delay_ms = retry.jittered_delay_ms(self.attempt);
            if !self
                .finish_record(Status::Retrying, progress, Some(err.message.clone()))
                .await
            {
                return;
            }
            self.job.meta.attempt = self.attempt + 1;
            self.job.meta.results = std::mem::take(&mut self.results);
            self.job.meta.error = Some(err.message.clone());
            let entry = self.job.to_json();
            let next = Next::Retry {
                entry: entry.as_bytes(),
                delay_ms,
            };
            if !self.settle("schedule retry", next).await {
                return;
            }
            self.env.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(attempt = self.attempt, max_attempts = retry.max_attempts, delay_ms,
                elapsed_ms, error = %err.message, "job_retrying");
            self.outcome("retried");
            let message = format!(
                "attempt {} of {} failed: {}; next attempt in {:.1}s",
                self.attempt,
                retry.max_attempts,
                err.message,
                delay_ms as f64 / 1000.0
            );
            self.events.emit(
                Status::Retrying,
                "job_retrying",
                None,
                progress,
                Some(message),
            );
            return;
        }
        if !self
            .finish_record(Status::Failed, progress, Some(err.message.clone()))
            .await
        {
            return;
        }
        self.job.meta.attempt = self.attempt;
        self.job.meta.results = std::mem::take(&mut self.results);
        self.job.meta.error = Some(err.message.clone());
        self.job.meta.failed_at = Some(now_rfc3339());
        self.job.meta.worker_id = Some(self.env.worker_id.clone());
        let entry = self.job.to_json();
        if !self
            .settle("dead-letter", Next::Dead(entry.as_bytes()))
            .await
        {
            return;
        }
        self.env.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(attempt = self.attempt, elapsed_ms, error = %err.message,
            permanent = err.kind == FailureKind::Permanent, "job_failed");
        self.outcome("failed");
        observe::dead_lettered(&self.queue);
        self.events.emit(
            Status::Failed,
            "job_failed",
            None,
            progress,
            Some(err.message),
        );
    }

    async fn requeue(mut self) {
        let progress = self.events.high_water();
        if !self.finish_record(Status::Pending, progress, None).await {
            return;
        }
        let done = self.results.len();
        self.job.meta.attempt = self.attempt;
        self.job.meta.results = std::mem::take(&mut self.results);
        self.job.meta.requeues += 1;
        let json = self.job.to_json();
        // Back on the consuming end of pending: it is the next job taken, and
        // whoever takes it resumes after the stages recorded in `results`.
        if !self.settle("requeue", Next::Requeue(json.as_bytes())).await {
            return;
        }
        self.env.stats.requeued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            attempt = self.attempt,
            finished_stages = done,
            "job_requeued"
        );
        self.outcome("requeued");
        self.events.emit(
            Status::Pending,
            "job_requeued",
            None,
            progress,
            Some("requeued on shutdown".into()),
        );
    }

    async fn cancelled(self) {
        let progress = self.events.high_water();
        let reason = Some("cancelled".to_owned());
        if !self
            .finish_record(Status::Cancelled, progress, reason)
            .await
        {
            return;
        }
        if !self.settle("ack cancelled", Next::Finish).await {
            return;
        }
        tracing::info!(attempt = self.attempt, "job_cancelled");
        self.outcome("cancelled");
        self.events.emit(
            Status::Cancelled,
            "job_cancelled",
            None,
            progress,
            Some("cancelled".into()),
        );
    }
}

/// Runs a stage; past the deadline it is cancelled (its processes stopped)
/// and the attempt fails with a retryable timeout.
async fn run_with_deadline(
    stage: &dyn crate::pipeline::Stage,
    ctx: &StageContext,
    deadline: Option<(Instant, Duration)>,
) -> Result<Value, StageError> {
    let run = stage.run(ctx);
    let Some((at, limit)) = deadline else {
        return run.await;
    };
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => result,
        _ = tokio::time::sleep_until(at.into()) => {
            ctx.cancel.cancel();
            let _ = run.await;
            Err(StageError::retryable(format!("timed out after {}s", limit.as_secs())))
        }
    }
}

/// Builds and publishes a job's progress events: ordered (`seq`) and with
/// whole-job progress that never goes down.
struct Events {
    base: ProgressEvent,
    channel: String,
    stage_names: Arc<[String]>,
    publisher: Publisher,
    seq: AtomicU64,
    high_water: Mutex<f64>,
}

impl Events {
    fn new(env: &JobEnv, job: &Job, queue: &str, pipeline: &Pipeline, attempt: u32) -> Self {
        Self {
            base: ProgressEvent {
                job_id: job.id().to_owned(),
                kind: job.kind.clone(),
                queue: queue.to_owned(),
                status: Status::Running,
                event: String::new(),
                stage: None,
                stage_index: None,
                stages_total: pipeline.stages.len(),
                progress: 0.0,
                attempt,
                worker_id: env.worker_id.clone(),
                message: None,
                ts: String::new(),
                seq: 0,
            },
            stage_names: pipeline.stage_names.clone(),
            channel: env.publisher.channel(job.id()),
            publisher: env.publisher.clone(),
            seq: AtomicU64::new(0),
            high_water: Mutex::new(0.0),
        }
    }

    fn high_water(&self) -> f64 {
        *self.high_water.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(
        &self,
        status: Status,
        event: &str,
        stage_index: Option<usize>,
        progress: f64,
        message: Option<String>,
    ) {
        // The lock orders sequence numbers with the high-water mark; it is
        // never held across an await.
        let mut high = self.high_water.lock().unwrap_or_else(|e| e.into_inner());
        *high = high.max(progress);
        let mut ev = self.base.clone();
        ev.status = status;
        ev.event = event.to_owned();
        ev.stage_index = stage_index;
        ev.stage = stage_index.and_then(|i| self.stage_names.get(i).cloned());
        ev.progress = *high;
        ev.message = message;
        ev.ts = now_rfc3339();
        ev.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.publisher.publish_on(self.channel.clone(), &ev);
    }
}
