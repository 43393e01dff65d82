//! The HTTP servers shed idle and slow clients, against the real binary:
//! half-sent request heads and idle keep-alive connections are closed
//! after the header timeout (shortened here by
//! `CONVEYOR_HTTP_HEADER_TIMEOUT_MS`) without holding up other requests,
//! while an SSE stream and a long-polled claim outlive it. The dashboard,
//! the gateway and the daemon's `[worker] http` listener, which share one
//! server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Harness, SseReader, enqueue, free_port, http, wait_for};

const KNOB: &str = "CONVEYOR_HTTP_HEADER_TIMEOUT_MS";
/// The header timeout the servers run with here.
const TIMEOUT_MS: &str = "1000";
/// How long past that a closed connection may take to show (a shared,
/// noisy machine); far below "never".
const CLOSE_WITHIN: Duration = Duration::from_secs(15);
const HALF_OPEN: usize = 300;

const CONFIG: &str = r#"
[worker]
queues = ["default"]

[jobs.quick]
stages = [{ name = "only", builtin = "echo" }]
"#;

/// `n` connections that each send half a request head and then nothing.
fn half_heads(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            s.write_all(b"GET /api/queues HTTP/1.1\r\nHost: 127.0.0.1\r\nAcc")
                .expect("half a head");
            s
        })
        .collect()
}

/// Reads until the server closes `s` (EOF or reset), bytes it sends first
/// (a 408, say) aside; panics when it is still open at `deadline`.
fn wait_closed(s: &mut TcpStream, deadline: Instant, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open at the deadline");
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return got, // reset by the server: closed too
        }
    }
}

#[test]
fn half_sent_heads_and_idle_connections_are_shed_by_the_dashboard() {
    let h = Harness::new(CONFIG);
    let dash = h.dashboard_env(&[(KNOB, TIMEOUT_MS)]);
    let mut slow = half_heads(dash.port, HALF_OPEN);
    // A normal request is served beside them.
    let r = dash.get("/api/queues");
    assert_eq!(r.code, 200, "{}", r.body);

    // A kept-alive connection, idle after its answer, is closed too.
    let mut idle = TcpStream::connect(("127.0.0.1", dash.port)).expect("connect");
    idle.write_all(b"GET /api/queues HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("request");

    let deadline = Instant::now() + CLOSE_WITHIN;
    for (i, s) in slow.iter_mut().enumerate() {
        wait_closed(s, deadline, &format!("half-open connection {i}"));
    }
    let answer = wait_closed(&mut idle, deadline, "the idle keep-alive connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // And the dashboard serves on.
    assert_eq!(dash.get("/api/queues").code, 200);
}

#[test]
fn an_event_stream_outlives_the_header_timeout() {
    let h = Harness::new(CONFIG);
    let _d = h.daemon("w1", &[]);
    let dash = h.dashboard_env(&[(KNOB, TIMEOUT_MS)]);
    let sse = SseReader::open(dash.port);
    // Three header timeouts pass with the stream open and silent...
    std::thread::sleep(Duration::from_millis(3000));
    // ...and it still carries a job's events.
    enqueue(&h, &["quick", "--id", "after-the-timeout"]);
    wait_for(Duration::from_secs(30), "job_completed on /events", || {
        sse.data()
            .into_iter()
            .find(|v| v["job_id"] == "after-the-timeout" && v["event"] == "job_completed")
    });
}

#[test]
fn the_metrics_listener_sheds_half_sent_heads_too() {
    let port = free_port();
    let config = CONFIG.replace(
        "[worker]\n",
        &format!("[worker]\nhttp = \"127.0.0.1:{port}\"\n"),
    );
    assert_ne!(config, CONFIG);
    let h = Harness::new(&config);
    let _d = h.daemon("w1", &[(KNOB, TIMEOUT_MS)]);
    wait_for(Duration::from_secs(15), "/healthz", || {
        http(port, "GET", "/healthz", &[], None).filter(|r| r.code == 200)
    });
    let mut slow = half_heads(port, 20);
    let r = http(port, "GET", "/metrics", &[], None).expect("/metrics answers");
    assert_eq!(r.code, 200);
    let deadline = Instant::now() + CLOSE_WITHIN;
    for (i, s) in slow.iter_mut().enumerate() {
        wait_closed(s, deadline, &format!("half-open connection {i}"));
    }
}

#[test]
fn a_long_polled_claim_outlives_the_header_timeout_and_a_half_head_does_not() {
    const TOKEN: &str = "test-token-0123456789";
    let h = Harness::new(&format!(
        r#"
[worker]
queues = ["local"]

[gateway]
tokens = {{ workers = "{TOKEN}" }}

[jobs."demo.remote"]
remote = true
queue = "remote"
stages = [{{ name = "only" }}]

[jobs.local]
queue = "local"
stages = [{{ name = "only", builtin = "noop" }}]
"#
    ));
    let api = h.gateway_env(&[(KNOB, TIMEOUT_MS)]);
    let mut slow = half_heads(api.port, 20);
    // Three header timeouts of waiting for a job that never comes: the
    // claim ends by its own wait_secs, answered, not cut.
    let started = Instant::now();
    let r = api.post(
        "/api/v1/claim",
        Some(TOKEN),
        r#"{"worker_id": "w", "types": ["demo.remote"], "wait_secs": 3}"#,
    );
    assert_eq!(r.code, 204, "{}", r.body);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + CLOSE_WITHIN;
    for (i, s) in slow.iter_mut().enumerate() {
        wait_closed(s, deadline, &format!("half-open connection {i}"));
    }
}
