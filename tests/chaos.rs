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
//! With stage pools (`chaos_short_pools`, `CHAOS_POOLS=1`): stage `s1` is in
//! pool `a`, `s2` in pool `b`; odd daemons serve `a`, even ones `b`, so
//! every job is handed over between two daemons, and the residue counts
//! the pool lists too.
//!
//! `chaos_short` runs on every `cargo test`; `chaos_long` is the full run
//! (`scripts/chaos.sh`), parameterised by `CHAOS_JOBS`, `CHAOS_KILLS`,
//! `CHAOS_DAEMONS`, `CHAOS_POOLS` (and `CHAOS_SEED` to replay a kill
//! schedule). The temp
//! dir (daemon logs, ledger, SQLite, AOF) is kept when a check fails, or
//! always with `CHAOS_KEEP=1`.
//!
//! Redis, the daemon processes (crash, restart) and the key names come from
//! the shared harness (`tests/common`); this file owns the scenario, the
//! producer and the accounting.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{
    Daemon, Harness, ledger_counts_by_stage, ledger_stage, open_sqlite_read_only, poll_until,
};
use serde_json::Value;

const PREFIX: &str = "chaos";
const QUEUE: &str = "default";
const CONCURRENCY: usize = 4;
const STAGES: [&str; 2] = ["s1", "s2"];
/// How long a (re)started daemon may take to log `worker_started`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Redis keeps what it acknowledged across its own restarts (AOF), and
/// refuses writes rather than evicting jobs.
const REDIS_ARGS: &[&str] = &[
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--maxmemory-policy",
    "noeviction",
];
/// Info, not the harness's debug: debug lines of thousands of jobs slow
/// the daemons and the final scan of their logs.
const DAEMON_ENV: &[(&str, &str)] = &[("RUST_LOG", "conveyor=info")];

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
        pools: false,
    });
    report.assert_ok();
}

#[test]
fn chaos_short_pools() {
    let report = run_chaos(&Params {
        jobs: 400,
        kills: 4,
        daemons: 2,
        kill_every_ms: (500, 2000),
        drain_timeout: Duration::from_secs(90),
        seed: seed_from_env(),
        pools: true,
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
        pools: std::env::var("CHAOS_POOLS").is_ok_and(|v| v == "1"),
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
    /// Stage pools: s1 in `a`, s2 in `b`; odd daemons serve `a`, even `b`.
    pools: bool,
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
        "chaos: {} jobs, {} kills, {} daemons x {CONCURRENCY}, kill every {}-{} ms, seed {} (CHAOS_SEED to replay){}",
        p.jobs,
        p.kills,
        p.daemons,
        p.kill_every_ms.0,
        p.kill_every_ms.1,
        p.seed,
        if p.pools { ", stage pools a/b" } else { "" }
    );
    let mut rng = fastrand::Rng::with_seed(p.seed);
    let mut h = Harness::with_redis_args("", REDIS_ARGS);
    h.prefix = PREFIX.to_owned();
    let ledger = h.path("ledger.log");
    h.write_config(&config_toml(&ledger, p.pools));

    let mut slots = start_slots(&h, p.daemons, p.pools);

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
        let (url, pending) = (h.redis.url(), h.pending_key(QUEUE));
        let jobs = p.jobs;
        std::thread::spawn(move || produce(&url, &pending, jobs, spread))
    };

    let kills = chaos_loop(p, &mut rng, &h, &mut slots, started);
    let chaos_over = started.elapsed();

    let produced = producer.join().expect("producer thread");
    let acked: BTreeSet<String> = produced.acked.iter().cloned().collect();

    let drained = drain(&h, &acked, p.drain_timeout, started);
    let drain_time = started.elapsed();
    // The last acks follow their SQLite commits by a round trip; and a
    // duplicate copy still in pending is taken and dropped.
    let residue_settled = poll_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(100));
        Residue::read(&h).total() == 0
    });
    let residue_at_drain = Residue::read(&h);

    let exits = stop_all(&mut slots);
    let total_time = started.elapsed();

    let residue = Residue::read(&h);
    let mut report = Report::gather(&h, &ledger, produced, &acked);
    report.params = (p.jobs, p.kills, p.daemons, p.seed);
    report.pools = p.pools;
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
        let kept = h.keep_dir();
        println!(
            "chaos: artifacts (logs, ledger, SQLite, AOF) kept in {}",
            kept.display()
        );
    }
    drop(slots);
    drop(h);
    report
}

/// The daemons, one slot each; a slot's instance is replaced on restart.
/// They start together, on a new SQLite file, as under `run_worker.sh -n`.
fn start_slots(h: &Harness, daemons: usize, pools: bool) -> Vec<Slot> {
    let pool_of = |i: usize| pools.then_some(if i % 2 == 1 { "a" } else { "b" });
    let mut instances: Vec<_> = (1..=daemons)
        .map(|i| {
            let env = daemon_env(pool_of(i));
            (i, h.spawn_daemon(&format!("d{i}"), &[], &env))
        })
        .collect();
    let mut slots: Vec<Slot> = Vec::new();
    for (i, mut current) in instances.drain(..) {
        current
            .wait_started_within(START_TIMEOUT)
            .unwrap_or_else(|e| panic!("initial start of d{i}: {e}"));
        slots.push(Slot {
            index: i,
            renames: 0,
            pool: pool_of(i),
            current,
        });
    }
    slots
}

/// The chaos loop: `p.kills` crashes of a random daemon, each restarted
/// under its id or a new one.
fn chaos_loop(
    p: &Params,
    rng: &mut fastrand::Rng,
    h: &Harness,
    slots: &mut [Slot],
    started: Instant,
) -> Vec<Kill> {
    let mut kills = Vec::new();
    for k in 1..=p.kills {
        let pause = rng.u64(p.kill_every_ms.0..=p.kill_every_ms.1);
        std::thread::sleep(Duration::from_millis(pause));
        let slot = &mut slots[rng.usize(..p.daemons)];
        let victim = slot.current.worker_id.clone();
        let key = h.active_key(QUEUE, &victim);
        let mut conn = h.redis.conn();
        let ((in_flight, pending), groups) = slot.current.crash(|| {
            redis::pipe()
                .llen(&key)
                .llen(h.pending_key(QUEUE))
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
        let refused_starts = slot.restart(h, &new_id);
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
    kills
}

/// Waits until every acknowledged job is final in SQLite or dead; whether
/// that happened within `timeout`.
fn drain(h: &Harness, acked: &BTreeSet<String>, timeout: Duration, started: Instant) -> bool {
    let mut last_print = Instant::now();
    poll_until(timeout, || {
        let finals = final_ids(h);
        let dead = dead_entries(h);
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
    })
}

/// Graceful stop of every daemon: SIGTERM to all, then each one's exit.
fn stop_all(slots: &mut [Slot]) -> Vec<(String, Option<ExitStatus>)> {
    for slot in slots.iter() {
        slot.current.sigterm();
    }
    slots
        .iter_mut()
        .map(|slot| {
            let status = stop(&mut slot.current);
            (slot.current.worker_id.clone(), status)
        })
        .collect()
}

/// Waits for a daemon's exit after SIGTERM; `None` when it did not exit
/// in time (it is then SIGKILLed).
fn stop(d: &mut Daemon) -> Option<ExitStatus> {
    let status = d.try_wait_exit(EXIT_TIMEOUT);
    if status.is_none() {
        println!(
            "chaos: {} did not exit within {EXIT_TIMEOUT:?} of SIGTERM; killing it. Log tail:\n{}",
            d.worker_id,
            d.log_tail(20)
        );
        d.kill();
    }
    status
}

/// What the producer did.
struct Produced {
    acked: Vec<String>,
    /// Pushes whose outcome is unknown (error or no reply).
    indeterminate: Vec<String>,
    time: Duration,
}

/// Pushes `jobs` jobs onto `pending`, evenly over `spread` (at once when it
/// is zero).
fn produce(url: &str, pending: &str, jobs: usize, spread: Duration) -> Produced {
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
        let pushed = conn
            .as_mut()
            .map(|c| redis::cmd("LPUSH").arg(pending).arg(&body).query::<i64>(c));
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

// ---------------------------------------------------------------- Redis and SQLite

/// Ids of jobs in a final state in SQLite.
fn final_ids(h: &Harness) -> BTreeSet<String> {
    h.ids_with_any_status(&["completed", "failed", "cancelled"])
}

/// The dead list: job id (or a placeholder) -> reason.
fn dead_entries(h: &Harness) -> BTreeMap<String, String> {
    h.lrange(&h.dead_key(QUEUE))
        .iter()
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

/// What is left in Redis for the queue.
#[derive(Default, Clone, Copy)]
struct Residue {
    pending: u64,
    active: u64,
    scheduled: u64,
    leases: u64,
    /// In the stage pools' lists (`P:{Q}:pool:*`).
    pools: u64,
    /// Not part of the total: crash counters of jobs (informational).
    crashes: u64,
}

impl Residue {
    fn read(h: &Harness) -> Self {
        let active_lists = h.scan_keys(&h.active_key(QUEUE, "*"));
        let pool_lists = h.scan_keys(&format!("{}:{{{QUEUE}}}:pool:*", h.prefix));
        let mut conn = h.redis.conn();
        let mut llen_sum = |keys: &[String]| -> u64 {
            keys.iter()
                .map(|key| {
                    redis::cmd("LLEN")
                        .arg(key)
                        .query::<u64>(&mut conn)
                        .expect("LLEN")
                })
                .sum()
        };
        let active = llen_sum(&active_lists);
        let pools = llen_sum(&pool_lists);
        let q = |cmd: &str, key: String, conn: &mut redis::Connection| -> u64 {
            redis::cmd(cmd).arg(key).query(conn).expect(cmd)
        };
        Residue {
            pending: q("LLEN", h.pending_key(QUEUE), &mut conn),
            active,
            scheduled: q("ZCARD", h.scheduled_key(QUEUE), &mut conn),
            leases: q("HLEN", h.leases_key(QUEUE), &mut conn),
            pools,
            crashes: q("HLEN", h.crashes_key(QUEUE), &mut conn),
        }
    }

    fn total(&self) -> u64 {
        self.pending + self.active + self.scheduled + self.leases + self.pools
    }

    fn describe(&self) -> String {
        format!(
            "pending {}, active {}, scheduled {}, leases {}, pool lists {}",
            self.pending, self.active, self.scheduled, self.leases, self.pools
        )
    }
}

// ---------------------------------------------------------------- daemons

/// The daemons' config: test timings and the ledger-writing job type.
fn config_toml(ledger: &Path, pools: bool) -> String {
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
    for (i, stage) in STAGES.into_iter().enumerate() {
        out.push_str(&ledger_stage("chaos", stage, ledger, "sleep 0.02;"));
        if pools {
            // The table just written is this stage's: its pool follows.
            out.push_str(&format!("pool = \"{}\"\n", ["a", "b"][i]));
        }
    }
    out
}

/// A daemon position: `d<index>`, renamed `d<index>-r<k>` by some restarts.
struct Slot {
    index: usize,
    renames: usize,
    /// The stage pool it serves (`CONVEYOR_POOLS`), with pools on.
    pool: Option<&'static str>,
    current: Daemon,
}

/// [`DAEMON_ENV`], plus `CONVEYOR_POOLS` for a daemon serving `pool`.
fn daemon_env(pool: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut env = DAEMON_ENV.to_vec();
    if let Some(pool) = pool {
        env.push(("CONVEYOR_POOLS", pool));
    }
    env
}

impl Slot {
    /// Starts the slot's next instance as `id`, retrying a refused start
    /// (e.g. the id's registration is still judged live) every second.
    /// Returns how many starts were refused.
    fn restart(&mut self, h: &Harness, id: &str) -> usize {
        let env = daemon_env(self.pool);
        let (next, refused) = h.restart_daemon(id, &env, START_TIMEOUT, |n, why| {
            println!("chaos: restart of {id} refused ({n}): {why}");
        });
        self.current = next;
        refused
    }
}

/// Every daemon log file of the run, killed and refused instances' too
/// (each process has a file of its own, kept after it exits).
fn daemon_log_files(h: &Harness) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(h.dir.path())
        .expect("read the temp dir")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?;
            (name.starts_with("worker-") && name.ends_with(".log")).then_some(path)
        })
        .collect();
    files.sort();
    files
}

// ---------------------------------------------------------------- report

/// How many of `completed` have a job record whose `job` field does not
/// say `completed`.
fn records_behind(h: &Harness, completed: &BTreeSet<String>) -> usize {
    if completed.is_empty() {
        return 0;
    }
    let mut conn = h.redis.conn();
    let mut pipe = redis::pipe();
    for id in completed {
        pipe.hget(format!("{}:{{{QUEUE}}}:job:{id}", h.prefix), "job");
    }
    let fields: Vec<Option<String>> = pipe.query(&mut conn).expect("the job records");
    fields
        .iter()
        .filter(|f| {
            let status = f
                .as_deref()
                .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                .and_then(|v| v["status"].as_str().map(str::to_owned));
            status.as_deref() != Some("completed")
        })
        .count()
}

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
    /// Completed jobs whose record in Redis does not say so (a daemon
    /// killed between the ack and the publisher's pipeline; the record
    /// follows the job, see docs/concepts.md#the-job-record).
    records_behind: usize,
    /// job id -> `S s1` lines, for jobs with more than one.
    runs_twice: BTreeMap<String, usize>,
    /// (job, stage) -> `C` lines, for those with more than one.
    stage_commits_twice: BTreeMap<(String, String), usize>,
    /// `PRAGMA integrity_check`.
    integrity: String,
    /// Stage pools on (asserted then: jobs were handed over).
    pools: bool,
    /// `job_handed_over` lines over every daemon process's log.
    handovers: usize,
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
    fn gather(h: &Harness, ledger: &Path, produced: Produced, acked: &BTreeSet<String>) -> Self {
        let mut r = Report {
            acked: produced.acked.len(),
            indeterminate: produced.indeterminate.len(),
            produce_time: produced.time,
            ..Report::default()
        };
        let completed = h.ids_with_status("completed");
        r.completed = completed.len();
        r.dead = dead_entries(h);
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
        if let Some(conn) = open_sqlite_read_only(&h.db) {
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
        let files = daemon_log_files(h);
        r.log_files = files.len();
        let mut completions: HashMap<String, usize> = HashMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            r.handovers += text.matches("\"event\":\"job_handed_over\"").count();
            for line in text.lines().filter(|l| l.contains("job_completed")) {
                // A SIGKILL may cut the last line short: it does not parse.
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v["event"] != "job_completed" {
                    continue;
                }
                if let Some(id) = v["job_id"].as_str() {
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
        r.records_behind = records_behind(h, &completed);

        // The ledger.
        let (starts, ends) = ledger_counts_by_stage(ledger);
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
            (
                "handovers between pools (with pools)",
                !self.pools || self.handovers > 0,
                self.handovers.to_string(),
            ),
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
            "completed, job record in Redis behind",
            self.records_behind.to_string(),
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
