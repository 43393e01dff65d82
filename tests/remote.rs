//! The remote-worker API (`/api/v1`) of `conveyor gateway`, driven over
//! HTTP by the test as a remote worker would: claim, progress, stage and
//! job completion, failure, leases (expiry, another worker, late calls),
//! cancel, auth and bad input. A real Redis, the real binary, SQLite.

mod common;

use std::time::Duration;

use common::{GatewayProc, Harness, enqueue, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);
const TOKEN: &str = "test-token-0123456789";

fn config(lease_secs: u64) -> String {
    format!(
        r#"
[worker]
queues = ["local"]
heartbeat_secs = 1
dead_after_secs = 3
fetch_block_ms = 100
promote_interval_ms = 50

[gateway]
tokens = {{ workers = "{TOKEN}" }}
lease_secs = {lease_secs}

[retry]
backoff_ms = 50
backoff_max_ms = 100

[jobs."demo.remote"]
remote = true
queue = "remote"
max_attempts = 3
stages = [{{ name = "fetch" }}, {{ name = "transform", weight = 2 }}, {{ name = "upload" }}]

[jobs.local]
queue = "local"
stages = [{{ name = "only", builtin = "noop" }}]
"#
    )
}

fn post(api: &GatewayProc, path: &str, body: Value) -> (u16, Value) {
    let r = api.post(path, Some(TOKEN), &body.to_string());
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
    };
    (r.code, v)
}

fn claim(api: &GatewayProc, worker: &str, wait: u64) -> Option<Value> {
    let (code, v) = post(
        api,
        "/api/v1/claim",
        json!({"worker_id": worker, "types": ["demo.remote"], "wait_secs": wait}),
    );
    match code {
        200 => Some(v),
        204 => None,
        other => panic!("claim answered {other}: {v}"),
    }
}

fn job_path(id: &str, what: &str) -> String {
    format!("/api/v1/jobs/{id}/{what}")
}

#[test]
fn remote_job_runs_end_to_end_beside_a_local_daemon() {
    let h = Harness::new(&config(30));
    let api = h.gateway();
    let local_daemon = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let local = enqueue(&h, &["local"]);
    let id = enqueue(&h, &["demo.remote", "--payload", r#"{"n": 21}"#]);

    let job = claim(&api, "py-1", 10).expect("a job");
    assert_eq!(job["job_id"], id.as_str(), "{job:#}");
    assert_eq!(job["type"], "demo.remote");
    assert_eq!(job["queue"], "remote");
    assert_eq!(job["payload"], json!({"n": 21}));
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(job["stages"], json!(["fetch", "transform", "upload"]));
    assert_eq!(job["results"], json!({}));
    assert_eq!(job["lease"]["ttl_secs"], 30);
    let lease = job["lease"]["token"].as_str().expect("token").to_owned();

    let (code, v) = post(
        &api,
        &job_path(&id, "progress"),
        json!({"lease": lease, "progress": 50, "message": "half way"}),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["expires_at"].as_str().is_some(), "{v}");
    wait_until(LONG, "the stage progress on the channel", || {
        sub.for_job(&id).iter().any(|m| {
            m["message"] == "half way"
                && m["stage"] == "fetch"
                && m["progress"].as_f64() == Some(12.5)
        })
    });
    // Not the current stage: refused, nothing changes.
    let (code, v) = post(
        &api,
        &job_path(&id, "complete"),
        json!({"lease": lease, "stage": "upload", "result": 1}),
    );
    assert_eq!(
        (code, v["reason"].as_str()),
        (409, Some("wrong_stage")),
        "{v}"
    );
    for (stage, next) in [
        ("fetch", json!("transform")),
        ("transform", json!("upload")),
        ("upload", Value::Null),
    ] {
        let (code, v) = post(
            &api,
            &job_path(&id, "complete"),
            json!({"lease": lease, "stage": stage, "result": {"stage": stage}}),
        );
        assert_eq!(code, 200, "{stage}: {v}");
        assert_eq!(v["next_stage"], next, "{stage}: {v}");
        if stage == "fetch" {
            // A retried call (its answer lost) gets the same answer.
            let (code, again) = post(
                &api,
                &job_path(&id, "complete"),
                json!({"lease": lease, "stage": stage, "result": {"stage": stage}}),
            );
            assert_eq!((code, &again), (200, &v), "retry of {stage}");
        }
    }
    sub.wait_status(&id, "completed", LONG);
    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "completed", "{rec:#}");
    let transform = rec["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["name"] == "transform")
        .cloned()
        .expect("transform stage");
    assert_eq!(transform["status"], "completed", "{rec:#}");
    assert_eq!(
        transform["result"],
        json!({"stage": "transform"}),
        "{rec:#}"
    );
    // The lease ended with the job.
    let (code, v) = post(&api, &job_path(&id, "heartbeat"), json!({"lease": lease}));
    assert_eq!(
        (code, v["reason"].as_str()),
        (409, Some("lease_lost")),
        "{v}"
    );
    // The local daemon ran the local job, and never the remote one.
    wait_until(LONG, "the local job", || {
        h.job_status(&local).as_deref() == Some("completed")
    });
    assert!(
        !local_daemon.log().contains(&id),
        "the local daemon touched the remote job"
    );

    // Nothing to claim: 204 after the wait.
    assert_eq!(claim(&api, "py-1", 1), None);
    // The document is served, without a token.
    let doc = api.get_json("/api/v1/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/claim"].is_object());
}

#[test]
fn a_whole_job_completes_in_one_call() {
    let h = Harness::new(&config(30));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "php-1", 10).expect("a job");
    let lease = job["lease"]["token"].as_str().expect("token");
    let (code, v) = post(
        &api,
        &job_path(&id, "complete"),
        json!({"lease": lease, "result": {"url": "s3://x"}}),
    );
    assert_eq!((code, &v["next_stage"]), (200, &Value::Null), "{v}");
    wait_until(LONG, "the job to complete", || {
        h.job_status(&id).as_deref() == Some("completed")
    });
}

#[test]
fn an_expired_lease_is_refused_and_another_worker_resumes_the_job() {
    let h = Harness::new(&config(2));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let first = claim(&api, "w-a", 10).expect("a job");
    let lease_a = first["lease"]["token"].as_str().expect("token").to_owned();
    let (code, _) = post(
        &api,
        &job_path(&id, "complete"),
        json!({"lease": lease_a, "stage": "fetch", "result": "fetched"}),
    );
    assert_eq!(code, 200);
    // Worker A vanishes: its lease runs out, the attempt fails as
    // retryable, and the job comes back resuming at `transform`.
    let second = claim(&api, "w-b", 15).expect("the job again");
    assert_eq!(second["job_id"], id.as_str());
    assert_eq!(second["attempt"], 2, "{second:#}");
    assert_eq!(second["results"], json!({"fetch": "fetched"}), "{second:#}");
    let lease_b = second["lease"]["token"].as_str().expect("token").to_owned();
    assert_ne!(lease_a, lease_b);
    // A's late calls change nothing.
    for (what, body) in [
        ("heartbeat", json!({"lease": lease_a})),
        ("progress", json!({"lease": lease_a, "progress": 10})),
        ("complete", json!({"lease": lease_a, "result": 1})),
        ("fail", json!({"lease": lease_a, "error": "late"})),
    ] {
        let (code, v) = post(&api, &job_path(&id, what), body);
        assert_eq!(
            (code, v["reason"].as_str()),
            (409, Some("lease_lost")),
            "{what}: {v}"
        );
    }
    // Nor can B's lease act on another job id.
    let (code, _) = post(
        &api,
        &job_path("other", "heartbeat"),
        json!({"lease": lease_b}),
    );
    assert_eq!(code, 409);
    for stage in ["transform", "upload"] {
        let (code, v) = post(
            &api,
            &job_path(&id, "complete"),
            json!({"lease": lease_b, "stage": stage}),
        );
        assert_eq!(code, 200, "{v}");
    }
    wait_until(LONG, "the job to complete", || {
        h.job_status(&id).as_deref() == Some("completed")
    });
    let rec = h.job_ok(&id);
    assert_eq!(rec["attempt"], 2, "{rec:#}");
    let errors: Vec<String> = rec["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["error"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`w-a` did not renew its lease")),
        "{rec:#}"
    );
}

/// A worker that dies right after its claim, before any other call: the
/// lease runs out all the same.
#[test]
fn a_claim_never_followed_up_expires() {
    let h = Harness::new(&config(2));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let first = claim(&api, "w-a", 10).expect("a job");
    assert_eq!(first["job_id"], id.as_str());
    let again = claim(&api, "w-b", 15).expect("the job after the lease");
    assert_eq!(again["job_id"], id.as_str());
    assert_eq!(again["attempt"], 2, "{again:#}");
    assert_eq!(again["results"], json!({}), "{again:#}");
}

#[test]
fn heartbeats_keep_a_lease_and_failures_retry_then_dead_letter() {
    let h = Harness::new(&config(2));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "w-a", 10).expect("a job");
    let lease = job["lease"]["token"].as_str().expect("token").to_owned();
    // Held for three lease lengths by heartbeats alone.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        let (code, v) = post(&api, &job_path(&id, "heartbeat"), json!({"lease": lease}));
        assert_eq!(code, 200, "{v}");
    }
    let (code, _) = post(
        &api,
        &job_path(&id, "fail"),
        json!({"lease": lease, "error": "upstream 503", "retryable": true}),
    );
    assert_eq!(code, 200);
    let again = claim(&api, "w-a", 10).expect("the retry");
    assert_eq!(again["attempt"], 2);
    let lease = again["lease"]["token"].as_str().expect("token").to_owned();
    let (code, _) = post(
        &api,
        &job_path(&id, "fail"),
        json!({"lease": lease, "error": "bad input", "retryable": false}),
    );
    assert_eq!(code, 200);
    wait_until(LONG, "the job on the dead list", || {
        h.llen(&h.dead_key("remote")) == 1
    });
    let dead = h.lrange_json(&h.dead_key("remote"));
    assert!(dead[0].to_string().contains("bad input"), "{dead:?}");
    assert_eq!(h.job_status(&id).as_deref(), Some("failed"));
}

#[test]
fn a_released_job_comes_back_at_its_stage_without_an_attempt_counted() {
    let h = Harness::new(&config(30));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "w-a", 10).expect("a job");
    let lease = job["lease"]["token"].as_str().expect("token").to_owned();
    let (code, _) = post(
        &api,
        &job_path(&id, "complete"),
        json!({"lease": lease, "stage": "fetch", "result": "f"}),
    );
    assert_eq!(code, 200);
    let (code, v) = post(&api, &job_path(&id, "release"), json!({"lease": lease}));
    assert_eq!(code, 200, "{v}");
    let (code, v) = post(&api, &job_path(&id, "heartbeat"), json!({"lease": lease}));
    assert_eq!(
        (code, v["reason"].as_str()),
        (409, Some("lease_lost")),
        "{v}"
    );
    let again = claim(&api, "w-b", 10).expect("the job back");
    assert_eq!(again["job_id"], id.as_str());
    assert_eq!(again["attempt"], 1, "{again:#}");
    assert_eq!(again["results"], json!({"fetch": "f"}), "{again:#}");
}

#[test]
fn a_cancel_reaches_the_remote_worker() {
    let h = Harness::new(&config(30));
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "w-a", 10).expect("a job");
    let lease = job["lease"]["token"].as_str().expect("token").to_owned();
    let out = h.cli(&["cancel", &id], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(LONG, "the worker to learn of the cancel", || {
        let (code, v) = post(&api, &job_path(&id, "heartbeat"), json!({"lease": lease}));
        code == 409 && v["reason"] == "cancelled"
    });
    wait_until(LONG, "the job to be cancelled", || {
        h.job_status(&id).as_deref() == Some("cancelled")
    });
}

#[test]
fn tokens_bodies_and_limits_are_checked() {
    let h = Harness::new(&config(30));
    let api = h.gateway();
    let claim_body = r#"{"worker_id": "w", "wait_secs": 0}"#;
    for token in [None, Some("wrong-token-0123456789")] {
        let r = api.post("/api/v1/claim", token, claim_body);
        assert_eq!(r.code, 401, "{token:?}: {}", r.body);
        assert_eq!(r.json()["reason"], "unauthorized");
    }
    for (body, what) in [
        ("not json", "invalid body"),
        (r#"{"worker_id": "w", "extra": 1}"#, "unknown field"),
        (r#"{"worker_id": ""}"#, "worker_id"),
        (r#"{"worker_id": "a b"}"#, "worker_id"),
        (r#"{"worker_id": "w", "wait_secs": 31}"#, "wait_secs"),
        (r#"{"worker_id": "w", "wait_secs": -1}"#, "invalid body"),
    ] {
        let r = api.post("/api/v1/claim", Some(TOKEN), body);
        assert_eq!(r.code, 400, "{body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["reason"], "bad_request", "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(what),
            "{body}: {v}"
        );
    }
    let r = api.post(
        "/api/v1/jobs/x/progress",
        Some(TOKEN),
        r#"{"lease": "l", "progress": 101}"#,
    );
    assert_eq!(r.code, 400, "{}", r.body);
    let big = format!(r#"{{"lease": "l", "result": "{}"}}"#, "x".repeat(1_100_000));
    let r = api.post("/api/v1/jobs/x/complete", Some(TOKEN), &big);
    assert_eq!(r.code, 413, "{}", r.body);
    assert_eq!(r.json()["reason"], "too_large");
    // One claim waiting per worker id is enough; a busy loop of empty
    // claims is cut off (claims_per_sec = 10).
    let codes: Vec<u16> = (0..15)
        .map(|_| api.post("/api/v1/claim", Some(TOKEN), claim_body).code)
        .collect();
    assert!(codes.contains(&204) && codes.contains(&429), "{codes:?}");
    // The token never reaches the log.
    assert!(!api.log().contains(TOKEN), "{}", api.log());
}

#[test]
fn daemons_refuse_to_serve_a_remote_queue() {
    let h = Harness::new(
        &config(30).replace(r#"queues = ["local"]"#, r#"queues = ["local", "remote"]"#),
    );
    let out = h.cli(&["status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config key `worker.queues[1]`") && err.contains("remote job types"),
        "{err}"
    );
}

/// The OpenAPI document lives in one place, `src/gateway/openapi.json`: the
/// remote-worker docs link to it, and the README does not carry a copy.
#[test]
fn the_docs_link_to_the_served_openapi_document() {
    let root = common::CRATE_ROOT;
    let guide = std::fs::read_to_string(format!("{root}/docs/remote-workers.md")).unwrap();
    assert!(
        guide.contains("](../src/gateway/openapi.json)"),
        "docs/remote-workers.md does not link to src/gateway/openapi.json"
    );
    assert!(
        std::path::Path::new(&format!("{root}/src/gateway/openapi.json")).is_file(),
        "src/gateway/openapi.json is missing"
    );
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let doc = std::fs::read_to_string(format!("{root}/src/gateway/openapi.json")).unwrap();
    let doc = doc.trim_end();
    assert!(
        !readme.contains(doc) && !readme.contains("\"openapi\": \"3.0.3\""),
        "README.md embeds the OpenAPI document; link to it instead"
    );
    let parsed: Value = serde_json::from_str(doc).expect("the document is JSON");
    assert_eq!(parsed["openapi"], "3.0.3");
}

/// Two gateways with one worker id: the second stops at once, saying why.
#[test]
fn a_second_gateway_with_the_same_worker_id_stops() {
    let h = Harness::new(&config(30));
    let _first = h.gateway();
    let port = common::free_port().to_string();
    let out = h.cli(&["gateway", "--listen", &format!("127.0.0.1:{port}")], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway's daemon"), "{err}");
}

/// The dashboard runs no daemon: any number of them may run beside a
/// gateway, none serves `/api/v1`, and each says who does.
#[test]
fn dashboards_serve_no_remote_api_and_name_the_gateway() {
    let h = Harness::new(&config(30));
    let first = h.dashboard(None);
    let second = h.dashboard(None);
    for d in [&first, &second] {
        assert!(
            d.log().contains("served by `conveyor gateway`"),
            "{}",
            d.log()
        );
        let r = d.post("/api/v1/claim", Some(TOKEN), r#"{"worker_id":"w"}"#);
        assert_eq!(r.code, 404, "{}", r.body);
    }
    // No daemon was registered by either dashboard.
    let status = h.status();
    assert_eq!(
        status["workers"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    // The gateway takes the job they did not.
    let api = h.gateway();
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "w-a", 10).expect("a job from the gateway");
    assert_eq!(job["job_id"], id.as_str());
}

/// A config with the old `[api]` section still works, with a notice; a
/// gateway with no remote job type refuses to start (exit 2).
#[test]
fn the_old_api_section_still_loads_and_a_gateway_needs_remote_types() {
    let h = Harness::new(&config(30).replace("[gateway]", "[api]"));
    let api = h.gateway();
    assert!(
        api.log().contains("[api] is now [gateway]"),
        "{}",
        api.log()
    );
    let id = enqueue(&h, &["demo.remote"]);
    let job = claim(&api, "w-a", 10).expect("a job");
    assert_eq!(job["job_id"], id.as_str());

    let local = Harness::new("[jobs.local]\nstages = [{ name = \"only\", builtin = \"noop\" }]\n");
    let port = common::free_port().to_string();
    let out = local.cli(&["gateway", "--listen", &format!("127.0.0.1:{port}")], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no remote job type"), "{err}");
}

/// SIGTERM to the API: a job nobody claimed goes back to its queue at
/// once; a claimed one can still finish its current stage during the grace
/// period (new claims get 503). As on a daemon, no further stage starts:
/// the job goes back and resumes at its next stage. Then the server exits 0.
#[test]
fn on_sigterm_unclaimed_jobs_go_back_and_held_ones_finish_their_stage() {
    let h = Harness::new(&config(30).replace(
        "heartbeat_secs = 1",
        "heartbeat_secs = 1\nshutdown_grace_secs = 15",
    ));
    let mut api = h.gateway();
    let held = enqueue(&h, &["demo.remote", "--id", "held"]);
    let job = claim(&api, "w-a", 10).expect("a job");
    assert_eq!(job["job_id"], held.as_str());
    let lease = job["lease"]["token"].as_str().expect("token").to_owned();
    let waiting = enqueue(&h, &["demo.remote", "--id", "waiting"]);
    wait_until(LONG, "the second job in the API's hands", || {
        h.llen(&h.pending_key("remote")) == 0
    });
    api.sigterm();
    wait_until(LONG, "the unclaimed job back on its queue", || {
        h.lrange(&h.pending_key("remote"))
            .iter()
            .any(|e| String::from_utf8_lossy(e).contains(&waiting))
    });
    let r = api.post(
        "/api/v1/claim",
        Some(TOKEN),
        r#"{"worker_id": "w-b", "wait_secs": 0}"#,
    );
    assert_eq!(r.code, 503, "{}", r.body);
    let (code, v) = post(
        &api,
        &job_path(&held, "progress"),
        json!({"lease": lease, "progress": 90}),
    );
    assert_eq!(code, 200, "progress during the grace: {v}");
    let (code, v) = post(
        &api,
        &job_path(&held, "complete"),
        json!({"lease": lease, "stage": "fetch", "result": "f"}),
    );
    assert_eq!((code, &v["next_stage"]), (200, &Value::Null), "{v}");
    let (code, v) = post(&api, &job_path(&held, "heartbeat"), json!({"lease": lease}));
    assert_eq!(
        (code, v["reason"].as_str()),
        (409, Some("lease_lost")),
        "{v}"
    );
    let status = api.wait_exit(LONG).expect("the API exits");
    assert!(status.success(), "{status:?}\n{}", api.log());
    assert_eq!(h.stage_status(&held, "fetch").as_deref(), Some("completed"));
    // Both jobs wait on their queue; the next API resumes `held` at transform.
    assert_eq!(h.llen(&h.pending_key("remote")), 2);
    let api = h.gateway();
    let mut seen = Vec::new();
    while let Some(job) = claim(&api, "w-c", 5) {
        seen.push((
            job["job_id"].as_str().unwrap_or("").to_owned(),
            job["results"].clone(),
        ));
        if seen.len() == 2 {
            break;
        }
    }
    assert!(
        seen.contains(&(held.clone(), json!({"fetch": "f"}))),
        "{seen:?}"
    );
}
