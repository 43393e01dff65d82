//! Operator commands on jobs: `cancel`, `retry`, `dead list|retry|purge`,
//! `cleanup`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{CliResult, DeadCommand, Failure, connect};
use crate::config::Config;
use crate::queue::Broker;
use crate::queue::job::{META_FIELD, Meta};

/// See [`crate::worker::status::known_queues`].
async fn known_queues(config: &Config, broker: &Broker) -> Result<Vec<String>, Failure> {
    crate::worker::status::known_queues(broker, config)
        .await
        .map_err(|e| Failure::other(format!("Redis: {e}")))
}

pub async fn cancel(config: &Config, id: &str) -> CliResult {
    use crate::client::{Cancelled, ClientError};
    let client = crate::Client::with_broker(connect(config).await?, config);
    match client.cancel(id).await {
        Ok(Cancelled::Stopped) => println!("{id} cancelled"),
        Ok(Cancelled::Recorded) => println!(
            "{id} cancellation recorded: it is not running now, and is dropped when a daemon takes it"
        ),
        Err(e @ ClientError::AlreadyFinished { .. }) => return Err(Failure::other(e.to_string())),
        Err(e) => return Err(Failure::other(format!("cancel failed: {e}"))),
    }
    Ok(())
}

/// A dead entry as a job to push back with fresh attempts: the error is
/// cleared, the epoch raised (so SQLite lets it run again), and the results
/// of finished stages kept (they do not run again). An entry that was not a
/// job object (`raw`) goes back as it was.
fn revived(entry: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut object: serde_json::Map<String, Value> = serde_json::from_slice(entry).ok()?;
    if let Some(Value::String(raw)) = object.get("raw") {
        return Some((String::new(), raw.clone().into_bytes()));
    }
    if let Some(Value::String(b64)) = object.get("raw_base64") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return Some((String::new(), raw));
    }
    let meta: Meta = object
        .get(META_FIELD)
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let fresh = Meta {
        epoch: meta.epoch + 1,
        results: meta.results,
        ..Meta::default()
    };
    object.insert(META_FIELD.into(), serde_json::to_value(fresh).ok()?);
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Some((id, Value::Object(object).to_string().into_bytes()))
}

fn entry_id(entry: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(entry).ok()?;
    v.get("id").and_then(Value::as_str).map(str::to_owned)
}

/// One entry of a dead list, as stored.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    pub queue: String,
    pub raw: Vec<u8>,
}

impl DeadEntry {
    /// The job id, when the entry is a job object with one.
    pub fn id(&self) -> Option<String> {
        entry_id(&self.raw)
    }

    /// The entry as JSON; a message that was not JSON as `{"raw": text}`.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.raw)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&self.raw)}))
    }
}

/// What [`revive_entries`] did with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revival {
    /// Back on its queue's pending list; `id` is empty for a raw message.
    Requeued { queue: String, id: String },
    /// Not a job that can be revived (unreadable); left in place.
    Unreadable { queue: String },
    /// Gone from the dead list meanwhile (retried or purged by someone else).
    Gone,
}

/// Up to `limit` entries of each of `queues`' dead lists, newest first.
pub async fn dead_list(
    broker: &Broker,
    queues: &[String],
    limit: usize,
) -> redis::RedisResult<Vec<DeadEntry>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
    for q in queues {
        for raw in broker.dead_entries(q, 0, stop).await? {
            out.push(DeadEntry {
                queue: q.clone(),
                raw,
            });
        }
    }
    Ok(out)
}

/// Dead entries of the chosen queues whose id is in `ids` (all when empty).
pub async fn dead_matching(
    broker: &Broker,
    queues: &[String],
    ids: &[String],
) -> redis::RedisResult<Vec<DeadEntry>> {
    let mut out = Vec::new();
    for q in queues {
        for raw in broker.dead_entries(q, 0, -1).await? {
            let wanted = ids.is_empty() || entry_id(&raw).is_some_and(|id| ids.contains(&id));
            if wanted {
                out.push(DeadEntry {
                    queue: q.clone(),
                    raw,
                });
            }
        }
    }
    Ok(out)
}

/// Puts dead entries back on their queues with fresh attempts: the error
/// is cleared, the epoch raised, finished stages' results kept (a raw
/// message goes back as it was); `each` hears of every entry as it is done.
pub async fn revive_entries(
    broker: &Broker,
    entries: Vec<DeadEntry>,
    mut each: impl FnMut(&Revival),
) -> redis::RedisResult<u64> {
    let mut n = 0;
    for DeadEntry { queue, raw } in entries {
        let Some((id, job)) = revived(&raw) else {
            each(&Revival::Unreadable { queue });
            continue;
        };
        if broker.revive(&queue, &raw, &id, &job).await? {
            n += 1;
            each(&Revival::Requeued { queue, id });
        } else {
            each(&Revival::Gone);
        }
    }
    Ok(n)
}

/// Deletes the dead entries of `queues` whose id is in `ids`, or every
/// entry when `ids` is empty; returns how many went.
pub async fn purge_dead(
    broker: &Broker,
    queues: &[String],
    ids: &[String],
) -> redis::RedisResult<u64> {
    let mut n = 0;
    if ids.is_empty() {
        for q in queues {
            n += broker.purge_dead(q).await?;
        }
    } else {
        for entry in dead_matching(broker, queues, ids).await? {
            if broker.remove_dead(&entry.queue, &entry.raw).await? {
                n += 1;
            }
        }
    }
    Ok(n)
}

fn redis_failure(e: redis::RedisError) -> Failure {
    Failure::other(format!("Redis: {e}"))
}

/// [`revive_entries`], printing each.
async fn revive_all(broker: &Broker, entries: Vec<DeadEntry>) -> Result<u64, Failure> {
    revive_entries(broker, entries, |r| match r {
        Revival::Requeued { queue, id } => println!(
            "{} requeued on {queue}",
            if id.is_empty() { "(raw message)" } else { id }
        ),
        Revival::Unreadable { queue } => {
            eprintln!("conveyor: skipping an unreadable dead entry on {queue}")
        }
        Revival::Gone => {}
    })
    .await
    .map_err(redis_failure)
}

pub async fn retry(config: &Config, id: &str) -> CliResult {
    let broker = connect(config).await?;
    let queues = known_queues(config, &broker).await?;
    let found = dead_matching(&broker, &queues, &[id.to_owned()])
        .await
        .map_err(redis_failure)?;
    if found.is_empty() {
        return Err(Failure::other(format!(
            "no dead job `{id}` (queues: {})",
            queues.join(", ")
        )));
    }
    revive_all(&broker, found.into_iter().take(1).collect()).await?;
    Ok(())
}

pub async fn dead(config: &Config, cmd: &DeadCommand) -> CliResult {
    let broker = connect(config).await?;
    let pick = |queue: &Option<String>, all: Vec<String>| match queue {
        Some(q) => vec![q.clone()],
        None => all,
    };
    match cmd {
        DeadCommand::List { queue, limit, json } => {
            let queues = pick(queue, known_queues(config, &broker).await?);
            let rows: Vec<(String, Value)> = dead_list(&broker, &queues, *limit)
                .await
                .map_err(redis_failure)?
                .into_iter()
                .map(|e| (e.queue.clone(), e.value()))
                .collect();
            if *json {
                let list: Vec<Value> = rows
                    .into_iter()
                    .map(|(q, v)| json!({"queue": q, "entry": v}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(());
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
            Ok(())
        }
        DeadCommand::Retry { queue, ids } => {
            let queues = pick(queue, known_queues(config, &broker).await?);
            let found = dead_matching(&broker, &queues, ids)
                .await
                .map_err(redis_failure)?;
            let n = revive_all(&broker, found).await?;
            eprintln!("{n} job(s) requeued");
            Ok(())
        }
        DeadCommand::Purge { queue, ids } => {
            let queues = pick(queue, known_queues(config, &broker).await?);
            let n = purge_dead(&broker, &queues, ids)
                .await
                .map_err(redis_failure)?;
            println!("{n} dead job(s) purged");
            Ok(())
        }
    }
}

/// Most entries of one queue's pending list or scheduled set that
/// [`waiting_jobs`] reads to filter and page through.
const WAITING_SCAN: isize = 10_000;

/// Which waiting jobs [`waiting_jobs`] lists.
#[derive(Debug, Clone, Default)]
pub struct WaitingQuery {
    /// One queue, or every known one.
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Only ids that contain this text.
    pub id_contains: Option<String>,
    /// Scheduled jobs due at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// The scheduled sets, else the pending lists.
    pub scheduled: bool,
    pub offset: usize,
    pub limit: usize,
}

/// Pending or scheduled jobs from Redis, in the order they will run (at
/// most 10,000 per queue are read); one page, and how many match in all.
/// What `conveyor jobs --status pending|scheduled` and the dashboard list.
pub async fn waiting_jobs(
    broker: &Broker,
    config: &Config,
    q: &WaitingQuery,
) -> redis::RedisResult<(Vec<Value>, u64)> {
    let queues = match &q.queue {
        Some(queue) => vec![queue.clone()],
        None => crate::worker::status::known_queues(broker, config).await?,
    };
    let mut conn = broker.conn();
    let mut all = Vec::new();
    for queue in &queues {
        let entries: Vec<(Vec<u8>, Option<u64>)> = if q.scheduled {
            let raw: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
                .arg(broker.keys().scheduled(queue))
                .arg(0)
                .arg(WAITING_SCAN - 1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            raw.into_iter()
                .map(|(e, due)| (e, Some(due as u64)))
                .collect()
        } else {
            // Daemons take from the right: the last entry runs first.
            let mut raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(broker.keys().pending(queue))
                .arg(-WAITING_SCAN)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            raw.reverse();
            raw.into_iter().map(|e| (e, None)).collect()
        };
        for (entry, due) in entries {
            let v: Value = serde_json::from_slice(&entry).unwrap_or(Value::Null);
            let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
            let id = v.get("id").and_then(Value::as_str).unwrap_or("");
            if q.kind.as_deref().is_some_and(|k| k != kind)
                || q.id_contains.as_deref().is_some_and(|s| !id.contains(s))
            {
                continue;
            }
            if let (Some(since), Some(due)) = (q.since_ms, due)
                && due < since
            {
                continue;
            }
            all.push(json!({
                "id": id,
                "type": kind,
                "queue": queue,
                "status": if q.scheduled { "scheduled" } else { "pending" },
                "attempt": v.pointer("/_conveyor/attempt").and_then(Value::as_u64).unwrap_or(0),
                "due_at": due.map(crate::rfc3339_of_ms),
            }));
        }
    }
    let total = all.len() as u64;
    let page = all.into_iter().skip(q.offset).take(q.limit).collect();
    Ok((page, total))
}

/// `conveyor cleanup --older-than D [--vacuum]`.
pub fn cleanup(config: &Config, older_than: Duration, vacuum: bool, json: bool) -> CliResult {
    let path = &config.store.path;
    if !path.exists() {
        return Err(Failure::other(format!("no database at {}", path.display())));
    }
    let cutoff =
        crate::rfc3339_of_ms(crate::now_ms().saturating_sub(older_than.as_millis() as u64));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Job;

    #[test]
    fn revived_jobs_get_fresh_attempts_and_keep_results() {
        let entry = json!({"id":"j","type":"t","payload":1,
            "_conveyor":{"attempt":3,"results":{"a":1},"error":"boom","failed_at":"x","worker_id":"w","epoch":1}});
        let (id, job) = revived(entry.to_string().as_bytes()).unwrap();
        assert_eq!(id, "j");
        let job = Job::parse(&job, 1 << 20).unwrap();
        assert_eq!(job.meta.attempt, 0);
        assert_eq!(job.meta.epoch, 2);
        assert_eq!(job.meta.results["a"], 1);
        assert_eq!(job.meta.error, None);
        let (id, raw) = revived(
            json!({"raw":"{bad","_conveyor":{"error":"x"}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!((id.as_str(), raw.as_slice()), ("", &b"{bad"[..]));
    }
}
