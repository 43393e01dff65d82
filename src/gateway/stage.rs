//! [`RemoteStage`]: the one stage of every remote job type in the
//! gateway's daemon.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::dispatch::{Dispatch, Event, Lease, lock};
use crate::pipeline::{BoxFuture, Stage, StageContext, StageError};

/// The stage of every remote job type in the API's daemon: hands the stage
/// to the remote worker holding (or about to claim) the job, and returns
/// what it reports.
pub struct RemoteStage {
    dispatch: Arc<Dispatch>,
}

impl RemoteStage {
    pub fn new(dispatch: Arc<Dispatch>) -> Self {
        Self { dispatch }
    }

    async fn run_stage(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let d = &self.dispatch;
        let job = d.enter(ctx);
        let last = d
            .types
            .get(&ctx.job_type)
            .and_then(|t| t.stages.last())
            .is_some_and(|s| s == &ctx.stage);
        let finished = lock(&job.state).finished.clone();
        if let Some(result) = finished {
            if last {
                d.end(&job, false);
            }
            return Ok(result);
        }
        let mut inbox = job.inbox.lock().await;
        loop {
            let deadline = lock(&job.state).lease.as_ref().map(|l| l.expires);
            let unclaimed = deadline.is_none() && lock(&job.state).done.is_empty();
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                event = inbox.recv() => match event {
                    Some(Event::Progress { percent, message }) => ctx.progress(percent, message),
                    Some(Event::StageDone { result }) => {
                        if last {
                            d.end(&job, false);
                        }
                        return Ok(result);
                    }
                    Some(Event::JobDone { result }) => {
                        if last {
                            d.end(&job, false);
                        }
                        return Ok(result);
                    }
                    Some(Event::Fail { error, retryable }) => {
                        d.end(&job, false);
                        return Err(if retryable {
                            StageError::retryable(error)
                        } else {
                            StageError::permanent(error)
                        });
                    }
                    Some(Event::Leased) => {}
                    Some(Event::Release) => {
                        d.end(&job, false);
                        tracing::info!(job_id = %ctx.job_id, stage = %ctx.stage, "remote_job_released");
                        return Err(StageError::interrupted());
                    }
                    None => return Err(StageError::retryable("remote job channel closed")),
                },
                // Shutting down: a job nobody holds goes back at once; a
                // held one may still be reported until the grace ends.
                _ = d.shutdown.cancelled(), if unclaimed => {
                    d.end(&job, false);
                    return Err(StageError::interrupted());
                }
                _ = ctx.cancel.cancelled() => {
                    let cancelled = d.was_cancelled(&job.queue, &ctx.job_id).await;
                    d.end(&job, cancelled);
                    return Err(StageError::interrupted());
                }
                _ = expiry => {
                    // Taken under the lock: no call can renew it after this.
                    let lapsed = {
                        let mut state = lock(&job.state);
                        match &state.lease {
                            Some(l) if l.expires <= Instant::now() => state.lease.take(),
                            _ => None,
                        }
                    };
                    if let Some(Lease { token, worker, .. }) = lapsed {
                        d.inner().tokens.remove(&token);
                        d.end(&job, false);
                        tracing::warn!(job_id = %ctx.job_id, worker = %worker, "remote_lease_expired");
                        return Err(StageError::retryable(format!(
                            "remote worker `{worker}` did not renew its lease within {} s",
                            d.ttl.as_secs()
                        )));
                    }
                }
            }
        }
    }
}

impl Stage for RemoteStage {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(self.run_stage(ctx))
    }
}
