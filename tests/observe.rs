//! The daemon's HTTP listener (`[worker] http`): health, readiness and
//! Prometheus metrics, against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{
    Daemon, Harness, chain_config, chain_stage, enqueue, free_port, job_status_in, pool_host,
    pool_len, wait_until,
};

const LONG: Duration = Duration::from_secs(30);

/// A plain HTTP/1.1 GET: (status code, body). `None` when nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn config(port: u16, extra: &str) -> String {
    format!(
        r#"
[worker]
http = "127.0.0.1:{port}"
shutdown_grace_secs = 20
{extra}

[jobs.quick]
stages = [{{ name = "only", builtin = "noop" }}]

[jobs.broken]
max_attempts = 1
stages = [{{ name = "boom", builtin = "fail" }}]

[jobs.slow]
stages = [{{ name = "nap", builtin = "sleep", args = {{ ms = 4000 }} }}]
"#
    )
}

/// The value of the sample `name{labels}` (labels as written), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_readiness_and_metrics() {
    let port = free_port();
    let h = Harness::new(&config(port, ""));
    let mut d = h.daemon("w1", &[]);
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    wait_until(LONG, "ready", || {
        get(port, "/readyz").is_some_and(|r| r.0 == 200)
    });
    for i in 0..3 {
        assert!(
            h.cli(&["enqueue", "quick", "--id", &format!("q{i}")], &[])
                .status
                .success()
        );
    }
    assert!(
        h.cli(&["enqueue", "broken", "--id", "b0"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the jobs ran", || {
        h.count_status("completed") == 3 && h.count_status("failed") == 1
    });
    let (code, m) = get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let q = r#"{type="quick",queue="default"}"#;
    assert_eq!(
        sample(&m, &format!("conveyor_jobs_started_total{q}")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!("conveyor_jobs_completed_total{q}")),
        Some(3.0),
        "{m}"
    );
    let b = r#"{type="broken",queue="default"}"#;
    assert_eq!(
        sample(&m, &format!("conveyor_jobs_failed_total{b}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"conveyor_jobs_dead_lettered_total{queue="default"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"conveyor_queue_depth{queue="default",list="dead"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyor_job_duration_seconds_count{type="quick",queue="default",outcome="completed"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyor_stage_duration_seconds_count{type="broken",stage="boom",outcome="failed"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(sample(&m, "conveyor_fetch_duration_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(sample(&m, "conveyor_heartbeat_age_seconds").is_some_and(|s| s < 30.0));
    assert_eq!(sample(&m, "conveyor_jobs_in_flight"), Some(0.0));
    assert!(m.contains("# HELP conveyor_jobs_completed_total"), "{m}");
    // Without stage pools no pool list is read, so none is shown.
    assert!(!m.contains(r#"list="pool""#), "{m}");

    // Draining: still alive, no longer ready, while a job finishes.
    assert!(
        h.cli(&["enqueue", "slow", "--id", "s0"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the slow job runs", || {
        h.job_status("s0").as_deref() == Some("running")
    });
    let (_, m) = get(port, "/metrics").unwrap();
    assert_eq!(sample(&m, "conveyor_jobs_in_flight"), Some(1.0), "{m}");
    d.sigterm();
    wait_until(LONG, "not ready while draining", || {
        get(port, "/readyz")
            .is_some_and(|(code, body)| code == 503 && body.contains("shutting down"))
    });
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    assert!(d.wait_exit(LONG).success());
    assert!(
        get(port, "/healthz").is_none(),
        "the listener is gone after exit"
    );
}

#[test]
fn readiness_says_why_when_redis_is_away() {
    let port = free_port();
    let mut h = Harness::new(&config(port, "dead_after_secs = 3\nheartbeat_secs = 1"));
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "ready", || {
        get(port, "/readyz").is_some_and(|r| r.0 == 200)
    });
    h.redis.kill();
    wait_until(LONG, "not ready without Redis", || {
        get(port, "/readyz").is_some_and(|(code, body)| code == 503 && body.contains("Redis"))
    });
    assert_eq!(
        get(port, "/healthz").map(|r| r.0),
        Some(200),
        "alive all the same"
    );
    h.redis.start_again();
    wait_until(LONG, "ready again", || {
        get(port, "/readyz").is_some_and(|r| r.0 == 200)
    });
    d.sigterm();
    d.wait_exit(LONG);
}

#[test]
fn a_bad_or_taken_address_stops_the_start_naming_the_key() {
    let h = Harness::new(&config(1, "").replace("127.0.0.1:1", "localhost-ish"));
    let mut d = h.spawn_daemon("w1", &[], &[]);
    assert_eq!(d.wait_exit(LONG).code(), Some(2));
    assert!(d.log().contains("worker.http"), "{}", d.log());

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    h.write_config(&config(port, ""));
    let mut d = h.spawn_daemon("w1", &[], &[]);
    assert_eq!(d.wait_exit(LONG).code(), Some(1));
    assert!(d.log().contains("worker.http"), "{}", d.log());
    drop(taken);
}

#[test]
fn handovers_and_pool_list_depths_are_in_the_metrics() {
    let port = free_port();
    let stages = [
        chain_stage("s1", "none", "a", ""),
        chain_stage("s2", "s1", "b", ""),
    ];
    let http = format!("http = \"127.0.0.1:{port}\"");
    let h = Harness::new(&chain_config(&stages, &http, ""));
    // Host b: the same job types, no listener (it would take the port).
    let b_config = h.path("b.toml");
    std::fs::write(&b_config, chain_config(&stages, "", "")).unwrap();
    let mut a = pool_host(&h, "host-a", "a", &h.db);
    wait_until(LONG, "ready", || {
        get(port, "/readyz").is_some_and(|r| r.0 == 200)
    });
    let handed = r#"conveyor_jobs_handed_over_total{type="chain",queue="default"}"#;
    let depth = |pool: &str| {
        format!(r#"conveyor_queue_depth{{queue="default",list="pool",pool="{pool}"}}"#)
    };
    let (_, m) = get(port, "/metrics").unwrap();
    assert_eq!(sample(&m, handed), None, "{m}");
    // The pools of the queue's stages (a, b) and those it serves (a): not
    // the default pool, which no stage names and it does not serve.
    assert_eq!(sample(&m, &depth("a")), Some(0.0), "{m}");
    assert_eq!(sample(&m, &depth("b")), Some(0.0), "{m}");
    assert_eq!(sample(&m, &depth("default")), None, "{m}");

    // s1 runs on host a, s2 waits for a daemon of pool b.
    let ids: Vec<String> = (0..3).map(|_| enqueue(&h, &["chain"])).collect();
    wait_until(LONG, "three jobs in pool b's list", || {
        pool_len(&h, "b") == 3
    });
    let (_, m) = get(port, "/metrics").unwrap();
    assert_eq!(sample(&m, handed), Some(3.0), "{m}");
    assert_eq!(sample(&m, &depth("b")), Some(3.0), "{m}");
    assert_eq!(sample(&m, &depth("a")), Some(0.0), "{m}");
    assert_eq!(
        sample(
            &m,
            r#"conveyor_job_duration_seconds_count{type="chain",queue="default",outcome="handed_over"}"#
        ),
        Some(3.0),
        "{m}"
    );

    // A daemon of pool b takes them: the depth falls back, the count stays.
    let db_b = h.path("b.db");
    let mut b = Daemon::start(
        &h.redis.url(),
        &h.prefix,
        &db_b,
        &b_config,
        "host-b",
        &[("CONVEYOR_POOLS", "b")],
    );
    wait_until(LONG, "the jobs completed on host b", || {
        ids.iter()
            .all(|id| job_status_in(&db_b, id).as_deref() == Some("completed"))
    });
    let (_, m) = get(port, "/metrics").unwrap();
    assert_eq!(sample(&m, &depth("b")), Some(0.0), "{m}");
    assert_eq!(sample(&m, handed), Some(3.0), "{m}");
    a.sigterm();
    b.sigterm();
    a.wait_exit(LONG);
    b.wait_exit(LONG);
}
