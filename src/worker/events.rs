//! What happens to a job on this daemon, as events (after vector's
//! `internal_events`).
//!
//! Each struct is one thing that happened to a delivery; its `emit` does
//! everything that follows from it: the log line, the metrics
//! ([`crate::telemetry::metrics`]), the daemon's counters ([`Stats`]) and the progress
//! event subscribers see. The runner makes one call per outcome, so the
//! log, the metrics and the progress stream cannot drift apart.
//!
//! [`JobEvents`] is a delivery's progress stream: ordered (`seq`) and with
//! whole-job progress that never goes down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::runner::{LOG_TARGET, Stats, Stop};
use crate::job::Job;
use crate::job::Status;
use crate::pipeline::Pipeline;
use crate::progress::{ProgressEvent, Publisher};
use crate::telemetry::metrics;
use crate::time::now_rfc3339;

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// One delivery's progress stream, and what its events are labelled with.
pub(crate) struct JobEvents {
    base: ProgressEvent,
    channel: String,
    stage_names: Arc<[String]>,
    publisher: Publisher,
    seq: AtomicU64,
    high_water: Mutex<f64>,
    /// When the delivery was claimed (for the duration metrics).
    claimed_at: Instant,
}

impl JobEvents {
    pub(crate) fn new(
        publisher: &Publisher,
        worker_id: &str,
        job: &Job,
        queue: &str,
        pipeline: &Pipeline,
        attempt: u32,
    ) -> Self {
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
                worker_id: worker_id.to_owned(),
                message: None,
                ts: String::new(),
                seq: 0,
            },
            stage_names: pipeline.stage_names.clone(),
            channel: publisher.channel(job.id()),
            publisher: publisher.clone(),
            seq: AtomicU64::new(0),
            high_water: Mutex::new(0.0),
            claimed_at: Instant::now(),
        }
    }

    /// The highest whole-job progress published so far.
    pub(crate) fn high_water(&self) -> f64 {
        *self.high_water.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A "progress" event: a running stage's own report, or why the job
    /// waits. No log line, no metric.
    pub(crate) fn progress(
        &self,
        stage_index: Option<usize>,
        progress: f64,
        message: Option<String>,
    ) {
        self.publish(Status::Running, "progress", stage_index, progress, message);
    }

    fn kind(&self) -> &str {
        &self.base.kind
    }

    fn queue(&self) -> &str {
        &self.base.queue
    }

    /// The counter and duration of the attempt's outcome.
    fn outcome(&self, outcome: &'static str) {
        metrics::job_outcome(
            self.kind(),
            self.queue(),
            outcome,
            self.claimed_at.elapsed(),
        );
    }

    fn publish(
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

/// The delivery's first stage (or the first unfinished one) is about to run.
pub(crate) struct JobStarted {
    pub attempt: u32,
    pub resume_at: usize,
    pub crashes: u32,
    pub stages: usize,
    /// Whole-job progress of the stages already done.
    pub progress: f64,
}

impl JobStarted {
    pub(crate) fn emit(self, job: &JobEvents) {
        tracing::info!(
            target: LOG_TARGET,
            attempt = self.attempt,
            resume_at = self.resume_at,
            crashes = self.crashes,
            stages = self.stages,
            "job_started"
        );
        metrics::job_started(job.kind(), job.queue());
        job.publish(Status::Running, "job_started", None, self.progress, None);
    }
}

/// The job type's `rate` holds the delivery back (said once per delivery).
pub(crate) struct JobRateLimited<'a> {
    pub limit: u32,
    pub window: Duration,
    pub wait: Duration,
    pub kind: &'a str,
}

impl JobRateLimited<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        let window = humantime::format_duration(self.window);
        tracing::info!(target: LOG_TARGET, rate = %format!("{}/{window}", self.limit),
            wait_ms = millis(self.wait), "job_rate_limited");
        let message = format!(
            "waiting: job type `{}` is limited to {} starts per {window}",
            self.kind, self.limit
        );
        job.progress(None, job.high_water(), Some(message));
    }
}

/// A stage waits for a slot of its `max_concurrent` limit.
pub(crate) struct StageWaiting<'a> {
    pub stage: &'a str,
    pub index: usize,
    /// The limit, described for people.
    pub limit: String,
    pub progress: f64,
}

impl StageWaiting<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        let (name, index) = (self.stage, self.index);
        tracing::info!(target: LOG_TARGET, stage = %name, stage_index = index,
            limit = %self.limit, "stage_waiting");
        let message = format!("waiting for a `{name}` slot ({})", self.limit);
        job.progress(Some(index), self.progress, Some(message));
    }
}

pub(crate) struct StageStarted<'a> {
    pub stage: &'a str,
    pub index: usize,
    pub attempt: u32,
    pub progress: f64,
}

impl StageStarted<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        tracing::info!(target: LOG_TARGET, stage = %self.stage, stage_index = self.index,
            attempt = self.attempt, "stage_started");
        let index = Some(self.index);
        job.publish(Status::Running, "stage_started", index, self.progress, None);
    }
}

/// How a stage's run ended.
pub(crate) enum StageEnd {
    /// With the whole-job progress once it is done.
    Completed { progress: f64 },
    /// Stopped from outside; `cause` says why.
    Interrupted { cause: Stop },
    /// `error` is the stage's own message.
    Failed { error: String, permanent: bool },
}

/// A stage's run ended (recorded in SQLite by then).
pub(crate) struct StageFinished<'a> {
    pub stage: &'a str,
    pub index: usize,
    pub attempt: u32,
    pub elapsed: Duration,
    pub end: StageEnd,
}

impl StageFinished<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        let (name, index, attempt) = (self.stage, self.index, self.attempt);
        let elapsed_ms = millis(self.elapsed);
        let outcome = match self.end {
            StageEnd::Completed { progress } => {
                tracing::info!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, "stage_completed");
                job.publish(
                    Status::Running,
                    "stage_completed",
                    Some(index),
                    progress,
                    None,
                );
                "completed"
            }
            StageEnd::Interrupted { cause } => {
                tracing::info!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, cause = ?cause, "stage_interrupted");
                "interrupted"
            }
            StageEnd::Failed { error, permanent } => {
                tracing::warn!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, error = %error, permanent, "stage_failed");
                "failed"
            }
        };
        metrics::stage_done(job.kind(), name, outcome, self.elapsed);
    }
}

/// Every stage done; the delivery is acked.
pub(crate) struct JobCompleted {
    pub attempt: u32,
    pub elapsed: Duration,
}

impl JobCompleted {
    pub(crate) fn emit(self, job: &JobEvents, stats: &Stats) {
        stats.completed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: LOG_TARGET, attempt = self.attempt,
            elapsed_ms = millis(self.elapsed), "job_completed");
        job.outcome("completed");
        job.publish(Status::Completed, "job_completed", None, 100.0, None);
    }
}

/// The attempt failed and the next one is scheduled.
pub(crate) struct JobRetrying<'a> {
    pub attempt: u32,
    pub max_attempts: u32,
    pub delay_ms: u64,
    pub elapsed: Duration,
    pub error: &'a str,
    pub progress: f64,
}

impl JobRetrying<'_> {
    pub(crate) fn emit(self, job: &JobEvents, stats: &Stats) {
        let (attempt, max_attempts, delay_ms) = (self.attempt, self.max_attempts, self.delay_ms);
        stats.retried.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: LOG_TARGET, attempt, max_attempts, delay_ms,
            elapsed_ms = millis(self.elapsed), error = %self.error, "job_retrying");
        job.outcome("retried");
        let message = format!(
            "attempt {attempt} of {max_attempts} failed: {}; next attempt in {:.1}s",
            self.error,
            delay_ms as f64 / 1000.0
        );
        let status = Status::Retrying;
        job.publish(status, "job_retrying", None, self.progress, Some(message));
    }
}

/// The job failed for good and went to the dead-letter list.
pub(crate) struct JobFailed {
    pub attempt: u32,
    pub elapsed: Duration,
    pub error: String,
    pub permanent: bool,
    pub progress: f64,
}

impl JobFailed {
    pub(crate) fn emit(self, job: &JobEvents, stats: &Stats) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: LOG_TARGET, attempt = self.attempt,
            elapsed_ms = millis(self.elapsed), error = %self.error,
            permanent = self.permanent, "job_failed");
        job.outcome("failed");
        metrics::dead_lettered(job.queue());
        let message = Some(self.error);
        job.publish(Status::Failed, "job_failed", None, self.progress, message);
    }
}

/// Shutdown put the job back on pending, to resume after its finished stages.
pub(crate) struct JobRequeued {
    pub attempt: u32,
    pub finished_stages: usize,
    pub progress: f64,
}

impl JobRequeued {
    pub(crate) fn emit(self, job: &JobEvents, stats: &Stats) {
        stats.requeued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: LOG_TARGET, attempt = self.attempt,
            finished_stages = self.finished_stages, "job_requeued");
        job.outcome("requeued");
        let message = Some("requeued on shutdown".into());
        job.publish(
            Status::Pending,
            "job_requeued",
            None,
            self.progress,
            message,
        );
    }
}

/// The job was handed over to the pool of its next stage (`ran`: after
/// stages ran here; else at its first take, nothing having run).
pub(crate) struct JobHandedOver<'a> {
    pub stage: &'a str,
    pub pool: &'a str,
    pub ran: bool,
    pub progress: f64,
}

impl JobHandedOver<'_> {
    /// Published before the handover's settle: once settled, the pool's
    /// daemon may publish its own messages at once, and a subscriber must
    /// not see this one arrive after those.
    pub(crate) fn announce(&self, job: &JobEvents) {
        // Waiting again, as after a requeue: the contract's event names
        // stay as they are, the message says where the job waits.
        let message = format!("waiting for stage {} in pool {}", self.stage, self.pool);
        job.publish(
            Status::Pending,
            "job_requeued",
            None,
            self.progress,
            Some(message),
        );
    }

    /// Logged and counted once settled.
    pub(crate) fn emit(self, job: &JobEvents) {
        tracing::info!(target: LOG_TARGET, stage = %self.stage, pool = %self.pool,
            ran = self.ran, "job_handed_over");
        job.outcome("handed_over");
    }
}

/// A running job was cancelled (`conveyor cancel`).
pub(crate) struct JobCancelled {
    pub attempt: u32,
    pub progress: f64,
}

impl JobCancelled {
    pub(crate) fn emit(self, job: &JobEvents) {
        tracing::info!(target: LOG_TARGET, attempt = self.attempt, "job_cancelled");
        job.outcome("cancelled");
        let message = Some("cancelled".into());
        job.publish(
            Status::Cancelled,
            "job_cancelled",
            None,
            self.progress,
            message,
        );
    }
}

/// A job cancelled before it ran was taken: recorded and dropped. It has no
/// progress stream yet, so its one event is built here.
pub(crate) struct JobCancelledUnstarted<'a> {
    pub job: &'a Job,
    pub queue: &'a str,
    pub worker_id: &'a str,
    /// When it was recorded.
    pub at: String,
}

impl JobCancelledUnstarted<'_> {
    pub(crate) fn emit(self, publisher: &Publisher) {
        tracing::info!(target: LOG_TARGET, "job_cancelled");
        publisher.publish(&ProgressEvent {
            job_id: self.job.id().to_owned(),
            kind: self.job.kind.clone(),
            queue: self.queue.to_owned(),
            status: Status::Cancelled,
            event: "job_cancelled".into(),
            stage: None,
            stage_index: None,
            stages_total: 0,
            progress: 0.0,
            attempt: self.job.meta.attempt,
            worker_id: self.worker_id.to_owned(),
            message: Some("cancelled before it ran".into()),
            ts: self.at,
            seq: 1,
        });
    }
}

/// A message that cannot run (unparseable, too big, unknown job type) went
/// to the dead-letter list without being claimed.
pub(crate) struct JobDeadLettered<'a> {
    pub queue: &'a str,
    /// The job's id, when the message had a valid one.
    pub job_id: Option<String>,
    pub kind: String,
    pub worker_id: &'a str,
    pub reason: String,
    pub bytes: usize,
    pub at: String,
}

impl JobDeadLettered<'_> {
    /// The log line and the metric, as soon as the message is judged (see
    /// the caller for why this comes before the writes).
    pub(crate) fn noticed(&self) {
        tracing::warn!(target: LOG_TARGET, queue = %self.queue,
            job_id = self.job_id.as_deref().unwrap_or(""), worker_id = %self.worker_id,
            reason = %self.reason, bytes = self.bytes, "job_dead_lettered");
        metrics::dead_lettered(self.queue);
    }

    /// Once the entry is in the dead list: the daemon's count, and the
    /// `job_failed` message on the job's channel.
    pub(crate) fn emit(self, publisher: &Publisher, stats: &Stats) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        // Without a valid id there is no channel anyone could listen on.
        let Some(job_id) = self.job_id else {
            return;
        };
        publisher.publish(&ProgressEvent {
            job_id,
            kind: self.kind,
            queue: self.queue.to_owned(),
            status: Status::Failed,
            event: "job_failed".into(),
            stage: None,
            stage_index: None,
            stages_total: 0,
            progress: 0.0,
            attempt: 0,
            worker_id: self.worker_id.to_owned(),
            message: Some(self.reason),
            ts: self.at,
            seq: 1,
        });
    }
}
