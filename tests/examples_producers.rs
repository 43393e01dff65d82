//! The producer examples of `examples/producers/` against a real Redis and
//! the real daemon: the jobs they push run, delayed ones wait in the
//! scheduled set first, and `follow.py` prints a job's progress and exits
//! when it ends.
//!
//! The shell producer always runs (redis-cli comes with redis-server). The
//! Python ones run when `python3` can `import redis`, the Node one when
//! `node` can import `redis` from `examples/producers/node_modules`;
//! otherwise those tests say they skip and pass. CI installs neither client
//! library.
//!
//! No timing is asserted: every wait is a bound, and the delayed jobs are
//! checked in the scheduled set before any daemon runs.

mod common;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{CRATE_ROOT, Harness, run_with_timeout, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default"]
heartbeat_secs = 1
promote_interval_ms = 100

[jobs.quick]
queue = "default"
stages = [{ name = "only", builtin = "noop" }]

[jobs.steps]
queue = "default"
stages = [
  { name = "nap", builtin = "sleep", args = { ms = 300 } },
  { name = "wrap_up", builtin = "noop" },
]
"#;

/// Quotes, `$`, backticks, backslashes, a semicolon and non-ASCII: what
/// string interpolation into a shell or command string would break.
const TRICKY_PAYLOAD: &str = r#"{"text":"it's \"quoted\" $HOME `id` \\ ; echo pwned ünïcødé ✓","n":[1,2.5,null,true],"nested":{"a":{}}}"#;

fn examples_dir() -> PathBuf {
    Path::new(CRATE_ROOT).join("examples/producers")
}

/// `program args...` run in `examples/producers` with none of the runner's
/// `REDIS_URL` / `CONVEYOR_*` settings.
fn example_command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("CONVEYOR_") || k_str == "REDIS_URL" {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(examples_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(args);
    cmd
}

/// Whether `program` is an executable file on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(program);
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Redis' clock in Unix ms (what the producers and daemons go by).
fn redis_time_ms(h: &Harness) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut h.redis.conn()).unwrap();
    secs * 1000 + micros / 1000
}

fn scheduled(h: &Harness) -> Vec<(Value, u64)> {
    let raw: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(format!("{}:{{default}}:scheduled", h.prefix))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut h.redis.conn())
        .unwrap();
    raw.into_iter()
        .map(|(m, s)| (serde_json::from_str(&m).expect("scheduled JSON"), s))
        .collect()
}

fn sqlite_payload(h: &Harness, id: &str) -> Option<Value> {
    let text: Option<String> =
        h.sql_query(|c| c.query_row("SELECT payload FROM jobs WHERE id = ?1", [id], |r| r.get(0)))?;
    Some(serde_json::from_str(&text?).expect("payload column is JSON"))
}

/// One enqueue example, run as `program [script] args...`.
struct Producer {
    /// Short name for ids and messages.
    name: &'static str,
    program: String,
    script: Option<&'static str>,
    /// Whether it refuses a PAYLOAD that is not JSON (the shell one only
    /// can when jq is installed).
    checks_json: bool,
}

impl Producer {
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all: Vec<&str> = self.script.iter().copied().collect();
        all.extend_from_slice(args);
        let mut cmd = example_command(&self.program, &all);
        cmd.envs(env.iter().copied());
        run_with_timeout(cmd, LONG)
    }

    fn run_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(args, env);
        assert!(
            out.status.success(),
            "{} {args:?} failed ({:?}): {}",
            self.name,
            out.status,
            stderr(&out)
        );
        stdout(&out)
    }
}

/// What every producer must do: push now (options as flags, then as
/// environment variables with a generated id), push later with `--delay`
/// (checked in the scheduled set before a daemon runs), refuse bad input;
/// then a daemon runs all of them.
fn exercise(p: &Producer) {
    let h = Harness::new(CONFIG);
    let url = h.redis.url();
    let pending = h.pending_key("default");

    // 1. Flags, an explicit id and a payload full of quoting traps.
    let now_id = format!("{}-now", p.name);
    let printed = p.run_ok(
        &[
            "--redis-url",
            &url,
            "--prefix",
            &h.prefix,
            "--id",
            &now_id,
            "quick",
            TRICKY_PAYLOAD,
        ],
        &[],
    );
    assert_eq!(printed, now_id);
    let payload: Value = serde_json::from_str(TRICKY_PAYLOAD).unwrap();
    assert_eq!(
        h.lrange_json(&pending),
        vec![json!({"id": now_id, "type": "quick", "payload": payload})]
    );

    // 2. REDIS_URL / CONVEYOR_PREFIX, a generated id, no payload.
    let generated = p.run_ok(
        &["quick"],
        &[("REDIS_URL", &url), ("CONVEYOR_PREFIX", &h.prefix)],
    );
    assert!(
        !generated.is_empty() && !generated.contains(char::is_whitespace),
        "generated id {generated:?}"
    );
    assert_ne!(generated, now_id);
    let jobs = h.lrange_json(&pending);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(
        jobs[0],
        json!({"id": generated, "type": "quick", "payload": null})
    );

    // 3. --delay: in the scheduled set, due one second after Redis' clock
    //    at the time of the push (no daemon runs yet, so it stays there).
    let later_id = format!("{}-later", p.name);
    let before = redis_time_ms(&h);
    let printed = p.run_ok(
        &[
            "--redis-url",
            &url,
            "--prefix",
            &h.prefix,
            "--delay",
            "1",
            "--id",
            &later_id,
            "quick",
            r#"{"when":"later"}"#,
        ],
        &[],
    );
    let after = redis_time_ms(&h);
    assert_eq!(printed, later_id);
    let zset = scheduled(&h);
    assert_eq!(zset.len(), 1, "{zset:?}");
    assert_eq!(
        zset[0].0,
        json!({"id": later_id, "type": "quick", "payload": {"when": "later"}})
    );
    let due = zset[0].1;
    assert!(
        (before + 1000..=after + 1000).contains(&due),
        "due {due} not one second after Redis' TIME ({before}..{after})"
    );
    assert_eq!(h.llen(&pending), 2, "a delayed job is not pending");

    // 4. Bad input is refused before anything is pushed.
    let not_json = [
        "--redis-url",
        &url,
        "--prefix",
        &h.prefix,
        "quick",
        "{not json",
    ];
    let bad_delay = [
        "--redis-url",
        &url,
        "--prefix",
        &h.prefix,
        "--delay",
        "soon",
        "quick",
    ];
    let bad_id = [
        "--redis-url",
        &url,
        "--prefix",
        &h.prefix,
        "--id",
        "a b",
        "quick",
    ];
    let no_type = ["--redis-url", &url, "--prefix", &h.prefix];
    let mut bad_calls = vec![&bad_delay[..], &bad_id[..], &no_type[..]];
    if p.checks_json {
        bad_calls.push(&not_json[..]);
    }
    for bad in bad_calls {
        let out = p.run(bad, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{} {bad:?}: {}",
            p.name,
            stderr(&out)
        );
    }
    assert_eq!(h.llen(&pending), 2);
    assert_eq!(scheduled(&h).len(), 1);

    // 5. A daemon runs all three; the payload arrives intact.
    let mut daemon = h.daemon("w1", &[]);
    for id in [&now_id, &generated, &later_id] {
        wait_until(LONG, &format!("{} job {id} completes", p.name), || {
            h.job_status(id).as_deref() == Some("completed")
        });
    }
    assert_eq!(sqlite_payload(&h, &now_id), Some(payload));
    assert_eq!(
        sqlite_payload(&h, &later_id),
        Some(json!({"when": "later"}))
    );
    assert!(scheduled(&h).is_empty());
    daemon.sigterm();
    daemon.wait_exit(LONG);
}

// ---------------------------------------------------------------- shell

#[test]
fn shell_producer_enqueues_now_and_later() {
    exercise(&Producer {
        name: "sh",
        program: examples_dir()
            .join("enqueue.sh")
            .to_string_lossy()
            .into_owned(),
        script: None,
        checks_json: on_path("jq"),
    });
}

#[test]
fn shell_producer_reports_a_redis_error() {
    let h = Harness::new(CONFIG);
    // The pending key holds a string: redis-cli prints WRONGTYPE and exits
    // 0; the script must notice.
    let _: () = redis::cmd("SET")
        .arg(h.pending_key("default"))
        .arg("not a list")
        .query(&mut h.redis.conn())
        .unwrap();
    let script = examples_dir().join("enqueue.sh");
    let cmd = example_command(
        &script.to_string_lossy(),
        &[
            "--redis-url",
            &h.redis.url(),
            "--prefix",
            &h.prefix,
            "quick",
        ],
    );
    let out = run_with_timeout(cmd, LONG);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("WRONGTYPE"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "no id printed for a job not enqueued");
}

// ---------------------------------------------------------------- python

/// `python3` when it can import redis-py; otherwise says why the test skips.
fn python_with_redis(test: &str) -> Option<String> {
    let found = on_path("python3")
        && run_with_timeout(example_command("python3", &["-c", "import redis"]), LONG)
            .status
            .success();
    if !found {
        eprintln!("{test}: skipping: python3 with redis-py not found (pip install redis)");
        return None;
    }
    Some("python3".into())
}

#[test]
fn python_producer_enqueues_now_and_later() {
    let Some(python) = python_with_redis("python_producer_enqueues_now_and_later") else {
        return;
    };
    exercise(&Producer {
        name: "py",
        program: python,
        script: Some("enqueue.py"),
        checks_json: true,
    });
}

/// `follow.py` running in the background, its output in files; killed on
/// drop.
struct Follower {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

impl Follower {
    /// Starts `follow.py args...` and waits until Redis counts its
    /// subscription to `channel`.
    fn start(h: &Harness, python: &str, args: &[&str], channel: &str) -> Self {
        let tag = common::random_hex();
        let out = h.path(&format!("follow-{tag}.out"));
        let err = h.path(&format!("follow-{tag}.err"));
        let mut all = vec!["follow.py"];
        all.extend_from_slice(args);
        let child = example_command(python, &all)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("start follow.py");
        let mut f = Follower {
            child,
            out,
            err,
            status: None,
        };
        wait_until(LONG, "follow.py subscribes", || {
            assert!(
                f.child.try_wait().unwrap().is_none(),
                "follow.py exited before subscribing: {}",
                f.stderr()
            );
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query(&mut h.redis.conn())
                .unwrap();
            counts.first().is_some_and(|(_, n)| *n >= 1)
        });
        f
    }

    /// Waits for the exit, killing it (and failing) after `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "follow.py did not exit within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn python_follower_prints_a_jobs_progress_until_it_completes() {
    let Some(python) =
        python_with_redis("python_follower_prints_a_jobs_progress_until_it_completes")
    else {
        return;
    };
    let h = Harness::new(CONFIG);
    let url = h.redis.url();
    let mut daemon = h.daemon("w1", &[]);
    let id = "followed-1";

    let mut follower = Follower::start(
        &h,
        &python,
        &[
            "--redis-url",
            &url,
            "--prefix",
            &h.prefix,
            "--timeout",
            "60",
            id,
        ],
        &format!("{}:progress:{id}", h.prefix),
    );
    let producer = Producer {
        name: "py",
        program: python.clone(),
        script: Some("enqueue.py"),
        checks_json: true,
    };
    let printed = producer.run_ok(
        &[
            "--redis-url",
            &url,
            "--prefix",
            &h.prefix,
            "--id",
            id,
            "steps",
            r#"{"n":1}"#,
        ],
        &[],
    );
    assert_eq!(printed, id);

    let status = follower.wait(Duration::from_secs(90));
    let out = follower.stdout();
    assert!(
        status.success(),
        "follow.py exited {status:?}; stdout:\n{out}\nstderr:\n{}",
        follower.stderr()
    );
    assert!(
        follower.stderr().contains("following"),
        "{}",
        follower.stderr()
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("{id} "))),
        "{out}"
    );
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with(&format!("{id} running job_started "))),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{id} running stage_started ")) && l.contains(" nap")),
        "{out}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with(&format!("{id} completed job_completed 100.0% "))),
        "{out}"
    );
    assert_eq!(h.job_status(id).as_deref(), Some("completed"));
    daemon.sigterm();
    daemon.wait_exit(LONG);
}

/// `follow.py`'s ordering rule on hand-made messages: repeats and late
/// messages of one run are skipped, a new run (attempt) starts over, and a
/// failed job ends the follower with 1.
#[test]
fn python_follower_skips_repeats_and_late_messages() {
    let Some(python) = python_with_redis("python_follower_skips_repeats_and_late_messages") else {
        return;
    };
    let h = Harness::new(CONFIG);
    let url = h.redis.url();
    let message = |id: &str, attempt: u32, seq: u64, status: &str, event: &str, text: &str| {
        json!({
            "job_id": id, "type": "steps", "queue": "default", "status": status,
            "event": event, "stage": "nap", "stage_index": 0, "stages_total": 2,
            "progress": seq as f64, "attempt": attempt, "worker_id": "w1",
            "message": text, "ts": "2026-11-23T00:00:00Z", "seq": seq,
        })
        .to_string()
    };
    let publish = |id: &str, body: &str| {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{}:progress:{id}", h.prefix))
            .arg(body)
            .query(&mut h.redis.conn())
            .unwrap();
    };

    let id = "hand-made";
    let mut follower = Follower::start(
        &h,
        &python,
        &[
            "--redis-url",
            &url,
            "--prefix",
            &h.prefix,
            "--timeout",
            "60",
            id,
        ],
        &format!("{}:progress:{id}", h.prefix),
    );
    for body in [
        message(id, 1, 1, "running", "job_started", "one"),
        message(id, 1, 2, "running", "progress", "two"),
        message(id, 1, 2, "running", "progress", "REPEAT"),
        message(id, 1, 1, "running", "progress", "LATE"),
        "not json".to_owned(),
        message(id, 1, 3, "retrying", "job_retrying", "three\nnewline"),
        message(id, 2, 1, "running", "job_started", "again"),
        message(id, 2, 2, "failed", "job_failed", "boom"),
    ] {
        publish(id, &body);
    }
    let status = follower.wait(Duration::from_secs(60));
    let out = follower.stdout();
    assert_eq!(status.code(), Some(1), "failed job: exit 1; stdout:\n{out}");
    let texts: Vec<&str> = out
        .lines()
        .map(|l| l.rsplit_once("nap ").map(|(_, t)| t).unwrap_or(l))
        .collect();
    assert_eq!(
        texts,
        ["one", "two", "three newline", "again", "boom"],
        "{out}"
    );
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l == "hand-made running job_started 1.0% nap one"),
        "{out}"
    );
}

// ---------------------------------------------------------------- node

#[test]
fn node_producer_enqueues_now_and_later() {
    let found = on_path("node")
        && run_with_timeout(
            example_command(
                "node",
                &["--input-type=module", "-e", "await import('redis')"],
            ),
            LONG,
        )
        .status
        .success();
    if !found {
        eprintln!(
            "node_producer_enqueues_now_and_later: skipping: node with the `redis` package not \
             found (cd examples/producers && npm install)"
        );
        return;
    }
    exercise(&Producer {
        name: "node",
        program: "node".into(),
        script: Some("enqueue.mjs"),
        checks_json: true,
    });
}
