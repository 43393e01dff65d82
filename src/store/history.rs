//! The history as lists: jobs with filters and paging, newest first
//! (`conveyor jobs`, the dashboard's `/api/jobs`), and finished jobs per
//! minute. Every query goes through an index or the counts the writer
//! keeps (schema version 3), so a read does not grow with the history.

use rusqlite::{params_from_iter, types::Value as SqlValue};
use serde::Serialize;

use super::StoreError;
use super::read::Reader;

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

/// Most jobs a filter on `since` or an id counts: past it the total is
/// given as "more than" ([`JobPage::total_capped`]). Totals of the other
/// filters are exact, from the counts the writer keeps.
pub const COUNT_CAP: u64 = 10_000;

/// One page of `conveyor jobs` and how many jobs match in all.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    /// Exact, or [`COUNT_CAP`] when `total_capped`.
    pub total: u64,
    /// More than [`COUNT_CAP`] jobs match a `since` or id filter.
    pub total_capped: bool,
}

/// The SQL of [`Reader::list_jobs`] (apart so tests can EXPLAIN it).
pub(crate) struct ListQueries {
    /// The total: over the kept counts, or counted up to the cap.
    pub(crate) count: String,
    pub(crate) capped: bool,
    /// The page; takes `args` then LIMIT and OFFSET.
    pub(crate) page: String,
    pub(crate) args: Vec<SqlValue>,
}

impl ListQueries {
    pub(crate) fn of(filter: &JobFilter) -> Self {
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
        let capped = filter.since.is_some() || filter.id_contains.is_some();
        let count = if capped {
            format!(
                "SELECT count(*) FROM (SELECT 1 FROM jobs{filter_sql} LIMIT {})",
                COUNT_CAP + 1
            )
        } else {
            // The same filters (status, type, queue) over the counts.
            format!("SELECT coalesce(sum(n), 0) FROM job_counts{filter_sql}")
        };
        let page = format!(
            "SELECT id, type, queue, status, attempt, progress, stage, error, worker_id,
                    created_at, updated_at, finished_at
             FROM jobs{filter_sql} ORDER BY updated_at DESC, id LIMIT ? OFFSET ?"
        );
        Self {
            count,
            capped,
            page,
            args,
        }
    }
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
    /// how many match in all. The page walks an index in `updated_at`
    /// order; the total comes from the kept counts, or is counted up to
    /// [`COUNT_CAP`] with a `since` or id filter.
    pub fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let q = ListQueries::of(filter);
        let counted: i64 = self
            .conn
            .query_row(&q.count, params_from_iter(q.args.iter()), |r| r.get(0))?;
        let counted = counted.max(0) as u64;
        let (total, total_capped) = if q.capped {
            (counted.min(COUNT_CAP), counted > COUNT_CAP)
        } else {
            (counted, false)
        };
        let (sql, mut args) = (q.page, q.args);
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
        Ok(JobPage {
            jobs: rows.collect::<Result<_, _>>()?,
            total,
            total_capped,
        })
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
    /// Jobs that became completed or failed, per minute, queue and status,
    /// since `since` (stored format, see [`JobFilter::since`]); from the
    /// per-minute counts the writer keeps (a job revived and finished again
    /// counts in both minutes).
    pub fn finished_per_minute(&self, since: &str) -> Result<Vec<FinishedCount>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT minute, queue, status, n FROM finished_minutes
             WHERE minute >= substr(?1, 1, 16) AND n > 0 ORDER BY minute, queue, status",
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
    use std::path::Path;

    use rusqlite::Connection;

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
        let page = r.list_jobs(&all).unwrap();
        assert_eq!((ids(&page.jobs), page.total), (vec!["j4", "j3"], 5));
        assert!(!page.total_capped);
        let page = r
            .list_jobs(&JobFilter {
                offset: 4,
                ..all.clone()
            })
            .unwrap();
        assert_eq!(ids(&page.jobs), ["j0"]);
        let completed = JobFilter {
            status: Some("completed".into()),
            limit: 10,
            ..Default::default()
        };
        let page = r.list_jobs(&completed).unwrap();
        assert_eq!((ids(&page.jobs), page.total), (vec!["j4", "j0"], 2));
        let odd = JobFilter {
            kind: Some("odd".into()),
            since: Some("2026-11-22T00:00:00.000Z".into()),
            limit: 10,
            ..Default::default()
        };
        let page = r.list_jobs(&odd).unwrap();
        assert_eq!((ids(&page.jobs), page.total), (vec!["j3"], 1));
        let by_id = JobFilter {
            id_contains: Some("3".into()),
            limit: 10,
            ..Default::default()
        };
        let page = r.list_jobs(&by_id).unwrap();
        assert_eq!((ids(&page.jobs), page.total), (vec!["j3"], 1));
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
        let page = r.list_jobs(&none).unwrap();
        assert!(page.jobs.is_empty());
        assert_eq!(page.total, 0);
    }

    /// `n` jobs of generated history in one INSERT ... SELECT (the triggers
    /// keep the counts as for any write): ids `j1..jn`, 3 types, 4 queues,
    /// mostly completed, 1 % failed, 0.1 % running, 0.05 % cancelled;
    /// updated 100 a second from 2026-11-24T00:00:00Z.
    pub(crate) const GENERATE: &str =
        "WITH RECURSIVE x(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM x WHERE i < ?1)
         INSERT INTO jobs (id, type, queue, status, attempt, created_at, updated_at, finished_at)
         SELECT 'j' || i, 't' || (i % 3), 'q' || (i % 4),
                CASE WHEN i % 2000 = 7 THEN 'cancelled' WHEN i % 1000 = 3 THEN 'running'
                     WHEN i % 100 = 1 THEN 'failed' ELSE 'completed' END,
                1, ts, ts, CASE WHEN i % 1000 = 3 THEN NULL ELSE ts END
         FROM (SELECT i, strftime('%Y-%m-%dT%H:%M:%fZ', 1795478400 + i / 100.0, 'unixepoch') AS ts
               FROM x)";

    fn plan(conn: &Connection, sql: &str, args: usize) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = vec![SqlValue::Null; args];
        stmt.query_map(params_from_iter(nulls.iter()), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Reads of a long history go through indexes and the kept counts, and
    /// give what full scans give.
    #[tokio::test]
    async fn history_reads_use_indexes_and_match_full_scans() {
        const N: i64 = 300_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        drop(store);
        closer.close().await;
        let conn = Connection::open(&path).unwrap();
        conn.execute(GENERATE, [N]).unwrap();
        // Jobs move on (the update trigger) and old ones are deleted (the
        // delete trigger).
        conn.execute_batch(
            "UPDATE jobs SET status = 'failed' WHERE status = 'running' AND type = 't0';
             UPDATE jobs SET queue = 'q9' WHERE id IN ('j10', 'j11', 'j12');
             DELETE FROM jobs WHERE rowid <= 1000;",
        )
        .unwrap();
        let r = Reader::open(&path).unwrap();

        let scanned = |sql: &str| -> Vec<(String, u64)> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(
            r.counts_by_status().unwrap(),
            scanned("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
        );
        let since = "2026-11-24T00:40:00.000Z";
        let per_minute: Vec<_> = r
            .finished_per_minute(since)
            .unwrap()
            .into_iter()
            .map(|c| (format!("{} {} {}", c.minute, c.queue, c.status), c.count))
            .collect();
        assert!(per_minute.len() >= 50, "{per_minute:?}");
        assert_eq!(
            per_minute,
            scanned(
                "SELECT substr(coalesce(finished_at, updated_at), 1, 16) || ' ' || queue || ' '
                        || status AS k, count(*)
                 FROM jobs WHERE status IN ('completed', 'failed')
                    AND coalesce(finished_at, updated_at) >= '2026-11-24T00:40:00.000Z'
                 GROUP BY k ORDER BY k"
            )
        );

        let filters = [
            JobFilter::default(),
            JobFilter {
                status: Some("failed".into()),
                ..Default::default()
            },
            JobFilter {
                queue: Some("q1".into()),
                ..Default::default()
            },
            JobFilter {
                kind: Some("t2".into()),
                ..Default::default()
            },
            JobFilter {
                status: Some("running".into()),
                queue: Some("q3".into()),
                kind: Some("t1".into()),
                ..Default::default()
            },
            JobFilter {
                since: Some("2026-11-24T00:49:00.000Z".into()),
                ..Default::default()
            },
            JobFilter {
                since: Some("2026-11-24T00:10:00.000Z".into()),
                ..Default::default()
            },
            JobFilter {
                status: Some("cancelled".into()),
                since: Some("2026-11-24T00:10:00.000Z".into()),
                ..Default::default()
            },
        ];
        let mut capped_seen = false;
        for f in &filters {
            let f = JobFilter {
                limit: 20,
                offset: 40,
                ..f.clone()
            };
            let q = ListQueries::of(&f);
            for sql in [&q.count, &q.page] {
                let args = q.args.len() + if sql == &q.page { 2 } else { 0 };
                let lines = plan(&conn, sql, args);
                assert!(
                    lines
                        .iter()
                        .all(|l| l != "SCAN jobs" && !l.contains("FOR ORDER BY")
                            || l.contains("RIGHT PART")),
                    "{f:?}: {sql}: {lines:?}"
                );
            }
            // The same page and total by full scans, without the indexes.
            let page = r.list_jobs(&f).unwrap();
            let mut stmt = conn
                .prepare(&q.page.replace("FROM jobs", "FROM jobs NOT INDEXED"))
                .unwrap();
            let mut args = q.args.clone();
            args.push(SqlValue::Integer(20));
            args.push(SqlValue::Integer(40));
            let want: Vec<String> = stmt
                .query_map(params_from_iter(args.iter()), |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(ids(&page.jobs), want, "{f:?}");
            let counted: i64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM ({})",
                        q.page
                            .replace("FROM jobs", "FROM jobs NOT INDEXED")
                            .replace("LIMIT ? OFFSET ?", "")
                    ),
                    params_from_iter(q.args.iter()),
                    |r| r.get(0),
                )
                .unwrap();
            let counted = counted as u64;
            let want = if q.capped {
                (counted.min(COUNT_CAP), counted > COUNT_CAP)
            } else {
                (counted, false)
            };
            assert_eq!((page.total, page.total_capped), want, "{f:?}");
            capped_seen |= page.total_capped;
        }
        assert!(capped_seen, "one filter matches more than the cap");
    }
}
