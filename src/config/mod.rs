//! Configuration: TOML file, environment and flags.
//!
//! Precedence is flag > environment > file > default. The file is parsed with
//! unknown keys rejected; [`Config::validate_with`] then checks what serde
//! cannot (empty stages, a stage with both `run` and `builtin`, a bad Redis
//! URL...) and names the offending key, so a bad config stops the daemon at
//! start with exit code 2 instead of failing later on a job.
//!
//! This module owns [`Config`], its loading and the rules every key shares
//! (errors, names that become Redis keys); each section lives in its own
//! file with its defaults (`impl Default`) and its checks: [`RedisConfig`],
//! [`WorkerConfig`] / [`StoreConfig`] / [`RetryConfig`], [`JobTypeConfig`],
//! [`GatewayConfig`] / [`DashboardConfig`], [`ScheduleConfig`] and their
//! [`timing`].
//!
//! Config depends on nothing above it: the names of in-process stages
//! (`builtin = "..."`) are checked by the pipeline layer, passed in as a
//! [`BuiltinCheck`].

mod history;
mod host;
mod jobs;
pub(crate) mod locate;
mod redis;
mod schedules;
mod servers;
pub mod timing;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use history::HistoryConfig;
pub use host::hostname;
pub use jobs::{BuiltinCheck, JobTypeConfig, StageConfig};
pub use locate::{ConfigSource, SYSTEM_CONFIG_PATH};
pub use redis::{RedisConfig, RedisMode, redact_url};
pub use schedules::ScheduleConfig;
pub use servers::{DashboardConfig, GatewayConfig};
pub use worker::{RetryConfig, StoreConfig, WorkerConfig};

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
    /// `[history]`: the job records kept in Redis for every host.
    pub history: HistoryConfig,
    /// Job types by name: each one is a pipeline of stages.
    pub jobs: BTreeMap<String, JobTypeConfig>,
    /// Periodic jobs (`[[schedules]]`), enqueued by the daemons.
    pub schedules: Vec<ScheduleConfig>,
    /// Remote workers over HTTP (`[gateway]`), served by `conveyor gateway`.
    pub gateway: GatewayConfig,
    /// `conveyor dashboard`'s own settings (`[dashboard]`).
    pub dashboard: DashboardConfig,
    /// `[api]`: what `[gateway]` was called while `conveyor dashboard`
    /// served the remote-worker API; [`Config::from_toml`] moves it to
    /// `gateway` and remembers that it did ([`Config::notices`]).
    #[serde(rename = "api")]
    legacy_api: Option<GatewayConfig>,
    #[serde(skip)]
    from_legacy_api: bool,
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
    pub pools: Option<Vec<String>>,
    pub concurrency: Option<usize>,
    pub shutdown_grace_secs: Option<u64>,
}

impl Config {
    /// Loads the file at `path`, else the first of the default places
    /// that exists ([`ConfigSource`]: `./config/conveyor.toml`, then
    /// `/etc/conveyor/conveyor.toml`; none: the defaults), applies the
    /// overrides and validates the result, its `builtin` stages with
    /// `builtin` (see [`Config::validate_with`]).
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        builtin: &BuiltinCheck<'_>,
    ) -> Result<Self, ConfigError> {
        Self::load_source(&ConfigSource::find(path, None), overrides, builtin)
    }

    /// [`Config::load`] from a file already chosen.
    pub fn load_source(
        source: &ConfigSource,
        overrides: &Overrides,
        builtin: &BuiltinCheck<'_>,
    ) -> Result<Self, ConfigError> {
        let mut config = match &source.path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate_with(builtin)?;
        if source.is_system() && config.store.path.is_relative() {
            // The daemons run in /var/lib/conveyor and a command typed on
            // the host in the shell's directory: a relative path would give
            // them two different databases.
            return Err(invalid(
                "store.path",
                format!(
                    "must be an absolute path in {SYSTEM_CONFIG_PATH} (the daemons and the \
                     commands run by hand on the host start in different directories), \
                     e.g. \"/var/lib/conveyor/conveyor.db\"; it is {:?}",
                    config.store.path
                ),
            ));
        }
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
        let mut config: Self =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        if let Some(api) = config.legacy_api.take() {
            if config.gateway != GatewayConfig::default() {
                return Err(
                    "[api] is the old name of [gateway]: keep one of them (rename [api] to [gateway])"
                        .to_owned(),
                );
            }
            config.gateway = api;
            config.from_legacy_api = true;
        }
        Ok(config)
    }

    /// Whether the file had `[api]` (now `[gateway]`): its TLS files then
    /// still serve `conveyor dashboard` when `[dashboard]` names none, as
    /// they did when the dashboard served the remote-worker API.
    pub fn from_legacy_api(&self) -> bool {
        self.from_legacy_api
    }

    /// What an operator should change in a config that still loads: one
    /// message per outdated setting, for the command line to print.
    pub fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.from_legacy_api {
            out.push(
                "config: [api] is now [gateway], and `conveyor gateway` serves the remote-worker API (/api/v1); rename the section"
                    .to_owned(),
            );
        }
        out
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
        if let Some(v) = &o.pools {
            self.worker.pools = v.clone();
        }
        if let Some(v) = o.concurrency {
            self.worker.concurrency = v;
        }
        if let Some(v) = o.shutdown_grace_secs {
            self.worker.shutdown_grace_secs = v;
        }
    }

    /// Checks what serde cannot, section by section; the first problem
    /// found is returned, naming its key. The stages a `builtin` names are
    /// checked by `builtin`, which the pipeline layer supplies
    /// (`pipeline::builtin::checker`): it knows the built-ins, and the Rust
    /// stages of a [`crate::Worker`].
    pub fn validate_with(&self, builtin: &BuiltinCheck<'_>) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.worker.validate()?;
        worker::validate_retry("retry", &self.retry)?;
        self.store.validate()?;
        self.history.validate()?;
        for (name, job) in &self.jobs {
            jobs::validate_job_type(name, job, builtin)?;
        }
        self.validate_stage_limits()?;
        self.validate_remote_queues()?;
        self.gateway.validate()?;
        self.dashboard.validate()?;
        for (i, schedule) in self.schedules.iter().enumerate() {
            self.validate_schedule(i, schedule)?;
        }
        Ok(())
    }
}

/// Queue names, prefixes and worker ids become parts of Redis keys: keep
/// them printable, without the separators and hash-tag braces the key
/// layout relies on.
fn check_name(key: &str, value: &str) -> Result<(), ConfigError> {
    name_problem(value).map_or(Ok(()), |message| Err(invalid(key, message)))
}

/// What is wrong with a name that becomes part of a Redis key (queue,
/// prefix, worker id), if anything. The rule of [`Config::validate_with`], for
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

/// The pool of a stage without `pool`, and what a daemon without
/// `[worker] pools` serves.
pub const DEFAULT_POOL: &str = "default";

/// What is wrong with a pool name, if anything: `[A-Za-z0-9_-]{1,64}` (it
/// becomes part of the key `P:{Q}:pool:<name>`).
pub fn pool_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.len() > 64 {
        return Some("must be at most 64 characters".into());
    }
    value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        .map(|c| format!("`{value}` contains {c:?}; a pool name uses letters, digits, '-' or '_'"))
}

fn check_pool(key: &str, value: &str) -> Result<(), ConfigError> {
    pool_problem(value).map_or(Ok(()), |message| Err(invalid(key, message)))
}

#[cfg(test)]
impl Config {
    /// [`Config::validate_with`] taking every `builtin` stage as valid: the
    /// config's own checks, for its tests (the pipeline layer's tests cover
    /// the built-ins).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(&|_, _| Ok(()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The parse error, or else the validation error, of a config text.
    pub(crate) fn err(text: &str) -> String {
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
    fn bad_url_and_names_are_refused() {
        let e = err("[redis]\nurl = \"http://x\"\n");
        assert!(e.starts_with("config key `redis.url`"), "{e}");
        let e = err("[worker]\nqueues = [\"a{b}\"]\n");
        assert!(e.starts_with("config key `worker.queues[0]`"), "{e}");
        let e = err("[worker]\nconcurrency = 0\n");
        assert!(e.starts_with("config key `worker.concurrency`"), "{e}");
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
    fn pools_are_checked_and_named() {
        let stage = |pool: &str| {
            format!(
                "[jobs.t]\nstages = [{{ name = \"a\", builtin = \"noop\", pool = \"{pool}\" }}]\n"
            )
        };
        let c = Config::from_toml(&stage("gpu-1_x")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.jobs["t"].stages[0].pool(), "gpu-1_x");
        assert!(c.stage_pools("default").contains("gpu-1_x"));
        assert_eq!(
            c.pool_lists(),
            Err(vec!["gpu-1_x".to_owned()]),
            "its one stage in another pool: the default daemon could only hand jobs over"
        );
        for bad in ["", "a.b", "a b", "gpu{x}", &"p".repeat(65)] {
            let e = err(&stage(bad));
            assert!(
                e.starts_with("config key `jobs.\"t\".stages[0].pool`"),
                "{bad}: {e}"
            );
        }
        let e = err("[worker]\npools = []\n");
        assert!(e.starts_with("config key `worker.pools`"), "{e}");
        let e = err("[worker]\npools = [\"a\", \"a\"]\n");
        assert!(e.starts_with("config key `worker.pools[1]`"), "{e}");
        let e = err("[worker]\npools = [\"a:b\"]\n");
        assert!(e.starts_with("config key `worker.pools[0]`"), "{e}");
        let plain =
            Config::from_toml("[jobs.t]\nstages = [{ name = \"a\", builtin = \"noop\" }]\n")
                .unwrap();
        assert_eq!(plain.worker.pools, [DEFAULT_POOL]);
        assert_eq!(plain.jobs["t"].stages[0].pool(), DEFAULT_POOL);
        assert_eq!(
            plain.pool_lists(),
            Ok(Vec::new()),
            "one pool: pending alone, as without pools"
        );
        let mut c = plain.clone();
        c.apply(&Overrides {
            pools: Some(vec!["gpu".into()]),
            ..Default::default()
        });
        assert_eq!(c.worker.pools, ["gpu"]);
        assert_eq!(c.pool_lists(), Err(vec![DEFAULT_POOL.to_owned()]));
    }
}
