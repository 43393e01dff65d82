//! Connection messages: what the CLI and a daemon say when Redis is not
//! there. The URL is always named, its password never shown; a daemon waits
//! for Redis at start (logging each attempt), starts once it answers, and
//! stops on SIGTERM while waiting.

mod common;

use std::time::Duration;

use common::{Harness, TestRedis, free_port, wait_until};

const LONG: Duration = Duration::from_secs(30);
const JOBS: &str = "[jobs.quick]\nstages = [{ name = \"only\", builtin = \"noop\" }]\n";

#[test]
fn the_cli_names_the_redacted_url_it_cannot_reach() {
    let h = Harness::new(JOBS);
    let port = free_port();
    let url = format!("redis://app:s3cret-pw@127.0.0.1:{port}");
    let out = h.cli(&["status"], &[("CONVEYOR_REDIS_URL", &url)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let shown = format!("cannot connect to Redis at redis://app:***@127.0.0.1:{port}: ");
    assert!(err.contains(&shown), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_worker_waits_for_redis_saying_so_then_starts() {
    let h = Harness::new(JOBS);
    let port = free_port();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}");
    let mut d = h.spawn_daemon("w1", &[], &[("CONVEYOR_REDIS_URL", &url)]);
    let shown = format!("redis://:***@127.0.0.1:{port}");
    wait_until(LONG, "two redis_unreachable lines", || {
        d.log().matches("redis_unreachable").count() >= 2
    });
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("redis_unreachable"))
        .unwrap_or_default();
    assert!(line.contains(&shown), "{line}");
    assert!(line.contains("retry_in_ms"), "{line}");
    assert!(line.contains("WARN") || line.contains("warn"), "{line}");
    assert!(!log.contains("s3cret"), "{log}");
    assert!(!log.contains("worker_started"), "{log}");

    // SIGTERM while waiting: a clean stop.
    d.sigterm();
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());

    // Redis comes up on the port a waiting worker tries: it starts.
    let url = format!("redis://127.0.0.1:{port}");
    let env = [("CONVEYOR_REDIS_URL", url.as_str())];
    let mut d = h.spawn_daemon("w2", &[], &env);
    wait_until(LONG, "redis_unreachable", || {
        d.log().contains("redis_unreachable")
    });
    let _redis = TestRedis::start_at(port);
    wait_until(LONG, "the worker starts once Redis answers", || {
        d.log().contains("\"worker_started\"")
    });
    assert!(d.log().contains("redis_reachable"), "{}", d.log());
    let out = h.cli(&["enqueue", "quick", "--id", "after-wait"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("after-wait").as_deref() == Some("completed")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success(), "{}", d.log());
}

/// The gateway waits the same way, and stops on SIGTERM while waiting.
#[test]
fn the_gateway_waits_for_redis_saying_so() {
    let h = Harness::new(
        "[worker]\nqueues = [\"local\"]\n\n[gateway]\ntokens = { w = \"test-token-0123456789\" }\n\n\
         [jobs.r]\nremote = true\nqueue = \"remote\"\nstages = [{ name = \"s\" }]\n",
    );
    let port = free_port();
    let url = format!("redis://gw:s3cret-pw@127.0.0.1:{port}");
    let mut g = h.spawn_server("gateway", &[("CONVEYOR_REDIS_URL", &url)]);
    let shown = format!("\"url\":\"redis://gw:***@127.0.0.1:{port}\"");
    wait_until(LONG, "redis_unreachable naming the URL", || {
        g.log()
            .lines()
            .any(|l| l.contains("redis_unreachable") && l.contains(&shown))
    });
    assert!(!g.log().contains("s3cret"), "{}", g.log());
    g.sigterm();
    let status = g.wait_exit(LONG).expect("the gateway exits");
    assert_eq!(status.code(), Some(0), "{}", g.log());
}
