//! Inspection: what the queues hold, read from Redis, and the operator's
//! actions on the dead lists (revive, purge).
//!
//! Every read an operator tool makes of Redis is here, typed; the command
//! line and the dashboard reach it through [`crate::client::Client`] and
//! write no Redis command themselves (hibiken/asynq's `internal/rdb/inspect.go`
//! under its `Inspector` is the model).

use std::collections::{BTreeMap, BTreeSet};

use redis::{AsyncCommands, RedisResult};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Broker;
use crate::job::{META_FIELD, Meta};

/// A daemon's entry in `P:workers`: what the reaper needs once it is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub queues: Vec<String>,
    pub host: String,
}

/// A daemon's registration, `P:worker:<id>` (JSON, with a TTL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// Random per process: tells this run from an earlier one with the same id.
    pub instance: String,
    pub started_at: String,
    pub queues: Vec<String>,
    /// Stage pools it runs; empty from daemons older than pools (which
    /// serve the default pool only).
    #[serde(default)]
    pub pools: Vec<String>,
    pub concurrency: usize,
    #[serde(default)]
    pub running: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
    pub version: String,
    /// The registration's TTL (`dead_after_secs`) in ms: the heartbeat's
    /// age is this minus the key's PTTL, by Redis' clock. 0 from daemons
    /// older than the field.
    #[serde(default)]
    pub ttl_ms: u64,
    /// Taking no new jobs (SIGTSTP) as of its last heartbeat.
    #[serde(default)]
    pub quiet: bool,
}

/// One queue's depths.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub name: String,
    pub pending: u64,
    /// In the active lists of every registered worker.
    pub active: u64,
    pub scheduled: u64,
    pub dead: u64,
    /// Its stage pools: those its job types' stages name and those its
    /// live daemons serve, each with its list's depth and its daemons.
    pub pools: Vec<super::pools::PoolStatus>,
}

/// What `conveyor status` reports from Redis.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub queues: Vec<QueueStatus>,
    /// Workers whose registration has not expired.
    pub workers: Vec<WorkerInfo>,
}

/// One entry of a dead list, as stored.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    pub queue: String,
    pub raw: Vec<u8>,
}

impl DeadEntry {
    /// The job id, when the entry is a job object with one.
    pub fn id(&self) -> Option<String> {
        entry_id(&self.raw)
    }

    /// The entry as JSON; a message that was not JSON as `{"raw": text}`.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.raw)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&self.raw)}))
    }
}

/// What [`Broker::revive_entries`] did with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revival {
    /// Back on its queue's pending list; `id` is empty for a raw message.
    Requeued { queue: String, id: String },
    /// Not a job that can be revived (unreadable); left in place.
    Unreadable { queue: String },
    /// Gone from the dead list meanwhile (retried or purged by someone else).
    Gone,
}

/// Most entries of one queue's pending list or scheduled set that
/// [`Broker::waiting_jobs`] reads to filter and page through.
const WAITING_SCAN: isize = 10_000;

/// Which waiting jobs [`Broker::waiting_jobs`] lists.
#[derive(Debug, Clone, Default)]
pub struct WaitingQuery {
    /// One queue, or every known one.
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Only ids that contain this text.
    pub id_contains: Option<String>,
    /// Scheduled jobs due at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// The scheduled sets, else the pending lists.
    pub scheduled: bool,
    pub offset: usize,
    pub limit: usize,
}

/// The latest progress message of every running job (`P:live`).
#[derive(Debug, Clone, Default)]
pub struct LiveJobs {
    /// Messages of jobs whose daemon is alive, by job id.
    pub jobs: Vec<Value>,
    /// Entries left by daemons that are gone (killed mid-job).
    pub stale: usize,
}

impl Broker {
    /// Every queue in `configured` (served, or used by a job type) and
    /// every queue a registered daemon serves (from `P:workers`, so a dead
    /// daemon's queues count until it is reaped); sorted.
    pub async fn known_queues(&self, configured: &[String]) -> RedisResult<Vec<String>> {
        let mut queues: BTreeSet<String> = configured.iter().cloned().collect();
        let registry: Vec<String> = self.conn().hvals(self.keys().workers()).await?;
        for r in registry {
            if let Ok(r) = serde_json::from_str::<Registration>(&r) {
                queues.extend(r.queues);
            }
        }
        Ok(queues.into_iter().collect())
    }

    /// The registrations of the live workers, sorted by id.
    pub async fn live_workers(&self) -> RedisResult<Vec<WorkerInfo>> {
        self.registrations(&self.worker_ids().await?).await
    }

    /// Every id in `P:workers` (live or not yet reaped), sorted.
    async fn worker_ids(&self) -> RedisResult<Vec<String>> {
        let mut ids: Vec<String> = self.conn().hkeys(self.keys().workers()).await?;
        ids.sort();
        Ok(ids)
    }

    /// The registrations of `ids` that have not expired.
    async fn registrations(&self, ids: &[String]) -> RedisResult<Vec<WorkerInfo>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys();
        let regs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(ids.iter().map(|id| keys.worker(id)).collect::<Vec<_>>())
            .query_async(&mut self.conn())
            .await?;
        Ok(regs
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str::<WorkerInfo>(&r).ok())
            .collect())
    }

    /// Depths of [`Broker::known_queues`] and of their stage pools
    /// (`stage_pools`: queue -> pools its stages name; see
    /// [`super::pools::known_pools`]), and the live workers; one pipeline
    /// of counts, one more per queue for its pools.
    pub async fn status(
        &self,
        configured: &[String],
        stage_pools: &BTreeMap<String, BTreeSet<String>>,
    ) -> RedisResult<StatusReport> {
        let keys = self.keys();
        let ids = self.worker_ids().await?;
        let workers = self.registrations(&ids).await?;
        let names = self.known_queues(configured).await?;
        let mut pipe = redis::pipe();
        for q in &names {
            pipe.llen(keys.pending(q))
                .zcard(keys.scheduled(q))
                .llen(keys.dead(q));
            for id in &ids {
                pipe.llen(keys.active(q, id));
            }
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        let per_queue = 3 + ids.len();
        let mut queues = Vec::with_capacity(names.len());
        for (name, c) in names.into_iter().zip(counts.chunks(per_queue)) {
            let known = super::pools::known_pools(&name, stage_pools.get(&name), &workers);
            queues.push(QueueStatus {
                pools: self.pool_depths(&name, known).await?,
                name,
                pending: c[0],
                scheduled: c[1],
                dead: c[2],
                active: c[3..].iter().sum(),
            });
        }
        Ok(StatusReport { queues, workers })
    }

    /// Each worker's heartbeat age in ms, by Redis' clock (`None` for a
    /// daemon that does not say its TTL, or a registration gone meanwhile).
    pub async fn heartbeat_ages(&self, workers: &[WorkerInfo]) -> RedisResult<Vec<Option<u64>>> {
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for w in workers {
            pipe.pttl(self.keys().worker(&w.id));
        }
        let ttls: Vec<i64> = pipe.query_async(&mut self.conn()).await?;
        Ok(workers
            .iter()
            .zip(ttls.into_iter().chain(std::iter::repeat(-1)))
            .map(|(w, pttl)| {
                (w.ttl_ms > 0 && pttl >= 0).then(|| w.ttl_ms.saturating_sub(pttl as u64))
            })
            .collect())
    }

    /// Per queue: its pending, scheduled, dead and (this worker's) active
    /// lengths, as (queue, list, length) rows; one pipeline.
    pub async fn own_depths(
        &self,
        queues: &[String],
        worker_id: &str,
    ) -> RedisResult<Vec<(String, &'static str, u64)>> {
        let keys = self.keys();
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.llen(keys.pending(q))
                .zcard(keys.scheduled(q))
                .llen(keys.dead(q))
                .llen(keys.active(q, worker_id));
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        let lists = ["pending", "scheduled", "dead", "active"];
        Ok(queues
            .iter()
            .flat_map(|q| lists.iter().map(move |l| (q.clone(), *l)))
            .zip(counts)
            .map(|((q, l), n)| (q, l, n))
            .collect())
    }

    /// The latest progress message of a running job, from `P:live`.
    pub async fn live_message(&self, id: &str) -> RedisResult<Option<Value>> {
        let message: Option<String> = self.conn().hget(self.keys().live(), id).await?;
        Ok(message.and_then(|m| serde_json::from_str::<Value>(&m).ok()))
    }

    /// [`LiveJobs`]: `P:live`, split by whether the job's daemon is alive.
    pub async fn live_jobs(&self) -> RedisResult<LiveJobs> {
        let keys = self.keys();
        let mut conn = self.conn();
        let all: Vec<(String, String)> = conn.hgetall(keys.live()).await?;
        let messages: Vec<Value> = all
            .into_iter()
            .filter_map(|(_, m)| serde_json::from_str::<Value>(&m).ok())
            .collect();
        let workers: Vec<String> = messages
            .iter()
            .filter_map(|m| m.get("worker_id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut alive = BTreeSet::new();
        if !workers.is_empty() {
            let mut pipe = redis::pipe();
            for w in &workers {
                pipe.exists(keys.worker(w));
            }
            let exists: Vec<bool> = pipe.query_async(&mut conn).await?;
            alive.extend(
                workers
                    .iter()
                    .zip(exists)
                    .filter(|(_, e)| *e)
                    .map(|(w, _)| w.as_str()),
            );
        }
        let (mut jobs, stale): (Vec<Value>, Vec<Value>) = messages.into_iter().partition(|m| {
            m.get("worker_id")
                .and_then(Value::as_str)
                .is_some_and(|w| alive.contains(w))
        });
        jobs.sort_by(|a, b| a["job_id"].as_str().cmp(&b["job_id"].as_str()));
        Ok(LiveJobs {
            jobs,
            stale: stale.len(),
        })
    }

    /// Up to `limit` entries of each of `queues`' dead lists, newest first.
    pub async fn dead_list(&self, queues: &[String], limit: usize) -> RedisResult<Vec<DeadEntry>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        for q in queues {
            for raw in self.dead_entries(q, 0, stop).await? {
                out.push(DeadEntry {
                    queue: q.clone(),
                    raw,
                });
            }
        }
        Ok(out)
    }

    /// Dead entries of the chosen queues whose id is in `ids` (all when empty).
    pub async fn dead_matching(
        &self,
        queues: &[String],
        ids: &[String],
    ) -> RedisResult<Vec<DeadEntry>> {
        let mut out = Vec::new();
        for q in queues {
            for raw in self.dead_entries(q, 0, -1).await? {
                let wanted = ids.is_empty() || entry_id(&raw).is_some_and(|id| ids.contains(&id));
                if wanted {
                    out.push(DeadEntry {
                        queue: q.clone(),
                        raw,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Puts dead entries back on their queues with fresh attempts: the error
    /// is cleared, the epoch raised, finished stages' results kept (a raw
    /// message goes back as it was); `each` hears of every entry as it is done.
    pub async fn revive_entries(
        &self,
        entries: Vec<DeadEntry>,
        mut each: impl FnMut(&Revival),
    ) -> RedisResult<u64> {
        let mut n = 0;
        for DeadEntry { queue, raw } in entries {
            let Some((id, job)) = revived(&raw) else {
                each(&Revival::Unreadable { queue });
                continue;
            };
            if self.revive(&queue, &raw, &id, &job).await? {
                n += 1;
                each(&Revival::Requeued { queue, id });
            } else {
                each(&Revival::Gone);
            }
        }
        Ok(n)
    }

    /// Deletes the dead entries of `queues` whose id is in `ids`, or every
    /// entry when `ids` is empty; returns how many went.
    pub async fn purge_dead_matching(&self, queues: &[String], ids: &[String]) -> RedisResult<u64> {
        let mut n = 0;
        if ids.is_empty() {
            for q in queues {
                n += self.purge_dead(q).await?;
            }
        } else {
            for entry in self.dead_matching(queues, ids).await? {
                if self.remove_dead(&entry.queue, &entry.raw).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Pending or scheduled jobs of `queues`, in the order they will run (at
    /// most 10,000 per queue are read); one page, and how many match in all.
    pub async fn waiting_jobs(
        &self,
        queues: &[String],
        q: &WaitingQuery,
    ) -> RedisResult<(Vec<Value>, u64)> {
        let mut all = Vec::new();
        for queue in queues {
            for (entry, due) in self.waiting_entries(queue, q.scheduled).await? {
                if let Some(row) = waiting_row(queue, &entry, due, q) {
                    all.push(row);
                }
            }
        }
        let total = all.len() as u64;
        let page = all.into_iter().skip(q.offset).take(q.limit).collect();
        Ok((page, total))
    }

    /// The first [`WAITING_SCAN`] entries of a queue's scheduled set (with
    /// their due time) or pending list, in the order they will run.
    async fn waiting_entries(
        &self,
        queue: &str,
        scheduled: bool,
    ) -> RedisResult<Vec<(Vec<u8>, Option<u64>)>> {
        let mut conn = self.conn();
        if scheduled {
            let raw: Vec<(Vec<u8>, f64)> = conn
                .zrange_withscores(self.keys().scheduled(queue), 0, WAITING_SCAN - 1)
                .await?;
            return Ok(raw
                .into_iter()
                .map(|(e, due)| (e, Some(due as u64)))
                .collect());
        }
        // Daemons take from the right: the last entry runs first.
        let mut raw: Vec<Vec<u8>> = conn
            .lrange(self.keys().pending(queue), -WAITING_SCAN, -1)
            .await?;
        raw.reverse();
        Ok(raw.into_iter().map(|e| (e, None)).collect())
    }
}

/// A waiting entry as a row of [`Broker::waiting_jobs`], if `q` wants it.
fn waiting_row(queue: &str, entry: &[u8], due: Option<u64>, q: &WaitingQuery) -> Option<Value> {
    let v: Value = serde_json::from_slice(entry).unwrap_or(Value::Null);
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let id = v.get("id").and_then(Value::as_str).unwrap_or("");
    if q.kind.as_deref().is_some_and(|k| k != kind)
        || q.id_contains.as_deref().is_some_and(|s| !id.contains(s))
    {
        return None;
    }
    if let (Some(since), Some(due)) = (q.since_ms, due)
        && due < since
    {
        return None;
    }
    Some(json!({
        "id": id,
        "type": kind,
        "queue": queue,
        "status": if q.scheduled { "scheduled" } else { "pending" },
        "attempt": v.pointer("/_conveyor/attempt").and_then(Value::as_u64).unwrap_or(0),
        "due_at": due.map(crate::time::rfc3339_of_ms),
    }))
}

/// A dead entry as a job to push back with fresh attempts: the error is
/// cleared, the epoch raised (so SQLite lets it run again), and the results
/// of finished stages kept (they do not run again). An entry that was not a
/// job object (`raw`) goes back as it was.
fn revived(entry: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut object: serde_json::Map<String, Value> = serde_json::from_slice(entry).ok()?;
    if let Some(Value::String(raw)) = object.get("raw") {
        return Some((String::new(), raw.clone().into_bytes()));
    }
    if let Some(Value::String(b64)) = object.get("raw_base64") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return Some((String::new(), raw));
    }
    let meta: Meta = object
        .get(META_FIELD)
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let fresh = Meta {
        epoch: meta.epoch + 1,
        results: meta.results,
        ..Meta::default()
    };
    object.insert(META_FIELD.into(), serde_json::to_value(fresh).ok()?);
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Some((id, Value::Object(object).to_string().into_bytes()))
}

fn entry_id(entry: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(entry).ok()?;
    v.get("id").and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;

    #[test]
    fn revived_jobs_get_fresh_attempts_and_keep_results() {
        let entry = json!({"id":"j","type":"t","payload":1,
            "_conveyor":{"attempt":3,"results":{"a":1},"error":"boom","failed_at":"x","worker_id":"w","epoch":1}});
        let (id, job) = revived(entry.to_string().as_bytes()).unwrap();
        assert_eq!(id, "j");
        let job = Job::parse(&job, 1 << 20).unwrap();
        assert_eq!(job.meta.attempt, 0);
        assert_eq!(job.meta.epoch, 2);
        assert_eq!(job.meta.results["a"], 1);
        assert_eq!(job.meta.error, None);
        let (id, raw) = revived(
            json!({"raw":"{bad","_conveyor":{"error":"x"}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!((id.as_str(), raw.as_slice()), ("", &b"{bad"[..]));
    }

    #[test]
    fn waiting_rows_filter_by_type_id_and_due_time() {
        let q = WaitingQuery {
            kind: Some("a".into()),
            id_contains: Some("7".into()),
            since_ms: Some(1000),
            scheduled: true,
            ..WaitingQuery::default()
        };
        let entry = |kind: &str, id: &str| json!({"id": id, "type": kind}).to_string();
        assert!(waiting_row("q", entry("a", "x7").as_bytes(), Some(1000), &q).is_some());
        assert!(waiting_row("q", entry("b", "x7").as_bytes(), Some(1000), &q).is_none());
        assert!(waiting_row("q", entry("a", "x8").as_bytes(), Some(1000), &q).is_none());
        assert!(waiting_row("q", entry("a", "x7").as_bytes(), Some(999), &q).is_none());
        let row = waiting_row("q", entry("a", "x7").as_bytes(), Some(1000), &q).unwrap();
        assert_eq!(row["status"], "scheduled");
        assert_eq!(row["queue"], "q");
    }
}
