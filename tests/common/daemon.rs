//! The `conveyor` binary as a child process: a worker daemon with its log
//! file, its signals, crash and restart, or a one-shot command run to the
//! end; and `/proc` reads to find the process groups of a daemon's stages.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, CRATE_ROOT, random_hex};

/// How long [`Daemon::start`] waits for `worker_started`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The real binary running `conveyor worker`, killed on drop. Its stderr
/// (JSON logs) goes to a file; the log is printed when a test panics.
pub struct Daemon {
    child: Child,
    pub worker_id: String,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

/// Why a daemon did not log `worker_started`.
enum NotStarted {
    Exited,
    TimedOut,
}

/// Environment every spawned `conveyor` gets, with any `CONVEYOR_*` of the
/// test runner's own environment removed first.
pub(super) fn base_command(redis_url: &str, prefix: &str, db: &Path) -> Command {
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

    /// Starts the daemon without waiting for it to be ready. Its log file
    /// sits next to `db`, numbered in start order (a restarted id gets a
    /// new file, the killed instance's stays).
    pub fn spawn(
        redis_url: &str,
        prefix: &str,
        db: &Path,
        config: &Path,
        worker_id: &str,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Self {
        static SPAWNED: AtomicU64 = AtomicU64::new(0);
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed) + 1;
        let log_dir = db.parent().expect("db path has a directory");
        let log_path = log_dir.join(format!("worker-{n:03}-{worker_id}-{}.log", random_hex()));
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
        match self.poll_started(START_TIMEOUT) {
            Ok(()) => {}
            Err(NotStarted::Exited) => panic!(
                "daemon {} exited ({:?}) before it started; log:\n{}",
                self.worker_id,
                self.exited,
                self.log()
            ),
            Err(NotStarted::TimedOut) => panic!(
                "daemon {} did not log worker_started within 15 s; log:\n{}",
                self.worker_id,
                self.log()
            ),
        }
    }

    /// Waits for `worker_started`; `Err` (with the log's last lines) when
    /// the process exited first or `timeout` passed. For tests that retry
    /// a refused start instead of failing.
    pub fn wait_started_within(&mut self, timeout: Duration) -> Result<(), String> {
        match self.poll_started(timeout) {
            Ok(()) => Ok(()),
            Err(NotStarted::Exited) => Err(format!(
                "{} exited ({:?}) before it started:\n{}",
                self.worker_id,
                self.exited,
                self.log_tail(20)
            )),
            Err(NotStarted::TimedOut) => Err(format!(
                "{} did not start within {timeout:?}:\n{}",
                self.worker_id,
                self.log_tail(20)
            )),
        }
    }

    fn poll_started(&mut self, timeout: Duration) -> Result<(), NotStarted> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains("\"worker_started\"") {
                return Ok(());
            }
            if self.has_exited() {
                return Err(NotStarted::Exited);
            }
            if Instant::now() >= deadline {
                return Err(NotStarted::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` unless the process was reaped already.
    pub fn signal(&self, sig: i32) {
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

    /// SIGKILLs the process and reaps it; its exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.sigkill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// A crash of the whole service: freeze the daemon, run `probe` (it
    /// cannot change anything meanwhile), SIGKILL it and the process groups
    /// of its running stages (as systemd's cgroup kill would), reap it.
    /// Returns the probe's value and the number of stage groups killed.
    pub fn crash<T>(&mut self, probe: impl FnOnce() -> T) -> (T, usize) {
        let pid = self.pid();
        self.signal(libc::SIGSTOP);
        let value = probe();
        let stages = children_of(pid);
        self.signal(libc::SIGKILL);
        let mut groups = 0;
        for child in stages {
            // Each stage leads its own group; only those are killed.
            if process_group(child) == Some(child) {
                // SAFETY: a stage group our daemon started.
                unsafe {
                    libc::killpg(child, libc::SIGKILL);
                }
                groups += 1;
            }
        }
        self.exited = Some(self.child.wait().expect("wait for the killed daemon"));
        (value, groups)
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
        match self.try_wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "daemon {} did not exit within {timeout:?}; log:\n{}",
                self.worker_id,
                self.log()
            ),
        }
    }

    /// Waits for the exit; `None` after `timeout` (the process runs on).
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The log file (it outlives the process).
    pub fn log_path(&self) -> &Path {
        &self.log_path
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

// ---------------------------------------------------------------- /proc

/// Fields of `/proc/<pid>/stat` after the command name: ppid, pgrp.
fn proc_stat(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// The process group of `pid`, while it lives.
pub fn process_group(pid: i32) -> Option<i32> {
    proc_stat(pid).map(|(_, pgrp)| pgrp)
}

/// The pids whose parent is `parent`.
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect()
}

// ---------------------------------------------------------------- commands

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
