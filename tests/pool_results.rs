//! A large result handed over between stage pools (issue 15, "Tests and
//! figures"): real Redis, the real binary, one SQLite file per simulated
//! host. A stage in pool `a` returns a 3 MiB result; the next stage, in
//! pool `b` on another host, reads it on its stdin (`results`) on every
//! run: the first run is stopped by a SIGTERM of its daemon (requeued),
//! the second fails (retried), the third completes. The size limit that
//! applies is `worker.max_result_bytes` (16 MiB by default, docs/stages.md
//! "Size limits"); `worker.max_job_bytes` does not count carried results.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, Harness, enqueue, open_sqlite_read_only, toml_str, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// 3 MiB of `x`: the blob stage `big` returns.
const BLOB: usize = 3 * 1024 * 1024;

fn host(h: &Harness, id: &str, pools: &str, db: &Path) -> Daemon {
    Daemon::start(
        &h.redis.url(),
        &h.prefix,
        db,
        &h.config,
        id,
        &[("CONVEYOR_POOLS", pools)],
    )
}

fn job_status(db: &Path, id: &str) -> Option<String> {
    let conn = open_sqlite_read_only(db)?;
    conn.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
        .ok()
}

fn config(marks: &Path) -> String {
    let mark = |name: &str| {
        toml_str(marks.join(name).to_string_lossy())
            .trim_matches('"')
            .to_owned()
    };
    let (seen, slept, failed) = (mark("seen"), mark("slept"), mark("failed"));
    // `use`: logs the blob's length it read on stdin, then sleeps on its
    // first run (its daemon is stopped then), fails on its second, and
    // returns the length on its third.
    format!(
        r#"[worker]
fetch_block_ms = 100
shutdown_grace_secs = 1
kill_grace_secs = 1
promote_interval_ms = 100

[retry]
backoff_ms = 50
backoff_max_ms = 100

[jobs.big]
max_attempts = 3

[[jobs.big.stages]]
name = "big"
pool = "a"
run = ["sh", "-c", '''cat > /dev/null; printf '{{"result":{{"blob":"'; head -c {BLOB} /dev/zero | tr '\0' x; printf '"}}}}\n' ''']

[[jobs.big.stages]]
name = "use"
pool = "b"
run = ["sh", "-c", '''in=$(cat); printf '%s' "$in" | jq '.results.big.blob | length' >> {seen}; if [ ! -e {slept} ]; then touch {slept}; sleep 30; fi; if [ ! -e {failed} ]; then touch {failed}; exit 1; fi; printf '%s' "$in" | jq -c '{{result: {{len: (.results.big.blob | length)}}}}' ''']
"#
    )
}

#[test]
fn a_3_mib_result_reaches_the_next_pool_across_a_requeue_and_a_retry() {
    let marks = tempfile::tempdir().unwrap();
    let h = Harness::new(&config(marks.path()));
    let (db_a, db_b) = (h.path("a.db"), h.path("b.db"));
    let sub = h.subscribe();
    let da = host(&h, "host-a", "a", &db_a);
    let b1 = host(&h, "host-b", "b", &db_b);
    let id = enqueue(&h, &["big"]);
    let slept = marks.path().join("slept");
    wait_until(WAIT, "stage `use` running on host b", || slept.exists());
    b1.sigterm();
    let mut b1 = b1;
    b1.wait_exit(WAIT);
    assert!(b1.log().contains("job_requeued"), "{}", b1.log_tail(30));
    let b2 = host(&h, "host-b2", "b", &db_b);
    wait_until(WAIT, "the job completed on host b", || {
        job_status(&db_b, &id).as_deref() == Some("completed")
    });
    assert!(marks.path().join("failed").exists());
    assert!(b2.log().contains("job_retrying"), "{}", b2.log_tail(30));
    assert!(da.log().contains("job_handed_over"), "{}", da.log_tail(30));
    // Every run of `use` read the whole blob: the first (stopped), the
    // second (failed) and the third.
    let seen = std::fs::read_to_string(marks.path().join("seen")).unwrap();
    let lens: Vec<&str> = seen.lines().collect();
    assert_eq!(lens, vec![BLOB.to_string(); 3], "lengths read on stdin");
    // A third host (no SQLite file) reads both stages from the record.
    let none = h.path("third-host-never-created.db");
    let mut job = Value::Null;
    wait_until(
        WAIT,
        "the record read on a third host says completed",
        || {
            let out = h.cli(
                &["job", &id, "--json"],
                &[("CONVEYOR_DB", none.to_str().unwrap())],
            );
            job = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            job["status"] == "completed"
        },
    );
    assert!(!none.exists());
    let stages = job["stages"].as_array().expect("stages");
    assert_eq!(stages[0]["worker_id"], "host-a");
    assert_eq!(stages[0]["pool"], "a");
    assert_eq!(
        stages[0]["result"]["blob"].as_str().map(str::len),
        Some(BLOB)
    );
    assert_eq!(stages[1]["worker_id"], "host-b2");
    assert_eq!(stages[1]["pool"], "b");
    assert_eq!(stages[1]["result"], json!({"len": BLOB}));
    assert_eq!(job["attempt"], 2, "one retry: {}", job["attempt"]);
    // Host a's handovers after the requeue and the retry (if it took the
    // job from pending) say how far the job got, not 0.
    sub.wait_status(&id, "completed", WAIT);
    sub.assert_progress_never_goes_back(&id);
}
