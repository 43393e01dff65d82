//! `conveyor cleanup`: deleting old finished jobs from the SQLite file, in
//! short transactions beside the running daemons' writers.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::{StoreError, schema};

/// What `cleanup` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    pub jobs_deleted: u64,
    pub stages_deleted: u64,
    pub attempts_deleted: u64,
    pub vacuumed: bool,
    /// Size of the database file before and after, in bytes.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Rows deleted per transaction: each batch holds the write lock briefly,
/// so running daemons' commits slip in between.
const CLEANUP_BATCH: i64 = 1000;

/// Deletes jobs done on this host (completed, failed, cancelled, or
/// handed over to another host's stage pool) that finished here before
/// `cutoff` (RFC 3339, UTC, milliseconds, as stored), with their stages and attempts; then
/// `PRAGMA optimize`, and `VACUUM` when asked. Safe while daemons run: it
/// goes through SQLite's locking like any writer, in short batches.
pub fn cleanup(path: &Path, cutoff: &str, vacuum: bool) -> Result<CleanupReport, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    schema::configure(&conn)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut report = CleanupReport {
        bytes_before: size(),
        ..Default::default()
    };
    let finished = "status IN ('completed', 'failed', 'cancelled', 'handed_over')
                    AND coalesce(finished_at, updated_at) < ?1";
    loop {
        let tx = conn.unchecked_transaction()?;
        // Children first, counted; the jobs' cascade would delete them too.
        let ids = format!("SELECT id FROM jobs WHERE {finished} ORDER BY id LIMIT {CLEANUP_BATCH}");
        let stages = tx.execute(
            &format!("DELETE FROM stages WHERE job_id IN ({ids})"),
            [cutoff],
        )?;
        let attempts = tx.execute(
            &format!("DELETE FROM attempts WHERE job_id IN ({ids})"),
            [cutoff],
        )?;
        let jobs = tx.execute(&format!("DELETE FROM jobs WHERE id IN ({ids})"), [cutoff])?;
        if (jobs as i64) < CLEANUP_BATCH {
            // The per-minute throughput of what is gone (the job counts
            // follow the deletes by trigger).
            tx.execute(
                "DELETE FROM finished_minutes WHERE minute < substr(?1, 1, 16)",
                [cutoff],
            )?;
        }
        tx.commit()?;
        report.jobs_deleted += jobs as u64;
        report.stages_deleted += stages as u64;
        report.attempts_deleted += attempts as u64;
        if (jobs as i64) < CLEANUP_BATCH {
            break;
        }
    }
    conn.execute_batch("PRAGMA optimize;")?;
    if vacuum {
        conn.execute_batch("VACUUM;")?;
        report.vacuumed = true;
    }
    // Fold the WAL back so the file sizes mean something.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    report.bytes_after = size();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::history::tests::{fixture, ids};
    use crate::store::{JobFilter, Reader};

    #[tokio::test]
    async fn cleanup_deletes_old_finished_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture(dir.path()).await;
        // Before the 23rd: j0 (completed), j1 (failed), j2 (running: kept).
        let report = cleanup(&path, "2026-11-23T00:00:00.000Z", true).unwrap();
        assert_eq!(report.jobs_deleted, 2);
        assert_eq!(report.stages_deleted, 2);
        assert_eq!(report.attempts_deleted, 2);
        assert!(report.vacuumed);
        let r = Reader::open(&path).unwrap();
        let left = r
            .list_jobs(&JobFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!((ids(&left.jobs), left.total), (vec!["j4", "j3", "j2"], 3));
        assert_eq!(
            r.counts_by_status().unwrap(),
            vec![
                ("cancelled".into(), 1),
                ("completed".into(), 1),
                ("running".into(), 1)
            ]
        );
        // The per-minute figures of the deleted minutes go with them.
        let minutes = r.finished_per_minute("2026-11-01T00:00:00.000Z").unwrap();
        let got: Vec<_> = minutes.iter().map(|c| c.minute.as_str()).collect();
        assert_eq!(got, ["2026-11-24T00:00"]);
        // Nothing more to delete.
        let again = cleanup(&path, "2026-11-23T00:00:00.000Z", false).unwrap();
        assert_eq!(again.jobs_deleted, 0);
    }

    #[tokio::test]
    async fn cleanup_deletes_old_handed_over_jobs_but_no_waiting_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture(dir.path()).await;
        let conn = Connection::open(&path).unwrap();
        // h0: handed over to another pool on the 20th (done here); p0: a
        // requeued job (pending: may still come back, no end time);
        // h1: handed over on the 24th (newer than the cutoff).
        for (id, status, at, finished) in [
            ("h0", "handed_over", "2026-11-20T00:00:00.000Z", true),
            ("p0", "pending", "2026-11-20T00:00:00.000Z", false),
            ("h1", "handed_over", "2026-11-24T00:00:00.000Z", true),
        ] {
            conn.execute(
                "INSERT INTO jobs (id, type, queue, status, created_at, updated_at, finished_at)
                 VALUES (?1, 't', 'q', ?2, ?3, ?3, CASE WHEN ?4 THEN ?3 END)",
                rusqlite::params![id, status, at, finished],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO stages (job_id, idx, name, status) VALUES (?1, 0, 's', 'completed')",
                [id],
            )
            .unwrap();
        }
        drop(conn);
        let report = cleanup(&path, "2026-11-23T00:00:00.000Z", false).unwrap();
        // j0 and j1 of the fixture, and h0.
        assert_eq!(report.jobs_deleted, 3);
        assert_eq!(report.stages_deleted, 3);
        let r = Reader::open(&path).unwrap();
        assert!(r.job("h0").unwrap().is_none());
        assert_eq!(r.job("p0").unwrap().unwrap().status, "pending");
        assert_eq!(r.job("h1").unwrap().unwrap().status, "handed_over");
    }
}
