//! The fetch loop: takes a free slot (semaphore permit), then a job, and
//! spawns the job's task with the permit; on shutdown it stops after its
//! current `BLMOVE` and puts back a job it still received. It also owns the
//! weighted queue order (`worker.queue_weights`) and the reconciliation of
//! this daemon's active lists with the runs it knows of.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::Health;
use super::runner::{self, JobEnv};
use crate::config::{Config, WorkerConfig};
use crate::queue::{Fetched, Next, QueuePlan};
use crate::retry::reconnect_backoff;

/// How often the fetch loop puts back entries of its active lists that no
/// run owns, even when no fetch failed.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Most jobs taken in one non-blocking round trip.
const FETCH_BATCH: usize = 64;

/// Queue weights of the weighted mode, in the order of `worker.queues`.
#[derive(Debug, Clone)]
struct Weights(Vec<f64>);

impl Weights {
    fn new(queues: &[String], weights: &std::collections::BTreeMap<String, u32>) -> Self {
        Self(
            queues
                .iter()
                .map(|q| f64::from(*weights.get(q).unwrap_or(&1)))
                .collect(),
        )
    }

    /// The queues (or their plans) in a random order where each queue
    /// comes first with a probability proportional to its weight (and so
    /// on for the rest): weighted sampling without replacement, by keys
    /// `u^(1/w)`.
    fn order<T: Clone>(&self, queues: &[T]) -> Vec<T> {
        let mut keyed: Vec<(f64, &T)> = queues
            .iter()
            .zip(&self.0)
            .map(|(q, w)| (fastrand::f64().powf(1.0 / w), q))
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed.into_iter().map(|(_, q)| q.clone()).collect()
    }
}

/// Where the fetch loop stands between two fetches.
#[derive(Debug)]
struct Turns {
    /// The next list of the blocking rotation ([`nth_list`]).
    turn: usize,
    /// How many jobs the next non-blocking pass asks for.
    probe: usize,
    /// The last BLMOVE timed out: the next fetch goes straight to the next
    /// list's BLMOVE.
    idle: bool,
}

/// Takes jobs while slots are free; see the module docs.
pub(super) struct Fetcher {
    env: Arc<JobEnv>,
    /// The queues fetched, in `worker.queues` order, each with the stage
    /// pools whose lists are read before its pending list (none when no
    /// stage names a pool other than the default); see [`plans`].
    plans: Vec<QueuePlan>,
    /// Weighted mode (`worker.queue_weights`); strict priority when `None`.
    weights: Option<Weights>,
    slots: Arc<Semaphore>,
    block: Duration,
    health: Arc<Health>,
    jobs: TaskTracker,
}

impl Fetcher {
    /// The fetch loop of `worker` for the jobs of `env`, spawning them on
    /// `jobs`.
    pub(super) fn new(
        w: &WorkerConfig,
        plans: Vec<QueuePlan>,
        env: Arc<JobEnv>,
        health: Arc<Health>,
        jobs: TaskTracker,
    ) -> Self {
        let queues: Vec<String> = plans.iter().map(|p| p.queue.clone()).collect();
        Self {
            weights: (!w.queue_weights.is_empty()).then(|| Weights::new(&queues, &w.queue_weights)),
            plans,
            slots: env.slots.clone(),
            block: Duration::from_millis(w.fetch_block_ms),
            env,
            health,
            jobs,
        }
    }

    pub(super) async fn run(self, shutdown: CancellationToken) {
        if self.plans.is_empty() {
            // Refused at the start (see `plans`); nothing to take.
            shutdown.cancelled().await;
            return;
        }
        let mut blocking = None;
        let mut backoff = reconnect_backoff();
        let mut failing = false;
        let mut turns = Turns {
            turn: 0,
            probe: 1,
            idle: false,
        };
        let mut reconciled = tokio::time::Instant::now();
        loop {
            let quiet = self.health.quiet();
            if !super::quiet::gate(quiet, &self.health, &self.env.stats, &shutdown).await {
                return;
            }
            let Some(permits) = self.take_slots(&shutdown).await else {
                return;
            };
            if permits.is_empty() || quiet.is_quiet() {
                // Quiet came while waiting for a slot: back to the gate.
                continue;
            }
            let result = self.fetch(permits.len(), &mut blocking, &mut turns).await;
            if shutdown.is_cancelled() || quiet.is_quiet() {
                // A job taken while the stop (or quiet) arrived is not
                // started: it goes back to pending, the next one taken.
                match result {
                    Ok(jobs) => self.put_back(jobs).await,
                    Err(_) => blocking = None,
                }
                if shutdown.is_cancelled() {
                    return;
                }
                // A put-back that failed, or a fetch whose reply was lost,
                // left entries in our active list that no run owns; a
                // quiet daemon may stay quiet for hours, so they are put
                // back now rather than at the next fetch.
                self.reconcile().await;
                reconciled = tokio::time::Instant::now();
                continue;
            }
            match result {
                Ok(jobs) => {
                    self.health.redis_ok();
                    self.spawn_jobs(jobs, permits);
                    if failing {
                        tracing::info!("fetch_resumed");
                        failing = false;
                        backoff = reconnect_backoff();
                        // A BLMOVE whose reply was lost may have moved a job
                        // into our active list with nobody told.
                        self.reconcile().await;
                        reconciled = tokio::time::Instant::now();
                    } else if reconciled.elapsed() >= RECONCILE_EVERY {
                        // The same, when a client retried a fetch by itself
                        // (the cluster client re-sends a command whose
                        // connection broke) and reported no error.
                        self.reconcile().await;
                        reconciled = tokio::time::Instant::now();
                    }
                }
                Err(err) => {
                    crate::telemetry::metrics::redis_error("fetch");
                    blocking = None;
                    turns.idle = false;
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(url = %self.env.broker.target(), error = %err, retry_in_ms = delay.as_millis() as u64, "fetch_failed");
                    failing = true;
                    drop(permits);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Waits for one free slot, then takes whatever other slots are free;
    /// none once the daemon is quiet (checked each second while waiting).
    async fn take_slots(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = loop {
            self.health.fetch_loop_alive();
            if self.health.quiet().is_quiet() {
                return Some(Vec::new());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                permit = self.slots.clone().acquire_owned() => break permit.ok()?,
                // All slots busy with long jobs is healthy: say so.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        let mut permits = vec![first];
        self.take_free(&mut permits);
        Some(permits)
    }

    fn take_free(&self, permits: &mut Vec<OwnedSemaphorePermit>) {
        while permits.len() < FETCH_BATCH {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
    }

    /// Up to `max` jobs without blocking, in priority order; when there are
    /// none, one blocking BLMOVE on one list (rotating over every list).
    /// While idle (the last BLMOVE timed out) the non-blocking pass is
    /// skipped: the rotation alone visits every list within
    /// `fetch_block_ms`, so an idle daemon sends one BLMOVE per block, not
    /// one LMOVE per list as well.
    async fn fetch(
        &self,
        max: usize,
        blocking: &mut Option<crate::queue::RedisConn>,
        turns: &mut Turns,
    ) -> redis::RedisResult<Vec<Fetched>> {
        if !turns.idle {
            let jobs = self.fetch_available(max, &mut turns.probe).await?;
            if !jobs.is_empty() {
                return Ok(jobs);
            }
        }
        let broker = &self.env.broker;
        // With several queues (and pool lists), each block is shorter so
        // that a job arriving on any list waits at most `fetch_block_ms` in
        // all (10 ms at least: past 100 lists at the default 1 s, a turn
        // takes longer).
        let lists: usize = self.plans.iter().map(|p| p.pools.len() + 1).sum();
        let block = (self.block / lists as u32).max(Duration::from_millis(10));
        let conn = match blocking {
            Some(conn) => conn,
            None => blocking.insert(broker.blocking_connection(self.block).await?),
        };
        // The turn goes over every list: each queue's pool lists, then its
        // pending list (weighted or not: weights choose among jobs when
        // there are more than slots, in the pass above).
        let (plan, pool) = nth_list(&self.plans, turns.turn % lists);
        let pool = plan.pools.get(pool).map(String::as_str);
        turns.turn = turns.turn.wrapping_add(1);
        self.health.fetch_loop_alive();
        let job = broker
            .fetch_blocking_from(conn, &plan.queue, pool, &self.env.worker_id, block)
            .await?;
        turns.idle = job.is_none();
        Ok(job.into_iter().collect())
    }

    /// The non-blocking pass: up to `max` jobs, in priority (or weighted)
    /// order. It asks for as many jobs as the queues have been giving
    /// (`probe`): after they ran dry one LMOVE a list probes them, and the
    /// batch doubles while it comes back full.
    async fn fetch_available(
        &self,
        max: usize,
        probe: &mut usize,
    ) -> redis::RedisResult<Vec<Fetched>> {
        let want = max.min(*probe);
        let weighted;
        let plans = match &self.weights {
            Some(w) => {
                weighted = w.order(&self.plans);
                &weighted
            }
            None => &self.plans,
        };
        // The latency of a fetch that finds jobs or not, without the
        // blocking wait for a job to arrive.
        let started = std::time::Instant::now();
        let jobs = self
            .env
            .broker
            .fetch_available_from(plans, &self.env.worker_id, want)
            .await?;
        crate::telemetry::metrics::fetched(started.elapsed());
        *probe = if jobs.len() == want {
            (*probe).max(want * 2).min(FETCH_BATCH)
        } else {
            jobs.len().max(1)
        };
        Ok(jobs)
    }

    fn spawn_jobs(&self, jobs: Vec<Fetched>, mut permits: Vec<OwnedSemaphorePermit>) {
        for job in jobs {
            let Some(permit) = permits.pop() else {
                // Cannot happen: never more jobs than permits are fetched.
                tracing::error!("fetch_overrun");
                break;
            };
            // Registered before the task starts: reconciliation must never
            // take a job in hand for an orphan.
            let guard = self.env.runs.register(&job.queue, &job.raw);
            let env = self.env.clone();
            self.jobs.spawn(async move {
                runner::handle(env, job, guard, permit).await;
            });
        }
    }

    /// Puts back on pending every entry of our active lists that no run
    /// owns. Runs in the fetch loop, between fetches, so every fetched entry
    /// is registered by then.
    async fn reconcile(&self) {
        let worker = &self.env.worker_id;
        let broker = &self.env.broker;
        for queue in self.plans.iter().map(|p| &p.queue) {
            let key = broker.keys().active(queue, worker);
            let mut conn = broker.conn();
            let entries: Vec<Vec<u8>> = match redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
            {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, "active_list_reconcile_failed");
                    return;
                }
            };
            for raw in entries {
                if self.env.runs.owns(queue, &raw) {
                    continue;
                }
                let moved = broker
                    .settle(queue, worker, &raw, "", "", Next::Requeue(&raw))
                    .await;
                if let Ok(true) = moved {
                    tracing::warn!(queue = %queue, "active_orphan_requeued");
                }
            }
        }
    }

    async fn put_back(&self, jobs: Vec<Fetched>) {
        let worker = &self.env.worker_id;
        // Newest first: each goes onto the consuming end of the list it came
        // from, so the oldest ends up there, taken first again, as it would
        // have been. One from a stage pool's list goes back there: it
        // continues a job that took its `rate` token, so it must not pass
        // through pending again.
        if !jobs.is_empty() {
            tracing::debug!(count = jobs.len(), "jobs_put_back");
        }
        for job in jobs.into_iter().rev() {
            let next = match &job.pool {
                Some(pool) => Next::ReturnToPool {
                    entry: &job.raw,
                    pool,
                },
                None => Next::Requeue(&job.raw),
            };
            let moved = self
                .env
                .broker
                .settle(&job.queue, worker, &job.raw, "", "", next)
                .await;
            if let Err(err) = moved {
                tracing::warn!(error = %err, "shutdown_putback_failed");
            }
        }
    }
}

/// List `n` of `plans` counted over each plan's pool lists, then its
/// pending list: the plan and the index of the pool in it (the pool count:
/// pending). `n` is less than the number of lists.
fn nth_list(plans: &[QueuePlan], mut n: usize) -> (&QueuePlan, usize) {
    for plan in plans {
        let lists = plan.pools.len() + 1;
        if n < lists {
            return (plan, n);
        }
        n -= lists;
    }
    (&plans[0], plans[0].pools.len())
}

/// Every queue this daemon serves, in `worker.queues` order, each with the
/// stage pool lists read before its pending ([`Config::pool_lists`]). Says
/// once (`queue_handover_only`) which queues' job types all run in pools
/// it does not serve (it will only hand their jobs over). `Err` (saying
/// why) when it serves none of the pools the config's stages run in.
pub(super) fn plans(config: &Config) -> Result<Vec<QueuePlan>, String> {
    let w = &config.worker;
    let pools = config.pool_lists().map_err(|runs_in| {
        format!(
            "this daemon serves pools {} and no stage of the config runs in them (they run in {}): \
             it could only hand every job over; serve one of those pools (`--pools`)",
            w.pools.join(","),
            runs_in.join(", ")
        )
    })?;
    for (queue, runs_in) in config.handover_only_queues() {
        tracing::warn!(queue = %queue, pools = ?w.pools, runs_in = ?runs_in,
            "queue_handover_only");
    }
    Ok(w.queues
        .iter()
        .map(|queue| QueuePlan {
            queue: queue.clone(),
            pools: pools.clone(),
        })
        .collect())
}

#[cfg(test)]
mod weight_tests {
    use super::*;

    #[test]
    fn weighted_order_puts_each_queue_first_by_its_share() {
        let queues: Vec<String> = ["high", "mid", "low"].map(String::from).into();
        let weights = [("high".to_owned(), 6), ("mid".to_owned(), 3)].into();
        let w = Weights::new(&queues, &weights);
        let mut first = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let order = w.order(&queues);
            assert_eq!(order.len(), 3);
            *first.entry(order[0].clone()).or_insert(0u32) += 1;
        }
        // Weights 6 : 3 : 1 (low is unlisted, so 1).
        let share = |q: &str| f64::from(first[q]) / 20_000.0;
        assert!((share("high") - 0.6).abs() < 0.03, "{first:?}");
        assert!((share("mid") - 0.3).abs() < 0.03, "{first:?}");
        assert!((share("low") - 0.1).abs() < 0.03, "{first:?}");
    }
}
