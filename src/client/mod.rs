//! [`Client`]: enqueue, cancel and look up jobs from Rust.
//!
//! The client does what `conveyor enqueue`, `conveyor cancel` and
//! `conveyor job` do, with the same Redis scripts and keys, so jobs it
//! enqueues are unique by id and run by any daemon, the binary or a
//! [`crate::Worker`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde_json::Value;

mod enqueue;
pub mod inspect;
mod record;

pub use enqueue::{EnqueueRequest, Enqueued};
pub(crate) use enqueue::{Prepared, prepare};

use crate::config::Config;
use crate::job::Status;
use crate::progress::ProgressEvent;
use crate::queue::Broker;
use crate::store::{JobRecord, Reader, StoreError};

/// How long [`Client::cancel`] waits for a running job's daemon to confirm
/// (as `conveyor cancel` does).
const CANCEL_CONFIRM_WAIT: Duration = Duration::from_secs(3);

/// What went wrong in a [`Client`] call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// [`Client::connect`] or [`Client::from_config`] could not reach
    /// Redis; the message names the URL, password hidden.
    #[error(transparent)]
    Connect(#[from] crate::queue::ConnectError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The client was made with a config whose `[jobs]` do not have this type.
    #[error("unknown job type `{kind}` (known: {known})")]
    UnknownType { kind: String, known: String },
    #[error("job id {0}")]
    InvalidId(String),
    #[error("queue `{queue}`: {message}")]
    InvalidQueue { queue: String, message: String },
    #[error("key prefix `{prefix}`: {message}")]
    InvalidPrefix { prefix: String, message: String },
    #[error("payload cannot be encoded as JSON: {0}")]
    Payload(String),
    #[error("the due time is before 1970")]
    InvalidTime,
    #[error("job of {size} bytes is over worker.max_job_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    /// [`Client::cancel`] of a job SQLite knows as completed, failed or
    /// cancelled.
    #[error("job {id} is already {status}")]
    AlreadyFinished { id: String, status: String },
    /// A state conveyor does not know, read from Redis or SQLite.
    #[error("unknown job state `{0}`")]
    UnknownStatus(String),
}

/// A handle on the queues of one Redis and key prefix. Cheap to clone: the
/// clones share one multiplexed, self-reconnecting connection.
///
/// ```no_run
/// use std::time::Duration;
///
/// use conveyor::{Client, EnqueueRequest};
/// use serde_json::json;
///
/// #[tokio::main]
/// async fn main() -> Result<(), conveyor::ClientError> {
///     let client = Client::connect("redis://127.0.0.1:6379", "conveyor")
///         .await?
///         .with_store("data/conveyor.db");
///     let job = client
///         .enqueue(
///             EnqueueRequest::new("video.generate")
///                 .payload(json!({ "video_id": 123 }))
///                 .id("video-123")
///                 .delay(Duration::from_secs(30)),
///         )
///         .await?;
///     if !job.added {
///         println!("{} is already {}", job.id, job.status.as_str());
///     }
///     if let Some(info) = client.job(&job.id).await? {
///         println!("{} is {}", info.id, info.status.as_str());
///     }
///     client.cancel(&job.id).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Client {
    broker: Broker,
    /// Job types (their queues) and `max_job_bytes`; defaults for
    /// [`Client::connect`].
    config: Config,
    /// SQLite file to read stored jobs from, if any.
    store: Option<PathBuf>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("Client")
            .field("prefix", &self.config.redis.prefix)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `redis_url` (`redis://[user:password@]host:port[/db]`,
    /// `rediss://`, `redis+unix:///path`) for keys under `prefix`
    /// (`conveyor` is the daemon's default). Retries for a few seconds when
    /// Redis does not answer. Jobs go to queue `default` unless the request
    /// names one; no SQLite file is read (see [`Client::with_store`]).
    pub async fn connect(redis_url: &str, prefix: &str) -> Result<Self, ClientError> {
        check_name(prefix).map_err(|message| ClientError::InvalidPrefix {
            prefix: prefix.to_owned(),
            message,
        })?;
        let mut config = Config::default();
        config.redis.url = redis_url.to_owned();
        config.redis.prefix = prefix.to_owned();
        let broker = Broker::connect(redis_url, prefix).await.map_err(|source| {
            crate::queue::ConnectError {
                url: crate::config::redact_url(redis_url),
                source,
            }
        })?;
        Ok(Self {
            broker,
            config,
            store: None,
        })
    }

    /// Connects as `config` says (`redis.url`, `redis.prefix`). Jobs go to
    /// their type's `queue`, types not in `[jobs]` are refused (unless it has
    /// none), `worker.max_job_bytes` bounds a job's size, and
    /// [`Client::job`] and [`Client::cancel`] read `store.path` when it exists.
    pub async fn from_config(config: &Config) -> Result<Self, ClientError> {
        let prefix = &config.redis.prefix;
        check_name(prefix).map_err(|message| ClientError::InvalidPrefix {
            prefix: prefix.clone(),
            message,
        })?;
        let broker = Broker::connect_config(&config.redis, 6)
            .await
            .map_err(|source| crate::queue::ConnectError {
                url: config.redis.target(),
                source,
            })?;
        Ok(Self {
            broker,
            config: config.clone(),
            store: Some(config.store.path.clone()),
        })
    }

    /// Reads stored jobs from this SQLite file (the daemons' `store.path`).
    pub fn with_store(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Some(path.into());
        self
    }

    /// The Redis handle underneath, for what the client does not cover.
    /// A client on a connection already made (the command line makes its
    /// own, to fail fast), with `config`'s job types, limits and SQLite file.
    pub fn with_broker(broker: Broker, config: &Config) -> Self {
        Self {
            broker,
            config: config.clone(),
            store: Some(config.store.path.clone()),
        }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Enqueues one job, now or later, with the atomic script of
    /// `conveyor enqueue`: a job whose id is pending, scheduled or running
    /// on that queue is not enqueued again ([`Enqueued::added`] is false and
    /// [`Enqueued::status`] is the live job's). A request with an explicit
    /// id starts a new run of that id in SQLite, so an id that ran before
    /// may be enqueued again once it finished.
    pub async fn enqueue(&self, request: EnqueueRequest) -> Result<Enqueued, ClientError> {
        let prepared = prepare(&self.config, request)?;
        self.send(prepared).await
    }

    /// Pushes a job [`prepare`] checked.
    pub(crate) async fn send(&self, p: Prepared) -> Result<Enqueued, ClientError> {
        let enqueued = self
            .broker
            .enqueue(&p.queue, &p.id, &p.kind, &p.body, p.when)
            .await?;
        Ok(Enqueued {
            id: p.id,
            queue: p.queue,
            added: enqueued.added,
            status: parse_status(&enqueued.status)?,
            due: enqueued.due_ms.map(crate::time::time_of_ms),
        })
    }

    /// Cancels a job as `conveyor cancel` does: the cancellation is flagged
    /// on every known queue (a pending or scheduled job is dropped when a
    /// daemon takes it, and never runs) and sent to the daemons (a running
    /// job stops). When the job is running, waits up to 3 s for its daemon
    /// to confirm. Refuses a job that is finished as [`Client::job`] sees
    /// it: by the SQLite file (if any), or by the job's record in Redis
    /// when another host (stage pools: another pool's daemon) finished it;
    /// a job live again in Redis (enqueued anew, running) is not refused.
    ///
    /// A client that neither reads a SQLite file knowing the job nor finds
    /// its record (records off, or past `[history] retention_secs`) cannot
    /// tell a finished job from one that never started: the flag is then
    /// set anyway. It stays until a job with that id is enqueued again
    /// through [`Client::enqueue`] (or `conveyor enqueue`), which clears it;
    /// a raw `LPUSH` of that id would be dropped.
    pub async fn cancel(&self, id: &str) -> Result<Cancelled, ClientError> {
        if let Some(info) = self.job(id).await?
            && info.is_final()
        {
            return Err(ClientError::AlreadyFinished {
                id: id.to_owned(),
                status: info.status.as_str().to_owned(),
            });
        }
        // Listen first, so a running job's confirmation is not missed.
        let mut pubsub = crate::progress::subscribe(&self.broker, Some(id)).await?;
        let queues = self.known_queues().await?;
        // Looked up on both sides of the flag: a daemon can see the flag and
        // settle the job before the second look (its confirmation is then
        // already on the subscription); a job taken after the flag is
        // dropped by the daemon.
        let running_before = self.running_on(&queues, id).await?.is_some();
        self.broker
            .cancel(&queues, id, crate::time::now_ms())
            .await?;
        if !running_before && self.running_on(&queues, id).await?.is_none() {
            return Ok(Cancelled::Recorded);
        }
        let mut messages = pubsub.on_message();
        let confirmed = tokio::time::timeout(CANCEL_CONFIRM_WAIT, async {
            while let Some(msg) = messages.next().await {
                let body: Vec<u8> = msg.get_payload().unwrap_or_default();
                if let Ok(ev) = serde_json::from_slice::<ProgressEvent>(&body)
                    && ev.status == Status::Cancelled
                {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        Ok(if confirmed {
            Cancelled::Stopped
        } else {
            Cancelled::Recorded
        })
    }

    /// A job as `conveyor job` sees it: its live state in Redis (pending or
    /// scheduled through an enqueue script, or running), and its record:
    /// the one in Redis that any host can read (`[history]`), and the row
    /// of the SQLite file the client reads, if any (the record answers for
    /// a job the file does not know, or when it is further along: the job
    /// went on on another host; otherwise the file's row does, each stage
    /// naming its daemon from the record). `None` when none of them knows the id.
    pub async fn job(&self, id: &str) -> Result<Option<JobInfo>, ClientError> {
        let queues = self.known_queues().await?;
        let recorded = self.recorded(&queues, id).await?;
        let record = record::choose(self.stored(id).await?, recorded);
        let live = self.live(&queues, id).await?;
        let stored_status = record
            .as_ref()
            .map(|r| parse_status(&r.status))
            .transpose()?;
        let status = match (stored_status, &live) {
            // SQLite knows a running job best (and a retrying one, which
            // Redis still lists as enqueued).
            (Some(s @ (Status::Running | Status::Retrying)), _) => s,
            // Live Redis state wins over an older SQLite row (the id was
            // enqueued again after it finished).
            (_, Some(live)) => live.status,
            (Some(s), None) => s,
            (None, None) => return Ok(None),
        };
        Ok(Some(JobInfo {
            id: id.to_owned(),
            status,
            live,
            record,
        }))
    }

    /// Every queue the config names and every queue a registered daemon
    /// serves.
    async fn known_queues(&self) -> Result<Vec<String>, ClientError> {
        self.inspector().queues().await
    }

    /// The queue on which a delivery of `id` holds a lease (is running).
    async fn running_on(&self, queues: &[String], id: &str) -> Result<Option<String>, ClientError> {
        if queues.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.hexists(self.broker.keys().leases(q), id);
        }
        let held: Vec<bool> = pipe.query_async(&mut self.broker.conn()).await?;
        Ok(queues
            .iter()
            .zip(held)
            .find_map(|(q, held)| held.then(|| q.clone())))
    }

    async fn live(&self, queues: &[String], id: &str) -> Result<Option<LiveJob>, ClientError> {
        let running = self.running_on(queues, id).await?;
        // The enqueue record: on the running job's queue, else any queue.
        let order = running
            .iter()
            .chain(queues.iter().filter(|q| Some(*q) != running.as_ref()));
        for queue in order {
            if let Some(entry) = self.broker.unique_entry(queue, id).await? {
                let status = match &running {
                    Some(_) => Status::Running,
                    None => parse_status(&entry.state)?,
                };
                return Ok(Some(LiveJob {
                    queue: queue.clone(),
                    status,
                    kind: (!entry.kind.is_empty()).then_some(entry.kind),
                    due: entry
                        .due_ms
                        .filter(|_| running.is_none())
                        .map(crate::time::time_of_ms),
                    enqueued_at: entry.enqueued_ms.map(crate::time::time_of_ms),
                }));
            }
            if running.is_some() {
                break;
            }
        }
        Ok(running.map(|queue| LiveJob {
            queue,
            status: Status::Running,
            kind: None,
            due: None,
            enqueued_at: None,
        }))
    }

    /// The SQLite record of `id`, when the client reads a file that exists.
    async fn stored(&self, id: &str) -> Result<Option<JobRecord>, ClientError> {
        let Some(path) = self.store.clone() else {
            return Ok(None);
        };
        let id = id.to_owned();
        let read = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                if !path.exists() {
                    return Ok(None);
                }
                match Reader::open(&path)?.job(&id) {
                    // The first daemon is still creating the file's tables.
                    Err(StoreError::Sql(rusqlite::Error::SqliteFailure(_, Some(message))))
                        if message.starts_with("no such table") =>
                    {
                        Ok(None)
                    }
                    read => read,
                }
            }
        })
        .await
        .map_err(|e| StoreError::Open {
            path,
            message: format!("the reading task failed: {e}"),
        })?;
        Ok(read?)
    }
}

/// The answer of [`Client::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The job was running; its daemon stopped it and reported it cancelled.
    Stopped,
    /// The cancellation is recorded: the job was not running (a pending or
    /// scheduled job is dropped when a daemon takes it), or its daemon has
    /// not confirmed within 3 s (it stops the job at its next lease check).
    Recorded,
}

/// A job as [`Client::job`] finds it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub id: String,
    /// The job's state: SQLite's for a running or retrying job, else the
    /// live Redis state when there is one, else SQLite's.
    pub status: Status,
    /// Its live state in Redis.
    pub live: Option<LiveJob>,
    /// Its record: stages and their results (and, from this host's
    /// SQLite, attempts and payload); from Redis for a job another host ran.
    pub record: Option<JobRecord>,
}

impl JobInfo {
    /// Completed, failed or cancelled.
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// The stored result of a completed stage.
    pub fn result(&self, stage: &str) -> Option<&Value> {
        self.record
            .as_ref()?
            .stages
            .iter()
            .find(|s| s.name == stage && s.status == "completed")
            .map(|s| &s.result)
    }
}

/// A job that is live in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveJob {
    pub queue: String,
    /// `Running` when a daemon holds it; else `Pending` or `Scheduled` as
    /// enqueued (a scheduled job keeps that state after it came due).
    pub status: Status,
    /// The job type, when the job was enqueued through a client or the CLI.
    pub kind: Option<String>,
    /// When a scheduled job is due.
    pub due: Option<SystemTime>,
    pub enqueued_at: Option<SystemTime>,
}

fn parse_status(s: &str) -> Result<Status, ClientError> {
    Status::parse(s).ok_or_else(|| ClientError::UnknownStatus(s.to_owned()))
}

/// Queue names and prefixes become parts of Redis keys (the config's rule).
pub(super) fn check_name(value: &str) -> Result<(), String> {
    crate::config::name_problem(value).map_or(Ok(()), Err)
}
