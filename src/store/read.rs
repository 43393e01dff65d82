//! The read side, for the CLI, the dashboard and tests: [`Reader`] opens
//! its own read-only connection (WAL lets it read while daemons write) and
//! returns a job with its stages and attempts ([`JobRecord`]), job lists
//! with filters and paging (`conveyor jobs`), counts, and the file's
//! journal mode and schema version.

use std::path::Path;

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, params_from_iter, types::Value as SqlValue,
};
use serde::Serialize;
use serde_json::Value;

use super::{StoreError, schema};

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

/// Which jobs `conveyor jobs` lists. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// Only jobs updated at or after this time, in the stored format
    /// (RFC 3339, UTC, milliseconds: [`crate::time::rfc3339_of_ms`]), which
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
        // A page far past the end is an empty page, not a wrapped offset.
        args.push(SqlValue::Integer(
            i64::try_from(filter.limit).unwrap_or(i64::MAX),
        ));
        args.push(SqlValue::Integer(
            i64::try_from(filter.offset).unwrap_or(i64::MAX),
        ));
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::Store;

    /// A migrated file with `n` jobs: status by index, updated a minute apart.
    pub(crate) async fn fixture(dir: &Path) -> std::path::PathBuf {
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

    pub(crate) fn ids(jobs: &[JobSummary]) -> Vec<&str> {
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
}
