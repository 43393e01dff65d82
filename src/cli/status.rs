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
    print_pools(&report.queues);
    println!("\nWORKERS ({} live)", report.workers.len());
    for w in &report.workers {
        println!(
            "  {:<24} host={} pid={} running={} completed={} failed={} queues={}{}{}",
            w.id,
            w.host,
            w.pid,
            w.running,
            w.completed,
            w.failed,
            w.queues.join(","),
            pools_of(w),
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

/// The stage pools of each queue, when pools are in use (a pool other than
/// the default, or jobs waiting in a pool list).
fn print_pools(queues: &[crate::client::inspect::QueueStatus]) {
    let in_use = queues
        .iter()
        .flat_map(|q| &q.pools)
        .any(|p| p.name != crate::config::DEFAULT_POOL || p.depth > 0);
    if !in_use {
        return;
    }
    println!("\n{:<20} {:<20} {:>8}  DAEMONS", "QUEUE", "POOL", "WAITING");
    for q in queues {
        for p in &q.pools {
            let daemons = match p.workers.is_empty() {
                true => "none (nothing runs its stages)".to_owned(),
                false => p.workers.join(","),
            };
            println!("{:<20} {:<20} {:>8}  {daemons}", q.name, p.name, p.depth);
        }
    }
}

/// ` pools=a,b` for a daemon serving pools other than the default.
fn pools_of(w: &crate::client::inspect::WorkerInfo) -> String {
    match w.pools.iter().all(|p| p == crate::config::DEFAULT_POOL) {
        true => String::new(),
        false => format!(" pools={}", w.pools.join(",")),
    }
}
