//! End-to-end tests: the real `conveyor` binary against a private Redis.
//!
//! Each test owns its Redis, temp dir, key prefix and SQLite file (see
//! `common`), so they run in parallel. Waits poll with generous deadlines and
//! end as soon as the condition holds; nothing asserts on wall-clock speed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Harness, enqueue, ledger_count, ledger_lines, ledger_pid, ledger_stage, toml_str, wait_for,
    wait_until,
};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

/// Shell for a stage that takes ~10 s (100 short sleeps, so SIGTERM/SIGKILL
/// of its group ends it at once) when the daemon's environment has SLOW=1,
/// and no time otherwise; then reports a result.
fn slow_if_env(result: &str) -> String {
    format!(
        r#"if [ "$SLOW" = 1 ]; then i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi; echo '{{"result": {result}}}';"#
    )
}

/// SIGKILLs a stage's process group left behind by a SIGKILLed daemon.
fn kill_group(pgid: i32) {
    // SAFETY: only sends a signal to a process group this test started
    // (through the daemon).
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

fn stage<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["stages"]
        .as_array()
        .expect("stages is a list")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {job:#}"))
}

fn stage_statuses(job: &Value) -> Vec<(String, String)> {
    job["stages"]
        .as_array()
        .expect("stages is a list")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn wait_job_status(h: &Harness, id: &str, status: &str) {
    wait_until(LONG, &format!("job {id} to be {status} in SQLite"), || {
        h.job_status(id).as_deref() == Some(status)
    });
}

// ------------------------------------------------------------------ 1

#[test]
fn demo_pipeline_completes_with_ordered_progress() {
    let shipped = Path::new(common::CRATE_ROOT).join("config/conveyor.toml");
    let h = Harness::with_config_file(&shipped);
    let mut daemon = h.daemon("w1", &[("DEMO_STAGE_SLEEP", "0.02")]);
    let sub = h.subscribe();

    let id = enqueue(&h, &["video.generate", "--payload", r#"{"video_id":1}"#]);
    sub.wait_status(&id, "completed", LONG);

    let msgs = sub.for_job(&id);
    let stages = ["script_gen", "voice_gen", "video_gen", "compositing"];
    let fields = [
        "job_id",
        "type",
        "queue",
        "status",
        "stage",
        "stage_index",
        "stages_total",
        "progress",
        "attempt",
        "worker_id",
        "message",
        "ts",
    ];
    let mut last_seq = 0;
    let mut last_progress = 0.0;
    for m in &msgs {
        for f in fields {
            assert!(m.get(f).is_some(), "field {f} missing in {m}");
        }
        assert_eq!(m["type"], "video.generate", "{m}");
        assert_eq!(m["queue"], "default", "{m}");
        assert_eq!(m["stages_total"], 4, "{m}");
        assert_eq!(m["worker_id"], "w1", "{m}");
        assert_eq!(m["attempt"], 1, "{m}");
        assert!(m["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{m}");
        let seq = m["seq"].as_u64().expect("seq is a number");
        assert!(seq > last_seq, "seq not increasing: {seq} after {last_seq}");
        last_seq = seq;
        let p = m["progress"].as_f64().expect("progress is a number");
        assert!((0.0..=100.0).contains(&p), "{m}");
        assert!(
            p >= last_progress,
            "progress went down: {p} after {last_progress}"
        );
        last_progress = p;
    }
    let last = msgs.last().expect("messages");
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["progress"].as_f64(), Some(100.0), "{last}");
    assert_eq!(
        msgs.iter().filter(|m| m["status"] == "completed").count(),
        1,
        "one completed message"
    );

    // Per stage, in order: stage_started, >= 1 progress, stage_completed.
    let events: Vec<(String, Option<String>)> = msgs
        .iter()
        .map(|m| {
            (
                m["event"].as_str().unwrap_or_default().to_owned(),
                m["stage"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let mut at = 0;
    for (i, name) in stages.iter().enumerate() {
        let started = events[at..]
            .iter()
            .position(|(e, s)| e == "stage_started" && s.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage_started for {name} after #{at}: {events:?}"))
            + at;
        let completed = events[started..]
            .iter()
            .position(|(e, s)| e == "stage_completed" && s.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage_completed for {name}: {events:?}"))
            + started;
        let progress = events[started..completed]
            .iter()
            .filter(|(e, s)| e == "progress" && s.as_deref() == Some(name))
            .count();
        assert!(progress >= 1, "no progress event in stage {name}");
        assert_eq!(msgs[started]["stage_index"], i, "{}", msgs[started]);
        assert_eq!(msgs[completed]["stage_index"], i, "{}", msgs[completed]);
        at = completed + 1;
    }
    assert_eq!(
        events.iter().filter(|(e, _)| e == "stage_started").count(),
        4
    );
    assert_eq!(
        events
            .iter()
            .filter(|(e, _)| e == "stage_completed")
            .count(),
        4
    );

    let job = h.job_ok(&id);
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["type"], "video.generate");
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["progress"].as_f64(), Some(100.0), "{job:#}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["error"], Value::Null);
    assert_eq!(job["payload"], json!({"video_id": 1}));
    let names: Vec<&str> = job["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, stages);
    for name in stages {
        let s = stage(&job, name);
        assert_eq!(s["status"], "completed", "{s}");
        assert!(s["result"].is_object(), "stage {name} has no result: {s}");
        assert!(s["started_at"].is_string() && s["finished_at"].is_string());
    }
    assert_eq!(stage(&job, "script_gen")["result"]["scenes"], 4);

    assert_eq!(h.llen(&h.active_key("default", "w1")), 0, "active list");
    assert_eq!(h.llen(&h.pending_key("default")), 0, "pending list");
    assert_eq!(h.llen(&h.dead_key("default")), 0, "dead list");

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 2

fn three_stage_ledger_config(ledger: &Path) -> String {
    let mut c = String::from(
        "[worker]\nconcurrency = 2\nshutdown_grace_secs = 1\nkill_grace_secs = 1\n\n\
         [jobs.ledger]\nmax_attempts = 1\n",
    );
    c += &ledger_stage("ledger", "s1", ledger, r#"echo '{"result": {"n": 1}}';"#);
    c += &ledger_stage("ledger", "s2", ledger, &slow_if_env(r#"{"n": 2}"#));
    c += &ledger_stage("ledger", "s3", ledger, r#"echo '{"result": {"n": 3}}';"#);
    c
}

#[test]
fn sigterm_mid_stage_two_requeues_and_second_daemon_resumes() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&three_stage_ledger_config(&ledger));
    let mut a = h.daemon("wa", &[("SLOW", "1")]);
    let id = enqueue(&h, &["ledger", "--id", "job-1"]);

    wait_until(LONG, "stage s2 to start", || {
        ledger_count(&ledger, &format!("S s2 {id}")) == 1
    });
    a.sigterm();
    let status = a.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "daemon A: {status:?}");

    assert_eq!(h.llen(&h.active_key("default", "wa")), 0, "A's active list");
    let pending = h.lrange_json(&h.pending_key("default"));
    assert_eq!(pending.len(), 1, "pending: {pending:?}");
    let job = &pending[0];
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["type"], "ledger");
    let results = job["_conveyor"]["results"]
        .as_object()
        .unwrap_or_else(|| panic!("no _conveyor.results in {job}"));
    assert_eq!(
        results.keys().collect::<Vec<_>>(),
        ["s1"],
        "checkpoint: {job}"
    );
    assert_eq!(results["s1"], json!({"n": 1}));
    assert_eq!(job["_conveyor"]["requeues"], 1, "{job}");

    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "pending", "{rec:#}");
    assert_eq!(
        stage_statuses(&rec),
        pairs(&[
            ("s1", "completed"),
            ("s2", "interrupted"),
            ("s3", "pending")
        ]),
        "{rec:#}"
    );
    assert_eq!(ledger_count(&ledger, &format!("C s2 {id}")), 0);

    // Daemon B, without SLOW: stage 2 is quick now.
    let mut b = h.daemon("wb", &[]);
    wait_job_status(&h, &id, "completed");
    for (line, n) in [
        ("S s1", 1),
        ("C s1", 1),
        ("S s2", 2),
        ("C s2", 1),
        ("S s3", 1),
        ("C s3", 1),
    ] {
        assert_eq!(
            ledger_count(&ledger, &format!("{line} {id}")),
            n,
            "`{line}` lines; ledger:\n{}",
            ledger_lines(&ledger).join("\n")
        );
    }
    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["worker_id"], "wb");
    assert_eq!(
        stage_statuses(&rec),
        pairs(&[
            ("s1", "completed"),
            ("s2", "completed"),
            ("s3", "completed")
        ])
    );
    assert_eq!(stage(&rec, "s1")["result"], json!({"n": 1}));
    assert_eq!(stage(&rec, "s3")["result"], json!({"n": 3}));
    assert_eq!(h.llen(&h.pending_key("default")), 0);
    assert_eq!(h.llen(&h.active_key("default", "wb")), 0);
    b.sigterm();
    assert_eq!(b.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 3

#[test]
fn two_daemons_share_200_jobs_each_run_exactly_once() {
    const N: usize = 200;
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        r#"
[worker]
concurrency = 4

[jobs.t]
max_attempts = 1
[[jobs.t.stages]]
name = "mark"
run = ["sh", "-c", '''cat > /dev/null; sleep 0.01; echo "$CONVEYOR_JOB_ID" >> "$LEDGER"''']
env = {{ LEDGER = {} }}
"#,
        toml_str(ledger.to_string_lossy())
    ));
    let mut w1 = h.daemon("w1", &[]);
    let mut w2 = h.daemon("w2", &[]);

    let mut conn = h.redis.conn();
    for n in 0..N {
        let job = json!({"id": format!("j{n}"), "type": "t", "payload": {"n": n}});
        let _: i64 = redis::cmd("LPUSH")
            .arg(h.pending_key("default"))
            .arg(job.to_string())
            .query(&mut conn)
            .expect("LPUSH");
    }

    wait_until(
        Duration::from_secs(60),
        "200 jobs completed in SQLite",
        || h.count_status("completed") == N as u64,
    );
    let status = h.status();
    assert_eq!(
        status["jobs_by_status"],
        json!({"completed": N}),
        "{status:#}"
    );
    let q = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "default")
        .expect("default queue in status")
        .clone();
    assert_eq!(
        (&q["pending"], &q["active"], &q["dead"]),
        (&json!(0), &json!(0), &json!(0)),
        "{q}"
    );

    let lines = ledger_lines(&ledger);
    assert_eq!(lines.len(), N, "ledger lines");
    let distinct: BTreeSet<&str> = lines.iter().map(String::as_str).collect();
    let expected: BTreeSet<String> = (0..N).map(|n| format!("j{n}")).collect();
    assert_eq!(
        distinct,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );

    let by_worker: BTreeMap<String, i64> = h
        .sql_query(|c| {
            let mut st = c.prepare("SELECT worker_id, count(*) FROM jobs GROUP BY worker_id")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .expect("query SQLite");
    assert_eq!(
        by_worker.keys().map(String::as_str).collect::<Vec<_>>(),
        ["w1", "w2"],
        "{by_worker:?}"
    );
    assert!(by_worker.values().all(|n| *n > 0), "{by_worker:?}");
    assert_eq!(by_worker.values().sum::<i64>(), N as i64);

    assert_eq!(h.llen(&h.pending_key("default")), 0);
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    assert_eq!(h.llen(&h.active_key("default", "w2")), 0);
    assert_eq!(h.llen(&h.dead_key("default")), 0);

    w1.sigterm();
    w2.sigterm();
    assert_eq!(w1.wait_exit(EXIT).code(), Some(0));
    assert_eq!(w2.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 4

#[test]
fn poison_messages_are_dead_lettered_while_good_jobs_complete() {
    let h = Harness::new(
        r#"
[worker]
max_job_bytes = 4096

[jobs.echo]
stages = [{ name = "echo", builtin = "echo" }]
"#,
    );
    let mut daemon = h.daemon("w1", &[]);

    let big = json!({"id": "big", "type": "echo", "payload": "x".repeat(10 * 1024)}).to_string();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // Nested past serde_json's recursion limit but under max_job_bytes, so
    // it reaches the parser (the 100,000-deep one is refused by size).
    let deep_small = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000));
    let poison: Vec<Vec<u8>> = vec![
        b"{\"id\":".to_vec(),
        b"[1,2]".to_vec(),
        br#"{"id":"p3"}"#.to_vec(),
        br#"{"id":"p4","type":"no_such_type"}"#.to_vec(),
        b"\xff\xfe".to_vec(),
        big.clone().into_bytes(),
        deep.clone().into_bytes(),
        br#"{"type":5}"#.to_vec(),
        deep_small.clone().into_bytes(),
    ];
    let good = 20;
    for i in 0..good.max(poison.len()) {
        if let Some(p) = poison.get(i) {
            h.lpush("default", p);
        }
        if i < good {
            h.lpush(
                "default",
                json!({"id": format!("g{i}"), "type": "echo", "payload": {"i": i}}).to_string(),
            );
        }
    }

    wait_until(LONG, "20 good jobs completed", || {
        h.count_status("completed") == good as u64
    });
    wait_until(LONG, "9 dead entries", || {
        h.llen(&h.dead_key("default")) >= poison.len() as u64
    });
    // Nothing else arrives later.
    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), poison.len(), "dead: {dead:#?}");

    // Each poison message exactly once, recognisable, with its reason.
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &dead {
        let o = e
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {e}"));
        let err = o["_conveyor"]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no _conveyor.error: {e}"));
        assert!(!err.is_empty(), "{e}");
        assert_eq!(o["_conveyor"]["worker_id"], "w1", "{e}");
        let raw = o.get("raw").and_then(Value::as_str);
        let (name, want) = if raw == Some("{\"id\":") {
            ("truncated", "invalid JSON")
        } else if raw == Some("[1,2]") {
            ("array", "must be a JSON object")
        } else if o.get("id") == Some(&json!("p3")) {
            assert!(o.get("type").is_none(), "{e}");
            ("p3", "missing `type`")
        } else if o.get("id") == Some(&json!("p4")) {
            assert_eq!(o["type"], "no_such_type", "{e}");
            ("p4", "unknown job type `no_such_type`")
        } else if o.get("raw_base64") == Some(&json!("//4=")) {
            ("not utf-8", "UTF-8")
        } else if raw == Some(big.as_str()) {
            ("big", "over the limit")
        } else if raw == Some(deep.as_str()) {
            ("deep", "over the limit")
        } else if raw == Some(deep_small.as_str()) {
            ("deep_small", "invalid JSON")
        } else if o.get("type") == Some(&json!(5)) {
            ("type 5", "`type` must be a string")
        } else {
            panic!("unexpected dead entry: {e}");
        };
        assert!(err.contains(want), "{name}: error {err:?} lacks {want:?}");
        *seen.entry(name).or_default() += 1;
    }
    assert_eq!(seen.len(), poison.len(), "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    // Good jobs ran, with echo's result = payload; poison never ran.
    let g7 = h.job_ok("g7");
    assert_eq!(g7["status"], "completed");
    assert_eq!(stage(&g7, "echo")["result"], json!({"i": 7}));
    assert_eq!(h.job_status("big"), None, "an oversize job must not run");
    let p4 = h.job_ok("p4");
    assert_eq!(p4["status"], "failed", "{p4:#}");
    assert!(
        p4["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown job type `no_such_type`")),
        "{p4:#}"
    );
    assert_eq!(h.job_status("p3").as_deref(), Some("failed"));
    assert_eq!(h.count_status("completed"), good as u64);

    assert!(!daemon.has_exited(), "the daemon died on poison");
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    assert_eq!(h.llen(&h.pending_key("default")), 0);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
}

// ------------------------------------------------------------------ 5

#[test]
fn failed_stage_dead_letters_the_job() {
    let h = Harness::new(
        r#"
[jobs.perm]
stages = [
  { name = "prep", builtin = "noop" },
  { name = "explode", builtin = "fail", args = { permanent = true } },
]

[jobs.exec_fail]
max_attempts = 1
stages = [
  { name = "prep", builtin = "noop" },
  { name = "boom", run = ["sh", "-c", "echo boom >&2; exit 3"] },
]
"#,
    );
    let mut daemon = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let perm = enqueue(&h, &["perm", "--id", "perm-1", "--payload", r#"{"k":1}"#]);
    let exec = enqueue(&h, &["exec_fail", "--id", "exec-1"]);

    for id in [&perm, &exec] {
        sub.wait_status(id, "failed", LONG);
        wait_job_status(&h, id, "failed");
    }

    let cases = [
        (&perm, "explode", "failed on purpose"),
        (&exec, "boom", "exited with code 3: boom"),
    ];
    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 2, "{dead:#?}");
    for (id, failing, detail) in cases {
        let rec = h.job_ok(id);
        assert_eq!(rec["status"], "failed", "{rec:#}");
        let error = rec["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains(&format!("`{failing}`")) && error.contains(detail),
            "{id}: error {error:?}"
        );
        assert_eq!(
            stage_statuses(&rec),
            pairs(&[("prep", "completed"), (failing, "failed")]),
            "{rec:#}"
        );
        assert!(
            stage(&rec, failing)["error"]
                .as_str()
                .is_some_and(|e| e.contains(detail)),
            "{rec:#}"
        );

        let entry = dead
            .iter()
            .find(|e| e["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not in dead: {dead:#?}"));
        let meta = &entry["_conveyor"];
        assert_eq!(meta["error"].as_str(), Some(error.as_str()), "{entry}");
        let results = meta["results"].as_object().expect("_conveyor.results");
        assert_eq!(results.keys().collect::<Vec<_>>(), ["prep"], "{entry}");
        assert_eq!(meta["attempt"], 1, "{entry}");
        assert_eq!(meta["worker_id"], "w1", "{entry}");
        assert!(meta["failed_at"].is_string(), "{entry}");

        let msgs = sub.for_job(id);
        let last = msgs
            .iter()
            .max_by_key(|m| m["seq"].as_u64())
            .expect("messages");
        assert_eq!(last["status"], "failed", "{last}");
        assert_eq!(last["message"].as_str(), Some(error.as_str()), "{last}");
        assert!(msgs.iter().all(|m| m["status"] != "completed"), "{msgs:#?}");
    }
    assert_eq!(
        dead.iter().find(|e| e["id"] == "perm-1").unwrap()["payload"],
        json!({"k": 1})
    );
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    assert_eq!(h.llen(&h.pending_key("default")), 0);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 6

#[test]
fn stage_timeout_fails_the_job() {
    let h = Harness::new(
        r#"
[jobs.slow]
max_attempts = 1
stages = [{ name = "wait", builtin = "sleep", args = { ms = 30000 }, timeout_secs = 1 }]
"#,
    );
    let mut daemon = h.daemon("w1", &[]);
    let started = Instant::now();
    let id = enqueue(&h, &["slow", "--id", "slow-1"]);
    wait_job_status(&h, &id, "failed");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "sanity: took {took:?}");

    let rec = h.job_ok(&id);
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`wait`") && error.contains("timed out"),
        "{rec:#}"
    );
    assert_eq!(stage(&rec, "wait")["status"], "failed", "{rec:#}");
    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "slow-1");
    assert!(
        dead[0]["_conveyor"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
}

/// A job's own deadline spans its stages: two 1.5 s stages under a 2 s job
/// timeout (set per job, over the type's 60 s) time out in the second
/// stage, which is stopped; the timeout is retryable, and attempt 2
/// resumes at the failed stage (the first one is not run again), fits in
/// the deadline, and completes.
#[test]
fn job_timeout_spans_stages_and_the_retry_resumes_at_the_failed_stage() {
    let h = Harness::new(
        r#"
[retry]
backoff_ms = 50
[worker]
promote_interval_ms = 50
[jobs.two]
max_attempts = 2
timeout_secs = 60
stages = [
  { name = "first", builtin = "sleep", args = { ms = 1500 } },
  { name = "second", builtin = "sleep", args = { ms = 1500 } },
]
"#,
    );
    let mut daemon = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let id = enqueue(&h, &["two", "--id", "two-1", "--timeout-secs", "2"]);
    wait_job_status(&h, &id, "completed");
    let rec = h.job_ok(&id);
    assert_eq!(rec["attempt"], 2, "{rec:#}");
    let attempts = rec["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{rec:#}");
    assert_eq!(attempts[0]["status"], "failed", "{rec:#}");
    let error = attempts[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`second`") && error.contains("timed out after 2s"),
        "{rec:#}"
    );
    assert_eq!(attempts[1]["status"], "completed", "{rec:#}");
    // Attempt 2 started at `second`: no `stage_started` of `first` in it.
    let attempt2: Vec<Value> = sub
        .for_job(&id)
        .into_iter()
        .filter(|m| m["attempt"] == 2 && m["event"] == "stage_started")
        .collect();
    assert_eq!(attempt2.len(), 1, "{attempt2:#?}");
    assert_eq!(attempt2[0]["stage"], "second");
    assert_eq!(h.llen(&h.dead_key("default")), 0);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 7

fn two_stage_ledger_config(ledger: &Path, worker: &str) -> String {
    let mut c = format!("{worker}\n[jobs.ledger]\nmax_attempts = 1\n");
    c += &ledger_stage("ledger", "s1", ledger, r#"echo '{"result": {"n": 1}}';"#);
    c += &ledger_stage("ledger", "s2", ledger, &slow_if_env(r#"{"n": 2}"#));
    c
}

/// Starts the 2-stage ledger job on a SLOW daemon, waits until stage 2 runs
/// (and stage 1 is recorded), SIGKILLs the daemon and its orphaned stage.
fn run_until_stage_two_then_sigkill(h: &Harness, ledger: &Path, worker: &str, id: &str) {
    let mut a = h.daemon(worker, &[("SLOW", "1")]);
    enqueue(h, &["ledger", "--id", id]);
    wait_until(LONG, "stage s2 to start", || {
        ledger_count(ledger, &format!("S s2 {id}")) == 1
    });
    wait_until(LONG, "s1 recorded as completed", || {
        h.stage_status(id, "s1").as_deref() == Some("completed")
    });
    a.sigkill();
    assert!(a.wait_exit(EXIT).code().is_none(), "killed by a signal");
    // The daemon cannot stop its stage any more: do it here.
    let pgid = ledger_pid(ledger, &format!("S s2 {id}")).expect("pid in the ledger");
    kill_group(pgid);
    assert_eq!(
        h.llen(&h.active_key("default", worker)),
        1,
        "job left active"
    );
}

#[test]
fn restart_with_same_id_recovers_own_jobs_without_rerunning_finished_stages() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&two_stage_ledger_config(&ledger, ""));
    let id = "job-7";
    run_until_stage_two_then_sigkill(&h, &ledger, "w1", id);
    assert_eq!(h.job_status(id).as_deref(), Some("running"));

    // Same id again (its previous pid is dead): takes over and recovers.
    let mut again = h.daemon("w1", &[]);
    wait_job_status(&h, id, "completed");
    for (line, n) in [("S s1", 1), ("C s1", 1), ("S s2", 2), ("C s2", 1)] {
        assert_eq!(
            ledger_count(&ledger, &format!("{line} {id}")),
            n,
            "`{line}`; ledger:\n{}",
            ledger_lines(&ledger).join("\n")
        );
    }
    let rec = h.job_ok(id);
    assert_eq!(
        stage_statuses(&rec),
        pairs(&[("s1", "completed"), ("s2", "completed")])
    );
    assert_eq!(stage(&rec, "s2")["result"], json!({"n": 2}));
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    assert_eq!(h.llen(&h.pending_key("default")), 0);
    again.sigterm();
    assert_eq!(again.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 8

#[test]
fn second_daemon_with_a_live_id_is_refused() {
    let h = Harness::new("[jobs.echo]\nstages = [{ name = \"echo\", builtin = \"echo\" }]\n");
    let mut w = h.daemon("same", &[]);
    let mut other = h.spawn_daemon("same", &[], &[]);
    let status = other.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "log:\n{}", other.log());
    let log = other.log();
    assert!(log.contains("in use"), "stderr:\n{log}");
    assert!(!log.contains("worker_started"), "stderr:\n{log}");

    // W is untouched: still running, registered, and taking jobs.
    assert!(!w.has_exited());
    let reg: Option<String> = redis::cmd("GET")
        .arg(h.worker_key("same"))
        .query(&mut h.redis.conn())
        .unwrap();
    let reg: Value = serde_json::from_str(&reg.expect("W's registration")).unwrap();
    assert_eq!(reg["pid"], w.pid(), "{reg}");
    let id = enqueue(&h, &["echo", "--id", "after", "--payload", "1"]);
    wait_job_status(&h, &id, "completed");
    assert_eq!(h.job_ok(&id)["worker_id"], "same");
    w.sigterm();
    assert_eq!(w.wait_exit(EXIT).code(), Some(0));
}

// ------------------------------------------------------------------ 9

#[test]
fn bad_config_exits_2_naming_the_key() {
    let h = Harness::new("");
    let ok_jobs = "[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\" }]\n";
    struct Bad<'a> {
        name: &'a str,
        toml: String,
        args: &'a [&'a str],
        env: &'a [(&'a str, &'a str)],
        wants: &'a [&'a str],
    }
    let cases = [
        Bad {
            name: "run and builtin",
            toml: "[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\", run = [\"true\"] }]\n"
                .into(),
            args: &[],
            env: &[],
            wants: &["stages[0]", "both"],
        },
        Bad {
            name: "no stages",
            toml: "[jobs.x]\nstages = []\n".into(),
            args: &[],
            env: &[],
            wants: &["stages"],
        },
        Bad {
            name: "unknown field",
            toml: format!("{ok_jobs}retries = 3\n"),
            args: &[],
            env: &[],
            wants: &["retries"],
        },
        Bad {
            name: "bad redis url",
            toml: ok_jobs.into(),
            args: &[],
            env: &[("CONVEYOR_REDIS_URL", "http://x")],
            wants: &["redis.url"],
        },
        Bad {
            name: "zero concurrency",
            toml: ok_jobs.into(),
            args: &["--concurrency", "0"],
            env: &[],
            wants: &["worker.concurrency"],
        },
    ];
    for case in cases {
        let name = case.name;
        h.write_config(&case.toml);
        let mut all = vec!["worker", "--worker-id", "bad"];
        all.extend(case.args);
        let out = h.cli(&all, case.env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: stderr:\n{stderr}");
        assert!(out.stdout.is_empty(), "{name}: stdout: {:?}", out.stdout);
        for want in case.wants {
            assert!(stderr.contains(want), "{name}: {want:?} not in:\n{stderr}");
        }
    }

    // A config file that does not exist.
    let missing = h.path("missing.toml");
    let out = h.cli_without_config(
        &[
            "worker",
            "--worker-id",
            "bad",
            "--config",
            &missing.to_string_lossy(),
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    // None of them got as far as registering.
    let workers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap();
    assert!(workers.is_empty(), "{workers:?}");
}

// ------------------------------------------------------------------ 10

#[test]
fn sigterm_lets_a_short_stage_finish_within_grace() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    // A short fetch block: the fetch loop stops at once on SIGTERM, so the
    // stage (2 s) is certainly still running when the grace period starts.
    let mut c = String::from(
        "[worker]\nshutdown_grace_secs = 10\nfetch_block_ms = 100\n\n\
         [jobs.short]\nmax_attempts = 1\n",
    );
    c += &ledger_stage(
        "short",
        "s1",
        &ledger,
        r#"sleep 2; echo '{"result": "done"}';"#,
    );
    h.write_config(&c);
    let mut daemon = h.daemon("w1", &[]);
    let id = enqueue(&h, &["short", "--id", "short-1"]);
    wait_until(LONG, "the stage to start", || {
        ledger_count(&ledger, &format!("S s1 {id}")) == 1
    });
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(25));
    assert_eq!(status.code(), Some(0), "{status:?}");

    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "completed", "{rec:#}");
    assert_eq!(stage(&rec, "s1")["result"], "done");
    assert_eq!(ledger_count(&ledger, &format!("C s1 {id}")), 1);
    assert_eq!(ledger_count(&ledger, &format!("S s1 {id}")), 1);
    assert_eq!(h.llen(&h.pending_key("default")), 0, "not requeued");
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    let log = daemon.log();
    assert!(!log.contains("job_requeued"), "{log}");
}

// ------------------------------------------------------------------ contract gaps

/// CONTRACT "Shutdown and crashes": a daemon killed without warning has its
/// jobs recovered by any live daemon once its heartbeat expired.
#[test]
fn killed_daemons_jobs_are_recovered_by_another_live_daemon() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&two_stage_ledger_config(
        &ledger,
        "[worker]\nheartbeat_secs = 1\ndead_after_secs = 2\n",
    ));
    let id = "job-orphan";
    run_until_stage_two_then_sigkill(&h, &ledger, "wa", id);
    let mut b = h.daemon("wb", &[]);
    wait_job_status(&h, id, "completed");
    assert_eq!(h.job_ok(id)["worker_id"], "wb");
    assert_eq!(ledger_count(&ledger, &format!("S s1 {id}")), 1);
    assert_eq!(h.llen(&h.active_key("default", "wa")), 0);
    b.sigterm();
    assert_eq!(b.wait_exit(EXIT).code(), Some(0));
}

/// CONTRACT "Progress" / job envelope: a retryable failure (any exit but
/// 0, 64, 65) is retried with backoff until `max_attempts`; status
/// `retrying` in between.
#[test]
fn retryable_failure_is_retried_up_to_max_attempts() {
    let h = Harness::new("");
    let marker = h.path("failed-once");
    h.write_config(&format!(
        r#"
[jobs.flaky]
max_attempts = 2
[[jobs.flaky.stages]]
name = "flaky"
run = ["sh", "-c", '''cat > /dev/null; if [ -e "$MARKER" ]; then exit 0; fi; touch "$MARKER"; echo transient >&2; exit 3''']
env = {{ MARKER = {} }}
"#,
        toml_str(marker.to_string_lossy())
    ));
    let mut daemon = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let id = enqueue(&h, &["flaky", "--id", "flaky-1"]);
    // Ends at the first final status, so the bug shows at once.
    let last = wait_for(LONG, "flaky-1 to complete or fail", || {
        sub.for_job(&id)
            .into_iter()
            .find(|m| m["status"] == "completed" || m["status"] == "failed")
    });
    assert_eq!(last["status"], "completed", "{last}");
    assert!(
        sub.for_job(&id).iter().any(|m| m["status"] == "retrying"),
        "{:#?}",
        sub.for_job(&id)
    );
    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "completed", "{rec:#}");
    assert_eq!(rec["attempt"], 2, "{rec:#}");
    assert_eq!(h.llen(&h.dead_key("default")), 0);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
}

/// CONTRACT "Pipelines (config)": the example config of the contract
/// (with `[retry]` and `worker.http`) is a valid config.
#[test]
fn contract_example_config_is_accepted() {
    let h = Harness::new(
        r#"
[redis]
url = "redis://127.0.0.1:6379"
prefix = "conveyor"

[worker]
queues = ["default"]
concurrency = 5
shutdown_grace_secs = 20
heartbeat_secs = 2
dead_after_secs = 15
http = "127.0.0.1:9464"

[store]
path = "data/conveyor.db"

[retry]
backoff_ms = 1000
backoff_max_ms = 600000

[jobs."video.generate"]
max_attempts = 3
stages = [
  { name = "script_gen",  run = ["sh", "examples/stages/script_gen.sh"],  weight = 25, timeout_secs = 300 },
  { name = "voice_gen",   run = ["sh", "examples/stages/voice_gen.sh"],   weight = 25 },
  { name = "video_gen",   run = ["sh", "examples/stages/video_gen.sh"],   weight = 25 },
  { name = "compositing", run = ["sh", "examples/stages/compositing.sh"], weight = 25 },
]
"#,
    );
    // `status` loads and validates the config, then only reads Redis.
    let out = h.cli(&["status", "--json"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CONTRACT "CLI": the commands and options it lists exist.
#[test]
fn contract_cli_commands_exist() {
    let h = Harness::new("");
    let mut missing = Vec::new();
    for args in [
        &["cancel", "--help"][..],
        &["retry", "--help"],
        &["dead", "list", "--help"],
        &["dead", "retry", "--help"],
        &["dead", "purge", "--help"],
        &["doctor", "--help"],
        &["dashboard", "--help"],
        &["watch", "--help"],
    ] {
        if !h.cli(args, &[]).status.success() {
            missing.push(args.join(" "));
        }
    }
    let help = h.cli(&["enqueue", "--help"], &[]);
    if !String::from_utf8_lossy(&help.stdout).contains("--delay") {
        missing.push("enqueue --delay".into());
    }
    assert!(missing.is_empty(), "missing: {missing:?}");
}

// ------------------------------------------------------- drain boundaries

/// SIGTERM while stage 1 of 3 runs: stage 1 finishes within the grace
/// period, stage 2 is not started by the draining daemon, and the job goes
/// back with stage 1's result; the daemon exits long before the grace ends.
#[test]
fn sigterm_finishes_the_running_stage_and_requeues_at_the_next() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c = String::from(
        "[worker]\nshutdown_grace_secs = 30\nfetch_block_ms = 100\n\n\
         [jobs.three]\nmax_attempts = 1\n",
    );
    c += &ledger_stage(
        "three",
        "s1",
        &ledger,
        r#"sleep 1.5; echo '{"result": 1}';"#,
    );
    c += &ledger_stage("three", "s2", &ledger, r#"echo '{"result": 2}';"#);
    c += &ledger_stage("three", "s3", &ledger, r#"echo '{"result": 3}';"#);
    h.write_config(&c);
    let mut daemon = h.daemon("w1", &[]);
    let id = enqueue(&h, &["three", "--id", "three-1"]);
    wait_until(LONG, "stage 1 to start", || {
        ledger_count(&ledger, &format!("S s1 {id}")) == 1
    });
    let signalled = std::time::Instant::now();
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(25));
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Far below the 30 s grace: the daemon did not wait for stages it would
    // only have started.
    assert!(signalled.elapsed() < Duration::from_secs(20));

    assert_eq!(ledger_count(&ledger, &format!("C s1 {id}")), 1);
    assert_eq!(
        ledger_count(&ledger, &format!("S s2 {id}")),
        0,
        "s2 must not start while draining"
    );
    let pending = h.lrange_json(&h.pending_key("default"));
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["_conveyor"]["results"], json!({"s1": 1}));
    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "pending", "{rec:#}");
    assert_eq!(
        stage_statuses(&rec),
        pairs(&[("s1", "completed"), ("s2", "pending"), ("s3", "pending")])
    );
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    assert!(daemon.log().contains("job_requeued"));

    // The next daemon resumes at s2.
    let mut b = h.daemon("w2", &[]);
    wait_job_status(&h, &id, "completed");
    assert_eq!(ledger_count(&ledger, &format!("S s1 {id}")), 1);
    assert_eq!(ledger_count(&ledger, &format!("S s2 {id}")), 1);
    b.sigterm();
    assert_eq!(b.wait_exit(EXIT).code(), Some(0));
}

// ---------------------------------------------------------------- systemd

/// The daemon speaks sd_notify on a real datagram socket: READY once up,
/// WATCHDOG while healthy (WatchdogSec given as WATCHDOG_USEC), STATUS,
/// then STOPPING and EXTEND_TIMEOUT_USEC when told to stop.
#[test]
fn systemd_notifications_follow_the_lifecycle() {
    use std::os::unix::net::UnixDatagram;
    let h = Harness::new("[jobs.e]\nstages = [{ name = \"e\", builtin = \"echo\" }]\n");
    let sock_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_str = sock_path.to_string_lossy().into_owned();
    let mut daemon = h.daemon(
        "w1",
        &[
            ("NOTIFY_SOCKET", sock_str.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let read_until = |seen: &mut Vec<String>, want: &str| {
        let deadline = std::time::Instant::now() + LONG;
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m| m.contains(want)) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {want} in {seen:?}"
            );
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until(&mut seen, "READY=1");
    read_until(&mut seen, "WATCHDOG=1");
    read_until(&mut seen, "STATUS=");
    daemon.sigterm();
    read_until(&mut seen, "STOPPING=1");
    read_until(&mut seen, "EXTEND_TIMEOUT_USEC=");
    assert_eq!(daemon.wait_exit(EXIT).code(), Some(0));
    let ready = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    let stopping = seen.iter().position(|m| m.contains("STOPPING=1")).unwrap();
    assert!(ready < stopping, "{seen:?}");
}
