//! Stage pools end to end (docs/concepts.md, "Stage pools"): real Redis,
//! the real binary, one SQLite file per simulated host. A job whose stages
//! are in different pools moves between the daemons serving them; what one
//! stage returned reaches the next on the other host; a pool without a
//! daemon holds its jobs; shutdown, retries and recovery route a job back
//! to the pool of its stage. What the operator commands show of a job
//! waiting in a pool is in `pools_ops.rs`.

mod common;

use std::time::Duration;

use common::{
    Harness, chain_config, chain_stage, enqueue, job_status_in, pool_host as host, pool_key,
    pool_len, stage_result, stage_rows, toml_str, wait_until,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn alternating_pools_run_each_stage_on_the_daemon_of_its_pool() {
    let stages = [
        chain_stage("s1", "none", "a", ""),
        chain_stage("s2", "s1", "b", ""),
        chain_stage("s3", "s2", "a", ""),
        chain_stage("s4", "s3", "b", ""),
    ];
    let h = Harness::new(&chain_config(&stages, "", ""));
    let (db_a, db_b) = (h.path("a.db"), h.path("b.db"));
    let sub = h.subscribe();
    let da = host(&h, "host-a", "a", &db_a);
    let db = host(&h, "host-b", "b", &db_b);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job completed on host b", || {
        job_status_in(&db_b, &id).as_deref() == Some("completed")
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
    // Host a's record: handed over after s3 (done there), not failed.
    assert_eq!(job_status_in(&db_a, &id).as_deref(), Some("handed_over"));
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
    sub.assert_progress_never_goes_back(&id);
    let messages = sub.for_job(&id);
    assert!(
        messages
            .iter()
            .any(|m| m["message"] == "waiting for stage s2 in pool b"),
        "{messages:#?}"
    );
    // Nothing left anywhere.
    for pool in ["a", "b", "default"] {
        assert_eq!(pool_len(&h, pool), 0, "pool {pool}");
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
    let none = h.path("third-host-never-created.db");
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
    let h = Harness::new(&chain_config(&stages, "", ""));
    let db_b = h.path("b.db");
    let sub = h.subscribe();
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
        pool_len(&h, "b") == 1
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
    // The default daemon's handovers after the requeue and the retry (at
    // their first take) say how far the job got, not 0.
    sub.wait_status(&id, "completed", WAIT);
    sub.assert_progress_never_goes_back(&id);
}

#[test]
fn a_job_cancelled_while_waiting_in_a_pool_list_is_dropped_by_that_pool() {
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let h = Harness::new(&chain_config(&stages, "", ""));
    let db_b = h.path("b.db");
    let _plain = host(&h, "host-default", "default", &h.db);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job waits in pool b's list", || {
        pool_len(&h, "b") == 1
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
        job_status_in(&db_b, &id).as_deref() == Some("cancelled")
    });
    assert_eq!(pool_len(&h, "b"), 0);
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
    let h = Harness::new(&chain_config(&stages, "", ""));
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
    assert_eq!(pool_len(&h, "default"), 1);
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
    let h = Harness::new(&chain_config(&stages, "", ""));
    let db_b = h.path("b.db");
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
        pool_len(&h, "b") == 1 && plain.log().contains("job_handed_over")
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
        job_status_in(&db_b, &id).as_deref() == Some("failed")
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
    assert_eq!(pool_len(&h, "b"), 0);
}
