//! SQLite state: jobs, attempts and stages.
//!
//! One thread owns the write connection. Job tasks send it operations over a
//! bounded channel; it applies everything waiting (up to `BATCH`) in one
//! `BEGIN IMMEDIATE` transaction and then answers the operations that asked
//! for the commit (group commit): thousands of jobs per second cost a few
//! hundred transactions, and nothing is acknowledged before its commit.
//!
//! If a transaction fails (another process holds the lock past the busy
//! timeout, disk full), the writer keeps the batch and retries it with
//! backoff. Callers wait, the bounded channel fills, and intake stops: state
//! is never dropped and no job is acked on an uncommitted write.
//!
//! Readers (the CLI) open their own connections; WAL lets them read while
//! daemons write.

pub mod query;
pub mod schema;
pub use query::{CleanupReport, JobFilter, JobSummary, cleanup};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::progress::Status;

/// Most operations applied in one transaction.
const BATCH: usize = 1024;
/// Operations queued before senders wait (back-pressure on intake).
const CHANNEL_CAPACITY: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("SQLite: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("SQLite write: {0}")]
    Write(String),
    #[error("the store is closed")]
    Closed,
}

/// A job as it starts an attempt on this daemon.
#[derive(Debug, Clone)]
pub struct BeginJob {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub payload: String,
    pub attempt: u32,
    pub max_attempts: u32,
    /// Which story of the job this is (`_conveyor.epoch`): raised by a
    /// revival from the dead list; an enqueue that reuses an id sets it to
    /// the enqueue time. A delivery of a newer epoch than SQLite's row starts
    /// over: the older story's stage results are not resumed from.
    pub epoch: u32,
    /// Stages whose results the job carries (`_conveyor.results`): on a new
    /// epoch, their rows are kept; the others are reset to pending.
    pub carried: Vec<String>,
    /// Fencing token of this delivery: later writes must carry it.
    pub lease: String,
    /// A first delivery: SQLite cannot know the job, so nothing is read.
    pub first: bool,
    pub worker_id: String,
    pub stages: Arc<[String]>,
    pub at: String,
}

/// What SQLite knew of a job before [`Store::begin`].
#[derive(Debug, Clone, Default)]
pub struct Prior {
    pub status: Option<Status>,
    pub attempt: u32,
    pub epoch: u32,
    /// Results of stages recorded as completed, by name.
    pub results: Map<String, Value>,
}

impl Prior {
    /// The job is finished for good as far as a delivery of `epoch` goes:
    /// it is a duplicate, not a revival.
    pub fn finished_for(&self, epoch: u32) -> bool {
        self.status.is_some_and(Status::is_final) && self.epoch >= epoch
    }
}

#[derive(Debug, Clone)]
pub struct StageUpdate {
    pub job_id: String,
    pub lease: String,
    pub index: usize,
    pub name: String,
    pub attempt: u32,
    pub status: &'static str,
    pub result: Option<String>,
    pub error: Option<String>,
    pub progress: f64,
    /// When the stage started (also on its end record: a quick stage's
    /// "running" record is never written).
    pub started_at: String,
    pub at: String,
}

/// The end of an attempt: completed, failed, retrying, pending (requeued)
/// or cancelled.
#[derive(Debug, Clone)]
pub struct FinishJob {
    pub id: String,
    pub lease: String,
    pub status: Status,
    pub attempt: u32,
    pub epoch: u32,
    pub progress: f64,
    pub error: Option<String>,
    pub at: String,
}

/// A job recorded without running: a message that could not run (poison,
/// kept only when the id is new) or a job cancelled before it ran.
#[derive(Debug, Clone)]
pub struct RecordJob {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub payload: String,
    pub status: Status,
    pub error: Option<String>,
    pub worker_id: String,
    pub at: String,
    /// Overwrite the status of a job SQLite already knows (unless final).
    pub overwrite: bool,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Op {
    /// With a reply: the caller needs what was known before; without: a
    /// job's first delivery, of which SQLite cannot know anything.
    Begin(BeginJob, Option<Reply<Prior>>),
    Stage(StageUpdate),
    Finish(FinishJob, Reply<bool>),
    Record(RecordJob, Reply<()>),
    Flush(Reply<()>),
}

/// What an applied operation answers.
enum Answer {
    Prior(Prior),
    Applied(bool),
    Done,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    healthy: Arc<AtomicBool>,
}

/// Joins the writer thread once every [`Store`] handle is dropped, then
/// stops the checkpointer.
pub struct StoreCloser {
    writer: std::thread::JoinHandle<()>,
    checkpointer: std::thread::JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
}

impl StoreCloser {
    /// Waits (off the async runtime) until everything sent is committed.
    pub async fn close(self) {
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.writer.join();
            drop(self.stop);
            let _ = self.checkpointer.join();
        })
        .await;
    }
}

/// Copies the WAL back into the database from its own thread and
/// connection. SQLite would otherwise checkpoint inside the commit that
/// crosses the threshold, with an fsync: every job waiting on that commit
/// (p99 start latency) waited for the disk. A PASSIVE checkpoint never
/// blocks the writer.
struct Checkpointer;

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

impl Checkpointer {
    fn start(
        path: &Path,
    ) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        schema::configure(&conn).map_err(|e| e.to_string())?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("conveyor-checkpoint".into())
            .spawn(move || {
                // Until the closer drops its sender (or sends): then once more.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(err) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %err, "WAL checkpoint failed; retrying later");
                    }
                }
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            })
            .map_err(|e| format!("cannot start checkpoint thread: {e}"))?;
        Ok((stop, handle))
    }
}

impl Store {
    /// Opens (creating it and its directory if needed), migrates, and starts
    /// the writer thread.
    pub fn open(path: &Path) -> Result<(Self, StoreCloser), StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        schema::configure(&conn).map_err(|e| open_err(e.to_string()))?;
        schema::migrate(&mut conn).map_err(open_err)?;
        // The checkpointer thread does it (see [`Checkpointer`]).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            conn,
            rx,
            healthy: healthy.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("conveyor-sqlite".into())
            .spawn(move || writer.run())
            .map_err(|e| open_err(format!("cannot start writer thread: {e}")))?;
        let (stop, checkpointer) = Checkpointer::start(path).map_err(open_err)?;
        let closer = StoreCloser {
            writer: handle,
            checkpointer,
            stop,
        };
        Ok((Self { tx, healthy }, closer))
    }

    /// False while transactions fail (lock held elsewhere, disk full): the
    /// writer is holding its batch and retrying. For health reporting.
    pub fn health_flag(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(StoreError::Write(message)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Records the start of an attempt under a new lease and returns what
    /// was known before. A job already finished for this epoch is left
    /// untouched (the caller drops the duplicate delivery).
    pub async fn begin(&self, job: BeginJob) -> Result<Prior, StoreError> {
        self.call(|r| Op::Begin(job, Some(r))).await
    }

    /// [`Store::begin`] for a job's first delivery: queued, not awaited.
    /// Later writes of the job follow it through the same channel, so they
    /// apply after it.
    pub async fn begin_first(&self, job: BeginJob) -> Result<(), StoreError> {
        self.tx
            .send(Op::Begin(job, None))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Records a stage's state; committed with the next batch, not awaited.
    /// Ignored when the lease is no longer the job's.
    pub async fn stage(&self, update: StageUpdate) -> Result<(), StoreError> {
        self.tx
            .send(Op::Stage(update))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Records the end of an attempt; returns once committed. `Ok(false)`
    /// when the lease is no longer the job's (another delivery took over).
    pub async fn finish(&self, finish: FinishJob) -> Result<bool, StoreError> {
        self.call(|r| Op::Finish(finish, r)).await
    }

    pub async fn record(&self, job: RecordJob) -> Result<(), StoreError> {
        self.call(|r| Op::Record(job, r)).await
    }

    /// Returns once everything sent before is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await
    }
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    healthy: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        while self.rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            let answers = self.commit_with_retry(&batch);
            for (op, answer) in batch.drain(..).zip(answers) {
                reply(op, answer);
            }
        }
        // All handles dropped: everything is committed. Checkpoint so the
        // WAL does not outgrow the database between runs.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "PASSIVE");
    }

    fn commit_with_retry(&mut self, batch: &[Op]) -> Vec<Result<Answer, String>> {
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            match self.apply(batch) {
                Ok(answers) => {
                    if failures > 0 {
                        tracing::info!(failures, "SQLite writes resumed");
                        self.healthy.store(true, Ordering::Relaxed);
                    }
                    return answers;
                }
                Err(err) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    crate::observe::sqlite_error();
                    if failures.is_multiple_of(20) {
                        tracing::error!(error = %err, ops = batch.len(),
                            "SQLite transaction failed; holding the batch and retrying");
                    }
                    failures += 1;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One transaction over the whole batch. A failing statement fails only
    /// its own operation; a failing BEGIN or COMMIT fails the batch.
    fn apply(&mut self, batch: &[Op]) -> rusqlite::Result<Vec<Result<Answer, String>>> {
        // BEGIN IMMEDIATE / COMMIT through cached statements: rusqlite's
        // Transaction parses them anew for every transaction, which showed
        // in profiles of the hot path.
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let answers = batch
            .iter()
            .map(|op| apply_op(&self.conn, op).map_err(|e| e.to_string()))
            .collect();
        if let Err(err) = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut c| c.execute([]))
        {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(err);
        }
        Ok(answers)
    }
}

fn reply(op: Op, answer: Result<Answer, String>) {
    match (op, answer) {
        (Op::Begin(_, Some(tx)), Ok(Answer::Prior(p))) => {
            let _ = tx.send(Ok(p));
        }
        (Op::Begin(job, None), Err(e)) => {
            tracing::error!(job_id = %job.id, error = %e, "SQLite write failed");
        }
        (Op::Begin(_, None), Ok(_)) => {}
        (Op::Finish(_, tx), Ok(Answer::Applied(b))) => {
            let _ = tx.send(Ok(b));
        }
        (Op::Record(_, tx) | Op::Flush(tx), Ok(_)) => {
            let _ = tx.send(Ok(()));
        }
        (Op::Stage(u), Err(e)) => {
            tracing::error!(job_id = %u.job_id, error = %e, "SQLite write failed");
        }
        (Op::Stage(_), Ok(_)) => {}
        (Op::Begin(_, Some(tx)), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Op::Finish(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Op::Record(_, tx) | Op::Flush(tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Op::Begin(_, Some(tx)), Ok(_)) => {
            let _ = tx.send(Err("internal: wrong answer".into()));
        }
        (Op::Finish(_, tx), Ok(_)) => {
            let _ = tx.send(Err("internal: wrong answer".into()));
        }
    }
}

fn apply_op(tx: &Connection, op: &Op) -> rusqlite::Result<Answer> {
    match op {
        Op::Begin(job, _) => begin(tx, job).map(Answer::Prior),
        Op::Stage(u) => stage(tx, u).map(|_| Answer::Done),
        Op::Finish(f, _) => finish(tx, f).map(Answer::Applied),
        Op::Record(r, _) => record(tx, r).map(|()| Answer::Done),
        Op::Flush(_) => Ok(Answer::Done),
    }
}

fn begin(tx: &Connection, job: &BeginJob) -> rusqlite::Result<Prior> {
    let prior: Option<(String, u32, u32)> = if job.first {
        None
    } else {
        tx.prepare_cached("SELECT status, attempt, epoch FROM jobs WHERE id = ?1")?
            .query_row([&job.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
    };
    let mut out = Prior::default();
    let mut new_epoch = false;
    if let Some((status, attempt, epoch)) = prior {
        out.status = Status::parse(&status);
        out.attempt = attempt;
        out.epoch = epoch;
        if out.finished_for(job.epoch) {
            return Ok(out);
        }
        new_epoch = epoch < job.epoch;
    }
    tx.prepare_cached(
        "INSERT INTO jobs (id, type, queue, status, attempt, max_attempts, payload, worker_id,
                           lease, epoch, created_at, updated_at, started_at)
         VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10)
         ON CONFLICT (id) DO UPDATE SET
            status = 'running', attempt = excluded.attempt, queue = excluded.queue,
            max_attempts = excluded.max_attempts, worker_id = excluded.worker_id,
            lease = excluded.lease, epoch = excluded.epoch,
            error = NULL, finished_at = NULL, updated_at = excluded.updated_at,
            started_at = coalesce(jobs.started_at, excluded.started_at)",
    )?
    .execute(params![
        job.id,
        job.kind,
        job.queue,
        job.attempt,
        job.max_attempts,
        job.payload,
        job.worker_id,
        job.lease,
        job.epoch,
        job.at
    ])?;
    tx.prepare_cached(
        "INSERT INTO attempts (job_id, epoch, attempt, worker_id, status, started_at)
         VALUES (?1, ?2, ?3, ?4, 'running', ?5)
         ON CONFLICT (job_id, epoch, attempt) DO UPDATE SET
            status = 'running', worker_id = excluded.worker_id, finished_at = NULL",
    )?
    .execute(params![
        job.id,
        job.epoch,
        job.attempt,
        job.worker_id,
        job.at
    ])?;
    let mut add_stage = tx.prepare_cached(
        "INSERT OR IGNORE INTO stages (job_id, idx, name, status) VALUES (?1, ?2, ?3, 'pending')",
    )?;
    for (i, name) in job.stages.iter().enumerate() {
        add_stage.execute(params![job.id, i as i64, name])?;
    }
    if new_epoch {
        let mut reset = tx.prepare_cached(
            "UPDATE stages SET name = ?3, status = 'pending', attempt = 0, started_at = NULL,
                finished_at = NULL, result = NULL, error = NULL
             WHERE job_id = ?1 AND idx = ?2",
        )?;
        for (i, name) in job.stages.iter().enumerate() {
            if !job.carried.contains(name) {
                reset.execute(params![job.id, i as i64, name])?;
            }
        }
        // What the new story resumes from travels in the job itself.
        return Ok(out);
    }
    if job.first {
        return Ok(out);
    }
    let mut done = tx.prepare_cached(
        "SELECT name, result FROM stages WHERE job_id = ?1 AND status = 'completed' ORDER BY idx",
    )?;
    let rows = done.query_map([&job.id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
    })?;
    for row in rows {
        let (name, result) = row?;
        let value = result
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or(Value::Null);
        out.results.insert(name, value);
    }
    Ok(out)
}

fn stage(tx: &Connection, u: &StageUpdate) -> rusqlite::Result<bool> {
    // Fenced: only the delivery holding the job's lease writes its state.
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET progress = max(progress, ?3), stage = ?4, updated_at = ?5
             WHERE id = ?1 AND lease = ?2",
        )?
        .execute(params![u.job_id, u.lease, u.progress, u.name, u.at])?;
    if changed == 0 {
        return Ok(false);
    }
    let finished = (u.status != "running").then_some(&u.at);
    tx.prepare_cached(
        "INSERT INTO stages (job_id, idx, name, status, attempt, started_at, finished_at, result, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (job_id, idx) DO UPDATE SET
            name = excluded.name, status = excluded.status, attempt = excluded.attempt,
            started_at = excluded.started_at, finished_at = excluded.finished_at,
            result = excluded.result, error = excluded.error",
    )?
    .execute(params![
        u.job_id,
        u.index as i64,
        u.name,
        u.status,
        u.attempt,
        u.started_at,
        finished,
        u.result,
        u.error
    ])?;
    Ok(true)
}

fn finish(tx: &Connection, f: &FinishJob) -> rusqlite::Result<bool> {
    let finished_at = f.status.is_final().then_some(&f.at);
    // Fenced by the lease, which ends with the delivery: nothing more may be
    // written under it.
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET status = ?3, progress = ?4, error = ?5, updated_at = ?6,
                finished_at = ?7, stage = CASE WHEN ?7 IS NULL THEN stage END, lease = NULL
             WHERE id = ?1 AND lease = ?2",
        )?
        .execute(params![
            f.id,
            f.lease,
            f.status.as_str(),
            f.progress,
            f.error,
            f.at,
            finished_at
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    let attempt_status = match f.status {
        Status::Pending => "interrupted",
        Status::Retrying => "failed",
        other => other.as_str(),
    };
    tx.prepare_cached(
        "UPDATE attempts SET status = ?4, finished_at = ?5, error = ?6
         WHERE job_id = ?1 AND epoch = ?2 AND attempt = ?3",
    )?
    .execute(params![
        f.id,
        f.epoch,
        f.attempt,
        attempt_status,
        f.at,
        f.error
    ])?;
    Ok(true)
}

fn record(tx: &Connection, r: &RecordJob) -> rusqlite::Result<()> {
    // A bad message that reuses the id of a known job must not rewrite that
    // job's history (the dead entry and the log carry its reason); a
    // cancellation overwrites anything but a final state.
    let sql = if r.overwrite {
        "INSERT INTO jobs (id, type, queue, status, payload, error, worker_id,
                           created_at, updated_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8)
         ON CONFLICT (id) DO UPDATE SET
            status = excluded.status, error = excluded.error, worker_id = excluded.worker_id,
            updated_at = excluded.updated_at, finished_at = excluded.finished_at, lease = NULL
         WHERE jobs.status NOT IN ('completed', 'failed', 'cancelled')"
    } else {
        "INSERT INTO jobs (id, type, queue, status, payload, error, worker_id,
                           created_at, updated_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8)
         ON CONFLICT (id) DO NOTHING"
    };
    tx.prepare_cached(sql)?.execute(params![
        r.id,
        r.kind,
        r.queue,
        r.status.as_str(),
        r.payload,
        r.error,
        r.worker_id,
        r.at
    ])?;
    Ok(())
}

/// A job as `conveyor job` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub queue: String,
    pub status: String,
    pub attempt: u32,
    pub max_attempts: Option<u32>,
    pub progress: f64,
    pub stage: Option<String>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub payload: Value,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub stages: Vec<StageRecord>,
    pub attempts: Vec<AttemptRecord>,
    /// When a scheduled job is due (RFC 3339); from Redis, not SQLite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub epoch: u32,
    pub attempt: u32,
    pub worker_id: String,
    pub status: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageRecord {
    pub name: String,
    pub status: String,
    pub attempt: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub result: Value,
    pub error: Option<String>,
}

/// Read-only access for the CLI and tests.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        schema::configure(&conn)?;
        Ok(Self { conn })
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let job = self
            .conn
            .query_row(
                "SELECT id, type, queue, status, attempt, max_attempts, progress, stage, error,
                        worker_id, payload, created_at, updated_at, started_at, finished_at
                 FROM jobs WHERE id = ?1",
                [id],
                |r| {
                    Ok(JobRecord {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        queue: r.get(2)?,
                        status: r.get(3)?,
                        attempt: r.get(4)?,
                        max_attempts: r.get(5)?,
                        progress: r.get(6)?,
                        stage: r.get(7)?,
                        error: r.get(8)?,
                        worker_id: r.get(9)?,
                        payload: json_column(r.get(10)?),
                        created_at: r.get(11)?,
                        updated_at: r.get(12)?,
                        started_at: r.get(13)?,
                        finished_at: r.get(14)?,
                        stages: Vec::new(),
                        attempts: Vec::new(),
                        due_at: None,
                    })
                },
            )
            .optional()?;
        let Some(mut job) = job else { return Ok(None) };
        let mut stmt = self.conn.prepare(
            "SELECT name, status, attempt, started_at, finished_at, result, error
             FROM stages WHERE job_id = ?1 ORDER BY idx",
        )?;
        job.stages = stmt
            .query_map([id], |r| {
                Ok(StageRecord {
                    name: r.get(0)?,
                    status: r.get(1)?,
                    attempt: r.get(2)?,
                    started_at: r.get(3)?,
                    finished_at: r.get(4)?,
                    result: json_column(r.get(5)?),
                    error: r.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT epoch, attempt, worker_id, status, started_at, finished_at, error
             FROM attempts WHERE job_id = ?1 ORDER BY epoch, attempt",
        )?;
        job.attempts = stmt
            .query_map([id], |r| {
                Ok(AttemptRecord {
                    epoch: r.get(0)?,
                    attempt: r.get(1)?,
                    worker_id: r.get(2)?,
                    status: r.get(3)?,
                    started_at: r.get(4)?,
                    finished_at: r.get(5)?,
                    error: r.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(job))
    }

    /// Number of jobs per status.
    pub fn counts_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `PRAGMA journal_mode` of the file ("wal" once a worker opened it).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))?)
    }

    /// Schema version of the file (0 = never migrated).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

fn json_column(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin_job(id: &str, lease: &str) -> BeginJob {
        BeginJob {
            id: id.into(),
            kind: "t".into(),
            queue: "default".into(),
            payload: "{\"a\":1}".into(),
            attempt: 1,
            max_attempts: 3,
            epoch: 0,
            lease: lease.into(),
            carried: Vec::new(),
            first: false,
            worker_id: "w1".into(),
            stages: vec!["s0".into(), "s1".into()].into(),
            at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn stage_done(id: &str, lease: &str, index: usize, name: &str) -> StageUpdate {
        StageUpdate {
            job_id: id.into(),
            lease: lease.into(),
            index,
            name: name.into(),
            attempt: 1,
            status: "completed",
            result: Some("{\"ok\":true}".into()),
            error: None,
            progress: 50.0,
            started_at: "2026-01-01T00:00:00.500Z".into(),
            at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    fn finish(id: &str, lease: &str, status: Status) -> FinishJob {
        FinishJob {
            id: id.into(),
            lease: lease.into(),
            status,
            attempt: 1,
            epoch: 0,
            progress: 100.0,
            error: None,
            at: "2026-01-01T00:00:02.000Z".into(),
        }
    }

    #[tokio::test]
    async fn lifecycle_round_trip_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let (store, closer) = Store::open(&path).unwrap();
        let prior = store.begin(begin_job("j1", "a")).await.unwrap();
        assert_eq!(prior.status, None);
        store.stage(stage_done("j1", "a", 0, "s0")).await.unwrap();
        store.flush().await.unwrap();

        // A redelivery sees the finished stage and its result.
        let prior = store.begin(begin_job("j1", "b")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Running));
        assert_eq!(prior.results["s0"], serde_json::json!({"ok": true}));

        assert!(
            store
                .finish(finish("j1", "b", Status::Completed))
                .await
                .unwrap()
        );
        // A completed job is left alone by a duplicate delivery of its epoch.
        let prior = store.begin(begin_job("j1", "c")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Completed));
        assert!(prior.finished_for(0));

        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "completed");
        assert_eq!(job.progress, 100.0);
        assert_eq!(job.payload, serde_json::json!({"a": 1}));
        assert_eq!(job.stages.len(), 2);
        assert_eq!(job.stages[0].status, "completed");
        assert_eq!(job.stages[1].status, "pending");
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].status, "completed");
        assert_eq!(
            reader.counts_by_status().unwrap(),
            vec![("completed".into(), 1)]
        );
        assert_eq!(reader.schema_version().unwrap(), schema::VERSION);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_stale_lease_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "old")).await.unwrap();
        // The job is recovered and delivered again under a new lease.
        store.begin(begin_job("j1", "new")).await.unwrap();
        store.stage(stage_done("j1", "old", 0, "s0")).await.unwrap();
        assert!(
            !store
                .finish(finish("j1", "old", Status::Completed))
                .await
                .unwrap()
        );
        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "running");
        assert_eq!(job.stages[0].status, "pending");
        assert!(
            store
                .finish(finish("j1", "new", Status::Completed))
                .await
                .unwrap()
        );
        // The lease ends with the delivery.
        assert!(
            !store
                .finish(finish("j1", "new", Status::Failed))
                .await
                .unwrap()
        );
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_revived_job_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "a", Status::Failed))
                .await
                .unwrap()
        );
        let mut revived = begin_job("j1", "b");
        revived.epoch = 1;
        let prior = store.begin(revived).await.unwrap();
        assert_eq!(prior.status, Some(Status::Failed));
        assert!(!prior.finished_for(1));
        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "running");
        assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_new_epoch_starts_over_except_the_carried_stages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        store.stage(stage_done("j1", "a", 0, "s0")).await.unwrap();
        store.stage(stage_done("j1", "a", 1, "s1")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "a", Status::Completed))
                .await
                .unwrap()
        );
        // The same epoch again is a duplicate of a finished job.
        let prior = store.begin(begin_job("j1", "x")).await.unwrap();
        assert!(prior.finished_for(0));
        // A later story resumes from nothing SQLite holds.
        let mut again = begin_job("j1", "b");
        again.epoch = 1_763_900_000;
        let prior = store.begin(again).await.unwrap();
        assert!(!prior.finished_for(1_763_900_000));
        assert!(prior.results.is_empty(), "{:?}", prior.results);
        let job = Reader::open(&path).unwrap().job("j1").unwrap().unwrap();
        let statuses: Vec<_> = job.stages.iter().map(|s| s.status.as_str()).collect();
        assert_eq!(statuses, ["pending", "pending"]);
        assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
        // A revival keeps the rows of the stages whose results it carries.
        store.stage(stage_done("j1", "b", 0, "s0")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "b", Status::Failed))
                .await
                .unwrap()
        );
        let mut revived = begin_job("j1", "c");
        revived.epoch = 1_763_900_001;
        revived.carried = vec!["s0".into()];
        store.begin(revived).await.unwrap();
        let job = Reader::open(&path).unwrap().job("j1").unwrap().unwrap();
        let statuses: Vec<_> = job.stages.iter().map(|s| s.status.as_str()).collect();
        assert_eq!(statuses, ["completed", "pending"]);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn poison_with_a_known_id_leaves_the_job_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        let poison = |id: &str| RecordJob {
            id: id.into(),
            kind: "nope".into(),
            queue: "default".into(),
            payload: "null".into(),
            status: Status::Failed,
            error: Some("unknown job type `nope`".into()),
            worker_id: "w1".into(),
            at: "2026-01-01T00:00:03.000Z".into(),
            overwrite: false,
        };
        store.record(poison("j1")).await.unwrap();
        store.record(poison("p1")).await.unwrap();
        drop(store);
        closer.close().await;
        let reader = Reader::open(&path).unwrap();
        let j1 = reader.job("j1").unwrap().unwrap();
        assert_eq!((j1.status.as_str(), j1.kind.as_str()), ("running", "t"));
        let p1 = reader.job("p1").unwrap().unwrap();
        assert_eq!(p1.status, "failed");
        assert_eq!(p1.error.as_deref(), Some("unknown job type `nope`"));
    }

    #[tokio::test]
    async fn two_writers_share_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (a, ca) = Store::open(&path).unwrap();
        let (b, cb) = Store::open(&path).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                s.begin(begin_job(&format!("j{i}"), "l")).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop((a, b));
        ca.close().await;
        cb.close().await;
        let reader = Reader::open(&path).unwrap();
        assert_eq!(
            reader.counts_by_status().unwrap(),
            vec![("running".into(), 200)]
        );
    }

    #[test]
    fn daemons_starting_together_on_a_new_file_all_open_it() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("fresh-{round}.db"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        Store::open(&path).map(|(store, closer)| {
                            drop(store);
                            closer
                        })
                    })
                })
                .collect();
            for h in handles {
                let closer = h.join().unwrap().expect("every daemon opens the store");
                drop(closer);
            }
            let reader = Reader::open(&path).unwrap();
            assert_eq!(reader.schema_version().unwrap(), schema::VERSION);
        }
    }

    #[test]
    fn migrating_a_version_1_file_keeps_its_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO jobs (id, type, queue, status, created_at, updated_at)
                VALUES ('j', 't', 'q', 'failed', 'x', 'x');
             INSERT INTO attempts (job_id, attempt, worker_id, status, started_at, error)
                VALUES ('j', 1, 'w', 'failed', 'x', 'boom');",
        )
        .unwrap();
        schema::migrate(&mut conn).unwrap();
        drop(conn);
        let job = Reader::open(&path).unwrap().job("j").unwrap().unwrap();
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].error.as_deref(), Some("boom"));
    }
}
