//! Logs: `--log-format json|pretty`, `RUST_LOG` filters, every line of a
//! job's life carrying its id, so `grep <id>` shows the whole story, the
//! flat shape of a JSON line, and no colour codes off a terminal.

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

/// Every JSON line of a real daemon (stderr into a file) is one flat
/// object: `timestamp`, lowercase `level`, `event`, `target`, and the job's
/// fields at the top level, never under `span`.
#[test]
fn json_lines_are_flat_with_event_level_and_job_fields() {
    let h = Harness::new(CONFIG);
    let mut d = h.spawn_daemon("w1", &["--log-format", "json"], &[]);
    assert!(
        h.cli(&["enqueue", "talky", "--id", "flat"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("flat").as_deref() == Some("completed")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    let mut seen = std::collections::BTreeSet::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let event = v["event"]
            .as_str()
            .unwrap_or_else(|| panic!("no event: {line}"));
        assert!(!event.is_empty(), "{line}");
        assert!(
            ["trace", "debug", "info", "warn", "error"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "{line}"
        );
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(
            v["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("conveyor")),
            "{line}"
        );
        for nested in ["span", "spans", "fields", "message"] {
            assert!(v.get(nested).is_none(), "`{nested}` in {line}");
        }
        for value in v.as_object().unwrap().values() {
            assert!(!value.is_object(), "a nested object in {line}");
        }
        if v["job_id"] == "flat" {
            // The job span's fields, at the top level of every line of it.
            assert_eq!(v["type"], "talky", "{line}");
            assert_eq!(v["queue"], "default", "{line}");
            assert_eq!(v["worker_id"], "w1", "{line}");
            seen.insert(event.to_owned());
            if event == "stage_output" {
                let said = (v["stream"].as_str(), v["line"].as_str());
                assert!(
                    said == (Some("stdout"), Some("not protocol"))
                        || said == (Some("stderr"), Some("a note on stderr")),
                    "{line}"
                );
            } else if event.starts_with("stage_") {
                assert!(v["stage"].is_string() && v["attempt"] == 1, "{line}");
            }
        }
    }
    for event in [
        "job_started",
        "stage_started",
        "stage_output",
        "stage_completed",
        "job_completed",
    ] {
        assert!(
            seen.contains(event),
            "no {event} line of the job: {seen:?}\n{log}"
        );
    }
    assert!(log.contains(r#""event":"worker_started""#), "{log}");
}

/// `--log-format pretty` into a file writes plain text: no ANSI colour
/// codes, whatever the format says, when stderr is not a terminal.
#[test]
fn pretty_into_a_file_has_no_colour_codes() {
    let h = Harness::new(CONFIG);
    let mut d = h.spawn_daemon("w1", &["--log-format", "pretty"], &[]);
    assert!(
        h.cli(&["enqueue", "talky", "--id", "plain"], &[])
            .status
            .success()
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("plain").as_deref() == Some("completed")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    assert!(log.contains("job_completed"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape in the log:\n{log}");
}
