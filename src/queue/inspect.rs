//! Inspection: what the queues hold, read from Redis, and the operator's
//! actions on the dead lists (revive, purge).
//!
//! Every read an operator tool makes of Redis is here, typed; the command
//! line and the dashboard reach it through [`crate::client::Client`] and
//! write no Redis command themselves (hibiken/asynq's `internal/rdb/inspect.go`
//! under its `Inspector` is the model).
//!
//! This file owns the status reads (queues' depths, live workers, running
//! jobs' latest messages); `dead` the dead lists (list, revive, purge) and
//! `waiting` the pending and scheduled jobs' listing. Stage pools' depths
//! and where a job waits among them are `super::pools`.

mod dead;
mod waiting;

use std::collections::{BTreeMap, BTreeSet};

use redis::{AsyncCommands, RedisResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Broker;
pub use dead::{DeadEntry, Revival};
pub use waiting::WaitingQuery;

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
}
