//! A fetched message up to its claim: poison goes to the dead-letter list,
//! a duplicate is dropped, a job cancelled before it ran is recorded and
//! dropped, and a claimed one becomes a [`Run`]. Also [`redis_op`], through
//! which every Redis state change of a job goes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::run::Run;
use super::{JobEnv, LOG_TARGET};
use crate::job::Job;
use crate::job::Status;
use crate::job::{Poison, poison_entry};
use crate::pipeline::Pipeline;
use crate::queue::{Broker, Claim, Fetched, Next};
use crate::retry::{is_transient, job_op_backoff};
use crate::store::RecordJob;
use crate::telemetry::metrics;
use crate::time::now_rfc3339;
use crate::worker::events::{JobCancelledUnstarted, JobDeadLettered};
use crate::worker::inflight::{RunGuard, RunStop};

/// Claims the delivery (giving an id-less job its id, so a redelivery after
/// a crash keeps it), then runs it unless it is a duplicate, cancelled or
/// quarantined.
pub(super) async fn claim_and_run(
    env: &Arc<JobEnv>,
    mut job: Job,
    fetched: Fetched,
    pipeline: Arc<Pipeline>,
    guard: &RunGuard,
    slot: OwnedSemaphorePermit,
) {
    let queue = fetched.queue;
    let original = fetched.raw;
    let from_pending = fetched.pool.is_none();
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
    let span = tracing::info_span!(target: LOG_TARGET, "job", job_id = %id, r#type = %job.kind,
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
                tracing::warn!(target: LOG_TARGET, "job_vanished");
            }
            Some(Claim::Duplicate) => {
                tracing::warn!(target: LOG_TARGET, "duplicate_running_dropped");
                redis_op(env, "drop duplicate", || {
                    env.batcher.settle(&queue, &original, &id, "", Next::Drop)
                })
                .await;
            }
            Some(Claim::Cancelled) => {
                cancel_unstarted(env, &job, &queue, &original, &pipeline).await
            }
            Some(Claim::Claimed { crashes }) => {
                guard.claimed(&id, &token, stop.clone());
                let mut run = Run::new(env.clone(), job, raw, queue, pipeline, token, stop);
                run.slot = Some(slot);
                run.from_pending = from_pending;
                run.start(crashes).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// A cancelled job taken before it ran: record it, drop the delivery.
async fn cancel_unstarted(env: &JobEnv, job: &Job, queue: &str, raw: &[u8], pipeline: &Pipeline) {
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
        JobCancelledUnstarted {
            job,
            queue,
            stage_names: &pipeline.stage_names,
            worker_id: &env.worker_id,
            at: now,
        }
        .emit(&env.publisher);
    }
}

/// Moves a message that cannot run to the dead-letter list, recording it in
/// SQLite first when it carries a valid id.
pub(super) async fn dead_letter_poison(env: &JobEnv, fetched: &Fetched, poison: Poison) {
    let now = now_rfc3339();
    let field = |name: &str| {
        poison
            .object
            .as_ref()
            .and_then(|o| o.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let id = field("id").filter(|id| crate::job::check_id(id).is_ok());
    let kind = field("type").unwrap_or_default();
    let reason = poison.reason.clone();
    let event = JobDeadLettered {
        queue: &fetched.queue,
        job_id: id.clone(),
        kind: kind.clone(),
        worker_id: &env.worker_id,
        reason: reason.clone(),
        bytes: fetched.raw.len(),
        at: now.clone(),
    };
    // Said before the writes: a Redis outage may hold the settle a long
    // time, and the log is where an operator learns of the bad message.
    event.noticed();
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
    event.emit(&env.publisher, &env.stats);
}

/// Runs one Redis state change of a job, retrying transient errors until
/// Redis answers (an outage only delays it), or until shutdown gives up on
/// Redis. `None` then: the job stays in the active list and is recovered
/// later (see the module docs).
pub(super) async fn redis_op<T, F, Fut>(env: &JobEnv, what: &str, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = job_op_backoff();
    let mut failures = 0u32;
    loop {
        // Raced with the give-up too: with Redis down, one call can wait
        // out the connection's own reconnect attempts. A call cut short may
        // still apply on the server, as one whose reply was lost: fencing
        // and recovery cover both.
        let result = tokio::select! {
            biased;
            _ = env.give_up.cancelled() => {
                tracing::error!(target: LOG_TARGET, op = what, "redis_call_given_up");
                return None;
            }
            result = op() => result,
        };
        match result {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(target: LOG_TARGET, op = what, failures, "redis_call_restored");
                }
                return Some(v);
            }
            Err(err) if is_transient(&err) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                // One line per outage step, not per attempt.
                if failures.is_power_of_two() || failures == 0 {
                    tracing::warn!(target: LOG_TARGET, error = %err, op = what,
                        retry_in_ms = delay.as_millis() as u64, "redis_call_failed");
                }
                failures += 1;
                metrics::redis_error(what);
                tokio::select! {
                    biased;
                    _ = env.give_up.cancelled() => {
                        tracing::error!(target: LOG_TARGET, op = what, "redis_call_given_up");
                        return None;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => {
                tracing::error!(target: LOG_TARGET, error = %err, op = what, "redis_call_refused");
                return None;
            }
        }
    }
}
