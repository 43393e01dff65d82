//! What happens to a message taken but never claimed (cancelled before it
//! ran, unrunnable): no progress stream, so each event builds its one
//! message.

use super::*;

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
