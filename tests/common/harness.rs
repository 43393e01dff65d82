//! What one test owns — its Redis, temp dir, key prefix, SQLite path and
//! config file — with the daemons and CLI calls made through it, and the
//! config snippets tests write.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::daemon::base_command;
use super::{Daemon, TestRedis, run_with_timeout, unique_prefix};

/// Everything one test owns: its Redis, temp dir, key prefix, SQLite path
/// and config file.
pub struct Harness {
    pub redis: TestRedis,
    pub dir: TempDir,
    pub prefix: String,
    pub db: PathBuf,
    pub config: PathBuf,
}

/// How many refused starts [`Harness::restart_daemon`] accepts.
const MAX_REFUSED_STARTS: usize = 10;

impl Harness {
    /// A harness whose config file holds `config_toml`.
    pub fn new(config_toml: &str) -> Self {
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().expect("temp dir");
        Self::around(redis, dir, config_toml)
    }

    /// A harness whose Redis gets extra server arguments (AOF on, say) and
    /// keeps its files in the temp dir (`redis/`), with the daemon logs, so
    /// that [`Harness::keep_dir`] keeps them too.
    pub fn with_redis_args(config_toml: &str, redis_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let redis = TestRedis::start_in(&dir.path().join("redis"), redis_args);
        Self::around(redis, dir, config_toml)
    }

    fn around(redis: TestRedis, dir: TempDir, config_toml: &str) -> Self {
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

    /// Leaves the temp dir (logs, SQLite, config, a `with_redis_args`
    /// Redis's files) in place when the harness is dropped; its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_owned()
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

    /// Starts a daemon as `worker_id` after a crash — the crashed one's id
    /// or a new one — waiting `timeout` for each start, and starting again
    /// a second after a refused one (the killed process's registration may
    /// still be judged live). `on_refused(n, why)` hears of each refusal;
    /// panics after 10. Returns the daemon and the number of refusals.
    pub fn restart_daemon(
        &self,
        worker_id: &str,
        extra_env: &[(&str, &str)],
        timeout: Duration,
        mut on_refused: impl FnMut(usize, &str),
    ) -> (Daemon, usize) {
        let mut refused = 0;
        loop {
            let mut next = self.spawn_daemon(worker_id, &[], extra_env);
            match next.wait_started_within(timeout) {
                Ok(()) => return (next, refused),
                Err(why) => {
                    refused += 1;
                    on_refused(refused, &why);
                    assert!(
                        refused < MAX_REFUSED_STARTS,
                        "{worker_id} could not be restarted {MAX_REFUSED_STARTS} times"
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
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

// ------------------------------------------------------------ config

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
