//! Operator commands on jobs: `cancel`, `retry`, `dead list|retry|purge`,
//! `cleanup`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use super::{CliResult, Failure, client, client_failure, confirm};
use crate::client::inspect::{DeadEntry, Inspector, Revival};
use crate::client::{Cancelled, Client, ClientError};
use crate::config::Config;
use crate::job::META_FIELD;

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Show dead jobs, newest first
    List {
        #[arg(long)]
        queue: Option<String>,
        /// Entries shown per queue
        #[arg(long, default_value_t = 50, value_parser = super::from_one())]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put dead jobs back on their queue with fresh attempts (all, or IDS)
    Retry {
        #[arg(long)]
        queue: Option<String>,
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete the dead jobs IDS, or every one with --all (asks first on a
    /// terminal unless --yes)
    Purge {
        #[arg(long)]
        queue: Option<String>,
        #[arg(conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead job (of --queue, or of every queue)
        #[arg(long)]
        all: bool,
        /// Do not ask before purging with --all
        #[arg(long, short = 'y')]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn cancel(config: &Config, id: &str, json: bool) -> CliResult {
    let outcome = match client(config).await?.cancel(id).await {
        Ok(outcome) => outcome,
        Err(e @ ClientError::AlreadyFinished { .. }) => return Err(Failure::other(e.to_string())),
        Err(e) => return Err(Failure::other(format!("cancel failed: {e}"))),
    };
    if json {
        let outcome = match outcome {
            Cancelled::Stopped => "stopped",
            Cancelled::Recorded => "recorded",
        };
        println!("{}", json!({"id": id, "outcome": outcome}));
        return Ok(());
    }
    match outcome {
        Cancelled::Stopped => println!("{id} cancelled"),
        Cancelled::Recorded => println!(
            "{id} cancellation recorded: it is not running now, and is dropped when a daemon takes it"
        ),
    }
    Ok(())
}

/// [`Inspector::revive`], printing each as it goes, or, with `json`, one
/// object at the end: `{"requeued": [{"queue", "id"}], "count", "unreadable"}`.
async fn revive_all(
    inspector: &Inspector,
    entries: Vec<DeadEntry>,
    json: bool,
) -> Result<u64, Failure> {
    let mut requeued = Vec::new();
    let mut unreadable = 0u64;
    let n = inspector
        .revive(entries, |r| match r {
            Revival::Requeued { queue, id } if json => {
                requeued.push(json!({"queue": queue, "id": (!id.is_empty()).then_some(id)}));
            }
            Revival::Requeued { queue, id } => println!(
                "{} requeued on {queue}",
                if id.is_empty() { "(raw message)" } else { id }
            ),
            Revival::Unreadable { queue } => {
                unreadable += 1;
                eprintln!("conveyor: skipping an unreadable dead entry on {queue}")
            }
            Revival::Gone => {}
        })
        .await
        .map_err(client_failure)?;
    if json {
        println!(
            "{}",
            json!({"requeued": requeued, "count": n, "unreadable": unreadable})
        );
    }
    Ok(n)
}

pub async fn retry(config: &Config, id: &str, json: bool) -> CliResult {
    let inspector = client(config).await?.inspector();
    let queues = inspector.queues().await.map_err(client_failure)?;
    let found = inspector
        .dead_matching(&queues, &[id.to_owned()])
        .await
        .map_err(client_failure)?;
    if found.is_empty() {
        return Err(Failure::other(format!(
            "no dead job `{id}` (queues: {})",
            queues.join(", ")
        )));
    }
    revive_all(&inspector, found.into_iter().take(1).collect(), json).await?;
    Ok(())
}

pub async fn dead(config: &Config, cmd: &DeadCommand) -> CliResult {
    if let DeadCommand::Purge { ids, all, .. } = cmd
        && ids.is_empty()
        && !all
    {
        return Err(Failure::usage(
            "dead purge needs the ids of the jobs to delete, or --all for every dead job",
        ));
    }
    let client = client(config).await?;
    let inspector = client.inspector();
    let (DeadCommand::List { queue, .. }
    | DeadCommand::Retry { queue, .. }
    | DeadCommand::Purge { queue, .. }) = cmd;
    let queues = inspector
        .queues_or_all(queue.as_deref())
        .await
        .map_err(client_failure)?;
    match cmd {
        DeadCommand::List { limit, json, .. } => {
            let entries = inspector
                .dead_list(&queues, *limit)
                .await
                .map_err(client_failure)?;
            print_dead(entries, *json);
            Ok(())
        }
        DeadCommand::Retry { ids, json, .. } => {
            let found = inspector
                .dead_matching(&queues, ids)
                .await
                .map_err(client_failure)?;
            let n = revive_all(&inspector, found, *json).await?;
            if !json {
                eprintln!("{n} job(s) requeued");
            }
            Ok(())
        }
        DeadCommand::Purge { ids, yes, json, .. } => {
            purge(&client, &queues, ids, *yes, *json).await
        }
    }
}

/// `dead purge`: `ids`, or every entry when empty (`--all`), asking first
/// on a terminal unless `yes`.
async fn purge(
    client: &Client,
    queues: &[String],
    ids: &[String],
    yes: bool,
    json: bool,
) -> CliResult {
    if ids.is_empty() && !yes && confirm::on_terminal() {
        let n = dead_count(client, queues).await?;
        let question = format!("purge {n} dead job(s) of queue(s) {}?", queues.join(", "));
        if !confirm::ask(&question) {
            return Err(Failure::other("not purged"));
        }
    }
    let n = client
        .inspector()
        .purge_dead(queues, ids)
        .await
        .map_err(client_failure)?;
    if json {
        println!("{}", json!({"purged": n, "queues": queues}));
    } else {
        println!("{n} dead job(s) purged");
    }
    Ok(())
}

/// The number of entries in the dead lists of `queues`.
async fn dead_count(client: &Client, queues: &[String]) -> Result<u64, Failure> {
    let broker = client.broker();
    let mut total = 0;
    for q in queues {
        let n: u64 = redis::cmd("LLEN")
            .arg(broker.keys().dead(q))
            .query_async(&mut broker.conn())
            .await
            .map_err(|e| Failure::other(format!("Redis: {e}")))?;
        total += n;
    }
    Ok(total)
}

fn print_dead(entries: Vec<DeadEntry>, json: bool) {
    let rows: Vec<(String, Value)> = entries
        .into_iter()
        .map(|e| (e.queue.clone(), e.value()))
        .collect();
    if json {
        let list: Vec<Value> = rows
            .into_iter()
            .map(|(q, v)| json!({"queue": q, "entry": v}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return;
    }
    println!(
        "{:<12} {:<38} {:<18} {:<24} ERROR",
        "QUEUE", "ID", "TYPE", "FAILED AT"
    );
    for (q, v) in rows {
        let meta = &v[META_FIELD];
        println!(
            "{:<12} {:<38} {:<18} {:<24} {}",
            q,
            v["id"].as_str().unwrap_or("-"),
            v["type"].as_str().unwrap_or("-"),
            meta["failed_at"].as_str().unwrap_or("-"),
            meta["error"].as_str().unwrap_or("-")
        );
    }
}

/// `conveyor cleanup --older-than D [--vacuum]`.
pub fn cleanup(config: &Config, older_than: Duration, vacuum: bool, json: bool) -> CliResult {
    let path = &config.store.path;
    if !path.exists() {
        return Err(Failure::other(format!("no database at {}", path.display())));
    }
    let cutoff = crate::time::rfc3339_of_ms(
        crate::time::now_ms().saturating_sub(older_than.as_millis() as u64),
    );
    let report = crate::store::cleanup(path, &cutoff, vacuum)
        .map_err(|e| Failure::other(format!("cleanup failed: {e}")))?;
    if json {
        let mut out = serde_json::to_value(&report).unwrap_or(Value::Null);
        out["finished_before"] = json!(cutoff);
        println!("{out}");
    } else {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "deleted {} job(s) finished before {cutoff} ({} stage rows, {} attempt rows)",
            report.jobs_deleted, report.stages_deleted, report.attempts_deleted
        );
        println!(
            "{}: {:.1} MiB -> {:.1} MiB{}",
            path.display(),
            mib(report.bytes_before),
            mib(report.bytes_after),
            if report.vacuumed {
                " (vacuumed)"
            } else {
                "; --vacuum gives freed pages back to the file system"
            }
        );
    }
    Ok(())
}
