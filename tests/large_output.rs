//! Large data through the real binary: stage results bigger than the
//! producer limit travel with a requeued or retried job without making it
//! poison, a result over `worker.max_result_bytes` fails its stage, and a
//! stage printing a huge line does not grow the daemon's memory with it
//! (its peak RSS, VmHWM, is read from /proc; no speed is asserted).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, enqueue, ledger_count, ledger_lines, ledger_stage, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(15);

/// Bytes of the result stage s1 returns: three times `max_job_bytes`.
const BLOB: usize = 3_000_000;

fn wait_job_status(h: &Harness, id: &str, status: &str) {
    wait_until(LONG, &format!("job {id} to be {status} in SQLite"), || {
        h.job_status(id).as_deref() == Some(status)
    });
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn vm_hwm_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Shell printing `{"result": {"blob": "bbb…"}}` with `n` b's.
fn big_result(n: usize) -> String {
    format!(
        r#"printf '{{"result": {{"blob": "'; head -c {n} /dev/zero | tr '\0' b; printf '"}}}}\n';"#
    )
}

/// s1 returns a 3 MB result; s2 takes ~10 s when the daemon has SLOW=1
/// (so a SIGTERM finds it running), and in the `flaky` type fails its
/// first attempt (a marker file says it ran).
fn config(ledger: &Path, marker: &Path) -> String {
    let mut c = String::from(
        "[worker]\nconcurrency = 2\nshutdown_grace_secs = 1\nkill_grace_secs = 1\n\n\
         [jobs.big]\nmax_attempts = 1\n",
    );
    c += &ledger_stage("big", "s1", ledger, &big_result(BLOB));
    c += &ledger_stage(
        "big",
        "s2",
        ledger,
        r#"if [ "$SLOW" = 1 ]; then i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi; echo '{"result": 2}';"#,
    );
    c += "\n[jobs.flaky]\nmax_attempts = 2\nbackoff_ms = 50\nbackoff_max_ms = 50\n";
    c += &ledger_stage("flaky", "f1", ledger, &big_result(BLOB));
    c += &ledger_stage(
        "flaky",
        "f2",
        ledger,
        &format!(
            r#"if [ ! -e {m} ]; then touch {m}; exit 3; fi; echo '{{"result": 2}}';"#,
            m = marker.display()
        ),
    );
    c
}

fn blob_len(v: &Value) -> usize {
    v["blob"].as_str().map(str::len).unwrap_or(0)
}

#[test]
fn a_job_carrying_a_large_result_is_requeued_and_retried_and_resumes_at_its_stage() {
    let h = Harness::new("");
    let ledger = h.path("ledger");
    let marker = h.path("flaky-ran");
    h.write_config(&config(&ledger, &marker));
    let mut a = h.daemon("wa", &[("SLOW", "1")]);
    let id = enqueue(&h, &["big", "--id", "big-1"]);

    wait_until(LONG, "stage s2 to start", || {
        ledger_count(&ledger, &format!("S s2 {id}")) == 1
    });
    a.sigterm();
    let status = a.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "daemon A: {status:?}");

    // Requeued with the 3 MB checkpoint: over max_job_bytes (1 MiB).
    let raw = h.lrange(&h.pending_key("default"));
    assert_eq!(raw.len(), 1, "pending");
    assert!(
        raw[0].len() > BLOB && raw[0].len() > 1 << 20,
        "{}",
        raw[0].len()
    );
    let job: Value = serde_json::from_slice(&raw[0]).unwrap();
    assert_eq!(blob_len(&job["_conveyor"]["results"]["s1"]), BLOB);
    assert_eq!(h.job_status(&id).as_deref(), Some("pending"));

    // Daemon B (quick s2) parses it and resumes at s2.
    let mut b = h.daemon("wb", &[]);
    wait_job_status(&h, &id, "completed");
    for (line, n) in [("S s1", 1), ("C s1", 1), ("S s2", 2), ("C s2", 1)] {
        assert_eq!(
            ledger_count(&ledger, &format!("{line} {id}")),
            n,
            "`{line}`; ledger:\n{}",
            ledger_lines(&ledger).join("\n")
        );
    }
    let rec = h.job_ok(&id);
    assert_eq!(rec["worker_id"], "wb", "{}", rec["worker_id"]);
    let s1 = rec["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "s1"))
        .expect("stage s1");
    assert_eq!(blob_len(&s1["result"]), BLOB);

    // A retry after such a stage: scheduled with the 3 MB checkpoint,
    // promoted, parsed, resumed at f2.
    let flaky = enqueue(&h, &["flaky", "--id", "flaky-1"]);
    wait_job_status(&h, &flaky, "completed");
    for (line, n) in [("S f1", 1), ("C f1", 1), ("S f2", 2), ("C f2", 1)] {
        assert_eq!(
            ledger_count(&ledger, &format!("{line} {flaky}")),
            n,
            "`{line}`; ledger:\n{}",
            ledger_lines(&ledger).join("\n")
        );
    }
    assert_eq!(h.llen(&h.dead_key("default")), 0, "nothing dead-lettered");
    assert!(
        !b.log().contains("over the limit"),
        "a carried result was refused:\n{}",
        b.log_tail(20)
    );
    b.sigterm();
    assert_eq!(b.wait_exit(EXIT).code(), Some(0));
}

/// Shell printing 50 MB of `x` on one line, without a newline, after an
/// optional prefix.
fn flood(prefix: &str) -> String {
    format!("printf '{prefix}'; head -c 50000000 /dev/zero | tr '\\0' x")
}

#[test]
fn oversized_results_fail_their_stage_and_huge_lines_stay_bounded() {
    let mut c = String::from(
        "[worker]\nconcurrency = 5\nmax_result_bytes = 1048576\n\n\
         [jobs.toobig]\nmax_attempts = 1\nstages = [{ name = \"make\", run = [\"sh\", \"-c\", ",
    );
    c += &format!("'''{}'''] }}]\n", big_result(1_100_000));
    for (kind, prefix) in [("flood", r#"{"result": ""#), ("noise", "")] {
        c += &format!(
            "[jobs.{kind}]\nmax_attempts = 1\nstages = [{{ name = \"spew\", run = [\"sh\", \"-c\", '''{}'''] }}]\n",
            flood(prefix)
        );
    }
    let h = Harness::new(&c);
    let ids: Vec<(String, &str)> = [
        ("flood", "flood-1"),
        ("flood", "flood-2"),
        ("noise", "noise-1"),
        ("noise", "noise-2"),
        ("toobig", "toobig-1"),
    ]
    .into_iter()
    .map(|(kind, id)| (enqueue(&h, &[kind, "--id", id]), kind))
    .collect();
    let mut d = h.daemon("w1", &[]);

    for (id, _) in &ids {
        wait_until(LONG, &format!("job {id} to end"), || {
            matches!(h.job_status(id).as_deref(), Some("completed" | "failed"))
        });
    }
    let peak_kib = vm_hwm_kib(d.pid());
    eprintln!("daemon VmHWM with 4 stages printing 50 MB lines: {peak_kib} KiB");
    assert!(
        peak_kib < 100 * 1024,
        "the daemon's peak RSS was {peak_kib} KiB"
    );
    for (id, kind) in &ids {
        let want = if *kind == "noise" {
            "completed"
        } else {
            "failed"
        };
        assert_eq!(h.job_status(id).as_deref(), Some(want), "{id}");
    }

    let dead = h.lrange_json(&h.dead_key("default"));
    assert_eq!(dead.len(), 3, "{dead:#?}");
    for entry in &dead {
        let id = entry["id"].as_str().expect("a job, not a poison message");
        let error = entry["_conveyor"]["error"].as_str().unwrap_or_default();
        let rec = h.job_ok(id);
        assert_eq!(rec["status"], "failed", "{rec:#}");
        assert_eq!(rec["error"].as_str(), Some(error), "{rec:#}");
        assert!(
            error.starts_with("stage `make` failed:") || error.starts_with("stage `spew` failed:"),
            "{error}"
        );
        if id.starts_with("toobig") {
            // 1_100_000 b's, the quotes and `{"blob":}`.
            assert!(
                error.contains(
                    "result of 1100011 bytes is over worker.max_result_bytes (1048576 bytes)"
                ),
                "{error}"
            );
        } else {
            assert!(
                error.contains(
                    "printed a protocol line of 50000012 bytes on stdout, \
                     over worker.max_result_bytes (1048576 bytes) + 65536"
                ),
                "{error}"
            );
        }
    }
    assert!(!d.log().contains("over the limit"), "{}", d.log_tail(20));
    d.sigterm();
    assert_eq!(d.wait_exit(EXIT).code(), Some(0));
}

/// Runs `n` jobs of one stage running `script` at once (concurrency `n`,
/// `max_result_bytes` as given); the daemon's peak RSS in KiB, and at start.
fn peak_rss_of(n: usize, max_result_bytes: usize, script: &str, end: &str) -> (u64, u64) {
    let c = format!(
        "[worker]\nconcurrency = {n}\nmax_result_bytes = {max_result_bytes}\n\n\
         [jobs.noise]\nmax_attempts = 1\n\
         stages = [{{ name = \"spew\", run = [\"sh\", \"-c\", '''{script}'''] }}]\n"
    );
    let h = Harness::new(&c);
    let ids: Vec<String> = (0..n)
        .map(|i| enqueue(&h, &["noise", "--id", &format!("n{i}")]))
        .collect();
    let mut d = h.daemon("w1", &[]);
    let base_kib = vm_hwm_kib(d.pid());
    for id in &ids {
        wait_job_status(&h, id, end);
    }
    let peak_kib = vm_hwm_kib(d.pid());
    d.sigterm();
    assert_eq!(d.wait_exit(EXIT).code(), Some(0));
    (peak_kib, base_kib)
}

/// 64 stages printing 50 MB lines at once; prints the daemon's peak RSS.
/// A measurement, run by hand (docs/benchmarks.md):
/// `cargo test --test large_output -- --ignored --nocapture`.
#[test]
#[ignore]
fn sixty_four_noisy_stages_rss() {
    const N: usize = 64;
    const MIB: usize = 1 << 20;
    // Noise: held 2 KiB per stage, whatever max_result_bytes is.
    let (peak, base) = peak_rss_of(N, 16 * MIB, &flood(""), "completed");
    eprintln!("{N} stages, a 50 MB noise line each: daemon VmHWM {peak} KiB (at start {base} KiB)");
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    // Would-be result lines: each held up to max_result_bytes + 64 KiB.
    for max in [MIB, 16 * MIB] {
        let (peak, base) = peak_rss_of(N, max, &flood(r#"{"result": ""#), "failed");
        eprintln!(
            "{N} stages, a 50 MB `{{\"result\": ...` line each, max_result_bytes = {max}: \
             daemon VmHWM {peak} KiB (at start {base} KiB)"
        );
        let bound = (N * (max + 64 * 1024) / 1024) as u64 + 100 * 1024;
        assert!(peak < bound, "peak RSS {peak} KiB, bound {bound} KiB");
    }
}
