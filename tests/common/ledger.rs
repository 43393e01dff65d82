//! What the tests read back: the daemons' SQLite file (read-only) and the
//! ledger files that stage scripts append `S`/`C` lines to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use super::Harness;

// ---------------------------------------------------------------- SQLite

/// A read-only connection to a daemon's SQLite file (waiting up to 5 s for
/// its writers); `None` while the file does not exist.
pub fn open_sqlite_read_only(path: &Path) -> Option<rusqlite::Connection> {
    if !path.exists() {
        return None;
    }
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    Some(conn)
}

impl Harness {
    /// The job's status in SQLite, read directly (cheaper than the CLI for
    /// polling).
    pub fn job_status(&self, id: &str) -> Option<String> {
        self.sql_query(|c| c.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0)))
    }

    /// Status of one stage of a job in SQLite.
    pub fn stage_status(&self, id: &str, stage: &str) -> Option<String> {
        self.sql_query(|c| {
            c.query_row(
                "SELECT status FROM stages WHERE job_id = ?1 AND name = ?2",
                [id, stage],
                |r| r.get(0),
            )
        })
    }

    /// Number of jobs with `status` in SQLite (0 while there is no database).
    pub fn count_status(&self, status: &str) -> u64 {
        self.sql_query(|c| {
            c.query_row(
                "SELECT count(*) FROM jobs WHERE status = ?1",
                [status],
                |r| r.get::<_, i64>(0),
            )
        })
        .unwrap_or(0) as u64
    }

    /// Ids of the jobs with `status` in SQLite.
    pub fn ids_with_status(&self, status: &str) -> BTreeSet<String> {
        self.ids_with_any_status(&[status])
    }

    /// Ids of the jobs with one of `statuses` in SQLite, read in one query
    /// (empty while there is no database).
    pub fn ids_with_any_status(&self, statuses: &[&str]) -> BTreeSet<String> {
        let marks = vec!["?"; statuses.len()].join(", ");
        let sql = format!("SELECT id FROM jobs WHERE status IN ({marks})");
        self.sql_query(|c| {
            let mut st = c.prepare(&sql)?;
            st.query_map(rusqlite::params_from_iter(statuses), |r| {
                r.get::<_, String>(0)
            })?
            .collect()
        })
        .unwrap_or_default()
    }

    /// Runs a read-only query; `None` when the database or row is missing.
    pub fn sql_query<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        f(&open_sqlite_read_only(&self.db)?).ok()
    }
}

// ---------------------------------------------------------------- ledger

/// Lines of a ledger file written by stage scripts (empty if absent).
pub fn ledger_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many ledger lines start with `prefix` followed by a space or the end
/// (`"S s1 job1"` matches lines `S s1 job1` and `S s1 job1 <pid>`).
pub fn ledger_count(path: &Path, prefix: &str) -> usize {
    ledger_lines(path)
        .iter()
        .filter(|l| *l == prefix || l.starts_with(&format!("{prefix} ")))
        .count()
}

/// `S` (started) and `C` (completed) ledger lines per job id, over all stages.
pub fn ledger_counts(ledger: &Path) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let (mut s, mut c) = (BTreeMap::new(), BTreeMap::new());
    for line in ledger_lines(ledger) {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(_), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let map = if kind == "S" { &mut s } else { &mut c };
        *map.entry(id.to_owned()).or_insert(0) += 1;
    }
    (s, c)
}

/// `S` and `C` ledger lines per (job id, stage); lines of another kind
/// are skipped.
#[allow(clippy::type_complexity)]
pub fn ledger_counts_by_stage(
    ledger: &Path,
) -> (
    HashMap<(String, String), usize>,
    HashMap<(String, String), usize>,
) {
    let (mut starts, mut ends) = (HashMap::new(), HashMap::new());
    for line in ledger_lines(ledger) {
        let mut f = line.split(' ');
        let (Some(kind), Some(stage), Some(job)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let key = (job.to_owned(), stage.to_owned());
        match kind {
            "S" => *starts.entry(key).or_default() += 1,
            "C" => *ends.entry(key).or_default() += 1,
            _ => {}
        }
    }
    (starts, ends)
}

/// The pid logged on a ledger line `S <stage> <id> <pid>`.
pub fn ledger_pid(ledger: &Path, prefix: &str) -> Option<i32> {
    ledger_lines(ledger)
        .iter()
        .find(|l| l.starts_with(&format!("{prefix} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|p| p.parse().ok())
}
