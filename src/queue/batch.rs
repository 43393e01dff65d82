//! Batches the claims and settles of one daemon's concurrent jobs.
//!
//! Every job claims its delivery and settles it once; at thousands of jobs
//! per second those are thousands of script calls, each a request, a Lua
//! setup and a reply. Job tasks hand them to one task instead, which sends
//! whatever is waiting as one `claim.lua` / `settle.lua` call per queue:
//! one round trip for a whole batch. While Redis works on a batch the next
//! one gathers, so a lone job waits for no timer.
//!
//! The scripts are the same `claim.lua` and `settle.lua` a single call
//! uses, with more items: the fencing rules are the same.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::RedisResult;
use tokio::sync::{mpsc, oneshot};

use super::{Broker, Claim, Next, settle_args};

/// Most items in one script call.
const BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Claim,
    Settle,
}

struct Request {
    kind: Kind,
    queue: String,
    /// The stage pool a "handover" settle pushes to (KEYS[9] of
    /// `settle.lua`): handovers to one pool are batched together.
    pool: Option<String>,
    args: Vec<Vec<u8>>,
    reply: oneshot::Sender<RedisResult<i64>>,
}

/// Handle used by job tasks. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
}

/// Owns the batching; ends when every [`Batcher`] handle is dropped.
pub struct BatcherTask {
    rx: mpsc::Receiver<Request>,
    broker: Broker,
    worker: String,
    round_trips: Arc<AtomicU64>,
}

impl Batcher {
    pub fn new(broker: Broker, worker: &str) -> (Self, BatcherTask) {
        let (tx, rx) = mpsc::channel(4 * BATCH);
        let task = BatcherTask {
            rx,
            round_trips: broker.round_trip_counter(),
            broker,
            worker: worker.to_owned(),
        };
        (Self { tx }, task)
    }

    async fn call(
        &self,
        kind: Kind,
        queue: &str,
        pool: Option<&str>,
        args: Vec<Vec<u8>>,
    ) -> RedisResult<i64> {
        let (reply, rx) = oneshot::channel();
        let closed = || redis::RedisError::from(std::io::Error::other("the batcher has stopped"));
        let request = Request {
            kind,
            queue: queue.to_owned(),
            pool: pool.map(str::to_owned),
            args,
            reply,
        };
        self.tx.send(request).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// [`Broker::claim`], batched.
    pub async fn claim(
        &self,
        queue: &str,
        raw: &[u8],
        keep: &[u8],
        job_id: &str,
        token: &str,
    ) -> RedisResult<Claim> {
        let args = vec![
            raw.to_vec(),
            keep.to_vec(),
            job_id.as_bytes().to_vec(),
            token.as_bytes().to_vec(),
        ];
        let code = self.call(Kind::Claim, queue, None, args).await?;
        Ok(super::claim_from_code(code))
    }

    /// [`Broker::settle`], batched.
    pub async fn settle(
        &self,
        queue: &str,
        raw: &[u8],
        job_id: &str,
        token: &str,
        next: Next<'_>,
    ) -> RedisResult<bool> {
        let args = settle_args(raw, job_id, token, next).into();
        let pool = next.pool();
        Ok(self.call(Kind::Settle, queue, pool, args).await? == 1)
    }
}

impl BatcherTask {
    pub async fn run(mut self) {
        let mut buf = Vec::with_capacity(BATCH);
        while self.rx.recv_many(&mut buf, BATCH).await > 0 {
            // Group by script, queue and pool list, keeping each group's
            // order.
            type Group = (Kind, String, Option<String>);
            let mut groups: HashMap<Group, Vec<Request>> = HashMap::new();
            for r in buf.drain(..) {
                let key = (r.kind, r.queue.clone(), r.pool.clone());
                groups.entry(key).or_default().push(r);
            }
            for ((kind, queue, pool), requests) in groups {
                self.send(kind, &queue, pool.as_deref(), requests).await;
            }
        }
    }

    async fn send(&self, kind: Kind, queue: &str, pool: Option<&str>, requests: Vec<Request>) {
        let mut invocation = match kind {
            Kind::Claim => self.broker.claim_invocation(queue, &self.worker),
            Kind::Settle => {
                let source = self.broker.keys().active(queue, &self.worker);
                self.broker.settle_invocation(&source, queue)
            }
        };
        if let Some(pool) = pool {
            invocation.key(self.broker.keys().pool(queue, pool));
        }
        for r in &requests {
            for a in &r.args {
                invocation.arg(a.as_slice());
            }
        }
        let mut conn = self.broker.conn();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let result: RedisResult<Vec<i64>> = invocation.invoke_async(&mut conn).await;
        match result {
            Ok(codes) if codes.len() == requests.len() => {
                for (r, code) in requests.into_iter().zip(codes) {
                    let _ = r.reply.send(Ok(code));
                }
            }
            Ok(codes) => {
                let err = redis::RedisError::from(std::io::Error::other(format!(
                    "batched script returned {} results for {} items",
                    codes.len(),
                    requests.len()
                )));
                for r in requests {
                    let _ = r.reply.send(Err(err.clone()));
                }
            }
            Err(err) => {
                // Each caller decides (retry when transient): claims are
                // idempotent, and a settle that did go through is found
                // settled (its lease gone) on the retry.
                for r in requests {
                    let _ = r.reply.send(Err(err.clone()));
                }
            }
        }
    }
}
