//! The `conveyor` command line: arguments, printing and exit codes.
//!
//! Only `main.rs` uses this module. Each command family has its file;
//! they call the library ([`crate::client::Client`] and its inspector, the
//! store's reader, the daemon, the dashboard, the bench) and turn what comes
//! back into lines on stdout and a [`Failure`] with its exit code.
//!
//! Exit codes: 0 success, 2 usage or config error, 1 anything else.

mod admin;
mod confirm;
mod doctor;
mod enqueue;
mod jobs;
mod man;
mod output;
mod serve;
mod status;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::client::{Client, ClientError};
use crate::config::{Config, ConfigError, ConfigSource, Overrides};
use crate::queue::Broker;
use crate::telemetry::LogFormat;
use admin::DeadCommand;
use enqueue::{EnqueueArgs, parse_delay};
use jobs::JobsArgs;
use serve::WorkerArgs;

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
    /// Sets up the logs as `--log-format` says (before the runtime starts).
    pub fn init_logging(&self) {
        crate::telemetry::init(self.global.log_format);
    }

    /// A command that prints and exits (not a long-running process).
    pub fn prints_and_exits(&self) -> bool {
        !matches!(
            self.command,
            Command::Worker(_)
                | Command::Dashboard { .. }
                | Command::Gateway { .. }
                | Command::Bench(_)
        )
    }
}

/// Settings every command understands (flag > environment > file > default).
#[derive(Debug, Args)]
pub struct Global {
    /// Config file [env: CONVEYOR_CONFIG] [default: ./config/conveyor.toml,
    /// else /etc/conveyor/conveyor.toml, when it exists]
    // Not `env =`: the variable is read by `config_source`, which must
    // tell the flag from the variable (`conveyor doctor` says which).
    #[arg(long, global = true, value_hint = clap::ValueHint::FilePath)]
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
    /// Show a job and its stages (its record in Redis, readable from any host, and this host's SQLite)
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
    Cancel {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put a dead job back on its queue with fresh attempts
    Retry {
        id: String,
        #[arg(long)]
        json: bool,
    },
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
        /// Check only the config file (no Redis, no SQLite): exit 0 if it
        /// loads, 2 if not; for `ExecStartPre=` and before a reload
        #[arg(long)]
        config_only: bool,
        /// The stage pools of the daemon to check, comma-separated, as
        /// `conveyor worker --pools` [default: `[worker] pools`]
        #[arg(long, env = "CONVEYOR_POOLS", value_delimiter = ',')]
        pools: Option<Vec<String>>,
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
    /// Write the manual pages (conveyor.1 and one per subcommand) to a
    /// directory; for packagers
    #[command(hide = true)]
    Man {
        /// Directory to write the pages to (created if missing)
        #[arg(long)]
        out: PathBuf,
    },
    /// Web page of queues, workers and jobs with live progress (`/events`),
    /// and a JSON API under `/api/`; read-only unless CONVEYOR_DASHBOARD_TOKEN is set
    Dashboard {
        /// Address to listen on (a non-loopback one shows every job to the network)
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Remote-worker HTTP API (`/api/v1`) for the remote job types, with
    /// the daemon that hands their stages to remote workers
    Gateway {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
    },
    /// Measure throughput, latency, memory and Redis cost on this machine
    /// (a private redis-server unless --redis-url is given; see docs/benchmarks.md)
    Bench(BenchArgs),
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    fn other(message: impl Into<String>) -> Self {
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

type CliResult = Result<(), Failure>;

/// A count from 1 (`--limit`, `--page`): 0 or a non-number is a usage error
/// naming the flag and the value.
fn from_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// A value quoted in an error message: at most 100 characters of it.
fn shorten(value: &str) -> String {
    const MAX: usize = 100;
    match value.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_owned(),
    }
}

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
            o.pools = w.pools.clone();
            o.concurrency = w.concurrency;
            o.shutdown_grace_secs = w.shutdown_grace_secs;
        }
        if let Command::Doctor { pools, .. } = &self.command {
            o.pools = pools.clone();
        }
        o
    }

    /// The config file this command reads, and how it was chosen
    /// (`--config`, `CONVEYOR_CONFIG`, `./config/conveyor.toml`,
    /// `/etc/conveyor/conveyor.toml`).
    pub fn config_source(&self) -> ConfigSource {
        let env = std::env::var_os("CONVEYOR_CONFIG").map(PathBuf::from);
        ConfigSource::find(self.global.config.as_deref(), env.as_deref())
    }

    pub fn load_config(&self) -> Result<Config, Failure> {
        let source = self.config_source();
        Config::load_source(
            &source,
            &self.overrides(),
            &crate::pipeline::builtin::checker(&[]),
        )
        .map_err(|e| match (&e, &source.path) {
            // A bad key: say in which file, which may not be the one the
            // operator has in mind (`/etc/conveyor` vs `./config`).
            (ConfigError::Invalid { .. }, Some(_)) => {
                Failure::usage(format!("config error: {e}; in {source}"))
            }
            _ => e.into(),
        })
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let config = match &cli.command {
        // The bench writes its own config; the doctor loads it itself, to
        // report a bad one as one of its checks.
        Command::Bench(_)
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Doctor { .. } => Ok(Config::default()),
        _ => cli.load_config(),
    };
    if let Ok(config) = &config {
        for notice in config.notices() {
            eprintln!("conveyor: {notice}");
        }
    }
    let result = match config {
        Err(e) => Err(e),
        Ok(config) => match &cli.command {
            Command::Worker(_) => serve::worker(config).await,
            Command::Enqueue(args) => enqueue::enqueue(&config, args).await,
            Command::Job { id, json } => jobs::job(&config, id, *json).await,
            Command::Jobs(args) => jobs::jobs(&config, args).await,
            Command::Status { json } => status::status(&config, *json).await,
            Command::Watch { id, json } => watch::run(&config, id.as_deref(), *json).await,
            Command::Cancel { id, json } => admin::cancel(&config, id, *json).await,
            Command::Retry { id, json } => admin::retry(&config, id, *json).await,
            Command::Dead(cmd) => admin::dead(&config, cmd).await,
            Command::Bench(args) => serve::bench(&cli.global, args).await,
            Command::Dashboard { listen } => serve::dashboard(config, listen).await,
            Command::Gateway { listen } => serve::gateway(config, listen).await,
            Command::Cleanup {
                older_than,
                vacuum,
                json,
            } => admin::cleanup(&config, *older_than, *vacuum, *json),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut cmd = Cli::command();
                clap_complete::generate(*shell, &mut cmd, "conveyor", &mut std::io::stdout());
                Ok(())
            }
            Command::Man { out } => man::write_pages(out),
            Command::Doctor {
                json, config_only, ..
            } => doctor::run(&cli, *json, *config_only).await,
        },
    };
    exit_code(result, output::json_errors(&cli.command))
}

/// With `json`, a failure is also one object on stdout:
/// `{"error": MESSAGE, "exit_code": N}` (docs/reference/cli.md).
fn exit_code(result: CliResult, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": f.message, "exit_code": f.code})
                );
            }
            eprintln!("conveyor: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn connect(config: &Config) -> Result<Broker, Failure> {
    // The command line fails fast rather than waiting out an outage.
    tokio::time::timeout(
        Duration::from_secs(5),
        Broker::connect_config(&config.redis, 0),
    )
    .await
    .map_err(|_| {
        let url = config.redis.target();
        Failure::other(format!("Redis at {url} did not answer within 5 s"))
    })?
    .map_err(|e| {
        let url = config.redis.target();
        Failure::other(format!("cannot connect to Redis at {url}: {e}"))
    })
}

/// A [`Client`] on a connection made as [`connect`] makes it.
async fn client(config: &Config) -> Result<Client, Failure> {
    Ok(Client::with_broker(connect(config).await?, config))
}

/// A failed [`Client`] call (its message says what and where: `Redis: ...`).
fn client_failure(e: ClientError) -> Failure {
    Failure::other(e.to_string())
}
