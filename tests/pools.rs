//! Stage pools end to end (docs/concepts.md, "Stage pools"): real Redis,
//! the real binary, one SQLite file per simulated host. A job whose stages
//! are in different pools moves between the daemons serving them; what one
//! stage returned reaches the next on the other host; a pool without a
//! daemon holds its jobs; shutdown, retries and recovery route a job back
//! to the pool of its stage.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, Harness, enqueue, open_sqlite_read_only, toml_str, wait_until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A stage `me` in pool `pool` whose result is `{"chain": [...]}`: the
/// chain of stage `prev`'s result with `me` added, so the last stage's
/// result shows every stage's result reached the next one. `before` is
/// shell run first (after stdin is read by jq, never before).
fn chain_stage(me: &str, prev: &str, pool: &str, before: &str) -> String {
    format!(
        r#"
[[jobs.chain.stages]]
name = "{me}"
pool = "{pool}"
run = ["sh", "-c", '''{before} jq -c --arg me {me} --arg prev {prev} '{{result: {{chain: ((.results[$prev].chain // []) + [$me])}}}}' ''']
"#
    )
}

fn config(stages: &[String], worker: &str) -> String {
    let mut toml = format!(
        "[worker]\nfetch_block_ms = 100\nshutdown_grace_secs = 1\nkill_grace_secs = 1\n{worker}\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 100\n\n[jobs.chain]\nmax_attempts = 3\n"
    );
    for s in stages {
        toml.push_str(s);
    }
    toml
}

/// A daemon serving `pools` with its own SQLite file (its own host).
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

/// `(name, status, worker_id, pool)` of a job's stage rows in one SQLite file.
fn stage_rows(db: &Path, id: &str) -> Vec<(String, String, Option<String>, Option<String>)> {
    let Some(conn) = open_sqlite_read_only(db) else {
        return Vec::new();
    };
    let mut stmt = conn
        .prepare("SELECT name, status, worker_id, pool FROM stages WHERE job_id = ?1 ORDER BY idx")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn job_status(db: &Path, id: &str) -> Option<String> {
    let conn = open_sqlite_read_only(db)?;
    conn.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
        .ok()
}

fn stage_result(db: &Path, id: &str, stage: &str) -> Value {
    let conn = open_sqlite_read_only(db).expect("db");
    let text: String = conn
        .query_row(
            "SELECT result FROM stages WHERE job_id = ?1 AND name = ?2",
            [id, stage],
            |r| r.get(0),
        )
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn llen(h: &Harness, key: &str) -> u64 {
    redis::cmd("LLEN")
        .arg(key)
        .query(&mut h.redis.conn())
        .unwrap()
}

fn pool_key(h: &Harness, pool: &str) -> String {
    format!("{}:{{default}}:pool:{pool}", h.prefix)
}

fn other_db(h: &Harness, name: &str) -> PathBuf {
    h.path(name)
}

/// Progress of one job never goes down, whichever daemon published it.
fn assert_progress_never_goes_back(messages: &[Value]) {
    let mut high = 0.0;
    for m in messages {
        let p = m["progress"].as_f64().expect("progress");
        assert!(
            p >= high,
            "progress went back from {high} to {p}: {messages:#?}"
        );
        high = p;
    }
}

#[test]
fn alternating_pools_run_each_stage_on_the_daemon_of_its_pool() {
    let stages = [
        chain_stage("s1", "none", "a", ""),
        chain_stage("s2", "s1", "b", ""),
        chain_stage("s3", "s2", "a", ""),
        chain_stage("s4", "s3", "b", ""),
    ];
    let h = Harness::new(&config(&stages, ""));
    let (db_a, db_b) = (other_db(&h, "a.db"), other_db(&h, "b.db"));
    let sub = h.subscribe();
    let da = host(&h, "host-a", "a", &db_a);
    let db = host(&h, "host-b", "b", &db_b);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job completed on host b", || {
        job_status(&db_b, &id).as_deref() == Some("completed")
    });
    // Each stage ran on the daemon of its pool, recorded in that host's file.
    let a = stage_rows(&db_a, &id);
    let b = stage_rows(&db_b, &id);
    let ran = |rows: &[(String, String, Option<String>, Option<String>)], name: &str| {
        rows.iter()
            .find(|r| r.0 == name && r.1 == "completed")
            .map(|r| {
                (
                    r.2.clone().unwrap_or_default(),
                    r.3.clone().unwrap_or_default(),
                )
            })
    };
    for (stage, worker, pool) in [("s1", "host-a", "a"), ("s3", "host-a", "a")] {
        assert_eq!(ran(&a, stage), Some((worker.into(), pool.into())), "{a:?}");
        assert_eq!(
            ran(&b, stage).map(|r| r.0),
            None,
            "{stage} ran only on a: {b:?}"
        );
    }
    for (stage, worker, pool) in [("s2", "host-b", "b"), ("s4", "host-b", "b")] {
        assert_eq!(ran(&b, stage), Some((worker.into(), pool.into())), "{b:?}");
        assert_eq!(ran(&a, stage), None, "{stage} ran only on b: {a:?}");
    }
    // What each stage returned reached the next one, across the hosts.
    assert_eq!(
        stage_result(&db_b, &id, "s4"),
        serde_json::json!({"chain": ["s1", "s2", "s3", "s4"]})
    );
    assert_eq!(
        stage_result(&db_b, &id, "s2"),
        serde_json::json!({"chain": ["s1", "s2"]})
    );
    // Host a's record: waiting again after s3 (handed over), not failed.
    assert_eq!(job_status(&db_a, &id).as_deref(), Some("pending"));
    // `conveyor job --json` on host b shows who ran each stage, in which pool.
    let out = h.cli(
        &["job", &id, "--json"],
        &[("CONVEYOR_DB", db_b.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["stages"][1]["worker_id"], "host-b");
    assert_eq!(job["stages"][1]["pool"], "b");
    assert_eq!(job["stages"][3]["pool"], "b");
    // Handovers count no attempt and no requeue.
    assert_eq!(job["attempt"], 1, "{job:#}");
    sub.wait_status(&id, "completed", WAIT);
    let messages = sub.for_job(&id);
    assert_progress_never_goes_back(&messages);
    assert!(
        messages
            .iter()
            .any(|m| m["message"] == "waiting for stage s2 in pool b"),
        "{messages:#?}"
    );
    // Nothing left anywhere.
    for pool in ["a", "b", "default"] {
        assert_eq!(llen(&h, &pool_key(&h, pool)), 0, "pool {pool}");
    }
    assert!(da.log().contains("job_handed_over"));
    assert!(db.log().contains("job_handed_over"));
    assert!(!da.log().contains("job_requeued") && !db.log().contains("job_requeued"));
    // A third host, with no SQLite file, reads all four stages from the record.
    let third = third_host_job(&h, &id);
    assert_eq!(third["status"], "completed", "{third:#}");
    let stages = third["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 4, "{third:#}");
    let chain = ["s1", "s2", "s3", "s4"];
    for (i, (worker, pool)) in [("host-a", "a"), ("host-b", "b")]
        .iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let stage = &stages[i];
        assert_eq!(stage["name"], chain[i], "{third:#}");
        assert_eq!(stage["status"], "completed", "{third:#}");
        assert_eq!(stage["worker_id"], *worker, "{third:#}");
        assert_eq!(stage["pool"], *pool, "{third:#}");
        assert_eq!(
            stage["result"],
            serde_json::json!({"chain": chain[..=i]}),
            "{third:#}"
        );
    }
    // So does a dashboard whose SQLite file no daemon wrote (its job page).
    let dash = h.dashboard(None);
    let page = dash.get_json(&format!("/api/jobs/{id}"));
    let shown: Vec<(Value, Value)> = page["record"]["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["worker_id"].clone(), s["pool"].clone()))
        .collect();
    let want: Vec<(Value, Value)> = ["a", "b", "a", "b"]
        .iter()
        .map(|p| (Value::from(format!("host-{p}")), Value::from(*p)))
        .collect();
    assert_eq!(shown, want, "{page:#}");
}

/// `conveyor job ID --json` on a host whose SQLite file does not exist
/// (the job's record in Redis answers), once the record says it ended.
fn third_host_job(h: &Harness, id: &str) -> Value {
    let none = other_db(h, "third-host-never-created.db");
    let mut job = Value::Null;
    wait_until(
        WAIT,
        "the record read on a third host says completed",
        || {
            let out = h.cli(
                &["job", id, "--json"],
                &[("CONVEYOR_DB", none.to_str().unwrap())],
            );
            job = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            job["status"] == "completed"
        },
    );
    assert!(!none.exists(), "the third host has no SQLite file");
    job
}

#[test]
fn a_pool_without_a_daemon_holds_the_job_until_one_starts() {
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let h = Harness::new(&config(&stages, ""));
    let db_b = other_db(&h, "b.db");
    let _plain = host(&h, "host-default", "default", &h.db);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job waits in pool b's list", || {
        llen(&h, &pool_key(&h, "b")) == 1
    });
    assert_eq!(h.stage_status(&id, "s1").as_deref(), Some("completed"));
    assert_eq!(h.job_status(&id).as_deref(), Some("pending"));
    // It stays there: nobody else takes it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(llen(&h, &pool_key(&h, "b")), 1);
    // `conveyor job` says where it waits.
    let out = h.cli(&["job", &id], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("waiting   for stage s2 in pool b"), "{text}");
    assert!(text.contains("[host-default, pool default]"), "{text}");
    let job = h.job_ok(&id);
    assert_eq!(job["status"], "pending");
    assert_eq!(
        job["waiting"],
        serde_json::json!({"stage": "s2", "pool": "b"})
    );
    assert_eq!(job["stages"][0]["worker_id"], "host-default");
    // `conveyor status`: pool b has one job and no daemon.
    let status = h.status();
    let queue = &status["queues"][0];
    assert_eq!(queue["name"], "default");
    let pools = queue["pools"].as_array().unwrap();
    let b = pools
        .iter()
        .find(|p| p["name"] == "b")
        .expect("pool b listed");
    assert_eq!(b["depth"], 1);
    assert_eq!(b["workers"], serde_json::json!([]));
    let d = pools.iter().find(|p| p["name"] == "default").unwrap();
    assert_eq!(d["workers"], serde_json::json!(["host-default"]));
    let out = h.cli(&["status"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("none (nothing runs its stages)"), "{text}");
    // The dashboard's overview reads the same.
    let dash = h.dashboard(None);
    let api = dash.get_json("/api/queues");
    let pools = api["queues"][0]["pools"].as_array().expect("pools").clone();
    let b = pools.iter().find(|p| p["name"] == "b").expect("pool b");
    assert_eq!(
        (b["depth"].as_u64(), b["workers"].clone()),
        (Some(1), serde_json::json!([]))
    );
    drop(dash);
    // `conveyor doctor` warns, and passes.
    let out = h.cli(&["doctor", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pools")
        .expect("a pools check")
        .clone();
    assert_eq!(check["ok"], true);
    assert_eq!(check["warning"], true);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("`b` of queue `default`"),
        "{check}"
    );
    let _b = host(&h, "host-b", "b", &db_b);
    wait_until(WAIT, "the job completed on host b", || {
        job_status(&db_b, &id).as_deref() == Some("completed")
    });
    assert_eq!(
        stage_result(&db_b, &id, "s2"),
        serde_json::json!({"chain": ["s1", "s2"]})
    );
    assert_eq!(llen(&h, &pool_key(&h, "b")), 0);
    // Served now: doctor says so, without a warning.
    let out = h.cli(&["doctor", "--json"], &[]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pools")
        .expect("a pools check")
        .clone();
    assert_eq!(check["ok"], true);
    assert!(check.get("warning").is_none(), "{check}");
}

#[test]
fn shutdown_and_retries_route_the_job_back_to_the_pool_of_its_stage() {
    let marks = tempfile::tempdir().unwrap();
    let slept = marks.path().join("slept");
    let failed = marks.path().join("failed");
    // s2 (pool b) runs long the first time: the b daemon is stopped during
    // it. s3 (pool b) fails once: retried. s1 and s4 in the default pool.
    let first_long = format!(
        "if [ ! -e {m} ]; then touch {m}; sleep 30; fi;",
        m = toml_str(slept.to_string_lossy()).trim_matches('"')
    );
    let fail_once = format!(
        "if [ ! -e {m} ]; then touch {m}; cat > /dev/null; exit 1; fi;",
        m = toml_str(failed.to_string_lossy()).trim_matches('"')
    );
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", &first_long),
        chain_stage("s3", "s2", "b", &fail_once),
        chain_stage("s4", "s3", "default", ""),
    ];
    let h = Harness::new(&config(&stages, ""));
    let db_b = other_db(&h, "b.db");
    let plain = host(&h, "host-default", "default", &h.db);
    let b1 = host(&h, "host-b", "b", &db_b);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "s2 running on host b", || slept.exists());
    b1.sigterm();
    let mut b1 = b1;
    b1.wait_exit(WAIT);
    assert!(b1.log().contains("job_requeued"), "{}", b1.log_tail(30));
    // Requeued to pending, taken by the default daemon, handed back to b.
    wait_until(WAIT, "the job back in pool b's list", || {
        llen(&h, &pool_key(&h, "b")) == 1
    });
    let b2 = host(&h, "host-b2", "b", &db_b);
    wait_until(WAIT, "the job completed on the default host", || {
        h.job_status(&id).as_deref() == Some("completed")
    });
    assert!(failed.exists());
    // s3 failed once on b and was retried there; s4 ran on the default host.
    let b_rows = stage_rows(&db_b, &id);
    let s3 = b_rows.iter().find(|r| r.0 == "s3").unwrap();
    assert_eq!(
        (s3.1.as_str(), s3.3.as_deref()),
        ("completed", Some("b")),
        "{b_rows:?}"
    );
    assert_eq!(s3.2.as_deref(), Some("host-b2"));
    assert_eq!(
        stage_result(&h.db, &id, "s4"),
        serde_json::json!({"chain": ["s1", "s2", "s3", "s4"]})
    );
    assert!(b2.log().contains("job_retrying"), "{}", b2.log_tail(30));
    assert!(plain.log().contains("job_handed_over"));
    let job = h.job_ok(&id);
    assert_eq!(job["attempt"], 2, "one retry: {job:#}");
}

#[test]
fn a_job_cancelled_while_waiting_in_a_pool_list_is_dropped_by_that_pool() {
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let h = Harness::new(&config(&stages, ""));
    let db_b = other_db(&h, "b.db");
    let _plain = host(&h, "host-default", "default", &h.db);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job waits in pool b's list", || {
        llen(&h, &pool_key(&h, "b")) == 1
    });
    let out = h.cli(&["cancel", &id], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon of pool b takes it and drops it: s2 never runs.
    let _b = host(&h, "host-b", "b", &db_b);
    wait_until(WAIT, "the job recorded cancelled on host b", || {
        job_status(&db_b, &id).as_deref() == Some("cancelled")
    });
    assert_eq!(llen(&h, &pool_key(&h, "b")), 0);
    let ran_s2 = stage_rows(&db_b, &id)
        .iter()
        .any(|r| r.0 == "s2" && r.1 != "pending");
    assert!(!ran_s2, "{:?}", stage_rows(&db_b, &id));
    let cancelled: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{}:{{default}}:cancelled", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap();
    assert!(cancelled.is_empty(), "the flag is forgotten: {cancelled:?}");
}

#[test]
fn with_one_pool_daemons_never_read_a_pool_list() {
    // No stage names a pool and the daemon serves the default pool only:
    // it fetches as without pools (pending alone), so an entry someone put
    // in the default pool's list by hand stays there. Nothing can hand a
    // job over in such a fleet: a daemon serving none of the config's
    // pools (here: `default` alone) refuses to start (tests/pool_fetch.rs,
    // the second review's finding 1).
    let stages = [chain_stage("s1", "none", "default", "")];
    let h = Harness::new(&config(&stages, ""));
    let planted = serde_json::json!({"id": "planted", "type": "chain", "payload": {}}).to_string();
    let _: i64 = redis::cmd("RPUSH")
        .arg(pool_key(&h, "default"))
        .arg(&planted)
        .query(&mut h.redis.conn())
        .unwrap();
    let d = host(&h, "host-default", "default", &h.db);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the pending job completed", || {
        h.job_status(&id).as_deref() == Some("completed")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(llen(&h, &pool_key(&h, "default")), 1);
    assert_eq!(h.job_status("planted"), None);
    assert!(!d.log().contains("job_handed_over"));
    assert!(!d.log().contains("queue_handover_only"));
}

#[test]
fn a_handover_keeps_the_crash_count_for_the_pool_that_runs_the_stage() {
    // The job's first stage is in pool b. Daemons died max_crashes (3)
    // times running it: the default daemon takes it from pending and hands
    // it over without quarantining it (nothing runs there), and the b
    // daemon, which would run it, quarantines it.
    let stages = [
        chain_stage("s1", "none", "b", ""),
        chain_stage("s2", "s1", "default", ""),
    ];
    let h = Harness::new(&config(&stages, ""));
    let db_b = other_db(&h, "b.db");
    let id = enqueue(&h, &["chain"]);
    let crashes = format!("{}:{{default}}:crashes", h.prefix);
    let _: i64 = redis::cmd("HSET")
        .arg(&crashes)
        .arg(&id)
        .arg(3)
        .query(&mut h.redis.conn())
        .unwrap();
    let plain = host(&h, "host-default", "default", &h.db);
    // The log line follows the settle's reply: wait for both.
    wait_until(WAIT, "the job handed over to pool b", || {
        llen(&h, &pool_key(&h, "b")) == 1 && plain.log().contains("job_handed_over")
    });
    assert!(!plain.log().contains("job_quarantined"));
    assert_eq!(
        h.job_status(&id),
        None,
        "nothing recorded where nothing ran"
    );
    let count: Option<u32> = redis::cmd("HGET")
        .arg(&crashes)
        .arg(&id)
        .query(&mut h.redis.conn())
        .unwrap();
    assert_eq!(count, Some(3));
    let b = host(&h, "host-b", "b", &db_b);
    wait_until(WAIT, "the job quarantined on host b", || {
        job_status(&db_b, &id).as_deref() == Some("failed")
    });
    assert!(b.log().contains("job_quarantined"), "{}", b.log_tail(20));
    let dead: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}:{{default}}:dead", h.prefix))
        .arg(0)
        .arg(-1)
        .query(&mut h.redis.conn())
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].contains("quarantined"), "{}", dead[0]);
    assert_eq!(llen(&h, &pool_key(&h, "b")), 0);
}
