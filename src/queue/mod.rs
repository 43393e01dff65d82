//! The Redis side of a queue: fetch, ack, requeue, dead-letter, recover.
//!
//! Life of a job in Redis (contract keys, `P:{Q}:` omitted):
//!
//! ```text
//!  producer LPUSH ─► pending ──BLMOVE/LMOVE──► active:<worker> ──LREM (ack)──► gone
//!                      ▲                           │
//!                      ├──── requeue (RPUSH) ◄─────┤ shutdown, recovery
//!   scheduled ─promote─┘                           │
//!       ▲                                          │
//!       └────────── retry (ZADD, Redis TIME) ◄─────┤ retryable failure
//!                                   dead ◄─────────┘ failure, poison (LPUSH)
//! ```
//!
//! Each delivery is fenced: [`Broker::claim`] records a token in
//! `P:{Q}:leases`, and every [`Broker::settle`] checks it. Recovery drops
//! the lease, so a daemon that was only slow can no longer ack, requeue or
//! dead-letter a job that was handed to another one.
//!
//! A job is always in exactly one list, so a crash at any point loses
//! nothing: whatever sits in a dead daemon's active list is put back.
//! Delivery is at-least-once; completion is deduplicated through SQLite.
//!
//! Connections: ordinary commands go through one [`ConnectionManager`]
//! (multiplexed, so concurrent jobs' commands share one socket and are
//! pipelined; it reconnects by itself). Blocking `BLMOVE` gets a dedicated
//! connection from [`Broker::blocking_connection`]: on a shared socket it
//! would stall every other command for the whole block.

pub mod batch;
pub mod conn;
pub mod inspect;
pub mod keys;
pub mod scripts;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{RedisResult, ScriptInvocation};

pub use conn::{Connector, RedisConn};

pub use keys::Keys;

/// Response timeout of ordinary commands. redis-rs defaults to 500 ms, which
/// turns a slow-but-alive Redis (a big AOF rewrite, a busy script) into
/// ambiguous errors; a few seconds rides that out.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A message taken from a pending list, as the exact bytes Redis holds: the
/// active-list entry is removed by value, so they must not be re-encoded.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub queue: String,
    pub raw: Vec<u8>,
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
fn claim_from_code(code: i64) -> Claim {
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
}

/// Handle on one Redis for one key prefix. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    connector: Connector,
    conn: RedisConn,
    keys: Keys,
    /// Round trips made through this handle (and its clones): what a job
    /// costs in Redis latency, reported at shutdown and by `conveyor bench`.
    round_trips: Arc<AtomicU64>,
}

impl Broker {
    /// Connects (failing fast when Redis is not reachable, so a bad URL or
    /// password stops the start with a clear error).
    pub async fn connect(url: &str, prefix: &str) -> RedisResult<Self> {
        Self::connect_with_retries(url, prefix, 6).await
    }

    /// [`Broker::connect`] with `retries` connection attempts before the
    /// first error is returned (the command line uses 0: it reports the
    /// real cause at once instead of waiting).
    pub async fn connect_with_retries(
        url: &str,
        prefix: &str,
        retries: usize,
    ) -> RedisResult<Self> {
        let client = open_client(url, None)?;
        Self::with_connector(Connector::Single(client), prefix, retries).await
    }

    /// [`Broker::connect_with_retries`] as `[redis]` says: mode, URLs,
    /// prefix and TLS files.
    pub async fn connect_config(
        redis: &crate::config::RedisConfig,
        retries: usize,
    ) -> RedisResult<Self> {
        let connector = Connector::new(redis, retries).await?;
        Self::with_connector(connector, &redis.prefix, retries).await
    }

    async fn with_connector(
        connector: Connector,
        prefix: &str,
        retries: usize,
    ) -> RedisResult<Self> {
        let conn = connector.shared(retries).await?;
        Ok(Self {
            connector,
            conn,
            keys: Keys::new(prefix),
            round_trips: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Round trips made so far by this handle and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The shared counter, for components with their own connection use.
    pub fn round_trip_counter(&self) -> Arc<AtomicU64> {
        self.round_trips.clone()
    }

    fn trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A clone of the shared command connection.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// A new dedicated connection for blocking commands, whose response
    /// timeout exceeds the server-side block (redis-rs' 500 ms default would
    /// abandon a BLMOVE that the server still completes: a job moved into
    /// the active list with nobody told).
    pub async fn blocking_connection(&self, block: Duration) -> RedisResult<RedisConn> {
        self.connector.dedicated(block + COMMAND_TIMEOUT).await
    }

    /// A connection for SUBSCRIBE / PSUBSCRIBE.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.connector.pubsub().await
    }

    /// Takes up to `max` jobs without blocking, from the first queue that has
    /// any, then the next ones in priority order. One round trip per queue
    /// visited (the LMOVEs are pipelined).
    pub async fn fetch_available(
        &self,
        queues: &[String],
        worker: &str,
        max: usize,
    ) -> RedisResult<Vec<Fetched>> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for queue in queues {
            let want = max - out.len();
            if want == 0 {
                break;
            }
            let (src, dst) = (self.keys.pending(queue), self.keys.active(queue, worker));
            let mut pipe = redis::pipe();
            for _ in 0..want {
                pipe.cmd("LMOVE")
                    .arg(&src)
                    .arg(&dst)
                    .arg("RIGHT")
                    .arg("LEFT");
            }
            self.trip();
            let got: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await?;
            out.extend(got.into_iter().flatten().map(|raw| Fetched {
                queue: queue.clone(),
                raw,
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
        self.trip();
        let raw: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(self.keys.pending(queue))
            .arg(self.keys.active(queue, worker))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(block.as_secs_f64())
            .query_async(conn)
            .await?;
        Ok(raw.map(|raw| Fetched {
            queue: queue.to_owned(),
            raw,
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
        for arg in settle_args(raw, job_id, token, next) {
            invocation.arg(arg);
        }
        Ok(self.invoke_one(&invocation).await? == 1)
    }

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
    async fn invoke_one(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<i64> {
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

    /// A new fencing token for a delivery to `worker`. The worker id prefix
    /// lets recovery tell the leases of a list's owner from others'.
    pub fn new_token(worker: &str) -> String {
        format!("{worker}/{}", quick_uuid_v7())
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
            When::After(d) => ("delay", d.as_millis() as u64),
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

/// A Redis client for `url`; for `rediss://`, with the CA and client
/// certificate files of `[redis]` when given (else the system's roots).
pub fn open_client(
    url: &str,
    tls: Option<&crate::config::RedisConfig>,
) -> RedisResult<redis::Client> {
    if !url.starts_with("rediss://") {
        return redis::Client::open(url);
    }
    // rustls needs a process-wide crypto provider; installing it twice is
    // harmless (the second call is refused).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cfg) = tls.filter(|c| c.tls_ca_file.is_some() || c.tls_cert_file.is_some()) else {
        return redis::Client::open(url);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            ))
        })
    };
    let root_cert = cfg.tls_ca_file.as_deref().map(read).transpose()?;
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
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

/// A UUIDv7 (time-ordered to the millisecond) whose random bits come from
/// `fastrand`. `Uuid::now_v7` reads the OS RNG (a `getrandom` syscall) on
/// every call, which showed up at ~1 % of daemon CPU on the per-job path.
/// Fencing tokens and generated job ids need uniqueness, not secrecy.
pub fn quick_uuid_v7() -> uuid::Uuid {
    let millis = crate::time::now_ms();
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_uuid_v7_is_v7_unique_and_time_ordered() {
        let a = quick_uuid_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = quick_uuid_v7();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert!(a < b, "{a} then {b}");
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| quick_uuid_v7()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
