//! Stage pools: a job whose current stage is in a pool this daemon does
//! not serve is handed over to that pool's list (`P:{Q}:pool:<name>`),
//! fenced by the delivery's lease like every settle. It counts no attempt,
//! no requeue and no crash: the job only changes hands. Handed over by the
//! first take (nothing ran here), nothing is written to SQLite; after a
//! stage ran here, the job is recorded `handed_over` first (done on this
//! host: it has its `finished_at`, for `conveyor cleanup`; its stage rows
//! keep what ran, its `stage` is the next one, whose row gets its pool)
//! and the entry carries the finished stages' results, as on a requeue, so
//! the daemon of the next pool resumes there.

use super::run::Run;
use crate::job::Status;
use crate::queue::Next;
use crate::store::HandedTo;
use crate::worker::events::JobHandedOver;

impl Run {
    /// The pool of stage `index` when this daemon does not run it.
    pub(super) fn foreign_pool(&self, index: usize) -> Option<String> {
        let stage = self.pipeline.stages.get(index)?;
        (!self.env.serves(&stage.pool)).then(|| stage.pool.clone())
    }

    /// Hands the job over before anything ran on this daemon: no SQLite
    /// record, no `job_started`.
    pub(super) async fn hand_over_unstarted(self, index: usize, pool: &str) {
        let entry = self.raw.clone();
        self.move_to_pool(index, pool, &entry, false).await;
    }

    /// Hands the job over after stages ran here, stage `index` being the
    /// next one: recorded `handed_over` in SQLite (done on this host, with
    /// the stage and pool it went to), then moved with its results.
    pub(super) async fn hand_over(mut self, index: usize, pool: &str) {
        let progress = self.events.high_water();
        let handed_to = HandedTo {
            index,
            stage: self.pipeline.stages[index].name.clone(),
            pool: pool.to_owned(),
        };
        let status = Status::HandedOver;
        if !self
            .finish_record_to(status, progress, None, Some(handed_to))
            .await
        {
            return;
        }
        self.job.meta.results = std::mem::take(&mut self.results);
        let entry = self.job.to_json().into_bytes();
        self.move_to_pool(index, pool, &entry, true).await;
    }

    async fn move_to_pool(&self, index: usize, pool: &str, entry: &[u8], ran: bool) {
        // Whole-job progress of the stages done: at the first take this
        // delivery has published nothing yet (its high-water mark is 0),
        // but earlier deliveries reached at least this much.
        let progress = self
            .events
            .high_water()
            .max(self.pipeline.overall_progress(index, 0.0));
        let event = JobHandedOver {
            stage: &self.pipeline.stages[index].name,
            pool,
            ran,
            progress,
        };
        event.announce(&self.events);
        if self
            .settle("hand over", Next::HandOver { entry, pool })
            .await
        {
            event.emit(&self.events);
        }
    }
}
