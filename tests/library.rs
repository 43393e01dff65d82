//! The Rust library API against a real private Redis: `Client` (enqueue,
//! cancel, look up), `Worker::builder` with Rust stages, in-process, and
//! the `rust_stage` example program.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{TestRedis, toml_str, unique_prefix};
use conveyor::{
    BoxFuture, Cancelled, Client, ClientError, Config, EnqueueRequest, JobInfo, Stage,
    StageContext, StageError, Status, Worker, WorkerError,
};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest wait for anything in these tests.
const WAIT: Duration = Duration::from_secs(30);

/// A config for one test: its Redis and prefix, SQLite in `dir`, quick
/// fetch and heartbeat, and the given `[jobs]` tables.
fn config(redis: &TestRedis, prefix: &str, dir: &Path, jobs: &str) -> Config {
    let toml = format!(
        r#"
[redis]
url = {url}
prefix = {prefix}

[worker]
id = "lib-{id}"
concurrency = 2
fetch_block_ms = 100
promote_interval_ms = 100
heartbeat_secs = 1
dead_after_secs = 5
shutdown_grace_secs = 5
kill_grace_secs = 1

[store]
path = {db}

{jobs}
"#,
        url = toml_str(redis.url()),
        prefix = toml_str(prefix),
        id = prefix,
        db = toml_str(db_path(dir).to_string_lossy()),
    );
    Config::from_toml(&toml).expect("test config parses")
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("conveyor.db")
}

/// Returns `{"words": n}` for `payload.text`, reporting progress; counts
/// its runs.
#[derive(Clone, Default)]
struct WordCount {
    runs: Arc<AtomicUsize>,
}

impl Stage for WordCount {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let Some(text) = ctx.payload["text"].as_str() else {
                return Err(StageError::permanent("payload.text must be a string"));
            };
            ctx.progress(50.0, Some("counting".into()));
            Ok(json!({ "words": text.split_whitespace().count() }))
        })
    }
}

/// Reads the result of the stage before it (`echo`, the payload).
struct Shout;

impl Stage for Shout {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let text = ctx.results["echo"]["text"].as_str().unwrap_or_default();
            Ok(json!(text.to_uppercase()))
        })
    }
}

/// Runs until cancelled.
#[derive(Clone, Default)]
struct Forever {
    started: Arc<AtomicUsize>,
}

impl Stage for Forever {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            ctx.cancel.cancelled().await;
            Err(StageError::interrupted())
        })
    }
}

struct Panics;

impl Stage for Panics {
    fn run<'a>(&'a self, _: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move { panic!("this stage always panics") })
    }
}

/// A worker running in this process, stopped (and checked) by `stop`.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl Running {
    fn start(worker: Worker) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let ended = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker drains within 30 s");
        ended.expect("worker task").expect("worker ran");
    }
}

/// Polls the client until the job is in a final state (30 s at most).
async fn wait_final(client: &Client, id: &str) -> JobInfo {
    wait_status(client, id, |s| s.is_final()).await
}

async fn wait_status(client: &Client, id: &str, want: impl Fn(Status) -> bool) -> JobInfo {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        let info = client.job(id).await.expect("job lookup");
        if let Some(info) = &info
            && want(info.status)
        {
            return info.clone();
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out waiting on job {id}; last seen: {:?}",
                info.or(last)
            );
        }
        last = info;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `cond` holds (30 s at most).
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn client_enqueues_now_later_and_once() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let client = Client::connect(&redis.url(), &prefix)
        .await
        .expect("connect");
    let mut conn = redis.conn();
    let pending = format!("{prefix}:{{default}}:pending");
    let scheduled = format!("{prefix}:{{default}}:scheduled");

    let now = client
        .enqueue(EnqueueRequest::new("video.generate").payload(json!({"video_id": 123})))
        .await
        .expect("enqueue now");
    assert!(now.added);
    assert_eq!(
        (now.queue.as_str(), now.status),
        ("default", Status::Pending)
    );
    assert_eq!(now.due, None);
    let listed: Vec<String> = redis::cmd("LRANGE")
        .arg(&pending)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("LRANGE");
    assert_eq!(listed.len(), 1);
    let job: Value = serde_json::from_str(&listed[0]).expect("job JSON");
    assert_eq!(job["id"], now.id.as_str());
    assert_eq!(job["type"], "video.generate");
    assert_eq!(job["payload"], json!({"video_id": 123}));

    let later = client
        .enqueue(
            EnqueueRequest::new("report.daily")
                .id("report-1")
                .delay(Duration::from_secs(3600))
                .max_attempts(7)
                .timeout_secs(60),
        )
        .await
        .expect("enqueue later");
    assert!(later.added);
    assert_eq!(later.status, Status::Scheduled);
    let due = later.due.expect("a due time");
    assert!(
        due > SystemTime::now() + Duration::from_secs(3000),
        "{due:?}"
    );
    let entries: Vec<String> = redis::cmd("ZRANGE")
        .arg(&scheduled)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("ZRANGE");
    let job: Value = serde_json::from_str(&entries[0]).expect("job JSON");
    assert_eq!(
        (job["max_attempts"].clone(), job["timeout_secs"].clone()),
        (json!(7), json!(60))
    );
    // A chosen id starts a new story of the id (as `enqueue --id`).
    assert!(
        job["_conveyor"]["epoch"].as_u64().unwrap_or(0) > 1_000_000_000,
        "{job}"
    );

    let at = UNIX_EPOCH + Duration::from_millis(4_102_444_800_000); // 2100-01-01
    let fixed = client
        .enqueue(EnqueueRequest::new("report.daily").id("report-2").at(at))
        .await
        .expect("enqueue at");
    assert_eq!((fixed.status, fixed.due), (Status::Scheduled, Some(at)));

    // The same live id again: not added, the live job's state.
    let again = client
        .enqueue(EnqueueRequest::new("report.daily").id("report-1"))
        .await
        .expect("enqueue duplicate");
    assert!(!again.added);
    assert_eq!((again.status, again.due), (Status::Scheduled, Some(due)));
    let zcard: u64 = redis::cmd("ZCARD")
        .arg(&scheduled)
        .query(&mut conn)
        .expect("ZCARD");
    assert_eq!(zcard, 2);

    // Live state from Redis.
    let info = client.job("report-1").await.expect("job").expect("known");
    assert_eq!(info.status, Status::Scheduled);
    let live = info.live.expect("live");
    assert_eq!((live.queue.as_str(), live.due), ("default", Some(due)));
    assert_eq!(live.kind.as_deref(), Some("report.daily"));
    assert!(info.record.is_none());
    let info = client.job(&now.id).await.expect("job").expect("known");
    assert_eq!(info.status, Status::Pending);
    assert!(client.job("nobody").await.expect("job").is_none());

    // Refused before anything is sent.
    let err = client
        .enqueue(EnqueueRequest::new("t").id("has space"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidId(_)), "{err}");
    let err = client
        .enqueue(EnqueueRequest::new("t").queue("a{b}"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidQueue { .. }), "{err}");
    let err = client
        .enqueue(EnqueueRequest::new("t").payload("x".repeat(2 << 20)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn client_from_config_uses_the_job_types() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = TempDir::new().expect("temp dir");
    let cfg = config(
        &redis,
        &prefix,
        dir.path(),
        "[jobs.report]\nqueue = \"reports\"\nstages = [{ name = \"a\", builtin = \"noop\" }]\n",
    );
    let client = Client::from_config(&cfg).await.expect("connect");
    let job = client
        .enqueue(EnqueueRequest::new("report"))
        .await
        .expect("enqueue");
    assert_eq!(job.queue, "reports");
    let err = client
        .enqueue(EnqueueRequest::new("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::UnknownType { kind, known } if kind == "nope" && known == "report"),
        "{err}"
    );
    // The job's queue is one the client knows, so it finds the job there.
    let info = client.job(&job.id).await.expect("job").expect("known");
    assert_eq!(info.live.expect("live").queue, "reports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_rust_stages_and_sqlite_keeps_their_results() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = TempDir::new().expect("temp dir");
    let cfg = config(
        &redis,
        &prefix,
        dir.path(),
        r#"
[jobs."text.count"]
stages = [
  { name = "echo", builtin = "echo" },
  { name = "count", builtin = "wordcount" },
  { name = "shout", builtin = "shout" },
]
"#,
    );
    let counter = WordCount::default();
    let worker = Worker::builder(cfg.clone())
        .stage("wordcount", counter.clone())
        .stage("shout", Shout)
        .build()
        .expect("builds");
    let client = Client::from_config(&cfg).await.expect("connect");
    let job = client
        .enqueue(
            EnqueueRequest::new("text.count")
                .id("count-1")
                .payload(json!({"text": "one two three"})),
        )
        .await
        .expect("enqueue");
    let running = Running::start(worker);

    let info = wait_final(&client, &job.id).await;
    assert_eq!(info.status, Status::Completed, "{info:?}");
    assert_eq!(info.result("count"), Some(&json!({"words": 3})));
    assert_eq!(info.result("shout"), Some(&json!("ONE TWO THREE")));
    assert_eq!(counter.runs.load(Ordering::SeqCst), 1);

    // The same, read from SQLite directly.
    let reader = conveyor::store::Reader::open(&db_path(dir.path())).expect("open SQLite");
    let record = reader.job(&job.id).expect("read").expect("stored");
    assert_eq!(record.status, "completed");
    let stages: Vec<(&str, &str, &Value)> = record
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.status.as_str(), &s.result))
        .collect();
    assert_eq!(
        stages,
        [
            ("echo", "completed", &json!({"text": "one two three"})),
            ("count", "completed", &json!({"words": 3})),
            ("shout", "completed", &json!("ONE TWO THREE")),
        ]
    );

    // A finished job cannot be cancelled.
    let err = client.cancel(&job.id).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::AlreadyFinished { status, .. } if status == "completed"),
        "{err}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancels_pending_and_running_jobs() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = TempDir::new().expect("temp dir");
    let cfg = config(
        &redis,
        &prefix,
        dir.path(),
        "[jobs.long]\nstages = [{ name = \"wait\", builtin = \"forever\" }]\n",
    );
    let client = Client::from_config(&cfg).await.expect("connect");
    let forever = Forever::default();

    // Pending: recorded now, dropped (never run) when a daemon takes it.
    let pending = client
        .enqueue(EnqueueRequest::new("long").id("pending-1"))
        .await
        .expect("enqueue");
    assert_eq!(
        client.cancel(&pending.id).await.expect("cancel"),
        Cancelled::Recorded
    );
    let flagged: bool = redis::cmd("HEXISTS")
        .arg(format!("{prefix}:{{default}}:cancelled"))
        .arg(&pending.id)
        .query(&mut redis.conn())
        .expect("HEXISTS");
    assert!(flagged);

    let worker = Worker::builder(cfg.clone())
        .stage("forever", forever.clone())
        .build()
        .expect("builds");
    let running = Running::start(worker);
    let info = wait_final(&client, &pending.id).await;
    assert_eq!(info.status, Status::Cancelled);
    assert_eq!(forever.started.load(Ordering::SeqCst), 0);

    // Running: the stage is stopped.
    let job = client
        .enqueue(EnqueueRequest::new("long").id("running-1"))
        .await
        .expect("enqueue");
    wait_until("the stage to start", || {
        forever.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let info = wait_status(&client, &job.id, |s| s == Status::Running).await;
    assert_eq!(info.live.map(|l| l.status), Some(Status::Running));
    // Confirmed within 3 s almost always; either way the job ends cancelled.
    let outcome = client.cancel(&job.id).await.expect("cancel");
    assert!(
        matches!(outcome, Cancelled::Stopped | Cancelled::Recorded),
        "{outcome:?}"
    );
    let info = wait_final(&client, &job.id).await;
    assert_eq!(info.status, Status::Cancelled);
    running.stop().await;
}

/// `Worker::quiet_handle`: quiet, a pushed job stays pending (nothing is
/// taken); resumed, it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_worker_takes_no_job_until_resumed() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = TempDir::new().expect("temp dir");
    let cfg = config(
        &redis,
        &prefix,
        dir.path(),
        "[jobs.e]\nstages = [{ name = \"e\", builtin = \"echo\" }]\n",
    );
    let worker = Worker::builder(cfg.clone()).build().expect("builds");
    let quiet = worker.quiet_handle();
    quiet.quiet();
    assert!(quiet.is_quiet());
    let client = Client::from_config(&cfg).await.expect("connect");
    let running = Running::start(worker);
    let job = client
        .enqueue(EnqueueRequest::new("e").id("quiet-1"))
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending: u64 = redis::cmd("LLEN")
        .arg(format!("{prefix}:{{default}}:pending"))
        .query(&mut redis.conn())
        .expect("LLEN");
    assert_eq!(pending, 1, "a quiet worker takes nothing");
    quiet.resume();
    let info = wait_final(&client, &job.id).await;
    assert_eq!(info.status, Status::Completed, "{info:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_rust_stage_fails_its_job_and_the_worker_goes_on() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = TempDir::new().expect("temp dir");
    let cfg = config(
        &redis,
        &prefix,
        dir.path(),
        r#"
[jobs.bad]
max_attempts = 1
stages = [{ name = "boom", builtin = "panics" }]

[jobs.good]
stages = [{ name = "count", builtin = "wordcount" }]
"#,
    );
    let client = Client::from_config(&cfg).await.expect("connect");
    let worker = Worker::builder(cfg.clone())
        .stage("panics", Panics)
        .stage("wordcount", WordCount::default())
        .build()
        .expect("builds");
    let running = Running::start(worker);
    let bad = client
        .enqueue(EnqueueRequest::new("bad"))
        .await
        .expect("enqueue");
    let info = wait_final(&client, &bad.id).await;
    assert_eq!(info.status, Status::Failed);
    let error = info.record.and_then(|r| r.error).unwrap_or_default();
    assert!(
        error.contains("stage panicked: this stage always panics"),
        "{error}"
    );

    let good = client
        .enqueue(EnqueueRequest::new("good").payload(json!({"text": "a b"})))
        .await
        .expect("enqueue");
    let info = wait_final(&client, &good.id).await;
    assert_eq!(info.status, Status::Completed);
    running.stop().await;
}

#[test]
fn a_config_naming_an_unregistered_stage_is_refused_with_the_key() {
    let toml = r#"
[jobs."text.count"]
stages = [
  { name = "echo", builtin = "echo" },
  { name = "count", builtin = "wordcount" },
]
"#;
    let cfg = Config::from_toml(toml).expect("parses");
    let err = Worker::builder(cfg.clone())
        .stage("shout", Shout)
        .build()
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("config key `jobs.\"text.count\".stages[1].builtin`")
            && err.contains("wordcount")
            && err.contains("shout"),
        "{err}"
    );
    Worker::builder(cfg.clone())
        .stage("wordcount", WordCount::default())
        .build()
        .expect("builds once registered");

    // The binary knows the built-ins only: the same config stops it with
    // exit code 2, naming the key.
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("conveyor.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.arg("--config")
        .arg(&path)
        .arg("--db")
        .arg(db_path(dir.path()))
        .args(["worker", "--worker-id", "never"])
        .env("CONVEYOR_REDIS_URL", "redis://127.0.0.1:1")
        .env("CONVEYOR_LOG_FORMAT", "json");
    let out = common::run_with_timeout(cmd, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("jobs.\"text.count\".stages[1].builtin"),
        "{stderr}"
    );
}

/// Runs `examples/rust_stage.rs` (built by `cargo test`, which builds the
/// examples; skipped when its binary is missing or older than the sources,
/// as after `cargo test --test library` alone).
#[test]
fn the_rust_stage_example_runs_a_job() {
    let Some(example) = fresh_example("rust_stage") else {
        eprintln!(
            "skipped: target/debug/examples/rust_stage is missing or stale (cargo build --examples)"
        );
        return;
    };
    let redis = TestRedis::start();
    let mut cmd = std::process::Command::new(example);
    cmd.args(["--redis-url", &redis.url(), "--prefix", &unique_prefix()])
        .env_remove("RUST_LOG");
    let out = common::run_with_timeout(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("line 4 of 4"), "{stdout}");
    assert!(stdout.contains(" completed"), "{stdout}");
    assert!(
        stdout.contains(r#"top_words: [{"count":4,"word":"the"}"#),
        "{stdout}"
    );
}

/// The example's binary next to the test's `conveyor`, if it is newer than
/// every source it is built from.
fn fresh_example(name: &str) -> Option<PathBuf> {
    let bin = Path::new(common::BIN).parent()?.join("examples").join(name);
    let built = std::fs::metadata(&bin).ok()?.modified().ok()?;
    let root = Path::new(common::CRATE_ROOT);
    let sources = [
        root.join("src"),
        root.join("examples").join(format!("{name}.rs")),
        root.join("Cargo.toml"),
    ];
    let newest = sources.iter().filter_map(|p| newest_mtime(p)).max()?;
    (built >= newest).then_some(bin)
}

fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}
