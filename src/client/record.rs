//! [`Client::job`]'s choice between the job's record in Redis (written by
//! whichever daemon ran it, readable from any host for `[history]
//! retention_secs` after it ended; see [`crate::progress::record`]) and
//! this host's SQLite, the durable local log.
//!
//! The rule: without a SQLite row the record answers; without a record
//! SQLite does. With both, the record wins when it is further along (see
//! [`further_along`]: the job went on on another host), with SQLite's
//! payload, attempts and max attempts; otherwise SQLite's row answers, each
//! stage the record shows as run naming the daemon that ran it from the
//! record. A stage not run yet names no daemon, whichever answers.

use super::{Client, ClientError};
use crate::job::Status;
use crate::progress::record;
use crate::store::JobRecord;

impl Client {
    /// The job's record in Redis, looked for on `queues`.
    pub(super) async fn recorded(
        &self,
        queues: &[String],
        id: &str,
    ) -> Result<Option<JobRecord>, ClientError> {
        let prefix = self.broker.keys().prefix();
        let mut conn = self.broker.conn();
        match record::read(&mut conn, prefix, queues, id).await {
            // A Redis user whose rule predates the records (no `HGETALL`):
            // this host's SQLite and the live state answer, as before.
            Err(err) if err.code() == Some("NOPERM") => Ok(None),
            read => Ok(read?),
        }
    }
}

/// The job as `conveyor job` shows it, from the record and SQLite's row.
pub(super) fn choose(stored: Option<JobRecord>, recorded: Option<JobRecord>) -> Option<JobRecord> {
    let recorded = recorded.map(without_unrun_daemons);
    match (stored, recorded) {
        (None, r) => r,
        (s, None) => s,
        (Some(s), Some(r)) if further_along(&r, &s) => Some(JobRecord {
            payload: s.payload,
            attempts: s.attempts,
            max_attempts: s.max_attempts,
            ..r
        }),
        (Some(mut s), Some(r)) => {
            for (stage, from) in s.stages.iter_mut().zip(&r.stages) {
                if stage.name != from.name {
                    continue;
                }
                // Only a stage the record shows as run names its daemon
                // (SQLite's own is kept otherwise, never blanked).
                if ran(&from.status) && from.worker_id.is_some() {
                    stage.worker_id.clone_from(&from.worker_id);
                }
                if from.pool.is_some() {
                    stage.pool.clone_from(&from.pool);
                }
            }
            Some(s)
        }
    }
}

/// Whether a stage with this record status has run (or is running).
fn ran(status: &str) -> bool {
    status != "pending"
}

/// Records written before stages still to run were left without a daemon
/// named the daemon that started the job on them.
fn without_unrun_daemons(mut r: JobRecord) -> JobRecord {
    for stage in &mut r.stages {
        if !ran(&stage.status) {
            stage.worker_id = None;
        }
    }
    r
}

fn is_final(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_final)
}

/// Whether the record says more than SQLite's row. Clocks of two hosts are
/// compared last, only when nothing else tells:
/// - a final record beats a row that is not (the job ended elsewhere after
///   it left this host, or after this host's daemon died with it);
/// - neither final: the later attempt wins; at the same attempt, a row of a
///   job that left this host (`handed_over`, `pending`: requeued) gives way
///   to the record, which follows the job wherever it went;
/// - otherwise the record wins when it is newer and the job's state moved
///   on (another status, attempt, or more progress). A final row and a
///   living record: the record is behind, or the job was revived (attempts
///   start again at 1 then, so only the times can tell).
fn further_along(r: &JobRecord, s: &JobRecord) -> bool {
    let (r_final, s_final) = (is_final(&r.status), is_final(&s.status));
    if r_final && !s_final {
        return true;
    }
    if !r_final && !s_final {
        if r.attempt != s.attempt {
            return r.attempt > s.attempt;
        }
        let left_here = matches!(
            Status::parse(&s.status),
            Some(Status::HandedOver | Status::Pending)
        );
        if left_here {
            return true;
        }
    }
    let newer = crate::time::parse_rfc3339_ms(&r.updated_at).ok()
        > crate::time::parse_rfc3339_ms(&s.updated_at).ok();
    newer && (r.status != s.status || r.attempt != s.attempt || r.progress > s.progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StageRecord;
    use serde_json::{Value, json};

    fn job(status: &str, attempt: u32, progress: f64, at: &str, worker: &str) -> JobRecord {
        JobRecord {
            id: "j".into(),
            kind: "t".into(),
            queue: "q".into(),
            status: status.into(),
            attempt,
            max_attempts: None,
            progress,
            stage: None,
            error: None,
            worker_id: Some(worker.into()),
            payload: Value::Null,
            created_at: String::new(),
            updated_at: at.into(),
            started_at: None,
            finished_at: None,
            stages: vec![StageRecord {
                name: "a".into(),
                status: "completed".into(),
                attempt,
                started_at: None,
                finished_at: None,
                result: Value::Null,
                error: None,
                worker_id: (worker == "redis").then(|| "w-redis".to_owned()),
                pool: (worker == "redis").then(|| "gpu".to_owned()),
            }],
            attempts: Vec::new(),
            due_at: None,
            waiting: None,
        }
    }

    #[test]
    fn the_record_answers_alone_or_when_further_along() {
        let t0 = "2026-12-01T10:00:00.000Z";
        let t1 = "2026-12-01T10:00:05.000Z";
        let r = job("completed", 1, 100.0, t1, "redis");
        assert_eq!(choose(None, Some(r.clone())).unwrap().status, "completed");
        assert!(choose(None, None).is_none());
        // SQLite saw the job requeued; another host completed it since.
        let mut s = job("pending", 1, 50.0, t0, "sqlite");
        s.payload = json!({"k": 1});
        let got = choose(Some(s.clone()), Some(r.clone())).unwrap();
        assert_eq!(got.status, "completed");
        assert_eq!(got.payload, json!({"k": 1}));
        // The same end on both: SQLite's row, with the record's daemons.
        let s = job("completed", 1, 100.0, t0, "sqlite");
        let got = choose(Some(s), Some(r.clone())).unwrap();
        assert_eq!(got.worker_id.as_deref(), Some("sqlite"));
        assert_eq!(got.stages[0].worker_id.as_deref(), Some("w-redis"));
        assert_eq!(got.stages[0].pool.as_deref(), Some("gpu"));
        // An older record never wins.
        let s = job("failed", 2, 40.0, t1, "sqlite");
        let old = job("running", 1, 10.0, t0, "redis");
        assert_eq!(choose(Some(s), Some(old)).unwrap().status, "failed");
    }

    fn stage(name: &str, status: &str, worker: Option<&str>, pool: Option<&str>) -> StageRecord {
        StageRecord {
            name: name.into(),
            status: status.into(),
            attempt: 1,
            started_at: None,
            finished_at: None,
            result: Value::Null,
            error: None,
            worker_id: worker.map(str::to_owned),
            pool: pool.map(str::to_owned),
        }
    }

    #[test]
    fn only_a_stage_the_record_shows_as_run_names_a_daemon() {
        let t0 = "2026-12-01T10:00:00.000Z";
        // SQLite's row answers (the same end); it knows s0's daemon, the
        // record does not (written before); s1 ran elsewhere; s2 has not
        // run, though an old record named the daemon that started the job.
        let mut s = job("completed", 1, 100.0, t0, "sqlite");
        s.stages = vec![
            stage("s0", "completed", Some("w-here"), Some("a")),
            stage("s1", "pending", None, None),
            stage("s2", "pending", None, None),
        ];
        let mut r = job("completed", 1, 100.0, t0, "redis");
        r.stages = vec![
            stage("s0", "completed", None, None),
            stage("s1", "completed", Some("w-b"), Some("b")),
            stage("s2", "pending", Some("w-starter"), Some("c")),
        ];
        let got = choose(Some(s), Some(r.clone())).unwrap();
        let daemons: Vec<_> = got.stages.iter().map(|s| s.worker_id.as_deref()).collect();
        assert_eq!(daemons, [Some("w-here"), Some("w-b"), None]);
        let pools: Vec<_> = got.stages.iter().map(|s| s.pool.as_deref()).collect();
        assert_eq!(pools, [Some("a"), Some("b"), Some("c")]);
        // The record alone: a stage not run names no daemon either.
        let got = choose(None, Some(r)).unwrap();
        assert_eq!(got.stages[2].worker_id, None);
        assert_eq!(got.stages[1].worker_id.as_deref(), Some("w-b"));
    }

    #[test]
    fn further_along_trusts_ends_and_attempts_before_clocks() {
        let (early, late) = ("2026-12-01T10:00:00.000Z", "2026-12-01T10:00:05.000Z");
        let pick = |s: &JobRecord, r: &JobRecord| {
            let got = choose(Some(s.clone()), Some(r.clone())).unwrap();
            if got.worker_id.as_deref() == Some("redis") {
                "record"
            } else {
                "sqlite"
            }
        };
        // A final record beats a row that is not, even by a clock behind.
        for local in ["running", "pending", "retrying", "handed_over"] {
            let s = job(local, 1, 50.0, late, "sqlite");
            let r = job("completed", 1, 100.0, early, "redis");
            assert_eq!(pick(&s, &r), "record", "{local}");
        }
        // Neither final: the later attempt wins, whatever the clocks say.
        let s = job("running", 2, 10.0, early, "sqlite");
        let r = job("running", 1, 60.0, late, "redis");
        assert_eq!(pick(&s, &r), "sqlite");
        let s = job("retrying", 1, 60.0, late, "sqlite");
        let r = job("running", 2, 10.0, early, "redis");
        assert_eq!(pick(&s, &r), "record");
        // Same attempt, the job left this host (handed over, requeued):
        // the record follows it, even with an older clock.
        for local in ["handed_over", "pending"] {
            let s = job(local, 1, 50.0, late, "sqlite");
            let r = job("running", 1, 50.0, early, "redis");
            assert_eq!(pick(&s, &r), "record", "{local}");
        }
        // Same attempt, running here: the record must be newer and further.
        let s = job("running", 1, 50.0, late, "sqlite");
        let r = job("pending", 1, 50.0, early, "redis");
        assert_eq!(pick(&s, &r), "sqlite");
        let s = job("running", 1, 50.0, early, "sqlite");
        let r = job("running", 1, 75.0, late, "redis");
        assert_eq!(pick(&s, &r), "record");
        // A final row and a living record: newer (a revival elsewhere) or
        // not (the record is behind).
        let s = job("failed", 3, 50.0, early, "sqlite");
        let r = job("running", 1, 10.0, late, "redis");
        assert_eq!(pick(&s, &r), "record");
        let s = job("completed", 1, 100.0, late, "sqlite");
        let r = job("running", 1, 50.0, early, "redis");
        assert_eq!(pick(&s, &r), "sqlite");
    }
}
