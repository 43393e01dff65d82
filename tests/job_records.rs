//! The job record in Redis (issue 15, point 2): a job run by a daemon on
//! host A, with A's SQLite file, is shown in full by `conveyor job ID` on
//! host B (another, empty, SQLite file) for `[history] retention_secs`
//! after it ended; `max_jobs` bounds a queue's ended records; 0 turns them
//! off; the `job_completed` message carries the result or says where to
//! read it. The real binary, a real redis-server, separate SQLite files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, Harness, enqueue, wait_for, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

/// An exec stage printing `progress_lines` progress reports, then its
/// result `{"stage": <name>, "n": <n>}`.
fn stage(name: &str, n: u32, progress_lines: u32) -> String {
    format!(
        r#"{{ name = "{name}", run = ["sh", "-c", '''cat > /dev/null; i=0; while [ $i -lt {progress_lines} ]; do echo "{{\"progress\": $((i % 100))}}"; i=$((i+1)); done; echo '{{"result": {{"stage": "{name}", "n": {n}}}}}' '''] }}"#
    )
}

/// The config: `pipe`, four stages; `one`, one stage; `big`, one stage
/// whose result is a 3 MB string; then `history` (a `[history]` body).
fn config(history: &str, progress_lines: u32) -> String {
    let stages: Vec<String> = ["script", "voice", "video", "compose"]
        .iter()
        .zip(1..)
        .map(|(name, n)| stage(name, n, progress_lines))
        .collect();
    format!(
        r#"
[worker]
queues = ["default"]
concurrency = 4

[retry]
max_attempts = 1

[history]
{history}

[jobs.pipe]
stages = [{stages}]

[jobs.one]
stages = [{one}]

[jobs.big]
stages = [{{ name = "make", run = ["sh", "-c", '''cat > /dev/null; printf '{{"result": "'; head -c 3000000 /dev/zero | tr '\0' a; printf '"}}\n' '''] }}]
"#,
        stages = stages.join(", "),
        one = stage("only", 7, 0),
    )
}

/// Host A: a daemon with its own SQLite file.
fn host_a(h: &Harness) -> (Daemon, std::path::PathBuf) {
    let db = h.path("host-a.db");
    let daemon = Daemon::start(&h.redis.url(), &h.prefix, &db, &h.config, "host-a", &[]);
    (daemon, db)
}

/// `conveyor job ID --json` with the SQLite file `db` (host B: the
/// harness's own, which nothing writes).
fn job_on(h: &Harness, db: &Path, id: &str) -> Option<Value> {
    let db = db.to_string_lossy().into_owned();
    let out = h.cli(&["job", id, "--json"], &[("CONVEYOR_DB", db.as_str())]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("job --json is JSON"))
}

fn record_key(h: &Harness, id: &str) -> String {
    format!("{}:{{default}}:job:{id}", h.prefix)
}

fn memory_usage(h: &Harness, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query(&mut h.redis.conn())
        .expect("MEMORY USAGE")
}

fn completed_message(sub: &common::ProgressSub, id: &str) -> Value {
    let m = sub.wait_status(id, "completed", LONG);
    assert_eq!(m["event"], "job_completed", "{m:#}");
    m
}

#[test]
fn a_job_run_on_host_a_is_shown_in_full_on_host_b_until_retention_ends() {
    let h = Harness::new(&config("retention_secs = 2", 3));
    let sub = h.subscribe();
    let (_a, db_a) = host_a(&h);
    let id = enqueue(&h, &["pipe", "--payload", r#"{"topic":"x"}"#]);
    let done = completed_message(&sub, &id);
    assert_eq!(
        done["result"],
        json!({"stage": "compose", "n": 4}),
        "{done:#}"
    );
    assert!(done.get("result_truncated").is_none(), "{done:#}");

    // Host B: its SQLite file does not even exist.
    assert!(!h.db.exists());
    let job = wait_for(LONG, "the record on host B", || {
        job_on(&h, &h.db, &id).filter(|j| j["status"] == "completed")
    });
    assert_eq!(job["id"], id);
    assert_eq!(job["type"], "pipe");
    assert_eq!(job["queue"], "default");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["progress"].as_f64(), Some(100.0));
    assert_eq!(job["worker_id"], "host-a");
    assert!(job["error"].is_null(), "{job:#}");
    let stages = job["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["script", "voice", "video", "compose"]);
    for (s, n) in stages.iter().zip(1..) {
        assert_eq!(s["status"], "completed", "{s:#}");
        assert_eq!(s["result"], json!({"stage": s["name"], "n": n}), "{s:#}");
        assert_eq!(s["worker_id"], "host-a", "{s:#}");
        assert!(
            s["started_at"].is_string() && s["finished_at"].is_string(),
            "{s:#}"
        );
        assert!(s["error"].is_null(), "{s:#}");
    }
    // The dashboard of host B (no SQLite file either) shows it too.
    let board = h.dashboard(None);
    let page = board.get_json(&format!("/api/jobs/{id}"));
    assert_eq!(page["status"], "completed", "{page:#}");
    assert_eq!(
        page["record"]["stages"][2]["worker_id"], "host-a",
        "{page:#}"
    );
    assert_eq!(page["record"]["stages"][2]["result"]["n"], 3, "{page:#}");
    // Searched by its id, it is listed too.
    let list = board.get_json(&format!("/api/jobs?q={id}"));
    assert_eq!(list["total"], 1, "{list:#}");
    assert_eq!(list["jobs"][0]["id"], id, "{list:#}");
    assert_eq!(list["jobs"][0]["status"], "completed", "{list:#}");
    let other = board.get_json(&format!("/api/jobs?q={id}&status=failed"));
    assert_eq!(other["total"], 0, "{other:#}");
    drop(board);
    // The record is bounded by the retention.
    let ttl: i64 = redis::cmd("TTL")
        .arg(record_key(&h, &id))
        .query(&mut h.redis.conn())
        .unwrap();
    assert!((0..=2).contains(&ttl), "ttl {ttl}");
    eprintln!(
        "MEMORY USAGE of a 4-stage record with small results: {} bytes",
        memory_usage(&h, &record_key(&h, &id))
    );

    // Host A reads its own SQLite row, with each stage's daemon from the
    // record.
    let on_a = job_on(&h, &db_a, &id).expect("host A knows the job");
    assert_eq!(on_a["payload"], json!({"topic": "x"}), "{on_a:#}");
    assert_eq!(on_a["stages"][3]["worker_id"], "host-a", "{on_a:#}");

    // Once the retention is over: B no longer knows it, A still does.
    wait_until(LONG, "the record to expire", || {
        job_on(&h, &h.db, &id).is_none()
    });
    let on_a = job_on(&h, &db_a, &id).expect("host A's SQLite still has it");
    assert_eq!(on_a["status"], "completed");
    assert_eq!(on_a["stages"].as_array().map(Vec::len), Some(4));
}

#[test]
fn max_jobs_keeps_the_newest_ended_records() {
    let h = Harness::new(&config("max_jobs = 3", 0));
    let sub = h.subscribe();
    let (_a, _db_a) = host_a(&h);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = enqueue(&h, &["one"]);
        completed_message(&sub, &id);
        ids.push(id);
    }
    let index = format!("{}:{{default}}:records", h.prefix);
    let kept: Vec<String> = wait_for(LONG, "3 records in the index", || {
        let kept: Vec<String> = redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .query(&mut h.redis.conn())
            .unwrap();
        (kept == ids[2..]).then_some(kept)
    });
    assert_eq!(kept, ids[2..]);
    for (i, id) in ids.iter().enumerate() {
        let exists: bool = redis::cmd("EXISTS")
            .arg(record_key(&h, id))
            .query(&mut h.redis.conn())
            .unwrap();
        assert_eq!(exists, i >= 2, "record of job {i} ({id})");
        assert_eq!(job_on(&h, &h.db, id).is_some(), i >= 2, "job {i} on host B");
    }
}

#[test]
fn retention_zero_writes_no_record_and_the_message_still_has_the_result() {
    let h = Harness::new(&config("retention_secs = 0", 0));
    let sub = h.subscribe();
    let (_a, db_a) = host_a(&h);
    let id = enqueue(&h, &["one"]);
    let done = completed_message(&sub, &id);
    assert_eq!(done["result"], json!({"stage": "only", "n": 7}));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap();
    assert!(
        keys.iter()
            .all(|k| !k.contains(":job:") && !k.ends_with(":records")),
        "{keys:?}"
    );
    assert!(job_on(&h, &h.db, &id).is_none());
    assert_eq!(job_on(&h, &db_a, &id).expect("on A")["status"], "completed");
}

#[test]
fn a_big_result_is_flagged_with_where_to_read_it() {
    let h = Harness::new(&config("max_message_result_bytes = 1024", 0));
    let sub = h.subscribe();
    let (_a, _db_a) = host_a(&h);
    let id = enqueue(&h, &["big"]);
    let done = completed_message(&sub, &id);
    assert!(done.get("result").is_none(), "no result in the message");
    assert_eq!(done["result_truncated"], true);
    let key = done["result_key"].as_str().expect("result_key");
    assert_eq!(key, record_key(&h, &id));
    assert_eq!(done["result_field"], "stage:0");
    // What a producer in any language does: one HGET, one JSON parse.
    let field: String = wait_for(LONG, "the record's stage field", || {
        redis::cmd("HGET")
            .arg(key)
            .arg("stage:0")
            .query::<Option<String>>(&mut h.redis.conn())
            .unwrap()
            .filter(|f| f.contains("completed"))
    });
    let stage: Value = serde_json::from_str(&field).unwrap();
    assert_eq!(stage["result"].as_str().map(str::len), Some(3_000_000));
    let job: Value = serde_json::from_str(
        &redis::cmd("HGET")
            .arg(key)
            .arg("job")
            .query::<String>(&mut h.redis.conn())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(job["result_field"], "stage:0");
    let bytes = memory_usage(&h, key);
    eprintln!("MEMORY USAGE of a 1-stage record with a 3 MB result: {bytes} bytes");
    assert!(bytes >= 3_000_000, "{bytes}");
}

#[test]
fn the_record_has_every_state_change_under_many_progress_reports() {
    let h = Harness::new(&config("", 2_000));
    let sub = h.subscribe();
    let (_a, _db_a) = host_a(&h);
    let ids: Vec<String> = (0..4).map(|_| enqueue(&h, &["pipe"])).collect();
    for id in &ids {
        completed_message(&sub, id);
    }
    for id in &ids {
        let job = wait_for(LONG, "the record", || {
            job_on(&h, &h.db, id).filter(|j| j["status"] == "completed")
        });
        let statuses: Vec<&str> = job["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["completed"; 4], "{job:#}");
        assert_eq!(job["stages"][3]["result"]["n"], 4);
    }
}

// ------------------------------------------------------------ across daemons

#[test]
fn a_job_requeued_on_sigterm_and_finished_elsewhere_names_each_stage_daemon() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
shutdown_grace_secs = 1

[jobs.two]
stages = [
  { name = "first", run = ["sh", "-c", '''cat > /dev/null; echo '{"result": 1}' '''] },
  { name = "second", run = ["sh", "-c", '''cat > /dev/null; if [ "$SLOW" = 1 ]; then i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; fi; echo '{"result": 2}' '''] },
]
"#,
    );
    let sub = h.subscribe();
    let mut a = Daemon::start(
        &h.redis.url(),
        &h.prefix,
        &h.path("host-a.db"),
        &h.config,
        "host-a",
        &[("SLOW", "1")],
    );
    let id = enqueue(&h, &["two"]);
    wait_for(LONG, "the second stage running on A", || {
        job_on(&h, &h.db, &id).filter(|j| j["stages"][1]["status"] == "running")
    });
    a.sigterm();
    assert!(a.wait_exit(LONG).success());
    let job = job_on(&h, &h.db, &id).expect("the record");
    assert_eq!(job["status"], "pending", "{job:#}");
    assert_eq!(job["stages"][0]["status"], "completed", "{job:#}");
    assert_eq!(job["stages"][1]["status"], "interrupted", "{job:#}");
    assert_eq!(job["stages"][1]["worker_id"], "host-a", "{job:#}");

    // Host C finishes it; host B (no SQLite) sees who ran what.
    let _c = Daemon::start(
        &h.redis.url(),
        &h.prefix,
        &h.path("host-c.db"),
        &h.config,
        "host-c",
        &[],
    );
    let done = completed_message(&sub, &id);
    assert_eq!(done["result"], 2, "{done:#}");
    let job = wait_for(LONG, "the completed record", || {
        job_on(&h, &h.db, &id).filter(|j| j["status"] == "completed")
    });
    let ran: Vec<(&str, &str, &Value)> = job["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (status, worker) = (
                s["status"].as_str().unwrap(),
                s["worker_id"].as_str().unwrap(),
            );
            (status, worker, &s["result"])
        })
        .collect();
    assert_eq!(
        ran,
        [
            ("completed", "host-a", &json!(1)),
            ("completed", "host-c", &json!(2))
        ],
        "{job:#}"
    );
    assert_eq!(job["worker_id"], "host-c");
    let text = h.cli(&["job", &id], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("first") && l.contains(" [host-a")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("second") && l.contains(" [host-c")),
        "{text}"
    );
}

#[test]
fn records_are_written_again_after_the_scripts_are_flushed() {
    let h = Harness::new(&config("", 0));
    let sub = h.subscribe();
    let (_a, _db_a) = host_a(&h);
    let first = enqueue(&h, &["one"]);
    completed_message(&sub, &first);
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut h.redis.conn())
        .unwrap();
    let second = enqueue(&h, &["one"]);
    completed_message(&sub, &second);
    for id in [&first, &second] {
        let job = wait_for(LONG, "the record", || {
            job_on(&h, &h.db, id).filter(|j| j["status"] == "completed")
        });
        assert_eq!(job["stages"][0]["result"]["n"], 7, "{job:#}");
    }
}

#[test]
fn a_failed_job_has_its_error_and_its_failed_stage_in_the_record() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]

[retry]
max_attempts = 2
backoff_ms = 10
backoff_max_ms = 20

[jobs.broken]
stages = [
  { name = "ok", builtin = "noop" },
  { name = "boom", builtin = "fail", args = { message = "broken on purpose" } },
]
"#,
    );
    let sub = h.subscribe();
    let (_a, _db_a) = host_a(&h);
    let id = enqueue(&h, &["broken"]);
    sub.wait_status(&id, "failed", LONG);
    let job = wait_for(LONG, "the failed record", || {
        job_on(&h, &h.db, &id).filter(|j| j["status"] == "failed")
    });
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert!(
        job["error"]
            .as_str()
            .unwrap_or("")
            .contains("broken on purpose"),
        "{job:#}"
    );
    assert!(job["finished_at"].is_string(), "{job:#}");
    let boom = &job["stages"][1];
    assert_eq!(boom["status"], "failed", "{job:#}");
    assert_eq!(boom["attempt"], 2, "{job:#}");
    assert_eq!(boom["worker_id"], "host-a", "{job:#}");
    assert!(
        boom["error"]
            .as_str()
            .unwrap_or("")
            .contains("broken on purpose"),
        "{job:#}"
    );
    assert!(boom["result"].is_null(), "{job:#}");
    assert_eq!(job["stages"][0]["status"], "completed", "{job:#}");
    // The stage failures written to the record only took no seq number:
    // each run's messages are numbered 1, 2, 3… without a gap.
    let messages = sub.for_job(&id);
    for attempt in [1, 2] {
        let seqs: Vec<u64> = messages
            .iter()
            .filter(|m| m["attempt"] == attempt)
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "attempt {attempt}: {messages:#?}");
    }
}
