//! Worker registration and heartbeat.
//!
//! A daemon owns `P:worker:<id>` (its registration, JSON, with a TTL of
//! `dead_after_secs`) and has an entry in `P:workers` (its queues, for the
//! reaper). The heartbeat refreshes the registration every
//! `heartbeat_secs`; a key that expired means the daemon is gone, and the
//! reaper recovers its jobs.
//!
//! Each beat also checks the leases of this daemon's running jobs and their
//! cancellation flags: a job whose lease is gone (this daemon was slow and
//! was taken for dead) is stopped without writing anything, a cancelled job
//! is stopped (the pub/sub message may have been missed).
//!
//! Two live daemons must never share an id: their active lists would be one
//! list. At start a daemon refuses an id whose registration belongs to a
//! live process, and takes over one whose process is dead on this host (its
//! own previous run, killed), recovering the jobs it left behind.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::inflight::StopReason;
use super::runner::{JobEnv, Stats};
use crate::queue::Broker;

use crate::queue::inspect::{Registration, WorkerInfo};

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "worker id `{id}` is in use by pid {pid} on host {host}; give each daemon its own --worker-id"
    )]
    InUse { id: String, pid: u32, host: String },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Registers `info`; see the module docs for the id rules. Returns whether
/// an earlier run of this id had left a registration behind.
pub async fn register(
    broker: &Broker,
    info: &WorkerInfo,
    ttl: Duration,
) -> Result<bool, RegisterError> {
    let key = broker.keys().worker(&info.id);
    let mut conn = broker.conn();
    let body = serde_json::to_string(info).unwrap_or_default();
    let ttl_ms = ttl.as_millis() as u64;
    let mut took_over = false;
    loop {
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&body)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            break;
        }
        let existing: Option<String> = conn.get(&key).await?;
        let Some(existing) = existing else { continue };
        match serde_json::from_str::<WorkerInfo>(&existing) {
            Ok(other) if other.host == info.host && !pid_alive(other.pid) => {
                tracing::warn!(previous_pid = other.pid, "worker_id_taken_over");
            }
            Ok(other) if other.instance == info.instance => {}
            Ok(other) => {
                return Err(RegisterError::InUse {
                    id: info.id.clone(),
                    pid: other.pid,
                    host: other.host,
                });
            }
            Err(_) => tracing::warn!("worker_registration_replaced"),
        }
        took_over = true;
        // Replace it only if it is still the one just judged.
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    }
    let _: () = conn
        .hset(broker.keys().workers(), &info.id, registration(info))
        .await?;
    Ok(took_over)
}

fn registration(info: &WorkerInfo) -> String {
    let r = Registration {
        queues: info.queues.clone(),
        host: info.host.clone(),
    };
    serde_json::to_string(&r).unwrap_or_default()
}

pub async fn deregister(broker: &Broker, id: &str) -> redis::RedisResult<()> {
    let mut conn = broker.conn();
    redis::pipe()
        .del(broker.keys().worker(id))
        .ignore()
        .hdel(broker.keys().workers(), id)
        .ignore()
        .query_async::<()>(&mut conn)
        .await
}

/// Refreshes the registration until cancelled.
pub struct Heartbeat {
    pub broker: Broker,
    pub info: WorkerInfo,
    pub every: Duration,
    pub ttl: Duration,
    pub env: Arc<JobEnv>,
    pub health: Arc<Health>,
}

impl Heartbeat {
    pub async fn run(mut self, token: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let env = self.env.clone();
            self.refresh_counts(&env.stats);
            match self.beat().await {
                Ok(expired) => {
                    self.health.heartbeat_ok();
                    if failing {
                        tracing::info!("heartbeat_restored");
                        failing = false;
                    }
                    if expired {
                        tracing::warn!("registration_expired");
                    }
                    self.check_runs().await;
                }
                Err(err) if !failing => {
                    tracing::warn!(url = %self.env.broker.target(), error = %err, "heartbeat_failed");
                    failing = true;
                }
                Err(_) => {}
            }
            let counts = format!(
                "{} running, {} completed, {} failed",
                self.info.running, self.info.completed, self.info.failed
            );
            match self.health.readiness(self.ttl) {
                Ok(()) => super::notify::status(&counts),
                Err(why) if why == super::health::QUIET => {
                    let quiet = super::quiet::status_line(self.info.running);
                    super::notify::status(&format!(
                        "{quiet}; {} completed, {} failed",
                        self.info.completed, self.info.failed
                    ));
                }
                Err(why) => super::notify::status(&format!("not ready: {why}; {counts}")),
            }
        }
    }

    /// Stops runs whose lease is gone or whose job was cancelled.
    async fn check_runs(&self) {
        let claims = self.env.runs.claims();
        let Ok(states) = self.env.broker.check_runs(&claims).await else {
            return;
        };
        for ((_, id, token), (holds_lease, cancelled)) in claims.iter().zip(states) {
            if !holds_lease {
                if self.env.runs.stop(id, Some(token), StopReason::LeaseLost) {
                    tracing::warn!(job_id = %id, "lease_lost");
                }
            } else if cancelled && self.env.runs.stop(id, Some(token), StopReason::Cancelled) {
                tracing::info!(job_id = %id, "cancel_flag_seen");
            }
        }
    }

    fn refresh_counts(&mut self, stats: &Stats) {
        self.info.running = stats.running.load(Ordering::Relaxed);
        self.info.completed = stats.completed.load(Ordering::Relaxed);
        self.info.failed = stats.failed.load(Ordering::Relaxed);
        self.info.quiet = self.health.quiet().is_quiet();
    }

    /// Refreshes the registration; returns whether it had expired.
    async fn beat(&self) -> redis::RedisResult<bool> {
        let mut conn = self.broker.conn();
        let body = serde_json::to_string(&self.info).unwrap_or_default();
        let keys = self.broker.keys();
        let (previous,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(keys.worker(&self.info.id))
            .arg(body)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .arg("GET")
            .hset(keys.workers(), &self.info.id, registration(&self.info))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(previous.is_none())
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
