//! The shared end of the cluster and Sentinel failover tests: wait for
//! every job, print what the failover cost, fail on a lost job.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Daemon, Harness, ledger_counts_by_stage, poll_until};

/// Waits (2 min at most) for every job of `ids` to complete after a
/// master was killed at `killed_at`, prints one line of what the failover
/// cost (`scripts/failover.sh` collects it), and fails the test when a job
/// was lost.
pub fn report_failover(
    setup: &str,
    h: &Harness,
    ids: &[String],
    killed_at: Instant,
    promoted_after: Duration,
    ledger: &Path,
    daemons: &[&Daemon],
) {
    let done = poll_until(Duration::from_secs(120), || {
        h.count_status("completed") as usize >= ids.len()
    });
    let done_after = killed_at.elapsed();
    let finished = h.ids_with_status("completed");
    let lost: Vec<&String> = ids.iter().filter(|id| !finished.contains(*id)).collect();
    // Per (job, stage): a job of several stages runs each once.
    let (starts, completions) = ledger_counts_by_stage(ledger);
    let reruns: usize = starts.values().map(|n| n.saturating_sub(1)).sum();
    let twice: usize = completions.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!(
        "{setup} failover: {} jobs, replica promoted {promoted_after:?} after the kill, all \
         done {done_after:?} after it: lost {}, stage re-runs {reruns}, stage completed twice \
         {twice}",
        ids.len(),
        lost.len()
    );
    let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
    assert!(
        done && lost.is_empty(),
        "lost {} jobs: {:?}\n{}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>(),
        logs.join("\n")
    );
}
