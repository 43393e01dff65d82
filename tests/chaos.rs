//! Chaos test: `kill -9` of daemons under load, with Jepsen total-queue
//! accounting (RELIABILITY.md §3-§5, test T1).
//!
//! Scenario: a private Redis (AOF on), N daemons `d1..dN` sharing one
//! SQLite file, a job type `chaos` of two `sh -c` stages that append
//! `S <stage> <job id> <pid>` at their start and `C <stage> <job id> <pid>` at
//! their end to a ledger file. A producer `LPUSH`es unique jobs `c<n>` and
//! records which pushes Redis acknowledged. Meanwhile a chaos loop picks a
//! random daemon, freezes it, SIGKILLs it and its stages' process groups
//! (what a crash of the whole service does), and restarts it after 0-1 s,
//! either with the same id (self-recovery at start) or, for about half of
//! the kills, under a new id `d<i>-r<k>` (the old id's jobs must then be
//! recovered by another daemon's reaper). Then the kills stop, the queue
//! drains, and every daemon gets SIGTERM and must exit 0.
//!
//! Checks (`*` = asserted):
//! - *lost = acked − completed in SQLite − ids in the dead list = 0;
//! - *no job has more than one `job_completed` log line over the logs of
//!   every daemon process, killed ones included (each has its own file);
//! - *residue (pending + active lists + scheduled + leases) = 0 after drain;
//! - *`PRAGMA integrity_check` = ok;
//! - *every daemon exits 0 on the final SIGTERM;
//! - counted only (at-least-once allows them): jobs whose first stage ran
//!   more than once, stages that ended (`C`) more than once, dead jobs.
//!
//! `chaos_short` runs on every `cargo test`; `chaos_long` is the full run
//! (`scripts/chaos.sh`), parameterised by `CHAOS_JOBS`, `CHAOS_KILLS`,
//! `CHAOS_DAEMONS` (and `CHAOS_SEED` to replay a kill schedule). The temp
//! dir (daemon logs, ledger, SQLite, AOF) is kept when a check fails, or
//! always with `CHAOS_KEEP=1`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{open_sqlite_read_only, poll_until};
use serde_json::Value;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_conveyor");
const CRATE_ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PREFIX: &str = "chaos";
const QUEUE: &str = "default";
const CONCURRENCY: usize = 4;
const STAGES: [&str; 2] = ["s1", "s2"];
/// How long a (re)started daemon may take to log `worker_started`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- tests

#[test]
fn chaos_short() {
    let report = run_chaos(&Params {
        jobs: 600,
        kills: 4,
        daemons: 2,
        kill_every_ms: (500, 2000),
        drain_timeout: Duration::from_secs(90),
        seed: seed_from_env(),
    });
    report.assert_ok();
}

#[test]
#[ignore = "long chaos run (minutes); scripts/chaos.sh runs it"]
fn chaos_long() {
    let report = run_chaos(&Params {
        jobs: env_usize("CHAOS_JOBS", 10_000),
        kills: env_usize("CHAOS_KILLS", 20),
        daemons: env_usize("CHAOS_DAEMONS", 2).max(1),
        kill_every_ms: (1000, 4000),
        drain_timeout: Duration::from_secs(600),
        seed: seed_from_env(),
    });
    report.assert_ok();
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer")),
        Err(_) => default,
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED={v:?} is not an integer")),
        Err(_) => fastrand::u64(..),
    }
}

// ---------------------------------------------------------------- scenario

struct Params {
    jobs: usize,
    kills: usize,
    daemons: usize,
    /// Pause before each kill, uniformly in this range (ms).
    kill_every_ms: (u64, u64),
    drain_timeout: Duration,
    seed: u64,
}

/// One SIGKILL of the chaos loop.
struct Kill {
    victim: String,
    /// Entries in the victim's active list when it was frozen.
    in_flight: u64,
    /// Stage process groups killed with it.
    groups: usize,
    restarted_as: String,
    /// Failed start attempts before the restart succeeded.
    refused_starts: usize,
}

fn run_chaos(p: &Params) -> Report {
    println!(
        "chaos: {} jobs, {} kills, {} daemons x {CONCURRENCY}, kill every {}-{} ms, seed {} (CHAOS_SEED to replay)",
        p.jobs, p.kills, p.daemons, p.kill_every_ms.0, p.kill_every_ms.1, p.seed
    );
    let mut rng = fastrand::Rng::with_seed(p.seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(&dir.path().join("redis"));
    let ctx = Ctx::new(dir.path(), redis.url());

    // The daemons, one slot each; a slot's instance is replaced on restart.
    // They start together, on a new SQLite file, as under `run_worker.sh -n`.
    let mut instances: Vec<_> = (1..=p.daemons)
        .map(|i| (i, ctx.spawn(&format!("d{i}"))))
        .collect();
    let mut slots: Vec<Slot> = Vec::new();
    for (i, mut current) in instances.drain(..) {
        current
            .wait_started(START_TIMEOUT)
            .unwrap_or_else(|e| panic!("initial start of d{i}: {e}"));
        slots.push(Slot {
            index: i,
            renames: 0,
            current,
        });
    }

    // Producer: LPUSH every job, recording the acknowledged ones.
    let started = Instant::now();
    // The pushes are spread over the expected chaos phase (pauses, plus
    // about 1 s per restart), so that kills hit daemons at work (and
    // daemons also block in BLMOVE now and then), however fast the machine
    // drains the queue.
    let spread = Duration::from_millis(
        p.kills as u64 * ((p.kill_every_ms.0 + p.kill_every_ms.1) / 2 + 1000),
    );
    let producer = {
        let url = ctx.redis_url.clone();
        let jobs = p.jobs;
        std::thread::spawn(move || produce(&url, jobs, spread))
    };

    // Chaos loop.
    let mut kills = Vec::new();
    for k in 1..=p.kills {
        let pause = rng.u64(p.kill_every_ms.0..=p.kill_every_ms.1);
        std::thread::sleep(Duration::from_millis(pause));
        let slot = &mut slots[rng.usize(..p.daemons)];
        let victim = slot.current.id.clone();
        let key = active_key(&victim);
        let mut conn = redis.conn();
        let ((in_flight, pending), groups) = slot.current.crash(|| {
            redis::pipe()
                .llen(&key)
                .llen(pending_key())
                .query::<(u64, u64)>(&mut conn)
                .unwrap_or((0, 0))
        });
        std::thread::sleep(Duration::from_millis(rng.u64(0..=1000)));
        let new_id = if rng.bool() {
            slot.renames += 1;
            format!("d{}-r{}", slot.index, slot.renames)
        } else {
            victim.clone()
        };
        let refused_starts = slot.restart(&ctx, &new_id);
        let at = started.elapsed();
        println!(
            "chaos: kill {k}/{} at {:>6.1}s: {victim} ({in_flight} in flight, {groups} stage groups, {pending} pending) -> {new_id}{}",
            p.kills,
            at.as_secs_f64(),
            if refused_starts > 0 {
                format!(" after {refused_starts} refused start(s)")
            } else {
                String::new()
            }
        );
        kills.push(Kill {
            victim,
            in_flight,
            groups,
            restarted_as: new_id,
            refused_starts,
        });
    }
    let chaos_over = started.elapsed();

    let produced = producer.join().expect("producer thread");
    let acked: BTreeSet<String> = produced.acked.iter().cloned().collect();

    // Drain: every acknowledged job final in SQLite or dead.
    let mut last_print = Instant::now();
    let drained = poll_until(p.drain_timeout, || {
        let finals = ctx.final_ids();
        let dead = ctx.dead_entries(&redis);
        let open = acked
            .iter()
            .filter(|id| !finals.contains(*id) && !dead.contains_key(*id))
            .count();
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "chaos: draining: {open} of {} jobs open at {:.0}s",
                acked.len(),
                started.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        open == 0
    });
    let drain_time = started.elapsed();
    // The last acks follow their SQLite commits by a round trip; and a
    // duplicate copy still in pending is taken and dropped.
    let residue_settled = poll_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(100));
        Residue::read(&redis).total() == 0
    });
    let residue_at_drain = Residue::read(&redis);

    // Graceful stop of every daemon.
    for slot in &slots {
        slot.current.signal(libc::SIGTERM);
    }
    let mut exits = Vec::new();
    for slot in &mut slots {
        let status = slot.current.wait_exit(EXIT_TIMEOUT);
        exits.push((slot.current.id.clone(), status));
    }
    let total_time = started.elapsed();

    let residue = Residue::read(&redis);
    let mut report = Report::gather(&ctx, &redis, produced, &acked);
    report.params = (p.jobs, p.kills, p.daemons, p.seed);
    report.kills = kills;
    report.exits = exits;
    report.drained = drained;
    report.residue_settled = residue_settled;
    report.residue_at_drain = residue_at_drain;
    report.residue = residue;
    report.chaos_time = chaos_over;
    report.drain_time = drain_time;
    report.total_time = total_time;
    report.print();
    if !report.ok() || std::env::var_os("CHAOS_KEEP").is_some() {
        let kept = dir.keep();
        println!(
            "chaos: artifacts (logs, ledger, SQLite, AOF) kept in {}",
            kept.display()
        );
    }
    drop(slots);
    drop(redis);
    report
}

/// What the producer did.
struct Produced {
    acked: Vec<String>,
    /// Pushes whose outcome is unknown (error or no reply).
    indeterminate: Vec<String>,
    time: Duration,
}

/// Pushes `jobs` jobs, evenly over `spread` (at once when it is zero).
fn produce(url: &str, jobs: usize, spread: Duration) -> Produced {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = None;
    let mut out = Produced {
        acked: Vec::with_capacity(jobs),
        indeterminate: Vec::new(),
        time: Duration::ZERO,
    };
    let t0 = Instant::now();
    for n in 1..=jobs {
        // Due time of push n; pushes run in bursts every 10 ms or so.
        let due = spread.mul_f64((n - 1) as f64 / jobs as f64);
        if let Some(wait) = due.checked_sub(t0.elapsed())
            && wait > Duration::from_millis(10)
        {
            std::thread::sleep(wait);
        }
        let id = format!("c{n}");
        let body =
            serde_json::json!({ "id": id, "type": "chaos", "payload": { "n": n } }).to_string();
        if conn.is_none() {
            conn = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .ok();
        }
        let pushed = conn.as_mut().map(|c| {
            redis::cmd("LPUSH")
                .arg(pending_key())
                .arg(&body)
                .query::<i64>(c)
        });
        match pushed {
            Some(Ok(_)) => out.acked.push(id),
            _ => {
                conn = None;
                out.indeterminate.push(id);
            }
        }
    }
    out.time = t0.elapsed();
    out
}

// ---------------------------------------------------------------- keys

fn pending_key() -> String {
    format!("{PREFIX}:{{{QUEUE}}}:pending")
}
fn active_key(worker: &str) -> String {
    format!("{PREFIX}:{{{QUEUE}}}:active:{worker}")
}
fn scheduled_key() -> String {
    format!("{PREFIX}:{{{QUEUE}}}:scheduled")
}
fn dead_key() -> String {
    format!("{PREFIX}:{{{QUEUE}}}:dead")
}
fn leases_key() -> String {
    format!("{PREFIX}:{{{QUEUE}}}:leases")
}
fn crashes_key() -> String {
    format!("{PREFIX}:{{{QUEUE}}}:crashes")
}

/// What is left in Redis for the queue.
#[derive(Default, Clone, Copy)]
struct Residue {
    pending: u64,
    active: u64,
    scheduled: u64,
    leases: u64,
    /// Not part of the total: crash counters of jobs (informational).
    crashes: u64,
}

impl Residue {
    fn read(redis: &Redis) -> Self {
        let mut conn = redis.conn();
        let mut active_lists: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(active_key("*"))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .expect("SCAN");
            active_lists.extend(keys);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut active = 0;
        for key in &active_lists {
            active += redis::cmd("LLEN")
                .arg(key)
                .query::<u64>(&mut conn)
                .expect("LLEN");
        }
        let q = |cmd: &str, key: String, conn: &mut redis::Connection| -> u64 {
            redis::cmd(cmd).arg(key).query(conn).expect(cmd)
        };
        Residue {
            pending: q("LLEN", pending_key(), &mut conn),
            active,
            scheduled: q("ZCARD", scheduled_key(), &mut conn),
            leases: q("HLEN", leases_key(), &mut conn),
            crashes: q("HLEN", crashes_key(), &mut conn),
        }
    }

    fn total(&self) -> u64 {
        self.pending + self.active + self.scheduled + self.leases
    }

    fn describe(&self) -> String {
        format!(
            "pending {}, active {}, scheduled {}, leases {}",
            self.pending, self.active, self.scheduled, self.leases
        )
    }
}

// ---------------------------------------------------------------- Redis

/// A private `redis-server` with AOF on, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        let log_path = dir.join("redis.log");
        for _ in 0..5 {
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
                l.local_addr().expect("local addr").port()
            };
            let log = File::create(&log_path).expect("redis log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                ])
                .args(["--maxmemory-policy", "noeviction"])
                .arg("--dir")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .expect("start redis-server (is it installed?)");
            let mut redis = Redis { child, port };
            let client = redis::Client::open(redis.url()).expect("redis url");
            let ready = poll_until(Duration::from_secs(5), || {
                if let Ok(Some(_)) = redis.child.try_wait() {
                    return true;
                }
                client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .ok()
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
                    .is_some()
            });
            if ready && matches!(redis.child.try_wait(), Ok(None)) {
                return redis;
            }
            // Drop kills it; another port (someone took this one).
        }
        panic!(
            "redis-server did not start; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- daemons

/// Paths and settings shared by every daemon process of one run.
struct Ctx {
    redis_url: String,
    db: PathBuf,
    config: PathBuf,
    ledger: PathBuf,
    logs: PathBuf,
    /// Every log file ever used, killed instances' included.
    log_files: Mutex<Vec<PathBuf>>,
    spawned: AtomicUsize,
}

impl Ctx {
    fn new(dir: &Path, redis_url: String) -> Self {
        let ledger = dir.join("ledger.log");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let config = dir.join("conveyor.toml");
        std::fs::write(&config, config_toml(&ledger)).expect("write config");
        Ctx {
            redis_url,
            db: dir.join("conveyor.db"),
            config,
            ledger,
            logs,
            log_files: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
        }
    }

    /// Spawns `conveyor worker --worker-id ID` with its own log file.
    fn spawn(&self, id: &str) -> Instance {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed) + 1;
        let log_path = self.logs.join(format!("{n:03}-{id}.log"));
        let log = File::create(&log_path).expect("daemon log file");
        self.log_files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(log_path.clone());
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CONVEYOR_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .current_dir(CRATE_ROOT)
            .env("CONVEYOR_REDIS_URL", &self.redis_url)
            .env("CONVEYOR_PREFIX", PREFIX)
            .env("CONVEYOR_DB", &self.db)
            .env("CONVEYOR_LOG_FORMAT", "json")
            .env("RUST_LOG", "conveyor=info")
            .arg("worker")
            .arg("--config")
            .arg(&self.config)
            .args(["--worker-id", id])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn conveyor worker");
        Instance {
            child,
            id: id.to_owned(),
            log_path,
            exited: None,
        }
    }

    fn sqlite(&self) -> Option<rusqlite::Connection> {
        open_sqlite_read_only(&self.db)
    }

    /// Ids of jobs in a final state in SQLite.
    fn final_ids(&self) -> BTreeSet<String> {
        self.ids_with("SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')")
    }

    fn ids_with(&self, sql: &str) -> BTreeSet<String> {
        let Some(conn) = self.sqlite() else {
            return BTreeSet::new();
        };
        let Ok(mut stmt) = conn.prepare(sql) else {
            return BTreeSet::new();
        };
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// The dead list: job id (or a placeholder) -> reason.
    fn dead_entries(&self, redis: &Redis) -> BTreeMap<String, String> {
        let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(dead_key())
            .arg(0)
            .arg(-1)
            .query(&mut redis.conn())
            .expect("LRANGE dead");
        raw.iter()
            .enumerate()
            .map(|(i, entry)| {
                let v: Value = serde_json::from_slice(entry).unwrap_or(Value::Null);
                let id = v["id"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("<entry {i} without id>"));
                let reason = v["_conveyor"]["error"]
                    .as_str()
                    .unwrap_or("<no reason>")
                    .to_owned();
                (id, reason)
            })
            .collect()
    }
}

/// The daemons' config: test timings and the ledger-writing job type.
fn config_toml(ledger: &Path) -> String {
    let ledger = ledger.to_string_lossy();
    assert!(
        !ledger.contains(['"', '\\']) && !ledger.chars().any(char::is_control),
        "unusual temp dir path {ledger:?}"
    );
    let mut out = format!(
        r#"[worker]
queues = ["{QUEUE}"]
concurrency = {CONCURRENCY}
heartbeat_secs = 1
dead_after_secs = 3
fetch_block_ms = 200
shutdown_grace_secs = 1
kill_grace_secs = 1

[jobs.chaos]
queue = "{QUEUE}"
"#
    );
    for stage in STAGES {
        // `$$` is the stage's pid and process group (each stage leads one).
        out.push_str(&format!(
            r#"
[[jobs.chaos.stages]]
name = "{stage}"
run = ["sh", "-c", '''echo "S {stage} $CONVEYOR_JOB_ID $$" >> "$LEDGER"; cat > /dev/null; sleep 0.02; echo "C {stage} $CONVEYOR_JOB_ID $$" >> "$LEDGER"''']
env = {{ LEDGER = "{ledger}" }}
"#
        ));
    }
    out
}

/// One daemon process.
struct Instance {
    child: Child,
    id: String,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl Instance {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: a signal to our own child, not yet reaped.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited.is_some()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for `worker_started`; `Err` when the process exited first or
    /// the time ran out.
    fn wait_started(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains("\"worker_started\"") {
                return Ok(());
            }
            if self.has_exited() {
                return Err(format!(
                    "{} exited ({:?}) before it started:\n{}",
                    self.id,
                    self.exited,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not start within {timeout:?}:\n{}",
                    self.id,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `None` when it did not exit in time (it is then SIGKILLed).
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if poll_until(timeout, || self.has_exited()) {
            return self.exited;
        }
        println!(
            "chaos: {} did not exit within {timeout:?} of SIGTERM; killing it. Log tail:\n{}",
            self.id,
            self.log_tail()
        );
        self.signal(libc::SIGKILL);
        self.exited = self.child.wait().ok();
        None
    }

    /// A crash of the whole service: freeze the daemon, run `probe` (it
    /// cannot change anything meanwhile), SIGKILL it and the process groups
    /// of its running stages (as systemd's cgroup kill would), reap it.
    /// Returns the probe's value and the number of stage groups killed.
    fn crash<T>(&mut self, probe: impl FnOnce() -> T) -> (T, usize) {
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
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.has_exited() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp.
fn proc_stat(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

fn process_group(pid: i32) -> Option<i32> {
    proc_stat(pid).map(|(_, pgrp)| pgrp)
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect()
}

/// A daemon position: `d<index>`, renamed `d<index>-r<k>` by some restarts.
struct Slot {
    index: usize,
    renames: usize,
    current: Instance,
}

impl Slot {
    /// Starts the slot's next instance as `id`, retrying a refused start
    /// (e.g. the id's registration is still judged live) every second.
    /// Returns how many starts were refused.
    fn restart(&mut self, ctx: &Ctx, id: &str) -> usize {
        let mut refused = 0;
        loop {
            let mut next = ctx.spawn(id);
            match next.wait_started(START_TIMEOUT) {
                Ok(()) => {
                    self.current = next;
                    return refused;
                }
                Err(e) => {
                    refused += 1;
                    println!("chaos: restart of {id} refused ({refused}): {e}");
                    assert!(refused < 10, "{id} could not be restarted 10 times");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- report

#[derive(Default)]
struct Report {
    params: (usize, usize, usize, u64),
    acked: usize,
    indeterminate: usize,
    produce_time: Duration,
    completed: usize,
    sqlite_by_status: BTreeMap<String, i64>,
    dead: BTreeMap<String, String>,
    lost: Vec<String>,
    /// Completed jobs nobody acknowledged pushing (must not exist).
    unexpected: Vec<String>,
    /// job id -> `job_completed` lines, for jobs with more than one.
    completions_twice: BTreeMap<String, usize>,
    /// Completed jobs with no `job_completed` line (a run killed between
    /// its ack and the log line, or completed by a delivery that lost its
    /// lease and then acknowledged as a duplicate).
    completions_unlogged: usize,
    /// job id -> `S s1` lines, for jobs with more than one.
    runs_twice: BTreeMap<String, usize>,
    /// (job, stage) -> `C` lines, for those with more than one.
    stage_commits_twice: BTreeMap<(String, String), usize>,
    /// `PRAGMA integrity_check`.
    integrity: String,
    kills: Vec<Kill>,
    exits: Vec<(String, Option<ExitStatus>)>,
    drained: bool,
    residue_settled: bool,
    residue_at_drain: Residue,
    residue: Residue,
    chaos_time: Duration,
    drain_time: Duration,
    total_time: Duration,
    log_files: usize,
}

impl Report {
    fn gather(ctx: &Ctx, redis: &Redis, produced: Produced, acked: &BTreeSet<String>) -> Self {
        let mut r = Report {
            acked: produced.acked.len(),
            indeterminate: produced.indeterminate.len(),
            produce_time: produced.time,
            ..Report::default()
        };
        let completed = ctx.ids_with("SELECT id FROM jobs WHERE status = 'completed'");
        r.completed = completed.len();
        r.dead = ctx.dead_entries(redis);
        r.lost = acked
            .iter()
            .filter(|id| !completed.contains(*id) && !r.dead.contains_key(*id))
            .cloned()
            .collect();
        let indeterminate: BTreeSet<&String> = produced.indeterminate.iter().collect();
        r.unexpected = completed
            .iter()
            .filter(|id| !acked.contains(*id) && !indeterminate.contains(id))
            .cloned()
            .collect();
        if let Some(conn) = ctx.sqlite() {
            r.integrity = conn
                .query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
                .unwrap_or_else(|e| format!("error: {e}"));
            if let Ok(mut stmt) = conn.prepare("SELECT status, count(*) FROM jobs GROUP BY status")
            {
                r.sqlite_by_status = stmt
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                    .map(|rows| rows.filter_map(Result::ok).collect())
                    .unwrap_or_default();
            }
        } else {
            r.integrity = "no database".into();
        }

        // `job_completed` lines over every daemon process's log.
        let files = ctx
            .log_files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.log_files = files.len();
        let mut completions: HashMap<String, usize> = HashMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("job_completed")) {
                // A SIGKILL may cut the last line short: it does not parse.
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v["message"] != "job_completed" {
                    continue;
                }
                let id = v["job_id"]
                    .as_str()
                    .or_else(|| v["span"]["job_id"].as_str());
                if let Some(id) = id {
                    *completions.entry(id.to_owned()).or_default() += 1;
                }
            }
        }
        r.completions_twice = completions
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        r.completions_unlogged = completed
            .iter()
            .filter(|id| !completions.contains_key(*id))
            .count();

        // The ledger.
        let mut starts: HashMap<(String, String), usize> = HashMap::new();
        let mut ends: HashMap<(String, String), usize> = HashMap::new();
        let ledger = std::fs::read_to_string(&ctx.ledger).unwrap_or_default();
        for line in ledger.lines() {
            let mut f = line.split(' ');
            let (Some(kind), Some(stage), Some(job)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let key = (job.to_owned(), stage.to_owned());
            match kind {
                "S" => *starts.entry(key).or_default() += 1,
                "C" => *ends.entry(key).or_default() += 1,
                _ => {}
            }
        }
        r.runs_twice = starts
            .iter()
            .filter(|((_, stage), n)| stage == STAGES[0] && **n > 1)
            .map(|((job, _), n)| (job.clone(), *n))
            .collect();
        r.stage_commits_twice = ends.into_iter().filter(|(_, n)| *n > 1).collect();
        r
    }

    fn exits_ok(&self) -> bool {
        self.exits
            .iter()
            .all(|(_, s)| s.is_some_and(|s| s.success()))
    }

    /// The asserted checks: (name, passed, detail).
    fn checks(&self) -> Vec<(&'static str, bool, String)> {
        vec![
            (
                "lost (acked - completed - dead)",
                self.lost.is_empty(),
                self.lost.len().to_string(),
            ),
            (
                "unexpected (completed, never acked)",
                self.unexpected.is_empty(),
                self.unexpected.len().to_string(),
            ),
            (
                "completions reported twice",
                self.completions_twice.is_empty(),
                self.completions_twice.len().to_string(),
            ),
            (
                "residue after drain",
                self.residue.total() == 0,
                format!("{} ({})", self.residue.total(), self.residue.describe()),
            ),
            (
                "SQLite integrity_check",
                self.integrity == "ok",
                self.integrity.clone(),
            ),
            (
                "daemons exit 0 on SIGTERM",
                self.exits_ok(),
                format!(
                    "{}/{}",
                    self.exits
                        .iter()
                        .filter(|(_, s)| s.is_some_and(|s| s.success()))
                        .count(),
                    self.exits.len()
                ),
            ),
            ("drained in time", self.drained, self.drained.to_string()),
        ]
    }

    fn ok(&self) -> bool {
        self.checks().iter().all(|(_, ok, _)| *ok)
    }

    fn print(&self) {
        let (jobs, kills, daemons, seed) = self.params;
        let same_id = self
            .kills
            .iter()
            .filter(|k| k.victim == k.restarted_as)
            .count();
        let hit = self.kills.iter().filter(|k| k.in_flight > 0).count();
        let in_flight: u64 = self.kills.iter().map(|k| k.in_flight).sum();
        let groups: usize = self.kills.iter().map(|k| k.groups).sum();
        let refused: usize = self.kills.iter().map(|k| k.refused_starts).sum();
        let secs = self.drain_time.as_secs_f64().max(1e-9);
        let row = |star: &str, name: &str, value: String| {
            println!("{star:1} {name:<44} {value}");
        };
        println!();
        println!("==================== chaos report ====================");
        row(
            "",
            "parameters",
            format!("{jobs} jobs, {kills} kills, {daemons} daemons x {CONCURRENCY}, seed {seed}"),
        );
        row(
            "",
            "jobs acked / indeterminate",
            format!(
                "{} / {} (pushed in {:.1}s)",
                self.acked,
                self.indeterminate,
                self.produce_time.as_secs_f64()
            ),
        );
        row("", "completed in SQLite", self.completed.to_string());
        row(
            "",
            "SQLite jobs by status",
            format!("{:?}", self.sqlite_by_status),
        );
        for (name, ok, detail) in self.checks() {
            row(
                "*",
                name,
                format!("{detail:<12} {}", if ok { "ok" } else { "FAIL" }),
            );
        }
        row(
            "",
            "residue when drained (before SIGTERM)",
            format!(
                "{} ({}){}",
                self.residue_at_drain.total(),
                self.residue_at_drain.describe(),
                if self.residue_settled {
                    ""
                } else {
                    ", did not settle to 0"
                }
            ),
        );
        row(
            "",
            "crash counters left (informational)",
            self.residue.crashes.to_string(),
        );
        row("", "dead jobs", self.dead.len().to_string());
        row(
            "",
            "jobs run twice (>1 `S s1`)",
            self.runs_twice.len().to_string(),
        );
        row(
            "",
            "stages committed twice (>1 `C`)",
            self.stage_commits_twice.len().to_string(),
        );
        row(
            "",
            "completed without a job_completed line",
            self.completions_unlogged.to_string(),
        );
        row(
            "",
            "kills (same id / new id)",
            format!(
                "{} ({same_id} / {})",
                self.kills.len(),
                self.kills.len() - same_id
            ),
        );
        row(
            "",
            "kills that hit in-flight jobs",
            format!("{hit} ({in_flight} jobs in active lists, {groups} stage groups killed)"),
        );
        row("", "refused restarts", refused.to_string());
        row("", "daemon log files read", self.log_files.to_string());
        row(
            "",
            "chaos phase / drained at / total",
            format!(
                "{:.1}s / {:.1}s / {:.1}s",
                self.chaos_time.as_secs_f64(),
                self.drain_time.as_secs_f64(),
                self.total_time.as_secs_f64()
            ),
        );
        row(
            "",
            "throughput (completed / drained at)",
            format!(
                "{:.1} jobs/s (producer paced at {:.1} jobs/s)",
                self.completed as f64 / secs,
                self.acked as f64 / self.produce_time.as_secs_f64().max(1e-9)
            ),
        );
        println!("======================================================");
        for (id, reason) in &self.dead {
            println!("dead: {id}: {reason}");
        }
        for (id, n) in &self.completions_twice {
            println!("completed twice: {id}: {n} job_completed lines");
        }
        for id in self.lost.iter().take(50) {
            println!("lost: {id}");
        }
        for id in self.unexpected.iter().take(50) {
            println!("unexpected: {id}");
        }
        for (id, n) in self.runs_twice.iter().take(20) {
            println!("run twice: {id}: {n} starts of {}", STAGES[0]);
        }
        for ((id, stage), n) in self.stage_commits_twice.iter().take(20) {
            println!("stage committed twice: {id} {stage}: {n} ends");
        }
        for (id, status) in &self.exits {
            println!("exit: {id}: {status:?}");
        }
        // One line for scripts (scripts/chaos.sh).
        println!(
            "CHAOS_RESULT lost={} unexpected={} completions_twice={} residue={} integrity={} exits_ok={} drained={} dead={} runs_twice={} stage_commits_twice={} kills={} jobs_per_s={:.1} total_s={:.1}",
            self.lost.len(),
            self.unexpected.len(),
            self.completions_twice.len(),
            self.residue.total(),
            self.integrity,
            self.exits_ok(),
            self.drained,
            self.dead.len(),
            self.runs_twice.len(),
            self.stage_commits_twice.len(),
            self.kills.len(),
            self.completed as f64 / secs,
            self.total_time.as_secs_f64(),
        );
    }

    fn assert_ok(&self) {
        let failed: Vec<String> = self
            .checks()
            .into_iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(name, _, detail)| format!("{name}: {detail}"))
            .collect();
        assert!(failed.is_empty(), "chaos checks failed: {failed:?}");
    }
}
