//! Least-privilege Redis users: the rules in `examples/acl/users.acl` (and
//! docs/operations.md) are enough for a worker, a producer and the dashboard, and
//! `conveyor doctor` names what a user lacks.

mod common;

use std::time::Duration;

use common::{CRATE_ROOT, Harness, wait_until};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
heartbeat_secs = 1

[retry]
max_attempts = 2
backoff_ms = 100

[jobs.ok]
stages = [{ name = "a", builtin = "noop" }]

[jobs.bad]
stages = [{ name = "b", builtin = "fail" }]

[jobs.slow]
stages = [{ name = "c", builtin = "sleep", args = { ms = 20000 } }]
"#;

fn rules() -> String {
    std::fs::read_to_string(format!("{CRATE_ROOT}/examples/acl/users.acl")).expect("users.acl")
}

/// Creates the three users, for this test's key prefix.
fn create_users(h: &Harness) {
    let mut conn = h.redis.conn();
    for line in rules().lines().filter(|l| l.starts_with("user ")) {
        let line = line.replace("conveyor:", &format!("{}:", h.prefix));
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER");
        for word in line.split_whitespace().skip(1) {
            cmd.arg(word);
        }
        let () = cmd
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("{line}: {e}"));
    }
}

fn url_as(h: &Harness, user: &str) -> String {
    let password = format!("change-me-{}", user.trim_start_matches("conveyor-"));
    h.redis
        .url()
        .replace("redis://", &format!("redis://{user}:{password}@"))
}

fn status(h: &Harness, url: &str, id: &str) -> String {
    let out = h.cli(&["job", id, "--json"], &[("CONVEYOR_REDIS_URL", url)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"].as_str().unwrap().to_owned()
}

#[test]
fn worker_producer_and_dashboard_run_as_least_privilege_users() {
    let h = Harness::new(CONFIG);
    create_users(&h);
    let worker = url_as(&h, "conveyor-worker");
    let producer = url_as(&h, "conveyor-producer");
    let dashboard = url_as(&h, "conveyor-dashboard");

    let mut d = h.daemon("w1", &[("CONVEYOR_REDIS_URL", &worker)]);
    let board = h.dashboard_as(&dashboard, Some("t0ken"));
    let as_producer = |args: &[&str]| {
        let out = h.cli(args, &[("CONVEYOR_REDIS_URL", &producer)]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    as_producer(&["enqueue", "ok", "--id", "o1"]);
    as_producer(&["enqueue", "bad", "--id", "b1"]);
    as_producer(&["enqueue", "ok", "--id", "d1", "--delay", "1s"]);
    as_producer(&["enqueue", "slow", "--id", "s1"]);
    // A message that cannot run, with an id: its record is made by the
    // worker user's daemon too.
    h.lpush(
        "default",
        r#"{"id":"p1","type":"no-such-type","payload":{}}"#,
    );
    wait_until(LONG, "the jobs ran", || {
        h.job_status("o1").as_deref() == Some("completed")
            && h.job_status("d1").as_deref() == Some("completed")
            && h.job_status("b1").as_deref() == Some("failed")
            && h.job_status("s1").as_deref() == Some("running")
    });
    as_producer(&["cancel", "s1"]);
    wait_until(LONG, "s1 is cancelled", || {
        h.job_status("s1").as_deref() == Some("cancelled")
    });
    assert_eq!(status(&h, &producer, "o1"), "completed");
    // The job's record in Redis, written by the worker user's daemon, read
    // by the producer user on a host without the SQLite file.
    let empty = h.path("no-such.db");
    let empty = empty.to_string_lossy();
    let out = h.cli(
        &["job", "o1", "--json"],
        &[("CONVEYOR_REDIS_URL", &producer), ("CONVEYOR_DB", &empty)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["stages"][0]["worker_id"], "w1", "{job:#}");
    let out = h.cli(
        &["job", "p1", "--json"],
        &[("CONVEYOR_REDIS_URL", &producer), ("CONVEYOR_DB", &empty)],
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        job["status"], "failed",
        "the poison message's record: {job:#}"
    );
    as_producer(&["status"]);
    as_producer(&["jobs", "--status", "pending"]);
    as_producer(&["watch", "o1"]);

    for path in [
        "/api/queues",
        "/api/workers",
        "/api/jobs?limit=5",
        "/api/jobs/o1",
        "/api/dead",
        "/api/live",
    ] {
        assert_eq!(board.get(path).code, 200, "GET {path}");
    }
    let retried = board.post("/api/jobs/b1/retry", Some("t0ken"), "{}");
    assert_eq!(retried.code, 200, "{}", retried.body);
    // p1 stays in the dead list, b1 goes back to it.
    wait_until(LONG, "b1 failed again", || {
        h.llen(&h.dead_key("default")) == 2
    });
    let purged = board.post("/api/dead/purge", Some("t0ken"), r#"{"all": true}"#);
    assert_eq!(purged.code, 200, "{}", purged.body);
    assert_eq!(h.llen(&h.dead_key("default")), 0);

    // The worker user passes the doctor: it may not run ACL DRYRUN, so the
    // doctor tries each command on scratch keys.
    let doctor = h.cli(&["doctor"], &[("CONVEYOR_REDIS_URL", &worker)]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(doctor.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("✅ permissions") && l.contains("scratch keys")),
        "{text}"
    );

    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    assert!(!log.to_lowercase().contains("noperm"), "{log}");
    assert!(!log.contains("no permissions"), "{log}");
}

#[test]
fn doctor_names_a_missing_command_for_a_user_without_acl_rights() {
    let h = Harness::new(CONFIG);
    create_users(&h);
    let mut conn = h.redis.conn();
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "conveyor-worker", "-blmove", "-hincrby"][..])
        .query(&mut conn)
        .unwrap();
    let worker = url_as(&h, "conveyor-worker");
    let doctor = h.cli(&["doctor"], &[("CONVEYOR_REDIS_URL", &worker)]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert_eq!(doctor.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("permissions"))
        .unwrap_or_default();
    assert!(line.starts_with("❌"), "{text}");
    let refused: Vec<&str> = line
        .split_once("refused: ")
        .map(|(_, r)| r.split(", ").collect())
        .unwrap_or_default();
    assert_eq!(
        refused,
        ["BLMOVE", "HINCRBY"],
        "only what is missing: {line}"
    );
    // The scratch keys are gone.
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:{{doctor}}:*", h.prefix))
        .query(&mut conn)
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_operations_doc_shows_the_same_rules() {
    let doc = std::fs::read_to_string(format!("{CRATE_ROOT}/docs/operations.md")).unwrap();
    for line in rules().lines().filter(|l| l.starts_with("user ")) {
        assert!(doc.contains(line), "docs/operations.md lacks: {line}");
    }
}
