//! Configuration: TOML file, environment and flags.
//!
//! Precedence is flag > environment > file > default. The file is parsed with
//! unknown keys rejected; [`Config::validate`] then checks what serde cannot
//! (empty stages, a stage with both `run` and `builtin`, a bad Redis URL...)
//! and names the offending key, so a bad config stops the daemon at start
//! with exit code 2 instead of failing later on a job.
//!
//! Every default lives in this file, next to the field it belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::pipeline::builtin;

pub mod timing;

/// The path tried when no `--config` / `CONVEYOR_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/conveyor.toml";

/// A configuration problem, reported with the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// The first `[redis]` key set that only a Sentinel setup uses.
fn sentinel_only(r: &RedisConfig) -> Option<&'static str> {
    [
        ("redis.master", r.master.is_some()),
        ("redis.master_username", r.master_username.is_some()),
        ("redis.master_password", r.master_password.is_some()),
    ]
    .into_iter()
    .find_map(|(key, set)| set.then_some(key))
}

/// A file named at `key` that the process cannot read stops the start.
fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub redis: RedisConfig,
    pub worker: WorkerConfig,
    pub store: StoreConfig,
    pub retry: RetryConfig,
    /// Job types by name: each one is a pipeline of stages.
    pub jobs: BTreeMap<String, JobTypeConfig>,
    /// Periodic jobs (`[[schedules]]`), enqueued by the daemons.
    pub schedules: Vec<ScheduleConfig>,
    /// Remote workers over HTTP (`[api]`), served by `conveyor dashboard`.
    pub api: ApiConfig,
}

/// `[api]`: the remote-worker API of `conveyor dashboard` (see
/// [`crate::api`]).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer tokens by name (a worker or a group of workers); more come
    /// from `CONVEYOR_API_TOKENS="name=token,..."`. None: the API refuses
    /// every call.
    pub tokens: BTreeMap<String, String>,
    /// A claimed job's lease: a worker that neither heartbeats nor reports
    /// progress for this long loses the job (the attempt fails as
    /// retryable, and the job runs again later, on any worker).
    pub lease_secs: u64,
    /// Jobs the API takes from Redis at once for remote workers (its
    /// worker's concurrency). Jobs wait there, in flight, until claimed.
    pub max_jobs: usize,
    /// Claims waiting at once (long polls); more are answered 429.
    pub max_waiting_claims: usize,
    /// Claims per second from one worker id; more are answered 429.
    pub claims_per_sec: u32,
    /// Worker id of the API's own daemon [default: `api-<host name>`].
    pub worker_id: Option<String>,
    /// HTTPS for the whole `conveyor dashboard` server (pages and API):
    /// the certificate chain and its private key (PEM).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: BTreeMap::new(),
            lease_secs: 30,
            max_jobs: 16,
            max_waiting_claims: 256,
            claims_per_sec: 10,
            worker_id: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// Never prints the tokens.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("tokens", &self.tokens.keys().collect::<Vec<_>>())
            .field("lease_secs", &self.lease_secs)
            .field("max_jobs", &self.max_jobs)
            .field("max_waiting_claims", &self.max_waiting_claims)
            .field("claims_per_sec", &self.claims_per_sec)
            .field("worker_id", &self.worker_id)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// One periodic job: `[[schedules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Names the schedule in keys, logs and job ids (`<name>@<tick>`).
    pub name: String,
    /// Job type to enqueue.
    #[serde(rename = "type")]
    pub kind: String,
    /// Cron expression, UTC: "minute hour day-of-month month day-of-week".
    pub cron: Option<String>,
    /// Or a fixed interval, ticking on multiples of it since the Unix epoch.
    pub every: Option<String>,
    /// Payload of each job (any TOML value; default null).
    #[serde(default)]
    pub payload: Value,
    /// Queue [default: the job type's queue, else "default"].
    pub queue: Option<String>,
    /// After downtime, enqueue up to this many missed ticks (the latest
    /// ones). 0, the default: missed ticks are skipped.
    #[serde(default)]
    pub catch_up: u32,
}

impl Config {
    /// The queue a schedule's jobs go to.
    pub fn schedule_queue(&self, s: &ScheduleConfig) -> String {
        s.queue
            .clone()
            .or_else(|| self.jobs.get(&s.kind).map(|j| j.queue.clone()))
            .unwrap_or_else(|| "default".into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// How Redis is deployed: one server (`url`), a Redis Cluster (`urls`
    /// are seed nodes) or a master found through Sentinels (`urls` are the
    /// Sentinels, `master` its name).
    pub mode: RedisMode,
    /// `redis://[user:password@]host:port[/db]`, `rediss://` or `redis+unix:///path`.
    pub url: String,
    /// Cluster seed nodes, or Sentinels (`redis://[user:password@]host:port`).
    pub urls: Vec<String>,
    /// Sentinel mode: the name of the master the Sentinels monitor.
    pub master: Option<String>,
    /// Sentinel mode: credentials for the master and its replicas (the
    /// Sentinels' own go in their URLs).
    pub master_username: Option<String>,
    pub master_password: Option<String>,
    /// Prefix of every key this daemon reads or writes (`P` in the contract).
    pub prefix: String,
    /// With a `rediss://` URL: the CA certificate (PEM) that signed the
    /// server's; without it, the system's trust store is used.
    pub tls_ca_file: Option<PathBuf>,
    /// With a `rediss://` URL: a client certificate and its key (PEM), for
    /// a server that asks for one (`tls-auth-clients yes`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            master: None,
            master_username: None,
            master_password: None,
            prefix: "conveyor".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `[redis] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

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
    /// Messages larger than this are dead-lettered without being parsed.
    pub max_job_bytes: usize,
    /// A job whose daemon died this many times while running it goes to the
    /// dead list instead of being run again (and crashing the next daemon).
    pub max_crashes: u32,
    /// How often scheduled jobs (retries) that are due move to pending.
    pub promote_interval_ms: u64,
    /// Address of the daemon's HTTP listener (`/healthz`, `/readyz`,
    /// `/metrics`), e.g. "127.0.0.1:9464"; none when unset.
    pub http: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            queues: vec!["default".into()],
            queue_weights: BTreeMap::new(),
            concurrency: 5,
            shutdown_grace_secs: 20,
            kill_grace_secs: 5,
            heartbeat_secs: 2,
            dead_after_secs: 15,
            fetch_block_ms: 1000,
            max_job_bytes: 1024 * 1024,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTypeConfig {
    /// Queue `conveyor enqueue` pushes this type to when `--queue` is absent.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Override of `retry.max_attempts`.
    pub max_attempts: Option<u32>,
    /// Override of `retry.backoff_ms`.
    pub backoff_ms: Option<u64>,
    /// Override of `retry.backoff_max_ms`.
    pub backoff_max_ms: Option<u64>,
    /// Deadline of a whole attempt, all stages together; none by default.
    pub timeout_secs: Option<u64>,
    /// Most job starts of this type per period across all daemons, e.g.
    /// "100/1m" (enforced in Redis); none by default.
    pub rate: Option<String>,
    /// Run by remote workers over HTTP (`conveyor dashboard`'s API), not
    /// by daemons: its stages name the steps a remote worker reports, with
    /// no `run` or `builtin`, and its queue is served by the API only.
    #[serde(default)]
    pub remote: bool,
    pub stages: Vec<StageConfig>,
}

impl JobTypeConfig {
    /// `rate` as (jobs, period); `None` when unset. Validated at load.
    pub fn rate_limit(&self) -> Option<(u32, std::time::Duration)> {
        self.rate.as_deref().and_then(|r| parse_rate(r).ok())
    }
}

/// "N/period": N jobs per period, e.g. "100/1m", "5/1s", "1000/1h".
pub fn parse_rate(text: &str) -> Result<(u32, std::time::Duration), String> {
    let bad = |why: &str| format!("`{text}` is not a rate like \"100/1m\": {why}");
    let (n, period) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| bad("the count must be a whole number"))?;
    let period = period.trim();
    // "100/m" reads as "100/1m".
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        humantime::parse_duration(period)
    } else {
        humantime::parse_duration(&format!("1{period}"))
    }
    .map_err(|e| bad(&e.to_string()))?;
    if n == 0 {
        return Err(bad("the count must be at least 1"));
    }
    if period < std::time::Duration::from_millis(1)
        || period > std::time::Duration::from_secs(86_400 * 7)
    {
        return Err(bad("the period must be between 1ms and 7 days"));
    }
    Ok((n, period))
}

fn default_queue() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// An external program: argv, run per the stage protocol.
    pub run: Option<Vec<String>>,
    /// Or an in-process stage: a built-in (`noop`, `sleep`, `echo`, `fail`)
    /// or a Rust stage registered with [`crate::Worker::builder`].
    pub builtin: Option<String>,
    /// Arguments of a built-in, e.g. `{ ms = 50 }` for `sleep`.
    pub args: Option<toml::Table>,
    /// Extra environment for an external program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Share of the job's overall progress this stage accounts for.
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub timeout_secs: Option<u64>,
    /// At most this many runs of this stage at once (of every job type with
    /// a stage of this name), per daemon or per host (`max_concurrent_scope`).
    pub max_concurrent: Option<u32>,
    /// "daemon" (default) or "host": all the daemons of a host together.
    pub max_concurrent_scope: Option<String>,
}

fn default_weight() -> u32 {
    1
}

impl StageConfig {
    /// The built-in's arguments as JSON (empty object when none).
    pub fn args_json(&self) -> Value {
        match &self.args {
            Some(table) => serde_json::to_value(table).unwrap_or(Value::Null),
            None => Value::Object(Default::default()),
        }
    }
}

/// Values given on the command line or in the environment. `None` means
/// "not given", so the file (or the default) stays in force.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub redis_url: Option<String>,
    pub prefix: Option<String>,
    pub db: Option<PathBuf>,
    pub worker_id: Option<String>,
    pub queues: Option<Vec<String>>,
    pub concurrency: Option<usize>,
    pub shutdown_grace_secs: Option<u64>,
}

impl Config {
    /// Loads the file (the default path only if it exists), applies the
    /// overrides and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.redis_url {
            self.redis.url = v.clone();
        }
        if let Some(v) = &o.prefix {
            self.redis.prefix = v.clone();
        }
        if let Some(v) = &o.db {
            self.store.path = v.clone();
        }
        if let Some(v) = &o.worker_id {
            self.worker.id = Some(v.clone());
        }
        if let Some(v) = &o.queues {
            self.worker.queues = v.clone();
        }
        if let Some(v) = o.concurrency {
            self.worker.concurrency = v;
        }
        if let Some(v) = o.shutdown_grace_secs {
            self.worker.shutdown_grace_secs = v;
        }
    }

    /// The worker id in force: configured, or the host name.
    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(hostname)
    }

    /// The retry policy of a job type (defaults, then its overrides).
    pub fn retry_for(&self, job: &JobTypeConfig) -> RetryConfig {
        RetryConfig {
            max_attempts: job.max_attempts.unwrap_or(self.retry.max_attempts),
            backoff_ms: job.backoff_ms.unwrap_or(self.retry.backoff_ms),
            backoff_max_ms: job.backoff_max_ms.unwrap_or(self.retry.backoff_max_ms),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_stages(&[])
    }

    /// [`Config::validate`] for a daemon that also has in-process Rust
    /// stages under these names (see [`crate::Worker::builder`]): a stage's
    /// `builtin` may name one of them as well as a built-in.
    pub fn validate_with_stages(&self, rust_stages: &[&str]) -> Result<(), ConfigError> {
        self.validate_redis()?;
        self.validate_worker()?;
        validate_retry("retry", &self.retry)?;
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        for (name, job) in &self.jobs {
            validate_job_type(name, job, rust_stages)?;
        }
        self.validate_stage_limits()?;
        self.validate_remote()?;
        for (i, schedule) in self.schedules.iter().enumerate() {
            self.validate_schedule(i, schedule)?;
        }
        Ok(())
    }

    /// A stage name's limit is shared by every job type that has a stage of
    /// that name: they must all say the same.
    fn validate_stage_limits(&self) -> Result<(), ConfigError> {
        let mut seen: BTreeMap<&str, (String, Option<u32>, &str)> = BTreeMap::new();
        for (kind, job) in &self.jobs {
            for (i, stage) in job.stages.iter().enumerate() {
                let key = format!("jobs.\"{kind}\".stages[{i}].max_concurrent");
                let scope = stage.max_concurrent_scope.as_deref().unwrap_or("daemon");
                let this = (stage.max_concurrent, scope);
                match seen.get(stage.name.as_str()) {
                    Some((first, limit, scope)) if (*limit, *scope) != this => {
                        return Err(invalid(
                            key,
                            format!(
                                "stage `{}` is limited differently at {first}; every stage of that name shares one limit",
                                stage.name
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(&stage.name, (key, this.0, this.1));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_schedule(&self, i: usize, s: &ScheduleConfig) -> Result<(), ConfigError> {
        let key = format!("schedules[{i}]");
        check_name(&format!("{key}.name"), &s.name)?;
        if self.schedules[..i].iter().any(|o| o.name == s.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("schedule name `{}` is used twice", s.name),
            ));
        }
        if s.kind.is_empty() {
            return Err(invalid(format!("{key}.type"), "must name a job type"));
        }
        if !self.jobs.is_empty() && !self.jobs.contains_key(&s.kind) {
            let known: Vec<_> = self.jobs.keys().map(String::as_str).collect();
            return Err(invalid(
                format!("{key}.type"),
                format!(
                    "unknown job type `{}` (known: {})",
                    s.kind,
                    known.join(", ")
                ),
            ));
        }
        if let Some(q) = &s.queue {
            check_name(&format!("{key}.queue"), q)?;
        }
        timing::Timing::parse(s.cron.as_deref(), s.every.as_deref())
            .map_err(|(field, message)| invalid(format!("{key}.{field}"), message))?;
        if s.catch_up > 1000 {
            return Err(invalid(format!("{key}.catch_up"), "must be at most 1000"));
        }
        Ok(())
    }

    /// Queues that hold remote job types (served by the API only).
    pub fn remote_queues(&self) -> BTreeSet<&str> {
        self.jobs
            .values()
            .filter(|j| j.remote)
            .map(|j| j.queue.as_str())
            .collect()
    }

    fn validate_remote(&self) -> Result<(), ConfigError> {
        let remote = self.remote_queues();
        for (name, job) in &self.jobs {
            if !job.remote && remote.contains(job.queue.as_str()) {
                return Err(invalid(
                    format!("jobs.\"{name}\".queue"),
                    format!(
                        "queue `{}` holds remote job types; give local and remote types different queues",
                        job.queue
                    ),
                ));
            }
        }
        for (i, q) in self.worker.queues.iter().enumerate() {
            if remote.contains(q.as_str()) {
                return Err(invalid(
                    format!("worker.queues[{i}]"),
                    format!(
                        "queue `{q}` holds remote job types, which the API serves (conveyor dashboard); daemons do not"
                    ),
                ));
            }
        }
        let a = &self.api;
        if a.lease_secs == 0 || a.lease_secs > 3600 {
            return Err(invalid("api.lease_secs", "must be between 1 and 3600"));
        }
        if a.max_jobs == 0 {
            return Err(invalid("api.max_jobs", "must be at least 1"));
        }
        if a.claims_per_sec == 0 {
            return Err(invalid("api.claims_per_sec", "must be at least 1"));
        }
        if a.max_waiting_claims == 0 {
            return Err(invalid("api.max_waiting_claims", "must be at least 1"));
        }
        if let Some(id) = &a.worker_id {
            check_name("api.worker_id", id)?;
        }
        if a.tls_cert_file.is_some() != a.tls_key_file.is_some() {
            return Err(invalid(
                "api.tls_cert_file",
                "HTTPS needs both tls_cert_file and tls_key_file",
            ));
        }
        for (key, file) in [
            ("api.tls_cert_file", &a.tls_cert_file),
            ("api.tls_key_file", &a.tls_key_file),
        ] {
            if let Some(path) = file {
                readable(key, path)?;
            }
        }
        for (name, token) in &a.tokens {
            if token.trim().len() < 16 {
                return Err(invalid(
                    format!("api.tokens.{name}"),
                    "must be at least 16 characters",
                ));
            }
        }
        Ok(())
    }

    fn validate_redis_mode(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let tls = r.tls_ca_file.is_some() || r.tls_cert_file.is_some();
        match r.mode {
            RedisMode::Standalone => {
                if !r.urls.is_empty() {
                    return Err(invalid(
                        "redis.urls",
                        "is for mode = \"cluster\" or \"sentinel\"; one server takes `url`",
                    ));
                }
                if let Some(key) = sentinel_only(r) {
                    return Err(invalid(key, "is for mode = \"sentinel\""));
                }
                return Ok(());
            }
            RedisMode::Cluster if sentinel_only(r).is_some() => {
                let key = sentinel_only(r).unwrap_or_default();
                return Err(invalid(key, "is for mode = \"sentinel\""));
            }
            RedisMode::Sentinel if r.master.as_deref().is_none_or(str::is_empty) => {
                return Err(invalid(
                    "redis.master",
                    "mode = \"sentinel\" needs the name of the master the Sentinels monitor",
                ));
            }
            _ => {}
        }
        if r.urls.is_empty() {
            return Err(invalid(
                "redis.urls",
                "must list at least one node (cluster seeds, or Sentinels)",
            ));
        }
        for (i, url) in r.urls.iter().enumerate() {
            let key = format!("redis.urls[{i}]");
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| invalid(&key, format!("not a valid Redis URL: {e}")))?;
            if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..)) || tls {
                return Err(invalid(
                    &key,
                    "cluster and Sentinel nodes are reached over plain TCP (redis://host:port); \
                     TLS is supported with one server only",
                ));
            }
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.redis.url.as_str())
            .map_err(|e| invalid("redis.url", format!("not a valid Redis URL: {e}")))?;
        self.validate_redis_mode()?;
        if self.redis.url.contains("#insecure") {
            return Err(invalid(
                "redis.url",
                "`#insecure` (TLS without certificate checks) is refused",
            ));
        }
        let r = &self.redis;
        let files = [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_cert_file", &r.tls_cert_file),
            ("redis.tls_key_file", &r.tls_key_file),
        ];
        for (key, file) in files {
            let Some(path) = file else { continue };
            if !r.url.starts_with("rediss://") {
                return Err(invalid(key, "is for a TLS connection: use a rediss:// URL"));
            }
            readable(key, path)?;
        }
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            return Err(invalid(
                "redis.tls_cert_file",
                "a client certificate needs both tls_cert_file and tls_key_file",
            ));
        }
        check_name("redis.prefix", &r.prefix)
    }

    fn validate_worker(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        if let Some(id) = &w.id {
            check_name("worker.id", id)?;
        }
        if w.queues.is_empty() {
            return Err(invalid("worker.queues", "must name at least one queue"));
        }
        for (i, q) in w.queues.iter().enumerate() {
            check_name(&format!("worker.queues[{i}]"), q)?;
            if w.queues[..i].contains(q) {
                return Err(invalid(
                    format!("worker.queues[{i}]"),
                    format!("queue `{q}` is listed twice"),
                ));
            }
        }
        for (q, weight) in &w.queue_weights {
            let key = format!("worker.queue_weights.{q}");
            check_name(&key, q)?;
            if !(1..=1000).contains(weight) {
                return Err(invalid(key, "must be between 1 and 1000"));
            }
        }
        if let Some(addr) = &w.http
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "worker.http",
                format!("`{addr}` is not an address like 127.0.0.1:9464"),
            ));
        }
        if !(1..=4096).contains(&w.concurrency) {
            return Err(invalid("worker.concurrency", "must be between 1 and 4096"));
        }
        if w.heartbeat_secs == 0 {
            return Err(invalid("worker.heartbeat_secs", "must be at least 1"));
        }
        if w.dead_after_secs < 2 * w.heartbeat_secs {
            return Err(invalid(
                "worker.dead_after_secs",
                "must be at least twice worker.heartbeat_secs",
            ));
        }
        if !(10..=60_000).contains(&w.fetch_block_ms) {
            return Err(invalid(
                "worker.fetch_block_ms",
                "must be between 10 and 60000",
            ));
        }
        if w.max_job_bytes < 64 {
            return Err(invalid("worker.max_job_bytes", "must be at least 64"));
        }
        if w.max_crashes == 0 {
            return Err(invalid("worker.max_crashes", "must be at least 1"));
        }
        if !(10..=60_000).contains(&w.promote_interval_ms) {
            return Err(invalid(
                "worker.promote_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        Ok(())
    }
}

fn validate_job_type(
    name: &str,
    job: &JobTypeConfig,
    rust_stages: &[&str],
) -> Result<(), ConfigError> {
    let key = format!("jobs.\"{name}\"");
    if name.is_empty() {
        return Err(invalid("jobs", "a job type name must not be empty"));
    }
    check_name(&format!("{key}.queue"), &job.queue)?;
    validate_retry(
        &key,
        &RetryConfig {
            max_attempts: job.max_attempts.unwrap_or(1),
            backoff_ms: job.backoff_ms.unwrap_or(0),
            backoff_max_ms: job.backoff_max_ms.unwrap_or(u64::MAX),
        },
    )?;
    if job.timeout_secs == Some(0) {
        return Err(invalid(format!("{key}.timeout_secs"), "must be at least 1"));
    }
    if let Some(rate) = &job.rate {
        parse_rate(rate).map_err(|m| invalid(format!("{key}.rate"), m))?;
    }
    if job.stages.is_empty() {
        return Err(invalid(
            format!("{key}.stages"),
            "a job type needs at least one stage",
        ));
    }
    for (i, stage) in job.stages.iter().enumerate() {
        let key = format!("{key}.stages[{i}]");
        if stage.name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        if job.stages[..i].iter().any(|s| s.name == stage.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("stage name `{}` is used twice", stage.name),
            ));
        }
        if stage.weight == 0 {
            return Err(invalid(format!("{key}.weight"), "must be at least 1"));
        }
        if stage.timeout_secs == Some(0) {
            return Err(invalid(format!("{key}.timeout_secs"), "must be at least 1"));
        }
        if stage.max_concurrent == Some(0) {
            return Err(invalid(
                format!("{key}.max_concurrent"),
                "must be at least 1",
            ));
        }
        match stage.max_concurrent_scope.as_deref() {
            None | Some("daemon") | Some("host") => {}
            Some(other) => {
                return Err(invalid(
                    format!("{key}.max_concurrent_scope"),
                    format!("`{other}` is not \"daemon\" or \"host\""),
                ));
            }
        }
        if stage.max_concurrent_scope.is_some() && stage.max_concurrent.is_none() {
            return Err(invalid(
                format!("{key}.max_concurrent_scope"),
                "is for a stage with `max_concurrent`",
            ));
        }
        if job.remote {
            if stage.run.is_some() || stage.builtin.is_some() {
                return Err(invalid(
                    key,
                    "is a stage of a remote job type: remote workers run it, so it has no `run` or `builtin`",
                ));
            }
            continue;
        }
        match (&stage.run, &stage.builtin) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    key,
                    "has both `run` and `builtin`; a stage is one or the other",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    key,
                    "needs `run = [argv...]` or `builtin = \"name\"`",
                ));
            }
            (Some(argv), None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(invalid(format!("{key}.run"), "must name a program"));
                }
                if stage.args.is_some() {
                    return Err(invalid(
                        format!("{key}.args"),
                        "`args` is for built-ins; pass arguments in `run`",
                    ));
                }
            }
            (None, Some(b)) => {
                if rust_stages.contains(&b.as_str()) {
                    if stage.args.is_some() {
                        return Err(invalid(
                            format!("{key}.args"),
                            format!("`{b}` is a Rust stage; it takes no `args`"),
                        ));
                    }
                } else if !rust_stages.is_empty() && !builtin::NAMES.contains(&b.as_str()) {
                    return Err(invalid(
                        format!("{key}.builtin"),
                        format!(
                            "unknown stage `{b}` (built-ins: {}; Rust stages: {})",
                            builtin::NAMES.join(", "),
                            rust_stages.join(", ")
                        ),
                    ));
                } else {
                    builtin::Builtin::parse(b, &stage.args_json())
                        .map_err(|message| invalid(format!("{key}.builtin"), message))?;
                }
                if !stage.env.is_empty() {
                    return Err(invalid(format!("{key}.env"), "`env` is for `run` stages"));
                }
            }
        }
    }
    Ok(())
}

fn validate_retry(key: &str, r: &RetryConfig) -> Result<(), ConfigError> {
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

/// Queue names, prefixes and worker ids become parts of Redis keys: keep
/// them printable, without the separators and hash-tag braces the key
/// layout relies on.
fn check_name(key: &str, value: &str) -> Result<(), ConfigError> {
    name_problem(value).map_or(Ok(()), |message| Err(invalid(key, message)))
}

/// What is wrong with a name that becomes part of a Redis key (queue,
/// prefix, worker id), if anything. The rule of [`Config::validate`], for
/// names that come from elsewhere (the library's `Client`).
pub(crate) fn name_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.len() > 128 {
        return Some("must be at most 128 characters".into());
    }
    value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|c| format!("`{value}` contains {c:?}; use letters, digits, '-', '_' or '.'"))
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length and gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "worker".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::from_toml(text) {
            Err(e) => e,
            Ok(c) => c.validate().unwrap_err().to_string(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn remote_job_types_keep_to_their_own_queues() {
        let remote = "[worker]\nqueues = [\"a\"]\n[jobs.r]\nremote = true\nqueue = \"r\"\nstages = [{ name = \"s\" }]\n";
        Config::from_toml(remote).unwrap().validate().unwrap();
        let cases = [
            (
                remote.replace("{ name = \"s\" }", "{ name = \"s\", builtin = \"noop\" }"),
                "jobs.\"r\".stages[0]",
            ),
            (
                format!(
                    "{remote}[jobs.l]\nqueue = \"r\"\nstages = [{{ name = \"x\", builtin = \"noop\" }}]\n"
                ),
                "jobs.\"l\".queue",
            ),
            (
                remote.replace("queues = [\"a\"]", "queues = [\"a\", \"r\"]"),
                "worker.queues[1]",
            ),
            (format!("{remote}[api]\nlease_secs = 0\n"), "api.lease_secs"),
            (
                format!("{remote}[api]\ntokens = {{ w = \"short\" }}\n"),
                "api.tokens.w",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.starts_with(&format!("config key `{key}`")), "{text}: {e}");
        }
        let c = Config::from_toml(&format!(
            "{remote}[api]\ntokens = {{ w = \"0123456789abcdefXYZ\" }}\n"
        ))
        .unwrap();
        assert!(
            !format!("{c:?}").contains("0123456789abcdefXYZ"),
            "a token in Debug output"
        );
    }

    #[test]
    fn redis_modes_name_the_missing_or_misplaced_key() {
        let ok = |text: &str| Config::from_toml(text).unwrap().validate().unwrap();
        ok(
            "[redis]\nmode = \"cluster\"\nurls = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n",
        );
        ok(
            "[redis]\nmode = \"sentinel\"\nmaster = \"main\"\nurls = [\"redis://10.0.0.1:26379\"]\n",
        );
        let cases = [
            ("mode = \"cluster\"\n", "redis.urls"),
            (
                "mode = \"sentinel\"\nurls = [\"redis://h:26379\"]\n",
                "redis.master",
            ),
            ("urls = [\"redis://h:7000\"]\n", "redis.urls"),
            (
                "mode = \"cluster\"\nmaster = \"m\"\nurls = [\"redis://h:1\"]\n",
                "redis.master",
            ),
            (
                "mode = \"cluster\"\nurls = [\"redis://h:1\", \"nope\"]\n",
                "redis.urls[1]",
            ),
            (
                "mode = \"cluster\"\nurls = [\"rediss://h:1\"]\n",
                "redis.urls[0]",
            ),
        ];
        for (redis, key) in cases {
            let e = err(&format!("[redis]\n{redis}"));
            assert!(
                e.starts_with(&format!("config key `{key}`")),
                "{redis}: {e}"
            );
        }
        assert!(err("[redis]\nmode = \"ring\"\n").contains("unknown variant `ring`"));
    }

    const JOBS: &str =
        "[jobs.report]\nqueue = \"reports\"\nstages = [{ name = \"a\", builtin = \"noop\" }]\n";

    #[test]
    fn schedules_parse_and_take_their_job_types_queue() {
        let text = format!(
            "{JOBS}[[schedules]]\nname = \"nightly\"\ntype = \"report\"\ncron = \"0 3 * * *\"\npayload = {{ full = true }}\n\n[[schedules]]\nname = \"often\"\ntype = \"report\"\nevery = \"5m\"\nqueue = \"q2\"\ncatch_up = 2\n"
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.schedules.len(), 2);
        assert_eq!(c.schedule_queue(&c.schedules[0]), "reports");
        assert_eq!(c.schedules[0].payload, serde_json::json!({"full": true}));
        assert_eq!(c.schedule_queue(&c.schedules[1]), "q2");
        assert_eq!(c.schedules[1].catch_up, 2);
    }

    #[test]
    fn rates_parse_and_bad_ones_name_the_key() {
        use std::time::Duration;
        assert_eq!(parse_rate("100/1m"), Ok((100, Duration::from_secs(60))));
        assert_eq!(parse_rate("5 / s"), Ok((5, Duration::from_secs(1))));
        assert_eq!(parse_rate("1000/1h"), Ok((1000, Duration::from_secs(3600))));
        for bad in ["100", "0/1m", "x/1m", "10/forever", "10/30d"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let e = err("[jobs.x]\nrate = \"lots\"\nstages = [{ name = \"a\", builtin = \"noop\" }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".rate`"), "{e}");
    }

    #[test]
    fn stage_limits_are_checked_and_shared_by_name() {
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 0 }]\n",
        );
        assert!(
            e.starts_with("config key `jobs.\"x\".stages[0].max_concurrent`"),
            "{e}"
        );
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1, max_concurrent_scope = \"rack\" }]\n",
        );
        assert!(e.contains("max_concurrent_scope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent_scope = \"host\" }]\n",
        );
        assert!(e.contains("max_concurrent_scope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n[jobs.y]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 2 }]\n",
        );
        assert!(
            e.contains("jobs.\"y\".stages[0].max_concurrent") && e.contains("shares one limit"),
            "{e}"
        );
        let ok = "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n[jobs.y]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n";
        Config::from_toml(ok).unwrap().validate().unwrap();
    }

    #[test]
    fn bad_schedules_name_the_key() {
        let sched = |body: &str| err(&format!("{JOBS}[[schedules]]\n{body}"));
        let e = sched("name = \"n\"\ntype = \"report\"\ncron = \"99 * * * *\"\n");
        assert!(e.starts_with("config key `schedules[0].cron`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\n");
        assert!(e.starts_with("config key `schedules[0].cron`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\nevery = \"often\"\n");
        assert!(e.starts_with("config key `schedules[0].every`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"nope\"\nevery = \"1m\"\n");
        assert!(
            e.starts_with("config key `schedules[0].type`") && e.contains("report"),
            "{e}"
        );
        let e = sched("name = \"a b\"\ntype = \"report\"\nevery = \"1m\"\n");
        assert!(e.starts_with("config key `schedules[0].name`"), "{e}");
        let e = sched(
            "name = \"n\"\ntype = \"report\"\nevery = \"1m\"\n[[schedules]]\nname = \"n\"\ntype = \"report\"\nevery = \"2m\"\n",
        );
        assert!(e.starts_with("config key `schedules[1].name`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\nevery = \"1m\"\nat = 3\n");
        assert!(e.contains("unknown field `at`"), "{e}");
    }

    #[test]
    fn unknown_field_in_job_type_is_named() {
        let e = err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\" }]\nretries = 3\n");
        assert!(e.contains("retries"), "{e}");
    }

    #[test]
    fn empty_stages_are_refused() {
        let e = err("[jobs.x]\nstages = []\n");
        assert_eq!(
            e,
            "config key `jobs.\"x\".stages`: a job type needs at least one stage"
        );
    }

    #[test]
    fn run_and_builtin_together_are_refused() {
        let e =
            err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\", run = [\"true\"] }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".stages[0]`"), "{e}");
        assert!(e.contains("both `run` and `builtin`"), "{e}");
    }

    #[test]
    fn unknown_builtin_and_bad_args_are_refused() {
        let e = err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"nope\" }]\n");
        assert!(e.contains("stages[0].builtin") && e.contains("nope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"a\", builtin = \"sleep\", args = { ms = \"x\" } }]\n",
        );
        assert!(e.contains("stages[0].builtin") && e.contains("ms"), "{e}");
    }

    #[test]
    fn bad_url_and_names_are_refused() {
        let e = err("[redis]\nurl = \"http://x\"\n");
        assert!(e.starts_with("config key `redis.url`"), "{e}");
        let e = err("[worker]\nqueues = [\"a{b}\"]\n");
        assert!(e.starts_with("config key `worker.queues[0]`"), "{e}");
        let e = err("[worker]\nconcurrency = 0\n");
        assert!(e.starts_with("config key `worker.concurrency`"), "{e}");
    }

    #[test]
    fn duplicate_stage_names_are_refused() {
        let e = err(
            "[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\" }, { name = \"a\", builtin = \"noop\" }]\n",
        );
        assert!(e.contains("stages[1].name"), "{e}");
    }

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
        let e = err("[retry]\nbackoff_ms = 10\nbackoff_max_ms = 5\n");
        assert!(e.starts_with("config key `retry.backoff_ms`"), "{e}");
        let e =
            err("[jobs.x]\nmax_attempts = 0\nstages = [{ name = \"a\", builtin = \"noop\" }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".max_attempts`"), "{e}");
    }

    #[test]
    fn overrides_win_over_file() {
        let mut c = Config::from_toml("[worker]\nconcurrency = 3\nqueues = [\"a\"]\n").unwrap();
        c.apply(&Overrides {
            concurrency: Some(7),
            queues: Some(vec!["b".into(), "c".into()]),
            ..Default::default()
        });
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.worker.queues, ["b", "c"]);
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let c = Config::from_file(&path).unwrap();
        c.validate().unwrap();
        assert!(c.jobs.contains_key("echo"));
        assert_eq!(c.jobs["video.generate"].stages.len(), 4);
    }
}
