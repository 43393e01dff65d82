//! Remote workers over HTTP: `/api/v1/...` on `conveyor dashboard`'s
//! server, described by `openapi.json` (served at `/api/v1/openapi.json`).
//!
//! Remote job types (`jobs."T".remote = true`) run through the same engine
//! as every other job: the API starts its own daemon ([`embedded_config`])
//! on the remote queues, in which each stage of a remote type is a
//! [`RemoteStage`]. That daemon takes jobs from Redis into its active list,
//! records them in SQLite, publishes progress, retries with backoff,
//! dead-letters, honours cancels and requeues on shutdown, exactly as
//! `conveyor worker` does. A [`RemoteStage`] only hands its stage to a
//! remote worker and waits for what the worker reports:
//!
//! ```text
//!  daemon (runner) ──stage a──► RemoteStage ──offer──► claim (long poll) ◄── remote worker
//!                                   ▲ events: progress, stage done,           │
//!                                   └──────── job done, fail ◄────────────────┘ (lease token)
//! ```
//!
//! A claim leases the job to one worker for `api.lease_secs`; heartbeats
//! and progress renew it. A lease that runs out fails the attempt as
//! retryable ("remote worker W did not renew its lease"), and the engine
//! retries the job later, on any worker, from its first unfinished stage.
//! Every call carries the lease token; a token that is not the job's
//! current lease (expired, stolen, the job cancelled or stopped) is refused
//! with 409 and changes nothing.

mod http;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::{BoxFuture, Stage, StageContext, StageError};
use crate::queue::Broker;

pub use http::{ApiState, router};

/// The OpenAPI document of `/api/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Name under which the embedded daemon knows [`RemoteStage`].
pub const REMOTE_STAGE: &str = "remote";

/// Tokens remembered to say why a lease ended (cancelled or not).
const ENDED_MEMORY: usize = 4096;

/// The config of the API's own daemon: the remote queues, `api.max_jobs`
/// at once, and every remote stage run by [`RemoteStage`]. `None` when
/// the config has no remote job type.
pub fn embedded_config(config: &Config) -> Option<Config> {
    let queues: Vec<String> = config
        .remote_queues()
        .into_iter()
        .map(str::to_owned)
        .collect();
    if queues.is_empty() {
        return None;
    }
    let mut c = config.clone();
    c.worker.id = Some(
        config
            .api
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("api-{}", crate::config::hostname())),
    );
    c.worker.queues = queues;
    c.worker.queue_weights.clear();
    c.worker.concurrency = config.api.max_jobs;
    c.worker.http = None;
    c.schedules.clear();
    c.jobs.retain(|_, j| j.remote);
    for job in c.jobs.values_mut() {
        job.remote = false;
        for stage in &mut job.stages {
            stage.builtin = Some(REMOTE_STAGE.to_owned());
        }
    }
    Some(c)
}

/// Whether a call ends the job's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    Yes,
    No,
}

/// Why a lease is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Expired, given to another worker, or never this job's.
    LeaseLost,
    /// The job was cancelled.
    Cancelled,
    /// `stage` is not the job's current stage.
    WrongStage,
}

/// What a remote worker reported, for the stage waiting on it.
enum Event {
    Progress {
        percent: f64,
        message: Option<String>,
    },
    StageDone {
        result: Value,
    },
    JobDone {
        result: Value,
    },
    Fail {
        error: String,
        retryable: bool,
    },
    /// Given back unfinished: the job goes back to its queue (no attempt
    /// counted) and resumes at this stage.
    Release,
    /// Claimed: the stage waiting on it starts watching the lease.
    Leased,
}

/// A job in the API's hands for one attempt, from its first remote stage
/// to its end.
struct RemoteJob {
    id: String,
    kind: String,
    queue: String,
    payload: Value,
    attempt: u32,
    /// Results of the stages finished by earlier attempts.
    results: Map<String, Value>,
    state: Mutex<JobState>,
    events: mpsc::UnboundedSender<Event>,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    /// Cancelled by [`Dispatch::end`].
    ended: CancellationToken,
}

#[derive(Default)]
struct JobState {
    lease: Option<Lease>,
    /// Stages done in this attempt (reported, maybe not yet consumed).
    done: Vec<String>,
    /// The whole job was reported done, with this result.
    finished: Option<Value>,
}

#[derive(Clone)]
struct Lease {
    token: String,
    worker: String,
    expires: Instant,
}

/// A job as a claim returns it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Claimed {
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub queue: String,
    pub payload: Value,
    pub attempt: u32,
    pub max_attempts: u32,
    pub stages: Vec<String>,
    pub results: Map<String, Value>,
    pub lease: LeaseInfo,
}

/// A lease as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseInfo {
    pub token: String,
    pub expires_at: String,
    pub ttl_secs: u64,
}

/// Remote jobs in flight and the workers' leases on them.
pub struct Dispatch {
    broker: Broker,
    ttl: Duration,
    /// The remote job types, by name.
    types: HashMap<String, RemoteType>,
    inner: Mutex<Inner>,
    /// Woken when a job is offered.
    offered: Notify,
    /// The server's shutdown: unclaimed jobs go back at once.
    shutdown: CancellationToken,
}

/// What a claim tells of a remote job type.
struct RemoteType {
    queue: String,
    stages: Vec<String>,
    max_attempts: u32,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Arc<RemoteJob>>,
    /// Unclaimed jobs, oldest first.
    offers: VecDeque<String>,
    /// Lease token -> job id.
    tokens: HashMap<String, String>,
    /// Recently ended cancelled leases.
    cancelled: HashSet<String>,
    cancelled_order: VecDeque<String>,
}

impl Dispatch {
    pub fn new(config: &Config, broker: Broker, shutdown: CancellationToken) -> Arc<Self> {
        let types = config
            .jobs
            .iter()
            .filter(|(_, j)| j.remote)
            .map(|(name, j)| {
                let t = RemoteType {
                    queue: j.queue.clone(),
                    stages: j.stages.iter().map(|s| s.name.clone()).collect(),
                    max_attempts: config.retry_for(j).max_attempts,
                };
                (name.clone(), t)
            })
            .collect();
        Arc::new(Self {
            broker,
            ttl: Duration::from_secs(config.api.lease_secs),
            types,
            inner: Mutex::new(Inner::default()),
            offered: Notify::new(),
            shutdown,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job a stage of `ctx` belongs to, offered to the workers when it
    /// is new (the first remote stage of this attempt).
    fn enter(self: &Arc<Self>, ctx: &StageContext) -> Arc<RemoteJob> {
        let mut inner = self.inner();
        if let Some(job) = inner.jobs.get(&ctx.job_id)
            && job.attempt == ctx.attempt
        {
            return job.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Arc::new(RemoteJob {
            id: ctx.job_id.clone(),
            kind: ctx.job_type.clone(),
            queue: self
                .types
                .get(&ctx.job_type)
                .map(|t| t.queue.clone())
                .unwrap_or_default(),
            payload: ctx.payload.clone(),
            attempt: ctx.attempt,
            results: ctx.results.clone(),
            state: Mutex::new(JobState::default()),
            events: tx,
            inbox: tokio::sync::Mutex::new(rx),
            ended: CancellationToken::new(),
        });
        // A run stopped between two stages (cancel, lost lease, shutdown)
        // calls no stage again: its stop, which this stage's token follows,
        // ends the job here.
        let (dispatch, watched, stop) = (self.clone(), job.clone(), ctx.cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = watched.ended.cancelled() => {}
                _ = stop.cancelled() => {
                    let cancelled = dispatch.was_cancelled(&watched.queue, &watched.id).await;
                    dispatch.end(&watched, cancelled);
                }
            }
        });
        inner.jobs.insert(ctx.job_id.clone(), job.clone());
        inner.offers.retain(|id| id != &ctx.job_id);
        inner.offers.push_back(ctx.job_id.clone());
        drop(inner);
        self.offered.notify_waiters();
        job
    }

    /// Forgets a job (its attempt ended); its lease is refused from now on.
    fn end(&self, job: &RemoteJob, cancelled: bool) {
        job.ended.cancel();
        let mut inner = self.inner();
        let lease = lock(&job.state).lease.take();
        if let Some(lease) = lease {
            inner.tokens.remove(&lease.token);
            if cancelled {
                inner.cancelled.insert(lease.token.clone());
                inner.cancelled_order.push_back(lease.token);
                while inner.cancelled_order.len() > ENDED_MEMORY {
                    if let Some(old) = inner.cancelled_order.pop_front() {
                        inner.cancelled.remove(&old);
                    }
                }
            }
        }
        if inner
            .jobs
            .get(&job.id)
            .is_some_and(|j| std::ptr::eq(Arc::as_ptr(j), job))
        {
            inner.jobs.remove(&job.id);
        }
        inner.offers.retain(|id| id != &job.id);
    }

    /// Takes the oldest unclaimed job of one of `kinds` (any remote type
    /// when empty) and leases it to `worker`.
    pub fn take(&self, worker: &str, kinds: &[String]) -> Option<Claimed> {
        let mut inner = self.inner();
        let pos = inner.offers.iter().position(|id| {
            inner
                .jobs
                .get(id)
                .is_some_and(|j| kinds.is_empty() || kinds.contains(&j.kind))
        })?;
        let id = inner.offers.remove(pos)?;
        let job = inner.jobs.get(&id)?.clone();
        let token = Broker::new_token(worker);
        let expires = Instant::now() + self.ttl;
        lock(&job.state).lease = Some(Lease {
            token: token.clone(),
            worker: worker.to_owned(),
            expires,
        });
        inner.tokens.insert(token.clone(), id.clone());
        drop(inner);
        let _ = job.events.send(Event::Leased);
        tracing::info!(job_id = %id, worker = %worker, attempt = job.attempt, "remote_job_claimed");
        let kind = self.types.get(&job.kind);
        Some(Claimed {
            job_id: id,
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            payload: job.payload.clone(),
            attempt: job.attempt,
            max_attempts: kind.map_or(1, |t| t.max_attempts),
            stages: kind.map(|t| t.stages.clone()).unwrap_or_default(),
            results: job.results.clone(),
            lease: self.lease_info(&token, expires),
        })
    }

    fn lease_info(&self, token: &str, expires: Instant) -> LeaseInfo {
        let left = expires.saturating_duration_since(Instant::now());
        LeaseInfo {
            token: token.to_owned(),
            expires_at: crate::time::rfc3339_of(SystemTime::now() + left),
            ttl_secs: self.ttl.as_secs(),
        }
    }

    /// Runs `f` on job `job_id`'s state while `token` is its live lease,
    /// all under the state's lock: no expiry, end or other call can come
    /// between the check and the change. When `f` says the lease ends
    /// (`Ends::Yes`), it is taken and refused from then on.
    fn with_lease<R>(
        &self,
        job_id: &str,
        token: &str,
        f: impl FnOnce(&RemoteJob, &mut JobState) -> Result<(R, Ends), Refusal>,
    ) -> Result<R, Refusal> {
        let job = {
            let inner = self.inner();
            let job = match inner.tokens.get(token) {
                Some(id) if id == job_id => inner.jobs.get(id).cloned(),
                _ => None,
            };
            match job {
                Some(job) => job,
                None if inner.cancelled.contains(token) => return Err(Refusal::Cancelled),
                None => return Err(Refusal::LeaseLost),
            }
        };
        let mut state = lock(&job.state);
        let live = state
            .lease
            .as_ref()
            .is_some_and(|l| l.token == token && l.expires > Instant::now());
        if !live {
            return Err(Refusal::LeaseLost);
        }
        let (out, ends) = f(&job, &mut state)?;
        if ends == Ends::Yes {
            state.lease = None;
            drop(state);
            self.inner().tokens.remove(token);
        }
        Ok(out)
    }

    /// Renews a lease.
    pub fn heartbeat(&self, job_id: &str, token: &str) -> Result<LeaseInfo, Refusal> {
        let expires = Instant::now() + self.ttl;
        self.with_lease(job_id, token, |_, state| {
            if let Some(l) = state.lease.as_mut() {
                l.expires = expires;
            }
            Ok(((), Ends::No))
        })?;
        Ok(self.lease_info(token, expires))
    }

    /// The stage the job is at now (the first one neither finished
    /// earlier nor reported done).
    fn current_stage(&self, job: &RemoteJob, state: &JobState) -> Option<String> {
        self.types.get(&job.kind)?.stages.iter().find_map(|s| {
            (!job.results.contains_key(s) && !state.done.contains(s)).then(|| s.clone())
        })
    }

    fn check_stage(
        &self,
        job: &RemoteJob,
        state: &JobState,
        stage: Option<&str>,
    ) -> Result<String, Refusal> {
        let current = self.current_stage(job, state).ok_or(Refusal::WrongStage)?;
        match stage {
            Some(s) if s != current => Err(Refusal::WrongStage),
            _ => Ok(current),
        }
    }

    /// Progress of the current stage; renews the lease.
    pub fn progress(
        &self,
        job_id: &str,
        token: &str,
        stage: Option<&str>,
        percent: f64,
        message: Option<String>,
    ) -> Result<LeaseInfo, Refusal> {
        let expires = Instant::now() + self.ttl;
        self.with_lease(job_id, token, |job, state| {
            self.check_stage(job, state, stage)?;
            if let Some(l) = state.lease.as_mut() {
                l.expires = expires;
            }
            let _ = job.events.send(Event::Progress { percent, message });
            Ok(((), Ends::No))
        })?;
        Ok(self.lease_info(token, expires))
    }

    /// Finishes the current stage (`stage` given) or the whole job. Returns
    /// the next stage, if the job has one. Completing a stage again (a
    /// retried call whose answer was lost) answers the same.
    pub fn complete(
        &self,
        job_id: &str,
        token: &str,
        stage: Option<&str>,
        result: Value,
    ) -> Result<Option<String>, Refusal> {
        self.with_lease(job_id, token, |job, state| {
            if let Some(s) = stage
                && state.done.iter().any(|d| d == s)
            {
                return Ok((self.current_stage(job, state), Ends::No));
            }
            let current = self.check_stage(job, state, stage)?;
            // A daemon that is shutting down starts no further stage: the
            // job goes back to its queue after this one, and resumes at
            // the next stage later, so this lease ends here.
            let draining = self.shutdown.is_cancelled();
            if stage.is_none() && !draining {
                state.finished = Some(result.clone());
                let _ = job.events.send(Event::JobDone { result });
                return Ok((None, Ends::Yes));
            }
            state.done.push(current);
            let next = self.current_stage(job, state).filter(|_| !draining);
            let _ = job.events.send(Event::StageDone { result });
            match next {
                Some(next) => {
                    if let Some(l) = state.lease.as_mut() {
                        l.expires = Instant::now() + self.ttl;
                    }
                    Ok((Some(next), Ends::No))
                }
                None => Ok((None, Ends::Yes)),
            }
        })
    }

    /// Fails the attempt.
    pub fn fail(
        &self,
        job_id: &str,
        token: &str,
        error: String,
        retryable: bool,
    ) -> Result<(), Refusal> {
        self.with_lease(job_id, token, |job, _| {
            let _ = job.events.send(Event::Fail { error, retryable });
            Ok(((), Ends::Yes))
        })
    }

    /// Gives the job back: it returns to the head of its queue, its
    /// attempt not counted, and resumes at its current stage.
    pub fn give_back(&self, job_id: &str, token: &str) -> Result<(), Refusal> {
        self.with_lease(job_id, token, |job, _| {
            let _ = job.events.send(Event::Release);
            Ok(((), Ends::Yes))
        })
    }

    /// A `Notified` future taken before looking at the offers, so that an
    /// offer made in between is not missed.
    pub fn offered(&self) -> tokio::sync::futures::Notified<'_> {
        self.offered.notified()
    }

    /// Whether job `id` (on `queue`) was cancelled.
    async fn was_cancelled(&self, queue: &str, id: &str) -> bool {
        let runs = [(queue.to_owned(), id.to_owned(), String::new())];
        let asked = tokio::time::timeout(Duration::from_secs(2), self.broker.check_runs(&runs));
        matches!(
            asked.await.as_ref().map(|r| r.as_deref()),
            Ok(Ok([(_, true)]))
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stage of every remote job type in the API's daemon: hands the stage
/// to the remote worker holding (or about to claim) the job, and returns
/// what it reports.
pub struct RemoteStage {
    dispatch: Arc<Dispatch>,
}

impl RemoteStage {
    pub fn new(dispatch: Arc<Dispatch>) -> Self {
        Self { dispatch }
    }

    async fn run_stage(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let d = &self.dispatch;
        let job = d.enter(ctx);
        let last = d
            .types
            .get(&ctx.job_type)
            .and_then(|t| t.stages.last())
            .is_some_and(|s| s == &ctx.stage);
        let finished = lock(&job.state).finished.clone();
        if let Some(result) = finished {
            if last {
                d.end(&job, false);
            }
            return Ok(result);
        }
        let mut inbox = job.inbox.lock().await;
        loop {
            let deadline = lock(&job.state).lease.as_ref().map(|l| l.expires);
            let unclaimed = deadline.is_none() && lock(&job.state).done.is_empty();
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                event = inbox.recv() => match event {
                    Some(Event::Progress { percent, message }) => ctx.progress(percent, message),
                    Some(Event::StageDone { result }) => {
                        if last {
                            d.end(&job, false);
                        }
                        return Ok(result);
                    }
                    Some(Event::JobDone { result }) => {
                        if last {
                            d.end(&job, false);
                        }
                        return Ok(result);
                    }
                    Some(Event::Fail { error, retryable }) => {
                        d.end(&job, false);
                        return Err(if retryable {
                            StageError::retryable(error)
                        } else {
                            StageError::permanent(error)
                        });
                    }
                    Some(Event::Leased) => {}
                    Some(Event::Release) => {
                        d.end(&job, false);
                        tracing::info!(job_id = %ctx.job_id, stage = %ctx.stage, "remote_job_released");
                        return Err(StageError::interrupted());
                    }
                    None => return Err(StageError::retryable("remote job channel closed")),
                },
                // Shutting down: a job nobody holds goes back at once; a
                // held one may still be reported until the grace ends.
                _ = d.shutdown.cancelled(), if unclaimed => {
                    d.end(&job, false);
                    return Err(StageError::interrupted());
                }
                _ = ctx.cancel.cancelled() => {
                    let cancelled = d.was_cancelled(&job.queue, &ctx.job_id).await;
                    d.end(&job, cancelled);
                    return Err(StageError::interrupted());
                }
                _ = expiry => {
                    // Taken under the lock: no call can renew it after this.
                    let lapsed = {
                        let mut state = lock(&job.state);
                        match &state.lease {
                            Some(l) if l.expires <= Instant::now() => state.lease.take(),
                            _ => None,
                        }
                    };
                    if let Some(Lease { token, worker, .. }) = lapsed {
                        d.inner().tokens.remove(&token);
                        d.end(&job, false);
                        tracing::warn!(job_id = %ctx.job_id, worker = %worker, "remote_lease_expired");
                        return Err(StageError::retryable(format!(
                            "remote worker `{worker}` did not renew its lease within {} s",
                            d.ttl.as_secs()
                        )));
                    }
                }
            }
        }
    }
}

impl Stage for RemoteStage {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(self.run_stage(ctx))
    }
}

/// The API's dispatch and its daemon's task (which ends with the
/// daemon's error, if it could not start).
pub type Started = (Arc<Dispatch>, tokio::task::JoinHandle<Result<(), String>>);

/// Starts the API's daemon when the config has remote job types; the
/// dispatch the HTTP handlers use, and the daemon's task.
pub fn start(
    config: &Config,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<Option<Started>, String> {
    let Some(embedded) = embedded_config(config) else {
        return Ok(None);
    };
    let dispatch = Dispatch::new(config, broker, shutdown.clone());
    let worker = crate::Worker::builder(embedded)
        .stage(REMOTE_STAGE, RemoteStage::new(dispatch.clone()))
        .build()
        .map_err(|e| format!("the remote-worker API's daemon: {e}"))?;
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        worker.run(shutdown).await.map_err(|e| {
            // Without its daemon the API would hand out nothing: stop all.
            tracing::error!(error = %e, "The remote-worker API's daemon stopped");
            stop.cancel();
            format!("the remote-worker API's daemon: {e}")
        })
    });
    Ok(Some((dispatch, task)))
}

/// Tokens by name: `[api] tokens` and `CONVEYOR_API_TOKENS="name=token,..."`.
pub fn tokens(config: &Config) -> Result<Vec<(String, String)>, String> {
    let mut all: Vec<(String, String)> = config
        .api
        .tokens
        .iter()
        .map(|(k, v)| (k.clone(), v.trim().to_owned()))
        .collect();
    if let Ok(env) = std::env::var(TOKENS_ENV) {
        for item in env.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, token)) = item.split_once('=') else {
                return Err(format!("{TOKENS_ENV}: `name=token` pairs expected"));
            };
            if token.trim().len() < 16 {
                return Err(format!(
                    "{TOKENS_ENV}: the token of `{}` must be at least 16 characters",
                    name.trim()
                ));
            }
            all.push((name.trim().to_owned(), token.trim().to_owned()));
        }
    }
    Ok(all)
}

/// Environment variable with more API tokens.
pub const TOKENS_ENV: &str = "CONVEYOR_API_TOKENS";
