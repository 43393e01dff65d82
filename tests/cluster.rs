//! conveyor on a Redis Cluster started by the test on loopback ports:
//! the main end-to-end scenarios with queues on different masters, and a
//! master killed mid-run while its replica takes over.
//!
//! Needs `redis-cli` (Debian's redis-tools, a dependency of redis-server)
//! to create the cluster.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Harness, TestCluster, enqueue, ledger_lines, ledger_stage, wait_for, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

const FAST_WORKER: &str = "heartbeat_secs = 1\ndead_after_secs = 5\nfetch_block_ms = 200\n\
promote_interval_ms = 50\nshutdown_grace_secs = 5\nkill_grace_secs = 1\n";

fn key(h: &Harness, rest: &str) -> String {
    format!("{}:{rest}", h.prefix)
}

fn llen(c: &mut redis::cluster::ClusterConnection, key: &str) -> u64 {
    redis::cmd("LLEN").arg(key).query(c).expect("LLEN")
}

fn lpush_jobs(c: &mut redis::cluster::ClusterConnection, key: &str, jobs: &[Value]) {
    let mut cmd = redis::cmd("LPUSH");
    cmd.arg(key);
    for j in jobs {
        cmd.arg(j.to_string());
    }
    let _: u64 = cmd.query(c).expect("LPUSH");
}

/// Queue names whose keys live on `n` different masters.
fn queues_on_distinct_masters(cluster: &TestCluster, prefix: &str, n: usize) -> Vec<String> {
    let mut masters = BTreeSet::new();
    let mut queues = Vec::new();
    for i in 0.. {
        let q = format!("q{i}");
        if masters.insert(cluster.master_of(&format!("{prefix}:{{{q}}}:pending"))) {
            queues.push(q);
            if queues.len() == n {
                break;
            }
        }
    }
    queues
}

#[test]
fn cluster_runs_the_main_scenarios() {
    let cluster = TestCluster::start(3, 0);
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let queues = queues_on_distinct_masters(&cluster, &h.prefix, 3);
    let quoted: Vec<String> = queues.iter().map(|q| format!("\"{q}\"")).collect();
    let mut c = format!(
        "[redis]\n{}\n[worker]\n{FAST_WORKER}concurrency = 4\nqueues = [{}]\n\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 100\n\n\
         [jobs.pipe]\n\
         [[jobs.pipe.stages]]\nname = \"a\"\nbuiltin = \"noop\"\n\
         [[jobs.pipe.stages]]\nname = \"b\"\nbuiltin = \"sleep\"\nargs = {{ ms = 5 }}\n\
         [[jobs.pipe.stages]]\nname = \"c\"\nbuiltin = \"noop\"\n\n\
         [jobs.flaky]\nmax_attempts = 2\n\
         [[jobs.flaky.stages]]\nname = \"f\"\nbuiltin = \"fail\"\n\n\
         [jobs.long]\nmax_attempts = 1\n",
        cluster.config(),
        quoted.join(", ")
    );
    c += &ledger_stage("long", "s1", &ledger, "sleep 20;");
    c += "\n[jobs.slow]\nmax_attempts = 1\n";
    c += &ledger_stage("slow", "one", &ledger, "sleep 1;");
    c += &ledger_stage("slow", "two", &ledger, "sleep 1;");
    h.write_config(&c);
    let mut conn = cluster.conn();

    // Progress heard on a node other than the one each job's channel
    // hashes to: PUBLISH reaches every node of a cluster.
    let sub = common::ProgressSub::start(
        cluster.nodes.last().expect("nodes"),
        &format!("{}:progress:*", h.prefix),
    );

    let d1 = h.daemon("w1", &[]);
    let mut d2 = h.daemon("w2", &[]);

    // Raw LPUSH by a producer, onto every queue.
    let mut ids = Vec::new();
    for q in &queues {
        let jobs: Vec<Value> = (0..40)
            .map(|i| {
                let id = format!("{q}-{i}");
                ids.push(id.clone());
                json!({"id": id, "type": "pipe", "payload": {"n": i}})
            })
            .collect();
        lpush_jobs(&mut conn, &key(&h, &format!("{{{q}}}:pending")), &jobs);
    }
    // Through the CLI: now and delayed (scheduled set, promoted by Redis time).
    let now = enqueue(&h, &["pipe", "--queue", &queues[1], "--payload", "{}"]);
    let later = enqueue(&h, &["pipe", "--queue", &queues[2], "--delay", "1s"]);
    ids.push(now.clone());
    ids.push(later.clone());
    wait_until(LONG, "every pipe job to complete", || {
        h.count_status("completed") == ids.len() as u64
    });
    for id in [&ids[0], &now, &later] {
        let job = h.job_ok(id);
        assert_eq!(job["status"], "completed", "{job:#}");
    }
    // The job records (one per queue, so on each master), read by a host
    // without the SQLite file.
    let host_b = h.path("host-b.db");
    let host_b = host_b.to_string_lossy();
    for id in [&ids[0], &ids[40], &ids[80]] {
        let out = h.cli(&["job", id, "--json"], &[("CONVEYOR_DB", &host_b)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let job: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(job["status"], "completed", "{job:#}");
        let stages = job["stages"].as_array().expect("stages");
        assert_eq!(stages.len(), 3, "{job:#}");
        for s in stages {
            assert_eq!(s["status"], "completed", "{job:#}");
            assert!(
                ["w1", "w2"].contains(&s["worker_id"].as_str().unwrap_or("")),
                "{job:#}"
            );
        }
    }
    let last = sub.wait_status(&ids[ids.len() - 3], "completed", LONG);
    assert_eq!(last["progress"].as_f64(), Some(100.0), "{last}");

    // Failing jobs: retried, then dead on their own queue with the reason.
    let bad = enqueue(&h, &["flaky", "--queue", &queues[2]]);
    wait_until(LONG, "the flaky job to be dead", || {
        h.job_status(&bad).as_deref() == Some("failed")
    });
    let dead_key = key(&h, &format!("{{{}}}:dead", queues[2]));
    assert_eq!(llen(&mut conn, &dead_key), 1);
    let out = h.cli(&["dead", "list", "--queue", &queues[2]], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&bad));

    // Unparsable input: dead at once with its reason.
    let _: u64 = redis::cmd("LPUSH")
        .arg(key(&h, &format!("{{{}}}:pending", queues[0])))
        .arg("not json")
        .query(&mut conn)
        .expect("LPUSH");
    let poison_dead = key(&h, &format!("{{{}}}:dead", queues[0]));
    wait_until(LONG, "the poison message on the dead list", || {
        llen(&mut conn, &poison_dead) == 1
    });

    // Cancel a running job: the flag and the control message work across
    // slots.
    let running = enqueue(&h, &["long", "--queue", &queues[1], "--id", "running"]);
    wait_until(LONG, "the long stage to start", || {
        ledger_lines(&ledger)
            .iter()
            .any(|l| l.starts_with(&format!("S s1 {running}")))
    });
    let out = h.cli(&["cancel", &running], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{running} cancelled")
    );
    wait_until(LONG, "the job to be cancelled", || {
        h.job_status(&running).as_deref() == Some("cancelled")
    });

    // SIGTERM while two-stage jobs run: they go back and resume elsewhere,
    // no stage runs twice.
    let slow: Vec<String> = (0..4)
        .map(|i| {
            enqueue(
                &h,
                &[
                    "slow",
                    "--queue",
                    &queues[i % 3],
                    "--id",
                    &format!("slow{i}"),
                ],
            )
        })
        .collect();
    wait_until(LONG, "slow jobs to start", || {
        ledger_lines(&ledger)
            .iter()
            .filter(|l| l.starts_with("S one slow"))
            .count()
            >= 2
    });
    d2.sigterm();
    let status = d2.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "w2 exited with {status:?}:\n{}", d2.log());
    for id in &slow {
        wait_until(LONG, &format!("{id} to complete"), || {
            h.job_status(id).as_deref() == Some("completed")
        });
    }
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for line in ledger_lines(&ledger) {
        let mut parts = line.split_whitespace();
        if let (Some("C"), Some(stage), Some(id)) = (parts.next(), parts.next(), parts.next())
            && id.starts_with("slow")
        {
            *starts.entry(format!("{stage} {id}")).or_default() += 1;
        }
    }
    assert_eq!(starts.len(), 8, "{starts:?}");
    assert!(
        starts.values().all(|&n| n == 1),
        "a stage completed twice: {starts:?}"
    );
    for q in &queues {
        assert_eq!(llen(&mut conn, &key(&h, &format!("{{{q}}}:active:w2"))), 0);
    }

    // What operators look at.
    let status = h.status();
    let shown: BTreeSet<&str> = status["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    for q in &queues {
        assert!(shown.contains(q.as_str()), "{status:#}");
    }
    let out = h.cli(&["doctor"], &[]);
    assert!(
        out.status.success(),
        "doctor on a cluster:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d1);
}

/// A master is SIGKILLed while jobs run; its replica is promoted. Jobs were
/// enqueued with `WAIT 1` (on the replica before the kill), so none may be
/// lost; what a lost acknowledgement costs is a stage run again.
#[test]
fn cluster_master_failover_mid_run() {
    let mut cluster = TestCluster::start(3, 1);
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let queue = "work";
    let mut c = format!(
        "[redis]\n{}\n[worker]\n{FAST_WORKER}concurrency = 8\nqueues = [\"{queue}\"]\n\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 200\n\n[jobs.t]\nmax_attempts = 25\n",
        cluster.config()
    );
    c += &ledger_stage("t", "s", &ledger, "sleep 0.02;");
    h.write_config(&c);
    let pending = key(&h, &format!("{{{queue}}}:pending"));
    let master = cluster.master_of(&pending);
    let replica = cluster.replicas_of(master)[0];

    // scripts/failover.sh runs this with many more jobs.
    let total: usize = std::env::var("CONVEYOR_FAILOVER_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400);
    let ids: Vec<String> = (0..total).map(|i| format!("job{i}")).collect();
    {
        let mut m = cluster.nodes[master].conn();
        let mut cmd = redis::cmd("LPUSH");
        cmd.arg(&pending);
        for id in &ids {
            cmd.arg(json!({"id": id, "type": "t", "payload": {}}).to_string());
        }
        let _: u64 = cmd.query(&mut m).expect("LPUSH");
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut m)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica did not acknowledge the jobs");
    }
    let d1 = h.daemon("w1", &[]);
    let d2 = h.daemon("w2", &[]);
    wait_until(LONG, "a third of the jobs to complete", || {
        h.count_status("completed") >= total as u64 / 3
    });
    let killed_at = Instant::now();
    cluster.nodes[master].kill();
    wait_until(LONG, "the replica to be promoted", || {
        let Ok(mut r) = cluster.nodes[replica]
            .client()
            .get_connection_with_timeout(Duration::from_secs(1))
        else {
            return false;
        };
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut r).unwrap_or_default();
        matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
    });
    let promoted_after = killed_at.elapsed();

    // Jobs enqueued after the failover run too.
    cluster.wait_healthy(LONG);
    let after: Vec<Value> = (0..20)
        .map(|i| json!({"id": format!("after{i}"), "type": "t"}))
        .collect();
    let body: Vec<String> = after.iter().map(Value::to_string).collect();
    wait_for(LONG, "the new master to take jobs", || {
        let mut conn = cluster.try_conn()?;
        redis::cmd("LPUSH")
            .arg(&pending)
            .arg(&body)
            .query::<u64>(&mut conn)
            .ok()
    });
    let all: Vec<String> = ids
        .iter()
        .cloned()
        .chain((0..after.len()).map(|i| format!("after{i}")))
        .collect();
    common::report_failover(
        "cluster",
        &h,
        &all,
        killed_at,
        promoted_after,
        &ledger,
        &[&d1, &d2],
    );
}

/// Stage pools on the cluster while a master fails over: every job's
/// stages alternate pools `a` and `b` (a/b/a), served by two daemons, so
/// jobs are handed over between pool lists (in their queue's slot) while
/// the master of that slot is replaced by its replica (`CLUSTER FAILOVER`,
/// the coordinated kind an operator runs for maintenance: nothing
/// acknowledged is lost). 0 lost, and every stage of every job (its last:
/// the job's completion) completed exactly once.
#[test]
fn cluster_failover_with_stage_pools() {
    let cluster = TestCluster::start(3, 1);
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let queue = "work";
    let mut c = format!(
        "[redis]\n{}\n[worker]\n{FAST_WORKER}concurrency = 8\nqueues = [\"{queue}\"]\n\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 200\n\n[jobs.t]\nmax_attempts = 25\n",
        cluster.config()
    );
    for (stage, pool) in [("s1", "a"), ("s2", "b"), ("s3", "a")] {
        let table = ledger_stage("t", stage, &ledger, "sleep 0.01;");
        c += &table.replacen("run = [", &format!("pool = \"{pool}\"\nrun = ["), 1);
    }
    h.write_config(&c);
    let pending = key(&h, &format!("{{{queue}}}:pending"));
    let master = cluster.master_of(&pending);
    let replica = cluster.replicas_of(master)[0];
    let ids: Vec<String> = (0..150).map(|i| format!("job{i}")).collect();
    let jobs: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "type": "t", "payload": {}}))
        .collect();
    lpush_jobs(&mut cluster.conn(), &pending, &jobs);
    let da = h.daemon("wa", &[("CONVEYOR_POOLS", "a")]);
    let db = h.daemon("wb", &[("CONVEYOR_POOLS", "b")]);
    wait_until(LONG, "a third of the jobs to complete", || {
        h.count_status("completed") >= ids.len() as u64 / 3
    });
    let failed_over_at = Instant::now();
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.nodes[replica].conn())
        .expect("CLUSTER FAILOVER");
    wait_until(LONG, "the replica to be promoted", || {
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut cluster.nodes[replica].conn())
            .unwrap_or_default();
        matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
    });
    let promoted_after = failed_over_at.elapsed();
    common::report_failover(
        "cluster pools",
        &h,
        &ids,
        failed_over_at,
        promoted_after,
        &ledger,
        &[&da, &db],
    );
    let (_, ends) = common::ledger_counts_by_stage(&ledger);
    for id in &ids {
        for stage in ["s1", "s2", "s3"] {
            let done = ends.get(&(id.clone(), stage.to_owned())).copied();
            assert_eq!(done, Some(1), "{id}: completions of {stage}");
        }
    }
    assert!(da.log().contains("job_handed_over"), "{}", da.log_tail(20));
    assert!(db.log().contains("job_handed_over"), "{}", db.log_tail(20));
}
