//! `[worker]` (what a daemon serves and its timings), `[store]` (the SQLite
//! file) and `[retry]` (the retry policy and its backoff), with their
//! checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError, JobTypeConfig, check_name, hostname, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Stable id of this daemon; its active lists are named after it, so a
    /// daemon restarted with the same id recovers its own in-flight jobs.
    /// Default: the host name.
    pub id: Option<String>,
    /// Queues served, in strict priority order (unless `queue_weights`).
    pub queues: Vec<String>,
    /// Weighted mode: each fetch visits the queues in a random order drawn
    /// by these weights (queue -> weight, 1 for a queue not listed), so a
    /// low queue gets its share even while higher ones are full.
    pub queue_weights: BTreeMap<String, u32>,
    /// Stage pools this daemon runs (a stage's `pool`); a job whose next
    /// stage is in another pool is handed over to that pool's list.
    pub pools: Vec<String>,
    /// Jobs run at once by this daemon.
    pub concurrency: usize,
    /// On SIGTERM, how long running stages may go on before they are stopped
    /// and their jobs put back.
    pub shutdown_grace_secs: u64,
    /// How long a stage process gets between SIGTERM and SIGKILL.
    pub kill_grace_secs: u64,
    /// How often the daemon refreshes its registration in Redis.
    pub heartbeat_secs: u64,
    /// A daemon whose registration is older than this is considered gone.
    pub dead_after_secs: u64,
    /// Server-side block of one BLMOVE when the queues are empty. It bounds
    /// how long shutdown waits for the fetcher, because a BLMOVE cannot be
    /// cancelled from the client without risking a lost reply.
    pub fetch_block_ms: u64,
    /// What a producer may push: a message whose envelope without
    /// `_conveyor` is larger than this is dead-lettered (without being
    /// parsed when the whole message is larger).
    pub max_job_bytes: usize,
    /// Largest result a stage may return (its compact JSON); a larger one
    /// fails the stage permanently. It also bounds a stage program's
    /// protocol lines on stdout, and, times the stages of a job type, what a
    /// message the daemon requeues may carry beyond `max_job_bytes`.
    pub max_result_bytes: usize,
    /// A job whose daemon died this many times while running it goes to the
    /// dead list instead of being run again (and crashing the next daemon).
    pub max_crashes: u32,
    /// How often scheduled jobs (retries) that are due move to pending.
    pub promote_interval_ms: u64,
    /// Address of the daemon's HTTP listener (`/healthz`, `/readyz`,
    /// `/metrics`), e.g. "127.0.0.1:9464"; none when unset.
    pub http: Option<String>,
}

/// 16 MiB: results are JSON that travels whole through Redis (in a requeued
/// job), SQLite and every later stage's stdin; 16 times the producer limit
/// covers generous summaries and manifests, while a daemon at concurrency 64
/// holding one such result per job stays around a gigabyte at worst. Bulk
/// data belongs in files or object storage, referenced from the result.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;
/// Upper bound of `worker.max_result_bytes`: Redis refuses bulk strings
/// over 512 MB, and a requeued job carries its results in one.
pub const MAX_RESULT_BYTES_CAP: usize = 256 * 1024 * 1024;

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            queues: vec!["default".into()],
            queue_weights: BTreeMap::new(),
            pools: vec![super::DEFAULT_POOL.into()],
            concurrency: 5,
            shutdown_grace_secs: 20,
            kill_grace_secs: 5,
            heartbeat_secs: 2,
            dead_after_secs: 15,
            fetch_block_ms: 1000,
            max_job_bytes: 1024 * 1024,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_crashes: 3,
            promote_interval_ms: 1000,
            http: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite file shared by the daemons of one host.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "data/conveyor.db".into(),
        }
    }
}

/// Retry defaults; a job type, and a job, may override each of them.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all (the first run included) before the job goes to dead.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles with each attempt, with
    /// jitter (a random 50-100 % of it, so retries of a batch spread out).
    pub backoff_ms: u64,
    /// Longest delay between attempts.
    pub backoff_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 1000,
            backoff_max_ms: 600_000,
        }
    }
}

impl RetryConfig {
    /// Delay before attempt `failed + 1`, `failed` >= 1, before jitter:
    /// `backoff_ms * 2^(failed-1)`, at most `backoff_max_ms`.
    pub fn delay_ms(&self, failed: u32) -> u64 {
        let factor = 1u64
            .checked_shl(failed.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.backoff_ms
            .saturating_mul(factor)
            .min(self.backoff_max_ms)
    }

    /// [`Self::delay_ms`] with jitter: uniformly 50-100 % of it.
    pub fn jittered_delay_ms(&self, failed: u32) -> u64 {
        let d = self.delay_ms(failed);
        d / 2 + fastrand::u64(0..=d - d / 2)
    }
}

impl Config {
    /// The worker id in force: configured, or the host name.
    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(hostname)
    }

    /// Every pool a stage of `queue` names (the default pool included when
    /// a stage has no `pool`), sorted.
    pub fn stage_pools(&self, queue: &str) -> BTreeSet<String> {
        self.jobs
            .values()
            .filter(|job| job.queue == queue && !job.remote)
            .flat_map(|job| job.stages.iter().map(|s| s.pool().to_owned()))
            .collect()
    }

    /// Every pool a stage of the config's (local) job types runs in, the
    /// default pool included when a stage has no `pool`.
    pub fn config_pools(&self) -> BTreeSet<String> {
        self.jobs
            .values()
            .filter(|job| !job.remote)
            .flat_map(|job| job.stages.iter().map(|s| s.pool().to_owned()))
            .collect()
    }

    /// The stage pool lists this daemon reads on every queue it fetches,
    /// before pending, in `worker.pools` order: none when no stage names a
    /// pool other than the default (a fleet with one pool fetches as
    /// without pools), else those of its pools a stage runs in. The same
    /// rule on every daemon with the same config, and for every queue: a
    /// job type is not bound to a queue (`jobs."T".queue` is only where
    /// `conveyor enqueue` puts it), so a job handed over on any queue is
    /// in a list the daemons of its pool read. `Err(config_pools)` when
    /// the config's stages run in pools and this daemon serves none of
    /// them: it could only hand every job over (refused at the start).
    pub fn pool_lists(&self) -> Result<Vec<String>, Vec<String>> {
        let used = self.config_pools();
        let served: Vec<String> = self
            .worker
            .pools
            .iter()
            .filter(|p| used.contains(*p))
            .cloned()
            .collect();
        if served.is_empty() && !used.is_empty() {
            return Err(used.into_iter().collect());
        }
        match used.iter().any(|p| p != super::DEFAULT_POOL) {
            true => Ok(served),
            false => Ok(Vec::new()),
        }
    }

    /// The queues this daemon serves whose job types (those whose `queue`
    /// it is) all run in pools it does not serve, each with those pools:
    /// it takes their jobs from pending only to hand them over at once.
    /// Advice for the operator (serve those queues from the daemons of
    /// those pools), not a rule: a job of any type may be on any queue.
    pub fn handover_only_queues(&self) -> Vec<(String, Vec<String>)> {
        self.worker
            .queues
            .iter()
            .filter_map(|q| {
                let pools = self.stage_pools(q);
                let served = self.worker.pools.iter().any(|p| pools.contains(p));
                (!pools.is_empty() && !served).then(|| (q.clone(), pools.into_iter().collect()))
            })
            .collect()
    }

    /// The retry policy of a job type (defaults, then its overrides).
    pub fn retry_for(&self, job: &JobTypeConfig) -> RetryConfig {
        RetryConfig {
            max_attempts: job.max_attempts.unwrap_or(self.retry.max_attempts),
            backoff_ms: job.backoff_ms.unwrap_or(self.retry.backoff_ms),
            backoff_max_ms: job.backoff_max_ms.unwrap_or(self.retry.backoff_max_ms),
        }
    }
}

impl WorkerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.id {
            check_name("worker.id", id)?;
        }
        if self.queues.is_empty() {
            return Err(invalid("worker.queues", "must name at least one queue"));
        }
        for (i, q) in self.queues.iter().enumerate() {
            check_name(&format!("worker.queues[{i}]"), q)?;
            if self.queues[..i].contains(q) {
                return Err(invalid(
                    format!("worker.queues[{i}]"),
                    format!("queue `{q}` is listed twice"),
                ));
            }
        }
        if self.pools.is_empty() {
            return Err(invalid("worker.pools", "must name at least one pool"));
        }
        for (i, p) in self.pools.iter().enumerate() {
            super::check_pool(&format!("worker.pools[{i}]"), p)?;
            if self.pools[..i].contains(p) {
                return Err(invalid(
                    format!("worker.pools[{i}]"),
                    format!("pool `{p}` is listed twice"),
                ));
            }
        }
        for (q, weight) in &self.queue_weights {
            let key = format!("worker.queue_weights.{q}");
            check_name(&key, q)?;
            if !(1..=1000).contains(weight) {
                return Err(invalid(key, "must be between 1 and 1000"));
            }
        }
        if let Some(addr) = &self.http
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "worker.http",
                format!("`{addr}` is not an address like 127.0.0.1:9464"),
            ));
        }
        if !(1..=4096).contains(&self.concurrency) {
            return Err(invalid("worker.concurrency", "must be between 1 and 4096"));
        }
        if self.heartbeat_secs == 0 {
            return Err(invalid("worker.heartbeat_secs", "must be at least 1"));
        }
        if self.dead_after_secs < 2 * self.heartbeat_secs {
            return Err(invalid(
                "worker.dead_after_secs",
                "must be at least twice worker.heartbeat_secs",
            ));
        }
        if !(10..=60_000).contains(&self.fetch_block_ms) {
            return Err(invalid(
                "worker.fetch_block_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.max_job_bytes < 64 {
            return Err(invalid("worker.max_job_bytes", "must be at least 64"));
        }
        if !(64..=MAX_RESULT_BYTES_CAP).contains(&self.max_result_bytes) {
            return Err(invalid(
                "worker.max_result_bytes",
                format!("must be between 64 and {MAX_RESULT_BYTES_CAP}"),
            ));
        }
        if self.max_crashes == 0 {
            return Err(invalid("worker.max_crashes", "must be at least 1"));
        }
        if !(10..=60_000).contains(&self.promote_interval_ms) {
            return Err(invalid(
                "worker.promote_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        Ok(())
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        Ok(())
    }
}

/// Checks a retry policy: `[retry]`, or a job type's overrides (`key` is
/// the table they are in).
pub(super) fn validate_retry(key: &str, r: &RetryConfig) -> Result<(), ConfigError> {
    if !(1..=1000).contains(&r.max_attempts) {
        return Err(invalid(
            format!("{key}.max_attempts"),
            "must be between 1 and 1000",
        ));
    }
    if r.backoff_ms > r.backoff_max_ms {
        return Err(invalid(
            format!("{key}.backoff_ms"),
            "must not be more than backoff_max_ms",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;

    #[test]
    fn retry_defaults_and_overrides() {
        let c = Config::from_toml(
            "[retry]\nbackoff_ms = 100\n[jobs.x]\nmax_attempts = 5\nbackoff_max_ms = 300\n\
             stages = [{ name = \"a\", builtin = \"noop\" }]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let r = c.retry_for(&c.jobs["x"]);
        assert_eq!(
            r,
            RetryConfig {
                max_attempts: 5,
                backoff_ms: 100,
                backoff_max_ms: 300
            }
        );
        assert_eq!(
            [r.delay_ms(1), r.delay_ms(2), r.delay_ms(3), r.delay_ms(60)],
            [100, 200, 300, 300]
        );
        for failed in 1..10 {
            let d = r.jittered_delay_ms(failed);
            assert!(
                d >= r.delay_ms(failed) / 2 && d <= r.delay_ms(failed),
                "{d}"
            );
        }
        let e = err("[worker]\nmax_result_bytes = 10\n");
        assert!(
            e.starts_with("config key `worker.max_result_bytes`") && e.contains("between 64"),
            "{e}"
        );
        let e = err("[worker]\nmax_result_bytes = 1000000000\n");
        assert!(e.starts_with("config key `worker.max_result_bytes`"), "{e}");
        assert_eq!(
            Config::from_toml("").unwrap().worker.max_result_bytes,
            16 * 1024 * 1024
        );
        let e = err("[retry]\nbackoff_ms = 10\nbackoff_max_ms = 5\n");
        assert!(e.starts_with("config key `retry.backoff_ms`"), "{e}");
        let e =
            err("[jobs.x]\nmax_attempts = 0\nstages = [{ name = \"a\", builtin = \"noop\" }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".max_attempts`"), "{e}");
    }

    #[test]
    fn every_daemon_reads_the_pool_lists_of_its_pools_on_every_queue_once_a_stage_names_one() {
        // Queue `video`: a default stage, then a gpu one. Queue `emails`:
        // default stages only.
        let toml = "[worker]\nqueues = [\"video\", \"emails\"]\n\
            [jobs.v]\nqueue = \"video\"\nstages = [{ name = \"a\", builtin = \"noop\" }, \
            { name = \"b\", builtin = \"noop\", pool = \"gpu\" }]\n\
            [jobs.e]\nqueue = \"emails\"\nstages = [{ name = \"s\", builtin = \"noop\" }]\n";
        let mut c = Config::from_toml(toml).unwrap();
        c.validate().unwrap();
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            c.config_pools(),
            BTreeSet::from(["default".into(), "gpu".into()])
        );
        // The default daemon reads its list on every queue (emails too:
        // a gpu daemon hands emails jobs over to it, second review's
        // finding 1), and has no advice.
        assert_eq!(c.pool_lists(), Ok(names(&["default"])));
        assert!(c.handover_only_queues().is_empty());
        // A gpu daemon: its list; emails' types run in default only.
        c.worker.pools = names(&["gpu"]);
        assert_eq!(c.pool_lists(), Ok(names(&["gpu"])));
        assert_eq!(
            c.handover_only_queues(),
            [("emails".to_owned(), names(&["default"]))]
        );
        // Both, in the daemon's order; a pool no stage uses is not read.
        c.worker.pools = names(&["tpu", "gpu", "default"]);
        assert_eq!(c.pool_lists(), Ok(names(&["gpu", "default"])));
        // Only pools no stage uses: it could only hand jobs over.
        c.worker.pools = names(&["tpu"]);
        assert_eq!(c.pool_lists(), Err(names(&["default", "gpu"])));
        // No stage names a pool: nothing read (one pool, as before), and a
        // daemon not serving the default pool is refused.
        let plain =
            Config::from_toml("[jobs.t]\nstages = [{ name = \"a\", builtin = \"noop\" }]\n")
                .unwrap();
        assert_eq!(plain.pool_lists(), Ok(Vec::new()));
        let mut gpu_only = plain.clone();
        gpu_only.worker.pools = names(&["gpu"]);
        assert_eq!(gpu_only.pool_lists(), Err(names(&["default"])));
        // No job type at all: nothing to hand over, nothing read.
        let mut none = Config::from_toml("").unwrap();
        none.worker.pools = names(&["gpu"]);
        assert_eq!(none.pool_lists(), Ok(Vec::new()));
    }
}
