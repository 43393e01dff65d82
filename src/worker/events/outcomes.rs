//! What happens to a claimed delivery, from its start to its end, as
//! events on its [`JobEvents`] stream.

use super::*;

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
