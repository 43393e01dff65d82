//! Metrics through the `metrics` facade into `metrics-exporter-prometheus`.
//!
//! The recorder is installed only when a daemon has an HTTP listener
//! (`[worker] http`, served by `crate::worker::probe`). Recording is then a
//! few hash lookups per job; without a listener it is skipped altogether
//! ([`enabled`]), so the hot path pays one relaxed load.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `conveyor_jobs_started_total` | counter | `type`, `queue` |
//! | `conveyor_jobs_completed_total` | counter | `type`, `queue` |
//! | `conveyor_jobs_failed_total` | counter | `type`, `queue` (failed for good) |
//! | `conveyor_jobs_retried_total` | counter | `type`, `queue` |
//! | `conveyor_jobs_requeued_total` | counter | `type`, `queue` (shutdown) |
//! | `conveyor_jobs_handed_over_total` | counter | `type`, `queue` (stage pools) |
//! | `conveyor_jobs_cancelled_total` | counter | `type`, `queue` |
//! | `conveyor_jobs_dead_lettered_total` | counter | `queue` (failed jobs and poison messages) |
//! | `conveyor_job_duration_seconds` | histogram | `type`, `queue`, `outcome` |
//! | `conveyor_stage_duration_seconds` | histogram | `type`, `stage`, `outcome` |
//! | `conveyor_jobs_in_flight` | gauge | |
//! | `conveyor_fetch_duration_seconds` | histogram | |
//! | `conveyor_queue_depth` | gauge | `queue`, `list` (pending, scheduled, dead, active; `pool` with a `pool` label) |
//! | `conveyor_redis_errors_total` | counter | `op` |
//! | `conveyor_sqlite_errors_total` | counter | |
//! | `conveyor_heartbeat_age_seconds` | gauge | |
//! | `conveyor_up` | gauge | `worker_id`, `version` (always 1) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[cfg(feature = "prometheus")]
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether metrics are being recorded (a listener is configured).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How a job attempt or a stage ended, for the duration histograms.
pub fn job_outcome(kind: &str, queue: &str, outcome: &'static str, elapsed: Duration) {
    if !enabled() {
        return;
    }
    let name = match outcome {
        "completed" => "conveyor_jobs_completed_total",
        "failed" => "conveyor_jobs_failed_total",
        "retried" => "conveyor_jobs_retried_total",
        "requeued" => "conveyor_jobs_requeued_total",
        "handed_over" => "conveyor_jobs_handed_over_total",
        "cancelled" => "conveyor_jobs_cancelled_total",
        _ => return,
    };
    let labels = [("type", kind.to_owned()), ("queue", queue.to_owned())];
    metrics::counter!(name, &labels).increment(1);
    let labels = [
        ("type", kind.to_owned()),
        ("queue", queue.to_owned()),
        ("outcome", outcome.to_owned()),
    ];
    metrics::histogram!("conveyor_job_duration_seconds", &labels).record(elapsed.as_secs_f64());
}

pub fn job_started(kind: &str, queue: &str) {
    if enabled() {
        let labels = [("type", kind.to_owned()), ("queue", queue.to_owned())];
        metrics::counter!("conveyor_jobs_started_total", &labels).increment(1);
    }
}

pub fn stage_done(kind: &str, stage: &str, outcome: &'static str, elapsed: Duration) {
    if enabled() {
        let labels = [
            ("type", kind.to_owned()),
            ("stage", stage.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        metrics::histogram!("conveyor_stage_duration_seconds", &labels)
            .record(elapsed.as_secs_f64());
    }
}

pub fn dead_lettered(queue: &str) {
    if enabled() {
        metrics::counter!("conveyor_jobs_dead_lettered_total", "queue" => queue.to_owned())
            .increment(1);
    }
}

pub fn fetched(elapsed: Duration) {
    if enabled() {
        metrics::histogram!("conveyor_fetch_duration_seconds").record(elapsed.as_secs_f64());
    }
}

pub fn redis_error(op: &str) {
    if enabled() {
        metrics::counter!("conveyor_redis_errors_total", "op" => op.to_owned()).increment(1);
    }
}

pub fn sqlite_error() {
    if enabled() {
        metrics::counter!("conveyor_sqlite_errors_total").increment(1);
    }
}

/// The process-wide Prometheus recorder, installed once. Without the
/// `prometheus` feature there is none, and [`enabled`] stays false.
#[cfg(feature = "prometheus")]
pub fn recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let seconds = [
        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        30.0, 60.0, 300.0, 900.0, 3600.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(&seconds)
        .map_err(|e| format!("metrics: {e}"))?
        .install_recorder()
        .map_err(|e| format!("metrics: {e}"))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(handle)
}

/// `# HELP` lines.
#[cfg(feature = "prometheus")]
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("conveyor_jobs_started_total", "Job attempts started");
    describe_counter!("conveyor_jobs_completed_total", "Jobs completed");
    describe_counter!(
        "conveyor_jobs_failed_total",
        "Jobs failed for good (moved to the dead list)"
    );
    describe_counter!(
        "conveyor_jobs_retried_total",
        "Attempts failed with another one scheduled"
    );
    describe_counter!(
        "conveyor_jobs_requeued_total",
        "Jobs put back on pending at shutdown"
    );
    describe_counter!(
        "conveyor_jobs_handed_over_total",
        "Jobs handed over to the stage pool of their next stage"
    );
    describe_counter!(
        "conveyor_jobs_cancelled_total",
        "Running jobs stopped by a cancel"
    );
    describe_counter!(
        "conveyor_jobs_dead_lettered_total",
        "Entries pushed to the dead list: failed jobs and unparsable messages"
    );
    describe_histogram!(
        "conveyor_job_duration_seconds",
        Unit::Seconds,
        "Attempt time, claim to settle"
    );
    describe_histogram!(
        "conveyor_stage_duration_seconds",
        Unit::Seconds,
        "Stage run time"
    );
    describe_gauge!("conveyor_jobs_in_flight", "Jobs this daemon has in hand");
    describe_histogram!(
        "conveyor_fetch_duration_seconds",
        Unit::Seconds,
        "Non-blocking fetch round trips (pipelined LMOVE)"
    );
    describe_gauge!(
        "conveyor_queue_depth",
        "Entries per queue list, read at scrape time"
    );
    describe_counter!(
        "conveyor_redis_errors_total",
        "Failed Redis calls, by operation"
    );
    describe_counter!(
        "conveyor_sqlite_errors_total",
        "Failed SQLite transactions (retried)"
    );
    describe_gauge!(
        "conveyor_heartbeat_age_seconds",
        "Time since the last heartbeat went through"
    );
    describe_gauge!("conveyor_up", "1 while the daemon runs");
}
