//! Pipelines: a job type is an ordered list of stages.
//!
//! A stage is anything implementing [`Stage`]: an external program run per
//! the stage protocol ([`exec::ExecStage`]), an in-process built-in
//! ([`builtin::Builtin`]), or a Rust stage registered with
//! [`crate::Worker::builder`]. The runner (`worker::runner`) calls the stages
//! in order, passing each one the results of those before it.

pub mod builtin;
pub mod exec;
pub mod limit;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, JobTypeConfig, RetryConfig};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One step of a pipeline.
///
/// Implement it to run a stage in-process, then register the
/// implementation with [`crate::Worker::builder`] under a name; config
/// stages written `builtin = "<name>"` run it. It gets the job in a
/// [`StageContext`] and returns the stage's result (any JSON: it goes to
/// later stages, in [`StageContext::results`], and to SQLite) or a
/// [`StageError`] saying whether the job may be retried.
///
/// ```
/// use conveyor::{BoxFuture, Stage, StageContext, StageError};
/// use serde_json::{Value, json};
///
/// /// Counts the words of `payload.text`.
/// struct WordCount;
///
/// impl Stage for WordCount {
///     fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
///         Box::pin(async move {
///             let Some(text) = ctx.payload["text"].as_str() else {
///                 // Running it again would not help: no retry.
///                 return Err(StageError::permanent("payload.text must be a string"));
///             };
///             if ctx.cancel.is_cancelled() {
///                 // Shutdown or timeout: the job is put back and runs again.
///                 return Err(StageError::interrupted());
///             }
///             ctx.progress(50.0, Some("counting".into()));
///             Ok(json!({ "words": text.split_whitespace().count() }))
///         })
///     }
/// }
/// ```
///
/// A panic in a registered Rust stage is caught and fails the attempt
/// like a crashed program: a retryable failure.
pub trait Stage: Send + Sync + 'static {
    /// Runs the stage for one job. Must return soon after `ctx.cancel` fires
    /// (with [`StageError::interrupted`]); the job is then put back and the
    /// stage runs again later, so stages must be idempotent.
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>>;
}

/// Reports a stage's own progress (0-100 within the stage) and a message.
pub type ProgressFn = Arc<dyn Fn(f64, Option<String>) + Send + Sync>;

/// What a stage gets to work with.
pub struct StageContext {
    pub job_id: String,
    pub job_type: String,
    pub payload: Value,
    pub attempt: u32,
    pub stage: String,
    /// Results of the earlier stages, by stage name.
    pub results: Map<String, Value>,
    /// Fires on shutdown (after the grace period), timeout or cancellation.
    pub cancel: CancellationToken,
    /// Time between SIGTERM and SIGKILL for a stage's processes.
    pub kill_grace: Duration,
    /// Largest result the stage may return (`worker.max_result_bytes`,
    /// its compact JSON): a larger one fails the stage permanently.
    pub max_result_bytes: usize,
    pub(crate) progress: ProgressFn,
}

#[cfg(test)]
impl StageContext {
    /// A context for the unit tests of a stage: job `job_id` of type `t`,
    /// stage `s`, attempt 1, no payload or results, 1 MiB of result.
    pub(crate) fn for_test(job_id: &str) -> Self {
        Self {
            job_id: job_id.into(),
            job_type: "t".into(),
            payload: Value::Null,
            attempt: 1,
            stage: "s".into(),
            results: Map::new(),
            cancel: CancellationToken::new(),
            kill_grace: Duration::from_secs(1),
            max_result_bytes: 1 << 20,
            progress: Arc::new(|_, _| {}),
        }
    }
}

impl StageContext {
    /// Reports the stage's progress, 0-100 within the stage, with an
    /// optional message; published at once as the job's weighted progress.
    pub fn progress(&self, percent: f64, message: Option<String>) {
        (self.progress)(percent, message);
    }

    /// The JSON object an external stage reads on stdin.
    pub fn input_json(&self) -> Value {
        serde_json::json!({
            "id": self.job_id,
            "type": self.job_type,
            "payload": self.payload,
            "attempt": self.attempt,
            "stage": self.stage,
            "results": self.results,
        })
    }
}

/// How a stage failed; decides what happens to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth another attempt (non-zero exit, signal, timeout, error).
    Retryable,
    /// Will fail again: no retry (exit 64/65, `fail` with `permanent`).
    Permanent,
    /// Stopped from outside (shutdown): not a failure, the job is put back.
    Interrupted,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub kind: FailureKind,
    pub message: String,
}

impl StageError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Retryable,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            message: message.into(),
        }
    }
    pub fn interrupted() -> Self {
        Self {
            kind: FailureKind::Interrupted,
            message: "interrupted".into(),
        }
    }
}

/// A stage as configured, ready to run.
pub struct StageSpec {
    pub name: String,
    pub weight: u32,
    pub timeout: Option<Duration>,
    /// The stage pool whose daemons run it (`pool`, "default" when unset).
    pub pool: String,
    pub imp: Arc<dyn Stage>,
    /// `max_concurrent`: shared by every stage of this name in the daemon.
    pub limit: Option<Arc<limit::StageLimit>>,
}

/// A job type's stages and limits.
pub struct Pipeline {
    pub stages: Vec<StageSpec>,
    /// The stages' names, in order, shared by every job of this type.
    pub stage_names: Arc<[String]>,
    pub retry: RetryConfig,
    pub timeout: Option<Duration>,
    /// `rate`: most starts per window across all daemons.
    pub rate: Option<(u32, Duration)>,
    total_weight: u64,
}

/// In-process Rust stages by the name config stages give in `builtin`.
pub type RustStages = HashMap<String, Arc<dyn Stage>>;

impl Pipeline {
    /// A job type's pipeline. A stage's `builtin` names one of `rust_stages`
    /// or else a built-in.
    pub fn from_config(
        cfg: &JobTypeConfig,
        retry: RetryConfig,
        limits: &HashMap<String, Arc<limit::StageLimit>>,
        rust_stages: &RustStages,
    ) -> Result<Self, String> {
        let stages = cfg
            .stages
            .iter()
            .map(|s| {
                let imp: Arc<dyn Stage> = match (&s.run, &s.builtin) {
                    (Some(argv), _) => Arc::new(exec::ExecStage::new(argv.clone(), s.env.clone())),
                    (None, Some(name)) => match rust_stages.get(name) {
                        Some(stage) => stage.clone(),
                        None => Arc::new(builtin::Builtin::parse(name, &s.args_json())?),
                    },
                    (None, None) => return Err(format!("stage `{}` has nothing to run", s.name)),
                };
                Ok(StageSpec {
                    name: s.name.clone(),
                    weight: s.weight,
                    timeout: s.timeout_secs.map(Duration::from_secs),
                    pool: s.pool().to_owned(),
                    imp,
                    limit: limits.get(&s.name).cloned(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let total_weight = stages.iter().map(|s| u64::from(s.weight)).sum();
        let stage_names = stages.iter().map(|s| s.name.clone()).collect();
        Ok(Self {
            stages,
            stage_names,
            retry,
            timeout: cfg.timeout_secs.map(Duration::from_secs),
            rate: cfg.rate_limit(),
            total_weight,
        })
    }

    /// Whole-job progress (0-100) with `done` stages finished and stage
    /// `done` at `within` percent.
    pub fn overall_progress(&self, done: usize, within: f64) -> f64 {
        if self.total_weight == 0 {
            return 0.0;
        }
        let finished: u64 = self.stages[..done]
            .iter()
            .map(|s| u64::from(s.weight))
            .sum();
        let current = self
            .stages
            .get(done)
            .map(|s| f64::from(s.weight) * within.clamp(0.0, 100.0) / 100.0)
            .unwrap_or(0.0);
        let p = (finished as f64 + current) * 100.0 / self.total_weight as f64;
        (p * 10.0).round() / 10.0
    }

    /// Index of the first stage without a result in `results`.
    pub fn resume_index(&self, results: &Map<String, Value>) -> usize {
        self.stages
            .iter()
            .position(|s| !results.contains_key(&s.name))
            .unwrap_or(self.stages.len())
    }
}

/// Every job type this daemon can run.
#[derive(Default, Clone)]
pub struct Registry {
    pipelines: HashMap<String, Arc<Pipeline>>,
}

impl Registry {
    /// The most stages of any job type (0 without job types): how many
    /// results a requeued job may carry.
    pub fn max_stages(&self) -> usize {
        self.pipelines
            .values()
            .map(|p| p.stages.len())
            .max()
            .unwrap_or(0)
    }

    /// The job types of `config`, with the built-in stages only.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Self::from_config_with_stages(config, &RustStages::new())
    }

    /// The job types of `config`; a stage's `builtin` may also name one of
    /// `rust_stages`.
    pub fn from_config_with_stages(
        config: &Config,
        rust_stages: &RustStages,
    ) -> Result<Self, String> {
        let mut limits = HashMap::new();
        for stage in config.jobs.values().flat_map(|j| &j.stages) {
            let Some(max) = stage.max_concurrent else {
                continue;
            };
            limits.entry(stage.name.clone()).or_insert_with(|| {
                Arc::new(match stage.max_concurrent_scope.as_deref() {
                    Some("host") => {
                        let mut dir = config.store.path.clone().into_os_string();
                        dir.push(".limits");
                        limit::StageLimit::host(max, dir.into(), &stage.name)
                    }
                    _ => limit::StageLimit::daemon(max),
                })
            });
        }
        let mut pipelines = HashMap::new();
        // Remote job types run on remote workers, through the API's own
        // daemon (see `crate::gateway`), which gives them a Rust stage.
        for (kind, cfg) in config.jobs.iter().filter(|(_, c)| !c.remote) {
            let p = Pipeline::from_config(cfg, config.retry_for(cfg), &limits, rust_stages)
                .map_err(|e| format!("jobs.\"{kind}\": {e}"))?;
            pipelines.insert(kind.clone(), Arc::new(p));
        }
        Ok(Self { pipelines })
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<Pipeline>> {
        self.pipelines.get(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(weights: &[u32]) -> Pipeline {
        let stages = weights
            .iter()
            .enumerate()
            .map(|(i, w)| StageSpec {
                name: format!("s{i}"),
                weight: *w,
                timeout: None,
                pool: crate::config::DEFAULT_POOL.into(),
                imp: Arc::new(builtin::Builtin::Noop),
                limit: None,
            })
            .collect::<Vec<_>>();
        Pipeline {
            total_weight: weights.iter().map(|w| u64::from(*w)).sum(),
            stage_names: stages.iter().map(|s| s.name.clone()).collect(),
            stages,
            retry: RetryConfig::default(),
            timeout: None,
            rate: None,
        }
    }

    #[test]
    fn progress_is_weighted() {
        let p = pipeline(&[1, 3]);
        assert_eq!(p.overall_progress(0, 0.0), 0.0);
        assert_eq!(p.overall_progress(0, 100.0), 25.0);
        assert_eq!(p.overall_progress(1, 50.0), 62.5);
        assert_eq!(p.overall_progress(2, 0.0), 100.0);
        assert_eq!(p.overall_progress(1, 500.0), 100.0);
    }

    #[test]
    fn resume_skips_finished_stages() {
        let p = pipeline(&[1, 1, 1]);
        let mut r = Map::new();
        assert_eq!(p.resume_index(&r), 0);
        r.insert("s0".into(), Value::Null);
        assert_eq!(p.resume_index(&r), 1);
        r.insert("s1".into(), Value::Null);
        r.insert("s2".into(), Value::Null);
        assert_eq!(p.resume_index(&r), 3);
    }
}
