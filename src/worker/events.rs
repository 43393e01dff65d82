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
use crate::progress::record::{Fence, StageFields, stage_json};
use crate::progress::{ProgressEvent, Publisher, RecordParts};
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
    /// Each stage's pool, in order (for the record's stage fields).
    stage_pools: Vec<String>,
    publisher: Publisher,
    seq: AtomicU64,
    high_water: Mutex<f64>,
    /// When the delivery was claimed (for the duration metrics).
    claimed_at: Instant,
    /// The same, for the job's record.
    started_at: String,
    /// The delivery's fencing token: its record writes are fenced by it.
    token: String,
}

impl JobEvents {
    pub(crate) fn new(
        publisher: &Publisher,
        worker_id: &str,
        job: &Job,
        queue: &str,
        pipeline: &Pipeline,
        attempt: u32,
        token: &str,
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
                result: None,
                result_truncated: None,
                result_key: None,
                result_field: None,
            },
            stage_names: pipeline.stage_names.clone(),
            stage_pools: pipeline.stages.iter().map(|s| s.pool.clone()).collect(),
            channel: publisher.channel(job.id()),
            publisher: publisher.clone(),
            seq: AtomicU64::new(0),
            high_water: Mutex::new(0.0),
            claimed_at: Instant::now(),
            started_at: now_rfc3339(),
            token: token.to_owned(),
        }
    }

    /// A stage's end written into the record only: the job's own event
    /// (retrying, failed, requeued…) is what subscribers hear.
    fn record_only(
        &self,
        index: usize,
        status: &str,
        attempt: u32,
        times: (Option<&str>, Option<&str>),
        error: Option<String>,
        mut parts: RecordParts<'_>,
    ) {
        parts.stages = vec![self.stage_field(index, status, attempt, times, None, error)];
        parts.unpublished = true;
        let event = format!("stage_{status}");
        let high = self.high_water();
        self.publish(Status::Running, &event, Some(index), high, None, parts);
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
        let parts = self.parts();
        self.publish(
            Status::Running,
            "progress",
            stage_index,
            progress,
            message,
            parts,
        );
    }

    /// What every message of the delivery writes into the job's record.
    fn parts(&self) -> RecordParts<'_> {
        RecordParts {
            stage_names: &self.stage_names,
            started_at: Some(&self.started_at),
            fence: Fence::Delivery(self.token.clone()),
            ..RecordParts::default()
        }
    }

    /// The record's field of stage `index`, run by this daemon.
    fn stage_field(
        &self,
        index: usize,
        status: &str,
        attempt: u32,
        times: (Option<&str>, Option<&str>),
        result: Option<&str>,
        error: Option<String>,
    ) -> (usize, String) {
        let fields = StageFields {
            status: status.to_owned(),
            attempt,
            started_at: times.0.map(str::to_owned),
            finished_at: times.1.map(str::to_owned),
            worker_id: self.base.worker_id.clone(),
            error,
            ..self.unrun_stage(index)
        };
        (index, stage_json(&fields, result))
    }

    /// The record's field of stage `index` still to run: no daemon yet (the
    /// stage may run on another host, in its pool).
    fn pending_stage_field(&self, index: usize) -> (usize, String) {
        (index, stage_json(&self.unrun_stage(index), None))
    }

    fn unrun_stage(&self, index: usize) -> StageFields {
        StageFields {
            name: self.stage_names.get(index).cloned().unwrap_or_default(),
            status: "pending".to_owned(),
            pool: self.stage_pools.get(index).cloned().unwrap_or_default(),
            ..StageFields::default()
        }
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
        parts: RecordParts<'_>,
    ) {
        self.publish_with(status, event, stage_index, progress, message, parts, |_| {});
    }

    /// [`JobEvents::publish`], with `finish` completing the event.
    #[allow(clippy::too_many_arguments)]
    fn publish_with(
        &self,
        status: Status,
        event: &str,
        stage_index: Option<usize>,
        progress: f64,
        message: Option<String>,
        parts: RecordParts<'_>,
        finish: impl FnOnce(&mut ProgressEvent),
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
        // A record-only message is never heard: it takes no number.
        ev.seq = if parts.unpublished {
            self.seq.load(Ordering::Relaxed)
        } else {
            self.seq.fetch_add(1, Ordering::Relaxed) + 1
        };
        finish(&mut ev);
        self.publisher.send(self.channel.clone(), &ev, parts);
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
        // The stages still to run start over in the record (an id enqueued
        // anew, or a resumed job's interrupted stage).
        let mut parts = job.parts();
        parts.stages = (self.resume_at..self.stages)
            .map(|i| job.pending_stage_field(i))
            .collect();
        job.publish(
            Status::Running,
            "job_started",
            None,
            self.progress,
            None,
            parts,
        );
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
    /// When it started (RFC 3339, as recorded in SQLite).
    pub started_at: &'a str,
    pub attempt: u32,
    pub progress: f64,
}

impl StageStarted<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        tracing::info!(target: LOG_TARGET, stage = %self.stage, stage_index = self.index,
            attempt = self.attempt, "stage_started");
        let mut parts = job.parts();
        let times = (Some(self.started_at), None);
        parts.stages =
            vec![job.stage_field(self.index, "running", self.attempt, times, None, None)];
        let index = Some(self.index);
        job.publish(
            Status::Running,
            "stage_started",
            index,
            self.progress,
            None,
            parts,
        );
    }
}

/// How a stage's run ended.
pub(crate) enum StageEnd {
    /// With the whole-job progress once it is done, and its result (JSON).
    Completed { progress: f64, result: String },
    /// Stopped from outside; `cause` says why.
    Interrupted { cause: Stop },
    /// `error` is the stage's own message.
    Failed { error: String, permanent: bool },
}

/// A stage's run ended (recorded in SQLite by then).
pub(crate) struct StageFinished<'a> {
    pub stage: &'a str,
    pub index: usize,
    /// When it started (RFC 3339, as recorded in SQLite).
    pub started_at: &'a str,
    pub attempt: u32,
    pub elapsed: Duration,
    pub end: StageEnd,
}

impl StageFinished<'_> {
    pub(crate) fn emit(self, job: &JobEvents) {
        let (name, index, attempt) = (self.stage, self.index, self.attempt);
        let elapsed_ms = millis(self.elapsed);
        let now = now_rfc3339();
        let times = (Some(self.started_at), Some(now.as_str()));
        let mut parts = job.parts();
        let outcome = match self.end {
            StageEnd::Completed { progress, result } => {
                tracing::info!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, "stage_completed");
                let result = Some(result.as_str());
                parts.stages =
                    vec![job.stage_field(index, "completed", attempt, times, result, None)];
                let (status, at) = (Status::Running, Some(index));
                job.publish(status, "stage_completed", at, progress, None, parts);
                "completed"
            }
            StageEnd::Interrupted { cause } => {
                tracing::info!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, cause = ?cause, "stage_interrupted");
                // A run that lost its lease writes nothing more.
                if cause != Stop::LeaseLost {
                    job.record_only(index, "interrupted", attempt, times, None, parts);
                }
                "interrupted"
            }
            StageEnd::Failed { error, permanent } => {
                tracing::warn!(target: LOG_TARGET, stage = %name, stage_index = index, attempt,
                    elapsed_ms, error = %error, permanent, "stage_failed");
                job.record_only(index, "failed", attempt, times, Some(error), parts);
                "failed"
            }
        };
        metrics::stage_done(job.kind(), name, outcome, self.elapsed);
    }
}

/// Every stage done; the delivery is acked.
pub(crate) struct JobCompleted<'a> {
    pub attempt: u32,
    pub elapsed: Duration,
    /// The job's result: its last stage's.
    pub result: Option<&'a serde_json::Value>,
}

impl JobCompleted<'_> {
    pub(crate) fn emit(self, job: &JobEvents, stats: &Stats) {
        stats.completed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: LOG_TARGET, attempt = self.attempt,
            elapsed_ms = millis(self.elapsed), "job_completed");
        job.outcome("completed");
        let last = job.stage_names.len().saturating_sub(1);
        let attach = |ev: &mut ProgressEvent| {
            if let Some(result) = self.result {
                job.publisher.attach_result(ev, last, result);
            }
        };
        let (status, parts) = (Status::Completed, job.parts());
        job.publish_with(status, "job_completed", None, 100.0, None, parts, attach);
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
        let mut parts = job.parts();
        parts.error = Some(self.error);
        job.publish(
            status,
            "job_retrying",
            None,
            self.progress,
            Some(message),
            parts,
        );
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
        let mut parts = job.parts();
        parts.error = Some(&self.error);
        let message = Some(self.error.clone());
        job.publish(
            Status::Failed,
            "job_failed",
            None,
            self.progress,
            message,
            parts,
        );
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
        let parts = job.parts();
        job.publish(
            Status::Pending,
            "job_requeued",
            None,
            self.progress,
            message,
            parts,
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
        let parts = job.parts();
        job.publish(
            Status::Pending,
            "job_requeued",
            None,
            self.progress,
            Some(message),
            parts,
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
        let parts = job.parts();
        job.publish(
            Status::Cancelled,
            "job_cancelled",
            None,
            self.progress,
            message,
            parts,
        );
    }
}

/// A job cancelled before it ran was taken: recorded and dropped. It has no
/// progress stream yet, so its one event is built here.
pub(crate) struct JobCancelledUnstarted<'a> {
    pub job: &'a Job,
    pub queue: &'a str,
    /// Its job type's stages: the record keeps listing them (some may have
    /// run before it waited for a pool).
    pub stage_names: &'a [String],
    pub worker_id: &'a str,
    /// When it was recorded.
    pub at: String,
}

impl JobCancelledUnstarted<'_> {
    pub(crate) fn emit(self, publisher: &Publisher) {
        tracing::info!(target: LOG_TARGET, "job_cancelled");
        let parts = RecordParts {
            stage_names: self.stage_names,
            fence: Fence::Unleased,
            ..RecordParts::default()
        };
        let event = ProgressEvent {
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
            result: None,
            result_truncated: None,
            result_key: None,
            result_field: None,
        };
        publisher.publish(&event, parts);
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
        let event = ProgressEvent {
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
            result: None,
            result_truncated: None,
            result_key: None,
            result_field: None,
        };
        // Its id may be a living job's: the record is only made, never
        // overwritten.
        let parts = RecordParts {
            fence: Fence::OnlyNew,
            ..RecordParts::default()
        };
        publisher.publish(&event, parts);
    }
}
