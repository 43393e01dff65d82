//! The `conveyor` command line.
//!
//! Exit codes: 0 success, 2 usage or config error, 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, ConfigError, Overrides};
use crate::progress::Status;
use crate::queue::Broker;
use crate::store::{JobRecord, Reader};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor",
    version,
    about = "A Redis-backed, crash-safe, multi-stage job daemon"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// A command that prints and exits (not a long-running process).
    pub fn prints_and_exits(&self) -> bool {
        !matches!(
            self.command,
            Command::Worker(_) | Command::Dashboard { .. } | Command::Bench(_)
        )
    }
}

/// Settings every command understands (flag > environment > file > default).
#[derive(Debug, Args)]
pub struct Global {
    /// Config file [default: config/conveyor.toml when it exists]
    #[arg(long, env = "CONVEYOR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Redis URL (`redis://[user:password@]host:port[/db]`, `rediss://`, `redis+unix://`)
    #[arg(
        long,
        env = "CONVEYOR_REDIS_URL",
        global = true,
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key
    #[arg(long, env = "CONVEYOR_PREFIX", global = true)]
    pub prefix: Option<String>,
    /// SQLite file
    #[arg(long, env = "CONVEYOR_DB", global = true)]
    pub db: Option<PathBuf>,
    /// Log format
    #[arg(
        long,
        env = "CONVEYOR_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "auto"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon
    Worker(WorkerArgs),
    /// Push a job; prints its id
    Enqueue(EnqueueArgs),
    /// Show a job and its stages (from SQLite)
    Job {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first, with filters and paging
    Jobs(JobsArgs),
    /// Queue depths, live workers, jobs by status
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a pending or scheduled one never runs, a running one stops
    Cancel { id: String },
    /// Put a dead job back on its queue with fresh attempts
    Retry { id: String },
    /// The dead-letter lists
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Follow progress messages: of one job until it ends, or of all jobs
    Watch {
        id: Option<String>,
        /// Print the raw JSON messages
        #[arg(long)]
        json: bool,
    },
    /// Check config, Redis (reachable, version, permissions, scripts) and
    /// SQLite (schema, WAL); one line per check, exit 1 if any fails
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Delete finished jobs older than a duration from SQLite, then
    /// `PRAGMA optimize` (and `VACUUM` with --vacuum)
    Cleanup {
        /// Finished (completed, failed, cancelled) longer ago than this, e.g. 7d, 12h
        #[arg(long, value_parser = parse_delay)]
        older_than: Duration,
        /// Also rebuild the file to give the space back (blocks writers while it runs)
        #[arg(long)]
        vacuum: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `conveyor completions bash > /etc/bash_completion.d/conveyor`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Web page of queues, workers and jobs with live progress (`/events`),
    /// and a JSON API under `/api/`; actions need CONVEYOR_DASHBOARD_TOKEN
    Dashboard {
        /// Address to listen on (a non-loopback one shows every job to the network)
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Measure throughput, latency, memory and Redis cost on this machine
    /// (a private redis-server unless --redis-url is given; see BENCHMARKS.md)
    Bench(BenchArgs),
}

/// `conveyor jobs`: SQLite holds every job that started at least once;
/// `--status pending` and `--status scheduled` list the waiting ones from
/// Redis instead.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// pending, scheduled, running, retrying, completed, failed or cancelled
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
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Page number, from 1
    #[arg(long, default_value_t = 1)]
    pub page: usize,
    #[arg(long)]
    pub json: bool,
}

/// `--since`: a duration ago, or a time; as Unix ms.
fn parse_since(s: &str) -> Result<u64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(crate::now_ms().saturating_sub(d.as_millis() as u64));
    }
    crate::parse_rfc3339_ms(s)
        .map_err(|_| format!("`{s}` is neither a duration (1h, 2d) nor an RFC 3339 time"))
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Show dead jobs, newest first
    List {
        #[arg(long)]
        queue: Option<String>,
        /// Entries shown per queue
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put dead jobs back on their queue with fresh attempts (all, or IDS)
    Retry {
        #[arg(long)]
        queue: Option<String>,
        ids: Vec<String>,
    },
    /// Delete dead jobs (all, or IDS)
    Purge {
        #[arg(long)]
        queue: Option<String>,
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Stable id of this daemon [default: the host name]
    #[arg(long, env = "CONVEYOR_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Queues in priority order, comma-separated
    #[arg(long, env = "CONVEYOR_QUEUES", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Jobs run at once
    #[arg(long, env = "CONVEYOR_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Seconds running stages get on SIGTERM before their jobs are requeued
    #[arg(long, env = "CONVEYOR_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

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
    #[arg(long, value_parser = parse_delay, conflicts_with = "at")]
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

fn parse_at(s: &str) -> Result<u64, String> {
    crate::parse_rfc3339_ms(s)
}

/// `conveyor bench`. It writes its own config, SQLite files and key
/// prefixes: `--config`, `--db`, `--prefix` and `CONVEYOR_REDIS_URL` are
/// not used; `--redis-url` on the command line is.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs per throughput run [default: 100000; 10000 with --quick]
    #[arg(long)]
    pub jobs: Option<u64>,
    /// Runs of each scenario; the median is reported [default: 3; 1 with --quick]
    #[arg(long)]
    pub runs: Option<u32>,
    /// Shorter: 1 run, 10000 jobs, 2 s per latency rate, memory over 100000 jobs
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
    /// Scenarios, comma-separated [default: all]
    #[arg(long, value_delimiter = ',', value_enum)]
    pub scenarios: Option<Vec<crate::bench::Scenario>>,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::usage(format!("config error: {e}"))
    }
}

pub(crate) type CliResult = Result<(), Failure>;

impl Cli {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides {
            redis_url: self.global.redis_url.clone(),
            prefix: self.global.prefix.clone(),
            db: self.global.db.clone(),
            ..Default::default()
        };
        if let Command::Worker(w) = &self.command {
            o.worker_id = w.worker_id.clone();
            o.queues = w.queues.clone();
            o.concurrency = w.concurrency;
            o.shutdown_grace_secs = w.shutdown_grace_secs;
        }
        o
    }

    pub fn load_config(&self) -> Result<Config, Failure> {
        Ok(Config::load(
            self.global.config.as_deref(),
            &self.overrides(),
            &crate::pipeline::builtin::checker(&[]),
        )?)
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let config = match &cli.command {
        // The bench writes its own config; the doctor loads it itself, to
        // report a bad one as one of its checks.
        Command::Bench(_) | Command::Completions { .. } | Command::Doctor { .. } => {
            Ok(Config::default())
        }
        _ => cli.load_config(),
    };
    let result = match config {
        Err(e) => Err(e),
        Ok(config) => match &cli.command {
            Command::Worker(_) => worker(config).await,
            Command::Enqueue(args) => enqueue(&config, args).await,
            Command::Job { id, json } => job(&config, id, *json).await,
            Command::Jobs(args) => jobs(&config, args).await,
            Command::Status { json } => status(&config, *json).await,
            Command::Watch { id, json } => crate::watch::run(&config, id.as_deref(), *json).await,
            Command::Cancel { id } => crate::admin::cancel(&config, id).await,
            Command::Retry { id } => crate::admin::retry(&config, id).await,
            Command::Dead(cmd) => crate::admin::dead(&config, cmd).await,
            Command::Bench(args) => crate::bench::command(&cli.global, args).await,
            Command::Dashboard { listen } => crate::dashboard::command(config, listen).await,
            Command::Cleanup {
                older_than,
                vacuum,
                json,
            } => crate::admin::cleanup(&config, *older_than, *vacuum, *json),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut cmd = Cli::command();
                clap_complete::generate(*shell, &mut cmd, "conveyor", &mut std::io::stdout());
                Ok(())
            }
            Command::Doctor { json } => crate::doctor::run(&cli, *json).await,
        },
    };
    exit_code(result)
}

fn exit_code(result: CliResult) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("conveyor: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn worker(config: Config) -> CliResult {
    let token = crate::shutdown::on_signals()
        .map_err(|e| Failure::other(format!("cannot install signal handlers: {e}")))?;
    crate::worker::run(config, token).await.map_err(|e| {
        tracing::error!(error = %e, "Worker failed to start");
        Failure::other(e.to_string())
    })
}

pub(crate) async fn connect(config: &Config) -> Result<Broker, Failure> {
    // The command line fails fast rather than waiting out an outage.
    tokio::time::timeout(
        Duration::from_secs(5),
        Broker::connect_config(&config.redis, 0),
    )
    .await
    .map_err(|_| Failure::other("Redis did not answer within 5 s"))?
    .map_err(|e| Failure::other(format!("cannot connect to Redis: {e}")))
}

async fn enqueue(config: &Config, args: &EnqueueArgs) -> CliResult {
    use crate::client::{Client, EnqueueRequest, prepare};
    let payload: Value = serde_json::from_str(&args.payload)
        .map_err(|e| Failure::usage(format!("--payload is not valid JSON: {e}")))?;
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
        request = request.at(std::time::UNIX_EPOCH + Duration::from_millis(ms));
    }
    // Checked before connecting: a bad command line is a usage error
    // whether Redis is up or not.
    let prepared = prepare(config, request).map_err(|e| match e {
        crate::client::ClientError::InvalidId(m) => Failure::usage(format!("--id {m}")),
        e => Failure::usage(e.to_string()),
    })?;
    let client = Client::with_broker(connect(config).await?, config);
    let enqueued = client
        .send(prepared)
        .await
        .map_err(|e| Failure::other(format!("enqueue failed: {e}")))?;
    let (id, queue) = (&enqueued.id, &enqueued.queue);
    let status = enqueued.status.as_str();
    let due_at = enqueued.due.map(crate::rfc3339_of);
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

fn open_reader(config: &Config) -> Result<Reader, Failure> {
    if !config.store.path.exists() {
        return Err(Failure::other(format!(
            "no database at {} (set --db or CONVEYOR_DB; it is created by the first worker)",
            config.store.path.display()
        )));
    }
    Reader::open(&config.store.path).map_err(|e| Failure::other(e.to_string()))
}

/// `conveyor job ID`: SQLite holds what ran; Redis knows a job that is
/// pending or scheduled and has not started yet (or is enqueued again after
/// an earlier run). [`crate::Client::job`] decides which wins; with Redis
/// down, SQLite alone still answers for a job that ran.
async fn job(config: &Config, id: &str, json: bool) -> CliResult {
    let info = match connect(config).await {
        Ok(broker) => crate::Client::with_broker(broker, config)
            .job(id)
            .await
            .map_err(|e| Failure::other(e.to_string()))?,
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
            r.due_at = live.due.map(crate::rfc3339_of);
            r
        }
        (Some(mut r), _) => {
            r.status = status;
            r
        }
        (None, Some(live)) => {
            let enqueued = live.enqueued_at.map(crate::rfc3339_of).unwrap_or_default();
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
                due_at: live.due.map(crate::rfc3339_of),
            }
        }
        (None, None) => return Err(Failure::other(format!("no job `{id}`"))),
    };
    print_job(&record, json);
    Ok(())
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
        let _ = writeln!(out, "  {:<16} {:<12} {result}{error}", s.name, s.status);
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

async fn jobs(config: &Config, args: &JobsArgs) -> CliResult {
    if args.limit == 0 || args.page == 0 {
        return Err(Failure::usage("--limit and --page start at 1"));
    }
    let offset = (args.page - 1) * args.limit;
    let (rows, total) = match args.status.as_deref() {
        Some(status @ ("pending" | "scheduled")) => {
            waiting_jobs(config, args, status == "scheduled").await?
        }
        Some(s) if Status::parse(s).is_none() => {
            return Err(Failure::usage(format!(
                "--status `{s}` is not one of pending, scheduled, running, retrying, completed, failed, cancelled"
            )));
        }
        _ => {
            let reader = open_reader(config)?;
            let filter = crate::store::JobFilter {
                status: args.status.clone(),
                kind: args.kind.clone(),
                queue: args.queue.clone(),
                since: args.since.map(crate::rfc3339_of_ms),
                id_contains: None,
                limit: args.limit,
                offset,
            };
            let (page, total) = reader
                .list_jobs(&filter)
                .map_err(|e| Failure::other(e.to_string()))?;
            let rows = page
                .into_iter()
                .map(|j| serde_json::to_value(j).unwrap_or(Value::Null))
                .collect();
            (rows, total)
        }
    };
    if args.json {
        let out = json!({"total": total, "page": args.page, "limit": args.limit, "jobs": rows});
        println!("{out}");
        return Ok(());
    }
    print!("{}", render_jobs(&rows));
    let shown = rows.len();
    if shown == 0 {
        println!("no jobs match (total {total})");
    } else {
        let more = if (offset + shown) < total as usize {
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
    let broker = connect(config).await?;
    let query = crate::admin::WaitingQuery {
        queue: args.queue.clone(),
        kind: args.kind.clone(),
        id_contains: None,
        since_ms: args.since,
        scheduled,
        offset: (args.page - 1) * args.limit,
        limit: args.limit,
    };
    crate::admin::waiting_jobs(&broker, config, &query)
        .await
        .map_err(|e| Failure::other(format!("Redis: {e}")))
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

async fn status(config: &Config, json: bool) -> CliResult {
    let broker = connect(config).await?;
    let report = crate::worker::status::collect(&broker, config)
        .await
        .map_err(|e| Failure::other(format!("Redis: {e}")))?;
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
            "  {:<24} host={} pid={} running={} completed={} failed={} queues={}",
            w.id,
            w.host,
            w.pid,
            w.running,
            w.completed,
            w.failed,
            w.queues.join(",")
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
