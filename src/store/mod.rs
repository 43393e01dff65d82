//! SQLite state: jobs, attempts and stages.
//!
//! One thread owns the write connection. Job tasks send it operations over a
//! bounded channel; it applies everything waiting (up to [`BATCH`]) in one
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

pub mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
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
    pub worker_id: String,
    pub stages: Vec<String>,
    pub at: String,
}

/// What SQLite knew of a job before [`Store::begin`].
#[derive(Debug, Clone, Default)]
pub struct Prior {
    pub status: Option<Status>,
    pub attempt: u32,
    /// Results of stages recorded as completed, by name.
    pub results: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct StageUpdate {
    pub job_id: String,
    pub index: usize,
    pub name: String,
    pub attempt: u32,
    pub status: &'static str,
    pub result: Option<String>,
    pub error: Option<String>,
    pub progress: f64,
    pub at: String,
}

#[derive(Debug, Clone)]
pub struct FinishJob {
    pub id: String,
    pub status: Status,
    pub attempt: u32,
    pub progress: f64,
    pub error: Option<String>,
    pub at: String,
}

/// A message that could not run, recorded when it had an id.
#[derive(Debug, Clone)]
pub struct PoisonJob {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub payload: String,
    pub error: String,
    pub worker_id: String,
    pub at: String,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Op {
    Begin(BeginJob, Reply<Prior>),
    Stage(StageUpdate),
    Finish(FinishJob, Reply<()>),
    Poison(PoisonJob, Reply<()>),
    Flush(Reply<()>),
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
}

/// Joins the writer thread once every [`Store`] handle is dropped.
pub struct StoreCloser(std::thread::JoinHandle<()>);

impl StoreCloser {
    /// Waits (off the async runtime) until everything sent is committed.
    pub async fn close(self) {
        let _ = tokio::task::spawn_blocking(move || self.0.join()).await;
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
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let handle = std::thread::Builder::new()
            .name("conveyor-sqlite".into())
            .spawn(move || Writer { conn, rx }.run())
            .map_err(|e| open_err(format!("cannot start writer thread: {e}")))?;
        Ok((Self { tx }, StoreCloser(handle)))
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(StoreError::Open {
                path: PathBuf::new(),
                message,
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Records the start of an attempt and returns what was known before.
    /// A job already final is left untouched (the caller acks the duplicate).
    pub async fn begin(&self, job: BeginJob) -> Result<Prior, StoreError> {
        self.call(|r| Op::Begin(job, r)).await
    }

    /// Records a stage's state; committed with the next batch, not awaited.
    pub async fn stage(&self, update: StageUpdate) -> Result<(), StoreError> {
        self.tx
            .send(Op::Stage(update))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Records the end of an attempt; returns once committed.
    pub async fn finish(&self, finish: FinishJob) -> Result<(), StoreError> {
        self.call(|r| Op::Finish(finish, r)).await
    }

    pub async fn poison(&self, poison: PoisonJob) -> Result<(), StoreError> {
        self.call(|r| Op::Poison(poison, r)).await
    }

    /// Returns once everything sent before is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await
    }
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Op>,
}

/// Answers owed once the batch commits.
enum Pending {
    Prior(Reply<Prior>, Result<Prior, String>),
    Unit(Reply<()>, Result<(), String>),
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        while self.rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            let replies = self.commit_with_retry(&mut batch);
            for reply in replies {
                match reply {
                    Pending::Prior(tx, v) => {
                        let _ = tx.send(v);
                    }
                    Pending::Unit(tx, v) => {
                        let _ = tx.send(v);
                    }
                }
            }
        }
        // All handles dropped: everything is committed. Checkpoint so the
        // WAL does not outgrow the database between runs.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "PASSIVE");
    }

    fn commit_with_retry(&mut self, batch: &mut Vec<Op>) -> Vec<Pending> {
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            match self.apply(batch) {
                Ok(results) => {
                    if failures > 0 {
                        tracing::info!(failures, "SQLite writes resumed");
                    }
                    return self.pair(batch, results);
                }
                Err(err) => {
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
    fn apply(&mut self, batch: &[Op]) -> rusqlite::Result<Vec<Result<Option<Prior>, String>>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let results = batch
            .iter()
            .map(|op| apply_op(&tx, op).map_err(|e| e.to_string()))
            .collect();
        tx.commit()?;
        Ok(results)
    }

    fn pair(
        &self,
        batch: &mut Vec<Op>,
        results: Vec<Result<Option<Prior>, String>>,
    ) -> Vec<Pending> {
        let mut out = Vec::new();
        for (op, result) in batch.drain(..).zip(results) {
            match op {
                Op::Begin(job, reply) => {
                    if let Err(e) = &result {
                        tracing::error!(job_id = %job.id, error = %e, "SQLite write failed");
                    }
                    out.push(Pending::Prior(reply, result.map(Option::unwrap_or_default)));
                }
                Op::Stage(u) => {
                    if let Err(e) = result {
                        tracing::error!(job_id = %u.job_id, error = %e, "SQLite write failed");
                    }
                }
                Op::Finish(_, reply) | Op::Poison(_, reply) | Op::Flush(reply) => {
                    out.push(Pending::Unit(reply, result.map(|_| ())));
                }
            }
        }
        out
    }
}

fn apply_op(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<Option<Prior>> {
    match op {
        Op::Begin(job, _) => begin(tx, job).map(Some),
        Op::Stage(u) => stage(tx, u).map(|()| None),
        Op::Finish(f, _) => finish(tx, f).map(|()| None),
        Op::Poison(p, _) => poison(tx, p).map(|()| None),
        Op::Flush(_) => Ok(None),
    }
}

fn begin(tx: &rusqlite::Transaction<'_>, job: &BeginJob) -> rusqlite::Result<Prior> {
    let prior: Option<(String, u32)> = tx
        .prepare_cached("SELECT status, attempt FROM jobs WHERE id = ?1")?
        .query_row([&job.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let mut out = Prior::default();
    if let Some((status, attempt)) = prior {
        out.status = Status::parse(&status);
        out.attempt = attempt;
        if out.status.is_some_and(Status::is_final) {
            return Ok(out);
        }
    }
    tx.prepare_cached(
        "INSERT INTO jobs (id, type, queue, status, attempt, max_attempts, payload, worker_id,
                           created_at, updated_at, started_at)
         VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?8, ?8)
         ON CONFLICT (id) DO UPDATE SET
            status = 'running', attempt = excluded.attempt, queue = excluded.queue,
            max_attempts = excluded.max_attempts, worker_id = excluded.worker_id,
            error = NULL, updated_at = excluded.updated_at,
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
        job.at
    ])?;
    tx.prepare_cached(
        "INSERT INTO attempts (job_id, attempt, worker_id, status, started_at)
         VALUES (?1, ?2, ?3, 'running', ?4)
         ON CONFLICT (job_id, attempt) DO UPDATE SET
            status = 'running', worker_id = excluded.worker_id, finished_at = NULL",
    )?
    .execute(params![job.id, job.attempt, job.worker_id, job.at])?;
    let mut add_stage = tx.prepare_cached(
        "INSERT OR IGNORE INTO stages (job_id, idx, name, status) VALUES (?1, ?2, ?3, 'pending')",
    )?;
    for (i, name) in job.stages.iter().enumerate() {
        add_stage.execute(params![job.id, i as i64, name])?;
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

fn stage(tx: &rusqlite::Transaction<'_>, u: &StageUpdate) -> rusqlite::Result<()> {
    let (started, finished) = if u.status == "running" {
        (Some(&u.at), None)
    } else {
        (None, Some(&u.at))
    };
    tx.prepare_cached(
        "INSERT INTO stages (job_id, idx, name, status, attempt, started_at, finished_at, result, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (job_id, idx) DO UPDATE SET
            name = excluded.name, status = excluded.status, attempt = excluded.attempt,
            started_at = coalesce(excluded.started_at, stages.started_at),
            finished_at = excluded.finished_at,
            result = excluded.result, error = excluded.error",
    )?
    .execute(params![
        u.job_id, u.index as i64, u.name, u.status, u.attempt, started, finished, u.result, u.error
    ])?;
    tx.prepare_cached(
        "UPDATE jobs SET progress = max(progress, ?2), stage = ?3, updated_at = ?4 WHERE id = ?1",
    )?
    .execute(params![u.job_id, u.progress, u.name, u.at])?;
    Ok(())
}

fn finish(tx: &rusqlite::Transaction<'_>, f: &FinishJob) -> rusqlite::Result<()> {
    let finished_at = f.status.is_final().then_some(&f.at);
    tx.prepare_cached(
        "UPDATE jobs SET status = ?2, progress = ?3, error = ?4, updated_at = ?5,
                finished_at = ?6, stage = CASE WHEN ?6 IS NULL THEN stage END
         WHERE id = ?1",
    )?
    .execute(params![
        f.id,
        f.status.as_str(),
        f.progress,
        f.error,
        f.at,
        finished_at
    ])?;
    let attempt_status = match f.status {
        Status::Pending => "interrupted",
        other => other.as_str(),
    };
    tx.prepare_cached(
        "UPDATE attempts SET status = ?3, finished_at = ?4, error = ?5
         WHERE job_id = ?1 AND attempt = ?2",
    )?
    .execute(params![f.id, f.attempt, attempt_status, f.at, f.error])?;
    Ok(())
}

fn poison(tx: &rusqlite::Transaction<'_>, p: &PoisonJob) -> rusqlite::Result<()> {
    // A bad message that reuses the id of a known job must not rewrite that
    // job's history: the dead-list entry and the log carry its reason.
    tx.prepare_cached(
        "INSERT INTO jobs (id, type, queue, status, payload, error, worker_id,
                           created_at, updated_at, finished_at)
         VALUES (?1, ?2, ?3, 'failed', ?4, ?5, ?6, ?7, ?7, ?7)
         ON CONFLICT (id) DO NOTHING",
    )?
    .execute(params![
        p.id,
        p.kind,
        p.queue,
        p.payload,
        p.error,
        p.worker_id,
        p.at
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

    fn begin_job(id: &str) -> BeginJob {
        BeginJob {
            id: id.into(),
            kind: "t".into(),
            queue: "default".into(),
            payload: "{\"a\":1}".into(),
            attempt: 1,
            max_attempts: 3,
            worker_id: "w1".into(),
            stages: vec!["s0".into(), "s1".into()],
            at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn stage_done(id: &str, index: usize, name: &str) -> StageUpdate {
        StageUpdate {
            job_id: id.into(),
            index,
            name: name.into(),
            attempt: 1,
            status: "completed",
            result: Some("{\"ok\":true}".into()),
            error: None,
            progress: 50.0,
            at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    #[tokio::test]
    async fn lifecycle_round_trip_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let (store, closer) = Store::open(&path).unwrap();
        let prior = store.begin(begin_job("j1")).await.unwrap();
        assert_eq!(prior.status, None);
        store.stage(stage_done("j1", 0, "s0")).await.unwrap();
        store.flush().await.unwrap();

        // A redelivery sees the finished stage and its result.
        let prior = store.begin(begin_job("j1")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Running));
        assert_eq!(prior.results["s0"], serde_json::json!({"ok": true}));

        store
            .finish(FinishJob {
                id: "j1".into(),
                status: Status::Completed,
                attempt: 1,
                progress: 100.0,
                error: None,
                at: "2026-01-01T00:00:02.000Z".into(),
            })
            .await
            .unwrap();
        // A completed job is left alone by a duplicate delivery.
        let prior = store.begin(begin_job("j1")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Completed));

        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "completed");
        assert_eq!(job.progress, 100.0);
        assert_eq!(job.payload, serde_json::json!({"a": 1}));
        assert_eq!(job.stages.len(), 2);
        assert_eq!(job.stages[0].status, "completed");
        assert_eq!(job.stages[1].status, "pending");
        assert_eq!(
            reader.counts_by_status().unwrap(),
            vec![("completed".into(), 1)]
        );
        assert_eq!(reader.schema_version().unwrap(), schema::VERSION);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn poison_with_a_known_id_leaves_the_job_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1")).await.unwrap();
        let poison = |id: &str| PoisonJob {
            id: id.into(),
            kind: "nope".into(),
            queue: "default".into(),
            payload: "null".into(),
            error: "unknown job type `nope`".into(),
            worker_id: "w1".into(),
            at: "2026-01-01T00:00:03.000Z".into(),
        };
        store.poison(poison("j1")).await.unwrap();
        store.poison(poison("p1")).await.unwrap();
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
                s.begin(begin_job(&format!("j{i}"))).await.unwrap();
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
}
