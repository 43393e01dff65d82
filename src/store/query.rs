//! Operator queries on the SQLite file: job lists with filters and paging
//! (`conveyor jobs`), and deleting old finished jobs (`conveyor cleanup`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params_from_iter, types::Value as SqlValue};
use serde::Serialize;

use super::{Reader, StoreError, schema};

/// Which jobs `conveyor jobs` lists. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// Only jobs updated at or after this time, in the stored format
    /// (RFC 3339, UTC, milliseconds: [`crate::rfc3339_of_ms`]), which
    /// compares as text.
    pub since: Option<String>,
    /// Only jobs whose id contains this text.
    pub id_contains: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Jobs skipped before the page (newest first).
    pub offset: usize,
}

/// One line of `conveyor jobs`.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub queue: String,
    pub status: String,
    pub attempt: u32,
    pub progress: f64,
    pub stage: Option<String>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

impl Reader {
    /// Jobs matching `filter`, most recently updated first, one page; and
    /// how many match in all.
    pub fn list_jobs(&self, filter: &JobFilter) -> Result<(Vec<JobSummary>, u64), StoreError> {
        let mut clauses = Vec::new();
        let mut args: Vec<SqlValue> = Vec::new();
        let mut add = |clause: &str, value: &Option<String>| {
            if let Some(v) = value {
                clauses.push(clause.to_owned());
                args.push(SqlValue::Text(v.clone()));
            }
        };
        add("status = ?", &filter.status);
        add("type = ?", &filter.kind);
        add("queue = ?", &filter.queue);
        add("updated_at >= ?", &filter.since);
        add("instr(id, ?) > 0", &filter.id_contains);
        let filter_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let total: i64 = self.conn.query_row(
            &format!("SELECT count(*) FROM jobs{filter_sql}"),
            params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        let sql = format!(
            "SELECT id, type, queue, status, attempt, progress, stage, error, worker_id,
                    created_at, updated_at, finished_at
             FROM jobs{filter_sql} ORDER BY updated_at DESC, id LIMIT ? OFFSET ?"
        );
        args.push(SqlValue::Integer(filter.limit as i64));
        args.push(SqlValue::Integer(filter.offset as i64));
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
            Ok(JobSummary {
                id: r.get(0)?,
                kind: r.get(1)?,
                queue: r.get(2)?,
                status: r.get(3)?,
                attempt: r.get(4)?,
                progress: r.get(5)?,
                stage: r.get(6)?,
                error: r.get(7)?,
                worker_id: r.get(8)?,
                created_at: r.get(9)?,
                updated_at: r.get(10)?,
                finished_at: r.get(11)?,
            })
        })?;
        Ok((rows.collect::<Result<_, _>>()?, total as u64))
    }
}

/// Jobs that finished in one minute, per queue and final status.
#[derive(Debug, Clone, Serialize)]
pub struct FinishedCount {
    /// `YYYY-MM-DDTHH:MM` (UTC).
    pub minute: String,
    pub queue: String,
    pub status: String,
    pub count: u64,
}

impl Reader {
    /// Completed and failed jobs per minute, queue and status since `since`
    /// (stored format, see [`JobFilter::since`]); through the
    /// `(status, updated_at)` index, as a finished job's `updated_at` is
    /// its `finished_at`.
    pub fn finished_per_minute(&self, since: &str) -> Result<Vec<FinishedCount>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT substr(coalesce(finished_at, updated_at), 1, 16) AS minute, queue, status, count(*)
             FROM jobs WHERE status IN ('completed', 'failed') AND updated_at >= ?1
             GROUP BY minute, queue, status ORDER BY minute",
        )?;
        let rows = stmt.query_map([since], |r| {
            Ok(FinishedCount {
                minute: r.get(0)?,
                queue: r.get(1)?,
                status: r.get(2)?,
                count: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

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

/// Deletes finished jobs (completed, failed, cancelled) that finished before
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
    let finished = "status IN ('completed', 'failed', 'cancelled')
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
    use crate::store::Store;

    /// A migrated file with `n` jobs: status by index, updated a minute apart.
    async fn fixture(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        drop(store);
        closer.close().await;
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        let statuses = ["completed", "failed", "running", "cancelled", "completed"];
        for (i, status) in statuses.iter().enumerate() {
            let at = format!("2026-11-2{}T00:00:00.000Z", i);
            let kind = if i % 2 == 0 { "even" } else { "odd" };
            conn.execute(
                "INSERT INTO jobs (id, type, queue, status, created_at, updated_at, finished_at)
                 VALUES (?1, ?2, 'q', ?3, ?4, ?4, CASE WHEN ?3 = 'running' THEN NULL ELSE ?4 END)",
                rusqlite::params![format!("j{i}"), kind, status, at],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO stages (job_id, idx, name, status) VALUES (?1, 0, 's', 'completed')",
                [format!("j{i}")],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO attempts (job_id, epoch, attempt, worker_id, status, started_at)
                 VALUES (?1, 0, 1, 'w', 'completed', ?2)",
                rusqlite::params![format!("j{i}"), at],
            )
            .unwrap();
        }
        path
    }

    fn ids(jobs: &[JobSummary]) -> Vec<&str> {
        jobs.iter().map(|j| j.id.as_str()).collect()
    }

    #[tokio::test]
    async fn list_filters_and_pages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture(dir.path()).await;
        let r = Reader::open(&path).unwrap();
        let all = JobFilter {
            limit: 2,
            ..Default::default()
        };
        let (page, total) = r.list_jobs(&all).unwrap();
        assert_eq!((ids(&page), total), (vec!["j4", "j3"], 5));
        let (page, _) = r
            .list_jobs(&JobFilter {
                offset: 4,
                ..all.clone()
            })
            .unwrap();
        assert_eq!(ids(&page), ["j0"]);
        let completed = JobFilter {
            status: Some("completed".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(ids(&r.list_jobs(&completed).unwrap().0), ["j4", "j0"]);
        let odd = JobFilter {
            kind: Some("odd".into()),
            since: Some("2026-11-22T00:00:00.000Z".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(ids(&r.list_jobs(&odd).unwrap().0), ["j3"]);
        let by_id = JobFilter {
            id_contains: Some("3".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(ids(&r.list_jobs(&by_id).unwrap().0), ["j3"]);
        let per_minute = r.finished_per_minute("2026-11-23T00:00:00.000Z").unwrap();
        let got: Vec<_> = per_minute
            .iter()
            .map(|c| (c.minute.as_str(), c.status.as_str(), c.count))
            .collect();
        assert_eq!(got, [("2026-11-24T00:00", "completed", 1)]);
        let none = JobFilter {
            queue: Some("other".into()),
            limit: 10,
            ..Default::default()
        };
        let (page, total) = r.list_jobs(&none).unwrap();
        assert!(page.is_empty());
        assert_eq!(total, 0);
    }

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
        let (left, _) = r
            .list_jobs(&JobFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(ids(&left), ["j4", "j3", "j2"]);
        // Nothing more to delete.
        let again = cleanup(&path, "2026-11-23T00:00:00.000Z", false).unwrap();
        assert_eq!(again.jobs_deleted, 0);
    }
}
