//! A claimed delivery ([`Run`]) and its start: what SQLite knows of earlier
//! deliveries, quarantine after too many crashes, the job type's rate
//! limit, then the stages.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::outcome::{Ended, Stop};
use super::{JobEnv, LOG_TARGET};
use crate::config::RetryConfig;
use crate::job::Job;
use crate::job::Status;
use crate::pipeline::{Pipeline, StageError};
use crate::queue::Next;
use crate::store::{BeginJob, Prior};
use crate::time::now_rfc3339;
use crate::worker::events::{JobEvents, JobStarted};
use crate::worker::inflight::{RunStop, StopReason};

/// One delivery of one job, from `begin` to its settlement.
pub(super) struct Run {
    pub(super) env: Arc<JobEnv>,
    pub(super) job: Job,
    pub(super) raw: Vec<u8>,
    pub(super) queue: String,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) token: String,
    pub(super) stop: Arc<RunStop>,
    /// This run's job slot; given back while it waits on a limit.
    pub(super) slot: Option<OwnedSemaphorePermit>,
    /// Its place in the parking lot while it has no job slot.
    pub(super) parked: Option<OwnedSemaphorePermit>,
    pub(super) attempt: u32,
    /// Taken from pending (not from a stage pool's list): this delivery
    /// starts the job, or starts it again, so it takes a `rate` token.
    /// A job continued after a handover already took its token.
    pub(super) from_pending: bool,
    pub(super) results: Map<String, Value>,
    pub(super) events: Arc<JobEvents>,
}

impl Run {
    pub(super) fn new(
        env: Arc<JobEnv>,
        job: Job,
        raw: Vec<u8>,
        queue: String,
        pipeline: Arc<Pipeline>,
        token: String,
        stop: Arc<RunStop>,
    ) -> Self {
        let attempt = job.meta.attempt.max(1);
        let events = JobEvents::new(
            &env.publisher,
            &env.worker_id,
            &job,
            &queue,
            &pipeline,
            attempt,
            &token,
        );
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
            attempt,
            from_pending: true,
            events: Arc::new(events),
        }
    }

    /// The retry policy: the job type's, with the job's own overrides.
    pub(super) fn retry(&self) -> RetryConfig {
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

    pub(super) async fn start(mut self, crashes: u32) {
        // Stage pools: a job whose current stage another pool runs goes
        // there before anything happens here (its crash count stays in
        // Redis, for the daemon that runs it).
        let current = self.pipeline.resume_index(&self.results);
        if let Some(pool) = self.foreign_pool(current) {
            // Its `rate` token is taken here when it came from pending: the
            // pool's daemon takes it from the pool list, so takes none.
            if self.rate_before_handover().await {
                self.hand_over_unstarted(current, &pool).await;
            }
            return;
        }
        let started = Instant::now();
        let Some(prior) = self.begin(crashes).await else {
            return;
        };
        if prior.finished_for(self.job.meta.epoch) {
            let status = prior.status.map(Status::as_str).unwrap_or("?");
            tracing::warn!(target: LOG_TARGET, status, "duplicate_finished_dropped");
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
            tracing::error!(target: LOG_TARGET, crashes, "job_quarantined");
            self.conclude(Ended::Failed(err), started).await;
            return;
        }
        match self.rate_limit_from_pending().await {
            Ok(()) => {}
            // Redis gave up on us during shutdown: recovery takes the job.
            Err(None) => return,
            Err(Some(stop)) => {
                self.conclude(Ended::Stopped(stop), started).await;
                return;
            }
        }
        let start = self.pipeline.resume_index(&self.results);
        JobStarted {
            attempt: self.attempt,
            resume_at: start,
            crashes,
            stages: self.pipeline.stages.len(),
            progress: self.pipeline.overall_progress(start, 0.0),
        }
        .emit(&self.events);
        let ended = self.run_stages(start).await;
        self.conclude(ended, started).await;
    }

    /// Records the start in SQLite and returns what it knew of earlier
    /// deliveries; `None` when the store is closing (recovery takes the job).
    async fn begin(&self, crashes: u32) -> Option<Prior> {
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
        match prior {
            Ok(prior) => Some(prior),
            Err(err) => {
                // Only when the store is closing: leave the job to recovery.
                tracing::error!(target: LOG_TARGET, error = %err, "job_start_unrecorded");
                None
            }
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
    pub(super) fn stop_cause(&self) -> Stop {
        match self.stop.reason() {
            Some(StopReason::Cancelled) => Stop::Cancelled,
            Some(StopReason::LeaseLost) => Stop::LeaseLost,
            None => Stop::Shutdown,
        }
    }
}
