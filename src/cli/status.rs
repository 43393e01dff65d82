//! `conveyor status`: queue depths and live workers from Redis, jobs by
//! status from SQLite.

use serde_json::{Value, json};

use super::{CliResult, client, client_failure};
use crate::config::Config;
use crate::store::Reader;

pub async fn status(config: &Config, json: bool) -> CliResult {
    let report = client(config)
        .await?
        .inspector()
        .status()
        .await
        .map_err(client_failure)?;
    let by_status = match Reader::open(&config.store.path) {
        Ok(r) if config.store.path.exists() => r.counts_by_status().unwrap_or_default(),
        _ => Vec::new(),
    };
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
        v["jobs_by_status"] = by_status
            .iter()
            .map(|(s, n)| (s.clone(), json!(n)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>8}",
        "QUEUE", "PENDING", "ACTIVE", "SCHEDULED", "DEAD"
    );
    for q in &report.queues {
        println!(
            "{:<20} {:>8} {:>8} {:>10} {:>8}",
            q.name, q.pending, q.active, q.scheduled, q.dead
        );
    }
    println!("\nWORKERS ({} live)", report.workers.len());
    for w in &report.workers {
        println!(
            "  {:<24} host={} pid={} running={} completed={} failed={} queues={}{}",
            w.id,
            w.host,
            w.pid,
            w.running,
            w.completed,
            w.failed,
            w.queues.join(","),
            if w.quiet {
                " (quiet: taking no jobs)"
            } else {
                ""
            }
        );
    }
    if !by_status.is_empty() {
        println!("\nJOBS ({})", config.store.path.display());
        for (s, n) in &by_status {
            println!("  {s:<12} {n}");
        }
    }
    Ok(())
}
