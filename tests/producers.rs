//! Producer-side features against a real Redis and the real binary:
//! delayed jobs (`enqueue --delay / --at`, a raw `ZADD`) and unique job ids.
//!
//! Times are only ever lower bounds ("not before it was due"), never
//! "within N ms": the machines are shared and slow.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Harness, wait_for, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default"]
heartbeat_secs = 1
promote_interval_ms = 100

[jobs.quick]
queue = "default"
stages = [{ name = "only", builtin = "noop" }]

[jobs.slow]
queue = "default"
stages = [{ name = "nap", builtin = "sleep", args = { ms = 3000 } }]
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn enqueue_json(h: &Harness, args: &[&str]) -> Value {
    let mut all = vec!["enqueue"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = h.cli(&all, &[]);
    assert!(out.status.success(), "enqueue {args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("enqueue --json prints JSON")
}

fn scheduled_key(h: &Harness) -> String {
    format!("{}:{{default}}:scheduled", h.prefix)
}

fn started_ms(h: &Harness, id: &str) -> u64 {
    let started: String = h
        .sql_query(|c| {
            c.query_row("SELECT started_at FROM jobs WHERE id = ?1", [id], |r| {
                r.get(0)
            })
        })
        .expect("job started");
    let t = humantime::parse_rfc3339(&started).expect("RFC 3339 started_at");
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn delayed_job_is_scheduled_until_due_then_runs() {
    let h = Harness::new(CONFIG);
    let mut daemon = h.daemon("w1", &[]);

    let before = now_ms();
    let out = enqueue_json(&h, &["quick", "--id", "later", "--delay", "2s"]);
    assert_eq!(out["id"], "later");
    assert_eq!(out["status"], "scheduled");
    assert_eq!(out["enqueued"], true);
    let due_at = out["due_at"].as_str().expect("due_at for a delayed job");
    let due = humantime::parse_rfc3339_weak(due_at.trim_end_matches('Z'))
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(due >= before + 1_900, "due {due} vs enqueued at {before}");

    // Before it is due: `job` answers from Redis, `status` counts it.
    let job = h.job_ok("later");
    assert_eq!(job["status"], "scheduled", "{job}");
    assert_eq!(job["type"], "quick");
    assert_eq!(job["due_at"].as_str(), Some(due_at));
    let text = stdout(&h.cli(&["job", "later"], &[]));
    assert!(text.contains("scheduled") && text.contains("due"), "{text}");
    let status = h.status();
    let scheduled = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "default")
        .map(|q| q["scheduled"].clone());
    assert_eq!(scheduled, Some(json!(1)), "{status}");

    wait_until(LONG, "the delayed job completes", || {
        h.job_status("later").as_deref() == Some("completed")
    });
    // Promotion goes by Redis' clock, the same host's here.
    assert!(
        started_ms(&h, "later") + 50 >= due,
        "started before it was due"
    );
    assert_eq!(h.job_ok("later")["status"], "completed");
    daemon.sigterm();
    daemon.wait_exit(LONG);
}

#[test]
fn enqueue_at_a_time_with_an_offset() {
    let h = Harness::new(CONFIG);
    // An hour and a half from now, written with a -01:30 offset.
    let due = SystemTime::now() + Duration::from_secs(3 * 3600);
    let utc = humantime::format_rfc3339_seconds(due).to_string();
    let local = format!("{}-01:30", utc.trim_end_matches('Z'));
    let out = enqueue_json(&h, &["quick", "--id", "far", "--at", &local]);
    assert_eq!(out["status"], "scheduled");
    let want = due.duration_since(UNIX_EPOCH).unwrap().as_secs() + 5400;
    let scheduled: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(scheduled_key(&h))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut h.redis.conn())
        .unwrap();
    assert_eq!(scheduled.len(), 1);
    assert_eq!(scheduled[0].1 / 1000, want, "{local}");

    // A time in the past is due at once: a daemon runs it.
    let past = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(60));
    enqueue_json(&h, &["quick", "--id", "overdue", "--at", &past.to_string()]);
    let mut daemon = h.daemon("w1", &[]);
    wait_until(LONG, "the overdue job completes", || {
        h.job_status("overdue").as_deref() == Some("completed")
    });
    assert_eq!(h.job_ok("far")["status"], "scheduled");
    daemon.sigterm();
    daemon.wait_exit(LONG);

    let bad = h.cli(&["enqueue", "quick", "--at", "tomorrow"], &[]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("RFC 3339"), "{}", stderr(&bad));
    let bad = h.cli(&["enqueue", "quick", "--delay", "soon"], &[]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let both = h.cli(
        &[
            "enqueue",
            "quick",
            "--delay",
            "1s",
            "--at",
            &past.to_string(),
        ],
        &[],
    );
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}

#[test]
fn raw_zadd_by_a_producer_is_promoted_and_run() {
    let h = Harness::new(CONFIG);
    let mut daemon = h.daemon("w1", &[]);
    let job = json!({"id": "zadded", "type": "quick", "payload": {"n": 1}}).to_string();
    let due = now_ms() + 1_000;
    let _: i64 = redis::cmd("ZADD")
        .arg(scheduled_key(&h))
        .arg(due)
        .arg(&job)
        .query(&mut h.redis.conn())
        .unwrap();
    wait_until(LONG, "the ZADDed job completes", || {
        h.job_status("zadded").as_deref() == Some("completed")
    });
    assert!(
        started_ms(&h, "zadded") + 50 >= due,
        "started before it was due"
    );
    daemon.sigterm();
    daemon.wait_exit(LONG);
}

#[test]
fn a_live_job_id_is_not_enqueued_twice() {
    let h = Harness::new(CONFIG);

    // Pending: the second enqueue says so, exits 0 with the same id.
    let first = h.cli(&["enqueue", "quick", "--id", "once"], &[]);
    assert!(first.status.success());
    assert_eq!(stdout(&first), "once");
    let again = h.cli(&["enqueue", "quick", "--id", "once"], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), "once");
    assert!(
        stderr(&again).contains("already pending"),
        "{}",
        stderr(&again)
    );
    assert_eq!(h.llen(&h.pending_key("default")), 1);
    let dup = enqueue_json(&h, &["quick", "--id", "once"]);
    assert_eq!(dup["enqueued"], false);
    assert_eq!(dup["status"], "pending");

    // Scheduled: a delayed copy of a scheduled id is refused as well.
    enqueue_json(&h, &["quick", "--id", "planned", "--delay", "1h"]);
    let dup = enqueue_json(&h, &["quick", "--id", "planned"]);
    assert_eq!(dup["enqueued"], false);
    assert_eq!(dup["status"], "scheduled");
    assert!(dup["due_at"].is_string(), "{dup}");
    assert_eq!(h.llen(&h.pending_key("default")), 1);

    // Running: refused while it runs, accepted again once it completed.
    enqueue_json(&h, &["slow", "--id", "long"]);
    let mut daemon = h.daemon("w1", &[]);
    wait_until(LONG, "the slow job runs", || {
        h.job_status("long").as_deref() == Some("running")
    });
    let dup = enqueue_json(&h, &["slow", "--id", "long"]);
    assert_eq!(dup["enqueued"], false, "{dup}");
    assert!(
        dup["status"] == "running" || dup["status"] == "pending",
        "{dup}"
    );
    wait_until(LONG, "the slow job completes", || {
        h.job_status("long").as_deref() == Some("completed")
    });
    wait_until(LONG, "`once` completes", || {
        h.job_status("once").as_deref() == Some("completed")
    });
    let runs = |id: &str| -> i64 {
        h.sql_query(|c| {
            c.query_row(
                "SELECT count(*) FROM attempts WHERE job_id = ?1",
                [id],
                |r| r.get(0),
            )
        })
        .unwrap()
    };
    assert_eq!(runs("once"), 1);
    assert_eq!(runs("long"), 1);

    // Finished: the id is free again; the new run shows as pending first.
    daemon.sigterm();
    daemon.wait_exit(LONG);
    let out = enqueue_json(&h, &["quick", "--id", "once"]);
    assert_eq!(out["enqueued"], true, "{out}");
    assert_eq!(h.job_ok("once")["status"], "pending");
    let mut daemon = h.daemon("w2", &[]);
    wait_for(LONG, "`once` runs a second time", || {
        (runs("once") == 2 && h.job_status("once").as_deref() == Some("completed")).then_some(())
    });
    daemon.sigterm();
    daemon.wait_exit(LONG);
}

#[test]
fn a_dead_job_frees_its_id_and_a_revived_one_takes_it() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
[retry]
max_attempts = 1
[jobs.doomed]
queue = "default"
stages = [{ name = "boom", builtin = "fail" }]
"#,
    );
    let mut daemon = h.daemon("w1", &[]);
    enqueue_json(&h, &["doomed", "--id", "d1"]);
    wait_until(LONG, "the job is dead", || {
        h.llen(&h.dead_key("default")) == 1
    });
    daemon.sigterm();
    daemon.wait_exit(LONG);
    // Dead: not live, so the id may be enqueued again.
    let out = enqueue_json(&h, &["doomed", "--id", "d1"]);
    assert_eq!(out["enqueued"], true, "{out}");
    // A revived copy is live too: the pending one and the revived one are
    // the same id, so the CLI refuses a third.
    let retry = h.cli(&["retry", "d1"], &[]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    let out = enqueue_json(&h, &["doomed", "--id", "d1"]);
    assert_eq!(out["enqueued"], false, "{out}");
}

const PERIODIC: &str = r#"
[worker]
queues = ["default"]
heartbeat_secs = 1

[jobs.quick]
queue = "default"
stages = [{ name = "only", builtin = "noop" }]

[[schedules]]
name = "a"
type = "quick"
every = "1s"
catch_up = 3
payload = { from = "schedule a" }

[[schedules]]
name = "b"
type = "quick"
every = "1s"
"#;

/// Ticks (Unix seconds) of schedule `name`'s jobs in SQLite, sorted.
fn ticks(h: &Harness, name: &str) -> Vec<u64> {
    let ids: Vec<String> = h
        .sql_query(|c| {
            let mut st = c.prepare("SELECT id FROM jobs WHERE id LIKE ?1 ORDER BY id")?;
            let rows = st.query_map([format!("{name}@%")], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .unwrap_or_default();
    let mut out: Vec<u64> = ids
        .iter()
        .map(|id| {
            let at = id.split_once('@').unwrap().1;
            humantime::parse_rfc3339(at)
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
        })
        .collect();
    out.sort();
    out
}

/// `schedule_enqueued` log lines of the daemons, by job id.
fn enqueued_ids(daemons: &[&common::Daemon]) -> Vec<String> {
    daemons
        .iter()
        .flat_map(|d| d.log_events())
        .filter(|e| e["event"] == "schedule_enqueued")
        .map(|e| e["job_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn each_tick_is_enqueued_once_by_two_daemons() {
    let h = Harness::new(PERIODIC);
    let mut d1 = h.daemon("w1", &[]);
    let mut d2 = h.daemon("w2", &[]);
    wait_until(LONG, "five ticks of `b` ran", || ticks(&h, "b").len() >= 5);
    d1.sigterm();
    d2.sigterm();
    d1.wait_exit(LONG);
    d2.wait_exit(LONG);

    for name in ["a", "b"] {
        let t = ticks(&h, name);
        // Every second between the first and the last tick, once.
        let expected: Vec<u64> = (t[0]..=*t.last().unwrap()).collect();
        assert_eq!(t, expected, "schedule {name}");
    }
    let mut ids = enqueued_ids(&[&d1, &d2]);
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "a tick was enqueued twice: {ids:?}");
    assert_eq!(
        all,
        ticks(&h, "a").len() + ticks(&h, "b").len(),
        "every enqueued tick ran"
    );
    let job = h.job_ok(&format!(
        "a@{}",
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(ticks(&h, "a")[0]))
    ));
    assert_eq!(job["payload"], json!({"from": "schedule a"}));
    assert_eq!(job["status"], "completed");
}

#[test]
fn missed_ticks_are_skipped_unless_catch_up_asks() {
    let h = Harness::new(PERIODIC);
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "two ticks of `b` ran", || ticks(&h, "b").len() >= 2);
    d.sigterm();
    d.wait_exit(LONG);
    let last_b = *ticks(&h, "b").last().unwrap();
    let last_a = *ticks(&h, "a").last().unwrap();
    std::thread::sleep(Duration::from_secs(5));

    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "`b` ticks again", || {
        ticks(&h, "b").last().is_some_and(|&t| t > last_b)
    });
    wait_until(LONG, "the catch-up ran", || {
        d.log_events()
            .iter()
            .any(|e| e["event"] == "schedule_catching_up")
    });
    d.sigterm();
    d.wait_exit(LONG);

    // `b` skipped the downtime: a gap of at least 4 s, no burst.
    let b = ticks(&h, "b");
    let first_after = *b.iter().find(|&&t| t > last_b).unwrap();
    assert!(first_after >= last_b + 4, "b: {b:?}");
    // `a` enqueued the latest 3 missed ticks, right before its restart.
    let a = ticks(&h, "a");
    let caught: Vec<u64> = a
        .iter()
        .copied()
        .filter(|&t| t > last_a && t < first_after)
        .collect();
    assert_eq!(
        caught.len(),
        3,
        "a: {a:?}, last before stop {last_a}, b back at {first_after}"
    );
    assert_eq!(caught[2] - caught[0], 2, "consecutive: {caught:?}");
    let catch_up = d
        .log_events()
        .into_iter()
        .find(|e| e["event"] == "schedule_catching_up")
        .unwrap();
    assert_eq!(catch_up["schedule"], "a");
    assert_eq!(catch_up["missed"], 3);
}

/// Queues (in start order) of the first `n` jobs a daemon at concurrency 1
/// started, with 300 jobs waiting on each of `high` and `low`.
fn first_started_queues(worker_toml: &str, n: usize) -> Vec<String> {
    let h = Harness::new(&format!(
        r#"
[worker]
queues = ["high", "low"]
concurrency = 1
{worker_toml}

[jobs.quick]
stages = [{{ name = "only", builtin = "noop" }}]
"#
    ));
    let mut conn = h.redis.conn();
    let mut pipe = redis::pipe();
    for q in ["high", "low"] {
        for i in 0..300 {
            let job = json!({"id": format!("{q}-{i}"), "type": "quick"}).to_string();
            pipe.lpush(h.pending_key(q), job).ignore();
        }
    }
    let () = pipe.query(&mut conn).unwrap();
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "enough jobs ran", || {
        h.count_status("completed") >= n as u64
    });
    d.sigterm();
    d.wait_exit(LONG);
    h.sql_query(|c| {
        let mut st = c.prepare("SELECT queue FROM jobs ORDER BY started_at, rowid LIMIT ?1")?;
        let rows = st.query_map([n as i64], |r| r.get::<_, String>(0))?;
        rows.collect()
    })
    .unwrap()
}

#[test]
fn strict_priority_drains_high_first_and_weights_share_the_queues() {
    let strict = first_started_queues("", 100);
    assert_eq!(strict.len(), 100);
    assert!(strict.iter().all(|q| q == "high"), "{strict:?}");

    // high = 3, low = 1 (unlisted): low's expected share is 25 of 100.
    let weighted = first_started_queues("queue_weights = { high = 3 }", 100);
    let low = weighted.iter().filter(|q| *q == "low").count();
    assert!(
        (8..=45).contains(&low),
        "low ran {low} of the first 100: {weighted:?}"
    );
}
