//! A short run of `conveyor bench` so that the benchmark never rots: the
//! real binary, its private redis-server and daemons, its JSON report.
//! Shape and sanity only: no timing or throughput thresholds.

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let mut cmd = Command::new(common::BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("bench").args(args);
    // A guard against a hang, not a timing assertion.
    let out = common::run_with_timeout(cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "conveyor bench failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench --json printed no JSON ({e}):\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// A `{median, min, max, runs}` figure: ordered, with one value per run.
fn stat(v: &Value, what: &str, runs: usize) -> f64 {
    let (median, min, max) = (
        num(&v["median"], what),
        num(&v["min"], what),
        num(&v["max"], what),
    );
    assert!(min <= median && median <= max, "{what} not ordered: {v}");
    assert_eq!(
        v["runs"].as_array().map(Vec::len),
        Some(runs),
        "{what}: {v}"
    );
    median
}

#[test]
fn quick_bench_reports_every_figure() {
    let report = bench(&[
        "--quick",
        "--jobs",
        "2000",
        "--runs",
        "1",
        "--json",
        "--scenarios",
        "ceiling,noop,latency,redis",
    ]);

    assert_eq!(report["schema"], 1);
    let machine = &report["machine"];
    assert!(num(&machine["nproc"], "nproc") >= 1.0);
    assert!(!machine["cpu_model"].as_str().unwrap_or("").is_empty());
    assert!(!machine["redis_version"].as_str().unwrap_or("").is_empty());
    assert_eq!(machine["redis"], "private");
    let params = &report["params"];
    assert_eq!(params["jobs"], 2000);
    assert_eq!(params["runs"], 1);
    assert_eq!(
        params["scenarios"],
        serde_json::json!(["ceiling", "noop", "latency", "redis"])
    );

    let ceiling = &report["ceiling"];
    assert_eq!(ceiling["jobs"], 2000);
    assert!(stat(&ceiling["jobs_per_sec"], "ceiling jobs/s", 1) > 0.0);

    let noop = report["noop"].as_array().expect("noop is a list");
    let names: Vec<&str> = noop.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["c1", "c16", "c64", "2x64", "4x64"]);
    for t in noop {
        let name = t["name"].as_str().unwrap_or("?");
        let jobs = t["jobs"].as_u64().expect("jobs");
        assert!(jobs > 0, "{name}");
        // Every job completed in SQLite (the bench fails otherwise, too).
        assert_eq!(
            t["completed_in_sqlite"],
            serde_json::json!([jobs]),
            "{name}"
        );
        assert!(stat(&t["jobs_per_sec"], name, 1) > 0.0, "{name}");
        assert!(stat(&t["ratio_to_ceiling"], name, 1) > 0.0, "{name}");
        assert!(stat(&t["round_trips_per_job"], name, 1) > 0.0, "{name}");
        assert_eq!(t["job_type"], "noop1");
    }
    assert_eq!(noop[3]["daemons"], 2);
    assert_eq!(noop[4]["daemons"], 4);

    let latency = report["latency"].as_array().expect("latency is a list");
    let rates: Vec<u64> = latency
        .iter()
        .filter_map(|l| l["rate_per_sec"].as_u64())
        .collect();
    assert_eq!(rates, [1000, 500]);
    for l in latency {
        let rate = l["rate_per_sec"].as_u64().unwrap_or(0);
        let pushed = l["pushed"][0].as_u64().expect("pushed");
        assert!(pushed > 0, "{rate}: nothing pushed");
        assert!(
            l["missed_completed"].as_u64().expect("missed_completed") < pushed,
            "{rate}: no job_completed received"
        );
        for key in ["enqueue_to_start_ms", "enqueue_to_done_ms"] {
            let p = &l[key];
            let what = format!("{rate} jobs/s {key}");
            let p50 = stat(&p["p50"], &what, 1);
            let p99 = stat(&p["p99"], &what, 1);
            let max = stat(&p["max"], &what, 1);
            assert!(
                0.0 < p50 && p50 <= p99 && p99 <= max,
                "{what} percentiles out of order: {p}"
            );
        }
        assert!(stat(&l["commands_per_job_total"], "latency commands/job", 1) > 0.0);
        assert!(l["commands_per_job"].is_object());
        assert!(l["note"].as_str().unwrap_or("").contains("upper bound"));
    }

    let redis = &report["redis"];
    assert!(stat(&redis["round_trips_per_job"], "round trips/job", 1) > 0.0);
    assert!(stat(&redis["commands_per_job_total"], "commands/job", 1) > 0.0);
    let commands = redis["commands_per_job"]
        .as_object()
        .expect("commands_per_job is an object");
    assert!(
        num(&commands["publish"], "publish per job") > 0.0,
        "{commands:?}"
    );
    assert_eq!(redis["producer_commands_per_job"], 1.0);

    // Not selected: absent, not invented.
    assert_eq!(report["pipeline"], serde_json::json!([]));
    assert!(report["memory"].is_null());
    assert!(report["targets"].is_array());
}

/// The `pipeline` rows of a pools-only bench run, by name.
fn pool_rows(records: bool, jobs: u64) -> Vec<Value> {
    let jobs_arg = jobs.to_string();
    let mut args = vec![
        "--quick",
        "--jobs",
        &jobs_arg,
        "--runs",
        "1",
        "--json",
        "--scenarios",
        "pools",
    ];
    if !records {
        args.push("--no-records");
    }
    let report = bench(&args);
    assert_eq!(report["params"]["scenarios"], serde_json::json!(["pools"]));
    let rows = report["pipeline"].as_array().expect("pipeline is a list");
    let names: Vec<&str> = rows.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["noop4-1pool-2x64", "noop4ab-2pools-2x64"]);
    rows.clone()
}

#[test]
fn quick_pools_bench_counts_handovers_and_record_memory() {
    const JOBS: u64 = 1000;
    for records in [true, false] {
        let rows = pool_rows(records, JOBS);
        for t in &rows {
            let name = format!("{} records={records}", t["name"].as_str().unwrap_or("?"));
            assert_eq!(t["jobs"], JOBS, "{name}");
            assert_eq!(t["daemons"], 2, "{name}");
            assert_eq!(
                t["completed_in_sqlite"],
                serde_json::json!([JOBS]),
                "{name}"
            );
            assert!(stat(&t["jobs_per_sec"], &name, 1) > 0.0, "{name}");
            // One figure per run whatever it is; its sign depends on records.
            let bytes = stat(&t["redis_bytes_per_job"], &name, 1);
            if records {
                assert!(bytes > 500.0, "{name}: {bytes} B/job retained");
            } else {
                assert!(bytes.abs() < 200.0, "{name}: {bytes} B/job retained");
            }
        }
        let (one, two) = (&rows[0], &rows[1]);
        assert_eq!(one["job_type"], "noop4");
        assert_eq!(two["job_type"], "noop4ab");
        // One pool: never a handover. Pools a/b/a/b: one after each stage
        // but the last (3), more when a handed-over job is taken first by
        // the daemon of the other pool (a first-take handover).
        let h1 = stat(&one["handovers_per_job"], "1 pool handovers/job", 1);
        assert_eq!(h1, 0.0, "records={records}");
        let h2 = stat(&two["handovers_per_job"], "2 pools handovers/job", 1);
        assert!(
            (3.0..=4.0).contains(&h2),
            "records={records}: {h2} handovers/job"
        );
    }
}
