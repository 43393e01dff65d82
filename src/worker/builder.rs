//! [`Worker`]: the daemon as a library, with in-process Rust stages.
//!
//! A Rust stage is an implementation of [`Stage`] registered under a name
//! with [`WorkerBuilder::stage`]. Config stages name it the way they name a
//! built-in, `builtin = "<name>"`, so one config format serves the binary
//! and the library: the binary knows the built-ins only, and refuses a
//! config naming a Rust stage with the key named
//! (``config key `jobs."T".stages[0].builtin`: unknown built-in ...``).
//!
//! [`WorkerBuilder::build`] validates the config against the built-ins and
//! the registered names, so load a config that names Rust stages with
//! [`Config::from_toml`] or [`Config::from_file`] (which do not validate),
//! not [`Config::load`] (which validates for the binary).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::WorkerError;
use super::quiet::Quiet;
use crate::config::{Config, ConfigError};
use crate::pipeline::{BoxFuture, Registry, RustStages, Stage, StageContext, StageError, builtin};

/// Why [`WorkerBuilder::build`] refused.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The config is invalid; the message names the key.
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    /// A stage cannot be registered under that name.
    #[error("Rust stage `{name}`: {message}")]
    Stage { name: String, message: String },
    /// The job types could not be built.
    #[error("job types: {0}")]
    Pipeline(String),
}

/// A daemon ready to run: a validated config and its job types, Rust stages
/// included. It runs exactly the engine `conveyor worker` runs (fetch loop,
/// retries, recovery, heartbeat, reaper, periodic jobs, SQLite, progress).
///
/// ```no_run
/// use conveyor::{BoxFuture, Config, Stage, StageContext, StageError, Worker};
/// use serde_json::{Value, json};
///
/// struct Shout;
///
/// impl Stage for Shout {
///     fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
///         Box::pin(async move {
///             let text = ctx.payload["text"].as_str().unwrap_or_default();
///             Ok(json!(text.to_uppercase()))
///         })
///     }
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let config = Config::from_toml(
///         r#"
///         [jobs."text.shout"]
///         stages = [{ name = "shout", builtin = "shout" }]
///         "#,
///     )?;
///     let worker = Worker::builder(config).stage("shout", Shout).build()?;
///     // Until SIGTERM or SIGINT, then drains like the daemon.
///     worker.run_until_signal().await?;
///     Ok(())
/// }
/// ```
pub struct Worker {
    config: Config,
    registry: Registry,
    quiet: Quiet,
}

impl Worker {
    /// Starts building a worker for `config` (not yet validated: `build`
    /// validates it, knowing the registered stages).
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            stages: Vec::new(),
        }
    }

    /// The validated config the worker runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `shutdown` fires, then drains as `conveyor worker` does
    /// on SIGTERM (see [`crate::worker`]). Errors only at start: Redis,
    /// SQLite, or a live daemon with the same worker id.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        super::run_with_registry(self.config, self.registry, shutdown, self.quiet).await
    }

    /// The worker's quiet switch, to keep after [`Worker::run`] took the
    /// worker: [`Quiet::quiet`] stops it taking new jobs (the running ones
    /// finish, it stays alive, `/readyz` says "quiet"), [`Quiet::resume`]
    /// takes jobs again.
    pub fn quiet_handle(&self) -> Quiet {
        self.quiet.clone()
    }

    /// [`Worker::run`] until the first SIGTERM or SIGINT; SIGTSTP quiets
    /// it and SIGCONT resumes it, as for `conveyor worker`.
    pub async fn run_until_signal(self) -> Result<(), WorkerError> {
        let token = crate::shutdown::on_signals().map_err(WorkerError::Signals)?;
        let quiet = self.quiet.clone();
        crate::shutdown::on_quiet_signals(
            move |on| {
                if on { quiet.quiet() } else { quiet.resume() }
            },
        )
        .map_err(WorkerError::Signals)?;
        self.run(token).await
    }
}

/// Registers Rust stages, then validates; see [`Worker`].
pub struct WorkerBuilder {
    config: Config,
    stages: Vec<(String, Arc<dyn Stage>)>,
}

impl WorkerBuilder {
    /// Registers `stage` under `name`: config stages with
    /// `builtin = "<name>"` run it. The name must not be a built-in's
    /// (`noop`, `sleep`, `echo`, `fail`) nor registered twice; `build` says
    /// so otherwise. One instance serves every job, concurrently.
    pub fn stage(mut self, name: impl Into<String>, stage: impl Stage) -> Self {
        self.stages
            .push((name.into(), Arc::new(CatchPanic(stage)) as Arc<dyn Stage>));
        self
    }

    /// Checks the stage names, validates the config against the built-ins
    /// and the registered stages (errors name the key, as `conveyor worker`
    /// does), and builds the job types.
    pub fn build(self) -> Result<Worker, BuildError> {
        let mut stages = RustStages::new();
        for (name, stage) in self.stages {
            let refuse = |message: &str| BuildError::Stage {
                name: name.clone(),
                message: message.to_owned(),
            };
            if name.trim().is_empty() {
                return Err(refuse("a stage name must not be empty"));
            }
            if builtin::NAMES.contains(&name.as_str()) {
                return Err(refuse("is the name of a built-in stage"));
            }
            if stages.contains_key(&name) {
                return Err(refuse("is registered twice"));
            }
            stages.insert(name, stage);
        }
        let mut names: Vec<&str> = stages.keys().map(String::as_str).collect();
        names.sort_unstable();
        self.config.validate_with(&builtin::checker(&names))?;
        let registry = Registry::from_config_with_stages(&self.config, &stages)
            .map_err(BuildError::Pipeline)?;
        Ok(Worker {
            config: self.config,
            registry,
            quiet: Quiet::new(),
        })
    }
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.stages.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("WorkerBuilder")
            .field("stages", &names)
            .finish_non_exhaustive()
    }
}

/// A registered stage whose panics fail the attempt (retryably, like a
/// crashed program) instead of unwinding through the job's task, which
/// would leave the job in the daemon's active list until its next start.
struct CatchPanic<S>(S);

impl<S: Stage> Stage for CatchPanic<S> {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        let mut run = match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.run(ctx))) {
            Ok(run) => run,
            Err(panic) => return Box::pin(std::future::ready(Err(panicked(&*panic)))),
        };
        Box::pin(std::future::poll_fn(
            move |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| run.as_mut().poll(cx))) {
                Ok(poll) => poll,
                Err(panic) => Poll::Ready(Err(panicked(&*panic))),
            },
        ))
    }
}

fn panicked(panic: &(dyn Any + Send)) -> StageError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    StageError::retryable(format!("stage panicked: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Noop;

    impl Stage for Noop {
        fn run<'a>(&'a self, _: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
            Box::pin(async { Ok(Value::Null) })
        }
    }

    fn config(stage: &str) -> Config {
        Config::from_toml(&format!(
            "[jobs.t]\nstages = [{{ name = \"s\", {stage} }}]\n"
        ))
        .expect("parses")
    }

    fn build_err(builder: WorkerBuilder) -> String {
        match builder.build() {
            Ok(_) => panic!("built"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn registered_stages_resolve_and_unknown_ones_name_the_key() {
        let worker = Worker::builder(config("builtin = \"mine\""))
            .stage("mine", Noop)
            .build()
            .expect("builds");
        assert!(worker.registry.get("t").is_some());
        let e = build_err(Worker::builder(config("builtin = \"other\"")).stage("mine", Noop));
        assert!(
            e.contains("`jobs.\"t\".stages[0].builtin`") && e.contains("other"),
            "{e}"
        );
        assert!(e.contains("mine") && e.contains("echo"), "{e}");
        let e = build_err(Worker::builder(config("builtin = \"mine\"")));
        assert!(e.contains("`jobs.\"t\".stages[0].builtin`"), "{e}");
        let e = build_err(
            Worker::builder(config("builtin = \"mine\", args = { x = 1 }")).stage("mine", Noop),
        );
        assert!(e.contains("`jobs.\"t\".stages[0].args`"), "{e}");
    }

    struct Panics;

    impl Stage for Panics {
        fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
            Box::pin(async move {
                tokio::task::yield_now().await;
                panic!("boom in {}", ctx.job_id);
            })
        }
    }

    #[tokio::test]
    async fn a_panicking_stage_fails_retryably() {
        let ctx = StageContext::for_test("j1");
        let err = CatchPanic(Panics).run(&ctx).await.unwrap_err();
        assert_eq!(err.kind, crate::pipeline::FailureKind::Retryable);
        assert_eq!(err.message, "stage panicked: boom in j1");
        assert_eq!(CatchPanic(Noop).run(&ctx).await.unwrap(), Value::Null);
    }

    #[test]
    fn bad_stage_names_are_refused() {
        let c = || config("builtin = \"noop\"");
        let e = build_err(Worker::builder(c()).stage("echo", Noop));
        assert!(e.contains("`echo`") && e.contains("built-in"), "{e}");
        let e = build_err(Worker::builder(c()).stage("a", Noop).stage("a", Noop));
        assert!(e.contains("twice"), "{e}");
        let e = build_err(Worker::builder(c()).stage(" ", Noop));
        assert!(e.contains("empty"), "{e}");
    }
}
