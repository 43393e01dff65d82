//! What the runner and the daemon's background components use on a queue:
//! fetch (non-blocking and blocking), claim a delivery's lease, settle it
//! (ack, requeue, retry, dead-letter), recover active lists, promote due
//! retries, check running jobs' leases, and the per-type rate limit.

use std::time::Duration;

use redis::{RedisResult, ScriptInvocation};

use super::{Broker, RedisConn, scripts};

/// A message taken from a pending list, as the exact bytes Redis holds: the
/// active-list entry is removed by value, so they must not be re-encoded.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub queue: String,
    pub raw: Vec<u8>,
    /// The stage pool whose list (`P:{Q}:pool:<name>`) it was taken from:
    /// a job handed over, under way. `None`: taken from pending.
    pub pool: Option<String>,
}

/// A queue a daemon fetches, with the stage pools whose lists of it it
/// reads before pending (none: pending alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlan {
    pub queue: String,
    pub pools: Vec<String>,
}

impl QueuePlan {
    pub fn new(queue: &str, pools: &[&str]) -> Self {
        Self {
            queue: queue.to_owned(),
            pools: pools.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// The outcome of [`Broker::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The delivery holds the lease; daemons died `crashes` times while
    /// running this job before.
    Claimed { crashes: u32 },
    /// The entry is no longer in the active list.
    Gone,
    /// Another delivery of the same job id is live: this one is a duplicate.
    Duplicate,
    /// The job was cancelled before it ran.
    Cancelled,
}

/// Decodes one item's reply of `claim.lua`.
pub(super) fn claim_from_code(code: i64) -> Claim {
    match code {
        -1 => Claim::Gone,
        -2 => Claim::Duplicate,
        -3 => Claim::Cancelled,
        n => Claim::Claimed {
            crashes: u32::try_from(n).unwrap_or(u32::MAX),
        },
    }
}

/// One item's ARGV of `settle.lua` for `next` (a single settle and a batch
/// send the same).
pub(crate) fn settle_args(raw: &[u8], job_id: &str, token: &str, next: Next<'_>) -> [Vec<u8>; 6] {
    let (mode, entry, delay): (&str, &[u8], u64) = match next {
        Next::Finish => ("ack", b"", 0),
        Next::Drop => ("drop", b"", 0),
        Next::Dead(e) => ("dead", e, 0),
        Next::Requeue(e) => ("requeue", e, 0),
        Next::Retry { entry, delay_ms } => ("retry", entry, delay_ms),
        Next::HandOver { entry, .. } => ("handover", entry, 0),
        Next::ReturnToPool { entry, .. } => ("return", entry, 0),
    };
    [
        raw.to_vec(),
        job_id.as_bytes().to_vec(),
        token.as_bytes().to_vec(),
        mode.as_bytes().to_vec(),
        entry.to_vec(),
        delay.to_string().into_bytes(),
    ]
}

/// What [`Broker::settle`] does after removing a delivery.
#[derive(Debug, Clone, Copy)]
pub enum Next<'a> {
    /// The job is over (completed or cancelled): forget it.
    Finish,
    /// Only this delivery goes (a duplicate); the job itself is live elsewhere.
    Drop,
    /// To the dead list.
    Dead(&'a [u8]),
    /// Back to the consuming end of pending: it is the next job taken.
    Requeue(&'a [u8]),
    /// To the scheduled set, due `delay_ms` after Redis' clock now.
    Retry { entry: &'a [u8], delay_ms: u64 },
    /// To the far end of stage pool `pool`'s list (`LPUSH`; taken from the
    /// right like pending, so a pool list is FIFO: the job handed over
    /// first is taken first): the job's next stage runs on a daemon
    /// serving that pool. The pool list is the
    /// script's KEYS[9]: the batcher groups handovers by pool.
    HandOver { entry: &'a [u8], pool: &'a str },
    /// Back to the consuming end of stage pool `pool`'s list, where an
    /// entry never claimed was taken from (the daemon stops): taken next,
    /// as it would have been.
    ReturnToPool { entry: &'a [u8], pool: &'a str },
}

impl Next<'_> {
    /// The stage pool whose list this settle pushes onto, if any.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Next::HandOver { pool, .. } | Next::ReturnToPool { pool, .. } => Some(pool),
            _ => None,
        }
    }
}

impl Broker {
    /// Takes up to `max` jobs without blocking, from the first queue that has
    /// any, then the next ones in priority order. One round trip per queue
    /// visited (the LMOVEs are pipelined).
    pub async fn fetch_available(
        &self,
        queues: &[String],
        worker: &str,
        max: usize,
    ) -> RedisResult<Vec<Fetched>> {
        let plans: Vec<QueuePlan> = queues.iter().map(|q| QueuePlan::new(q, &[])).collect();
        self.fetch_available_from(&plans, worker, max).await
    }

    /// [`Broker::fetch_available`] for a daemon serving stage pools: per
    /// queue, in `plans`' order, the lists of its plan's pools first (jobs
    /// already under way finish first), then pending. One round trip per
    /// queue visited: a plan without pools pipelines LMOVEs on pending; one
    /// with pools takes from all its lists in one `fetch.lua` call.
    pub async fn fetch_available_from(
        &self,
        plans: &[QueuePlan],
        worker: &str,
        max: usize,
    ) -> RedisResult<Vec<Fetched>> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for plan in plans {
            let want = max - out.len();
            if want == 0 {
                break;
            }
            let queue = &plan.queue;
            let dst = self.keys.active(queue, worker);
            self.trip();
            // Each entry with the pool whose list it came from (`None`:
            // pending).
            let got: Vec<(Option<String>, Vec<u8>)> = if plan.pools.is_empty() {
                let mut pipe = redis::pipe();
                for _ in 0..want {
                    pipe.cmd("LMOVE")
                        .arg(self.keys.pending(queue))
                        .arg(&dst)
                        .arg("RIGHT")
                        .arg("LEFT");
                }
                let got: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await?;
                got.into_iter().flatten().map(|raw| (None, raw)).collect()
            } else {
                let mut invocation = scripts::FETCH.prepare_invoke();
                invocation.key(&dst);
                for pool in &plan.pools {
                    invocation.key(self.keys.pool(queue, pool));
                }
                invocation.key(self.keys.pending(queue)).arg(want);
                let taken: Vec<(usize, Vec<u8>)> = invocation.invoke_async(&mut conn).await?;
                taken
                    .into_iter()
                    .map(|(source, raw)| (plan.pools.get(source).cloned(), raw))
                    .collect()
            };
            out.extend(got.into_iter().map(|(pool, raw)| Fetched {
                queue: queue.clone(),
                raw,
                pool,
            }));
        }
        Ok(out)
    }

    /// Waits up to `block` (server side) for a job on one queue.
    pub async fn fetch_blocking(
        &self,
        conn: &mut RedisConn,
        queue: &str,
        worker: &str,
        block: Duration,
    ) -> RedisResult<Option<Fetched>> {
        self.fetch_blocking_from(conn, queue, None, worker, block)
            .await
    }

    /// [`Broker::fetch_blocking`] on stage pool `pool`'s list of the queue
    /// (`None`: pending).
    pub async fn fetch_blocking_from(
        &self,
        conn: &mut RedisConn,
        queue: &str,
        pool: Option<&str>,
        worker: &str,
        block: Duration,
    ) -> RedisResult<Option<Fetched>> {
        let src = match pool {
            Some(p) => self.keys.pool(queue, p),
            None => self.keys.pending(queue),
        };
        self.trip();
        let raw: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(src)
            .arg(self.keys.active(queue, worker))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(block.as_secs_f64())
            .query_async(conn)
            .await?;
        Ok(raw.map(|raw| Fetched {
            queue: queue.to_owned(),
            raw,
            pool: pool.map(str::to_owned),
        }))
    }

    /// Records the fencing token of a delivery just fetched (and, when
    /// `keep` differs from `raw`, rewrites the entry, e.g. with an assigned
    /// id). Checks for duplicates and cancellation in the same step.
    pub async fn claim(
        &self,
        queue: &str,
        worker: &str,
        raw: &[u8],
        keep: &[u8],
        job_id: &str,
        token: &str,
    ) -> RedisResult<Claim> {
        let mut invocation = self.claim_invocation(queue, worker);
        invocation.arg(raw).arg(keep).arg(job_id).arg(token);
        let codes = self.invoke_one(&invocation).await?;
        Ok(claim_from_code(codes))
    }

    /// Ends a delivery held in `worker`'s active list. `token` is the lease
    /// from [`Broker::claim`], or "" for a delivery never claimed. Returns
    /// false, changing nothing, when the lease is no longer current or the
    /// entry is gone: the job was handed to someone else.
    pub async fn settle(
        &self,
        queue: &str,
        worker: &str,
        raw: &[u8],
        job_id: &str,
        token: &str,
        next: Next<'_>,
    ) -> RedisResult<bool> {
        let source = self.keys.active(queue, worker);
        let mut invocation = self.settle_invocation(&source, queue);
        if let Some(pool) = next.pool() {
            invocation.key(self.keys.pool(queue, pool));
        }
        for arg in settle_args(raw, job_id, token, next) {
            invocation.arg(arg);
        }
        Ok(self.invoke_one(&invocation).await? == 1)
    }

    /// `claim.lua` with its keys, items to be added as ARGV.
    pub(crate) fn claim_invocation(&self, queue: &str, worker: &str) -> ScriptInvocation<'static> {
        let k = &self.keys;
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(k.active(queue, worker))
            .key(k.leases(queue))
            .key(k.crashes(queue))
            .key(k.cancelled(queue));
        inv
    }

    /// `settle.lua` with its keys for entries held in `source`.
    pub(crate) fn settle_invocation(&self, source: &str, queue: &str) -> ScriptInvocation<'static> {
        let k = &self.keys;
        let mut inv = scripts::SETTLE.prepare_invoke();
        inv.key(source)
            .key(k.leases(queue))
            .key(k.crashes(queue))
            .key(k.cancelled(queue))
            .key(k.pending(queue))
            .key(k.dead(queue))
            .key(k.scheduled(queue))
            .key(k.unique(queue));
        inv
    }

    /// Runs a one-item invocation of a batch script; its one code.
    pub(super) async fn invoke_one(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<i64> {
        let mut conn = self.conn.clone();
        self.trip();
        let codes: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        codes.first().copied().ok_or_else(|| {
            redis::RedisError::from(std::io::Error::other("script returned no result"))
        })
    }

    /// Puts everything in a worker's active list for `queue` back on pending,
    /// dropping the leases; `count_crashes` when that worker died.
    pub async fn recover_active(
        &self,
        queue: &str,
        worker: &str,
        count_crashes: bool,
    ) -> RedisResult<u64> {
        let k = &self.keys;
        let mut conn = self.conn.clone();
        scripts::RECOVER
            .key(k.active(queue, worker))
            .key(k.pending(queue))
            .key(k.leases(queue))
            .key(k.crashes(queue))
            .arg(if count_crashes { "1" } else { "0" })
            .arg(format!("{worker}/"))
            .invoke_async(&mut conn)
            .await
    }

    /// Moves up to `limit` due jobs from scheduled to pending.
    pub async fn promote(&self, queue: &str, limit: usize) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        scripts::PROMOTE
            .key(self.keys.scheduled(queue))
            .key(self.keys.pending(queue))
            .arg(limit)
            .invoke_async(&mut conn)
            .await
    }

    /// For each `(queue, job id, token)`: whether the token is still the
    /// job's lease, and whether the job was cancelled. One round trip.
    pub async fn check_runs(
        &self,
        runs: &[(String, String, String)],
    ) -> RedisResult<Vec<(bool, bool)>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (queue, id, _) in runs {
            pipe.hget(self.keys.leases(queue), id)
                .hexists(self.keys.cancelled(queue), id);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<(Option<String>, bool)> = pipe.query_async(&mut conn).await?;
        Ok(runs
            .iter()
            .zip(replies)
            .map(|((_, _, token), (lease, cancelled))| {
                (lease.as_deref() == Some(token.as_str()), cancelled)
            })
            .collect())
    }

    /// Records a start of `job_type` under its rate limit (`limit` starts per
    /// `window`), or says how long to wait: `Ok(None)` = go.
    pub async fn rate_take(
        &self,
        job_type: &str,
        limit: u32,
        window: Duration,
        token: &str,
    ) -> RedisResult<Option<Duration>> {
        let mut conn = self.conn.clone();
        self.trip();
        let wait_ms: u64 = scripts::RATE
            .key(self.keys.rate(job_type))
            .arg(limit)
            .arg(window.as_millis() as u64)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
    }
}
