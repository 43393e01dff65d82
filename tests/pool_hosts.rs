//! What each host says of a job that passed through it (stage pools, issue
//! 15): real Redis, the real binary, one SQLite file per simulated host.
//! Host a runs stage `s1` (pool a) and hands the job over to host b (pool
//! b) for `s2`. Host a's SQLite row is `handed_over` (done there, with the
//! stage and pool it went to, and an end time for `conveyor cleanup`);
//! `conveyor job` on host a answers with the job's record in Redis while
//! there is one; a stage not run yet names no daemon; `conveyor cancel`
//! on host a refuses a job host b finished; the dashboard's job page names
//! the host of each daemon still registered.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, Harness, enqueue, open_sqlite_read_only, stderr_of, stdout_of, wait_until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Stage `s1` in pool a, `s2` in pool b; `s2_before` is shell run first in
/// `s2`; `history` goes into `[history]`.
fn config(s2_before: &str, history: &str) -> String {
    format!(
        r#"[worker]
fetch_block_ms = 100
shutdown_grace_secs = 1
kill_grace_secs = 1

[history]
{history}

[[jobs.ab.stages]]
name = "s1"
pool = "a"
run = ["sh", "-c", '''cat > /dev/null; echo '{{"result": {{"s1": true}}}}' ''']

[[jobs.ab.stages]]
name = "s2"
pool = "b"
run = ["sh", "-c", '''{s2_before} cat > /dev/null; echo '{{"result": {{"s2": true}}}}' ''']
"#
    )
}

fn host(h: &Harness, id: &str, pools: &str, db: &Path) -> Daemon {
    Daemon::start(
        &h.redis.url(),
        &h.prefix,
        db,
        &h.config,
        id,
        &[("CONVEYOR_POOLS", pools)],
    )
}

/// `(status, finished_at, stage)` of the job's row in one host's file.
fn job_row(db: &Path, id: &str) -> Option<(String, Option<String>, Option<String>)> {
    let conn = open_sqlite_read_only(db)?;
    conn.query_row(
        "SELECT status, finished_at, stage FROM jobs WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .ok()
}

/// `(name, status, worker_id, pool)` of the job's stage rows in one file.
fn stage_rows(db: &Path, id: &str) -> Vec<(String, String, Option<String>, Option<String>)> {
    let conn = open_sqlite_read_only(db).expect("db");
    let mut stmt = conn
        .prepare("SELECT name, status, worker_id, pool FROM stages WHERE job_id = ?1 ORDER BY idx")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn on(db: &Path) -> [(&'static str, &str); 1] {
    [("CONVEYOR_DB", db.to_str().unwrap())]
}

/// `conveyor <args> --json` on the host of `db`, parsed; asserts success.
fn cli_json(h: &Harness, db: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = h.cli(&all, &on(db));
    assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn listed(list: &Value, id: &str) -> Option<String> {
    list["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["id"] == id)
        .map(|j| j["status"].as_str().unwrap_or_default().to_owned())
}

/// Runs one `ab` job through host a and host b; their files.
fn run_one(h: &Harness) -> (String, PathBuf, PathBuf, [Daemon; 2]) {
    let (db_a, db_b) = (h.path("a.db"), h.path("b.db"));
    let da = host(h, "host-a", "a", &db_a);
    let db = host(h, "host-b", "b", &db_b);
    let id = enqueue(h, &["ab", "--payload", r#"{"k":1}"#]);
    wait_until(WAIT, "the job completed on host b", || {
        job_row(&db_b, &id).is_some_and(|r| r.0 == "completed")
    });
    (id, db_a, db_b, [da, db])
}

#[test]
fn the_host_that_handed_a_job_over_records_it_handed_over_and_cleanup_deletes_it() {
    let h = Harness::new(&config("", ""));
    let (id, db_a, db_b, _daemons) = run_one(&h);
    // Host a: done there, with when and where the job went.
    let (status, finished_at, stage) = job_row(&db_a, &id).expect("host a's row");
    assert_eq!(status, "handed_over");
    assert!(finished_at.is_some(), "an end time for cleanup");
    assert_eq!(stage.as_deref(), Some("s2"));
    let rows = stage_rows(&db_a, &id);
    assert_eq!(
        rows,
        vec![
            (
                "s1".into(),
                "completed".into(),
                Some("host-a".into()),
                Some("a".into())
            ),
            ("s2".into(), "pending".into(), None, Some("b".into())),
        ]
    );
    // Host a's lists: `jobs` shows it handed over, `--status handed_over`
    // finds it, `--status pending` (Redis) does not.
    assert_eq!(
        listed(&cli_json(&h, &db_a, &["jobs"]), &id).as_deref(),
        Some("handed_over")
    );
    let handed = cli_json(&h, &db_a, &["jobs", "--status", "handed_over"]);
    assert_eq!(listed(&handed, &id).as_deref(), Some("handed_over"));
    let pending = cli_json(&h, &db_a, &["jobs", "--status", "pending"]);
    assert_eq!(listed(&pending, &id), None, "{pending:#}");
    // `conveyor job` on host a: the record in Redis is further along.
    let job = cli_json(&h, &db_a, &["job", &id]);
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["stages"][1]["worker_id"], "host-b");
    // With host a's payload and attempts.
    assert_eq!(job["payload"], serde_json::json!({"k": 1}), "{job:#}");
    assert_eq!(job["attempts"][0]["status"], "handed_over", "{job:#}");
    assert_eq!(job["attempts"][0]["worker_id"], "host-a", "{job:#}");
    // Cleanup on host a (a tiny retention) deletes it; host b keeps its own.
    std::thread::sleep(Duration::from_millis(20));
    let report = cli_json(&h, &db_a, &["cleanup", "--older-than", "10ms"]);
    assert_eq!(report["jobs_deleted"], 1, "{report:#}");
    assert_eq!(report["stages_deleted"], 2, "{report:#}");
    assert_eq!(job_row(&db_a, &id), None);
    assert_eq!(
        job_row(&db_b, &id).map(|r| r.0).as_deref(),
        Some("completed")
    );
}

#[test]
fn without_a_record_the_handing_host_says_handed_over_and_where() {
    // Records off: host a's SQLite is all host a knows.
    let h = Harness::new(&config("", "retention_secs = 0"));
    let (id, db_a, _db_b, _daemons) = run_one(&h);
    let job = cli_json(&h, &db_a, &["job", &id]);
    assert_eq!(job["status"], "handed_over", "{job:#}");
    assert_eq!(job["stage"], "s2");
    assert_eq!(job["stages"][1]["pool"], "b");
    assert_eq!(job["stages"][1]["status"], "pending");
    assert!(job["finished_at"].is_string(), "{job:#}");
    let out = h.cli(&["job", &id], &on(&db_a));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(text.contains("status    handed_over"), "{text}");
    assert!(text.contains("handed    to stage s2 in pool b"), "{text}");
}

#[test]
fn a_stage_not_run_yet_names_no_daemon_on_any_host() {
    // No daemon of pool b: the job waits for s2 in pool b's list.
    let h = Harness::new(&config("", ""));
    let db_a = h.path("a.db");
    let _da = host(&h, "host-a", "a", &db_a);
    let id = enqueue(&h, &["ab"]);
    let list_b = format!("{}:{{default}}:pool:b", h.prefix);
    wait_until(WAIT, "the job waits in pool b's list", || {
        redis::cmd("LLEN")
            .arg(&list_b)
            .query::<u64>(&mut h.redis.conn())
            .unwrap()
            == 1
    });
    // The record: s1 by host a; s2, still to run, by nobody.
    let record: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{}:{{default}}:job:{id}", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap();
    let s2: Value = serde_json::from_str(&record["stage:1"]).expect("stage:1");
    assert_eq!(s2["status"], "pending", "{s2}");
    assert_eq!(s2["worker_id"], "", "{s2}");
    assert_eq!(s2["pool"], "b", "{s2}");
    // Host a (its row and the record) and a host without SQLite.
    let none = h.path("never-created.db");
    for db in [&db_a, &none] {
        let job = cli_json(&h, db, &["job", &id]);
        assert_eq!(job["status"], "pending", "{job:#}");
        assert_eq!(job["stages"][0]["worker_id"], "host-a", "{job:#}");
        assert!(job["stages"][1]["worker_id"].is_null(), "{job:#}");
        assert_eq!(job["stages"][1]["pool"], "b", "{job:#}");
        let text = stdout_of(&h.cli(&["job", &id], &on(db)));
        assert!(text.contains("waiting   for stage s2 in pool b"), "{text}");
        assert!(!text.contains("[host-a, pool b]"), "{text}");
        assert!(text.contains("[pool b]"), "{text}");
    }
    assert!(!none.exists());
}

#[test]
fn cancel_on_the_handing_host_refuses_a_job_another_host_finished() {
    let h = Harness::new(&config("", ""));
    let (id, db_a, _db_b, _daemons) = run_one(&h);
    let none = h.path("never-created.db");
    // Host a's row says handed_over, a host without SQLite knows nothing:
    // the record says host b completed it.
    for db in [&db_a, &none] {
        let out = h.cli(&["cancel", &id, "--json"], &on(db));
        assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
        let err: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(
            err["error"],
            format!("job {id} is already completed"),
            "{err:#}"
        );
    }
    // No flag was set: an entry with that id would still run.
    let flags: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{}:{{default}}:cancelled", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap();
    assert!(flags.is_empty(), "{flags:?}");
}

#[test]
fn the_dashboard_job_page_names_the_host_of_each_registered_daemon() {
    let h = Harness::new(&config("", ""));
    let (id, _db_a, _db_b, [_da, db]) = run_one(&h);
    // The dashboard reads a SQLite file no daemon wrote: the record answers.
    let dash = h.dashboard(None);
    let workers = dash.get_json("/api/workers");
    let host_of = |id: &str| {
        workers["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| w["id"] == id)
            .map(|w| w["host"].clone())
            .expect("registered")
    };
    let job = dash.get_json(&format!("/api/jobs/{id}"));
    assert_eq!(job["hosts"]["host-a"], host_of("host-a"), "{job:#}");
    assert_eq!(job["hosts"]["host-b"], host_of("host-b"), "{job:#}");
    assert_eq!(
        job["hosts"].as_object().map(|o| o.len()),
        Some(2),
        "{job:#}"
    );
    // A daemon that is gone has no host to show.
    let mut db = db;
    db.sigterm();
    db.wait_exit(WAIT);
    let job = dash.get_json(&format!("/api/jobs/{id}"));
    assert!(job["hosts"].get("host-b").is_none(), "{job:#}");
    assert_eq!(job["hosts"]["host-a"], host_of("host-a"), "{job:#}");
}
