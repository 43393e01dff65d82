//! Fault-injection tests: daemons and Redis killed, paused and restarted,
//! SQLite locked, failing, cancelled and crash-inducing jobs.
//!
//! Same style as `e2e.rs`: each test owns a Redis, a temp dir, a key prefix
//! and a SQLite file, runs the real binary, and polls with generous
//! deadlines; nothing asserts on speed. Stages are `sh -c` scripts that
//! append to a ledger file: `S <stage> <job> <pid>` when they start and
//! `C <stage> <job> <pid>` when they end (see [`ledger_stage`]).
//!
//! Every test ends with the same checks (RELIABILITY.md §4): each job is
//! completed once or in the dead list with its reason, and nothing is left
//! behind in Redis (pending, active lists, scheduled, leases, crash counts,
//! cancellation flags).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Daemon, Harness, TestRedis, enqueue, ledger_count, ledger_lines, ledger_pid, ledger_stage,
    poll_until, toml_str, wait_until,
};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

/// Short timings shared by every test: a daemon silent for 3 s is dead.
const FAST_WORKER: &str = "heartbeat_secs = 1\ndead_after_secs = 3\nfetch_block_ms = 100\n\
promote_interval_ms = 50\nshutdown_grace_secs = 2\nkill_grace_secs = 1\n";

// ---------------------------------------------------------------- helpers

/// `S` lines per (stage, job) in the ledger.
fn stage_starts(ledger: &Path) -> BTreeMap<(String, String), usize> {
    let mut starts = BTreeMap::new();
    for line in ledger_lines(ledger) {
        let mut parts = line.split(' ');
        if parts.next() == Some("S")
            && let (Some(stage), Some(job)) = (parts.next(), parts.next())
        {
            *starts
                .entry((stage.to_owned(), job.to_owned()))
                .or_default() += 1;
        }
    }
    starts
}

/// Stage starts beyond the first, over the whole ledger.
fn dup_starts(ledger: &Path) -> usize {
    stage_starts(ledger).values().map(|n| n - 1).sum()
}

/// LPUSHes jobs `{prefix}000..` of `kind` in one pipeline; returns the ids
/// in the order they will be taken.
fn push_jobs(h: &Harness, kind: &str, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        let job = json!({"id": id, "type": kind, "payload": {"id": id}});
        pipe.lpush(h.pending_key("default"), job.to_string())
            .ignore();
    }
    let () = pipe.query(&mut h.redis.conn()).expect("LPUSH jobs");
    ids
}

fn wait_job_status(h: &Harness, id: &str, status: &str) {
    wait_until(LONG, &format!("job {id} to be {status} in SQLite"), || {
        h.job_status(id).as_deref() == Some(status)
    });
}

fn count_jobs(h: &Harness) -> u64 {
    h.sql_query(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get::<_, i64>(0)))
        .unwrap_or(0) as u64
}

fn key(h: &Harness, what: &str) -> String {
    format!("{}:{{default}}:{what}", h.prefix)
}

fn hlen(h: &Harness, key: &str) -> u64 {
    redis::cmd("HLEN")
        .arg(key)
        .query(&mut h.redis.conn())
        .expect("HLEN")
}

fn zcard(h: &Harness, key: &str) -> u64 {
    redis::cmd("ZCARD")
        .arg(key)
        .query(&mut h.redis.conn())
        .expect("ZCARD")
}

/// What is left in Redis for the default queue: non-empty keys among
/// pending, the given workers' active lists, scheduled, leases, crash
/// counts and cancellation flags.
fn residue(h: &Harness, workers: &[&str]) -> Vec<String> {
    let mut left = Vec::new();
    let mut note = |name: String, n: u64| {
        if n > 0 {
            left.push(format!("{name} = {n}"));
        }
    };
    note("pending".into(), h.llen(&h.pending_key("default")));
    for w in workers {
        note(format!("active:{w}"), h.llen(&h.active_key("default", w)));
    }
    note("scheduled".into(), zcard(h, &key(h, "scheduled")));
    for hash in ["leases", "crashes", "cancelled"] {
        note(hash.into(), hlen(h, &key(h, hash)));
    }
    left
}

/// Waits until [`residue`] is empty (a job's Redis settlement follows its
/// SQLite commit, so it may lag by a moment); panics with what is left.
fn assert_no_residue(h: &Harness, workers: &[&str]) {
    let mut left = Vec::new();
    let clean = poll_until(Duration::from_secs(15), || {
        left = residue(h, workers);
        left.is_empty()
    });
    assert!(clean, "left in Redis: {left:?}");
}

/// The job id of a JSON log line (the job span's field, at the top level).
fn log_job_id(e: &Value) -> Option<&str> {
    e["job_id"].as_str()
}

/// Log events named `message`, counted per job id, over several daemons'
/// logs (killed ones included).
fn log_counts(daemons: &[&Daemon], message: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for d in daemons {
        for e in d.log_events() {
            if e["event"] == message
                && let Some(id) = log_job_id(&e)
            {
                *counts.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    counts
}

/// Whether any log line of `id` has a message starting with `prefix`.
fn logged_for(daemons: &[&Daemon], id: &str, prefix: &str) -> bool {
    daemons.iter().any(|d| {
        d.log_events().iter().any(|e| {
            log_job_id(e) == Some(id) && e["event"].as_str().is_some_and(|m| m.starts_with(prefix))
        })
    })
}

/// Whether `d`'s log ends job `id`'s story with its last stage completed:
/// the daemon was killed after that, before it could report the job.
fn killed_after_last_stage(d: &Daemon, id: &str, last_stage: &str) -> bool {
    let events = d.log_events();
    let last = events.iter().rev().find(|e| log_job_id(e) == Some(id));
    last.is_some_and(|e| e["event"] == "stage_completed" && e["stage"] == last_stage)
}

/// "Completions reported once": no job logs `job_completed` twice, and
/// each logs it once unless the run that committed its completion could
/// not report it. That must then show in the logs: one of `excuses` (log
/// message prefixes) for the job, or a `killed` daemon whose log ends the
/// job with its `last_stage` completed (SIGKILL between the commit or the
/// ack and the log line). Returns the number of such jobs.
fn assert_completions_reported_once(
    daemons: &[&Daemon],
    killed: &[&Daemon],
    ids: &[String],
    last_stage: &str,
    excuses: &[&str],
) -> usize {
    let counts = log_counts(daemons, "job_completed");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "job_completed logged more than once: {twice:?}"
    );
    let unknown: Vec<_> = counts.keys().filter(|id| !ids.contains(id)).collect();
    assert!(
        unknown.is_empty(),
        "job_completed for unknown jobs: {unknown:?}"
    );
    let mut unreported = 0;
    for id in ids {
        if counts.get(id).copied().unwrap_or(0) == 1 {
            continue;
        }
        let why = if let Some(x) = excuses.iter().find(|x| logged_for(daemons, id, x)) {
            format!("its log says {x:?}")
        } else if let Some(d) = killed
            .iter()
            .find(|d| killed_after_last_stage(d, id, last_stage))
        {
            format!("{} was killed after its last stage", d.worker_id)
        } else {
            panic!(
                "job {id}: completed in SQLite, but no daemon logged job_completed (nor any of {excuses:?}, nor a kill after its last stage)"
            );
        };
        eprintln!("job {id}: no job_completed: {why}");
        unreported += 1;
    }
    unreported
}

fn assert_all_completed(h: &Harness, ids: &[String]) {
    assert_eq!(h.count_status("completed"), ids.len() as u64);
    assert_eq!(count_jobs(h), ids.len() as u64, "jobs in SQLite");
    for id in ids {
        assert_eq!(h.job_status(id).as_deref(), Some("completed"), "job {id}");
    }
    assert_eq!(
        h.llen(&h.dead_key("default")),
        0,
        "dead: {:?}",
        h.lrange_json(&h.dead_key("default"))
    );
}

/// Log lines at WARN or ERROR.
fn warn_lines(d: &Daemon) -> usize {
    d.log_events()
        .iter()
        .filter(|e| e["level"] == "warn" || e["level"] == "error")
        .count()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: only signals processes this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn stop_daemon(mut d: Daemon) {
    d.sigterm();
    let status = d.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", d.log());
}

fn statuses(job: &Value, list: &str) -> Vec<String> {
    job[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {job:#}"))
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Job config of `n` ledger stages sleeping `secs` each.
fn sleepy_job(kind: &str, ledger: &Path, stages: &[(&str, &str)]) -> String {
    let mut c = format!("[jobs.{kind}]\nmax_attempts = 1\n");
    for (name, secs) in stages {
        c += &ledger_stage(
            kind,
            name,
            ledger,
            &format!(r#"sleep {secs}; echo '{{"result": "{name}"}}';"#),
        );
    }
    c
}

// ---------------------------------------------------------------- 1

/// T1: SIGKILL under load. Two daemons, 200 two-stage jobs; one daemon is
/// killed and restarted with its id (self-recovery), later the other is
/// killed for good (the survivor's reaper recovers its jobs).
#[test]
fn sigkill_under_load_loses_nothing() {
    const N: usize = 200;
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\nconcurrency = 4\n{FAST_WORKER}\n{}",
        sleepy_job("chaos", &ledger, &[("s1", "0.02"), ("s2", "0.05")])
    ));
    let mut w1 = h.daemon("w1", &[]);
    let mut w2 = h.daemon("w2", &[]);
    let ids = push_jobs(&h, "chaos", "j", N);

    wait_until(LONG, "a third of the jobs completed", || {
        h.count_status("completed") >= N as u64 / 3
    });
    w1.sigkill();
    assert!(w1.wait_exit(EXIT).code().is_none(), "killed by a signal");
    let in_flight_w1 = h.llen(&h.active_key("default", "w1"));
    std::thread::sleep(Duration::from_millis(500));
    let w1b = h.daemon("w1", &[]);

    wait_until(LONG, "two thirds of the jobs completed", || {
        h.count_status("completed") >= 2 * N as u64 / 3
    });
    w2.sigkill();
    assert!(w2.wait_exit(EXIT).code().is_none(), "killed by a signal");
    let in_flight_w2 = h.llen(&h.active_key("default", "w2"));
    let done_at_kill = h.count_status("completed");
    eprintln!(
        "in flight at the kills: w1 {in_flight_w1}, w2 {in_flight_w2}; completed when w2 died: {done_at_kill}"
    );

    wait_until(Duration::from_secs(60), "all jobs completed", || {
        h.count_status("completed") == N as u64
    });
    assert_all_completed(&h, &ids);
    assert_no_residue(&h, &["w1", "w2"]);
    // The survivor reaped w2 (its registration expired: it was not restarted).
    wait_until(LONG, "w1 to reap w2", || {
        w1b.log_events()
            .iter()
            .any(|e| e["event"] == "worker_reaped" && e["dead_worker"] == "w2")
    });
    let registered: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{}:workers", h.prefix))
        .query(&mut h.redis.conn())
        .expect("HKEYS workers");
    assert_eq!(registered, ["w1"], "registry");

    // Every stage ran to the end at least once; at-least-once may start (and
    // even end) a stage twice for the jobs in flight at a kill.
    let starts = stage_starts(&ledger);
    for id in &ids {
        for s in ["s1", "s2"] {
            assert!(
                ledger_count(&ledger, &format!("C {s} {id}")) >= 1,
                "{s} of {id} never ended"
            );
            assert!(starts.contains_key(&(s.to_owned(), id.clone())));
        }
    }
    let dups = dup_starts(&ledger);
    eprintln!(
        "duplicate stage starts: {dups} (jobs in flight at the kills: {})",
        in_flight_w1 + in_flight_w2
    );
    let excused = assert_completions_reported_once(
        &[&w1, &w1b, &w2],
        &[&w1, &w2],
        &ids,
        "s2",
        &["duplicate_finished_dropped"],
    );
    eprintln!(
        "completions committed but not reported (daemon killed after the commit, before the report): {excused}"
    );
    stop_daemon(w1b);
}

// ---------------------------------------------------------------- 2

/// T3a: Redis (AOF on) killed with -9 mid-run and restarted on the same
/// port 2 s later: the running daemon rides it out and finishes every job.
#[test]
fn redis_restart_mid_run() {
    const N: usize = 100;
    let mut h = Harness::new("");
    h.redis = TestRedis::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\nconcurrency = 4\n{FAST_WORKER}\n{}",
        sleepy_job("two", &ledger, &[("s1", "0.02"), ("s2", "0.02")])
    ));
    let mut d = h.daemon("w1", &[]);
    let pid = d.pid();
    let ids = push_jobs(&h, "two", "r", N);

    wait_until(LONG, "a third of the jobs completed", || {
        h.count_status("completed") >= N as u64 / 3
    });
    h.redis.kill();
    let done_at_kill = h.count_status("completed");
    std::thread::sleep(Duration::from_secs(2));
    h.redis.start_again();
    eprintln!("Redis killed with {done_at_kill} of {N} jobs completed");
    assert!(
        done_at_kill < N as u64,
        "the outage came too late to matter"
    );

    wait_until(Duration::from_secs(60), "all jobs completed", || {
        h.count_status("completed") == N as u64
    });
    assert!(!d.has_exited(), "the daemon died; log:\n{}", d.log());
    assert_eq!(d.pid(), pid);
    assert_all_completed(&h, &ids);
    assert_no_residue(&h, &["w1"]);
    for id in &ids {
        for s in ["s1", "s2"] {
            assert!(
                ledger_count(&ledger, &format!("C {s} {id}")) >= 1,
                "{s} of {id}"
            );
        }
    }
    eprintln!("duplicate stage starts: {}", dup_starts(&ledger));
    // A state change whose reply was lost with Redis is retried and then
    // finds its lease gone: the job is settled, but reported as abandoned.
    let excused = assert_completions_reported_once(
        &[&d],
        &[],
        &ids,
        "s2",
        &["job_abandoned", "duplicate_finished_dropped"],
    );
    eprintln!("completions not reported: {excused}");

    // The outage was logged, without a flood.
    let log = d.log();
    assert!(
        log.contains("fetch_failed") || log.contains("redis_call_failed"),
        "the outage left no trace in the log"
    );
    let warns = warn_lines(&d);
    eprintln!("WARN/ERROR lines over the outage: {warns}");
    assert!(warns < 200, "{warns} WARN/ERROR lines: a log flood");
    assert!(!log.contains("panicked"), "{log}");
    stop_daemon(d);
}

// ---------------------------------------------------------------- 3

/// T4: Redis paused (SIGSTOP) longer than `dead_after_secs`: every
/// registration looks expired at once when it resumes, yet no live daemon
/// is reaped and no stage starts twice.
#[test]
fn redis_paused_longer_than_dead_after_does_not_steal_live_jobs() {
    const N: usize = 8;
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\nconcurrency = 2\n{FAST_WORKER}\n{}",
        sleepy_job("long", &ledger, &[("s1", "4")])
    ));
    let w1 = h.daemon("w1", &[]);
    let w2 = h.daemon("w2", &[]);
    let ids = push_jobs(&h, "long", "p", N);
    wait_until(LONG, "4 stages running", || {
        ledger_lines(&ledger)
            .iter()
            .filter(|l| l.starts_with("S "))
            .count()
            == 4
    });
    std::thread::sleep(Duration::from_millis(500));
    h.redis.signal(libc::SIGSTOP);
    // dead_after_secs + 2 s.
    std::thread::sleep(Duration::from_secs(5));
    h.redis.signal(libc::SIGCONT);

    wait_until(Duration::from_secs(60), "all jobs completed", || {
        h.count_status("completed") == N as u64
    });
    assert_all_completed(&h, &ids);
    assert_no_residue(&h, &["w1", "w2"]);
    // A live daemon's job taken: reaped, started again elsewhere, or given
    // up (interrupted or abandoned) by the daemon that ran it.
    let starts = stage_starts(&ledger);
    let twice: Vec<_> = starts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stages started twice: {twice:?}");
    assert_eq!(starts.len(), N, "{starts:?}");
    for d in [&w1, &w2] {
        let events = d.log_events();
        for e in &events {
            let message = e["event"].as_str().unwrap_or_default();
            let stolen = message == "worker_reaped"
                || message == "stage_interrupted"
                || message == "job_abandoned";
            assert!(!stolen, "{}: {e}", d.worker_id);
            // A live daemon's job is never taken: no lease is lost (and
            // the heartbeat never mistakes the job's own ack for a loss).
            assert!(message != "lease_lost", "{}: {e}", d.worker_id);
        }
    }
    // The pause reached the daemons: each saw its registration expired, or
    // its heartbeat time out.
    for d in [&w1, &w2] {
        let log = d.log();
        assert!(
            log.contains("registration_expired") || log.contains("heartbeat_failed"),
            "{}: the pause left no trace; log:\n{log}",
            d.worker_id
        );
    }
    assert_completions_reported_once(&[&w1, &w2], &[], &ids, "s1", &[]);
    assert!(!w1.log().contains("panicked") && !w2.log().contains("panicked"));
    stop_daemon(w1);
    stop_daemon(w2);
}

// ---------------------------------------------------------------- 4

/// G3 + fencing: a daemon paused (SIGSTOP) past its registration's TTL is
/// reaped; another daemon runs the job; when the first one wakes up it
/// finds its lease gone and writes nothing.
#[test]
fn slow_daemon_is_fenced_after_being_reaped() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c =
        format!("[worker]\nconcurrency = 1\n{FAST_WORKER}\n[jobs.slow]\nmax_attempts = 1\n");
    // ~6 s on the daemon with SLOW=1 (A), quick elsewhere (B).
    c += &ledger_stage(
        "slow",
        "s1",
        &ledger,
        r#"if [ "$SLOW" = 1 ]; then sleep 6; fi; echo '{"result": "done"}';"#,
    );
    h.write_config(&c);
    let mut a = h.daemon("wa", &[("SLOW", "1")]);
    let sub = h.subscribe();
    let id = enqueue(&h, &["slow", "--id", "fenced-1"]);
    wait_until(LONG, "the stage to start on A", || {
        ledger_count(&ledger, &format!("S s1 {id}")) == 1
    });
    wait_until(LONG, "A to hold the job in SQLite", || {
        h.job_status(&id).as_deref() == Some("running")
    });

    let b = h.daemon("wb", &[]);
    signal(a.pid(), libc::SIGSTOP);
    // A's registration expires (dead_after_secs), B reaps A and runs the
    // job (quickly: B has no SLOW). Waited for, not timed: a busy machine
    // only makes it later.
    wait_until(LONG, "B to reap A", || {
        b.log_events()
            .iter()
            .any(|e| e["event"] == "worker_reaped" && e["dead_worker"] == "wa")
    });
    let done_while_stopped = h.job_status(&id);
    signal(a.pid(), libc::SIGCONT);

    wait_job_status(&h, &id, "completed");
    eprintln!("status when A woke up: {done_while_stopped:?}");
    // A notices, one way or the other, and stays up.
    wait_until(LONG, "A to give the job up", || {
        let log = a.log();
        log.contains("job_abandoned") || log.contains("lease_lost")
    });
    let how = if a.log().contains("lease_lost") {
        "lease_lost"
    } else {
        "job_abandoned"
    };
    eprintln!("A gave the job up with: {how}");
    // Leave A time to do anything wrong it might still do.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!a.has_exited(), "A died; log:\n{}", a.log());

    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "completed", "{rec:#}");
    assert_eq!(rec["worker_id"], "wb", "{rec:#}");
    let completed_attempts: Vec<&Value> = rec["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter(|a| a["status"] == "completed")
        .collect();
    assert_eq!(completed_attempts.len(), 1, "{rec:#}");
    assert_eq!(completed_attempts[0]["worker_id"], "wb", "{rec:#}");
    assert_eq!(
        log_counts(&[&a], "job_completed").get(&id),
        None,
        "A reported a completion"
    );
    assert_eq!(log_counts(&[&b], "job_completed").get(&id), Some(&1));
    let completed_msgs: Vec<Value> = sub
        .for_job(&id)
        .into_iter()
        .filter(|m| m["status"] == "completed")
        .collect();
    assert_eq!(completed_msgs.len(), 1, "{completed_msgs:#?}");
    assert_eq!(completed_msgs[0]["worker_id"], "wb");
    assert_eq!(h.llen(&h.dead_key("default")), 0);
    assert_no_residue(&h, &["wa", "wb"]);
    stop_daemon(a);
    stop_daemon(b);
}

// ---------------------------------------------------------------- 5

/// Holds SQLite's write lock from another connection for `hold`, sampling
/// meanwhile that no job is acked in Redis before its SQLite commit.
/// Returns how many samples were taken.
fn hold_sqlite_lock(h: &Harness, ids: &[String], hold: Duration) -> usize {
    let conn = rusqlite::Connection::open(&h.db).expect("open SQLite");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let until = Instant::now() + hold;
    let mut samples = 0;
    while Instant::now() < until {
        assert_acked_only_committed(h, ids);
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    conn.execute_batch("ROLLBACK").expect("release the lock");
    samples
}

/// Jobs gone from Redis (acked) must be committed in SQLite: Redis is read
/// first, so every ack seen was committed before the SQLite read.
fn assert_acked_only_committed(h: &Harness, ids: &[String]) {
    let in_redis = h.llen(&h.pending_key("default")) + h.llen(&h.active_key("default", "w1"));
    let acked = ids.len() as u64 - in_redis;
    let committed = h.count_status("completed");
    assert!(
        acked <= committed,
        "{acked} jobs acked in Redis but only {committed} completed in SQLite"
    );
}

/// T6: another process holds SQLite's write lock (first 3 s, then past the
/// daemon's 5 s busy timeout): the daemon waits, acks nothing it has not
/// committed, and loses nothing.
#[test]
fn sqlite_locked_delays_but_loses_nothing() {
    const N: usize = 50;
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\nconcurrency = 2\n{FAST_WORKER}\n{}",
        sleepy_job("quick", &ledger, &[("s1", "0.1")])
    ));
    let mut d = h.daemon("w1", &[]);
    let ids = push_jobs(&h, "quick", "q", N);

    wait_until(LONG, "10 jobs completed", || {
        h.count_status("completed") >= 10
    });
    let before = h.count_status("completed");
    let samples = hold_sqlite_lock(&h, &ids, Duration::from_secs(3));
    let after = h.count_status("completed");
    eprintln!("lock 1 (3 s): completed {before} -> {after}, {samples} samples");

    wait_until(LONG, "25 jobs completed", || {
        h.count_status("completed") >= 25
    });
    let before = h.count_status("completed");
    assert!(before < N as u64, "the jobs ran out before the second lock");
    let samples = hold_sqlite_lock(&h, &ids, Duration::from_millis(6500));
    eprintln!("lock 2 (6.5 s): {before} completed before, {samples} samples");
    assert!(!d.has_exited(), "the daemon died; log:\n{}", d.log());

    wait_until(LONG, "all jobs completed", || {
        assert_acked_only_committed(&h, &ids);
        h.count_status("completed") == N as u64
    });
    assert_all_completed(&h, &ids);
    assert_no_residue(&h, &["w1"]);
    for id in &ids {
        assert_eq!(
            ledger_count(&ledger, &format!("S s1 {id}")),
            1,
            "{id} started"
        );
        assert_eq!(
            ledger_count(&ledger, &format!("C s1 {id}")),
            1,
            "{id} ended"
        );
    }
    assert_completions_reported_once(&[&d], &[], &ids, "s1", &[]);
    // The lock outlasted the busy timeout: the writer failed and held on.
    let log = d.log();
    assert!(log.contains("sqlite_transaction_failed"), "{log}");
    assert!(log.contains("sqlite_writes_resumed"), "{log}");
    assert!(!d.has_exited());
    stop_daemon(d);
}

// ---------------------------------------------------------------- 7

/// Config of job type `kind`: one ledger stage exiting with `code`, a
/// message naming the attempt on stderr.
fn failing_job(kind: &str, ledger: &Path, code: u8, extra: &str) -> String {
    let mut c = format!("[jobs.{kind}]\n{extra}\n");
    c += &ledger_stage(
        kind,
        "s1",
        ledger,
        &format!(r#"echo "boom on attempt $CONVEYOR_ATTEMPT" >&2; exit {code};"#),
    );
    c
}

/// Statuses `retrying` / `failed` / `completed` of a job's progress
/// messages, in arrival order.
fn outcome_statuses(sub: &common::ProgressSub, id: &str) -> Vec<String> {
    sub.for_job(id)
        .iter()
        .filter_map(|m| m["status"].as_str())
        .filter(|s| ["retrying", "failed", "completed"].contains(s))
        .map(str::to_owned)
        .collect()
}

#[test]
fn retry_backoff_then_dead_with_last_error() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\n{FAST_WORKER}\n{}",
        failing_job("flaky", &ledger, 3, "max_attempts = 3\nbackoff_ms = 200")
    ));
    let d = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let id = enqueue(&h, &["flaky", "--id", "flaky-1"]);

    // While it waits for its next attempt, the job is in scheduled, due
    // in the future by Redis' clock. Polled tightly: it stays 100-400 ms.
    let mut conn = h.redis.conn();
    let scheduled = key(&h, "scheduled");
    let deadline = Instant::now() + LONG;
    let (entry, due, now) = loop {
        assert!(Instant::now() < deadline, "never saw {id} in {scheduled}");
        let (entries, time): (Vec<(String, f64)>, (u64, u64)) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&scheduled)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("TIME")
            .query(&mut conn)
            .expect("ZRANGE + TIME");
        if let Some((entry, due)) = entries.into_iter().next() {
            break (entry, due, time.0 * 1000 + time.1 / 1000);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let entry: Value = serde_json::from_str(&entry).expect("scheduled entry is JSON");
    assert_eq!(entry["id"], id.as_str(), "{entry}");
    assert!(
        due as u64 > now,
        "due {due} is not after Redis' now {now}: {entry}"
    );
    assert!(
        (due as u64) < now + 60_000,
        "sanity: due in {} ms",
        due as u64 - now
    );
    let next = entry["_conveyor"]["attempt"].as_u64();
    assert!(matches!(next, Some(2 | 3)), "{entry}");

    wait_job_status(&h, &id, "failed");
    sub.wait_status(&id, "failed", LONG);
    assert_eq!(
        outcome_statuses(&sub, &id),
        ["retrying", "retrying", "failed"],
        "{:#?}",
        sub.for_job(&id)
    );
    assert_eq!(ledger_count(&ledger, &format!("S s1 {id}")), 3);

    let rec = h.job_ok(&id);
    assert_eq!(rec["attempt"], 3, "{rec:#}");
    assert_eq!(
        statuses(&rec, "attempts"),
        ["failed", "failed", "failed"],
        "{rec:#}"
    );
    let numbers: Vec<(u64, u64)> = rec["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["epoch"].as_u64().unwrap(), a["attempt"].as_u64().unwrap()))
        .collect();
    let e = numbers[0].0;
    assert_eq!(numbers, [(e, 1), (e, 2), (e, 3)], "{rec:#}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("boom on attempt 3")),
        "{rec:#}"
    );

    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let meta = &dead[0]["_conveyor"];
    assert_eq!(dead[0]["id"], id.as_str());
    assert_eq!(meta["attempt"], 3, "{}", dead[0]);
    assert!(
        meta["error"]
            .as_str()
            .is_some_and(|e| e.contains("boom on attempt 3")),
        "{}",
        dead[0]
    );
    assert_no_residue(&h, &["w1"]);
    stop_daemon(d);
}

// ---------------------------------------------------------------- 8

#[test]
fn permanent_failure_is_not_retried() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\n{FAST_WORKER}\n{}",
        failing_job("perm", &ledger, 64, "max_attempts = 3\nbackoff_ms = 50")
    ));
    let d = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let id = enqueue(&h, &["perm", "--id", "perm-1"]);
    wait_job_status(&h, &id, "failed");
    sub.wait_status(&id, "failed", LONG);
    // Give a (wrong) retry the time to show up.
    std::thread::sleep(Duration::from_millis(500));

    assert_eq!(
        outcome_statuses(&sub, &id),
        ["failed"],
        "{:#?}",
        sub.for_job(&id)
    );
    assert_eq!(ledger_count(&ledger, &format!("S s1 {id}")), 1);
    let rec = h.job_ok(&id);
    assert_eq!(rec["status"], "failed", "{rec:#}");
    assert_eq!(statuses(&rec, "attempts"), ["failed"], "{rec:#}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("permanent") && error.contains("boom on attempt 1"),
        "{rec:#}"
    );
    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["_conveyor"]["attempt"], 1);
    assert_no_residue(&h, &["w1"]);
    stop_daemon(d);
}

// ---------------------------------------------------------------- 9

#[test]
fn per_job_overrides() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    h.write_config(&format!(
        "[worker]\n{FAST_WORKER}\n{}",
        failing_job("flaky", &ledger, 3, "max_attempts = 3\nbackoff_ms = 50")
    ));
    let d = h.daemon("w1", &[]);
    let sub = h.subscribe();
    let once = enqueue(&h, &["flaky", "--id", "once", "--max-attempts", "1"]);
    // The same type without the override: the type's 3 attempts.
    let thrice = enqueue(&h, &["flaky", "--id", "thrice"]);
    for id in [&once, &thrice] {
        wait_job_status(&h, id, "failed");
        sub.wait_status(id, "failed", LONG);
    }

    assert_eq!(
        outcome_statuses(&sub, &once),
        ["failed"],
        "{:#?}",
        sub.for_job(&once)
    );
    assert_eq!(ledger_count(&ledger, &format!("S s1 {once}")), 1);
    let rec = h.job_ok(&once);
    assert_eq!(rec["max_attempts"], 1, "{rec:#}");
    assert_eq!(statuses(&rec, "attempts"), ["failed"], "{rec:#}");

    assert_eq!(
        outcome_statuses(&sub, &thrice),
        ["retrying", "retrying", "failed"]
    );
    assert_eq!(ledger_count(&ledger, &format!("S s1 {thrice}")), 3);
    assert_eq!(h.job_ok(&thrice)["max_attempts"], 3);
    assert_eq!(h.llen(&h.dead_key("default")), 2);
    assert_no_residue(&h, &["w1"]);
    stop_daemon(d);
}

// ---------------------------------------------------------------- 10

#[test]
fn cancel_pending_and_running() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c = format!("[worker]\n{FAST_WORKER}\n[jobs.long]\nmax_attempts = 1\n");
    c += &ledger_stage("long", "s1", &ledger, "sleep 20;");
    h.write_config(&c);
    let cancelled_key = key(&h, "cancelled");

    // (a) Pending, no daemon running: it never runs.
    let early = enqueue(&h, &["long", "--id", "early"]);
    let out = h.cli(&["cancel", &early], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hlen(&h, &cancelled_key), 1, "cancellation flag");
    let d = h.daemon("w1", &[]);
    let sub = h.subscribe();
    wait_job_status(&h, &early, "cancelled");
    assert_eq!(ledger_count(&ledger, &format!("S s1 {early}")), 0, "it ran");
    assert_eq!(h.llen(&h.dead_key("default")), 0);
    assert_no_residue(&h, &["w1"]);

    // (b) Running: its stage's processes are stopped.
    let running = enqueue(&h, &["long", "--id", "running"]);
    wait_until(LONG, "the stage to start", || {
        ledger_count(&ledger, &format!("S s1 {running}")) == 1
    });
    let pid = ledger_pid(&ledger, &format!("S s1 {running}")).expect("pid in the ledger");
    assert!(process_alive(pid));
    let asked = Instant::now();
    let out = h.cli(&["cancel", &running], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        format!("{running} cancelled"),
        "cancel printed"
    );
    wait_until(
        Duration::from_secs(10),
        "the stage's process to be gone",
        || !process_alive(pid),
    );
    eprintln!("stage process gone {:?} after the cancel", asked.elapsed());
    wait_job_status(&h, &running, "cancelled");
    sub.wait_status(&running, "cancelled", LONG);
    assert_eq!(ledger_count(&ledger, &format!("C s1 {running}")), 0);
    let rec = h.job_ok(&running);
    assert_eq!(rec["status"], "cancelled", "{rec:#}");
    assert_eq!(
        h.llen(&h.dead_key("default")),
        0,
        "a cancelled job is not dead"
    );
    assert!(
        sub.for_job(&running)
            .iter()
            .all(|m| m["status"] != "completed" && m["status"] != "failed"),
        "{:#?}",
        sub.for_job(&running)
    );
    assert_no_residue(&h, &["w1"]);
    stop_daemon(d);
}

// ---------------------------------------------------------------- 11

fn cli_ok(h: &Harness, args: &[&str]) -> (String, String) {
    let out = h.cli(args, &[]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    (stdout, stderr)
}

/// `(epoch, attempt, status)` of each attempt, epochs counted from the
/// first one (`enqueue --id` stamps a job's first epoch with the enqueue
/// time; each revival adds one).
fn attempt_rows(h: &Harness, id: &str) -> Vec<(u64, u64, String)> {
    let rows: Vec<(u64, u64, String)> = h
        .job(id)
        .map(|j| {
            j["attempts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    (
                        a["epoch"].as_u64().unwrap_or(99),
                        a["attempt"].as_u64().unwrap_or(99),
                        a["status"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let first = rows.first().map_or(0, |r| r.0);
    rows.into_iter()
        .map(|(e, a, s)| (e - first, a, s))
        .collect()
}

#[test]
fn dead_list_retry_purge_cli() {
    let h = Harness::new("");
    let marker = h.path("fixed");
    h.write_config(&format!(
        r#"[worker]
{FAST_WORKER}
[jobs.perm]
max_attempts = 3
[[jobs.perm.stages]]
name = "s1"
run = ["sh", "-c", '''cat > /dev/null; if [ -e "$MARKER" ]; then echo '{{"result": "fixed"}}'; exit 0; fi; echo "permanent failure of $CONVEYOR_JOB_ID" >&2; exit 64''']
env = {{ MARKER = {} }}
"#,
        toml_str(marker.to_string_lossy())
    ));
    let d = h.daemon("w1", &[]);
    let ids: Vec<String> = ["d1", "d2", "d3"]
        .iter()
        .map(|id| enqueue(&h, &["perm", "--id", id]))
        .collect();
    for id in &ids {
        wait_job_status(&h, id, "failed");
    }
    wait_until(LONG, "3 dead jobs", || h.llen(&h.dead_key("default")) == 3);

    let (stdout, _) = cli_ok(&h, &["dead", "list", "--json"]);
    let list: Value = serde_json::from_str(&stdout).expect("dead list --json is JSON");
    let rows = list.as_array().expect("a list");
    assert_eq!(rows.len(), 3, "{list:#}");
    let mut listed = BTreeSet::new();
    for row in rows {
        assert_eq!(row["queue"], "default", "{row}");
        let entry = &row["entry"];
        let id = entry["id"].as_str().expect("id").to_owned();
        let error = entry["_conveyor"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("permanent failure of {id}")),
            "{row}"
        );
        listed.insert(id);
    }
    assert_eq!(listed, ids.iter().cloned().collect::<BTreeSet<_>>());

    // Fixed: `retry` one of them; it runs again as a revival (epoch 1).
    std::fs::write(&marker, "").unwrap();
    let (stdout, _) = cli_ok(&h, &["retry", "d1"]);
    assert!(stdout.contains("d1 requeued"), "{stdout}");
    wait_job_status(&h, "d1", "completed");
    assert_eq!(
        attempt_rows(&h, "d1"),
        [(0, 1, "failed".to_owned()), (1, 1, "completed".to_owned())]
    );
    assert_eq!(h.llen(&h.dead_key("default")), 2);

    // Broken again: `dead retry` moves the rest back; they fail again.
    std::fs::remove_file(&marker).unwrap();
    let (_, stderr) = cli_ok(&h, &["dead", "retry"]);
    assert!(stderr.contains("2 job(s) requeued"), "{stderr}");
    for id in ["d2", "d3"] {
        wait_until(LONG, &format!("{id} to fail again"), || {
            attempt_rows(&h, id) == [(0, 1, "failed".to_owned()), (1, 1, "failed".to_owned())]
        });
    }
    wait_until(LONG, "2 dead jobs again", || {
        h.llen(&h.dead_key("default")) == 2
    });

    let (stdout, _) = cli_ok(&h, &["dead", "purge", "--all"]);
    assert!(stdout.contains("2 dead job(s) purged"), "{stdout}");
    assert_eq!(h.llen(&h.dead_key("default")), 0);
    let (stdout, _) = cli_ok(&h, &["dead", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!([]));

    let out = h.cli(&["retry", "no-such-job"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-job"));
    assert_eq!(h.job_status("d1").as_deref(), Some("completed"));
    assert_no_residue(&h, &["w1"]);
    stop_daemon(d);
}

// ---------------------------------------------------------------- 12

/// T8h / G5: a job whose stage SIGKILLs its daemon runs `max_crashes` (3)
/// times, then goes to dead; the daemon is restarted each time, as systemd
/// would, and the other jobs complete.
#[test]
fn job_that_kills_its_daemon_is_quarantined() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c = format!(
        "[worker]\nconcurrency = 1\n{FAST_WORKER}\n\
         [jobs.normal]\nstages = [{{ name = \"e\", builtin = \"echo\" }}]\n\
         [jobs.killer]\n"
    );
    c += &ledger_stage("killer", "s1", &ledger, "kill -9 $PPID; sleep 1;");
    h.write_config(&c);
    // Taken in this order: n1, the killer, n2.
    enqueue(&h, &["normal", "--id", "n1"]);
    let killer = enqueue(&h, &["killer", "--id", "killer"]);
    enqueue(&h, &["normal", "--id", "n2"]);

    let mut daemons = vec![h.daemon("w1", &[])];
    let mut restarts = 0;
    let done = || {
        h.job_status(&killer).as_deref() == Some("failed")
            && h.job_status("n2").as_deref() == Some("completed")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out; restarts: {restarts}");
        let current = daemons.last_mut().expect("a daemon");
        if current.has_exited() {
            assert!(
                current.wait_exit(EXIT).code().is_none(),
                "killed by a signal"
            );
            restarts += 1;
            assert!(restarts <= 5, "more than 5 restarts");
            daemons.push(h.daemon("w1", &[]));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!("daemon restarts: {restarts}");

    assert_eq!(
        ledger_count(&ledger, &format!("S s1 {killer}")),
        3,
        "killer runs"
    );
    assert_eq!(restarts, 3);
    let rec = h.job_ok(&killer);
    assert_eq!(rec["status"], "failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("quarantined") && error.contains("max_crashes"),
        "{rec:#}"
    );
    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["id"], killer.as_str());
    let dead_error = dead[0]["_conveyor"]["error"].as_str().unwrap_or_default();
    assert!(dead_error.contains("quarantined"), "{}", dead[0]);
    for id in ["n1", "n2"] {
        assert_eq!(h.job_status(id).as_deref(), Some("completed"), "{id}");
    }
    assert_eq!(count_jobs(&h), 3);
    assert_no_residue(&h, &["w1"]);
    let last = daemons.pop().expect("the last daemon");
    assert!(!daemons.iter_mut().any(|d| !d.has_exited()));
    stop_daemon(last);
}

// ---------------------------------------------------------------- bugs

/// With no daemon ever reaped, no job's lease can be lost: a `lease_lost`
/// warning is false. The heartbeat's lease check (`check_runs`) snapshots
/// the claimed runs, then reads their leases; a run whose own ack (settle,
/// which deletes the lease) reaches Redis in between is still in the
/// snapshot and is reported as lost to another daemon. Four busy
/// daemons make the race show up within a few heartbeats.
#[test]
fn heartbeat_reports_no_lease_lost_for_jobs_it_settled() {
    const N: usize = 16_000;
    let h = Harness::new(&format!(
        "[worker]\nconcurrency = 32\n{FAST_WORKER}\n\
         [jobs.n]\nstages = [{{ name = \"n\", builtin = \"noop\" }}]\n"
    ));
    let daemons: Vec<Daemon> = (0..4).map(|i| h.daemon(&format!("w{i}"), &[])).collect();
    let mut ids = Vec::new();
    for batch in 0..N / 1000 {
        ids.extend(push_jobs(&h, "n", &format!("b{batch}-"), 1000));
    }
    wait_until(Duration::from_secs(90), "all jobs completed", || {
        h.count_status("completed") == N as u64
    });
    let workers: Vec<&str> = daemons.iter().map(|d| d.worker_id.as_str()).collect();
    assert_no_residue(&h, &workers);
    let mut false_alarms = Vec::new();
    for d in &daemons {
        let events = d.log_events();
        assert!(
            !events.iter().any(|e| e["event"] == "worker_reaped"),
            "a live daemon was reaped: the premise of this test failed"
        );
        for e in &events {
            if e["event"].as_str().is_some_and(|m| m == "lease_lost") {
                let id = e["job_id"].as_str().unwrap_or_default();
                let completed_here = events
                    .iter()
                    .any(|x| x["event"] == "job_completed" && log_job_id(x) == Some(id));
                false_alarms.push(format!(
                    "{} {id} (completed here: {completed_here})",
                    d.worker_id
                ));
            }
        }
    }
    assert!(
        false_alarms.is_empty(),
        "{} `lease_lost` warnings with no daemon reaped: {false_alarms:?}",
        false_alarms.len()
    );
    for d in daemons {
        stop_daemon(d);
    }
}

// ---------------------------------------------------------------- 13

/// An entry in a live daemon's own active list that no run of it owns (a
/// fetch whose reply was lost, and which a client retried by itself
/// without reporting an error) is put back on pending by the fetch loop's
/// periodic reconciliation (every 30 s), and runs.
#[test]
fn orphan_in_own_active_list_is_put_back() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let mut c = format!("[worker]\n{FAST_WORKER}\n[jobs.quick]\nmax_attempts = 1\n");
    c += &ledger_stage("quick", "s1", &ledger, "");
    h.write_config(&c);
    let d = h.daemon("w1", &[]);
    let first = enqueue(&h, &["quick"]);
    wait_job_status(&h, &first, "completed");
    // As if a BLMOVE had moved it and its reply had been lost.
    let orphan = json!({"id": "orphan", "type": "quick"}).to_string();
    let _: u64 = redis::cmd("LPUSH")
        .arg(h.active_key("default", "w1"))
        .arg(&orphan)
        .query(&mut h.redis.conn())
        .expect("LPUSH");
    wait_until(Duration::from_secs(60), "the orphan to run", || {
        h.job_status("orphan").as_deref() == Some("completed")
    });
    assert_eq!(ledger_count(&ledger, "S s1 orphan"), 1);
    assert_no_residue(&h, &["w1"]);
    drop(d);
}
