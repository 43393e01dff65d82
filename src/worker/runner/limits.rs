//! Waiting on limits: a job type's `rate` before the first stage (of a
//! delivery taken from pending: a stage continuing the job after a handover
//! to its pool takes no token), a stage's `max_concurrent` before that
//! stage. While a run waits it gives
//! its job slot back (when the parking lot has room), so other jobs run
//! meanwhile; shutdown, a cancellation or a lost lease ends the wait.

use super::delivery::redis_op;
use super::outcome::Stop;
use super::run::Run;
use crate::pipeline::limit::LimitPermit;
use crate::queue::Next;
use crate::worker::events::{JobRateLimited, StageWaiting};

impl Run {
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

    /// What stage `index` runs on: a job slot when it has no limit (`None`),
    /// else a slot of its `max_concurrent` limit, held for the stage's run.
    pub(super) async fn stage_slot(&mut self, index: usize) -> Result<Option<LimitPermit>, Stop> {
        let pipeline = self.pipeline.clone();
        let stage = &pipeline.stages[index];
        let Some(limit) = &stage.limit else {
            self.take_slot().await?;
            return Ok(None);
        };
        if let Ok(Some(permit)) = limit.try_acquire() {
            return Ok(Some(permit));
        }
        StageWaiting {
            stage: &stage.name,
            index,
            limit: limit.describe(),
            progress: self.pipeline.overall_progress(index, 0.0),
        }
        .emit(&self.events);
        let limit = limit.clone();
        let permit = self
            .wait_unslotted(async move { limit.acquire().await })
            .await?;
        Ok(Some(permit))
    }

    /// Before the job is handed over at its first take: its `rate` token
    /// when it came from pending (the pool's daemon takes none). False when
    /// it must not be handed over: stopped while waiting (shutdown or
    /// cancel: put back on pending unchanged, where the next take routes
    /// it again or drops it as cancelled), lease lost, Redis gone.
    pub(super) async fn rate_before_handover(&mut self) -> bool {
        match self.rate_limit_from_pending().await {
            Ok(()) => true,
            Err(Some(Stop::Shutdown | Stop::Cancelled)) => {
                self.settle("put back", Next::Requeue(&self.raw)).await;
                false
            }
            Err(_) => false,
        }
    }

    /// Waits until the job type's `rate` lets this delivery start, when it
    /// was taken from pending: a new job, or one requeued, retried or
    /// recovered (each such start takes a token); one taken from a pool
    /// list continues a job that took its token when it left pending.
    /// `Err(None)` when Redis gave up on us during shutdown.
    pub(super) async fn rate_limit_from_pending(&mut self) -> Result<(), Option<Stop>> {
        let Some((limit, window)) = self.pipeline.rate else {
            return Ok(());
        };
        if !self.from_pending {
            return Ok(());
        }
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
                JobRateLimited {
                    limit,
                    window,
                    wait,
                    kind: &self.job.kind,
                }
                .emit(&self.events);
            }
            self.wait_unslotted(tokio::time::sleep(wait))
                .await
                .map_err(Some)?;
        }
    }
}
