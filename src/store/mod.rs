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
//! is never dropped and no job is acked on an uncommitted write. Only when
//! a draining daemon gives up ([`GiveUp`]) does the writer stop retrying:
//! the held batch, and any later one that fails, is answered with an error,
//! so its callers leave their jobs to recovery and the daemon can exit.
//!
//! Readers (the CLI) open their own connections; WAL lets them read while
//! daemons write.
//!
//! This module owns the [`Store`] handle (open, the operations it sends
//! and their types, [`StoreCloser`]) and [`StoreError`]; the writer thread
//! is in `writer`, the SQL it runs in `write`, the read side in `read`
//! ([`Reader`]), `conveyor cleanup` in `cleanup`, and the schema in
//! [`schema`].

mod cleanup;
mod history;
mod read;
pub mod schema;
mod write;
mod writer;

pub use cleanup::{CleanupReport, cleanup};
pub use history::{COUNT_CAP, FinishedCount, JobFilter, JobPage, JobSummary};
pub use read::{AttemptRecord, JobRecord, PoolWait, Reader, StageRecord};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rusqlite::Connection;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::job::Status;
use writer::{Checkpointer, Writer};

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

/// Tells the writer thread that shutdown has given up: a failing
/// transaction is no longer retried but answered with an error (see the
/// module docs). Writes that still succeed are committed as before.
#[derive(Clone)]
pub struct GiveUp(Arc<AtomicBool>);

impl GiveUp {
    pub fn now(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
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
    /// The daemon running the stage, and the stage's pool.
    pub worker_id: String,
    pub pool: String,
    /// When the stage started (also on its end record: a quick stage's
    /// "running" record is never written).
    pub started_at: String,
    pub at: String,
}

/// The end of an attempt: completed, failed, retrying, pending (requeued)
/// or cancelled; or, with stage pools, the end of its part on this host:
/// handed over to the pool of its next stage (`handed_to`).
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
    /// Where a job handed over went (with [`Status::HandedOver`]).
    pub handed_to: Option<HandedTo>,
}

/// The stage a handed-over job goes on with, and that stage's pool: the
/// job row's `stage`, and the `pool` of that stage's row (still pending).
#[derive(Debug, Clone)]
pub struct HandedTo {
    pub index: usize,
    pub stage: String,
    pub pool: String,
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

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    healthy: Arc<AtomicBool>,
    give_up: Arc<AtomicBool>,
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
    ///
    /// The join runs on a thread of its own rather than the runtime's
    /// blocking pool: a caller that stops waiting (a shutdown past its
    /// bound) leaves that thread detached, and the runtime's own shutdown
    /// never waits for it.
    pub async fn close(self) {
        let (done, joined) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("conveyor-sqlite-close".into())
            .spawn(move || {
                let _ = self.writer.join();
                drop(self.stop);
                let _ = self.checkpointer.join();
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = joined.await;
        }
    }
}

/// The WAL file SQLite keeps beside `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

impl Store {
    /// Opens (creating it and its directory if needed), migrates, and starts
    /// the writer thread.
    pub fn open(path: &Path) -> Result<(Self, StoreCloser), StoreError> {
        Self::open_with_wal_limit(path, writer::WAL_RESTART_BYTES)
    }

    /// [`Store::open`] with another WAL restart size (tests).
    fn open_with_wal_limit(path: &Path, wal_limit: u64) -> Result<(Self, StoreCloser), StoreError> {
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
        let give_up = Arc::new(AtomicBool::new(false));
        let checkpointing = writer::CheckpointLock::default();
        let writer = Writer {
            conn,
            rx,
            healthy: healthy.clone(),
            give_up: give_up.clone(),
            gave_up: false,
            wal: wal_path(path),
            wal_limit,
            checkpointing: checkpointing.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("conveyor-sqlite".into())
            .spawn(move || writer.run())
            .map_err(|e| open_err(format!("cannot start writer thread: {e}")))?;
        let (stop, checkpointer) =
            Checkpointer::start(path, wal_path(path), wal_limit, checkpointing)
                .map_err(open_err)?;
        let closer = StoreCloser {
            writer: handle,
            checkpointer,
            stop,
        };
        Ok((
            Self {
                tx,
                healthy,
                give_up,
            },
            closer,
        ))
    }

    /// The switch a draining daemon flips when it gives up (see [`GiveUp`]).
    pub fn give_up_switch(&self) -> GiveUp {
        GiveUp(self.give_up.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use write::tests::begin_job;

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

    #[tokio::test]
    async fn a_give_up_answers_a_held_batch_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.flush().await.unwrap();
        // Another process holds the write lock: the writer's transaction
        // fails after its busy timeout and the batch is held.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let held = tokio::spawn({
            let store = store.clone();
            async move { store.flush().await }
        });
        let healthy = store.health_flag();
        for _ in 0..400 {
            if !healthy.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(
            !healthy.load(std::sync::atomic::Ordering::Relaxed),
            "the writer never failed"
        );
        assert!(!held.is_finished(), "the held batch was answered early");
        store.give_up_switch().now();
        let err = held.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("shutdown gave up on SQLite"),
            "{err}"
        );
        // Later batches are refused without waiting out the lock again.
        let err = store.flush().await.unwrap_err();
        assert!(
            err.to_string().contains("shutdown gave up on SQLite"),
            "{err}"
        );
        drop(store);
        closer.close().await;
        other.execute_batch("ROLLBACK").unwrap();
    }

    /// Sustained load (64 writers that never pause) is what kept the
    /// passive checkpoints from ever restarting the WAL: the writer's own
    /// restart keeps the file near its limit however much goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_sustained_writes() {
        const LIMIT: u64 = 4 * 1024 * 1024;
        const JOBS: usize = 12_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open_with_wal_limit(&path, LIMIT).unwrap();
        let wal = wal_path(&path);
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (wal, done) = (wal.clone(), done.clone());
            std::thread::spawn(move || {
                let mut peak = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                    peak = peak.max(size);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                peak
            })
        };
        // 8 KB payloads: about 100 MB through the WAL, 24 times the limit.
        let payload = format!("\"{}\"", "x".repeat(8 * 1024));
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let (store, payload) = (store.clone(), payload.clone());
                tokio::spawn(async move {
                    for i in (t..JOBS).step_by(64) {
                        let mut job = begin_job(&format!("j{i}"), "l");
                        job.payload = payload.clone();
                        store.begin(job).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        eprintln!("WAL peak {peak} bytes (restart size {LIMIT})");
        drop(store);
        closer.close().await;
        // A batch here is at most 64 jobs (each task waits for its commit),
        // about 0.6 MB: the WAL never holds much more than the limit.
        assert!(
            peak <= 2 * LIMIT,
            "the WAL peaked at {peak} bytes, the limit is {LIMIT}"
        );
        let reader = Reader::open(&path).unwrap();
        assert_eq!(
            reader.counts_by_status().unwrap(),
            vec![("running".into(), JOBS as u64)]
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

    #[test]
    fn migrating_a_version_3_file_keeps_its_stages_without_a_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        let mut conn = Connection::open(&path).unwrap();
        for sql in &schema::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 3;
             INSERT INTO jobs (id, type, queue, status, created_at, updated_at)
                VALUES ('j', 't', 'q', 'completed', 'x', 'x');
             INSERT INTO stages (job_id, idx, name, status, result)
                VALUES ('j', 0, 's0', 'completed', '{\"n\":1}');",
        )
        .unwrap();
        schema::migrate(&mut conn).unwrap();
        drop(conn);
        let reader = Reader::open(&path).unwrap();
        assert_eq!(reader.schema_version().unwrap(), 4);
        let job = reader.job("j").unwrap().unwrap();
        assert_eq!(job.stages.len(), 1);
        assert_eq!(job.stages[0].status, "completed");
        assert_eq!(job.stages[0].result, serde_json::json!({"n": 1}));
        assert_eq!(job.stages[0].worker_id, None);
        assert_eq!(job.stages[0].pool, None);
    }
}
