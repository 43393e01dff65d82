//! conveyor with `[redis] mode = "sentinel"`: a master, a replica and three
//! Sentinels on loopback ports, started by the test. The master is
//! SIGKILLed mid-run; the Sentinels promote the replica and the daemons
//! follow it.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Harness, TestSentinels, enqueue, ledger_stage, wait_for, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

const FAST_WORKER: &str = "heartbeat_secs = 1\ndead_after_secs = 5\nfetch_block_ms = 200\n\
promote_interval_ms = 50\nshutdown_grace_secs = 5\nkill_grace_secs = 1\n";

/// Jobs were enqueued with `WAIT 1` (held by the replica before the kill),
/// so none may be lost; a state change acknowledged by the old master and
/// not yet replicated can only make a stage run again.
#[test]
fn sentinel_failover_mid_run() {
    let mut redis = TestSentinels::start();
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c = format!(
        "[redis]\n{}\n[worker]\n{FAST_WORKER}concurrency = 8\n\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 200\n\n[jobs.t]\nmax_attempts = 25\n",
        redis.config()
    );
    c += &ledger_stage("t", "s", &ledger, "sleep 0.02;");
    h.write_config(&c);
    let pending = format!("{}:{{default}}:pending", h.prefix);

    // The CLI finds the master through the Sentinels too.
    let first = enqueue(&h, &["t", "--id", "first"]);
    // scripts/failover.sh runs this with many more jobs.
    let total: usize = std::env::var("CONVEYOR_FAILOVER_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let mut ids: Vec<String> = (0..total).map(|i| format!("job{i}")).collect();
    {
        let mut m = redis.master.conn();
        let mut cmd = redis::cmd("LPUSH");
        cmd.arg(&pending);
        for id in &ids {
            cmd.arg(json!({"id": id, "type": "t"}).to_string());
        }
        let _: u64 = cmd.query(&mut m).expect("LPUSH");
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut m)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica did not acknowledge the jobs");
    }
    ids.push(first);
    let d1 = h.daemon("w1", &[]);
    let d2 = h.daemon("w2", &[]);
    wait_until(LONG, "a third of the jobs to complete", || {
        h.ids_with_status("completed").len() >= total / 3
    });
    let old_port = redis.master.port();
    let killed_at = Instant::now();
    redis.master.kill();
    wait_until(LONG, "the Sentinels to promote the replica", || {
        redis.master_port() == Some(redis.replica.port())
    });
    let promoted_after = killed_at.elapsed();
    // Subscribed after the promotion: Sentinel disconnects the clients of
    // the replica it promotes, pub/sub ones too.
    let sub = common::ProgressSub::start(&redis.replica, &format!("{}:progress:*", h.prefix));

    // Enqueued after the failover, through the Sentinels.
    // The command line asks the Sentinels once and fails with their answer
    // while no master is named: retried here, as a producer would.
    let after: Vec<String> = (0..10)
        .map(|i| {
            let id = format!("after{i}");
            wait_for(LONG, "an enqueue through the Sentinels", || {
                h.cli(&["enqueue", "t", "--id", &id], &[])
                    .status
                    .success()
                    .then(|| id.clone())
            })
        })
        .collect();
    let all: Vec<String> = ids.iter().chain(&after).cloned().collect();
    common::report_failover(
        "sentinel",
        &h,
        &all,
        killed_at,
        promoted_after,
        &ledger,
        &[&d1, &d2],
    );
    for d in [&d1, &d2] {
        let log = d.log();
        let warnings: BTreeMap<String, usize> = d
            .log_events()
            .iter()
            .filter(|e| e["level"] == "warn" || e["level"] == "error")
            .fold(BTreeMap::new(), |mut m, e| {
                *m.entry(e["event"].as_str().unwrap_or("").to_owned())
                    .or_insert(0) += 1;
                m
            });
        eprintln!("{} warnings and errors: {warnings:#?}", d.worker_id);
        assert!(
            log.contains("sentinel_master_changed"),
            "{} did not report the switch from port {old_port}:\n{log}",
            d.worker_id
        );
    }
    // Progress of jobs run after the failover is published on the new master.
    let last = sub.wait_status(&after[after.len() - 1], "completed", LONG);
    assert_eq!(
        last["worker_id"].as_str().map(|w| w.starts_with('w')),
        Some(true)
    );

    // Operators' commands work through the Sentinels.
    let status = h.status();
    let default = status["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == "default")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(default["pending"], 0, "{status:#}");
    let out = h.cli(&["doctor"], &[]);
    assert!(
        out.status.success(),
        "doctor through the Sentinels:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
