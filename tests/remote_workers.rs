//! The reference remote workers of `examples/workers/` (Python and PHP) as
//! child processes against the real `conveyor gateway` serving the
//! remote-worker API, with a real Redis, SQLite and a local daemon beside
//! them: demo jobs run end to end, failures retry and go dead, SIGTERM
//! finishes the running stage and gives the rest of the job back.
//!
//! The Python tests run when `python3` is on PATH, the PHP ones when `php`
//! has the curl extension; otherwise a test says it skips and passes.

mod common;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{CRATE_ROOT, GatewayProc, Harness, enqueue, random_hex, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
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
max_jobs = 16

[retry]
backoff_ms = 50
backoff_max_ms = 100

[jobs."demo.remote"]
remote = true
queue = "remote"
max_attempts = 3
backoff_ms = 100
stages = [{{ name = "fetch" }}, {{ name = "transform" }}, {{ name = "upload" }}]

[jobs."fail.always"]
remote = true
queue = "remote"
max_attempts = 3
backoff_ms = 100
stages = [{{ name = "run" }}]

[jobs."fail.permanent"]
remote = true
queue = "remote"
max_attempts = 3
stages = [{{ name = "run" }}]

[jobs.local]
queue = "local"
stages = [{{ name = "only", builtin = "noop" }}]
"#
    )
}

// ---------------------------------------------------------------- workers

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lang {
    Python,
    Php,
}

impl Lang {
    fn program(self) -> &'static str {
        match self {
            Lang::Python => "python3",
            Lang::Php => "php",
        }
    }

    fn script(self) -> PathBuf {
        let rel = match self {
            Lang::Python => "examples/workers/python/worker.py",
            Lang::Php => "examples/workers/php/worker.php",
        };
        Path::new(CRATE_ROOT).join(rel)
    }

    /// Whether the interpreter (with curl, for PHP) is there; prints why
    /// the test skips when not.
    fn available(self) -> bool {
        let ok = match self {
            Lang::Python => on_path("python3"),
            Lang::Php => {
                on_path("php")
                    && Command::new("php")
                        .args(["-r", "exit(extension_loaded('curl') ? 0 : 1);"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            }
        };
        if !ok {
            match self {
                Lang::Python => println!("skipping: python3 not found"),
                Lang::Php => println!("skipping: php (with curl) not found"),
            }
        }
        ok
    }
}

/// Whether `program` is an executable file on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// One reference worker as a child process, killed on drop; its stderr
/// (the log) goes to a file, printed when a test panics.
struct RemoteWorker {
    child: Child,
    id: String,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl RemoteWorker {
    /// Starts `lang`'s worker as `id` against `api`, with the token in
    /// `CONVEYOR_API_TOKEN` and `args` (`--name=value`) after the defaults.
    fn spawn(h: &Harness, api: &GatewayProc, lang: Lang, id: &str, args: &[&str]) -> Self {
        let log_path = h.path(&format!("remote-{id}-{}.log", random_hex()));
        let log = File::create(&log_path).expect("worker log file");
        let mut cmd = Command::new(lang.program());
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy().to_ascii_lowercase();
            if name.starts_with("conveyor_") || name.ends_with("_proxy") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg(lang.script())
            .arg(format!("--api-url=http://127.0.0.1:{}", api.port))
            .arg(format!("--worker-id={id}"))
            .args(["--poll-interval=0.2", "--wait=5"])
            .args(args)
            .env("CONVEYOR_API_TOKEN", TOKEN)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(CRATE_ROOT)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", lang.program()));
        RemoteWorker {
            child,
            id: id.to_owned(),
            log_path,
            exited: None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn sigterm(&self) {
        if self.exited.is_none() {
            // SAFETY: sends a signal to our own child, not yet reaped.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
    }

    fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited.is_some()
    }

    /// Waits for the exit; panics (printing the log) after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit within {timeout:?}; log:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited.expect("exited")
    }

    /// Waits until the log holds `text`; panics if the worker exits first.
    fn wait_log(&mut self, text: &str) {
        wait_until(LONG, &format!("worker {} to log {text:?}", self.id), || {
            assert!(
                !self.has_exited() || self.log().contains(text),
                "worker {} exited ({:?}) before logging {text:?}; log:\n{}",
                self.id,
                self.exited,
                self.log()
            );
            self.log().contains(text)
        });
    }

    /// Asserts a clean exit (0) within `timeout`, and that the token never
    /// reached the log.
    fn assert_exits_0(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        let log = self.log();
        assert_eq!(status.code(), Some(0), "worker {}; log:\n{log}", self.id);
        assert!(!log.contains(TOKEN), "the token is in the log:\n{log}");
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- log of remote worker {} -----\n{}\n----- end of log -----",
                self.id,
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------- checks

fn wait_status(h: &Harness, id: &str, status: &str) {
    wait_until(LONG, &format!("job {id} to be {status}"), || {
        h.job_status(id).as_deref() == Some(status)
    });
}

fn stage<'a>(rec: &'a Value, name: &str) -> &'a Value {
    rec["stages"]
        .as_array()
        .expect("stages is a list")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {rec:#}"))
}

/// A completed demo job: every stage completed with the demo's results.
fn assert_demo_completed(h: &Harness, id: &str, n: i64, uploaded_by: &str) {
    let rec = h.job_ok(id);
    assert_eq!(rec["status"], "completed", "{rec:#}");
    for name in ["fetch", "transform", "upload"] {
        assert_eq!(stage(&rec, name)["status"], "completed", "{rec:#}");
    }
    assert_eq!(stage(&rec, "fetch")["result"], json!({"n": n}), "{rec:#}");
    assert_eq!(
        stage(&rec, "transform")["result"],
        json!({"n": 2 * n}),
        "{rec:#}"
    );
    assert_eq!(
        stage(&rec, "upload")["result"],
        json!({"uploaded": true, "n": 2 * n, "by": uploaded_by}),
        "{rec:#}"
    );
}

fn count(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

// ---------------------------------------------------------------- (a) demo jobs

fn demo_jobs_run_end_to_end_beside_a_local_daemon(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let daemon = h.daemon("local-1", &[]);
    let worker_id = format!("{lang:?}-1").to_lowercase();
    let remote: Vec<(String, i64)> = (1..=10)
        .map(|n| {
            let payload = json!({"n": n, "sleep": 0.05}).to_string();
            let id = format!("r-{n}");
            enqueue(&h, &["demo.remote", "--id", &id, "--payload", &payload]);
            (id, n)
        })
        .collect();
    let local: Vec<String> = (0..5).map(|_| enqueue(&h, &["local"])).collect();

    let mut w = RemoteWorker::spawn(&h, &api, lang, &worker_id, &["--max-runs=10"]);
    w.assert_exits_0(LONG);

    for (id, n) in &remote {
        wait_status(&h, id, "completed");
        assert_demo_completed(&h, id, *n, &worker_id);
        assert_eq!(h.job_ok(id)["attempt"], 1);
    }
    let log = w.log();
    assert_eq!(count(&log, "job_completed"), 10, "{log}");
    assert_eq!(count(&log, "stage_started"), 30, "{log}");
    for id in &local {
        wait_status(&h, id, "completed");
    }
    let daemon_log = daemon.log();
    for (id, _) in &remote {
        assert!(
            !daemon_log.contains(&format!("\"{id}\"")),
            "the local daemon touched {id}"
        );
    }
    assert_eq!(h.llen(&h.dead_key("remote")), 0);
}

#[test]
fn python_worker_runs_demo_jobs_beside_a_local_daemon() {
    demo_jobs_run_end_to_end_beside_a_local_daemon(Lang::Python);
}

#[test]
fn php_worker_runs_demo_jobs_beside_a_local_daemon() {
    demo_jobs_run_end_to_end_beside_a_local_daemon(Lang::Php);
}

#[test]
fn python_and_php_workers_share_one_queue() {
    if !Lang::Python.available() || !Lang::Php.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let ids: Vec<String> = (1..=20)
        .map(|n| {
            let payload = json!({"n": n, "sleep": 0.05}).to_string();
            enqueue(&h, &["demo.remote", "--payload", &payload])
        })
        .collect();
    let mut py = RemoteWorker::spawn(&h, &api, Lang::Python, "py-shared", &[]);
    let mut php = RemoteWorker::spawn(&h, &api, Lang::Php, "php-shared", &[]);
    for id in &ids {
        wait_status(&h, id, "completed");
        assert_eq!(h.job_ok(id)["attempt"], 1);
    }
    py.sigterm();
    php.sigterm();
    py.assert_exits_0(Duration::from_secs(15));
    php.assert_exits_0(Duration::from_secs(15));
    let (a, b) = (
        count(&py.log(), "job_completed"),
        count(&php.log(), "job_completed"),
    );
    assert_eq!(a + b, 20, "each job once: python {a}, php {b}");
}

// ---------------------------------------------------------------- (b) failures

fn failures_retry_then_go_to_the_dead_list(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let always = enqueue(&h, &["fail.always", "--id", "always-1"]);
    let permanent = enqueue(&h, &["fail.permanent", "--id", "permanent-1"]);
    // Three attempts of one, one of the other.
    let mut w = RemoteWorker::spawn(&h, &api, lang, "failing-1", &["--max-runs=4"]);
    w.assert_exits_0(LONG);

    wait_status(&h, &always, "failed");
    wait_status(&h, &permanent, "failed");
    let rec = h.job_ok(&always);
    assert_eq!(rec["attempt"], 3, "{rec:#}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("fail.always fails on purpose (attempt 3)")),
        "{rec:#}"
    );
    let rec = h.job_ok(&permanent);
    assert_eq!(rec["attempt"], 1, "{rec:#}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("fail.permanent fails for good")),
        "{rec:#}"
    );
    wait_until(LONG, "both jobs on the dead list", || {
        h.llen(&h.dead_key("remote")) == 2
    });
    let dead: Vec<String> = h
        .lrange_json(&h.dead_key("remote"))
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        dead.contains(&always) && dead.contains(&permanent),
        "{dead:?}"
    );
    let log = w.log();
    assert_eq!(count(&log, "retryable=true"), 3, "{log}");
    assert_eq!(count(&log, "retryable=false"), 1, "{log}");
}

#[test]
fn python_worker_failures_retry_then_go_to_the_dead_list() {
    failures_retry_then_go_to_the_dead_list(Lang::Python);
}

#[test]
fn php_worker_failures_retry_then_go_to_the_dead_list() {
    failures_retry_then_go_to_the_dead_list(Lang::Php);
}

// ---------------------------------------------------------------- (c) SIGTERM

/// SIGTERM while a stage runs: the stage finishes and is completed, the
/// rest of the job is released (no attempt counted), the worker exits 0,
/// and another worker finishes the job from its next stage.
fn sigterm_mid_stage_finishes_it_and_gives_the_job_back(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    // Each demo stage takes `sleep` seconds.
    let id = enqueue(
        &h,
        &[
            "demo.remote",
            "--id",
            "slow-1",
            "--payload",
            r#"{"n": 3, "sleep": 2}"#,
        ],
    );
    let mut a = RemoteWorker::spawn(&h, &api, lang, "stopping-a", &[]);
    a.wait_log(&format!("stage_started job={id} stage=fetch"));
    a.sigterm();
    a.assert_exits_0(Duration::from_secs(15));
    let log = a.log();
    assert!(
        log.contains(&format!("stage_completed job={id} stage=fetch")),
        "{log}"
    );
    assert!(log.contains(&format!("job_released job={id}")), "{log}");
    assert_eq!(count(&log, "stage_started"), 1, "{log}");
    assert_eq!(h.stage_status(&id, "fetch").as_deref(), Some("completed"));

    let mut b = RemoteWorker::spawn(&h, &api, lang, "finishing-b", &["--max-runs=1"]);
    b.assert_exits_0(LONG);
    let log = b.log();
    assert!(log.contains("done_before=fetch"), "{log}");
    assert!(!log.contains("stage=fetch"), "{log}");
    wait_status(&h, &id, "completed");
    assert_demo_completed(&h, &id, 3, "finishing-b");
    // A release is not a failure: still the first attempt.
    assert_eq!(h.job_ok(&id)["attempt"], 1);
}

#[test]
fn python_worker_sigterm_mid_stage_finishes_it_and_gives_the_job_back() {
    sigterm_mid_stage_finishes_it_and_gives_the_job_back(Lang::Python);
}

#[test]
fn php_worker_sigterm_mid_stage_finishes_it_and_gives_the_job_back() {
    sigterm_mid_stage_finishes_it_and_gives_the_job_back(Lang::Php);
}

/// SIGTERM with a stage longer than the grace: the job is released while
/// the stage runs, the worker exits 0, and the job runs again from that
/// stage elsewhere.
fn sigterm_past_the_grace_releases_the_job(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let id = enqueue(
        &h,
        &[
            "demo.remote",
            "--id",
            "long-1",
            "--payload",
            r#"{"n": 4, "sleep": 20}"#,
        ],
    );
    let mut a = RemoteWorker::spawn(&h, &api, lang, "grace-a", &["--grace=1"]);
    a.wait_log(&format!("stage_started job={id} stage=fetch"));
    let stopped = Instant::now();
    a.sigterm();
    a.assert_exits_0(Duration::from_secs(10));
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "the 1 s grace took {:?}",
        stopped.elapsed()
    );
    let log = a.log();
    assert!(log.contains(&format!("job_released job={id}")), "{log}");
    assert!(!log.contains("stage_completed"), "{log}");

    // Back at its queue, at fetch, its attempt not counted: another
    // worker gets it as attempt 1 (and gives it back the same way).
    let mut b = RemoteWorker::spawn(&h, &api, lang, "grace-b", &["--grace=1"]);
    b.wait_log(&format!("job_claimed job={id}"));
    let log = b.log();
    assert!(log.contains("attempt=1/3"), "{log}");
    assert!(log.contains("done_before=-"), "{log}");
    b.sigterm();
    b.assert_exits_0(Duration::from_secs(10));
    assert!(b.log().contains(&format!("job_released job={id}")));
    assert_ne!(h.job_status(&id).as_deref(), Some("failed"));
}

#[test]
fn python_worker_sigterm_past_the_grace_releases_the_job() {
    sigterm_past_the_grace_releases_the_job(Lang::Python);
}

#[test]
fn php_worker_sigterm_past_the_grace_releases_the_job() {
    sigterm_past_the_grace_releases_the_job(Lang::Php);
}

/// SIGTERM while waiting in a claim: a prompt exit 0, and the abandoned
/// claim takes no job with it.
fn sigterm_while_idle_exits_at_once_and_loses_no_job(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let mut idle = RemoteWorker::spawn(&h, &api, lang, "idle-a", &["--wait=30"]);
    idle.wait_log("worker_started");
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    idle.sigterm();
    idle.assert_exits_0(Duration::from_secs(10));
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "idle worker took {:?} to stop",
        stopped.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    let id = enqueue(&h, &["demo.remote", "--payload", r#"{"n": 5}"#]);
    let mut b = RemoteWorker::spawn(&h, &api, lang, "idle-b", &["--max-runs=1"]);
    b.assert_exits_0(LONG);
    wait_status(&h, &id, "completed");
    assert_eq!(
        h.job_ok(&id)["attempt"],
        1,
        "the abandoned claim took the job"
    );
}

#[test]
fn python_worker_sigterm_while_idle_exits_at_once_and_loses_no_job() {
    sigterm_while_idle_exits_at_once_and_loses_no_job(Lang::Python);
}

#[test]
fn php_worker_sigterm_while_idle_exits_at_once_and_loses_no_job() {
    sigterm_while_idle_exits_at_once_and_loses_no_job(Lang::Php);
}

// ---------------------------------------------------------------- 409

/// `conveyor cancel` while a stage runs: the worker's next call gets 409,
/// it drops the job and goes on with the next one.
fn a_cancelled_job_is_dropped_and_the_worker_goes_on(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(10));
    let api = h.gateway();
    let id = enqueue(
        &h,
        &[
            "demo.remote",
            "--id",
            "cancel-1",
            "--payload",
            r#"{"n": 1, "sleep": 4}"#,
        ],
    );
    let mut w = RemoteWorker::spawn(&h, &api, lang, "cancelled-a", &["--max-runs=2"]);
    w.wait_log(&format!("stage_started job={id} stage=fetch"));
    let out = h.cli(&["cancel", &id], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.wait_log(&format!("job_dropped job={id}"));
    assert!(w.log().contains("reason=cancelled"), "{}", w.log());
    wait_status(&h, &id, "cancelled");

    let next = enqueue(
        &h,
        &["demo.remote", "--payload", r#"{"n": 2, "sleep": 0.05}"#],
    );
    w.assert_exits_0(LONG);
    wait_status(&h, &next, "completed");
    assert_demo_completed(&h, &next, 2, "cancelled-a");
    assert_eq!(h.job_status(&id).as_deref(), Some("cancelled"));
}

#[test]
fn python_worker_drops_a_cancelled_job_and_goes_on() {
    a_cancelled_job_is_dropped_and_the_worker_goes_on(Lang::Python);
}

#[test]
fn php_worker_drops_a_cancelled_job_and_goes_on() {
    a_cancelled_job_is_dropped_and_the_worker_goes_on(Lang::Php);
}

// ---------------------------------------------------------------- SIGKILL

/// A worker SIGKILLed mid-stage: its lease runs out (2 s here), the
/// attempt fails as retryable, and another worker finishes the job,
/// resuming after the stages the first one completed.
fn sigkilled_worker_job_is_finished_by_another_after_its_lease(lang: Lang) {
    if !lang.available() {
        return;
    }
    let h = Harness::new(&config(2));
    let api = h.gateway();
    let id = enqueue(
        &h,
        &[
            "demo.remote",
            "--id",
            "killed-1",
            "--payload",
            r#"{"n": 4, "sleep": 3}"#,
        ],
    );
    let mut a = RemoteWorker::spawn(&h, &api, lang, "doomed-a", &[]);
    a.wait_log(&format!("stage_started job={id} stage=transform"));
    // SAFETY: signals our own child process.
    unsafe {
        libc::kill(a.child.id() as i32, libc::SIGKILL);
    }
    let _ = a.wait_exit(Duration::from_secs(5));
    let mut b = RemoteWorker::spawn(&h, &api, lang, "rescuer-b", &["--max-runs=1"]);
    b.assert_exits_0(LONG);
    wait_status(&h, &id, "completed");
    let rec = h.job_ok(&id);
    assert_eq!(rec["attempt"], 2, "{rec:#}");
    let log = b.log();
    assert!(log.contains("done_before=fetch"), "{log}");
    assert_demo_completed(&h, &id, 4, "rescuer-b");
}

#[test]
fn python_worker_sigkilled_job_is_finished_by_another_after_its_lease() {
    sigkilled_worker_job_is_finished_by_another_after_its_lease(Lang::Python);
}

#[test]
fn php_worker_sigkilled_job_is_finished_by_another_after_its_lease() {
    sigkilled_worker_job_is_finished_by_another_after_its_lease(Lang::Php);
}
