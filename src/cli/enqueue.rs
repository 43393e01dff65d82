//! `conveyor enqueue TYPE`: push a job, now or later; prints its id.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::{CliResult, Failure, connect};
use crate::client::{Client, EnqueueRequest, prepare};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Job type (a `[jobs."TYPE"]` of the config)
    pub kind: String,
    /// Payload, as JSON
    #[arg(long, default_value = "null")]
    pub payload: String,
    /// Queue [default: the job type's `queue`, else "default"]
    #[arg(long)]
    pub queue: Option<String>,
    /// Job id [default: a new UUIDv7]
    #[arg(long)]
    pub id: Option<String>,
    /// Attempts before the job is dead-lettered [default: the job type's]
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Deadline of one attempt, all stages together
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Run no sooner than this long from now (e.g. 30s, 5m, 1h 30m); the job
    /// waits in the scheduled set, status `scheduled`
    #[arg(long, value_parser = parse_enqueue_delay, conflicts_with = "at")]
    pub delay: Option<Duration>,
    /// Run no sooner than this time (RFC 3339, e.g. 2026-11-23T18:00:00Z or
    /// 2026-11-23T19:00:00+01:00)
    #[arg(long, value_parser = parse_at)]
    pub at: Option<u64>,
    /// Print {"id", "queue", "status", "enqueued", "due_at"} as JSON
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_delay(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 30s or 5m: {e}"))
}

/// The longest `--delay`: past it a due time is no longer a time.
const MAX_DELAY: Duration = Duration::from_secs(100 * 366 * 86_400);

fn parse_enqueue_delay(s: &str) -> Result<Duration, String> {
    let d = parse_delay(s)?;
    if d > MAX_DELAY {
        return Err(format!("`{s}` is longer than the longest delay, 100 years"));
    }
    Ok(d)
}

fn parse_at(s: &str) -> Result<u64, String> {
    crate::time::parse_rfc3339_ms(s)
}

pub async fn enqueue(config: &Config, args: &EnqueueArgs) -> CliResult {
    let payload: Value = serde_json::from_str(&args.payload).map_err(|e| {
        Failure::usage(format!(
            "--payload `{}` is not valid JSON: {e}",
            super::shorten(&args.payload)
        ))
    })?;
    let mut request = EnqueueRequest::new(&args.kind).payload(payload);
    if let Some(q) = &args.queue {
        request = request.queue(q);
    }
    if let Some(id) = &args.id {
        request = request.id(id);
    }
    if let Some(n) = args.max_attempts {
        request = request.max_attempts(n);
    }
    if let Some(secs) = args.timeout_secs {
        request = request.timeout_secs(secs);
    }
    if let Some(d) = args.delay {
        request = request.delay(d);
    } else if let Some(ms) = args.at {
        request = request.at(crate::time::time_of_ms(ms));
    }
    // Checked before connecting: a bad command line is a usage error
    // whether Redis is up or not.
    let prepared = prepare(config, request).map_err(|e| match e {
        crate::client::ClientError::InvalidId(m) => Failure::usage(format!(
            "--id `{}` {m}",
            super::shorten(args.id.as_deref().unwrap_or_default())
        )),
        e => Failure::usage(e.to_string()),
    })?;
    let client = Client::with_broker(connect(config).await?, config);
    let enqueued = client
        .send(prepared)
        .await
        .map_err(|e| Failure::other(format!("enqueue failed: {e}")))?;
    let (id, queue) = (&enqueued.id, &enqueued.queue);
    let status = enqueued.status.as_str();
    let due_at = enqueued.due.map(crate::time::rfc3339_of);
    if args.json {
        let out = serde_json::json!({
            "id": id,
            "queue": queue,
            "status": status,
            "enqueued": enqueued.added,
            "due_at": due_at,
        });
        println!("{out}");
        return Ok(());
    }
    if !enqueued.added {
        let due = due_at.map(|t| format!(", due {t}")).unwrap_or_default();
        eprintln!(
            "conveyor: job {id} is already {status}{due} on queue {queue}; not enqueued again"
        );
    } else if let Some(t) = &due_at {
        eprintln!("conveyor: scheduled for {t}");
    }
    println!("{id}");
    Ok(())
}
