//! Stage pools as operators see them, against the real binary: a job
//! waiting in a pool list with no daemon serving the pool, as `conveyor
//! job`, `conveyor status` (text and JSON), the dashboard's `/api/queues`
//! and `conveyor doctor` show it, until a daemon of the pool starts. How
//! jobs move between pools is in `pools.rs`.

mod common;

use std::time::Duration;

use common::{
    Harness, chain_config, chain_stage, enqueue, job_status_in, pool_host as host, pool_len,
    stage_result, wait_until,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_pool_without_a_daemon_holds_the_job_until_one_starts() {
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let h = Harness::new(&chain_config(&stages, "", ""));
    let db_b = h.path("b.db");
    let _plain = host(&h, "host-default", "default", &h.db);
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the job waits in pool b's list", || {
        pool_len(&h, "b") == 1
    });
    assert_eq!(h.stage_status(&id, "s1").as_deref(), Some("completed"));
    // This host's row: handed over (done here); the job itself is pending.
    assert_eq!(h.job_status(&id).as_deref(), Some("handed_over"));
    // It stays there: nobody else takes it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pool_len(&h, "b"), 1);
    // `conveyor job` says where it waits.
    let out = h.cli(&["job", &id], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("waiting   for stage s2 in pool b"), "{text}");
    assert!(text.contains("[host-default, pool default]"), "{text}");
    let job = h.job_ok(&id);
    assert_eq!(job["status"], "pending");
    assert_eq!(
        job["waiting"],
        serde_json::json!({"stage": "s2", "pool": "b"})
    );
    assert_eq!(job["stages"][0]["worker_id"], "host-default");
    // `conveyor status`: pool b has one job and no daemon.
    let status = h.status();
    let queue = &status["queues"][0];
    assert_eq!(queue["name"], "default");
    let pools = queue["pools"].as_array().unwrap();
    let b = pools
        .iter()
        .find(|p| p["name"] == "b")
        .expect("pool b listed");
    assert_eq!(b["depth"], 1);
    assert_eq!(b["workers"], serde_json::json!([]));
    let d = pools.iter().find(|p| p["name"] == "default").unwrap();
    assert_eq!(d["workers"], serde_json::json!(["host-default"]));
    let out = h.cli(&["status"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("none (nothing runs its stages)"), "{text}");
    // The dashboard's overview reads the same.
    let dash = h.dashboard(None);
    let api = dash.get_json("/api/queues");
    let pools = api["queues"][0]["pools"].as_array().expect("pools").clone();
    let b = pools.iter().find(|p| p["name"] == "b").expect("pool b");
    assert_eq!(
        (b["depth"].as_u64(), b["workers"].clone()),
        (Some(1), serde_json::json!([]))
    );
    drop(dash);
    // `conveyor doctor` warns, and passes.
    let out = h.cli(&["doctor", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pools")
        .expect("a pools check")
        .clone();
    assert_eq!(check["ok"], true);
    assert_eq!(check["warning"], true);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("`b` of queue `default`"),
        "{check}"
    );
    let _b = host(&h, "host-b", "b", &db_b);
    wait_until(WAIT, "the job completed on host b", || {
        job_status_in(&db_b, &id).as_deref() == Some("completed")
    });
    assert_eq!(
        stage_result(&db_b, &id, "s2"),
        serde_json::json!({"chain": ["s1", "s2"]})
    );
    assert_eq!(pool_len(&h, "b"), 0);
    // Served now: doctor says so, without a warning.
    let out = h.cli(&["doctor", "--json"], &[]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pools")
        .expect("a pools check")
        .clone();
    assert_eq!(check["ok"], true);
    assert!(check.get("warning").is_none(), "{check}");
}
