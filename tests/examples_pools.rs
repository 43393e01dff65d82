//! `examples/pools/run.sh`, the GPU-pool example of docs/operations.md, run
//! as a user runs it, against a private `redis-server` and the binary under
//! test (`CONVEYOR_BIN`): its job completes, `video_gen` runs on `gpu-1` in
//! pool `gpu` and the other stages on `cpu-1` in pool `default`, as the
//! script prints it from a third host and as the job record in Redis says;
//! both daemons stop with exit 0, no process it started is left, nothing of
//! the job waits in Redis, and its temp dir is gone. Without Redis, it
//! stops at once saying what to start.
//!
//! Every process the script starts inherits a marker variable: the test
//! finds them in `/proc/*/environ`, and kills any left over (also when an
//! assertion fails) so that a failure leaks nothing. No timing is asserted:
//! the run is bounded by a timeout.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{BIN, CRATE_ROOT, TestRedis, free_port, random_hex, run_with_timeout};
use serde_json::Value;

/// The example's key prefix.
const PREFIX: &str = "conveyor-pools-demo";
/// A bound on one run (about 5 s here: 4 stages of 4 short steps).
const RUN_BOUND: Duration = Duration::from_secs(60);

/// The processes whose environment holds `POOLS_EXAMPLE_RUN=<marker>`:
/// everything one run of the script started. Dropping it SIGKILLs them.
struct Descendants {
    marker: String,
}

impl Descendants {
    fn new() -> Self {
        Self {
            marker: format!("POOLS_EXAMPLE_RUN={}", random_hex()),
        }
    }

    /// The live processes carrying the marker, with their command lines.
    fn live(&self) -> Vec<(i32, String)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            if env.split(|&b| b == 0).any(|v| v == self.marker.as_bytes()) {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                found.push((pid, cmd));
            }
        }
        found
    }
}

impl Drop for Descendants {
    fn drop(&mut self) {
        for (pid, _) in self.live() {
            // SAFETY: a plain kill(2) of a process this test's script started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `bash examples/pools/run.sh` with `redis_url`, the binary under
/// test, short demo stages, `TMPDIR=tmpdir`, and none of the runner's
/// `CONVEYOR_*` settings.
fn run_example(redis_url: &str, tmpdir: &Path, marker: &Descendants) -> Output {
    let script = Path::new(CRATE_ROOT).join("examples/pools/run.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONVEYOR_") {
            cmd.env_remove(&k);
        }
    }
    let (name, value) = marker.marker.split_once('=').expect("NAME=value");
    cmd.env(name, value)
        .env("CONVEYOR_BIN", BIN)
        .env("CONVEYOR_REDIS_URL", redis_url)
        .env("DEMO_STAGE_SLEEP", "0.05")
        .env("POOLS_DEMO_WAIT", "40")
        .env("TMPDIR", tmpdir)
        .current_dir(std::env::temp_dir());
    run_with_timeout(cmd, RUN_BOUND)
}

/// The job id from the script's `enqueued video.generate job <id>;` line.
fn job_id(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once("enqueued video.generate job "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no 'enqueued' line:\n{stderr}"));
    line.split(';').next().unwrap_or(line).trim().to_owned()
}

/// The stage lines of `conveyor job ID` as the script printed it: name,
/// status and the bracketed `worker, pool P`.
fn stage_lines(stdout: &str) -> Vec<(String, String, String)> {
    let job = stdout
        .split_once("$ conveyor job ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no 'conveyor job' output:\n{stdout}"));
    let stages = job
        .split_once("\nstages\n")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no stages in the job's output:\n{job}"));
    stages
        .lines()
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next().unwrap_or_default().to_owned();
            let status = words.next().unwrap_or_default().to_owned();
            let host = l
                .split_once('[')
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(inside, _)| inside.to_owned())
                .unwrap_or_default();
            (name, status, host)
        })
        .collect()
}

/// What the job record in Redis says of stage `i`.
fn record_stage(redis: &TestRedis, id: &str, i: usize) -> Value {
    let key = format!("{PREFIX}:{{default}}:job:{id}");
    let raw: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("stage:{i}"))
        .query(&mut redis.conn())
        .unwrap();
    let raw = raw.unwrap_or_else(|| panic!("no field stage:{i} in {key}"));
    serde_json::from_str(&raw).expect("a stage field is JSON")
}

const EXPECTED: [(&str, &str); 4] = [
    ("script_gen", "cpu-1, pool default"),
    ("voice_gen", "cpu-1, pool default"),
    ("video_gen", "gpu-1, pool gpu"),
    ("compositing", "cpu-1, pool default"),
];

/// The entries of the script's temp-dir parent (its temp dir must be gone).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn the_gpu_pool_example_runs_each_stage_in_its_pool_and_cleans_up() {
    let redis = TestRedis::start();
    let tmpdir = tempfile::tempdir().unwrap();
    let started = Descendants::new();
    let out = run_example(&redis.url(), tmpdir.path(), &started);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let both = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{:?}\n{both}", out.status);

    // Nothing it started runs on, and its temp dir is gone.
    let left = started.live();
    assert!(left.is_empty(), "left running: {left:?}\n{both}");
    assert_eq!(entries(tmpdir.path()), Vec::<PathBuf>::new(), "{both}");
    for host in ["cpu-1", "gpu-1"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!("{host} (pid ")) && l.ends_with("stopped (exit 0)")),
            "{host} did not stop with exit 0\n{both}"
        );
    }

    // The job completed, followed by `conveyor watch`.
    let id = job_id(&stderr);
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(&id) && l.contains("completed") && l.ends_with("job_completed")),
        "no job_completed line for {id}\n{both}"
    );

    // `conveyor job ID` on the third host: each stage with its daemon and pool.
    let got = stage_lines(&stdout);
    let want: Vec<(String, String, String)> = EXPECTED
        .iter()
        .map(|(name, host)| (name.to_string(), "completed".into(), host.to_string()))
        .collect();
    assert_eq!(got, want, "{both}");

    // The record in Redis agrees, and is where the printed result came from.
    for (i, (name, host)) in EXPECTED.iter().enumerate() {
        let stage = record_stage(&redis, &id, i);
        let (worker, pool) = host.split_once(", pool ").unwrap();
        assert_eq!(stage["name"], *name, "{stage}");
        assert_eq!(stage["status"], "completed", "{stage}");
        assert_eq!(stage["worker_id"], worker, "{stage}");
        assert_eq!(stage["pool"], pool, "{stage}");
    }
    let last = record_stage(&redis, &id, 3);
    assert_eq!(last["result"]["output"], format!("out/{id}.mp4"), "{last}");
    let hget = format!("$ redis-cli HGET '{PREFIX}:{{default}}:job:{id}' stage:3");
    if let Some((_, after)) = stdout.split_once(&hget) {
        let answer = after.lines().nth(1).unwrap_or_default();
        let printed: Value = serde_json::from_str(answer)
            .unwrap_or_else(|e| panic!("HGET's answer {answer:?} is not JSON: {e}\n{both}"));
        assert_eq!(printed, last, "{both}");
    } else {
        // Without redis-cli the script prints `conveyor job --json` instead.
        assert!(
            stdout.contains("conveyor job --json"),
            "neither HGET nor --json\n{both}"
        );
    }

    // Nothing of the job waits in Redis, and no daemon is registered.
    let mut conn = redis.conn();
    for list in ["pending", "pool:gpu", "pool:default"] {
        let len: u64 = redis::cmd("LLEN")
            .arg(format!("{PREFIX}:{{default}}:{list}"))
            .query(&mut conn)
            .unwrap();
        assert_eq!(len, 0, "{list}");
    }
    let workers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:worker:*"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(workers, Vec::<String>::new());
}

#[test]
fn without_redis_the_example_stops_at_once_saying_what_to_start() {
    let tmpdir = tempfile::tempdir().unwrap();
    let started = Descendants::new();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let out = run_example(&url, tmpdir.path(), &started);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no Redis answers at {url}")),
        "{stderr}"
    );
    assert!(stderr.contains("./run_worker.sh --demo"), "{stderr}");
    assert!(started.live().is_empty());
    assert_eq!(entries(tmpdir.path()), Vec::<PathBuf>::new());
}
