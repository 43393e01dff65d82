//! Progress publishing over Redis pub/sub.
//!
//! Every state change and progress report of a job is published as JSON on
//! `P:progress:<job_id>`. Publishing is fire-and-forget: a stage hands its
//! event to a channel and goes on; one publisher task drains the channel
//! and sends what it holds as one pipeline. One task on one connection,
//! awaiting each pipeline before the next, keeps every job's messages in
//! order. When Redis is slow and [`CHANNEL_CAPACITY`] messages wait,
//! progress reports are dropped (and counted) rather than blocking a stage:
//! pub/sub is at-most-once anyway, and SQLite is the source of truth.
//!
//! The same pipeline keeps each running job's latest message in the HASH
//! `P:live` (job id -> message JSON), for a dashboard that opens late or
//! reconnects: a message with status `running` is stored (`HSET`), any
//! other status (completed, failed, cancelled, retrying: waiting in the
//! scheduled set, pending: requeued at shutdown) removes the entry (`HDEL`).
//! Within one pipeline only the last message of each job touches the hash,
//! as one `HSET` with every stored job and one `HDEL` with every removed
//! one: no extra round trip, and at most two more commands per pipeline.
//! A daemon killed mid-job leaves its entries behind until the job runs
//! again elsewhere; readers skip entries whose worker is not live.
//!
//! The same pipeline also writes each job's record (see [`record`]): one
//! `record.lua` call per queue with messages in the pipeline. Only `progress`
//! reports may be dropped when the channel is full: every state change
//! (job started, stage started/completed/failed, job completed, failed,
//! cancelled, retrying, requeued) is always queued, so the record never
//! misses one; they are few per job, which bounds the queue. A record write
//! refused by Redis is sent again, up to [`RECORD_TRIES`] times.

pub mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::HistoryConfig;
use crate::job::Status;
use redis::RedisResult;
use redis::aio::PubSub;
use serde_json::Value;

use crate::queue::{Broker, Keys, RedisConn};
use record::{Bounds, JobFields, Opens};

/// Events waiting to be published before new `progress` reports are
/// dropped (state changes are always queued).
const CHANNEL_CAPACITY: usize = 65_536;
/// Sends of a batch's record writes when Redis refuses them.
const RECORD_TRIES: u32 = 3;
/// Most events sent in one pipeline.
const BATCH: usize = 512;

/// A subscription to the progress messages of one job (`SUBSCRIBE` of its
/// channel: an ACL user allowed `&P:progress:*` may `PSUBSCRIBE` only that
/// very pattern), or of every job (`PSUBSCRIBE P:progress:*`), on a
/// connection of its own.
pub async fn subscribe(broker: &Broker, job_id: Option<&str>) -> RedisResult<PubSub> {
    let mut pubsub = broker.pubsub().await?;
    match job_id {
        Some(id) => pubsub.subscribe(broker.keys().progress(id)).await?,
        None => pubsub.psubscribe(broker.keys().progress_pattern()).await?,
    }
    Ok(pubsub)
}

/// One message on a job's progress channel (the contract's fields, plus
/// `event` naming what happened and `seq`, increasing within one run of the
/// job on one daemon).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub queue: String,
    pub status: Status,
    pub event: String,
    pub stage: Option<String>,
    pub stage_index: Option<usize>,
    pub stages_total: usize,
    /// Whole-job progress, 0-100, weighted by stage weights; never decreases.
    pub progress: f64,
    pub attempt: u32,
    pub worker_id: String,
    pub message: Option<String>,
    pub ts: String,
    pub seq: u64,
    /// `job_completed` only: the job's result (its last stage's), when it
    /// is at most `[history] max_message_result_bytes` of JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// `job_completed` only: the result is over that size and not here;
    /// `result_key` and `result_field` say where to read it (`HGET`; the
    /// field's JSON has it in `result`). No key when records are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_field: Option<String>,
}

/// What a message writes into its job's record besides the message's own
/// fields.
#[derive(Default)]
pub(crate) struct RecordParts<'a> {
    /// Every stage's name, in order.
    pub stage_names: &'a [String],
    /// When this delivery started.
    pub started_at: Option<&'a str>,
    /// The job's error (failed, retrying).
    pub error: Option<&'a str>,
    /// Stages' fields: index and JSON ([`record::stage_json`]).
    pub stages: Vec<(usize, String)>,
    /// The record only: nothing is published (a stage that failed or was
    /// interrupted: the job's own event follows).
    pub unpublished: bool,
    /// Which writes of the record go through.
    pub fence: record::Fence,
}

/// One message on its way: channel (none: the record only), job id, body,
/// whether the job is running (its entry in `P:live` is kept) or not
/// (removed), and what it writes into the job's record (none when records
/// are off).
struct Outgoing {
    channel: Option<String>,
    job_id: String,
    body: String,
    running: bool,
    record: Option<(String, record::Write)>,
    /// A marker of [`Publisher::flushed`]: told once the pipeline holding
    /// it (and every message queued before it) has been sent.
    flushed: Option<oneshot::Sender<()>>,
}

/// Cheap handle used by job tasks to publish events.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Outgoing>,
    keys: Keys,
    dropped: Arc<AtomicU64>,
    /// Messages queued and not yet taken by the task.
    queued: Arc<AtomicU64>,
    /// Record bounds; `None`: records are off.
    records: Option<Bounds>,
    max_message_result_bytes: usize,
}

impl Publisher {
    /// Creates the handle and the task that does the publishing; the task
    /// ends once every handle is dropped and the queue is drained.
    pub fn new(
        keys: Keys,
        conn: RedisConn,
        round_trips: Arc<AtomicU64>,
        history: &HistoryConfig,
    ) -> (Self, PublisherTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        let records = history.enabled().then_some(Bounds {
            retention_secs: history.retention_secs,
            max_jobs: history.max_jobs,
        });
        let publisher = Self {
            tx,
            keys: keys.clone(),
            dropped: dropped.clone(),
            queued: queued.clone(),
            records,
            max_message_result_bytes: history.max_message_result_bytes,
        };
        let task = PublisherTask {
            live_key: keys.live(),
            keys: keys.clone(),
            prefix: keys.prefix().to_owned(),
            rx,
            conn,
            dropped,
            queued,
            round_trips,
            records,
        };
        (publisher, task)
    }

    /// Whether job records are written.
    pub fn records_on(&self) -> bool {
        self.records.is_some()
    }

    /// Puts a completed job's result into its `job_completed` message, or,
    /// over `[history] max_message_result_bytes`, says where to read it.
    pub(crate) fn attach_result(&self, ev: &mut ProgressEvent, index: usize, result: &Value) {
        let size = serde_json::to_string(result).map_or(usize::MAX, |s| s.len());
        if size <= self.max_message_result_bytes {
            ev.result = Some(result.clone());
            return;
        }
        ev.result_truncated = Some(true);
        if self.records_on() {
            let prefix = self.keys.prefix();
            ev.result_key = Some(record::key(prefix, &ev.queue, &ev.job_id));
            ev.result_field = Some(record::stage_field(index));
        }
    }

    /// Publishes a message of a job with no progress stream (cancelled
    /// before it ran, dead-lettered unclaimed); its record too.
    pub(crate) fn publish(&self, event: &ProgressEvent, parts: RecordParts<'_>) {
        let channel = self.keys.progress(&event.job_id);
        self.send(channel, event, parts);
    }

    /// The job's channel name (to build once per job, see [`Publisher::publish_on`]).
    pub fn channel(&self, job_id: &str) -> String {
        self.keys.progress(job_id)
    }

    /// Publishes `event` on `channel` (a name built once per job) and
    /// writes it, with `parts`, into the job's record. A `progress` report
    /// is dropped when the queue is full; a state change never is.
    pub(crate) fn send(&self, channel: String, event: &ProgressEvent, parts: RecordParts<'_>) {
        let essential = event.event != "progress";
        if !essential && self.queued.load(Ordering::Relaxed) >= CHANNEL_CAPACITY as u64 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let body = if parts.unpublished {
            String::new()
        } else {
            match serde_json::to_string(event) {
                Ok(body) => body,
                Err(_) => return,
            }
        };
        let outgoing = Outgoing {
            channel: (!parts.unpublished).then_some(channel),
            job_id: event.job_id.clone(),
            body,
            running: event.status == Status::Running,
            record: self.records.map(|_| self.record_write(event, parts)),
            flushed: None,
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(outgoing).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The queue and the record write of one message.
    fn record_write(&self, ev: &ProgressEvent, parts: RecordParts<'_>) -> (String, record::Write) {
        let ended = ev.status.is_final();
        let completed = ev.status == Status::Completed;
        let fields = JobFields {
            id: ev.job_id.clone(),
            kind: ev.kind.clone(),
            queue: ev.queue.clone(),
            status: ev.status.as_str().to_owned(),
            event: ev.event.clone(),
            attempt: ev.attempt,
            progress: ev.progress,
            stage: ev.stage.clone(),
            error: parts
                .error
                .map(str::to_owned)
                .or_else(|| (ev.status == Status::Failed).then(|| ev.message.clone())?),
            worker_id: ev.worker_id.clone(),
            started_at: parts.started_at.map(str::to_owned),
            finished_at: ended.then(|| ev.ts.clone()),
            updated_at: ev.ts.clone(),
            stages: parts.stage_names.to_vec(),
            result_field: (completed && !parts.stage_names.is_empty())
                .then(|| record::stage_field(parts.stage_names.len() - 1)),
        };
        let prefix = self.keys.prefix();
        let write = record::Write {
            key: record::key(prefix, &ev.queue, &ev.job_id),
            job_id: ev.job_id.clone(),
            job: serde_json::to_string(&fields).unwrap_or_default(),
            stages: parts
                .stages
                .into_iter()
                .map(|(i, json)| (record::stage_field(i), json))
                .collect(),
            ended_ms: if ended {
                crate::time::now_ms().max(1)
            } else {
                0
            },
            // The delivery's first message: `job_started`, or its first one
            // (a handover at the first take; a rate-limit report before
            // `job_started` may have been dropped, so not by number alone).
            opens: if matches!(parts.fence, record::Fence::Delivery(_))
                && (ev.seq == 1 || ev.event == "job_started")
            {
                Opens::First
            } else if ev.status == Status::Pending || ev.event == "job_started" {
                Opens::Waits
            } else {
                Opens::No
            },
            fence: parts.fence,
            first_at: ev.ts.clone(),
        };
        (ev.queue.clone(), write)
    }

    /// Waits, at most `timeout`, until every message queued before this
    /// call has been sent to Redis (or its send has failed). Before a
    /// delivery lets another one take its job (a requeue, a retry, a
    /// handover), so that its record writes land before the next
    /// delivery's, which the record's fence would otherwise refuse (see
    /// `record.lua`). Returns at once when records are off.
    pub async fn flushed(&self, timeout: std::time::Duration) -> bool {
        if !self.records_on() {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        let marker = Outgoing {
            channel: None,
            job_id: String::new(),
            body: String::new(),
            running: false,
            record: None,
            flushed: Some(tx),
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(marker).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Events dropped so far because Redis could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Owns the publishing connection; see the module docs.
pub struct PublisherTask {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    /// `P:live`.
    live_key: String,
    /// The key prefix (`P`).
    prefix: String,
    keys: Keys,
    conn: RedisConn,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    round_trips: Arc<AtomicU64>,
    records: Option<Bounds>,
}

/// A batch's record writes, one per job, in the order of their first
/// message.
type Writes = Vec<(String, record::Write)>;

impl PublisherTask {
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut failures = 0u64;
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            self.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            let mut pipe = self.messages(&batch);
            let writes = merge_writes(&mut batch);
            let bounds = self.records.unwrap_or(Bounds {
                retention_secs: 0,
                max_jobs: 0,
            });
            for cmd in self.record_commands(&writes, bounds, false) {
                pipe.add_command(cmd).ignore();
            }
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            match pipe.query_async::<()>(&mut self.conn).await {
                Ok(()) => failures = 0,
                Err(err) if err.code() == Some("NOSCRIPT") => {
                    // The messages went out; the scripts wait for a load.
                    self.write_records(&writes, bounds).await;
                }
                Err(err) => {
                    // Pub/sub is at-most-once: drop this batch's messages and
                    // go on, but send the records again. Log the first
                    // failure of a streak and then every 100th, so an outage
                    // does not flood the log.
                    self.dropped
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if failures.is_multiple_of(100) {
                        tracing::warn!(error = %err, dropped = batch.len(), "progress_publish_failed");
                    }
                    failures += 1;
                    self.write_records(&writes, bounds).await;
                }
            }
            for out in &mut batch {
                if let Some(done) = out.flushed.take() {
                    let _ = done.send(());
                }
            }
            batch.clear();
        }
    }

    /// The batch's `PUBLISH`es and its `P:live` updates.
    fn messages(&self, batch: &[Outgoing]) -> redis::Pipeline {
        // Per job of the batch: the index of its last published message.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let mut pipe = redis::pipe();
        for (i, out) in batch.iter().enumerate() {
            let Some(channel) = &out.channel else {
                continue;
            };
            pipe.cmd("PUBLISH").arg(channel).arg(&out.body).ignore();
            last.insert(out.job_id.as_str(), i);
        }
        let (mut set, mut del) = (redis::cmd("HSET"), redis::cmd("HDEL"));
        set.arg(&self.live_key);
        del.arg(&self.live_key);
        let (mut sets, mut dels) = (0, 0);
        for &i in last.values() {
            let out = &batch[i];
            if out.running {
                set.arg(&out.job_id).arg(&out.body);
                sets += 1;
            } else {
                del.arg(&out.job_id);
                dels += 1;
            }
        }
        if sets > 0 {
            pipe.add_command(set).ignore();
        }
        if dels > 0 {
            pipe.add_command(del).ignore();
        }
        pipe
    }

    /// The batch's record writes: one `record.lua` call per queue.
    fn record_commands(&self, writes: &Writes, bounds: Bounds, eval: bool) -> Vec<redis::Cmd> {
        let mut queues: Vec<(&str, Vec<&record::Write>)> = Vec::new();
        for (queue, write) in writes {
            match queues.iter_mut().find(|(q, _)| q == queue) {
                Some((_, of_queue)) => of_queue.push(write),
                None => queues.push((queue, vec![write])),
            }
        }
        queues
            .iter()
            .map(|(queue, of_queue)| {
                let leases = self.keys.leases(queue);
                record::command(of_queue, &self.prefix, queue, &leases, bounds, eval)
            })
            .collect()
    }

    /// Sends the record writes again with the script's text (`EVAL`: the
    /// server may have lost it), up to [`RECORD_TRIES`] times.
    async fn write_records(&mut self, writes: &Writes, bounds: Bounds) {
        if writes.is_empty() {
            return;
        }
        for attempt in 1..=RECORD_TRIES {
            let mut pipe = redis::pipe();
            for cmd in self.record_commands(writes, bounds, true) {
                pipe.add_command(cmd).ignore();
            }
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            match pipe.query_async::<()>(&mut self.conn).await {
                Ok(()) => return,
                Err(err) if attempt == RECORD_TRIES => {
                    tracing::warn!(error = %err, jobs = writes.len(), "job_record_unwritten");
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    }
}

/// Takes the batch's record writes, merged per job and fence (its last
/// `job` field, each stage's last field, whether it ended by the last
/// message).
fn merge_writes(batch: &mut [Outgoing]) -> Writes {
    let mut writes: Writes = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for out in batch.iter_mut() {
        let Some((queue, write)) = out.record.take() else {
            continue;
        };
        // Merged into the job's last write when fenced alike (the same
        // delivery's messages); else a write of its own after it, so that
        // each is let through or not on its own.
        match at.get(&write.key) {
            Some(&i) if writes[i].1.fence == write.fence => writes[i].1.merge(write),
            _ => {
                at.insert(write.key.clone(), writes.len());
                writes.push((queue, write));
            }
        }
    }
    writes
}

#[cfg(test)]
mod tests;
