//! What clients and operators use on a queue: enqueue (now, later, or one
//! tick of a schedule), cancel, the live-job record of a job id, and the
//! dead list (list, revive, remove, purge).

use std::time::Duration;

use redis::{RedisResult, ScriptInvocation};

use super::{Broker, scripts};

impl Broker {
    /// Moves a dead-list entry back to pending as `job` (fresh attempts):
    /// the job's crash count and any cancellation are forgotten.
    pub async fn revive(
        &self,
        queue: &str,
        entry: &[u8],
        job_id: &str,
        job: &[u8],
    ) -> RedisResult<bool> {
        let source = self.keys.dead(queue);
        let mut invocation = self.settle_invocation(&source, queue);
        invocation
            .arg(entry)
            .arg(job_id)
            .arg("")
            .arg("revive")
            .arg(job)
            .arg(0);
        Ok(self.invoke_one(&invocation).await? == 1)
    }

    /// Asks for a job's cancellation: flags it on every given queue (a job
    /// taken later is dropped) and tells the daemons (a running one stops).
    pub async fn cancel(&self, queues: &[String], job_id: &str, now_ms: u64) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.hset(self.keys.cancelled(q), job_id, now_ms).ignore();
        }
        let message = serde_json::json!({ "cancel": job_id }).to_string();
        pipe.publish(self.keys.control(), message).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await
    }

    /// Entries of a dead list, newest first, from `start` to `stop` (inclusive).
    pub async fn dead_entries(
        &self,
        queue: &str,
        start: isize,
        stop: isize,
    ) -> RedisResult<Vec<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("LRANGE")
            .arg(self.keys.dead(queue))
            .arg(start)
            .arg(stop)
            .query_async(&mut conn)
            .await
    }

    /// Removes one dead entry; returns whether it was there.
    pub async fn remove_dead(&self, queue: &str, entry: &[u8]) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("LREM")
            .arg(self.keys.dead(queue))
            .arg(1)
            .arg(entry)
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    /// Empties a dead list; returns how many entries it held.
    pub async fn purge_dead(&self, queue: &str) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        let (n,): (u64,) = redis::pipe()
            .atomic()
            .llen(self.keys.dead(queue))
            .del(self.keys.dead(queue))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Enqueues one job (see `lua/enqueue.lua`): onto pending, or into
    /// scheduled when `when` is not [`When::Now`]. A job whose `id` is
    /// already pending, scheduled or running is not enqueued again: the
    /// answer then has `added == false` and the live job's state.
    pub async fn enqueue(
        &self,
        queue: &str,
        id: &str,
        kind: &str,
        job_json: &str,
        when: When,
    ) -> RedisResult<Enqueued> {
        let inv = self.enqueue_invocation(queue, id, kind, job_json, when);
        self.run_enqueue(inv).await
    }

    /// Enqueues the job of one tick of schedule `name`, unless that tick or
    /// a later one was enqueued already (by any daemon): then `added` is
    /// false and `status` is "fired".
    pub async fn enqueue_tick(
        &self,
        queue: &str,
        name: &str,
        tick_ms: u64,
        id: &str,
        kind: &str,
        job_json: &str,
    ) -> RedisResult<Enqueued> {
        let mut inv = self.enqueue_invocation(queue, id, kind, job_json, When::Now);
        inv.key(self.keys.schedules(queue)).arg(name).arg(tick_ms);
        self.run_enqueue(inv).await
    }

    /// The last tick of schedule `name` enqueued on `queue` (Unix ms).
    pub async fn last_tick(&self, queue: &str, name: &str) -> RedisResult<Option<u64>> {
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(self.keys.schedules(queue))
            .arg(name)
            .query_async(&mut conn)
            .await
    }

    fn enqueue_invocation(
        &self,
        queue: &str,
        id: &str,
        kind: &str,
        job_json: &str,
        when: When,
    ) -> ScriptInvocation<'static> {
        let (mode, ms) = match when {
            When::Now => ("now", 0),
            When::After(d) => ("delay", u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            When::At(ms) => ("at", ms),
        };
        let mut inv = scripts::ENQUEUE.prepare_invoke();
        inv.key(self.keys.pending(queue))
            .key(self.keys.scheduled(queue))
            .key(self.keys.leases(queue))
            .key(self.keys.unique(queue))
            .key(self.keys.cancelled(queue))
            .arg(id)
            .arg(job_json)
            .arg(mode)
            .arg(ms)
            .arg(kind);
        inv
    }

    async fn run_enqueue(&self, inv: ScriptInvocation<'_>) -> RedisResult<Enqueued> {
        let mut conn = self.conn.clone();
        self.trip();
        let (added, status, due_ms): (i64, String, u64) = inv.invoke_async(&mut conn).await?;
        Ok(Enqueued {
            added: added == 1,
            status,
            due_ms: (due_ms > 0).then_some(due_ms),
        })
    }

    /// What `enqueue` recorded for a live job id in `queue`, if anything.
    pub async fn unique_entry(&self, queue: &str, id: &str) -> RedisResult<Option<LiveEntry>> {
        let mut conn = self.conn.clone();
        let value: Option<String> = redis::cmd("HGET")
            .arg(self.keys.unique(queue))
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(value.map(|v| LiveEntry::parse(&v)))
    }
}

/// When an enqueued job becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Onto pending at once.
    Now,
    /// Scheduled this long after now, by Redis' clock.
    After(Duration),
    /// Scheduled for this Unix time in milliseconds.
    At(u64),
}

/// A live job as `enqueue` recorded it in `P:{Q}:unique`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEntry {
    /// "pending" or "scheduled" as enqueued (a scheduled job past its due
    /// time has been or is about to be promoted to pending).
    pub state: String,
    pub due_ms: Option<u64>,
    pub enqueued_ms: Option<u64>,
    pub kind: String,
}

impl LiveEntry {
    fn parse(v: &str) -> Self {
        let mut parts = v.splitn(4, ' ');
        let state = parts.next().unwrap_or("pending").to_owned();
        let mut ms = || {
            parts
                .next()
                .and_then(|d| d.parse().ok())
                .filter(|&n: &u64| n > 0)
        };
        let due_ms = ms();
        let enqueued_ms = ms();
        let kind = parts.next().unwrap_or("").to_owned();
        Self {
            state,
            due_ms,
            enqueued_ms,
            kind,
        }
    }
}

/// The answer of [`Broker::enqueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// False: a job with the same id is live; nothing was enqueued.
    pub added: bool,
    /// "pending" or "scheduled" (of the new job, or of the live one), or
    /// "running" (the live one).
    pub status: String,
    /// Due time (Unix ms) of a scheduled job.
    pub due_ms: Option<u64>,
}
