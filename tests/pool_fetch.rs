//! How a daemon with stage pools fetches, and how a job waiting in a pool
//! list is found (docs/concepts.md, "Stage pools"; second review of issue
//! 15): once a stage names a pool, every daemon reads its pools' lists on
//! every queue it serves, so no job is handed over to a list no daemon
//! reads, whatever queue it is on (finding 1); idle, it only blocks,
//! in turn on every list (finding 12); `conveyor job` finds a job in a
//! pool list by a bounded search, records on or off (finding 7). Real
//! Redis, the real binary, one SQLite file per host.

mod common;

use std::time::Duration;

use common::{Daemon, Harness, enqueue, open_sqlite_read_only, stdout_of, wait_until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Queue `video`: job type `render`, one stage in pool `gpu`. Queue
/// `emails`: job type `mail`, no stage naming a pool. Every daemon's
/// config serves both queues.
const CONFIG: &str = r#"
[worker]
queues = ["video", "emails"]
fetch_block_ms = 100
shutdown_grace_secs = 1
kill_grace_secs = 1

[jobs.render]
queue = "video"
stages = [{ name = "encode", builtin = "noop", pool = "gpu" }]

[jobs.mail]
queue = "emails"
stages = [{ name = "send", builtin = "noop" }]
"#;

fn completed_in(db: &std::path::Path) -> u64 {
    let Some(conn) = open_sqlite_read_only(db) else {
        return 0;
    };
    conn.query_row(
        "SELECT count(*) FROM jobs WHERE status = 'completed'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap_or(0) as u64
}

fn llen(h: &Harness, key: &str) -> u64 {
    redis::cmd("LLEN")
        .arg(key)
        .query(&mut h.redis.conn())
        .unwrap()
}

/// Entries in every stage pool list of every queue.
fn in_pool_lists(h: &Harness) -> u64 {
    h.scan_keys(&format!("{}:*:pool:*", h.prefix))
        .iter()
        .map(|k| llen(h, k))
        .sum()
}

fn events<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn doctor_fetch_check(h: &Harness, pools: &str) -> Option<Value> {
    let out = h.cli(
        &["doctor", "--config-only", "--json"],
        &[("CONVEYOR_POOLS", pools)],
    );
    assert!(out.status.success(), "{}", stdout_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "fetch")
        .cloned()
}

#[test]
fn jobs_a_gpu_daemon_takes_from_a_queue_without_pooled_stages_reach_the_default_daemons() {
    // The reviewer's fleet: a GPU host (`--pools gpu`) serving video and
    // emails, and a CPU host (default pool) serving emails only; no stage
    // of emails names a pool. Before the fix the GPU daemon took emails
    // jobs from pending and handed each over to emails' default pool list,
    // which the CPU daemon (no pooled stage on its queues) never read:
    // they stayed there forever. Now every daemon reads its pools' lists
    // on every queue once a stage of the config names a pool.
    let h = Harness::new(CONFIG);
    let gpu_db = h.path("gpu.db");
    let mails: Vec<String> = (0..10).map(|_| enqueue(&h, &["mail"])).collect();
    let renders: Vec<String> = (0..3).map(|_| enqueue(&h, &["render"])).collect();
    let gpu = Daemon::start(
        &h.redis.url(),
        &h.prefix,
        &gpu_db,
        &h.config,
        "host-gpu",
        &[("CONVEYOR_POOLS", "gpu")],
    );
    let default_list = format!("{}:{{emails}}:pool:default", h.prefix);
    wait_until(WAIT, "the GPU host's jobs done or handed over", || {
        completed_in(&gpu_db) == renders.len() as u64
            && llen(&h, &default_list) == mails.len() as u64
    });
    let log = gpu.log_events();
    let advice = events(&log, "queue_handover_only");
    assert_eq!(advice.len(), 1, "said once: {advice:?}");
    assert_eq!(advice[0]["queue"], "emails");
    assert_eq!(advice[0]["level"], "warn", "{:?}", advice[0]);

    let cpu = h.daemon("host-cpu", &[("CONVEYOR_QUEUES", "emails")]);
    wait_until(WAIT, "every emails job completed on the CPU host", || {
        completed_in(&h.db) == mails.len() as u64
    });
    for id in &mails {
        assert_eq!(h.job_status(id).as_deref(), Some("completed"), "{id}");
    }
    assert_eq!(in_pool_lists(&h), 0, "nothing left in a pool list");
    assert_eq!(llen(&h, &format!("{}:{{emails}}:pending", h.prefix)), 0);
    assert!(events(&cpu.log_events(), "job_handed_over").is_empty());
    assert!(events(&cpu.log_events(), "queue_handover_only").is_empty());
}

#[test]
fn doctor_warns_about_a_daemon_that_would_only_hand_jobs_over() {
    let h = Harness::new(CONFIG);
    // The GPU host's pools: emails' jobs would only be handed over.
    let check = doctor_fetch_check(&h, "gpu").expect("a fetch line");
    assert_eq!(check["ok"], true);
    assert_eq!(check["warning"], true);
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("`emails` (its job types run in default)"),
        "{detail}"
    );
    assert!(!detail.contains("video"), "{detail}");
    // Both pools: no line.
    assert!(doctor_fetch_check(&h, "gpu,default").is_none());
    // A pool no stage uses: doctor warns, the daemon refuses to start and
    // says why.
    let check = doctor_fetch_check(&h, "tpu").expect("a fetch line");
    let detail = check["detail"].as_str().unwrap();
    assert!(detail.contains("refuses to start"), "{detail}");
    let mut d = h.spawn_daemon("host-tpu", &[], &[("CONVEYOR_POOLS", "tpu")]);
    let status = d.wait_exit(WAIT);
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains("no stage of the config runs in them") && log.contains("default, gpu"),
        "{log}"
    );
    assert!(!log.contains("worker_started"), "{log}");
}

#[test]
fn a_job_type_pushed_on_another_queue_still_reaches_its_pool() {
    // `jobs."T".queue` is only where `conveyor enqueue` puts T: a job of T
    // on another queue (`--queue`, a raw producer) runs there, and a
    // handover on that queue must reach the daemons of the stage's pool.
    // `render` (gpu) pushed on emails: the default daemon takes it from
    // emails' pending and hands it over; the GPU daemon, serving emails
    // too, reads emails' gpu list.
    let h = Harness::new(CONFIG);
    let gpu_db = h.path("gpu.db");
    let cpu = h.daemon("host-cpu", &[("CONVEYOR_QUEUES", "emails")]);
    let id = enqueue(&h, &["render", "--queue", "emails"]);
    wait_until(WAIT, "handed over to emails' gpu list", || {
        cpu.log().contains("job_handed_over")
    });
    let _gpu = Daemon::start(
        &h.redis.url(),
        &h.prefix,
        &gpu_db,
        &h.config,
        "host-gpu",
        &[("CONVEYOR_POOLS", "gpu")],
    );
    wait_until(WAIT, "the job completed on the GPU host", || {
        completed_in(&gpu_db) == 1
    });
    let job = h.job_ok(&id);
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(in_pool_lists(&h), 0);
}

/// Calls of `command` Redis has run so far (`INFO commandstats`).
fn calls(h: &Harness, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut h.redis.conn())
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn an_idle_daemon_only_blocks_and_its_turn_reaches_every_list() {
    // Serving gpu and default: video's gpu list and pending, emails'
    // pending (3 lists). Idle, it sends BLMOVEs in turn and no LMOVE (the
    // second review's finding 12: it used to send one LMOVE per list
    // before each BLMOVE); a job put on any of the lists is taken.
    let h = Harness::new(CONFIG);
    let d = h.daemon("host-both", &[("CONVEYOR_POOLS", "gpu,default")]);
    std::thread::sleep(Duration::from_millis(500));
    let (lmove, blmove) = (calls(&h, "lmove"), calls(&h, "blmove"));
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(calls(&h, "lmove"), lmove, "no LMOVE while idle");
    assert!(calls(&h, "blmove") > blmove, "it blocks in turn");
    // One job on each list.
    let handed = serde_json::json!({"id": "handed", "type": "render", "payload": {}}).to_string();
    let _: i64 = redis::cmd("LPUSH")
        .arg(format!("{}:{{video}}:pool:gpu", h.prefix))
        .arg(&handed)
        .query(&mut h.redis.conn())
        .unwrap();
    let render = enqueue(&h, &["render"]);
    let mail = enqueue(&h, &["mail"]);
    wait_until(WAIT, "the three jobs completed", || {
        ["handed", render.as_str(), mail.as_str()]
            .iter()
            .all(|id| h.job_status(id).as_deref() == Some("completed"))
    });
    assert!(events(&d.log_events(), "job_handed_over").is_empty());
    assert_eq!(in_pool_lists(&h), 0);
}

#[test]
fn conveyor_job_finds_a_job_waiting_in_a_pool_list_without_records() {
    // Records off: `conveyor job` finds where the job waits by its bounded
    // search of the pool lists (the second review's finding 7), here past
    // 3,000 entries handed over after it (read newest first, in chunks).
    let toml = format!(
        "{CONFIG}\n[history]\nretention_secs = 0\n\n[jobs.two]\nqueue = \"video\"\nstages = [\
         {{ name = \"cut\", builtin = \"noop\" }}, {{ name = \"grade\", builtin = \"noop\", pool = \"gpu\" }}]\n"
    );
    let h = Harness::new(&toml);
    let d = h.daemon("host-default", &[("CONVEYOR_QUEUES", "video")]);
    let id = enqueue(&h, &["two"]);
    let gpu = format!("{}:{{video}}:pool:gpu", h.prefix);
    wait_until(WAIT, "the job handed over to pool gpu", || {
        llen(&h, &gpu) == 1 && d.log().contains("job_handed_over")
    });
    assert!(
        h.scan_keys(&format!("{}:*:job:*", h.prefix)).is_empty(),
        "no record"
    );
    let later: Vec<String> = (0..3_000)
        .map(|i| {
            serde_json::json!({"id": format!("later-{i}"), "type": "two", "payload": {}})
                .to_string()
        })
        .collect();
    for part in later.chunks(500) {
        let _: i64 = redis::cmd("LPUSH")
            .arg(&gpu)
            .arg(part)
            .query(&mut h.redis.conn())
            .unwrap();
    }
    let job = h.job_ok(&id);
    assert_eq!(job["status"], "pending", "{job:#}");
    assert_eq!(
        job["waiting"],
        serde_json::json!({"stage": "grade", "pool": "gpu"}),
        "{job:#}"
    );
    let out = h.cli(&["job", &id], &[]);
    assert!(
        stdout_of(&out).contains("waiting   for stage grade in pool gpu"),
        "{}",
        stdout_of(&out)
    );
    // A job not in any pool list: no `waiting`.
    let fresh = enqueue(&h, &["mail"]);
    let job = h.job_ok(&fresh);
    assert!(job.get("waiting").is_none_or(Value::is_null), "{job:#}");
}
