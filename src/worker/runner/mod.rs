//! The life of one delivery on this daemon.
//!
//! ```text
//! fetched ─parse─► poison? ───────────────────────────────► dead (reason)
//!            │
//!            └─► claim (lease token; id assigned) ─ duplicate / cancelled ─► dropped
//!                  │ current stage in a pool not served here? ─► that pool's list
//!                  │ crashed max_crashes times? ───────────► dead (quarantine)
//!                  ▼
//!               begin (SQLite: running; learn finished stages)
//!                  │ already finished? ─────────────────────► ack (duplicate)
//!                  ▼
//!               stages in order, from the first unfinished one
//!                  ├─ all done        ─► SQLite completed ─► ack
//!                  ├─ retryable fail  ─► SQLite retrying  ─► scheduled (backoff)
//!                  ├─ last/permanent  ─► SQLite failed    ─► dead
//!                  ├─ cancelled       ─► SQLite cancelled ─► ack
//!                  ├─ shutdown        ─► SQLite pending   ─► pending, with results
//!                  ├─ next stage in a pool not served here
//!                  │                  ─► SQLite pending   ─► that pool's list, with results
//!                  └─ lease lost      ─► nothing (another daemon has the job)
//! ```
//!
//! Every Redis change comes after the SQLite commit it depends on, and both
//! are fenced by the delivery's lease: a crash in between leaves the job in
//! the active list, it is delivered again, and `begin` recognises what was
//! done; a daemon that lost the lease writes nothing. Delivery is
//! at-least-once: a stage interrupted mid-run runs again, so stages must be
//! idempotent.
//!
//! This module holds what every job task shares and the entry point; the
//! parts of a delivery's life are in:
//! - `delivery`: a fetched message up to its claim (poison, duplicates,
//!   cancelled before it ran), and the Redis retry helper every state
//!   change goes through;
//! - `run`: the claimed delivery (`Run`) and its start in SQLite;
//! - `stages`: the stages in order, with their deadlines;
//! - `handover`: stage pools, a job handed over to the pool of its
//!   current stage (at its first take, or once a stage ran here);
//! - `limits`: waiting on a job type's `rate` and a stage's
//!   `max_concurrent`, with the job slot given back meanwhile;
//! - `outcome`: how the attempt ended, what that means (`decide`, pure)
//!   and carrying it out in SQLite and Redis.
//!
//! What each outcome logs, counts and publishes is in `worker::events`.

mod delivery;
mod handover;
mod limits;
mod outcome;
mod run;
mod stages;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::inflight::{InFlight, RunGuard};
use crate::job::{Job, Poison, SizeLimits};
use crate::pipeline::Registry;
use crate::progress::Publisher;
use crate::queue::batch::Batcher;
use crate::queue::{Broker, Fetched};
use crate::store::Store;
pub(crate) use outcome::Stop;

/// The target of every log line about a job, wherever in the runner (or in
/// [`super::events`]) it is written: `RUST_LOG` filters such as
/// `conveyor::worker::runner=warn` and log searches by target predate the
/// split of this module and must keep matching.
pub(crate) const LOG_TARGET: &str = module_path!();

/// What every job task of one daemon shares.
pub struct JobEnv {
    pub broker: Broker,
    /// Claims and settles go through it, batched per queue.
    pub batcher: Batcher,
    pub store: Store,
    pub publisher: Publisher,
    pub registry: Registry,
    pub worker_id: String,
    /// Stage pools this daemon runs (`worker.pools`): a job whose current
    /// stage is in another pool is handed over to that pool's list.
    pub pools: Vec<String>,
    pub max_job_bytes: usize,
    /// `worker.max_result_bytes`: the largest result a stage may return.
    pub max_result_bytes: usize,
    pub max_crashes: u32,
    pub kill_grace: Duration,
    /// Fires on SIGTERM: running stages may finish, no new stage starts.
    pub draining: CancellationToken,
    /// Fires when the shutdown grace period is over: stages are stopped.
    pub stop_stages: CancellationToken,
    /// Fires when shutdown stops waiting for Redis: state changes still
    /// pending give up (their jobs stay listed as active and are recovered).
    pub give_up: CancellationToken,
    pub runs: Arc<InFlight>,
    pub stats: Stats,
    /// The daemon's job slots (`concurrency`): a job holds one while it runs.
    pub slots: Arc<Semaphore>,
    /// Room for jobs waiting on a limit (a stage's `max_concurrent`, a job
    /// type's `rate`) with their slot given back: at most `concurrency`, so
    /// a daemon never takes more than twice its concurrency in hand.
    pub parking: Arc<Semaphore>,
}

impl JobEnv {
    /// Whether this daemon runs the stages of `pool`.
    pub(crate) fn serves(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p == pool)
    }
}

/// Counters for logs and systemd STATUS.
#[derive(Default)]
pub struct Stats {
    pub running: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub requeued: AtomicU64,
}

/// Handles one fetched entry to the end. Never panics on input.
pub async fn handle(
    env: Arc<JobEnv>,
    fetched: Fetched,
    guard: RunGuard,
    slot: OwnedSemaphorePermit,
) {
    env.stats.running.fetch_add(1, Ordering::Relaxed);
    // The producer's part keeps max_job_bytes; what the daemon carries
    // (finished stages' results) has room of its own.
    let limits = SizeLimits::carrying(
        env.max_job_bytes,
        env.max_result_bytes,
        env.registry.max_stages(),
    );
    match Job::parse_with(&fetched.raw, limits) {
        Err(poison) => delivery::dead_letter_poison(&env, &fetched, poison).await,
        Ok(job) => match env.registry.get(&job.kind).cloned() {
            None => {
                let reason = format!("unknown job type `{}`", job.kind);
                let object = Some(job.to_object());
                delivery::dead_letter_poison(&env, &fetched, Poison { reason, object }).await
            }
            Some(pipeline) => {
                delivery::claim_and_run(&env, job, fetched, pipeline, &guard, slot).await
            }
        },
    }
    env.stats.running.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_log_lines_keep_the_runner_target() {
        assert_eq!(super::LOG_TARGET, "conveyor::worker::runner");
    }
}
