//! The job record: one HASH per job in Redis, `P:{Q}:job:<id>`, readable
//! from any host while the job lives and for `[history] retention_secs`
//! after it ends.
//!
//! The progress publisher ([`super::PublisherTask`]) is its only writer:
//! the messages it sends in one pipeline also write their jobs' records,
//! in one call of `record.lua` per queue in that pipeline (no extra round
//! trip, the records of a queue share its hash slot). Fields, each a JSON
//! object:
//! - `job`: the job's fields ([`JobFields`]): status, type, queue, attempt,
//!   progress, error, worker, times, the stage names, and `result_field`
//!   (where the job's result is: the last stage's field);
//! - `stage:<index>` (from 0): one stage ([`StageFields`]): status, times,
//!   attempt, the daemon that ran it (`worker_id`), its `pool`, result, error;
//! - `created_at`: when the record was first written (kept).
//!
//! While the job lives the record's TTL is the retention plus
//! [`LIVE_TTL_SECS`] (set when the record is made and each time the job
//! starts a run or waits again; a job lost with its daemon still goes
//! away). Once it ends (completed, failed, cancelled) the TTL is
//! the retention and the id enters the ZSET `P:{Q}:records` (score: end
//! ms), which `record.lua` trims to `[history] max_jobs`, oldest first.
//! [`read`] turns a record back into the [`JobRecord`] `conveyor job`
//! shows.

use std::sync::LazyLock;

use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{JobRecord, StageRecord};

/// A living job's record outlives the retention by this much (refreshed at
/// every write): long enough for any job that still runs or waits.
pub const LIVE_TTL_SECS: u64 = 7 * 86_400;

/// The script that writes one job's record.
pub static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("record.lua")));

/// HASH `P:{Q}:job:<id>`: the job's record.
pub fn key(prefix: &str, queue: &str, id: &str) -> String {
    format!("{}{id}", key_prefix(prefix, queue))
}

/// `P:{Q}:job:`, the start of every record key of the queue.
pub fn key_prefix(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{{{queue}}}:job:")
}

/// ZSET `P:{Q}:records`: the queue's ended records by end time (ms).
pub fn index_key(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{{{queue}}}:records")
}

/// The field of stage `index`.
pub fn stage_field(index: usize) -> String {
    format!("stage:{index}")
}

/// The `job` field.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobFields {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub queue: String,
    pub status: String,
    /// The progress event that wrote it last.
    pub event: String,
    pub attempt: u32,
    pub progress: f64,
    pub stage: Option<String>,
    pub error: Option<String>,
    pub worker_id: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    /// Every stage's name, in order (stage `i` is field `stage:<i>`).
    pub stages: Vec<String>,
    /// The field holding the job's result (the last stage's), once
    /// completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_field: Option<String>,
}

/// A `stage:<index>` field, without its result (see [`stage_json`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageFields {
    pub name: String,
    pub status: String,
    pub attempt: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub worker_id: String,
    /// The stage pool the stage runs in (`pool`, "default" when unset);
    /// empty in records written before pools were recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    pub error: Option<String>,
    /// The stage's result (JSON), once completed.
    #[serde(default)]
    pub result: Value,
}

/// A stage's field: `fields` with `result`, the stage's result as stored
/// (JSON text), spliced in without parsing it again.
pub fn stage_json(fields: &StageFields, result: Option<&str>) -> String {
    #[derive(Serialize)]
    struct NoResult<'a> {
        name: &'a str,
        status: &'a str,
        attempt: u32,
        started_at: &'a Option<String>,
        finished_at: &'a Option<String>,
        worker_id: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        pool: &'a str,
        error: &'a Option<String>,
    }
    let head = serde_json::to_string(&NoResult {
        name: &fields.name,
        status: &fields.status,
        attempt: fields.attempt,
        started_at: &fields.started_at,
        finished_at: &fields.finished_at,
        worker_id: &fields.worker_id,
        pool: &fields.pool,
        error: &fields.error,
    })
    .unwrap_or_else(|_| "{}".to_owned());
    let result = result.unwrap_or("null");
    // `head` is an object: its last byte is `}`.
    format!("{},\"result\":{result}}}", &head[..head.len() - 1])
}

/// Which of a job's record writes go through, so that a late message of
/// an earlier delivery (its publisher was slow, the job went on elsewhere)
/// does not undo what a later delivery wrote. Checked by `record.lua`
/// against the queue's leases and the record's `owner`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Fence {
    /// A delivery's message (its fencing token): written while the
    /// delivery holds the job's lease; once no delivery holds it, when this
    /// delivery wrote the record last (or none did), or for its first
    /// message.
    Delivery(String),
    /// A job dropped as it was taken (cancelled): written while no
    /// delivery holds the lease.
    Unleased,
    /// A message judged unrunnable (its id may be a living job's): makes a
    /// record, never overwrites one.
    #[default]
    OnlyNew,
}

impl Fence {
    fn arg(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Fence::Delivery(token) => format!("t:{token}").into(),
            Fence::Unleased => "u".into(),
            Fence::OnlyNew => "n".into(),
        }
    }
}

/// What a write does to the record's life: see `record.lua`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Opens {
    /// A message of a run under way.
    #[default]
    No = 0,
    /// The job waits again (requeued, handed over).
    Waits = 1,
    /// The delivery's first message (started, or handed over at once).
    First = 2,
}

/// One job's writes from one pipeline of messages.
#[derive(Debug, Default)]
pub(crate) struct Write {
    pub key: String,
    pub job_id: String,
    /// The job's fields (the last message's).
    pub job: String,
    pub stages: Vec<(String, String)>,
    /// When the job ended (ms); 0 while it lives.
    pub ended_ms: u64,
    /// The most a message among them opens: any but [`Opens::No`] gives
    /// the record the living TTL and takes it out of the index of ended
    /// records.
    pub opens: Opens,
    /// The last message's fence.
    pub fence: Fence,
    /// When the first of these messages was made (RFC 3339).
    pub first_at: String,
}

/// How long records live and how many a queue keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub retention_secs: u64,
    pub max_jobs: u64,
}

/// The `EVALSHA` of `record.lua` that writes `writes`, records of `queue`
/// (`EVAL` with `eval`, for a server that does not know the script yet),
/// fenced by `leases`, the queue's HASH of leases (`P:{Q}:leases`):
/// one call for every job of the queue in a pipeline.
pub(crate) fn command(
    writes: &[&Write],
    prefix: &str,
    queue: &str,
    leases: &str,
    bounds: Bounds,
    eval: bool,
) -> redis::Cmd {
    let mut cmd = if eval {
        let mut c = redis::cmd("EVAL");
        c.arg(include_str!("record.lua"));
        c
    } else {
        let mut c = redis::cmd("EVALSHA");
        c.arg(RECORD.get_hash());
        c
    };
    cmd.arg(2 + writes.len())
        .arg(index_key(prefix, queue))
        .arg(leases);
    for write in writes {
        cmd.arg(&write.key);
    }
    let retention_ms = bounds.retention_secs.saturating_mul(1000);
    let living_ms = (bounds.retention_secs + LIVE_TTL_SECS).saturating_mul(1000);
    cmd.arg(key_prefix(prefix, queue))
        .arg(bounds.max_jobs)
        .arg(retention_ms)
        .arg(living_ms);
    for write in writes {
        cmd.arg(&write.job_id)
            .arg(write.fence.arg().as_ref())
            .arg(write.opens as u8)
            .arg(write.ended_ms)
            .arg(&write.first_at)
            .arg(&write.job)
            .arg(write.stages.len());
        for (field, value) in &write.stages {
            cmd.arg(field).arg(value);
        }
    }
    cmd
}

impl Write {
    /// Adds a later message's writes of the same job.
    pub fn merge(&mut self, later: Write) {
        self.job = later.job;
        self.ended_ms = later.ended_ms;
        self.opens = self.opens.max(later.opens);
        self.fence = later.fence;
        for (field, value) in later.stages {
            match self.stages.iter_mut().find(|(f, _)| *f == field) {
                Some(slot) => slot.1 = value,
                None => self.stages.push((field, value)),
            }
        }
    }
}

/// The record of `id` on the first of `queues` that holds one, as
/// `conveyor job` shows it (`payload` and `attempts` are SQLite's only).
pub async fn read(
    conn: &mut crate::queue::RedisConn,
    prefix: &str,
    queues: &[String],
    id: &str,
) -> RedisResult<Option<JobRecord>> {
    if queues.is_empty() {
        return Ok(None);
    }
    let mut pipe = redis::pipe();
    for queue in queues {
        pipe.hgetall(key(prefix, queue, id));
    }
    let found: Vec<std::collections::HashMap<String, String>> = pipe.query_async(conn).await?;
    Ok(found.iter().find_map(parse))
}

/// A record's fields as a [`JobRecord`]; `None` without a readable `job`.
pub fn parse(fields: &std::collections::HashMap<String, String>) -> Option<JobRecord> {
    let job: JobFields = serde_json::from_str(fields.get("job")?).ok()?;
    let stages = job
        .stages
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let stage: Option<StageFields> = fields
                .get(&stage_field(i))
                .and_then(|s| serde_json::from_str(s).ok());
            let stage = stage.unwrap_or_else(|| StageFields {
                status: "pending".to_owned(),
                ..StageFields::default()
            });
            StageRecord {
                name: name.clone(),
                status: stage.status,
                attempt: stage.attempt,
                started_at: stage.started_at,
                finished_at: stage.finished_at,
                result: stage.result,
                error: stage.error,
                worker_id: (!stage.worker_id.is_empty()).then_some(stage.worker_id),
                pool: (!stage.pool.is_empty()).then_some(stage.pool),
            }
        })
        .collect();
    Some(JobRecord {
        id: job.id,
        kind: job.kind,
        queue: job.queue,
        status: job.status,
        attempt: job.attempt,
        max_attempts: None,
        progress: job.progress,
        stage: job.stage,
        error: job.error,
        worker_id: Some(job.worker_id),
        payload: Value::Null,
        created_at: fields.get("created_at").cloned().unwrap_or_default(),
        updated_at: job.updated_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        stages,
        attempts: Vec::new(),
        due_at: None,
        waiting: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_json_splices_the_result_and_parses_back() {
        let fields = StageFields {
            name: "voice".into(),
            status: "completed".into(),
            attempt: 2,
            started_at: Some("t0".into()),
            finished_at: Some("t1".into()),
            worker_id: "w1".into(),
            pool: "gpu".into(),
            error: None,
            result: Value::Null,
        };
        let text = stage_json(&fields, Some(r#"{"url":"s3://x","n":[1,2]}"#));
        let back: StageFields = serde_json::from_str(&text).unwrap();
        assert_eq!(back.result["url"], "s3://x");
        assert_eq!(back.worker_id, "w1");
        assert_eq!(back.pool, "gpu");
        assert_eq!(back.attempt, 2);
        let none: StageFields = serde_json::from_str(&stage_json(&fields, None)).unwrap();
        assert_eq!(none.result, Value::Null);
    }

    #[test]
    fn parse_lists_every_stage_and_pending_ones() {
        let job = JobFields {
            id: "j1".into(),
            kind: "t".into(),
            queue: "q".into(),
            status: "running".into(),
            stages: vec!["a".into(), "b".into()],
            worker_id: "w1".into(),
            ..JobFields::default()
        };
        let mut fields = std::collections::HashMap::new();
        fields.insert("job".to_owned(), serde_json::to_string(&job).unwrap());
        let a = StageFields {
            status: "completed".into(),
            worker_id: "w2".into(),
            pool: "gpu".into(),
            ..StageFields::default()
        };
        fields.insert("stage:0".to_owned(), stage_json(&a, Some("7")));
        let record = parse(&fields).unwrap();
        assert_eq!(record.stages.len(), 2);
        assert_eq!(record.stages[0].name, "a");
        assert_eq!(record.stages[0].result, serde_json::json!(7));
        assert_eq!(record.stages[0].worker_id.as_deref(), Some("w2"));
        assert_eq!(record.stages[0].pool.as_deref(), Some("gpu"));
        assert_eq!(record.stages[1].pool, None, "a stage not written yet");
        assert_eq!(record.stages[1].status, "pending");
        assert!(parse(&std::collections::HashMap::new()).is_none());
    }

    #[test]
    fn merge_keeps_the_last_job_and_each_stage_once() {
        let mut w = Write {
            job: "1".into(),
            stages: vec![("stage:0".into(), "a".into())],
            ..Write::default()
        };
        w.merge(Write {
            job: "2".into(),
            stages: vec![
                ("stage:0".into(), "b".into()),
                ("stage:1".into(), "c".into()),
            ],
            ended_ms: 5,
            ..Write::default()
        });
        assert_eq!(w.job, "2");
        assert_eq!(w.ended_ms, 5);
        assert_eq!(
            w.stages,
            vec![
                ("stage:0".into(), "b".into()),
                ("stage:1".into(), "c".into())
            ]
        );
    }
}
