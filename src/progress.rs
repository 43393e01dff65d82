//! Progress publishing over Redis pub/sub.
//!
//! Every state change and progress report of a job is published as JSON on
//! `P:progress:<job_id>`. Publishing is fire-and-forget: a stage hands its
//! event to a bounded channel and goes on; one publisher task drains the
//! channel and sends what it holds as one pipeline. One task on one
//! connection, awaiting each pipeline before the next, keeps every job's
//! messages in order. When Redis is slow and the channel fills, events are
//! dropped (and counted) rather than blocking a stage: pub/sub is
//! at-most-once anyway, and SQLite is the source of truth.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::job::Status;
use redis::RedisResult;
use redis::aio::PubSub;

use crate::queue::{Broker, Keys, RedisConn};

/// Events waiting to be published before new ones are dropped.
const CHANNEL_CAPACITY: usize = 65_536;
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
}

/// One message on its way: channel, job id, body, and whether the job is
/// running (its entry in `P:live` is kept) or not (removed).
struct Outgoing {
    channel: String,
    job_id: String,
    body: String,
    running: bool,
}

/// Cheap handle used by job tasks to publish events.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outgoing>,
    keys: Keys,
    dropped: Arc<AtomicU64>,
}

impl Publisher {
    /// Creates the handle and the task that does the publishing; the task
    /// ends once every handle is dropped and the queue is drained.
    pub fn new(keys: Keys, conn: RedisConn, round_trips: Arc<AtomicU64>) -> (Self, PublisherTask) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = Self {
            tx,
            keys: keys.clone(),
            dropped: dropped.clone(),
        };
        let task = PublisherTask {
            live_key: keys.live(),
            rx,
            conn,
            dropped,
            round_trips,
        };
        (publisher, task)
    }

    pub fn publish(&self, event: &ProgressEvent) {
        self.publish_on(self.keys.progress(&event.job_id), event);
    }

    /// The job's channel name (to build once per job, see [`Publisher::publish_on`]).
    pub fn channel(&self, job_id: &str) -> String {
        self.keys.progress(job_id)
    }

    /// [`Publisher::publish`] on a channel name built once per job.
    pub fn publish_on(&self, channel: String, event: &ProgressEvent) {
        let body = match serde_json::to_string(event) {
            Ok(body) => body,
            Err(_) => return,
        };
        let outgoing = Outgoing {
            channel,
            job_id: event.job_id.clone(),
            body,
            running: event.status == Status::Running,
        };
        if self.tx.try_send(outgoing).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped so far because Redis could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Owns the publishing connection; see the module docs.
pub struct PublisherTask {
    rx: mpsc::Receiver<Outgoing>,
    /// `P:live`.
    live_key: String,
    conn: RedisConn,
    dropped: Arc<AtomicU64>,
    round_trips: Arc<AtomicU64>,
}

impl PublisherTask {
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut failures = 0u64;
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            // Per job of the batch: the index of its last message.
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
            let mut pipe = redis::pipe();
            for (i, out) in batch.iter().enumerate() {
                pipe.cmd("PUBLISH")
                    .arg(&out.channel)
                    .arg(&out.body)
                    .ignore();
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
            drop(last);
            if sets > 0 {
                pipe.add_command(set).ignore();
            }
            if dels > 0 {
                pipe.add_command(del).ignore();
            }
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            match pipe.query_async::<()>(&mut self.conn).await {
                Ok(()) => failures = 0,
                Err(err) => {
                    // Pub/sub is at-most-once: drop this batch and go on. Log
                    // the first failure of a streak and then every 100th, so
                    // an outage does not flood the log.
                    self.dropped
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if failures.is_multiple_of(100) {
                        tracing::warn!(error = %err, dropped = batch.len(), "progress_publish_failed");
                    }
                    failures += 1;
                }
            }
            batch.clear();
        }
    }
}
