//! Bounded shutdown: a daemon told to stop while Redis is gone, or while its
//! SQLite disk is full, exits non-zero within its bound
//! (`fetch_block_ms` + `shutdown_grace_secs` + `kill_grace_secs` + 15 s),
//! says why, and loses nothing: once Redis is back (or space is freed) and
//! the daemon starts again with its id, every job completes.
//!
//! Same style as `faults.rs`: a private Redis, the real binary, ledger
//! stages; the only time asserted is the documented bound, with slack for a
//! busy machine.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Harness, ledger_stage, poll_until, wait_until};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// Short timings: the drain's bound is 0.1 + 1 + 1 + 15 s.
const FAST_WORKER: &str = "concurrency = 4\nheartbeat_secs = 1\ndead_after_secs = 3\n\
fetch_block_ms = 100\npromote_interval_ms = 50\nshutdown_grace_secs = 1\nkill_grace_secs = 1\n";
const BOUND: Duration = Duration::from_millis(100 + 1000 + 1000 + 15_000);
/// What a shared, busy machine may add to the bound (process start-up,
/// scheduling); the test fails only past the bound plus this.
const SLACK: Duration = Duration::from_secs(10);

/// Config of two-stage jobs of type `two`, each stage sleeping a bit and
/// returning a result of `result_bytes` (a short one when 0).
fn config(ledger: &Path, result_bytes: usize) -> String {
    let mut c = format!("[worker]\n{FAST_WORKER}\n[jobs.two]\nmax_attempts = 1\n");
    for name in ["s1", "s2"] {
        let result = match result_bytes {
            0 => format!(r#"echo '{{"result": "{name}"}}';"#),
            n => {
                format!(r#"printf '{{"result": "%s"}}\n' "$(head -c {n} /dev/zero | tr '\0' a)";"#)
            }
        };
        c += &ledger_stage("two", name, ledger, &format!("sleep 0.2; {result}"));
    }
    c
}

fn push_jobs(h: &Harness, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("j{i:03}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        let job = json!({"id": id, "type": "two", "payload": {"id": id}});
        pipe.lpush(h.pending_key("default"), job.to_string())
            .ignore();
    }
    let () = pipe.query(&mut h.redis.conn()).expect("LPUSH jobs");
    ids
}

/// SIGTERMs `d` and waits for its exit: non-zero, within the bound (plus
/// slack), with the reason in an ERROR log line and on stderr.
fn stop_past_bound(d: &mut Daemon) {
    let asked = Instant::now();
    d.sigterm();
    let status = d.try_wait_exit(BOUND + SLACK).unwrap_or_else(|| {
        panic!(
            "the daemon did not exit within {:?}; log tail:\n{}",
            BOUND + SLACK,
            d.log_tail(40)
        )
    });
    let took = asked.elapsed();
    eprintln!("exited {status:?} {took:?} after SIGTERM (bound {BOUND:?})");
    assert_eq!(status.code(), Some(1), "log tail:\n{}", d.log_tail(40));
    let gave_up: Vec<_> = d
        .log_events()
        .into_iter()
        .filter(|e| e["event"] == "shutdown_gave_up")
        .collect();
    assert_eq!(gave_up.len(), 1, "log tail:\n{}", d.log_tail(40));
    assert_eq!(gave_up[0]["level"], "error");
    let why = gave_up[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("recovered when it starts again"), "{why}");
    // The plain line `conveyor worker` prints on stderr (the log file
    // holds the daemon's stderr).
    assert!(
        d.log()
            .lines()
            .any(|l| l.starts_with("conveyor: shutdown gave up after")),
        "log tail:\n{}",
        d.log_tail(40)
    );
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// Every job completed once in SQLite, none dead, nothing left in Redis.
fn assert_all_completed(h: &Harness, ids: &[String], worker: &str) {
    wait_until(LONG, "every job completed", || {
        h.count_status("completed") == ids.len() as u64
    });
    for id in ids {
        assert_eq!(h.job_status(id).as_deref(), Some("completed"), "job {id}");
    }
    assert_eq!(h.llen(&h.dead_key("default")), 0, "dead list");
    let empty = poll_until(Duration::from_secs(15), || {
        h.llen(&h.pending_key("default")) == 0 && h.llen(&h.active_key("default", worker)) == 0
    });
    assert!(empty, "jobs left in Redis");
}

/// Restarts worker `id` (with `spawn`), retrying while the previous run's
/// registration is still live.
fn restart(mut spawn: impl FnMut() -> Daemon) -> Daemon {
    for _ in 0..10 {
        let mut d = spawn();
        match d.wait_started_within(Duration::from_secs(15)) {
            Ok(()) => return d,
            Err(why) => {
                eprintln!("restart refused: {why}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    panic!("the daemon could not be restarted");
}

/// (a) Redis killed under load (AOF on, `appendfsync always`), SIGTERM: the
/// daemon gives up on Redis and exits 1 within the bound. Redis back, the
/// daemon started again with its id: every job completes.
#[test]
fn redis_gone_at_sigterm_exits_within_the_bound() {
    const N: usize = 40;
    let mut h = Harness::with_redis_args("", &["--appendonly", "yes", "--appendfsync", "always"]);
    let ledger = h.path("ledger");
    h.write_config(&config(&ledger, 0));
    let mut d = h.daemon("w1", &[]);
    let ids = push_jobs(&h, N);
    wait_until(LONG, "some jobs completed", || {
        h.count_status("completed") >= 6
    });

    h.redis.kill();
    // Jobs now fail their Redis calls and retry.
    std::thread::sleep(Duration::from_millis(500));
    stop_past_bound(&mut d);
    let log = d.log();
    assert!(
        log.contains("redis_call_given_up"),
        "no job gave up on Redis; log tail:\n{}",
        d.log_tail(40)
    );

    h.redis.start_again();
    let d = restart(|| h.spawn_daemon("w1", &[], &[]));
    assert_all_completed(&h, &ids, "w1");
    stop(d);
}

/// A tmpfs mounted for one test, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (and why) when not root or when mounting fails.
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        // SAFETY: reads the effective user id.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("filler file");
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    // Smaller pieces for the last partial chunk.
    while file.write_all(&chunk[..512]).is_ok() {
        written += 512;
    }
    let _ = file.sync_all();
    written
}

/// (b) The SQLite file on a small tmpfs that fills up under load, SIGTERM:
/// the writer's held batch no longer holds the exit; the daemon exits 1
/// within the bound. Space freed, the daemon started again: every job
/// completes. Skipped unless running as root with `mount -t tmpfs`.
#[test]
fn sqlite_disk_full_at_sigterm_exits_within_the_bound() {
    const N: usize = 20;
    let mut h = Harness::new("");
    let mnt = h.path("mnt");
    let _tmpfs = match Tmpfs::mount(&mnt, "4m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let ledger = h.path("ledger");
    // Results of 20 kB: every job grows the database, so a checkpoint
    // that restarts the WAL cannot make room on the full disk (and all 20
    // jobs, WAL included, fit in the 4 MB once the filler is gone).
    h.write_config(&config(&ledger, 20_000));
    // The daemon's log goes next to the path the harness is given: keep it
    // off the tmpfs, and hand the daemon the tmpfs path in CONVEYOR_DB.
    let anchor = h.path("logs.db");
    h.db = mnt.join("conveyor.db");
    let db = h.db.to_string_lossy().into_owned();
    let spawn = |h: &Harness| {
        Daemon::spawn(
            &h.redis.url(),
            &h.prefix,
            &anchor,
            &h.config,
            "w1",
            &[],
            &[("CONVEYOR_DB", db.as_str())],
        )
    };
    let mut d = restart(|| spawn(&h));
    let ids = push_jobs(&h, N);
    wait_until(LONG, "some jobs completed", || {
        h.count_status("completed") >= 6
    });

    // Kept full: a failed transaction's rollback frees a little space,
    // which the filler takes back at once.
    let filler = mnt.join("filler");
    let keep_full = Arc::new(AtomicBool::new(true));
    let filling = std::thread::spawn({
        let (filler, keep_full) = (filler.clone(), keep_full.clone());
        move || {
            let mut filled = 0;
            while keep_full.load(Ordering::Relaxed) {
                filled += fill(&filler);
                std::thread::sleep(Duration::from_millis(5));
            }
            filled
        }
    });
    let failed = poll_until(Duration::from_secs(30), || {
        d.log().contains("sqlite_transaction_failed")
    });
    assert!(
        failed,
        "SQLite never failed on a full disk; log tail:\n{}",
        d.log_tail(40)
    );
    eprintln!("tmpfs full; SIGTERM");
    stop_past_bound(&mut d);
    keep_full.store(false, Ordering::Relaxed);
    let filled = filling.join().expect("filler thread");
    eprintln!("{filled} bytes of filler in all");
    assert!(
        d.log().contains("shutdown_sqlite_batch_dropped"),
        "{}",
        d.log_tail(40)
    );

    std::fs::remove_file(&filler).expect("free the space");
    let d = restart(|| spawn(&h));
    assert_all_completed(&h, &ids, "w1");
    stop(d);
}

fn stop(mut d: Daemon) {
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", d.log());
}
