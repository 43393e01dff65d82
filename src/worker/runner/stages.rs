//! The stages of a run, in order from the first unfinished one: each gets
//! its slot, its context (progress callback, cancellation, results so far)
//! and the tighter of its own and the job's deadline, and its end is
//! recorded in SQLite before the next one starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::LOG_TARGET;
use super::outcome::{Ended, Stop};
use super::run::Run;
use crate::pipeline::{FailureKind, ProgressFn, Stage, StageContext, StageError};
use crate::store::StageUpdate;
use crate::time::now_rfc3339;
use crate::worker::events::{StageEnd, StageFinished, StageStarted};
use crate::worker::inflight::StopReason;

/// A stage still running after this long is recorded as running in SQLite;
/// quicker ones only get their end recorded (with their start time), which
/// halves the writes of short stages.
const RECORD_RUNNING_AFTER: Duration = Duration::from_millis(20);

/// When a run must end, and the limit that sets it (for the message).
type Deadline = Option<(Instant, Duration)>;

impl Run {
    /// Runs the stages from `start` on; how the attempt ended.
    pub(super) async fn run_stages(&mut self, start: usize) -> Ended {
        let job_timeout = self
            .job
            .timeout_secs
            .map(Duration::from_secs)
            .or(self.pipeline.timeout);
        let job_deadline = job_timeout.map(|t| (Instant::now() + t, t));
        for index in start..self.pipeline.stages.len() {
            if self.stop.token.is_cancelled() {
                return Ended::Stopped(self.stop_cause());
            }
            // Stage pools: the next stage runs on a daemon of its pool.
            if let Some(pool) = self.foreign_pool(index) {
                return Ended::HandOver(index, pool);
            }
            // Draining: the stage that was running finished; the next one
            // would only be cut short by the end of the grace period, so the
            // job goes back now, resuming here on the next daemon.
            if self.env.draining.is_cancelled() {
                return Ended::Stopped(Stop::Shutdown);
            }
            // `max_concurrent`: held for the stage's run, dropped after it.
            let _slot = match self.stage_slot(index).await {
                Ok(slot) => slot,
                Err(stop) => return Ended::Stopped(stop),
            };
            if let Some(ended) = self.run_stage(index, job_deadline).await {
                return ended;
            }
        }
        Ended::Completed
    }

    /// Runs stage `index` and records its end; `Some` when the attempt ends
    /// with it (failed or stopped).
    async fn run_stage(&mut self, index: usize, job_deadline: Deadline) -> Option<Ended> {
        let pipeline = self.pipeline.clone();
        let stage = &pipeline.stages[index];
        let stage_started = Instant::now();
        let started_at = now_rfc3339();
        let at_start = pipeline.overall_progress(index, 0.0);
        StageStarted {
            stage: &stage.name,
            index,
            started_at: &started_at,
            attempt: self.attempt,
            progress: at_start,
        }
        .emit(&self.events);

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
        let ran = StageRan {
            index,
            name: &stage.name,
            started_at: &started_at,
            elapsed: stage_started.elapsed(),
        };
        self.stage_ended(ran, result).await
    }

    /// Records how the stage ended and says so; `Some` when the attempt
    /// ends with it.
    async fn stage_ended(
        &mut self,
        ran: StageRan<'_>,
        result: Result<Value, StageError>,
    ) -> Option<Ended> {
        let StageRan { index, name, .. } = ran;
        let result = result.and_then(|value| {
            let stored = value.to_string();
            let max = self.env.max_result_bytes;
            if stored.len() > max {
                return Err(StageError::permanent(format!(
                    "result of {} bytes is over worker.max_result_bytes ({max} bytes)",
                    stored.len()
                )));
            }
            Ok((value, stored))
        });
        let (end, ended) = match result {
            Ok((value, stored)) => {
                let done = self.pipeline.overall_progress(index + 1, 0.0);
                self.results.insert(name.to_owned(), value);
                let at = ran.started_at;
                self.record_stage(index, "completed", at, Some(stored.clone()), None, done)
                    .await;
                let end = StageEnd::Completed {
                    progress: done,
                    result: stored,
                };
                (end, None)
            }
            Err(err) if err.kind == FailureKind::Interrupted => {
                let cause = self.stop_cause();
                // A run that lost its lease writes nothing more.
                if cause != Stop::LeaseLost {
                    let at = self.events.high_water();
                    self.record_stage(index, "interrupted", ran.started_at, None, None, at)
                        .await;
                }
                (StageEnd::Interrupted { cause }, Some(Ended::Stopped(cause)))
            }
            Err(err) => {
                let at = self.events.high_water();
                let error = Some(err.message.clone());
                self.record_stage(index, "failed", ran.started_at, None, error, at)
                    .await;
                let failed = Ended::Failed(StageError {
                    kind: err.kind,
                    message: format!("stage `{name}` failed: {}", err.message),
                });
                let end = StageEnd::Failed {
                    error: err.message,
                    permanent: err.kind == FailureKind::Permanent,
                };
                (end, Some(failed))
            }
        };
        StageFinished {
            stage: name,
            index,
            started_at: ran.started_at,
            attempt: self.attempt,
            elapsed: ran.elapsed,
            end,
        }
        .emit(&self.events);
        ended
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
            events.progress(Some(index), overall, message);
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
            max_result_bytes: self.env.max_result_bytes,
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
            worker_id: self.env.worker_id.clone(),
            pool: self.pipeline.stages[index].pool.clone(),
            started_at: started_at.to_owned(),
            at: now_rfc3339(),
        };
        if let Err(err) = self.env.store.stage(update).await {
            tracing::error!(target: LOG_TARGET, error = %err, "stage_state_unrecorded");
        }
    }
}

/// A stage that has run: which, and when and for how long.
#[derive(Clone, Copy)]
struct StageRan<'a> {
    index: usize,
    name: &'a str,
    /// Its start, as recorded in SQLite.
    started_at: &'a str,
    elapsed: Duration,
}

/// Runs a stage; past the deadline it is cancelled (its processes stopped)
/// and the attempt fails with a retryable timeout.
async fn run_with_deadline(
    stage: &dyn Stage,
    ctx: &StageContext,
    deadline: Deadline,
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
