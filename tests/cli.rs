//! The operator commands against a real Redis and SQLite: `jobs`, `doctor`,
//! `cleanup`, `completions`, and bad values on the command line.

mod common;

use std::time::Duration;

use common::{Harness, stderr_of as err, stdout_of as out, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default", "other"]

[retry]
max_attempts = 1

[jobs.quick]
stages = [{ name = "only", builtin = "noop" }]

[jobs.broken]
queue = "other"
stages = [{ name = "boom", builtin = "fail", args = { message = "broken on purpose" } }]
"#;

fn json_of(h: &Harness, args: &[&str]) -> Value {
    let o = h.cli(args, &[]);
    assert!(o.status.success(), "{args:?}: {}", err(&o));
    serde_json::from_str(&out(&o)).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", out(&o)))
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn jobs_lists_with_filters_and_pages() {
    let h = Harness::new(CONFIG);
    for i in 0..5 {
        assert!(
            h.cli(&["enqueue", "quick", "--id", &format!("q{i}")], &[])
                .status
                .success()
        );
    }
    assert!(
        h.cli(&["enqueue", "broken", "--id", "b0"], &[])
            .status
            .success()
    );

    // Before any daemon: the waiting jobs come from Redis, next to run first.
    let pending = json_of(&h, &["jobs", "--status", "pending", "--json"]);
    assert_eq!(pending["total"], 6);
    assert_eq!(ids(&pending)[..5], ["q0", "q1", "q2", "q3", "q4"]);
    let only_broken = json_of(
        &h,
        &["jobs", "--status", "pending", "--type", "broken", "--json"],
    );
    assert_eq!(ids(&only_broken), ["b0"]);
    assert!(
        h.cli(&["enqueue", "quick", "--id", "later", "--delay", "1h"], &[])
            .status
            .success()
    );
    let scheduled = json_of(&h, &["jobs", "--status", "scheduled", "--json"]);
    assert_eq!(ids(&scheduled), ["later"]);
    assert!(scheduled["jobs"][0]["due_at"].is_string());

    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "the jobs ran", || {
        h.count_status("completed") == 5 && h.count_status("failed") == 1
    });
    d.sigterm();
    d.wait_exit(LONG);

    let all = json_of(&h, &["jobs", "--json"]);
    assert_eq!(all["total"], 6);
    let failed = json_of(&h, &["jobs", "--status", "failed", "--json"]);
    assert_eq!(ids(&failed), ["b0"]);
    assert!(
        failed["jobs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("broken on purpose"),
        "{failed}"
    );
    let other = json_of(&h, &["jobs", "--queue", "other", "--json"]);
    assert_eq!(ids(&other), ["b0"]);
    let recent = json_of(&h, &["jobs", "--since", "1h", "--type", "quick", "--json"]);
    assert_eq!(recent["total"], 5);
    let none = json_of(&h, &["jobs", "--since", "2099-01-01T00:00:00Z", "--json"]);
    assert_eq!(none["total"], 0);

    // Pages of 2 cover all 6, none twice.
    let mut seen = Vec::new();
    for page in 1..=3 {
        let p = json_of(
            &h,
            &[
                "jobs",
                "--limit",
                "2",
                "--page",
                &page.to_string(),
                "--json",
            ],
        );
        assert_eq!(p["jobs"].as_array().unwrap().len(), 2);
        seen.extend(ids(&p));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6);

    let text = out(&h.cli(&["jobs", "--limit", "4"], &[]));
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains("1-4 of 6; --page 2 for more"), "{text}");
    let bad = h.cli(&["jobs", "--status", "lost"], &[]);
    assert_eq!(bad.status.code(), Some(2), "{}", err(&bad));
}

#[test]
fn doctor_passes_on_a_healthy_setup_and_names_what_is_wrong() {
    let h = Harness::new(CONFIG);
    let ok = h.cli(&["doctor"], &[]);
    assert!(ok.status.success(), "{}{}", out(&ok), err(&ok));
    let text = out(&ok);
    for check in [
        "config",
        "sqlite",
        "redis",
        "version",
        "eviction",
        "permissions",
        "scripts",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("✅") && l.contains(check)),
            "{check}: {text}"
        );
    }
    // Every script is loaded, the job record's included: none is left to
    // fail on first use under a user that may not load scripts.
    assert!(text.contains("8 Lua scripts loaded"), "{text}");
    let record = redis::Script::new(include_str!("../src/progress/record.lua"));
    let loaded: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(record.get_hash())
        .query(&mut h.redis.conn())
        .unwrap();
    assert_eq!(loaded, [true], "record.lua loaded by doctor");
    let report = json_of(&h, &["doctor", "--json"]);
    assert_eq!(report["ok"], true);

    // A user that may not BLMOVE nor touch the dead lists.
    let mut conn = h.redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "narrow",
                "on",
                ">pw",
                "+@all",
                "-blmove",
                "resetkeys",
            ][..],
        )
        .arg(format!("~{}:*", h.prefix))
        .arg(format!("%R~{}:{{default}}:dead", h.prefix))
        .arg("&*")
        .query(&mut conn)
        .unwrap();
    let url = h.redis.url().replace("redis://", "redis://narrow:pw@");
    let narrow = h.cli(&["--redis-url", &url, "doctor"], &[]);
    assert_eq!(narrow.status.code(), Some(1), "{}", out(&narrow));
    let line = out(&narrow)
        .lines()
        .find(|l| l.contains("permissions"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.starts_with("❌"), "{line}");
    assert!(line.contains("narrow") && line.contains("BLMOVE"), "{line}");
    assert!(
        !out(&narrow).contains(":pw@"),
        "the password is never shown"
    );

    // Redis allowed to evict keys.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "allkeys-lru"][..])
        .query(&mut conn)
        .unwrap();
    let evicting = h.cli(&["doctor"], &[]);
    assert_eq!(evicting.status.code(), Some(1));
    assert!(
        out(&evicting)
            .lines()
            .any(|l| l.starts_with("❌") && l.contains("allkeys-lru")),
        "{}",
        out(&evicting)
    );

    // A bad config is a failed check, not a usage error.
    h.write_config("[worker]\nconcurrency = 0\n");
    let bad = h.cli(&["doctor"], &[]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(out(&bad).starts_with("❌ config"), "{}", out(&bad));
    assert!(out(&bad).contains("worker.concurrency"), "{}", out(&bad));

    // Nothing listening: Redis is the failed check.
    h.write_config(CONFIG);
    let down = h.cli(&["--redis-url", "redis://127.0.0.1:1", "doctor"], &[]);
    assert_eq!(down.status.code(), Some(1));
    assert!(
        out(&down).lines().any(|l| l.starts_with("❌ redis")),
        "{}",
        out(&down)
    );
}

#[test]
fn cleanup_deletes_old_finished_jobs() {
    let h = Harness::new(CONFIG);
    for i in 0..3 {
        assert!(
            h.cli(&["enqueue", "quick", "--id", &format!("q{i}")], &[])
                .status
                .success()
        );
    }
    let mut d = h.daemon("w1", &[]);
    wait_until(LONG, "the jobs ran", || h.count_status("completed") == 3);
    // Not old enough: nothing goes.
    let kept = json_of(&h, &["cleanup", "--older-than", "1d", "--json"]);
    assert_eq!(kept["jobs_deleted"], 0);
    // While the daemon still runs (SQLite is shared).
    let gone = json_of(&h, &["cleanup", "--older-than", "0s", "--vacuum", "--json"]);
    assert_eq!(gone["jobs_deleted"], 3);
    assert_eq!(gone["stages_deleted"], 3);
    assert_eq!(gone["vacuumed"], true);
    assert_eq!(json_of(&h, &["jobs", "--json"])["total"], 0);
    // The daemon goes on writing.
    assert!(
        h.cli(&["enqueue", "quick", "--id", "after"], &[])
            .status
            .success()
    );
    wait_until(LONG, "a job after the cleanup ran", || {
        h.job_status("after").as_deref() == Some("completed")
    });
    d.sigterm();
    d.wait_exit(LONG);
    let text = out(&h.cli(&["cleanup", "--older-than", "0s"], &[]));
    assert!(text.contains("deleted 1 job(s)"), "{text}");
}

#[test]
fn completions_for_each_shell() {
    let h = Harness::new("");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = h.cli_without_config(&["completions", shell], &[]);
        assert!(o.status.success(), "{shell}: {}", err(&o));
        let script = out(&o);
        assert!(script.contains("conveyor"), "{shell}");
        assert!(
            script.contains("doctor") && script.contains("cleanup"),
            "{shell}"
        );
    }
    let o = h.cli_without_config(&["completions", "tcsh"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn watch_draws_one_bar_per_job_on_a_terminal() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: `script` (util-linux) not found to give watch a terminal");
        return;
    }
    let h = Harness::new(
        r#"
[jobs.steps]
stages = [
  { name = "one", builtin = "sleep", args = { ms = 1500 } },
  { name = "two", builtin = "sleep", args = { ms = 1500 } },
]
"#,
    );
    let mut d = h.daemon("w1", &[]);
    // `script` runs watch on a pseudo-terminal and copies what it draws.
    let watch = format!(
        "{} --config {} watch bar-job",
        common::BIN,
        h.config.display()
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &watch, "/dev/null"])
        .env("CONVEYOR_REDIS_URL", h.redis.url())
        .env("CONVEYOR_PREFIX", &h.prefix)
        .env("CONVEYOR_DB", &h.db)
        .env("COLUMNS", "120");
    let child = std::thread::spawn(move || common::run_with_timeout(cmd, LONG));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        h.cli(&["enqueue", "steps", "--id", "bar-job"], &[])
            .status
            .success()
    );
    let o = child.join().unwrap();
    let screen = out(&o);
    assert!(o.status.success(), "{screen}{}", err(&o));
    assert!(screen.contains("bar-job"), "{screen}");
    assert!(
        screen.contains("[=") || screen.contains("=>"),
        "a bar was drawn: {screen}"
    );
    assert!(screen.contains("job_completed"), "the final line: {screen}");
    d.sigterm();
    d.wait_exit(LONG);
}

/// `conveyor ... | head` ends quietly when the reader goes away (SIGPIPE),
/// instead of panicking on the broken pipe.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' completions bash 2>err.txt | head -c 1 >/dev/null; cat err.txt",
            common::BIN
        ))
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .expect("run sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("panicked"), "{text}");
    assert!(!text.contains("Broken pipe"), "{text}");
}

/// Every bad value on the command line: exit 2 (a usage error, never the
/// 101 of a panic), with a message naming the flag and the value.
#[test]
fn bad_values_are_usage_errors_naming_the_flag_and_the_value() {
    let h = Harness::new(CONFIG);
    let cases: &[(&[&str], &str, &str)] = &[
        (&["enqueue", "quick", "--at", "€a€"], "--at", "€a€"),
        (
            &["enqueue", "quick", "--at", "2026-11-23T18:00:00€€€€€€"],
            "--at",
            "2026-11-23T18:00:00€€€€€€",
        ),
        (
            &["enqueue", "quick", "--at", "1969-12-31T23:59:59Z"],
            "--at",
            "before 1970",
        ),
        (&["enqueue", "quick", "--delay", "5€"], "--delay", "5€"),
        (
            &["enqueue", "quick", "--delay", "101years"],
            "--delay",
            "101years",
        ),
        (
            &["enqueue", "quick", "--delay", "99999999999999999y"],
            "--delay",
            "99999999999999999y",
        ),
        (&["enqueue", "quick", "--payload", "{€"], "--payload", "{€"),
        (&["enqueue", "quick", "--id", "a b"], "--id", "a b"),
        (&["enqueue", "quick", "--id", ""], "--id", "empty"),
        (&["jobs", "--since", "€€€€€€"], "--since", "€€€€€€"),
        (&["jobs", "--since", "yesterday"], "--since", "yesterday"),
        (&["jobs", "--limit", "0"], "--limit", "'0'"),
        (&["jobs", "--page", "0"], "--page", "'0'"),
        (&["jobs", "--limit", "-3"], "", "-3"),
        (&["dead", "list", "--limit", "0"], "--limit", "'0'"),
        (
            &["cleanup", "--older-than", "7 parsecs"],
            "--older-than",
            "7 parsecs",
        ),
        (&["cleanup", "--older-than", "€"], "--older-than", "€"),
    ];
    for (args, flag, value) in cases {
        let o = h.cli(args, &[]);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(flag) && e.contains(value), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    // A page far past the end is an empty page, not an overflow.
    assert!(h.cli(&["enqueue", "quick"], &[]).status.success());
    let far = [
        "jobs",
        "--status",
        "pending",
        "--page",
        "18446744073709551615",
        "--limit",
        "7",
        "--json",
    ];
    let v = json_of(&h, &far);
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["jobs"], serde_json::json!([]), "{v}");
}
