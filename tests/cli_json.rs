//! The commands that change something: `--json` on each (one object, stable
//! fields; a failure is `{"error", "exit_code"}` with the usual exit code),
//! and `dead purge` needing ids or `--all`, asking first on a terminal.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Harness, stderr_of as stderr, stdout_of as stdout, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default", "other"]

[retry]
max_attempts = 1

[jobs.slow]
stages = [{ name = "wait", builtin = "sleep", args = { ms = 60000 } }]

[jobs.broken]
queue = "other"
stages = [{ name = "boom", builtin = "fail", args = { message = "broken on purpose" } }]
"#;

/// Runs a command that must succeed and print exactly one JSON object.
fn json_ok(h: &Harness, args: &[&str]) -> Value {
    let o = h.cli(args, &[]);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.trim().lines().count(), 1, "{args:?}: one line: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

/// Enqueues `n` broken jobs and waits until they are dead.
fn dead_jobs(h: &Harness, ids: &[&str]) {
    for id in ids {
        assert!(
            h.cli(&["enqueue", "broken", "--id", id], &[])
                .status
                .success()
        );
    }
    wait_until(LONG, "the broken jobs are dead", || {
        h.llen(&h.dead_key("other")) == ids.len() as u64
    });
}

#[test]
fn mutating_commands_answer_in_json() {
    let h = Harness::new(CONFIG);
    let mut d = h.daemon("w1", &[]);

    let enq = json_ok(&h, &["enqueue", "slow", "--id", "s1", "--json"]);
    assert_eq!(enq["id"], "s1", "{enq}");
    wait_until(LONG, "s1 runs", || {
        h.job_status("s1").as_deref() == Some("running")
    });
    let cancel = json_ok(&h, &["cancel", "s1", "--json"]);
    assert_eq!(cancel, json!({"id": "s1", "outcome": "stopped"}));
    let delayed = ["enqueue", "slow", "--id", "s2", "--delay", "1h"];
    assert!(h.cli(&delayed, &[]).status.success());
    let cancel = json_ok(&h, &["cancel", "s2", "--json"]);
    assert_eq!(cancel, json!({"id": "s2", "outcome": "recorded"}));

    dead_jobs(&h, &["b1", "b2", "b3"]);
    let retry = json_ok(&h, &["retry", "b1", "--json"]);
    assert_eq!(
        retry,
        json!({"requeued": [{"queue": "other", "id": "b1"}], "count": 1, "unreadable": 0})
    );
    wait_until(LONG, "b1 is dead again", || {
        h.llen(&h.dead_key("other")) == 3
    });
    let retry = json_ok(&h, &["dead", "retry", "--queue", "other", "b2", "--json"]);
    assert_eq!(retry["count"], 1, "{retry}");
    assert_eq!(retry["requeued"][0]["id"], "b2", "{retry}");
    wait_until(LONG, "b2 is dead again", || {
        h.llen(&h.dead_key("other")) == 3
    });
    let purge = json_ok(&h, &["dead", "purge", "b3", "--json"]);
    assert_eq!(purge, json!({"purged": 1, "queues": ["default", "other"]}));

    // Failures: the same exit codes, and one JSON object on stdout.
    for (args, code, says) in [
        (&["retry", "no-such", "--json"][..], 1, "no-such"),
        (&["cancel", "s1", "--json"], 1, "s1"),
        (
            &["enqueue", "slow", "--payload", "{", "--json"],
            2,
            "payload",
        ),
    ] {
        let o = h.cli(args, &[]);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)));
        assert_eq!(v["exit_code"], code, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{v}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    d.sigterm();
    d.wait_exit(LONG);
}

#[test]
fn dead_purge_needs_ids_or_all_and_asks_on_a_terminal() {
    let h = Harness::new(CONFIG);
    let mut d = h.daemon("w1", &[]);
    dead_jobs(&h, &["b1", "b2"]);
    let dead = || h.llen(&h.dead_key("other"));

    let o = h.cli(&["dead", "purge"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("ids") && stderr(&o).contains("--all"));
    let o = h.cli(&["dead", "purge", "b1", "--all"], &[]);
    assert_eq!(o.status.code(), Some(2), "ids and --all together");
    assert_eq!(dead(), 2);

    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal half: `script` (util-linux) not found");
    } else {
        // On a terminal, anything but y/yes keeps them.
        for answer in ["\n", "n\n", "nope\n"] {
            let (code, screen) = on_terminal(&h, "dead purge --all", answer);
            assert_eq!(code, Some(1), "{screen}");
            assert!(
                screen.contains("purge 2 dead job(s) of queue(s) default, other? [y/N]"),
                "{screen}"
            );
            assert!(screen.contains("not purged"), "{screen}");
            assert_eq!(dead(), 2, "{answer:?} keeps them");
        }
        let (code, screen) = on_terminal(&h, "dead purge --all --queue other", "yes\n");
        assert_eq!(code, Some(0), "{screen}");
        assert!(screen.contains("of queue(s) other?"), "{screen}");
        assert!(screen.contains("2 dead job(s) purged"), "{screen}");
        assert_eq!(dead(), 0);
        dead_jobs(&h, &["b3"]);
        // --yes skips the question.
        let (code, screen) = on_terminal(&h, "dead purge --all --yes", "");
        assert_eq!(code, Some(0), "{screen}");
        assert!(!screen.contains("[y/N]"), "{screen}");
        assert_eq!(dead(), 0);
        dead_jobs(&h, &["b4"]);
    }
    // Off a terminal (scripts, cron) --all proceeds without asking.
    let purge = json_ok(&h, &["dead", "purge", "--all", "--json"]);
    assert_eq!(purge["purged"], 1, "{purge}");
    assert_eq!(dead(), 0);
    d.sigterm();
    d.wait_exit(LONG);
}

/// Runs `conveyor <args>` on a pseudo-terminal (`script`), typing `input`;
/// its exit code and everything it wrote.
fn on_terminal(h: &Harness, args: &str, input: &str) -> (Option<i32>, String) {
    let line = format!("{} --config {} {args}", common::BIN, h.config.display());
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("CONVEYOR_REDIS_URL", h.redis.url())
        .env("CONVEYOR_PREFIX", &h.prefix)
        .env("CONVEYOR_DB", &h.db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut stdin = child.stdin.take().unwrap();
    // Typed once the question is up; a closed stdin is an end of input.
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let deadline = std::time::Instant::now() + LONG;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`conveyor {args}` on a terminal did not finish within {LONG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("script output");
    let screen = format!("{}{}", stdout(&out), stderr(&out));
    (out.status.code(), screen)
}
