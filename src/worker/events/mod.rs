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

mod outcomes;
mod unclaimed;

pub(crate) use outcomes::{
    JobCancelled, JobCompleted, JobFailed, JobHandedOver, JobRateLimited, JobRequeued, JobRetrying,
    JobStarted, StageEnd, StageFinished, StageStarted, StageWaiting,
};
pub(crate) use unclaimed::{JobCancelledUnstarted, JobDeadLettered};
