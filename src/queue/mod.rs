//! The Redis side of a queue: fetch, ack, requeue, dead-letter, recover.
//!
//! Life of a job in Redis (contract keys, `P:{Q}:` omitted):
//!
//! ```text
//!  producer LPUSH ─► pending ──BLMOVE/LMOVE──► active:<worker> ──LREM (ack)──► gone
//!                      ▲                           │
//!                      └──── requeue (RPUSH) ◄─────┤ shutdown, recovery
//!                                   dead ◄─────────┘ failure, poison (LPUSH)
//! ```
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

pub mod job;
pub mod keys;
pub mod scripts;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisResult};

pub use job::Job;
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

/// Where [`Broker::transition`] moves a job out of an active list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Back to the consuming end of the queue: it is the next job taken.
    Pending,
    /// To the dead list (newest first).
    Dead,
    /// Stays active, rewritten (e.g. with an assigned id).
    Active,
}

/// Handle on one Redis for one key prefix. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
}

impl Broker {
    /// Connects (failing fast when Redis is not reachable, so a bad URL or
    /// password stops the start with a clear error).
    pub async fn connect(url: &str, prefix: &str) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(Duration::from_secs(5));
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            client,
            conn,
            keys: Keys::new(prefix),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A clone of the shared command connection.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A new dedicated connection for blocking commands, whose response
    /// timeout exceeds the server-side block (redis-rs' 500 ms default would
    /// abandon a BLMOVE that the server still completes: a job moved into
    /// the active list with nobody told).
    pub async fn blocking_connection(&self, block: Duration) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + COMMAND_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A connection for SUBSCRIBE / PSUBSCRIBE.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.client.get_async_pubsub().await
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
        conn: &mut MultiplexedConnection,
        queue: &str,
        worker: &str,
        block: Duration,
    ) -> RedisResult<Option<Fetched>> {
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

    /// Removes a finished job from the active list. Returns whether it was
    /// still there.
    pub async fn ack(&self, queue: &str, worker: &str, raw: &[u8]) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("LREM")
            .arg(self.keys.active(queue, worker))
            .arg(1)
            .arg(raw)
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    /// Atomically removes `raw` from the active list and pushes `new` to
    /// `dest`. Returns false, pushing nothing, when `raw` was no longer there.
    pub async fn transition(
        &self,
        queue: &str,
        worker: &str,
        raw: &[u8],
        dest: Destination,
        new: &[u8],
    ) -> RedisResult<bool> {
        let (dest_key, side) = match dest {
            Destination::Pending => (self.keys.pending(queue), "R"),
            Destination::Dead => (self.keys.dead(queue), "L"),
            Destination::Active => (self.keys.active(queue, worker), "L"),
        };
        let mut conn = self.conn.clone();
        let moved: i64 = scripts::TRANSITION
            .key(self.keys.active(queue, worker))
            .key(dest_key)
            .arg(raw)
            .arg(new)
            .arg(side)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    /// Puts everything in a worker's active list for `queue` back on pending.
    pub async fn recover_active(&self, queue: &str, worker: &str) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        scripts::RECOVER
            .key(self.keys.active(queue, worker))
            .key(self.keys.pending(queue))
            .invoke_async(&mut conn)
            .await
    }

    /// Pushes a job for the daemons (what any producer's `LPUSH` does).
    pub async fn enqueue(&self, queue: &str, job_json: &str) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("LPUSH")
            .arg(self.keys.pending(queue))
            .arg(job_json)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }
}
