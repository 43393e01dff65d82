//! Logs: `--log-format json|pretty`, `RUST_LOG` filters, and every line of
//! a job's life carrying its id, so `grep <id>` shows the whole story.

mod common;

use std::time::Duration;

use common::{Harness, wait_until};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[jobs.talky]
stages = [
  { name = "speak", run = ["sh", "-c", "echo 'a note on stderr' >&2; echo 'not protocol'; echo '{\"result\": 1}'"] },
  { name = "rest", builtin = "noop" },
]
"#;

#[test]
fn grep_on_a_job_id_shows_its_whole_life_in_json_and_pretty() {
    let h = Harness::new(CONFIG);
    for (format, id) in [("json", "life-json"), ("pretty", "life-pretty")] {
        let mut d = h.spawn_daemon(
            "w1",
            &["--log-format", format],
            &[("RUST_LOG", "conveyor=info")],
        );
        assert!(
            h.cli(&["enqueue", "talky", "--id", id], &[])
                .status
                .success()
        );
        wait_until(LONG, "the job completes", || {
            h.job_status(id).as_deref() == Some("completed")
        });
        d.sigterm();
        assert!(d.wait_exit(LONG).success());
        let log = d.log();
        let mine: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        for event in [
            "job_started",
            "stage_started",
            "a note on stderr",
            "not protocol",
            "stage_completed",
            "job_completed",
        ] {
            assert!(
                mine.iter().any(|l| l.contains(event)),
                "{format}: no `{event}` line with the id {id}:\n{}",
                mine.join("\n")
            );
        }
        if format == "json" {
            for line in &mine {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v["timestamp"].is_string() && v["level"].is_string(),
                    "{line}"
                );
            }
        } else {
            assert!(
                mine.iter().all(|l| !l.trim_start().starts_with('{')),
                "pretty lines are not JSON"
            );
        }
    }
}

#[test]
fn rust_log_filters_what_is_written() {
    let h = Harness::new(CONFIG);
    let mut d = h.spawn_daemon(
        "w1",
        &["--log-format", "json"],
        &[("RUST_LOG", "conveyor=warn,conveyor::worker=info")],
    );
    assert!(
        h.cli(&["enqueue", "talky", "--id", "quiet"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("quiet").as_deref() == Some("completed")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    assert!(log.contains("worker_started"), "{log}");
    // conveyor::worker::runner is below conveyor::worker: info is on there.
    assert!(log.contains("job_completed"), "{log}");
    // The exec stage's output is logged by conveyor::pipeline: off.
    assert!(!log.contains("a note on stderr"), "{log}");
}
