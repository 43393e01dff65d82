//! A job type's `rate` with stage pools, against the real binary: a job
//! takes one token each time it leaves pending (new, requeued on SIGTERM,
//! retried), none when a stage continues it after a handover. Counted from
//! the rate's log in Redis (`P:rate:<type>`) with a window far longer than
//! the test: one token too many and a job waits for it past the test's end.

mod common;

use std::time::Duration;

use common::{
    Harness, chain_config, chain_stage, enqueue, job_status_in, pool_host, pool_key, pool_len,
    stage_result, toml_str, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

/// Tokens taken in the window (`ZCARD` of the rate's log).
fn tokens(h: &Harness) -> u64 {
    redis::cmd("ZCARD")
        .arg(format!("{}:rate:chain", h.prefix))
        .query(&mut h.redis.conn())
        .unwrap()
}

#[test]
fn a_job_takes_a_rate_token_when_it_leaves_pending_not_at_each_pool() {
    let marks = tempfile::tempdir().unwrap();
    let slept = marks.path().join("slept");
    let failed = marks.path().join("failed");
    let mark = |p: &std::path::Path| toml_str(p.to_string_lossy()).trim_matches('"').to_owned();
    // s2 (pool b) runs long the first time: the b daemon is stopped during
    // it (requeued). s3 (pool b) fails once (retried). s1, s4 in default.
    let first_long = format!(
        "if [ ! -e {m} ]; then touch {m}; sleep 30; fi;",
        m = mark(&slept)
    );
    let fail_once = format!(
        "if [ ! -e {m} ]; then touch {m}; cat > /dev/null; exit 1; fi;",
        m = mark(&failed)
    );
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", &first_long),
        chain_stage("s3", "s2", "b", &fail_once),
        chain_stage("s4", "s3", "default", ""),
    ];
    // 4 starts in an hour: the plain job's one and the other job's three
    // (new, requeued, retried). A token per pool segment would be 3 for the
    // plain job (default, b, default) and 7 for the other: it would wait.
    let h = Harness::new(&chain_config(&stages, "", "rate = \"4/1h\""));
    let db_b = h.path("b.db");
    let plain = pool_host(&h, "host-default", "default", &h.db);
    let b1 = pool_host(&h, "host-b", "b", &db_b);

    // No requeue, no retry: three segments, one token.
    std::fs::write(&slept, "").unwrap();
    std::fs::write(&failed, "").unwrap();
    let first = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the plain job completed", || {
        h.job_status(&first).as_deref() == Some("completed")
    });
    assert_eq!(tokens(&h), 1, "one token for the plain job");

    // Requeued by SIGTERM during s2, then retried after s3: three tokens.
    std::fs::remove_file(&slept).unwrap();
    std::fs::remove_file(&failed).unwrap();
    let id = enqueue(&h, &["chain"]);
    wait_until(WAIT, "s2 running on host b", || slept.exists());
    assert_eq!(tokens(&h), 2, "the second job's first start");
    b1.sigterm();
    let mut b1 = b1;
    b1.wait_exit(WAIT);
    assert!(b1.log().contains("job_requeued"), "{}", b1.log_tail(30));
    // Requeued to pending, taken by the default daemon (its token taken
    // there), handed back to b.
    wait_until(WAIT, "the job back in pool b's list", || {
        pool_len(&h, "b") == 1
    });
    assert_eq!(tokens(&h), 3, "the requeued job's start");
    let b2 = pool_host(&h, "host-b2", "b", &db_b);
    wait_until(WAIT, "the job completed on the default host", || {
        h.job_status(&id).as_deref() == Some("completed")
    });
    assert!(failed.exists(), "s3 failed once");
    assert!(b2.log().contains("job_retrying"), "{}", b2.log_tail(30));
    assert_eq!(
        stage_result(&h.db, &id, "s4"),
        serde_json::json!({"chain": ["s1", "s2", "s3", "s4"]})
    );
    assert_eq!(tokens(&h), 4, "the retried job's start; none per segment");
    for log in [plain.log(), b1.log(), b2.log()] {
        assert!(!log.contains("job_rate_limited"), "{log}");
    }
}

#[test]
fn a_job_waiting_for_its_token_before_a_handover_goes_back_to_pending_on_shutdown() {
    // s2 in the default pool: a daemon serving no pool of the config
    // refuses to start.
    let stages = [
        chain_stage("s1", "none", "b", ""),
        chain_stage("s2", "s1", "default", ""),
    ];
    let h = Harness::new(&chain_config(&stages, "", "rate = \"1/1h\""));
    // Only the default pool is served: each job is handed over to b at its
    // first take, after its token. The second waits for one.
    let mut plain = pool_host(&h, "host-default", "default", &h.db);
    let first = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the first job in pool b's list", || {
        pool_len(&h, "b") == 1
    });
    let second = enqueue(&h, &["chain"]);
    wait_until(WAIT, "the second job waiting for its token", || {
        plain.log().contains("job_rate_limited")
    });
    assert_eq!(h.llen(&h.pending_key("default")), 0, "taken in hand");
    plain.sigterm();
    plain.wait_exit(WAIT);
    // Put back unchanged (never started: no requeue counted), not handed over.
    let pending = h.lrange_json(&h.pending_key("default"));
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["id"], second.as_str());
    assert_eq!(
        pending[0]["meta"]["requeues"].as_u64().unwrap_or(0),
        0,
        "{pending:?}"
    );
    let in_b = h.lrange_json(&pool_key(&h, "b"));
    assert_eq!(in_b.len(), 1, "{in_b:?}");
    assert_eq!(in_b[0]["id"], first.as_str());
    assert_eq!(tokens(&h), 1);
    assert_eq!(h.llen(&h.active_key("default", "host-default")), 0);
}

/// A job taken from a pool list while the daemon turns quiet (SIGTSTP) is
/// not started: it goes back onto that pool list, not pending, so it takes
/// no token when it runs after SIGCONT.
#[test]
fn a_job_received_from_a_pool_list_as_quiet_arrives_goes_back_onto_it() {
    let stages = [
        chain_stage("s1", "none", "default", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let config = chain_config(&stages, "", "rate = \"1/1h\"")
        .replace("fetch_block_ms = 100\n", "fetch_block_ms = 10000\n");
    let h = Harness::new(&config);
    let db_b = h.path("b.db");
    let d = pool_host(&h, "host-b", "b", &db_b);
    // Its first BLMOVE (on pool b's list, half the 10 s block: two lists)
    // is under way.
    std::thread::sleep(Duration::from_millis(1500));
    d.signal(libc::SIGTSTP);
    std::thread::sleep(Duration::from_millis(200));
    // A job whose s1 ran elsewhere, handed over to pool b.
    let entry = serde_json::json!({
        "id": "h1", "type": "chain",
        "_conveyor": {"results": {"s1": {"chain": ["s1"]}}},
    });
    let () = redis::cmd("RPUSH")
        .arg(pool_key(&h, "b"))
        .arg(entry.to_string())
        .query(&mut h.redis.conn())
        .unwrap();
    let put_back = || {
        d.log_events()
            .iter()
            .filter(|e| e["event"] == "jobs_put_back")
            .count()
    };
    wait_until(WAIT, "the received job is put back", || put_back() == 1);
    wait_until(WAIT, "h1 back on pool b's list", || pool_len(&h, "b") == 1);
    assert_eq!(h.llen(&h.pending_key("default")), 0);
    assert_eq!(h.llen(&h.active_key("default", "host-b")), 0);
    d.signal(libc::SIGCONT);
    wait_until(WAIT, "h1 completes after SIGCONT", || {
        job_status_in(&db_b, "h1").as_deref() == Some("completed")
    });
    assert_eq!(
        stage_result(&db_b, "h1", "s2"),
        serde_json::json!({"chain": ["s1", "s2"]})
    );
    assert_eq!(tokens(&h), 0, "a continuation takes no token");
}
