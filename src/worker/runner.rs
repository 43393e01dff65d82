//! The life of one job on this daemon.
//!
//! ```text
//! fetched ─parse─► poison? ──────────────────────────────► dead (reason)
//!            │
//!            └─► begin (SQLite: running; learn finished stages)
//!                  │ already final? ─────────────────────► ack (duplicate)
//!                  ▼
//!             stages in order, from the first unfinished one
//!                  ├─ all done ─► SQLite completed ─► ack ─► publish
//!                  ├─ failure  ─► SQLite failed ─► dead ─► publish
//!                  └─ shutdown ─► SQLite pending ─► back to pending with
//!                                 the finished stages' results ─► publish
//! ```
//!
//! Every Redis change comes after the SQLite commit it depends on: a crash
//! in between leaves the job in the active list, it is delivered again, and
//! `begin` recognises what was already done. Delivery is at-least-once;
//! stages must be idempotent (a stage interrupted mid-run runs again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{is_transient, job_op_backoff};
use crate::pipeline::{FailureKind, Pipeline, ProgressFn, StageContext, StageError};
use crate::progress::{ProgressEvent, Publisher, Status};
use crate::queue::job::{Poison, poison_entry};
use crate::queue::{Broker, Destination, Fetched, Job};
use crate::store::{BeginJob, FinishJob, PoisonJob, StageUpdate, Store};
use crate::{now_rfc3339, pipeline::Registry};

/// What every job task of one daemon shares.
pub struct JobEnv {
    pub broker: Broker,
    pub store: Store,
    pub publisher: Publisher,
    pub registry: Registry,
    pub worker_id: String,
    pub max_job_bytes: usize,
    pub kill_grace: Duration,
    /// Fires on SIGTERM: running stages may finish, no new stage starts.
    pub draining: CancellationToken,
    /// Fires when the shutdown grace period is over: stages are stopped.
    pub stop_stages: CancellationToken,
    pub stats: Stats,
}

/// Counters for logs and systemd STATUS.
#[derive(Default)]
pub struct Stats {
    pub running: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
}

/// Handles one fetched message to the end. Never panics on input.
pub async fn handle(env: Arc<JobEnv>, fetched: Fetched) {
    env.stats.running.fetch_add(1, Ordering::Relaxed);
    let queue = fetched.queue.clone();
    match Job::parse(&fetched.raw, env.max_job_bytes) {
        Err(poison) => dead_letter_poison(&env, &fetched, poison).await,
        Ok(job) => match env.registry.get(&job.kind).cloned() {
            None => {
                let reason = format!("unknown job type `{}`", job.kind);
                let poison = Poison {
                    reason,
                    object: Some(job.to_object()),
                };
                dead_letter_poison(&env, &fetched, poison).await
            }
            Some(pipeline) => {
                if let Some((job, raw)) = with_id(&env, job, fetched).await {
                    let span = tracing::info_span!("job", job_id = %job.id(), r#type = %job.kind,
                        queue = %queue, worker_id = %env.worker_id);
                    start(env.clone(), job, raw, queue, pipeline)
                        .instrument(span)
                        .await;
                }
            }
        },
    }
    env.stats.running.fetch_sub(1, Ordering::Relaxed);
}

/// Gives an id-less job its id, rewriting its active-list entry so that a
/// redelivery after a crash keeps the same id.
async fn with_id(env: &JobEnv, mut job: Job, fetched: Fetched) -> Option<(Job, Vec<u8>)> {
    if job.id.is_some() {
        return Some((job, fetched.raw));
    }
    job.id = Some(uuid::Uuid::now_v7().to_string());
    let new = job.to_json().into_bytes();
    let moved = redis_op("assign id", || {
        env.broker.transition(
            &fetched.queue,
            &env.worker_id,
            &fetched.raw,
            Destination::Active,
            &new,
        )
    })
    .await;
    match moved {
        Some(true) => Some((job, new)),
        Some(false) => {
            tracing::warn!(queue = %fetched.queue, "Fetched job vanished from the active list; skipping it");
            None
        }
        None => None,
    }
}

async fn dead_letter_poison(env: &JobEnv, fetched: &Fetched, poison: Poison) {
    let now = now_rfc3339();
    let id = poison
        .object
        .as_ref()
        .and_then(|o| o.get("id"))
        .and_then(Value::as_str)
        .filter(|id| crate::queue::job::check_id(id).is_ok())
        .map(str::to_owned);
    let kind = poison
        .object
        .as_ref()
        .and_then(|o| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let reason = poison.reason.clone();
    tracing::warn!(queue = %fetched.queue, job_id = id.as_deref().unwrap_or(""),
        worker_id = %env.worker_id, reason = %reason, bytes = fetched.raw.len(), "job_dead_lettered");
    if let Some(id) = &id {
        let payload = poison
            .object
            .as_ref()
            .and_then(|o| o.get("payload"))
            .map(Value::to_string);
        let _ = env
            .store
            .poison(PoisonJob {
                id: id.clone(),
                kind: kind.clone(),
                queue: fetched.queue.clone(),
                payload: payload.unwrap_or_else(|| "null".into()),
                error: reason.clone(),
                worker_id: env.worker_id.clone(),
                at: now.clone(),
            })
            .await;
    }
    let entry = poison_entry(&fetched.raw, poison, &env.worker_id, &now);
    redis_op("dead-letter", || {
        env.broker.transition(
            &fetched.queue,
            &env.worker_id,
            &fetched.raw,
            Destination::Dead,
            entry.as_bytes(),
        )
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
            seq: 0,
        });
    }
}

/// Retries one Redis state change of a job while the error is transient.
/// `None` when it still failed: the job then stays in the active list and
/// is recovered later (see the module docs).
async fn redis_op<T, F, Fut>(what: &str, op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let result = op
        .retry(job_op_backoff())
        .sleep(tokio::time::sleep)
        .when(is_transient)
        .notify(|err, delay| tracing::warn!(error = %err, ?delay, op = what, "Redis call failed; retrying"))
        .await;
    match result {
        Ok(v) => Some(v),
        Err(err) => {
            tracing::error!(error = %err, op = what,
                "Redis call failed for good; the job stays in the active list for recovery");
            None
        }
    }
}

/// How an attempt ended.
enum Outcome {
    Completed,
    Failed(StageError),
    Interrupted,
}

/// One run of one job, from `begin` to ack, dead-letter or requeue.
struct Run {
    env: Arc<JobEnv>,
    job: Job,
    raw: Vec<u8>,
    queue: String,
    pipeline: Arc<Pipeline>,
    attempt: u32,
    results: Map<String, Value>,
    events: Arc<Events>,
}

/// Records the start in SQLite, then runs the job (or acks a duplicate).
async fn start(env: Arc<JobEnv>, job: Job, raw: Vec<u8>, queue: String, pipeline: Arc<Pipeline>) {
    let started = Instant::now();
    let begin = begin_record(&env, &job, &queue, &pipeline);
    let prior = match env.store.begin(begin).await {
        Ok(prior) => prior,
        Err(err) => {
            // Only when the store is closing: leave the job to recovery.
            tracing::error!(error = %err, "Cannot record job start; leaving it for recovery");
            return;
        }
    };
    if let Some(status) = prior.status.filter(|s| s.is_final()) {
        tracing::warn!(
            status = status.as_str(),
            "Job already finished; acknowledging duplicate delivery"
        );
        redis_op("ack", || env.broker.ack(&queue, &env.worker_id, &raw)).await;
        return;
    }
    let attempt = job.meta.attempt.max(prior.attempt).max(1);
    let mut results = job.meta.results.clone();
    for (name, result) in prior.results {
        results.entry(name).or_insert(result);
    }
    let events = Arc::new(Events::new(&env, &job, &queue, &pipeline, attempt));
    let run = Run {
        env,
        job,
        raw,
        queue,
        pipeline,
        attempt,
        results,
        events,
    };
    run.execute(started).await;
}

fn begin_record(env: &JobEnv, job: &Job, queue: &str, pipeline: &Pipeline) -> BeginJob {
    BeginJob {
        id: job.id().to_owned(),
        kind: job.kind.clone(),
        queue: queue.to_owned(),
        payload: job.payload.to_string(),
        attempt: job.meta.attempt.max(1),
        max_attempts: job.max_attempts.unwrap_or(pipeline.max_attempts),
        worker_id: env.worker_id.clone(),
        stages: pipeline.stages.iter().map(|s| s.name.clone()).collect(),
        at: now_rfc3339(),
    }
}

impl Run {
    async fn execute(mut self, started: Instant) {
        let start = self.pipeline.resume_index(&self.results);
        tracing::info!(
            attempt = self.attempt,
            resume_at = start,
            stages = self.pipeline.stages.len(),
            "job_started"
        );
        let progress = self.pipeline.overall_progress(start, 0.0);
        self.events
            .emit(Status::Running, "job_started", None, progress, None);

        match self.run_stages(start).await {
            Outcome::Completed => self.complete(started).await,
            Outcome::Failed(err) => self.fail(err, started).await,
            Outcome::Interrupted => self.requeue().await,
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
            // Draining: the stage that was running finished; the next one
            // would only be cut short by the end of the grace period, so the
            // job goes back now, resuming here on the next daemon.
            if self.env.draining.is_cancelled() {
                return Outcome::Interrupted;
            }
            let stage = &self.pipeline.stages[index];
            let name = stage.name.clone();
            let stage_started = Instant::now();
            let at_start = self.pipeline.overall_progress(index, 0.0);
            tracing::info!(stage = %name, stage_index = index, attempt = self.attempt, "stage_started");
            self.record_stage(index, "running", None, None, at_start)
                .await;
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
            let result = run_with_deadline(stage.imp.as_ref(), &ctx, deadline).await;
            let elapsed_ms = stage_started.elapsed().as_millis() as u64;
            match result {
                Ok(value) => {
                    let done = self.pipeline.overall_progress(index + 1, 0.0);
                    let stored = Some(value.to_string());
                    self.results.insert(name.clone(), value);
                    tracing::info!(stage = %name, stage_index = index, attempt = self.attempt, elapsed_ms, "stage_completed");
                    self.record_stage(index, "completed", stored, None, done)
                        .await;
                    self.events
                        .emit(Status::Running, "stage_completed", Some(index), done, None);
                }
                Err(err) if err.kind == FailureKind::Interrupted => {
                    tracing::info!(stage = %name, stage_index = index, attempt = self.attempt, elapsed_ms, "stage_interrupted");
                    let at = self.events.high_water();
                    self.record_stage(index, "interrupted", None, None, at)
                        .await;
                    return Outcome::Interrupted;
                }
                Err(err) => {
                    tracing::warn!(stage = %name, stage_index = index, attempt = self.attempt, elapsed_ms,
                        error = %err, permanent = err.kind == FailureKind::Permanent, "stage_failed");
                    let at = self.events.high_water();
                    self.record_stage(index, "failed", None, Some(err.message.clone()), at)
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
        let progress: ProgressFn = Arc::new(move |pct, message| {
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
            cancel: self.env.stop_stages.child_token(),
            kill_grace: self.env.kill_grace,
            progress,
        }
    }

    async fn record_stage(
        &self,
        index: usize,
        status: &'static str,
        result: Option<String>,
        error: Option<String>,
        progress: f64,
    ) {
        let update = StageUpdate {
            job_id: self.job.id().to_owned(),
            index,
            name: self.pipeline.stages[index].name.clone(),
            attempt: self.attempt,
            status,
            result,
            error,
            progress,
            at: now_rfc3339(),
        };
        if let Err(err) = self.env.store.stage(update).await {
            tracing::error!(error = %err, "Cannot record stage state");
        }
    }

    async fn finish_record(&self, status: Status, progress: f64, error: Option<String>) -> bool {
        let record = FinishJob {
            id: self.job.id().to_owned(),
            status,
            attempt: self.attempt,
            progress,
            error,
            at: now_rfc3339(),
        };
        match self.env.store.finish(record).await {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, "Cannot record job state; leaving it for recovery");
                false
            }
        }
    }

    async fn complete(self, started: Instant) {
        if !self.finish_record(Status::Completed, 100.0, None).await {
            return;
        }
        redis_op("ack", || {
            self.env
                .broker
                .ack(&self.queue, &self.env.worker_id, &self.raw)
        })
        .await;
        self.env.stats.completed.fetch_add(1, Ordering::Relaxed);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(attempt = self.attempt, elapsed_ms, "job_completed");
        self.events
            .emit(Status::Completed, "job_completed", None, 100.0, None);
    }

    async fn fail(mut self, err: StageError, started: Instant) {
        let progress = self.events.high_water();
        if !self
            .finish_record(Status::Failed, progress, Some(err.message.clone()))
            .await
        {
            return;
        }
        let now = now_rfc3339();
        self.job.meta.attempt = self.attempt;
        self.job.meta.results = std::mem::take(&mut self.results);
        self.job.meta.error = Some(err.message.clone());
        self.job.meta.failed_at = Some(now);
        self.job.meta.worker_id = Some(self.env.worker_id.clone());
        let entry = self.job.to_json();
        redis_op("dead-letter", || {
            self.env.broker.transition(
                &self.queue,
                &self.env.worker_id,
                &self.raw,
                Destination::Dead,
                entry.as_bytes(),
            )
        })
        .await;
        self.env.stats.failed.fetch_add(1, Ordering::Relaxed);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::warn!(attempt = self.attempt, elapsed_ms, error = %err.message,
            permanent = err.kind == FailureKind::Permanent, "job_failed");
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
        redis_op("requeue", || {
            self.env.broker.transition(
                &self.queue,
                &self.env.worker_id,
                &self.raw,
                Destination::Pending,
                json.as_bytes(),
            )
        })
        .await;
        self.env.stats.requeued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            attempt = self.attempt,
            finished_stages = done,
            "job_requeued"
        );
        self.events.emit(
            Status::Pending,
            "job_requeued",
            None,
            progress,
            Some("requeued on shutdown".into()),
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
    stage_names: Vec<String>,
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
            stage_names: pipeline.stages.iter().map(|s| s.name.clone()).collect(),
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
        self.publisher.publish(&ev);
    }
}
