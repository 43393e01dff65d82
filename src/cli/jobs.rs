//! `conveyor job ID` and `conveyor jobs`: a job and the list of jobs, from
//! SQLite (what ran) and Redis (what waits).

use clap::Args;
use serde_json::{Value, json};

use super::{CliResult, Failure, client, client_failure, connect};
use crate::client::inspect::WaitingQuery;
use crate::config::Config;
use crate::job::Status;
use crate::store::{JobRecord, Reader};

/// `conveyor jobs`: SQLite holds every job that started at least once;
/// `--status pending` and `--status scheduled` list the waiting ones from
/// Redis instead.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// pending, scheduled, running, retrying, completed, failed, cancelled or
    /// handed_over (this host passed the job on to another stage pool)
    #[arg(long)]
    pub status: Option<String>,
    /// Job type
    #[arg(long = "type")]
    pub kind: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    /// Updated within this long (e.g. 1h, 2d) or since this time (RFC 3339)
    #[arg(long, value_parser = parse_since)]
    pub since: Option<u64>,
    /// Jobs per page
    #[arg(long, default_value_t = 50, value_parser = super::from_one())]
    pub limit: usize,
    /// Page number, from 1
    #[arg(long, default_value_t = 1, value_parser = super::from_one())]
    pub page: usize,
    #[arg(long)]
    pub json: bool,
}

/// `--since`: a duration ago, or a time; as Unix ms.
fn parse_since(s: &str) -> Result<u64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(crate::time::now_ms().saturating_sub(d.as_millis() as u64));
    }
    crate::time::parse_rfc3339_ms(s)
        .map_err(|_| format!("`{s}` is neither a duration (1h, 2d) nor an RFC 3339 time"))
}

fn open_reader(config: &Config) -> Result<Reader, Failure> {
    let path = &config.store.path;
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::other(format!(
                "no database at {} (set --db or CONVEYOR_DB; it is created by the first worker)",
                path.display()
            )));
        }
        // /var/lib/conveyor is 0750 conveyor:conveyor on a packaged host.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Failure::other(format!(
                "cannot read the database at {}: permission denied (run as root, \
                 as `sudo -u conveyor conveyor …`, or as a member of its group)",
                path.display()
            )));
        }
        Err(e) => {
            return Err(Failure::other(format!(
                "cannot read the database at {}: {e}",
                path.display()
            )));
        }
    }
    Reader::open(&config.store.path).map_err(|e| Failure::other(e.to_string()))
}

/// `conveyor job ID`: SQLite holds what ran; Redis knows a job that is
/// pending or scheduled and has not started yet (or is enqueued again after
/// an earlier run). [`crate::Client::job`] decides which wins; with Redis
/// down, SQLite alone still answers for a job that ran.
pub async fn job(config: &Config, id: &str, json: bool) -> CliResult {
    let (info, client) = match connect(config).await {
        Ok(broker) => {
            let client = crate::client::Client::with_broker(broker, config);
            let info = client
                .job(id)
                .await
                .map_err(|e| Failure::other(e.to_string()))?;
            (info, client)
        }
        Err(err) => {
            let stored = if config.store.path.exists() {
                open_reader(config)?
                    .job(id)
                    .map_err(|e| Failure::other(e.to_string()))?
            } else {
                None
            };
            let Some(record) = stored else {
                return Err(err);
            };
            eprintln!("conveyor: {} (showing SQLite only)", err.message);
            print_job(&record, json);
            return Ok(());
        }
    };
    let Some(info) = info else {
        return Err(Failure::other(format!(
            "no job `{id}`: not in {} and not pending, scheduled or running in Redis",
            config.store.path.display()
        )));
    };
    let status = info.status.as_str().to_owned();
    let waiting = matches!(info.status, Status::Pending | Status::Scheduled);
    let record = match (info.record, info.live) {
        (Some(mut r), Some(live)) if waiting => {
            r.status = status;
            r.queue = live.queue;
            r.due_at = live.due.map(crate::time::rfc3339_of);
            r
        }
        (Some(mut r), _) => {
            r.status = status;
            r
        }
        (None, Some(live)) => {
            let enqueued = live
                .enqueued_at
                .map(crate::time::rfc3339_of)
                .unwrap_or_default();
            JobRecord {
                id: id.to_owned(),
                kind: live.kind.unwrap_or_default(),
                queue: live.queue,
                status,
                attempt: 0,
                max_attempts: None,
                progress: 0.0,
                stage: None,
                error: None,
                worker_id: None,
                payload: Value::Null,
                created_at: enqueued.clone(),
                updated_at: enqueued,
                started_at: None,
                finished_at: None,
                stages: Vec::new(),
                attempts: Vec::new(),
                due_at: live.due.map(crate::time::rfc3339_of),
                waiting: None,
            }
        }
        (None, None) => return Err(Failure::other(format!("no job `{id}`"))),
    };
    let mut record = record;
    if record.status == Status::Pending.as_str() {
        record.waiting = pool_wait(config, &client, &record).await;
    }
    print_job(&record, json);
    Ok(())
}

/// The stage pool list a pending job waits in, if any, and its next stage
/// (the first the entry carries no result of). Best effort: a Redis error,
/// or a job past the bounded search (`Broker::find_in_pools`), leaves the
/// line out.
async fn pool_wait(
    config: &Config,
    client: &crate::client::Client,
    record: &JobRecord,
) -> Option<crate::store::PoolWait> {
    let inspector = client.inspector();
    let (pool, entry) = inspector
        .pool_holding(&record.queue, &record.id)
        .await
        .ok()??;
    let job = crate::job::Job::parse(&entry, entry.len()).ok();
    let stages = config.jobs.get(&record.kind).map(|j| &j.stages);
    let stage = match (job, stages) {
        (Some(job), Some(stages)) => stages
            .iter()
            .find(|s| !job.meta.results.contains_key(&s.name))
            .map(|s| s.name.clone()),
        _ => None,
    };
    Some(crate::store::PoolWait {
        stage: stage.unwrap_or_else(|| "?".into()),
        pool,
    })
}

fn print_job(record: &JobRecord, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(record).unwrap_or_default()
        );
    } else {
        print!("{}", render_job(record));
    }
}

/// Where this host's SQLite row says a `handed_over` job went: its
/// `stage`, and that stage row's pool.
fn handed_to(job: &JobRecord) -> Option<(&str, &str)> {
    if job.status != Status::HandedOver.as_str() {
        return None;
    }
    let stage = job.stage.as_deref()?;
    let pool = job
        .stages
        .iter()
        .find(|s| s.name == stage)
        .and_then(|s| s.pool.as_deref())
        .unwrap_or("?");
    Some((stage, pool))
}

fn render_job(job: &JobRecord) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "job       {}", job.id);
    let _ = writeln!(out, "type      {}", job.kind);
    let _ = writeln!(out, "queue     {}", job.queue);
    let _ = writeln!(out, "status    {}", job.status);
    if let Some(due) = &job.due_at {
        let _ = writeln!(out, "due       {due}");
    }
    if let Some(w) = &job.waiting {
        let _ = writeln!(out, "waiting   for stage {} in pool {}", w.stage, w.pool);
    }
    if let Some((stage, pool)) = handed_to(job) {
        let _ = writeln!(out, "handed    to stage {stage} in pool {pool}");
    }
    let _ = writeln!(out, "progress  {}%", job.progress);
    let max = job
        .max_attempts
        .map(|m| format!(" of {m}"))
        .unwrap_or_default();
    let _ = writeln!(out, "attempt   {}{max}", job.attempt);
    if let Some(w) = &job.worker_id {
        let _ = writeln!(out, "worker    {w}");
    }
    let _ = writeln!(out, "created   {}", job.created_at);
    if let Some(t) = &job.finished_at {
        let _ = writeln!(out, "finished  {t}");
    }
    if let Some(e) = &job.error {
        let _ = writeln!(out, "error     {e}");
    }
    let _ = writeln!(out, "stages");
    for s in &job.stages {
        let result = match &s.result {
            Value::Null => String::new(),
            v => v.to_string(),
        };
        let error = s
            .error
            .as_deref()
            .map(|e| format!(" error: {e}"))
            .unwrap_or_default();
        let ran = match (&s.worker_id, &s.pool) {
            (Some(w), Some(p)) => format!(" [{w}, pool {p}]"),
            (Some(w), None) => format!(" [{w}]"),
            (None, Some(p)) => format!(" [pool {p}]"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<12}{ran} {result}{error}",
            s.name, s.status
        );
    }
    if !job.attempts.is_empty() {
        let _ = writeln!(out, "attempts");
        for a in &job.attempts {
            let revival = if a.epoch > 0 {
                format!(" (revival {})", a.epoch)
            } else {
                String::new()
            };
            let error = a
                .error
                .as_deref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  #{}{revival} {:<12} {} on {}{error}",
                a.attempt, a.status, a.started_at, a.worker_id
            );
        }
    }
    out
}

pub async fn jobs(config: &Config, args: &JobsArgs) -> CliResult {
    if args.limit == 0 || args.page == 0 {
        return Err(Failure::usage("--limit and --page start at 1"));
    }
    let offset = (args.page - 1).saturating_mul(args.limit);
    // With --since, SQLite counts at most COUNT_CAP matches.
    let mut capped = false;
    let (rows, total) = match args.status.as_deref() {
        Some(status @ ("pending" | "scheduled")) => {
            waiting_jobs(config, args, status == "scheduled").await?
        }
        Some(s) if Status::parse(s).is_none() => {
            return Err(Failure::usage(format!(
                "--status `{s}` is not one of pending, scheduled, running, retrying, completed, failed, cancelled, handed_over"
            )));
        }
        _ => {
            let reader = open_reader(config)?;
            let filter = crate::store::JobFilter {
                status: args.status.clone(),
                kind: args.kind.clone(),
                queue: args.queue.clone(),
                since: args.since.map(crate::time::rfc3339_of_ms),
                id_contains: None,
                limit: args.limit,
                offset,
            };
            let page = reader
                .list_jobs(&filter)
                .map_err(|e| Failure::other(e.to_string()))?;
            capped = page.total_capped;
            let total = page.total;
            let rows = page
                .jobs
                .into_iter()
                .map(|j| serde_json::to_value(j).unwrap_or(Value::Null))
                .collect();
            (rows, total)
        }
    };
    if args.json {
        let out = json!({"total": total, "total_capped": capped, "page": args.page,
            "limit": args.limit, "jobs": rows});
        println!("{out}");
        return Ok(());
    }
    print!("{}", render_jobs(&rows));
    let shown = rows.len();
    let more_pages = capped || (offset + shown) < total as usize;
    let total = if capped {
        format!("more than {total}")
    } else {
        total.to_string()
    };
    if shown == 0 {
        println!("no jobs match (total {total})");
    } else {
        let more = if more_pages {
            format!("; --page {} for more", args.page + 1)
        } else {
            String::new()
        };
        println!("{}-{} of {total}{more}", offset + 1, offset + shown);
    }
    Ok(())
}

/// Pending or scheduled jobs from Redis, in the order they will run.
async fn waiting_jobs(
    config: &Config,
    args: &JobsArgs,
    scheduled: bool,
) -> Result<(Vec<Value>, u64), Failure> {
    let query = WaitingQuery {
        queue: args.queue.clone(),
        kind: args.kind.clone(),
        id_contains: None,
        since_ms: args.since,
        scheduled,
        offset: (args.page - 1).saturating_mul(args.limit),
        limit: args.limit,
    };
    client(config)
        .await?
        .inspector()
        .waiting(&query)
        .await
        .map_err(client_failure)
}

fn render_jobs(rows: &[Value]) -> String {
    use std::fmt::Write;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let width = rows
        .iter()
        .map(|r| text(r, "id").len())
        .max()
        .unwrap_or(2)
        .max(2);
    let _ = writeln!(
        out,
        "{:<width$}  {:<16} {:<12} {:<10} {:>6} {:>3}  {:<24} DETAIL",
        "ID", "TYPE", "QUEUE", "STATUS", "PROG", "TRY", "WHEN"
    );
    for r in rows {
        let when = r
            .get("due_at")
            .and_then(Value::as_str)
            .map(|d| format!("due {d}"))
            .unwrap_or_else(|| text(r, "updated_at"));
        let progress = r
            .get("progress")
            .and_then(Value::as_f64)
            .map(|p| format!("{p:.0}%"))
            .unwrap_or_else(|| "-".into());
        let detail = match (text(r, "error"), text(r, "stage")) {
            (e, _) if !e.is_empty() => e,
            (_, s) if !s.is_empty() => format!("stage {s}"),
            _ => String::new(),
        };
        let detail: String = detail.chars().take(60).collect();
        let _ = writeln!(
            out,
            "{:<width$}  {:<16} {:<12} {:<10} {:>6} {:>3}  {:<24} {}",
            text(r, "id"),
            text(r, "type"),
            text(r, "queue"),
            text(r, "status"),
            progress,
            r.get("attempt").and_then(Value::as_u64).unwrap_or(0),
            when,
            detail.replace(['\n', '\r'], " ")
        );
    }
    out
}
