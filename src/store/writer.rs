//! The writer thread: batching, group commit, retrying a failed
//! transaction (until a draining daemon gives up), and the checkpointer
//! that keeps the WAL short.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::write::{begin, finish, record, stage};
use super::{Op, Prior, schema};

/// Most operations applied in one transaction.
const BATCH: usize = 1024;

/// WAL size past which the writer restarts the WAL between two batches
/// (see [`Writer::restart_wal`]). The file then stays near this size plus
/// one batch, under any load.
pub(super) const WAL_RESTART_BYTES: u64 = 64 * 1024 * 1024;

/// How long a restarting checkpoint waits for readers (and other daemons'
/// writers) before it gives up until the next batch: never longer than
/// this is added to one batch's latency.
const RESTART_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// What an applied operation answers.
enum Answer {
    Prior(Prior),
    Applied(bool),
    Done,
}

/// Copies the WAL back into the database from its own thread and
/// connection. SQLite would otherwise checkpoint inside the commit that
/// crosses the threshold, with an fsync: every job waiting on that commit
/// (p99 start latency) waited for the disk. A PASSIVE checkpoint never
/// blocks the writer, but under sustained load it never finds the whole
/// WAL copied (new frames keep arriving), so the WAL never starts over and
/// grows without bound: the writer restarts it itself, between batches,
/// once it passes [`WAL_RESTART_BYTES`]. The passive checkpoints keep that
/// restart cheap: most frames are already copied when it runs.
pub(super) struct Checkpointer;

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Held by the checkpointer while its passive checkpoint runs, and by the
/// writer while it restarts the WAL. SQLite does not wait for another
/// checkpoint (it answers busy at once), so without it a passive
/// checkpoint that is running when the WAL crosses the limit, and runs
/// long on a loaded machine, turns restart after restart into a deferral
/// while the WAL keeps growing.
#[derive(Debug, Clone, Default)]
pub(super) struct CheckpointLock(Arc<std::sync::Mutex<()>>);

impl CheckpointLock {
    fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while held poisons nothing worth keeping: the lock guards
        // no data.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Checkpointer {
    /// Checkpoints `path` passively until stopped, except while its WAL
    /// (`wal`) is past `wal_limit`: then the writer restarts it, and a
    /// checkpoint running here would make the writer's wait (SQLite does
    /// not wait for another checkpoint: it answers busy at once).
    pub(super) fn start(
        path: &Path,
        wal: PathBuf,
        wal_limit: u64,
        checkpointing: CheckpointLock,
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
                    let _held = checkpointing.hold();
                    if wal_size(&wal) >= wal_limit {
                        continue;
                    }
                    if let Err(err) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %err, "wal_checkpoint_failed");
                    }
                }
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            })
            .map_err(|e| format!("cannot start checkpoint thread: {e}"))?;
        Ok((stop, handle))
    }
}

fn wal_size(wal: &Path) -> u64 {
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) rx: mpsc::Receiver<Op>,
    pub(super) healthy: Arc<AtomicBool>,
    /// Set by [`super::GiveUp`]: shutdown no longer waits for SQLite.
    pub(super) give_up: Arc<AtomicBool>,
    /// A transaction failed after the give-up: later batches are answered
    /// with an error without trying (a held lock would cost the busy
    /// timeout each time).
    pub(super) gave_up: bool,
    /// The `-wal` file beside the database.
    pub(super) wal: PathBuf,
    /// [`WAL_RESTART_BYTES`], smaller in tests.
    pub(super) wal_limit: u64,
    /// Shared with the [`Checkpointer`]: a restart waits for its passive
    /// checkpoint to end rather than being refused by it.
    pub(super) checkpointing: CheckpointLock,
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        while self.rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            let answers = self.commit_with_retry(&batch);
            for (op, answer) in batch.drain(..).zip(answers) {
                reply(op, answer);
            }
            self.restart_wal();
        }
        // All handles dropped: everything is committed (or, after a
        // give-up, answered with an error). Checkpoint so the WAL does not
        // outgrow the database between runs.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "PASSIVE");
    }

    /// Between batches (nothing of ours is in flight, every answer sent):
    /// once the WAL file passes the limit, a TRUNCATE checkpoint copies
    /// what the passive ones have not yet, and empties the file, so the
    /// next commit writes the WAL from its start. It first waits for a
    /// passive checkpoint of ours that is running ([`CheckpointLock`]:
    /// SQLite would refuse it at once), then for readers and
    /// other daemons' writers at most [`RESTART_BUSY_TIMEOUT`]; when one
    /// still holds the lock or an old snapshot it gives up and tries again
    /// after the next batch.
    fn restart_wal(&mut self) {
        let size = wal_size(&self.wal);
        if size < self.wal_limit {
            return;
        }
        let started = std::time::Instant::now();
        let checkpointing = self.checkpointing.clone();
        let _held = checkpointing.hold();
        let _ = self.conn.busy_timeout(RESTART_BUSY_TIMEOUT);
        let outcome = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
        let _ = self.conn.busy_timeout(schema::BUSY_TIMEOUT);
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match outcome {
            Ok((0, _, _)) => tracing::debug!(wal_bytes = size, elapsed_ms, "wal_restarted"),
            Ok((_, frames, copied)) => tracing::debug!(
                wal_bytes = size,
                elapsed_ms,
                frames,
                copied,
                "wal_restart_busy"
            ),
            Err(err) => tracing::debug!(
                wal_bytes = size,
                elapsed_ms,
                error = %err,
                "wal_restart_failed"
            ),
        }
    }

    fn commit_with_retry(&mut self, batch: &[Op]) -> Vec<Result<Answer, String>> {
        if self.gave_up {
            return refuse(batch.len(), "SQLite writes failing at shutdown");
        }
        let mut backoff = crate::retry::sqlite_write_backoff();
        let mut failures = 0u32;
        loop {
            match self.apply(batch) {
                Ok(answers) => {
                    if failures > 0 {
                        tracing::info!(failures, "sqlite_writes_resumed");
                        self.healthy.store(true, Ordering::Relaxed);
                    }
                    return answers;
                }
                Err(err) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    crate::telemetry::metrics::sqlite_error();
                    if failures.is_multiple_of(20) {
                        tracing::error!(error = %err, ops = batch.len(),
                            "sqlite_transaction_failed");
                    }
                    failures += 1;
                    // Checked before and after the pause, so a give-up
                    // costs no further attempt.
                    if !self.give_up.load(Ordering::Relaxed) {
                        // Endless steps: the fallback is never used.
                        std::thread::sleep(backoff.next().unwrap_or(Duration::from_secs(1)));
                    }
                    if self.give_up.load(Ordering::Relaxed) {
                        tracing::warn!(error = %err, ops = batch.len(),
                            "shutdown_sqlite_batch_dropped");
                        self.gave_up = true;
                        return refuse(batch.len(), &err.to_string());
                    }
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

/// The answers of a batch that is not committed: an error for every
/// operation.
fn refuse(n: usize, why: &str) -> Vec<Result<Answer, String>> {
    let message = format!("not committed: shutdown gave up on SQLite ({why})");
    (0..n).map(|_| Err(message.clone())).collect()
}

fn reply(op: Op, answer: Result<Answer, String>) {
    match (op, answer) {
        (Op::Begin(_, Some(tx)), Ok(Answer::Prior(p))) => {
            let _ = tx.send(Ok(p));
        }
        (Op::Begin(job, None), Err(e)) => {
            tracing::error!(job_id = %job.id, error = %e, "sqlite_write_failed");
        }
        (Op::Begin(_, None), Ok(_)) => {}
        (Op::Finish(_, tx), Ok(Answer::Applied(b))) => {
            let _ = tx.send(Ok(b));
        }
        (Op::Record(_, tx) | Op::Flush(tx), Ok(_)) => {
            let _ = tx.send(Ok(()));
        }
        (Op::Stage(u), Err(e)) => {
            tracing::error!(job_id = %u.job_id, error = %e, "sqlite_write_failed");
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
