//! `conveyor dashboard` against a real Redis, real daemons and the real
//! binary: the JSON API, the token on actions, `/events`, the `P:live`
//! snapshot, escaping, and shutdown with a stream open.

mod common;

use std::time::Duration;

use common::{Harness, SseReader, enqueue, wait_for, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default", "other"]
concurrency = 4

[retry]
max_attempts = 1

[jobs.quick]
stages = [{ name = "only", builtin = "echo" }]

[jobs.broken]
queue = "other"
stages = [{ name = "boom", builtin = "fail", args = { message = "broken on purpose" } }]

[jobs.slow]
stages = [
  { name = "one",   builtin = "sleep", args = { ms = 600 } },
  { name = "two",   builtin = "sleep", args = { ms = 600 } },
  { name = "three", builtin = "sleep", args = { ms = 600 } },
]
"#;

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect()
}

#[test]
fn the_api_reports_queues_workers_jobs_and_the_dead() {
    let h = Harness::new(CONFIG);
    let _d = h.daemon("w1", &[]);
    let dash = h.dashboard(None);
    enqueue(&h, &["quick", "--id", "q1", "--payload", r#"{"n":1}"#]);
    enqueue(&h, &["quick", "--id", "q2"]);
    enqueue(&h, &["broken", "--id", "b1"]);
    wait_until(LONG, "the jobs ran", || {
        h.count_status("completed") == 2 && h.count_status("failed") == 1
    });

    let queues = dash.get_json("/api/queues");
    let other = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "other")
        .cloned()
        .expect("queue other listed");
    assert_eq!(other["dead"], 1, "{queues}");
    let t = &queues["throughput"];
    assert_eq!(t["minutes"].as_array().unwrap().len(), 15);
    let sum = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .sum::<u64>()
    };
    assert_eq!(sum(&t["completed"]), 2, "{t}");
    assert_eq!(sum(&t["failed"]), 1, "{t}");
    assert_eq!(sum(&t["by_queue"]["default"]), 2, "{t}");
    assert_eq!(queues["jobs_by_status"]["completed"], 2);

    let workers = dash.get_json("/api/workers");
    let w = &workers["workers"][0];
    assert_eq!(w["id"], "w1", "{workers}");
    assert!(w["heartbeat_age_ms"].is_u64(), "{workers}");

    let all = dash.get_json("/api/jobs");
    assert_eq!(all["total"], 3);
    let failed = dash.get_json("/api/jobs?status=failed");
    assert_eq!(ids(&failed), ["b1"]);
    let searched = dash.get_json("/api/jobs?q=q2");
    assert_eq!(ids(&searched), ["q2"]);
    let by_type = dash.get_json("/api/jobs?type=quick&queue=default&limit=1&page=2");
    assert_eq!(
        (by_type["total"].as_u64(), ids(&by_type).len()),
        (Some(2), 1)
    );
    assert_eq!(dash.get("/api/jobs?status=bogus").code, 400);
    enqueue(&h, &["quick", "--id", "later", "--delay", "1h"]);
    let scheduled = dash.get_json("/api/jobs?status=scheduled");
    assert_eq!(ids(&scheduled), ["later"], "waiting jobs come from Redis");
    assert!(scheduled["jobs"][0]["due_at"].is_string());
    assert_eq!(
        dash.get_json("/api/jobs?status=scheduled&q=zzz")["total"],
        0
    );

    let q1 = dash.get_json("/api/jobs/q1");
    assert_eq!(q1["status"], "completed");
    assert_eq!(q1["dead"], false);
    let stage = &q1["record"]["stages"][0];
    assert_eq!(
        (stage["name"].as_str(), stage["status"].as_str()),
        (Some("only"), Some("completed"))
    );
    assert_eq!(stage["result"]["n"], 1, "echo's result is the payload");
    assert!(stage["started_at"].is_string() && stage["finished_at"].is_string());
    assert_eq!(q1["record"]["attempts"][0]["status"], "completed");
    let b1 = dash.get_json("/api/jobs/b1");
    assert_eq!(
        (b1["status"].as_str(), b1["dead"].as_bool()),
        (Some("failed"), Some(true))
    );
    assert_eq!(dash.get("/api/jobs/nope").code, 404);

    let dead = dash.get_json("/api/dead");
    let entries = dead["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{dead}");
    assert_eq!(entries[0]["id"], "b1");
    assert_eq!(entries[0]["queue"], "other");
    assert!(
        entries[0]["error"]
            .as_str()
            .unwrap()
            .contains("broken on purpose"),
        "{dead}"
    );
    assert_eq!(
        dash.get_json("/api/dead?queue=default")["entries"],
        Value::Array(vec![])
    );
    assert_eq!(dash.get("/nothing-here").code, 404);
}

#[test]
fn actions_need_the_token() {
    let h = Harness::new(CONFIG);
    let _d = h.daemon("w1", &[]);
    enqueue(&h, &["broken", "--id", "b1"]);
    enqueue(&h, &["broken", "--id", "b2"]);
    wait_until(LONG, "both failed", || h.llen(&h.dead_key("other")) == 2);

    // No token configured: refused, saying how to enable them.
    let open = h.dashboard(None);
    let r = open.post("/api/dead/purge", Some("anything"), r#"{"all":true}"#);
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("CONVEYOR_DASHBOARD_TOKEN"),
        "{}",
        r.body
    );
    drop(open);

    let dash = h.dashboard(Some("s3cret-token"));
    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-token!"),
    ] {
        let r = dash.post("/api/jobs/b1/retry", token, "");
        assert_eq!(r.code, 401, "token {token:?}: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = dash.post("/api/dead/purge", token, r#"{"all":true}"#);
        assert_eq!(r.code, 401, "token {token:?}: {}", r.body);
    }
    assert_eq!(h.llen(&h.dead_key("other")), 2, "nothing was done");

    let token = Some("s3cret-token");
    let r = dash.post("/api/dead/purge", token, "{}");
    assert_eq!(r.code, 400, "neither ids nor all: {}", r.body);
    let r = dash.post("/api/jobs/b1/retry", token, "");
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!(r.json()["requeued"][0]["id"], "b1");
    // It runs again and fails again.
    wait_until(LONG, "b1 ran again", || {
        h.job_ok("b1")["attempts"].as_array().unwrap().len() == 2
            && h.llen(&h.dead_key("other")) == 2
    });
    let r = dash.post("/api/jobs/nope/retry", token, "");
    assert_eq!(r.code, 404, "{}", r.body);
    let r = dash.post("/api/dead/purge?queue=other&ids=b2", token, "");
    assert_eq!(
        (r.code, r.json()["purged"].as_u64()),
        (200, Some(1)),
        "{}",
        r.body
    );
    let r = dash.post("/api/dead/retry", token, r#"{"ids":["b1"]}"#);
    assert_eq!(r.code, 200, "{}", r.body);
    wait_until(LONG, "b1 ran a third time", || {
        h.job_ok("b1")["attempts"].as_array().unwrap().len() == 3
            && h.llen(&h.dead_key("other")) == 1
    });
    let r = dash.post("/api/dead/purge", token, r#"{"all":true}"#);
    assert_eq!(r.json()["purged"], 1, "{}", r.body);
    assert_eq!(h.llen(&h.dead_key("other")), 0);

    // Cancel: a scheduled job never runs; a finished one is refused.
    enqueue(&h, &["quick", "--id", "later", "--delay", "1h"]);
    let r = dash.post("/api/jobs/later/cancel", token, "");
    assert_eq!(
        (r.code, r.json()["result"].as_str()),
        (200, Some("recorded")),
        "{}",
        r.body
    );
    let r = dash.post("/api/jobs/b1/cancel", token, "");
    assert_eq!(r.code, 409, "{}", r.body);
    let r = dash.post("/api/jobs/later/cancel", None, "");
    assert_eq!(r.code, 401);
}

#[test]
fn events_stream_progress_and_live_holds_running_jobs() {
    let h = Harness::new(CONFIG);
    let _d = h.daemon("w1", &[]);
    let dash = h.dashboard(None);
    let sse = SseReader::open(dash.port);
    // The bridge subscribes on its own; messages before that are not seen.
    wait_until(LONG, "the dashboard's PSUBSCRIBE", || {
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<i64>(&mut h.redis.conn())
            .is_ok_and(|n| n >= 1)
    });
    let id = enqueue(&h, &["slow", "--id", "s1"]);

    // While it runs, /api/live holds its latest message.
    let live = wait_for(LONG, "s1 in /api/live", || {
        let v = dash.get_json("/api/live");
        v["jobs"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["job_id"] == id.as_str()).cloned())
    });
    assert_eq!(live["status"], "running");
    assert_eq!(live["stages_total"], 3);
    assert_eq!(live["worker_id"], "w1");
    let raw: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:live", h.prefix))
        .arg(&id)
        .query(&mut h.redis.conn())
        .expect("HGET");
    assert!(raw.is_some(), "P:live holds the running job");

    // The stream carries its whole run, in order, to the end.
    let done = wait_for(LONG, "job_completed on /events", || {
        let mine: Vec<Value> = sse
            .messages()
            .into_iter()
            .filter(|m| m["job_id"] == id.as_str())
            .collect();
        mine.iter()
            .any(|m| m["event"] == "job_completed")
            .then_some(mine)
    });
    let events: Vec<&str> = done.iter().filter_map(|m| m["event"].as_str()).collect();
    assert!(
        events.contains(&"stage_started") && events.contains(&"progress"),
        "{events:?}"
    );
    let seqs: Vec<u64> = done.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let last = done.last().unwrap();
    assert_eq!(
        (last["status"].as_str(), last["progress"].as_f64()),
        (Some("completed"), Some(100.0))
    );

    // Once it ended, the snapshot drops it.
    wait_until(LONG, "s1 gone from /api/live", || {
        dash.get_json("/api/live")["jobs"]
            .as_array()
            .is_some_and(|a| a.iter().all(|j| j["job_id"] != id.as_str()))
    });
    let left: i64 = redis::cmd("HLEN")
        .arg(format!("{}:live", h.prefix))
        .query(&mut h.redis.conn())
        .expect("HLEN");
    assert_eq!(left, 0);
}

#[test]
fn the_page_is_static_and_job_data_stays_data() {
    let h = Harness::new(CONFIG);
    let _d = h.daemon("w1", &[]);
    let dash = h.dashboard(None);
    let page = dash.get("/");
    assert_eq!(page.code, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(
        page.body
            .contains(r#"<script src="/assets/app.js" defer></script>"#)
    );
    let js = dash.get("/assets/app.js");
    assert_eq!(js.code, 200);
    assert!(
        js.header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!js.body.contains(sink), "app.js uses {sink}");
    }
    assert_eq!(dash.get("/assets/app.css").code, 200);

    // HTML in an id and a payload comes back as JSON text, never markup.
    let evil = r#"<img/src=x/onerror=alert(1)>"#;
    let id = enqueue(
        &h,
        &[
            "quick",
            "--id",
            evil,
            "--payload",
            r#"{"html":"<script>alert(2)</script>"}"#,
        ],
    );
    assert_eq!(id, evil);
    wait_until(LONG, "it ran", || h.count_status("completed") == 1);
    let r = dash.get(&format!("/api/jobs/{}", encode(evil)));
    assert_eq!(r.code, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v = r.json();
    assert_eq!(v["id"], evil);
    assert_eq!(v["record"]["payload"]["html"], "<script>alert(2)</script>");
}

#[test]
fn sigterm_ends_open_streams_and_a_public_address_is_warned_about() {
    let h = Harness::new(CONFIG);
    let mut dash = h.dashboard_on("0.0.0.0", None);
    assert!(
        dash.log()
            .contains("warning: the dashboard listens on 0.0.0.0"),
        "{}",
        dash.log()
    );
    let _sse = SseReader::open(dash.port);
    let _sse2 = SseReader::open(dash.port);
    dash.sigterm();
    let status = dash
        .wait_exit(Duration::from_secs(10))
        .expect("the dashboard exits within 10 s of SIGTERM with streams open");
    assert!(status.success(), "{status}");
}

fn live_ids(h: &Harness) -> Vec<String> {
    redis::cmd("HKEYS")
        .arg(format!("{}:live", h.prefix))
        .query(&mut h.redis.conn())
        .expect("HKEYS")
}

/// `P:live` holds running jobs only: a job waiting for its retry, or put
/// back on pending at shutdown, is not running.
#[test]
fn live_drops_a_job_waiting_for_a_retry_or_requeued() {
    let h = Harness::new(
        r#"
[worker]
shutdown_grace_secs = 1
kill_grace_secs = 1

[jobs.flaky]
max_attempts = 3
backoff_ms = 600000
stages = [
  { name = "nap",  builtin = "sleep", args = { ms = 300 } },
  { name = "boom", builtin = "fail" },
]

[jobs.long]
stages = [{ name = "nap", builtin = "sleep", args = { ms = 20000 } }]
"#,
    );
    let mut d = h.daemon("w1", &[]);
    let sub = h.subscribe();
    enqueue(&h, &["flaky", "--id", "f1"]);
    wait_until(LONG, "f1 in P:live while it runs", || {
        live_ids(&h) == ["f1"]
    });
    sub.wait_status("f1", "retrying", LONG);
    wait_until(LONG, "f1 gone from P:live", || live_ids(&h).is_empty());

    enqueue(&h, &["long", "--id", "l1"]);
    wait_until(LONG, "l1 in P:live while it runs", || {
        live_ids(&h) == ["l1"]
    });
    d.sigterm();
    d.wait_exit(LONG);
    sub.wait_status("l1", "pending", LONG);
    assert!(live_ids(&h).is_empty(), "a requeued job is not live");
}

/// A daemon killed mid-job leaves its entry; `/api/live` skips it once
/// the daemon's registration expired, and counts it as stale.
#[test]
fn live_skips_entries_of_a_dead_daemon() {
    let h = Harness::new(
        r#"
[worker]
heartbeat_secs = 1
dead_after_secs = 2

[jobs.long]
stages = [{ name = "nap", builtin = "sleep", args = { ms = 20000 } }]
"#,
    );
    let d = h.daemon("w1", &[]);
    let dash = h.dashboard(None);
    enqueue(&h, &["long", "--id", "l1"]);
    wait_until(LONG, "l1 listed live", || {
        dash.get_json("/api/live")["jobs"][0]["job_id"] == "l1"
    });
    d.sigkill();
    wait_until(LONG, "l1 reported stale", || {
        let v = dash.get_json("/api/live");
        v["stale"] == 1 && v["jobs"] == Value::Array(vec![])
    });
    assert_eq!(
        live_ids(&h),
        ["l1"],
        "the entry itself stays until the job runs again"
    );
}

/// The resync events an SSE stream got so far (their data is `{}`).
fn resyncs(sse: &SseReader) -> usize {
    sse.data()
        .iter()
        .filter(|v| v.as_object().is_some_and(|o| o.is_empty()))
        .count()
}

#[test]
fn the_progress_bridge_comes_back_after_each_redis_outage() {
    let mut h = Harness::new(CONFIG);
    let dash = h.dashboard(None);
    let sse = SseReader::open(dash.port);
    let subscribed = |h: &Harness| {
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<i64>(&mut h.redis.conn())
            .is_ok_and(|n| n >= 1)
    };
    wait_until(LONG, "the dashboard's PSUBSCRIBE", || subscribed(&h));
    // Two outages: the second starts from a fresh backoff, and both end
    // with the browsers told to resync and messages flowing again.
    for round in ["first", "second"] {
        let before = resyncs(&sse);
        h.redis.restart(Duration::from_millis(300));
        wait_until(LONG, "the bridge subscribed again", || subscribed(&h));
        wait_until(LONG, "a resync event after the outage", || {
            resyncs(&sse) > before
        });
        let channel = format!("{}:progress:{round}", h.prefix);
        let body = format!(r#"{{"job_id":"{round}","event":"progress"}}"#);
        wait_until(LONG, "a message published after the outage", || {
            let _: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&body)
                .query(&mut h.redis.conn());
            sse.messages().iter().any(|m| m["job_id"] == round)
        });
    }
    let log = dash.log();
    assert_eq!(
        log.matches("progress_subscription_restored").count(),
        2,
        "{log}"
    );
}
