//! Limits against the real binary: a stage's `max_concurrent` (per daemon
//! and per host) and a job type's `rate` across daemons. Checked from the
//! stage start and end times SQLite recorded, never from how fast it went.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::{Harness, wait_until};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

fn ms(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// (started, finished) in Unix ms of every completed run of stage `name`.
fn stage_runs(h: &Harness, name: &str) -> Vec<(u64, u64)> {
    let rows: Vec<(String, String)> = h
        .sql_query(|c| {
            let mut st = c.prepare(
                "SELECT started_at, finished_at FROM stages
                 WHERE name = ?1 AND status = 'completed' ORDER BY started_at",
            )?;
            let rows = st.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .unwrap_or_default();
    rows.iter().map(|(a, b)| (ms(a), ms(b))).collect()
}

fn push(h: &Harness, kind: &str, ids: impl IntoIterator<Item = String>) {
    let mut pipe = redis::pipe();
    for id in ids {
        let job = json!({"id": id, "type": kind}).to_string();
        pipe.lpush(h.pending_key("default"), job).ignore();
    }
    let () = pipe.query(&mut h.redis.conn()).unwrap();
}

fn assert_no_overlap(runs: &[(u64, u64)]) {
    for pair in runs.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two runs overlap: {:?} and {:?} (all: {runs:?})",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn a_limited_stage_runs_one_at_a_time_and_waiting_jobs_free_their_slot() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
concurrency = 2

[jobs.render]
stages = [
  { name = "prepare", builtin = "noop" },
  { name = "gpu", builtin = "sleep", args = { ms = 1500 }, max_concurrent = 1 },
]

[jobs.quick]
stages = [{ name = "only", builtin = "noop" }]
"#,
    );
    push(&h, "render", (0..3).map(|i| format!("r{i}")));
    push(&h, "quick", (0..10).map(|i| format!("q{i}")));
    let mut d = h.daemon("w1", &[]);

    // The quick jobs do not wait behind the render jobs queued for the GPU:
    // all ten finish while the third render is still to finish.
    wait_until(LONG, "the quick jobs complete", || {
        (0..10).all(|i| h.job_status(&format!("q{i}")).as_deref() == Some("completed"))
    });
    let renders_done = (0..3)
        .filter(|i| h.job_status(&format!("r{i}")).as_deref() == Some("completed"))
        .count();
    assert!(renders_done < 3, "the quick jobs waited for the GPU queue");

    wait_until(LONG, "the render jobs complete", || {
        h.count_status("completed") == 13
    });
    let gpu = stage_runs(&h, "gpu");
    assert_eq!(gpu.len(), 3);
    assert_no_overlap(&gpu);
    let waited = d
        .log_events()
        .iter()
        .filter(|e| e["event"] == "stage_waiting")
        .count();
    assert!(waited >= 1, "a render job waited for the slot");
    d.sigterm();
    d.wait_exit(LONG);
}

#[test]
fn a_host_wide_limit_holds_across_daemons_of_the_host() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
concurrency = 1

[jobs.render]
stages = [{ name = "gpu", builtin = "sleep", args = { ms = 400 }, max_concurrent = 1, max_concurrent_scope = "host" }]
"#,
    );
    // Both daemons wait for work before it comes, and each takes at most
    // two jobs in hand (one slot, one parked), so both get some.
    let mut d1 = h.daemon("w1", &[]);
    let mut d2 = h.daemon("w2", &[]);
    push(&h, "render", (0..6).map(|i| format!("r{i}")));
    wait_until(LONG, "the render jobs complete", || {
        h.count_status("completed") == 6
    });
    let gpu = stage_runs(&h, "gpu");
    assert_eq!(gpu.len(), 6);
    assert_no_overlap(&gpu);
    let workers: std::collections::BTreeSet<String> = h
        .sql_query(|c| {
            let mut st = c.prepare("SELECT DISTINCT worker_id FROM jobs")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .unwrap();
    assert_eq!(workers.len(), 2, "both daemons ran jobs: {workers:?}");
    d1.sigterm();
    d2.sigterm();
    d1.wait_exit(LONG);
    d2.wait_exit(LONG);
}

#[test]
fn a_rate_limit_holds_across_daemons() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
concurrency = 4

[jobs.limited]
rate = "3/2s"
stages = [{ name = "call", builtin = "noop" }]
"#,
    );
    push(&h, "limited", (0..9).map(|i| format!("l{i}")));
    let mut d1 = h.daemon("w1", &[]);
    let mut d2 = h.daemon("w2", &[]);
    wait_until(LONG, "the limited jobs complete", || {
        h.count_status("completed") == 9
    });
    let starts: Vec<u64> = stage_runs(&h, "call").iter().map(|r| r.0).collect();
    assert_eq!(starts.len(), 9);
    // At most 3 starts in any 2 s window (by Redis' clock, which is this
    // host's; the slack covers the time from the script to the stage).
    for w in starts.windows(4) {
        assert!(w[3] + 300 >= w[0] + 2000, "4 starts within 2 s: {starts:?}");
    }
    assert!(starts[8] + 300 >= starts[0] + 4000, "{starts:?}");
    let limited = d1
        .log_events()
        .into_iter()
        .chain(d2.log_events())
        .filter(|e| e["event"] == "job_rate_limited")
        .count();
    assert!(limited >= 1);
    d1.sigterm();
    d2.sigterm();
    d1.wait_exit(LONG);
    d2.wait_exit(LONG);
}

#[test]
fn sigterm_while_waiting_on_a_limit_requeues_the_job() {
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
concurrency = 2
shutdown_grace_secs = 10

[jobs.render]
stages = [
  { name = "prepare", builtin = "noop" },
  { name = "gpu", builtin = "sleep", args = { ms = 2000 }, max_concurrent = 1 },
]
"#,
    );
    push(&h, "render", ["r0".to_owned(), "r1".to_owned()]);
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "one render waits for the GPU", || {
        d.log_events().iter().any(|e| e["event"] == "stage_waiting")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    // The running one finished within the grace period; the waiting one
    // went back to pending with its first stage done, to resume at `gpu`.
    let pending = h.lrange_json(&h.pending_key("default"));
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(h.count_status("completed"), 1);
    let waiting = pending[0]["id"].as_str().unwrap().to_owned();
    assert!(
        pending[0]["_conveyor"]["results"].get("prepare").is_some(),
        "resumes after `prepare`: {pending:?}"
    );
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "the requeued job completes", || {
        h.job_status(&waiting).as_deref() == Some("completed")
    });
    d.sigterm();
    d.wait_exit(LONG);
}

#[test]
fn limited_stages_between_others_never_deadlock_at_concurrency_one() {
    // A job that waits for the GPU with its slot given back, then needs a
    // slot again for `post`, while another holds the only slot waiting for
    // the GPU: the GPU holder runs on its limit slot, so all complete.
    let h = Harness::new(
        r#"
[worker]
queues = ["default"]
concurrency = 1

[jobs.render]
stages = [
  { name = "prep", builtin = "noop" },
  { name = "gpu", builtin = "sleep", args = { ms = 200 }, max_concurrent = 1 },
  { name = "post", builtin = "noop" },
]
"#,
    );
    push(&h, "render", (0..5).map(|i| format!("r{i}")));
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "every render completes", || {
        h.count_status("completed") == 5
    });
    assert_no_overlap(&stage_runs(&h, "gpu"));
    d.sigterm();
    d.wait_exit(LONG);
}
