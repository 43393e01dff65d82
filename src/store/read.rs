//! The read side, for the CLI, the dashboard and tests: [`Reader`] opens
//! its own read-only connection (WAL lets it read while daemons write) and
//! returns a job with its stages and attempts ([`JobRecord`]), counts, and
//! the file's journal mode and schema version. Lists of the history are in
//! [`super::history`].

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
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
    /// The daemon that ran it, from the job's record in Redis (this
    /// host's SQLite does not keep it per stage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
}

/// Read-only access for the CLI and tests.
pub struct Reader {
    pub(super) conn: Connection,
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
                    worker_id: None,
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

    /// Number of jobs per status, from the counts the writer keeps.
    pub fn counts_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT status, sum(n) FROM job_counts GROUP BY status HAVING sum(n) > 0
             ORDER BY status",
        )?;
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
