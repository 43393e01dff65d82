//! Shared harness of the integration tests: a private Redis per test, the
//! real `conveyor` binary as a daemon or a command, a progress subscriber and
//! small polling helpers. Every test gets its own Redis, temp dir and key
//! prefix, so the tests run in parallel.

#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_conveyor");
/// The crate root: daemons run there so `examples/stages/*.sh` resolve.
pub const CRATE_ROOT: &str = env!("CARGO_MANIFEST_DIR");

// ---------------------------------------------------------------- polling

/// Polls `cond` every 25 ms until it holds or `timeout` passes; returns
/// whether it held. Ends as soon as the condition is true.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`poll_until`], but panics with `what` when the time is up.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut out = None;
    wait_until(timeout, what, || {
        out = f();
        out.is_some()
    });
    out.expect("set when the wait succeeded")
}

/// A random hex string (std's `RandomState` is randomly seeded per process,
/// mixed with a counter, the pid and the time).
pub fn random_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// A key prefix of its own for one test.
pub fn unique_prefix() -> String {
    format!("t{}", random_hex())
}

// ---------------------------------------------------------------- Redis

/// A private `redis-server` on a free loopback port, killed on drop.
pub struct TestRedis {
    child: Child,
    port: u16,
    dir: TempDir,
    /// Extra `redis-server` arguments (after the defaults, so they win),
    /// reused by [`TestRedis::start_again`].
    args: Vec<String>,
}

/// Starts `redis-server` on `port` with its files in `dir`; output appended
/// to `dir/redis.log`.
fn spawn_redis(port: u16, dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .expect("redis log file");
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start redis-server (is it installed?)")
}

impl TestRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`TestRedis::start`], with extra server arguments, e.g.
    /// `["--appendonly", "yes"]` for a Redis that can be restarted without
    /// losing its data ([`TestRedis::restart`]).
    pub fn start_with(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for redis");
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
                l.local_addr().expect("local addr").port()
            };
            let log_path = dir.path().join("redis.log");
            let child = spawn_redis(port, dir.path(), &args);
            let mut redis = TestRedis {
                child,
                port,
                dir,
                args: args.clone(),
            };
            if redis.wait_ready(Duration::from_secs(5)) {
                return redis;
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Drop kills it; try another port (someone took this one).
        }
        panic!("redis-server did not start after 5 tries; last log:\n{last_log}");
    }

    /// Waits until PING answers; false when the server exited or the time
    /// ran out.
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let client = redis::Client::open(self.url()).expect("redis url");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    /// A new blocking connection, for inspection and raw pushes.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the server (e.g. SIGSTOP / SIGCONT to pause it).
    pub fn signal(&self, sig: i32) {
        // SAFETY: sends a signal to our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILLs the server and reaps it (its port and files stay ours).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, with the same directory
    /// (so an AOF is reloaded) and arguments; waits until it answers.
    pub fn start_again(&mut self) {
        self.child = spawn_redis(self.port, self.dir.path(), &self.args);
        if !self.wait_ready(Duration::from_secs(15)) {
            panic!(
                "redis-server did not come back on port {}; log:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
        }
    }

    /// [`TestRedis::kill`], then [`TestRedis::start_again`] after `down`.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.start_again();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- daemon

/// The real binary running `conveyor worker`, killed on drop. Its stderr
/// (JSON logs) goes to a file; the log is printed when a test panics.
pub struct Daemon {
    child: Child,
    pub worker_id: String,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

/// Environment every spawned `conveyor` gets, with any `CONVEYOR_*` of the
/// test runner's own environment removed first.
fn base_command(redis_url: &str, prefix: &str, db: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(CRATE_ROOT)
        .env("CONVEYOR_REDIS_URL", redis_url)
        .env("CONVEYOR_PREFIX", prefix)
        .env("CONVEYOR_DB", db)
        .env("CONVEYOR_LOG_FORMAT", "json")
        .env("RUST_LOG", "conveyor=debug")
        .stdin(Stdio::null());
    cmd
}

impl Daemon {
    /// Starts `conveyor worker --config C --worker-id W` and waits until it
    /// logs `worker_started` (15 s at most).
    pub fn start(
        redis_url: &str,
        prefix: &str,
        db: &Path,
        config: &Path,
        worker_id: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let mut d = Self::spawn(redis_url, prefix, db, config, worker_id, &[], extra_env);
        d.wait_started();
        d
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn spawn(
        redis_url: &str,
        prefix: &str,
        db: &Path,
        config: &Path,
        worker_id: &str,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Self {
        let log_dir = db.parent().expect("db path has a directory");
        let log_path = log_dir.join(format!("worker-{worker_id}-{}.log", random_hex()));
        let log = File::create(&log_path).expect("daemon log file");
        let mut cmd = base_command(redis_url, prefix, db);
        cmd.arg("worker")
            .arg("--config")
            .arg(config)
            .args(["--worker-id", worker_id])
            .args(extra_args)
            .envs(extra_env.iter().copied())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn conveyor worker");
        Daemon {
            child,
            worker_id: worker_id.to_owned(),
            log_path,
            exited: None,
        }
    }

    fn wait_started(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if log.contains("\"worker_started\"") {
                return;
            }
            if self.has_exited() {
                panic!(
                    "daemon {} exited ({:?}) before it started; log:\n{log}",
                    self.worker_id, self.exited
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "daemon {} did not log worker_started within 15 s; log:\n{log}",
                    self.worker_id
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: sends a signal to our own child, not yet reaped.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn sigkill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited.is_some()
    }

    /// Waits for the exit; panics (printing the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                panic!(
                    "daemon {} did not exit within {timeout:?}; log:\n{}",
                    self.worker_id,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited.expect("exited")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The parsed JSON log lines (other lines are skipped).
    pub fn log_events(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.has_exited() {
            self.sigkill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- log of daemon {} -----\n{}\n----- end of log -----",
                self.worker_id,
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------- per test

/// Everything one test owns: its Redis, temp dir, key prefix, SQLite path
/// and config file.
pub struct Harness {
    pub redis: TestRedis,
    pub dir: TempDir,
    pub prefix: String,
    pub db: PathBuf,
    pub config: PathBuf,
}

impl Harness {
    /// A harness whose config file holds `config_toml`.
    pub fn new(config_toml: &str) -> Self {
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("conveyor.db");
        let config = dir.path().join("conveyor.toml");
        std::fs::write(&config, config_toml).expect("write config");
        Harness {
            redis,
            dir,
            prefix: unique_prefix(),
            db,
            config,
        }
    }

    /// A harness using a config file that exists already (e.g. the shipped one).
    pub fn with_config_file(config: &Path) -> Self {
        let mut h = Self::new("");
        h.config = config.to_owned();
        h
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Overwrites the config file.
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config, toml).expect("write config");
    }

    pub fn daemon(&self, worker_id: &str, extra_env: &[(&str, &str)]) -> Daemon {
        Daemon::start(
            &self.redis.url(),
            &self.prefix,
            &self.db,
            &self.config,
            worker_id,
            extra_env,
        )
    }

    pub fn spawn_daemon(
        &self,
        worker_id: &str,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::spawn(
            &self.redis.url(),
            &self.prefix,
            &self.db,
            &self.config,
            worker_id,
            extra_args,
            extra_env,
        )
    }

    /// Runs `conveyor --config C <args>` with this test's Redis, prefix and
    /// database; waits at most 30 s.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = base_command(&self.redis.url(), &self.prefix, &self.db);
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.envs(env.iter().copied());
        run_with_timeout(cmd, Duration::from_secs(30))
    }

    /// Runs `conveyor <args>` (no `--config` added) with this test's Redis,
    /// prefix and database; waits at most 30 s.
    pub fn cli_without_config(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = base_command(&self.redis.url(), &self.prefix, &self.db);
        cmd.args(args).envs(env.iter().copied());
        run_with_timeout(cmd, Duration::from_secs(30))
    }

    /// `conveyor job ID --json`, parsed; `None` when the command fails
    /// (e.g. no such job yet).
    pub fn job(&self, id: &str) -> Option<Value> {
        let out = self.cli(&["job", id, "--json"], &[]);
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("job --json is JSON"))
    }

    /// `conveyor job ID --json`; panics when the job is not there.
    pub fn job_ok(&self, id: &str) -> Value {
        let out = self.cli(&["job", id, "--json"], &[]);
        assert!(
            out.status.success(),
            "conveyor job {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("job --json is JSON")
    }

    /// The job's status in SQLite, read directly (cheaper than the CLI for
    /// polling).
    pub fn job_status(&self, id: &str) -> Option<String> {
        self.sql_query(|c| c.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0)))
    }

    /// Status of one stage of a job in SQLite.
    pub fn stage_status(&self, id: &str, stage: &str) -> Option<String> {
        self.sql_query(|c| {
            c.query_row(
                "SELECT status FROM stages WHERE job_id = ?1 AND name = ?2",
                [id, stage],
                |r| r.get(0),
            )
        })
    }

    /// Number of jobs with `status` in SQLite (0 while there is no database).
    pub fn count_status(&self, status: &str) -> u64 {
        self.sql_query(|c| {
            c.query_row(
                "SELECT count(*) FROM jobs WHERE status = ?1",
                [status],
                |r| r.get::<_, i64>(0),
            )
        })
        .unwrap_or(0) as u64
    }

    /// Ids of the jobs with `status` in SQLite.
    pub fn ids_with_status(&self, status: &str) -> std::collections::BTreeSet<String> {
        self.sql_query(|c| {
            let mut st = c.prepare("SELECT id FROM jobs WHERE status = ?1")?;
            st.query_map([status], |r| r.get::<_, String>(0))?.collect()
        })
        .unwrap_or_default()
    }

    /// Runs a read-only query; `None` when the database or row is missing.
    pub fn sql_query<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        f(&open_sqlite_read_only(&self.db)?).ok()
    }

    /// `conveyor status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"], &[]);
        assert!(
            out.status.success(),
            "conveyor status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    // Keys of the contract.
    pub fn pending_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:pending", self.prefix)
    }
    pub fn active_key(&self, queue: &str, worker: &str) -> String {
        format!("{}:{{{queue}}}:active:{worker}", self.prefix)
    }
    pub fn dead_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dead", self.prefix)
    }
    pub fn worker_key(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.prefix)
    }

    /// A whole list, left to right, as raw bytes.
    pub fn lrange(&self, key: &str) -> Vec<Vec<u8>> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut self.redis.conn())
            .expect("LRANGE")
    }

    /// A whole list, left to right, each element parsed as JSON.
    pub fn lrange_json(&self, key: &str) -> Vec<Value> {
        self.lrange(key)
            .iter()
            .map(|raw| {
                serde_json::from_slice(raw).unwrap_or_else(|e| {
                    panic!(
                        "{key} holds non-JSON {:?}: {e}",
                        String::from_utf8_lossy(raw)
                    )
                })
            })
            .collect()
    }

    pub fn llen(&self, key: &str) -> u64 {
        redis::cmd("LLEN")
            .arg(key)
            .query(&mut self.redis.conn())
            .expect("LLEN")
    }

    /// What any producer does: LPUSH one message onto a pending list.
    pub fn lpush(&self, queue: &str, message: impl AsRef<[u8]>) {
        let _: i64 = redis::cmd("LPUSH")
            .arg(self.pending_key(queue))
            .arg(message.as_ref())
            .query(&mut self.redis.conn())
            .expect("LPUSH");
    }

    /// A progress subscriber on `P:progress:*`, subscribed on return.
    pub fn subscribe(&self) -> ProgressSub {
        ProgressSub::start(&self.redis, &format!("{}:progress:*", self.prefix))
    }
}

/// Runs a command to the end, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("spawn command");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| {
        let mut v = Vec::new();
        File::open(p)
            .and_then(|mut f| f.read_to_end(&mut v))
            .expect("read output");
        v
    };
    Output {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

// ---------------------------------------------------------------- ledger

/// Lines of a ledger file written by stage scripts (empty if absent).
pub fn ledger_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many ledger lines start with `prefix` followed by a space or the end
/// (`"S s1 job1"` matches lines `S s1 job1` and `S s1 job1 <pid>`).
pub fn ledger_count(path: &Path, prefix: &str) -> usize {
    ledger_lines(path)
        .iter()
        .filter(|l| *l == prefix || l.starts_with(&format!("{prefix} ")))
        .count()
}

// ---------------------------------------------------------------- progress

/// Collects progress messages from a pattern subscription in a thread of its
/// own. The thread ends when its Redis goes away (end of the test).
pub struct ProgressSub {
    messages: Arc<Mutex<Vec<Value>>>,
}

impl ProgressSub {
    pub fn start(redis: &TestRedis, pattern: &str) -> Self {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut conn = redis.conn();
        let pattern_owned = pattern.to_owned();
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut pubsub = conn.as_pubsub();
            // Returns once the server confirmed the subscription.
            let subscribed = pubsub.psubscribe(&pattern_owned);
            let ok = subscribed.is_ok();
            let _ = ready_tx.send(subscribed.map_err(|e| e.to_string()));
            if !ok {
                return;
            }
            while let Ok(msg) = pubsub.get_message() {
                let body: Vec<u8> = match msg.get_payload() {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                    Value::String(format!(
                        "unparsable message: {}",
                        String::from_utf8_lossy(&body)
                    ))
                });
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscriber thread answered")
            .expect("PSUBSCRIBE succeeded");
        // Belt and braces: the server counts the pattern.
        let numpat: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query(&mut redis.conn())
            .expect("PUBSUB NUMPAT");
        assert!(numpat >= 1, "pattern subscription not registered");
        ProgressSub { messages }
    }

    /// Every message so far, in arrival order.
    pub fn all(&self) -> Vec<Value> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The messages of one job, in arrival order.
    pub fn for_job(&self, id: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|m| m["job_id"] == id)
            .collect()
    }

    /// Waits until a message of `id` has `status`; returns it.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("a progress message of {id} with status {status}"),
            || self.for_job(id).into_iter().find(|m| m["status"] == status),
        )
    }
}

// ------------------------------------------------ config and CLI helpers

/// A TOML basic string holding `s` (paths of the temp dir).
pub fn toml_str(s: impl AsRef<str>) -> String {
    let s = s.as_ref();
    assert!(
        s.chars().all(|c| !c.is_control()),
        "no control characters in {s:?}"
    );
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A `[[jobs.<kind>.stages]]` table of an exec stage writing the ledger:
/// `S <stage> <job id> <pid>` first, `C <stage> <job id> <pid>` last, with
/// `middle` (shell) in between. `$$` is the stage's process group too (the
/// daemon starts each stage as a group leader).
pub fn ledger_stage(kind: &str, stage: &str, ledger: &Path, middle: &str) -> String {
    format!(
        r#"
[[jobs."{kind}".stages]]
name = "{stage}"
run = ["sh", "-c", '''echo "S {stage} $CONVEYOR_JOB_ID $$" >> "$LEDGER"; cat > /dev/null; {middle} echo "C {stage} $CONVEYOR_JOB_ID $$" >> "$LEDGER"''']
env = {{ LEDGER = {ledger} }}
"#,
        ledger = toml_str(ledger.to_string_lossy())
    )
}

/// `S` (started) and `C` (completed) ledger lines per job id, over all stages.
pub fn ledger_counts(
    ledger: &Path,
) -> (
    std::collections::BTreeMap<String, usize>,
    std::collections::BTreeMap<String, usize>,
) {
    let (mut s, mut c) = (Default::default(), Default::default());
    for line in ledger_lines(ledger) {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(_), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let map: &mut std::collections::BTreeMap<String, usize> =
            if kind == "S" { &mut s } else { &mut c };
        *map.entry(id.to_owned()).or_insert(0) += 1;
    }
    (s, c)
}

/// The pid logged on a ledger line `S <stage> <id> <pid>`.
pub fn ledger_pid(ledger: &Path, prefix: &str) -> Option<i32> {
    ledger_lines(ledger)
        .iter()
        .find(|l| l.starts_with(&format!("{prefix} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|p| p.parse().ok())
}

/// `conveyor enqueue ...`; returns the printed id.
pub fn enqueue(h: &Harness, args: &[&str]) -> String {
    let mut all = vec!["enqueue"];
    all.extend_from_slice(args);
    let out = h.cli(&all, &[]);
    assert!(
        out.status.success(),
        "enqueue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).expect("utf-8 id");
    let id = id.trim().to_owned();
    assert!(!id.is_empty(), "enqueue printed no id");
    id
}

/// A read-only connection to a daemon's SQLite file (waiting up to 5 s for
/// its writers); `None` while the file does not exist.
pub fn open_sqlite_read_only(path: &Path) -> Option<rusqlite::Connection> {
    if !path.exists() {
        return None;
    }
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    Some(conn)
}

// ---------------------------------------------------------------- HTTP

/// A free loopback port (free when asked: bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// An HTTP response: status code, headers (names lowercased), body.
#[derive(Debug)]
pub struct HttpResponse {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), 10 s
/// at most; `None` when nothing answers. Chunked bodies are decoded.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<HttpResponse> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    // Read by Content-Length or chunks: some servers (chromedriver) keep
    // the connection open whatever `Connection: close` says.
    let mut reader = std::io::BufReader::new(s);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status).ok()?;
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).ok()? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v): &(String, String)| v.clone())
    };
    let mut raw = Vec::new();
    if let Some(len) = value("content-length").and_then(|v| v.parse::<usize>().ok()) {
        raw.resize(len, 0);
        reader.read_exact(&mut raw).ok()?;
    } else if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            std::io::BufRead::read_line(&mut reader, &mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    } else {
        reader.read_to_end(&mut raw).ok()?;
    }
    Some(HttpResponse {
        code,
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

/// `conveyor dashboard` as a child process, killed on drop; its stderr
/// and stdout go to a file, printed when a test panics.
pub struct DashboardProc {
    child: Child,
    pub port: u16,
    log_path: PathBuf,
}

impl DashboardProc {
    pub fn get(&self, path: &str) -> HttpResponse {
        http(self.port, "GET", path, &[], None)
            .unwrap_or_else(|| panic!("GET {path}: no answer; log:\n{}", self.log()))
    }

    /// GET, expecting 200 and JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.code, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// POST with a JSON body and, when given, a bearer token.
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http(self.port, "POST", path, &headers, Some(body))
            .unwrap_or_else(|| panic!("POST {path}: no answer; log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        // SAFETY: sends a signal to our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the exit, `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DashboardProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of the dashboard -----\n{}\n----- end of log -----",
                self.log()
            );
        }
    }
}

impl Harness {
    /// Starts `conveyor dashboard --listen 127.0.0.1:<free port>` with this
    /// test's Redis, prefix, database and config, and `token` as
    /// `CONVEYOR_DASHBOARD_TOKEN`; waits until `/api/queues` answers (15 s).
    pub fn dashboard(&self, token: Option<&str>) -> DashboardProc {
        self.dashboard_on("127.0.0.1", token)
    }

    /// [`Harness::dashboard`] on another address (`0.0.0.0`, say).
    pub fn dashboard_on(&self, host: &str, token: Option<&str>) -> DashboardProc {
        self.dashboard_with(host, token, None)
    }

    /// [`Harness::dashboard`] connecting with another Redis URL (another
    /// ACL user, say).
    pub fn dashboard_as(&self, redis_url: &str, token: Option<&str>) -> DashboardProc {
        self.dashboard_with("127.0.0.1", token, Some(redis_url))
    }

    /// [`Harness::dashboard`] serving HTTPS (the config sets `[api]
    /// tls_cert_file`): ready once it says so on stdout.
    pub fn dashboard_https(&self) -> DashboardProc {
        self.dashboard_ready("127.0.0.1", None, None, true)
    }

    fn dashboard_with(
        &self,
        host: &str,
        token: Option<&str>,
        redis_url: Option<&str>,
    ) -> DashboardProc {
        self.dashboard_ready(host, token, redis_url, false)
    }

    fn dashboard_ready(
        &self,
        host: &str,
        token: Option<&str>,
        redis_url: Option<&str>,
        https: bool,
    ) -> DashboardProc {
        let port = free_port();
        let log_path = self
            .dir
            .path()
            .join(format!("dashboard-{}.log", random_hex()));
        let log = File::create(&log_path).expect("dashboard log file");
        let mut cmd = base_command(&self.redis.url(), &self.prefix, &self.db);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("dashboard")
            .args(["--listen", &format!("{host}:{port}")])
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(t) = token {
            cmd.env("CONVEYOR_DASHBOARD_TOKEN", t);
        }
        if let Some(url) = redis_url {
            cmd.env("CONVEYOR_REDIS_URL", url);
        }
        let child = cmd.spawn().expect("spawn conveyor dashboard");
        let mut d = DashboardProc {
            child,
            port,
            log_path,
        };
        let up = poll_until(Duration::from_secs(15), || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("the dashboard exited ({status}); log:\n{}", d.log());
            }
            if https {
                d.log().contains("conveyor dashboard on https://")
            } else {
                http(port, "GET", "/api/queues", &[], None).is_some_and(|r| r.code == 200)
            }
        });
        assert!(
            up,
            "the dashboard did not answer within 15 s; log:\n{}",
            d.log()
        );
        d
    }
}

// ---------------------------------------------------------------- cluster

/// A Redis Cluster on loopback ports: `masters` masters with `replicas`
/// replicas each, made with `redis-cli --cluster create`. A node that does
/// not hear from a master for 1 s (`cluster-node-timeout`) starts a
/// failover, so a killed master's replica takes over within seconds.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
}

impl TestCluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        let nodes: Vec<TestRedis> = (0..masters * (1 + replicas))
            .map(|_| {
                TestRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = run_with_timeout(create, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_healthy(Duration::from_secs(30));
        wait_until(
            Duration::from_secs(30),
            "every master's replicas to attach",
            || {
                let attached = cluster.nodes.iter().filter_map(|n| {
                    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).ok()?;
                    match (role.first(), role.get(2)) {
                        (
                            Some(redis::Value::BulkString(r)),
                            Some(redis::Value::Array(replicas)),
                        ) if r == b"master" => Some(replicas.len()),
                        _ => None,
                    }
                });
                let counts: Vec<usize> = attached.collect();
                counts.len() == masters && counts.iter().all(|&n| n == replicas)
            },
        );
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and every master
    /// has its replicas attached.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until(timeout, "the cluster to be ok on every node", || {
            self.nodes.iter().all(|n| {
                let Ok(mut c) = n
                    .client()
                    .get_connection_with_timeout(Duration::from_secs(1))
                else {
                    return true; // a killed node
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(TestRedis::url).collect()
    }

    /// `[redis]` lines for a daemon of this cluster.
    pub fn config(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(toml_str).collect();
        format!("mode = \"cluster\"\nurls = [{}]\n", urls.join(", "))
    }

    /// A cluster connection for the test's own reads and writes.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        self.try_conn().expect("connect to the test cluster")
    }

    /// The nodes that answer (a killed one does not).
    fn live_nodes(&self) -> impl Iterator<Item = &TestRedis> {
        self.nodes.iter().filter(|n| {
            n.client()
                .get_connection_with_timeout(Duration::from_millis(300))
                .is_ok()
        })
    }

    /// A cluster connection through the nodes that answer, if they do.
    pub fn try_conn(&self) -> Option<redis::cluster::ClusterConnection> {
        let live: Vec<String> = self.live_nodes().map(TestRedis::url).collect();
        redis::cluster::ClusterClient::new(live)
            .ok()?
            .get_connection()
            .ok()
    }

    /// The index in `nodes` of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> usize {
        let live = self.live_nodes().next().expect("a live node");
        let mut c = live.conn();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut c)
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (r.first(), r.get(1))
            else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot))
                && let Some(redis::Value::Array(master)) = r.get(2)
                && let Some(redis::Value::Int(port)) = master.get(1)
            {
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port()) == *port)
                    .expect("a node of ours");
            }
        }
        panic!("no master for slot {slot}");
    }

    /// The indices of the nodes that replicate node `master` (from `ROLE`).
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut self.nodes[master].conn())
            .expect("ROLE");
        let Some(redis::Value::Array(replicas)) = role.get(2) else {
            return Vec::new();
        };
        replicas
            .iter()
            .filter_map(|r| {
                let redis::Value::Array(fields) = r else {
                    return None;
                };
                let port: u16 = redis::from_redis_value_ref::<String>(fields.get(1)?)
                    .ok()?
                    .parse()
                    .ok()?;
                self.nodes.iter().position(|n| n.port() == port)
            })
            .collect()
    }
}

// ---------------------------------------------------------------- sentinel

/// A master, one replica and three Sentinels (quorum 2) on loopback ports.
/// A master silent for 1 s (`down-after-milliseconds`) is failed over.
pub struct TestSentinels {
    pub master: TestRedis,
    pub replica: TestRedis,
    pub sentinels: Vec<(Child, u16, TempDir)>,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl TestSentinels {
    pub fn start() -> Self {
        let master = TestRedis::start();
        let port = master.port().to_string();
        let replica = TestRedis::start_with(&["--replicaof", "127.0.0.1", &port]);
        let sentinels = (0..3).map(|_| spawn_sentinel(master.port())).collect();
        let s = Self {
            master,
            replica,
            sentinels,
        };
        // Ready for a failover: the replica is in sync, and every Sentinel
        // knows it and the two other Sentinels.
        wait_until(Duration::from_secs(30), "the replica to sync", || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut s.replica.conn())
                .unwrap_or_default();
            info.contains("master_link_status:up")
        });
        wait_until(
            Duration::from_secs(60),
            "the Sentinels to know each other and the replica",
            || {
                s.sentinels.iter().all(|(_, port, _)| {
                    let Some(mut c) = sentinel_conn(*port) else {
                        return false;
                    };
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(SENTINEL_MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(SENTINEL_MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    replicas.len() == 1 && others.len() == 2
                })
            },
        );
        s
    }

    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, port, _)| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// `[redis]` lines for a daemon that finds the master through these
    /// Sentinels.
    pub fn config(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(toml_str).collect();
        format!(
            "mode = \"sentinel\"\nmaster = \"{SENTINEL_MASTER}\"\nurls = [{}]\n",
            urls.join(", ")
        )
    }

    /// The master's port as the first Sentinel that answers says.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|(_, port, _)| {
            let mut c = sentinel_conn(*port)?;
            let (_, p): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(SENTINEL_MASTER)
                .query(&mut c)
                .ok()?;
            Some(p)
        })
    }
}

impl Drop for TestSentinels {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sentinel_conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

/// `redis-server <conf> --sentinel` monitoring the master on `master_port`
/// (Sentinel rewrites its config file, so it lives in a temp dir).
fn spawn_sentinel(master_port: u16) -> (Child, u16, TempDir) {
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir for a sentinel");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 10000\n\
                 sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                dir = dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let log = File::create(dir.path().join("sentinel.log")).expect("sentinel log");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server --sentinel");
        if poll_until(Duration::from_secs(5), || sentinel_conn(port).is_some()) {
            return (child, port, dir);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no Sentinel started after 5 tries");
}

// ---------------------------------------------------------------- failover

/// Waits (2 min at most) for every job of `ids` to complete after a
/// master was killed at `killed_at`, prints one line of what the failover
/// cost (`scripts/failover.sh` collects it), and fails the test when a job
/// was lost.
pub fn report_failover(
    setup: &str,
    h: &Harness,
    ids: &[String],
    killed_at: Instant,
    promoted_after: Duration,
    ledger: &Path,
    daemons: &[&Daemon],
) {
    let done = poll_until(Duration::from_secs(120), || {
        h.count_status("completed") as usize >= ids.len()
    });
    let done_after = killed_at.elapsed();
    let finished = h.ids_with_status("completed");
    let lost: Vec<&String> = ids.iter().filter(|id| !finished.contains(*id)).collect();
    let (starts, completions) = ledger_counts(ledger);
    let reruns: usize = starts.values().map(|n| n.saturating_sub(1)).sum();
    let twice: usize = completions.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!(
        "{setup} failover: {} jobs, replica promoted {promoted_after:?} after the kill, all \
         done {done_after:?} after it: lost {}, stage re-runs {reruns}, stage completed twice \
         {twice}",
        ids.len(),
        lost.len()
    );
    let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
    assert!(
        done && lost.is_empty(),
        "lost {} jobs: {:?}\n{}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>(),
        logs.join("\n")
    );
}
