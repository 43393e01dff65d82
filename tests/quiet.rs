//! Quiet (SIGTSTP): the real daemon, real signals and a real Redis. It
//! finishes its running job, takes no new one, stays alive and says so in
//! `/readyz`, sd_notify `STATUS=` and the log; SIGCONT takes jobs again;
//! SIGTERM while quiet drains and exits 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, Harness, free_port, http, wait_until};

const LONG: Duration = Duration::from_secs(30);

fn config(port: u16) -> String {
    format!(
        r#"
[worker]
http = "127.0.0.1:{port}"
concurrency = 1
heartbeat_secs = 1
fetch_block_ms = 500

[jobs.slow]
stages = [{{ name = "nap", builtin = "sleep", args = {{ ms = 3000 }} }}]

[jobs.quick]
stages = [{{ name = "only", builtin = "noop" }}]
"#
    )
}

/// `/readyz`: (code, body).
fn readyz(port: u16) -> (u16, String) {
    let r = http(port, "GET", "/readyz", &[], None).expect("/readyz answers");
    (r.code, r.body)
}

fn events(d: &Daemon, name: &str) -> usize {
    d.log_events().iter().filter(|e| e["event"] == name).count()
}

/// Collects every sd_notify datagram the daemon sends.
fn notify_socket(h: &Harness) -> (String, Arc<Mutex<Vec<String>>>) {
    let path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            into.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    (path.to_string_lossy().into_owned(), seen)
}

#[test]
fn sigtstp_quiets_the_daemon_sigcont_resumes_and_sigterm_still_drains() {
    let port = free_port();
    let h = Harness::new(&config(port));
    let (sock, notes) = notify_socket(&h);
    let mut d = h.daemon("w1", &[("NOTIFY_SOCKET", sock.as_str())]);
    let pending = h.pending_key("default");
    wait_until(LONG, "ready", || readyz(port).0 == 200);

    assert!(
        h.cli(&["enqueue", "slow", "--id", "s1"], &[])
            .status
            .success()
    );
    wait_until(LONG, "s1 runs", || {
        h.job_status("s1").as_deref() == Some("running")
    });
    d.signal(libc::SIGTSTP);
    wait_until(LONG, "worker_quiet is logged", || {
        events(&d, "worker_quiet") == 1
    });
    let quiet = d
        .log_events()
        .into_iter()
        .find(|e| e["event"] == "worker_quiet")
        .unwrap();
    // Logged while s1 runs, though the fetch loop was waiting for its only
    // slot.
    assert_eq!(quiet["running"], 1, "{quiet}");
    assert!(
        h.cli(&["enqueue", "quick", "--id", "q1"], &[])
            .status
            .success()
    );
    let (code, body) = readyz(port);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("quiet"), "{body}");
    wait_until(LONG, "STATUS= says quiet", || {
        notes
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("STATUS=quiet: 1 running, taking no jobs"))
    });
    wait_until(LONG, "`status` shows the daemon quiet", || {
        h.status()["workers"][0]["quiet"] == true
    });
    let text = h.cli(&["status"], &[]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("(quiet: taking no jobs)"),
        "{text:?}"
    );

    // The running job finishes; the new one is not taken.
    wait_until(LONG, "s1 completes", || {
        h.job_status("s1").as_deref() == Some("completed")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(h.llen(&pending), 1, "q1 stays pending while quiet");
    assert_eq!(h.job_status("q1"), None, "q1 never started");
    assert!(!d.has_exited(), "a quiet daemon stays alive");
    assert_eq!(readyz(port).0, 503);
    assert_eq!(
        http(port, "GET", "/healthz", &[], None).map(|r| r.code),
        Some(200),
        "quiet is healthy"
    );

    // SIGCONT: jobs are taken again.
    d.signal(libc::SIGCONT);
    wait_until(LONG, "q1 completes after SIGCONT", || {
        h.job_status("q1").as_deref() == Some("completed")
    });
    assert_eq!(events(&d, "worker_resumed"), 1);
    wait_until(LONG, "ready again", || readyz(port).0 == 200);
    wait_until(LONG, "`status` shows it taking jobs", || {
        h.status()["workers"][0]["quiet"] == false
    });

    // Quiet again, then SIGTERM: the usual drain, exit 0, q2 untouched.
    d.signal(libc::SIGTSTP);
    wait_until(LONG, "quiet again", || events(&d, "worker_quiet") == 2);
    assert!(
        h.cli(&["enqueue", "quick", "--id", "q2"], &[])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_secs(1));
    d.sigterm();
    assert_eq!(d.wait_exit(LONG).code(), Some(0));
    assert_eq!(events(&d, "worker_shutdown_complete"), 1);
    assert_eq!(h.llen(&pending), 1, "q2 is still pending");
    assert_eq!(h.job_status("q2"), None);
}

/// `run_worker.sh -n 2` passes SIGTSTP and SIGCONT on to both daemons (the
/// script itself is not suspended), and SIGTERM still drains both.
#[test]
fn run_worker_sh_relays_tstp_and_cont_to_its_daemons() {
    let h = Harness::new(&config(free_port()).replace("http = ", "# http = "));
    let log = std::fs::File::create(h.path("run_worker.log")).expect("log file");
    let mut cmd = std::process::Command::new("bash");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    let mut script = cmd
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/run_worker.sh"))
        .args(["-n", "2", "relay"])
        .env("CONVEYOR_BIN", env!("CARGO_BIN_EXE_conveyor"))
        .env("CONVEYOR_CONFIG", &h.config)
        .env("CONVEYOR_REDIS_URL", h.redis.url())
        .env("CONVEYOR_PREFIX", &h.prefix)
        .env("CONVEYOR_DB", &h.db)
        .env("CONVEYOR_LOG_FORMAT", "json")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn run_worker.sh");
    let pid = script.id() as i32;
    let signal = |sig| assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let quiet = |want: bool| {
        let workers = h.status()["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        workers.len() == 2 && workers.iter().all(|w| w["quiet"] == want)
    };
    wait_until(LONG, "both daemons registered", || quiet(false));

    signal(libc::SIGTSTP);
    wait_until(LONG, "both daemons quiet", || quiet(true));
    assert!(
        h.cli(&["enqueue", "quick", "--id", "r1"], &[])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(h.job_status("r1"), None, "a quiet pair takes nothing");

    signal(libc::SIGCONT);
    wait_until(LONG, "r1 completes after SIGCONT", || {
        h.job_status("r1").as_deref() == Some("completed")
    });
    wait_until(LONG, "both daemons take jobs again", || quiet(false));

    signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + LONG;
    let status = loop {
        if let Some(s) = script.try_wait().expect("wait run_worker.sh") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run_worker.sh still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(h.path("run_worker.log")).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("received SIGTSTP"), "{text}");
}

/// A job that a `BLMOVE` already waiting when SIGTSTP arrives receives is
/// not started: it goes back onto pending, at the consuming end, and runs
/// once the daemon resumes.
#[test]
fn a_job_received_as_quiet_arrives_goes_back_unstarted() {
    let h = Harness::new(
        &config(free_port())
            .replace("http = ", "# http = ")
            .replace("fetch_block_ms = 500", "fetch_block_ms = 10000"),
    );
    let d = h.daemon("w1", &[]);
    let pending = h.pending_key("default");
    // The first BLMOVE (10 s) is under way.
    std::thread::sleep(Duration::from_millis(1500));
    d.signal(libc::SIGTSTP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        h.cli(&["enqueue", "quick", "--id", "b1"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the received job is put back", || {
        events(&d, "jobs_put_back") == 1
    });
    wait_until(LONG, "worker_quiet is logged", || {
        events(&d, "worker_quiet") == 1
    });
    assert_eq!(h.llen(&pending), 1, "b1 is back on pending");
    assert_eq!(h.llen(&h.active_key("default", "w1")), 0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(h.job_status("b1"), None, "b1 never started");

    d.signal(libc::SIGCONT);
    wait_until(LONG, "b1 completes after SIGCONT", || {
        h.job_status("b1").as_deref() == Some("completed")
    });
}
