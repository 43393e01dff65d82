//! How an attempt ends: what it means for the delivery ([`decide`], pure:
//! no Redis, no SQLite), and carrying that out: the end recorded in SQLite,
//! then the delivery settled in Redis (both fenced by the lease), then the
//! outcome's event.

use std::time::{Duration, Instant};

use super::LOG_TARGET;
use super::delivery::redis_op;
use super::run::Run;
use crate::config::RetryConfig;
use crate::job::Status;
use crate::pipeline::{FailureKind, StageError};
use crate::queue::Next;
use crate::store::{FinishJob, HandedTo};
use crate::time::now_rfc3339;

/// The longest a requeue, a retry or a handover waits for this delivery's
/// record writes to be sent before it lets the job go.
const RECORD_FLUSH_WAIT: Duration = Duration::from_secs(1);
use crate::worker::events::{JobCancelled, JobCompleted, JobFailed, JobRequeued, JobRetrying};

/// How an attempt's run ended, before anything is decided.
pub(super) enum Ended {
    Completed,
    Failed(StageError),
    Stopped(Stop),
    /// Stage `.0` is next and runs in pool `.1`, not served here.
    HandOver(usize, String),
}

/// Why an attempt stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Shutdown,
    Cancelled,
    LeaseLost,
}

/// What becomes of the delivery once its attempt ended.
#[derive(Debug)]
pub(super) enum Decision {
    /// Recorded completed, acked.
    Complete,
    /// Recorded retrying; the job goes to the scheduled set as attempt
    /// `next_attempt`, due in `delay_ms`.
    Retry {
        err: StageError,
        delay_ms: u64,
        next_attempt: u32,
    },
    /// Recorded failed; the job goes to the dead-letter list with this
    /// attempt's number and error.
    Dead { err: StageError, attempt: u32 },
    /// Recorded pending; back on pending with its finished stages' results
    /// and the same attempt number (a shutdown is not a failure).
    Requeue { attempt: u32 },
    /// Recorded pending; handed over to pool `pool`, stage `next` being
    /// the next one (no attempt, requeue or crash counted).
    HandOver { next: usize, pool: String },
    /// Recorded cancelled, acked.
    Cancel,
    /// The lease is gone (the job was recovered and handed to another
    /// daemon): nothing is written.
    Abandon,
}

/// What an attempt's end means, by the job's retry policy: a retryable
/// failure is retried while attempts are left, any other failure is final.
pub(super) fn decide(ended: Ended, attempt: u32, retry: &RetryConfig) -> Decision {
    match ended {
        Ended::Completed => Decision::Complete,
        Ended::Failed(err)
            if err.kind == FailureKind::Retryable && attempt < retry.max_attempts =>
        {
            Decision::Retry {
                err,
                delay_ms: retry.jittered_delay_ms(attempt),
                next_attempt: attempt + 1,
            }
        }
        Ended::Failed(err) => Decision::Dead { err, attempt },
        Ended::Stopped(Stop::Shutdown) => Decision::Requeue { attempt },
        Ended::Stopped(Stop::Cancelled) => Decision::Cancel,
        Ended::Stopped(Stop::LeaseLost) => Decision::Abandon,
        Ended::HandOver(next, pool) => Decision::HandOver { next, pool },
    }
}

impl Run {
    /// Decides what the attempt's end means and carries it out.
    pub(super) async fn conclude(self, ended: Ended, started: Instant) {
        let retry = self.retry();
        match decide(ended, self.attempt, &retry) {
            Decision::Complete => self.complete(started).await,
            Decision::Retry {
                err,
                delay_ms,
                next_attempt,
            } => {
                let max_attempts = retry.max_attempts;
                self.retry_later(err, delay_ms, next_attempt, max_attempts, started)
                    .await
            }
            Decision::Dead { err, attempt } => self.dead(err, attempt, started).await,
            Decision::Requeue { attempt } => self.requeue(attempt).await,
            Decision::HandOver { next, pool } => self.hand_over(next, &pool).await,
            Decision::Cancel => self.cancelled().await,
            Decision::Abandon => {
                tracing::warn!(
                    target: LOG_TARGET,
                    reason = "recovered",
                    "job_abandoned"
                );
            }
        }
    }

    /// Commits the end of the attempt in SQLite. False when nothing more may
    /// be done for this delivery (lease lost, store closing).
    pub(super) async fn finish_record(
        &self,
        status: Status,
        progress: f64,
        error: Option<String>,
    ) -> bool {
        self.finish_record_to(status, progress, error, None).await
    }

    /// [`Run::finish_record`], naming where a handed-over job went.
    pub(super) async fn finish_record_to(
        &self,
        status: Status,
        progress: f64,
        error: Option<String>,
        handed_to: Option<HandedTo>,
    ) -> bool {
        let record = FinishJob {
            id: self.job.id().to_owned(),
            lease: self.token.clone(),
            status,
            attempt: self.attempt,
            epoch: self.job.meta.epoch,
            progress,
            error,
            at: now_rfc3339(),
            handed_to,
        };
        match self.env.store.finish(record).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    target: LOG_TARGET,
                    reason = "other_delivery",
                    "job_abandoned"
                );
                false
            }
            Err(err) => {
                tracing::error!(target: LOG_TARGET, error = %err, "job_state_unrecorded");
                false
            }
        }
    }

    /// Settles the delivery in Redis (fenced by the lease). True when done.
    pub(super) async fn settle(&self, what: &str, next: Next<'_>) -> bool {
        self.stop.begin_settling();
        if matches!(
            next,
            Next::Requeue(_) | Next::Retry { .. } | Next::HandOver { .. }
        ) {
            // Another delivery may take the job right after: this one's
            // record writes go first (bounded: a slow Redis does not hold
            // the settle back for long; a write later than that is fenced
            // off once the next delivery holds the job).
            self.env.publisher.flushed(RECORD_FLUSH_WAIT).await;
        }
        let settled = redis_op(&self.env, what, || {
            let id = self.job.id();
            self.env
                .batcher
                .settle(&self.queue, &self.raw, id, &self.token, next)
        })
        .await;
        if settled == Some(false) {
            tracing::warn!(
                target: LOG_TARGET,
                op = what,
                reason = "lease_gone",
                "job_abandoned"
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
        let last = self.pipeline.stage_names.last();
        JobCompleted {
            attempt: self.attempt,
            elapsed: started.elapsed(),
            result: last.and_then(|name| self.results.get(name)),
        }
        .emit(&self.events, &self.env.stats);
    }

    async fn retry_later(
        mut self,
        err: StageError,
        delay_ms: u64,
        next_attempt: u32,
        max_attempts: u32,
        started: Instant,
    ) {
        let progress = self.events.high_water();
        let elapsed = started.elapsed();
        let error = Some(err.message.clone());
        if !self.finish_record(Status::Retrying, progress, error).await {
            return;
        }
        self.job.meta.attempt = next_attempt;
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
        JobRetrying {
            attempt: self.attempt,
            max_attempts,
            delay_ms,
            elapsed,
            error: &err.message,
            progress,
        }
        .emit(&self.events, &self.env.stats);
    }

    async fn dead(mut self, err: StageError, attempt: u32, started: Instant) {
        let progress = self.events.high_water();
        let elapsed = started.elapsed();
        let error = Some(err.message.clone());
        if !self.finish_record(Status::Failed, progress, error).await {
            return;
        }
        self.job.meta.attempt = attempt;
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
        JobFailed {
            attempt: self.attempt,
            elapsed,
            permanent: err.kind == FailureKind::Permanent,
            error: err.message,
            progress,
        }
        .emit(&self.events, &self.env.stats);
    }

    async fn requeue(mut self, attempt: u32) {
        let progress = self.events.high_water();
        if !self.finish_record(Status::Pending, progress, None).await {
            return;
        }
        let done = self.results.len();
        self.job.meta.attempt = attempt;
        self.job.meta.results = std::mem::take(&mut self.results);
        self.job.meta.requeues += 1;
        let json = self.job.to_json();
        // Back on the consuming end of pending: it is the next job taken, and
        // whoever takes it resumes after the stages recorded in `results`.
        if !self.settle("requeue", Next::Requeue(json.as_bytes())).await {
            return;
        }
        JobRequeued {
            attempt: self.attempt,
            finished_stages: done,
            progress,
        }
        .emit(&self.events, &self.env.stats);
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
        JobCancelled {
            attempt: self.attempt,
            progress,
        }
        .emit(&self.events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryConfig {
        RetryConfig {
            max_attempts,
            backoff_ms: 1000,
            backoff_max_ms: 3000,
        }
    }

    #[test]
    fn a_completed_attempt_completes() {
        assert!(matches!(
            decide(Ended::Completed, 1, &policy(3)),
            Decision::Complete
        ));
    }

    #[test]
    fn a_retryable_failure_with_attempts_left_is_retried_after_the_backoff() {
        // Attempt n failed: the next is n + 1, due after backoff * 2^(n-1)
        // (at most backoff_max), jittered to 50-100 % of it.
        for (attempt, full) in [(1, 1000), (2, 2000), (3, 3000), (4, 3000)] {
            for _ in 0..200 {
                let err = StageError::retryable("exit 1");
                match decide(Ended::Failed(err), attempt, &policy(5)) {
                    Decision::Retry {
                        err,
                        delay_ms,
                        next_attempt,
                    } => {
                        assert_eq!(next_attempt, attempt + 1);
                        assert!((full / 2..=full).contains(&delay_ms), "{delay_ms}");
                        assert_eq!(err.message, "exit 1");
                        assert_eq!(err.kind, FailureKind::Retryable);
                    }
                    other => panic!("attempt {attempt}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_retryable_failure_of_the_last_attempt_is_dead() {
        for (attempt, max) in [(3, 3), (1, 1), (4, 3)] {
            let err = StageError::retryable("exit 1");
            match decide(Ended::Failed(err), attempt, &policy(max)) {
                Decision::Dead { err, attempt: a } => {
                    assert_eq!(a, attempt);
                    assert_eq!(err.message, "exit 1");
                    assert_eq!(err.kind, FailureKind::Retryable);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_permanent_failure_is_dead_at_once() {
        let err = StageError::permanent("bad input");
        match decide(Ended::Failed(err), 1, &policy(5)) {
            Decision::Dead { err, attempt } => {
                assert_eq!(attempt, 1);
                assert_eq!(err.message, "bad input");
                assert_eq!(err.kind, FailureKind::Permanent);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_retryable_failure_is_ever_retried() {
        // An interrupted stage ends the run as stopped, not failed; were it
        // ever passed as a failure it would not be retried either.
        let err = StageError {
            kind: FailureKind::Interrupted,
            message: "stopped".into(),
        };
        assert!(matches!(
            decide(Ended::Failed(err), 1, &policy(5)),
            Decision::Dead { attempt: 1, .. }
        ));
    }

    #[test]
    fn shutdown_requeues_without_counting_an_attempt() {
        for attempt in [1, 2, 5] {
            match decide(Ended::Stopped(Stop::Shutdown), attempt, &policy(3)) {
                Decision::Requeue { attempt: a } => assert_eq!(a, attempt),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_lost_lease_writes_nothing() {
        assert!(matches!(
            decide(Ended::Stopped(Stop::LeaseLost), 1, &policy(3)),
            Decision::Abandon
        ));
    }

    #[test]
    fn a_next_stage_in_another_pool_is_handed_over_without_an_attempt() {
        match decide(Ended::HandOver(2, "gpu".into()), 3, &policy(3)) {
            Decision::HandOver { next, pool } => {
                assert_eq!(next, 2);
                assert_eq!(pool, "gpu");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancelled_run_is_cancelled() {
        assert!(matches!(
            decide(Ended::Stopped(Stop::Cancelled), 2, &policy(3)),
            Decision::Cancel
        ));
    }
}
