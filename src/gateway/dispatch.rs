//! Remote jobs in the gateway's hands, and the workers' leases on them.
//!
//! The embedded daemon offers a job when its first remote stage starts;
//! a claim leases it to one worker; heartbeats, progress and stage reports
//! renew the lease and go to the [`super::stage::RemoteStage`] waiting on
//! the job; the job's end (done, failed, released, cancelled, lease run
//! out) forgets the lease, so a late call with its token is refused.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::ENDED_MEMORY;
use crate::config::Config;
use crate::pipeline::StageContext;
use crate::queue::Broker;

/// Whether a call ends the job's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ends {
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
pub(super) enum Event {
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
pub(super) struct RemoteJob {
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) queue: String,
    pub(super) payload: Value,
    pub(super) attempt: u32,
    /// Results of the stages finished by earlier attempts.
    pub(super) results: Map<String, Value>,
    pub(super) state: Mutex<JobState>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    /// Cancelled by [`Dispatch::end`].
    pub(super) ended: CancellationToken,
}

#[derive(Default)]
pub(super) struct JobState {
    pub(super) lease: Option<Lease>,
    /// Stages done in this attempt (reported, maybe not yet consumed).
    pub(super) done: Vec<String>,
    /// The whole job was reported done, with this result.
    pub(super) finished: Option<Value>,
}

#[derive(Clone)]
pub(super) struct Lease {
    pub(super) token: String,
    pub(super) worker: String,
    pub(super) expires: Instant,
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
    pub(super) broker: Broker,
    pub(super) ttl: Duration,
    /// The remote job types, by name.
    pub(super) types: HashMap<String, RemoteType>,
    pub(super) inner: Mutex<Inner>,
    /// Woken when a job is offered.
    pub(super) offered: Notify,
    /// The server's shutdown: unclaimed jobs go back at once.
    pub(super) shutdown: CancellationToken,
}

/// What a claim tells of a remote job type.
pub(super) struct RemoteType {
    pub(super) queue: String,
    pub(super) stages: Vec<String>,
    pub(super) max_attempts: u32,
}

#[derive(Default)]
pub(super) struct Inner {
    pub(super) jobs: HashMap<String, Arc<RemoteJob>>,
    /// Unclaimed jobs, oldest first.
    pub(super) offers: VecDeque<String>,
    /// Lease token -> job id.
    pub(super) tokens: HashMap<String, String>,
    /// Recently ended cancelled leases.
    pub(super) cancelled: HashSet<String>,
    pub(super) cancelled_order: VecDeque<String>,
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
            ttl: Duration::from_secs(config.gateway.lease_secs),
            types,
            inner: Mutex::new(Inner::default()),
            offered: Notify::new(),
            shutdown,
        })
    }

    pub(super) fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job a stage of `ctx` belongs to, offered to the workers when it
    /// is new (the first remote stage of this attempt).
    pub(super) fn enter(self: &Arc<Self>, ctx: &StageContext) -> Arc<RemoteJob> {
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
    pub(super) fn end(&self, job: &RemoteJob, cancelled: bool) {
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

    pub(super) fn lease_info(&self, token: &str, expires: Instant) -> LeaseInfo {
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
    pub(super) fn with_lease<R>(
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
    pub(super) fn current_stage(&self, job: &RemoteJob, state: &JobState) -> Option<String> {
        self.types.get(&job.kind)?.stages.iter().find_map(|s| {
            (!job.results.contains_key(s) && !state.done.contains(s)).then(|| s.clone())
        })
    }

    pub(super) fn check_stage(
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
    pub(super) async fn was_cancelled(&self, queue: &str, id: &str) -> bool {
        let runs = [(queue.to_owned(), id.to_owned(), String::new())];
        let asked = tokio::time::timeout(Duration::from_secs(2), self.broker.check_runs(&runs));
        matches!(
            asked.await.as_ref().map(|r| r.as_deref()),
            Ok(Ok([(_, true)]))
        )
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
