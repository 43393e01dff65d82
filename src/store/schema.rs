//! Schema and migrations. `PRAGMA user_version` holds how many entries of
//! [`MIGRATIONS`] have been applied; each daemon applies the missing ones at
//! start inside one `BEGIN IMMEDIATE` transaction, so several daemons
//! starting together on one file migrate it exactly once.

use rusqlite::{Connection, TransactionBehavior};

/// Append only: never edit an entry that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, their attempts and stages.
    "CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        type         TEXT NOT NULL,
        queue        TEXT NOT NULL,
        status       TEXT NOT NULL,
        attempt      INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER,
        progress     REAL NOT NULL DEFAULT 0,
        stage        TEXT,
        payload      TEXT,
        error        TEXT,
        worker_id    TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        started_at   TEXT,
        finished_at  TEXT
     ) STRICT;
     CREATE INDEX jobs_by_status ON jobs (status, updated_at);
     CREATE TABLE attempts (
        job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt     INTEGER NOT NULL,
        worker_id   TEXT NOT NULL,
        status      TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        error       TEXT,
        PRIMARY KEY (job_id, attempt)
     ) STRICT, WITHOUT ROWID;
     CREATE TABLE stages (
        job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        idx         INTEGER NOT NULL,
        name        TEXT NOT NULL,
        status      TEXT NOT NULL,
        attempt     INTEGER NOT NULL DEFAULT 0,
        started_at  TEXT,
        finished_at TEXT,
        result      TEXT,
        error       TEXT,
        PRIMARY KEY (job_id, idx)
     ) STRICT, WITHOUT ROWID;",
    // 2: fencing (the lease of the delivery allowed to write a job's state),
    // revivals from the dead list (epoch), attempts numbered per epoch.
    "ALTER TABLE jobs ADD COLUMN lease TEXT;
     ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE attempts_v2 (
        job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        epoch       INTEGER NOT NULL DEFAULT 0,
        attempt     INTEGER NOT NULL,
        worker_id   TEXT NOT NULL,
        status      TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        error       TEXT,
        PRIMARY KEY (job_id, epoch, attempt)
     ) STRICT, WITHOUT ROWID;
     INSERT INTO attempts_v2 (job_id, epoch, attempt, worker_id, status, started_at, finished_at, error)
        SELECT job_id, 0, attempt, worker_id, status, started_at, finished_at, error FROM attempts;
     DROP TABLE attempts;
     ALTER TABLE attempts_v2 RENAME TO attempts;",
    // 3: reads that do not grow with history. Job lists walk an index in
    // `updated_at` order (all jobs, or one queue's, type's or status's);
    // totals and per-minute throughput come from two small tables that
    // triggers keep in the writing transaction, whoever writes (a daemon,
    // `conveyor cleanup`). Filling them scans the jobs once, here.
    "CREATE INDEX jobs_by_updated ON jobs (updated_at);
     CREATE INDEX jobs_by_queue ON jobs (queue, updated_at);
     CREATE INDEX jobs_by_type ON jobs (type, updated_at);
     CREATE TABLE job_counts (
        queue  TEXT NOT NULL,
        type   TEXT NOT NULL,
        status TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (queue, type, status)
     ) STRICT, WITHOUT ROWID;
     INSERT INTO job_counts (queue, type, status, n)
        SELECT queue, type, status, count(*) FROM jobs WHERE true GROUP BY queue, type, status;
     CREATE TABLE finished_minutes (
        minute TEXT NOT NULL,
        queue  TEXT NOT NULL,
        status TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (minute, queue, status)
     ) STRICT, WITHOUT ROWID;
     INSERT INTO finished_minutes (minute, queue, status, n)
        SELECT substr(coalesce(finished_at, updated_at), 1, 16) AS m, queue, status, count(*)
        FROM jobs WHERE status IN ('completed', 'failed')
            AND updated_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')
        GROUP BY m, queue, status;
     CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (queue, type, status, n) VALUES (new.queue, new.type, new.status, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        INSERT INTO finished_minutes (minute, queue, status, n)
            SELECT substr(coalesce(new.finished_at, new.updated_at), 1, 16), new.queue, new.status, 1
            WHERE new.status IN ('completed', 'failed')
            ON CONFLICT DO UPDATE SET n = n + 1;
     END;
     CREATE TRIGGER jobs_counted_update AFTER UPDATE OF queue, type, status ON jobs
        WHEN old.queue IS NOT new.queue OR old.type IS NOT new.type OR old.status IS NOT new.status
     BEGIN
        UPDATE job_counts SET n = n - 1
            WHERE queue = old.queue AND type = old.type AND status = old.status;
        INSERT INTO job_counts (queue, type, status, n) VALUES (new.queue, new.type, new.status, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
     END;
     CREATE TRIGGER jobs_finished_update AFTER UPDATE OF status ON jobs
        WHEN new.status IN ('completed', 'failed') AND old.status IS NOT new.status
     BEGIN
        INSERT INTO finished_minutes (minute, queue, status, n)
            VALUES (substr(coalesce(new.finished_at, new.updated_at), 1, 16), new.queue, new.status, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
     END;
     CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1
            WHERE queue = old.queue AND type = old.type AND status = old.status;
     END;",
    // 4: stage pools. Which daemon ran a stage, and in which pool (stages
    // of one job may run on different hosts). NULL in rows written before.
    "ALTER TABLE stages ADD COLUMN worker_id TEXT;
     ALTER TABLE stages ADD COLUMN pool TEXT;",
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a connection waits for another's lock before failing.
pub(crate) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connection settings shared by the writer and readers.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Several daemons share the file: wait for each other's write
    // transactions instead of failing (rusqlite's default is 5 s too; set it
    // here so the intent is visible).
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Room for every statement the writer prepares (rusqlite keeps 16 by
    // default: fewer than ours, which re-parsed SQL on the hot path).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Switches to WAL (retrying while another daemon starting at the same time
/// holds the lock: SQLite does not apply the busy timeout to this switch).
fn enable_wal(conn: &Connection) -> Result<(), String> {
    let mut backoff = crate::retry::wal_switch_backoff();
    loop {
        let current: rusqlite::Result<String> =
            conn.pragma_query_value(None, "journal_mode", |r| r.get(0));
        let result = match current {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => Ok(mode),
            Ok(_) => conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)),
            Err(e) => Err(e),
        };
        match result {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => return Err(format!("journal_mode is `{mode}`, WAL is required")),
            // The steps end after 10 s of pauses: then the error stands.
            Err(e) if is_busy(&e) => match backoff.next() {
                Some(delay) => std::thread::sleep(delay),
                None => return Err(format!("cannot enable WAL: {e}")),
            },
            Err(e) => return Err(format!("cannot enable WAL: {e}")),
        }
    }
}

/// Another connection holds the lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// Switches to WAL and applies missing migrations.
pub fn migrate(conn: &mut Connection) -> Result<(), String> {
    enable_wal(conn)?;
    // NORMAL in WAL: durable across process crashes (what a job queue on one
    // host needs); a power loss may roll back the last transactions, which
    // recovery then redoes from Redis.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(|e| e.to_string())?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    let current: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if current > VERSION {
        return Err(format!(
            "database schema version {current} is newer than this build ({VERSION}); upgrade conveyor"
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        tx.execute_batch(sql)
            .map_err(|e| format!("migration {} failed: {e}", i + 1))?;
    }
    tx.pragma_update(None, "user_version", VERSION)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}
