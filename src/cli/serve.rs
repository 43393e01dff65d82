//! The long-running commands: `conveyor worker` (the daemon),
//! `conveyor dashboard`, `conveyor gateway` and `conveyor bench`.

use clap::Args;

use super::{CliResult, Failure, Global};
use crate::bench::BenchArgs;
use crate::config::Config;
use crate::http::ServeError;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Stable id of this daemon [default: the host name]
    #[arg(long, env = "CONVEYOR_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Queues in priority order, comma-separated
    #[arg(long, env = "CONVEYOR_QUEUES", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Stage pools this daemon runs, comma-separated [default: default]
    #[arg(long, env = "CONVEYOR_POOLS", value_delimiter = ',')]
    pub pools: Option<Vec<String>>,
    /// Jobs run at once
    #[arg(long, env = "CONVEYOR_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Seconds running stages get on SIGTERM before their jobs are requeued
    #[arg(long, env = "CONVEYOR_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

pub async fn worker(config: Config) -> CliResult {
    let signals = |e| Failure::other(format!("cannot install signal handlers: {e}"));
    let token = crate::shutdown::on_signals().map_err(signals)?;
    // SIGTSTP quiets the daemon, SIGCONT wakes it (docs/operations.md).
    let quiet = crate::worker::quiet::Quiet::new();
    let switch = quiet.clone();
    crate::shutdown::on_quiet_signals(move |on| if on { switch.quiet() } else { switch.resume() })
        .map_err(signals)?;
    crate::worker::run(config, token, quiet).await.map_err(|e| {
        // A drain past its bound has logged why already.
        if !matches!(e, crate::worker::WorkerError::ShutdownGaveUp { .. }) {
            tracing::error!(error = %e, "worker_start_failed");
        }
        Failure::other(e.to_string())
    })
}

/// `conveyor dashboard`: serves until SIGTERM or SIGINT.
pub async fn dashboard(config: Config, listen: &str) -> CliResult {
    use crate::dashboard::{DashboardError, TOKEN_ENV};
    let shutdown = crate::shutdown::on_signals()
        .map_err(|e| Failure::other(format!("cannot install signal handlers: {e}")))?;
    // An empty token would let an empty `Authorization: Bearer ` through.
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    crate::dashboard::serve(config, listen, token, shutdown)
        .await
        .map_err(|e| match e {
            DashboardError::Serve(e @ ServeError::BadAddress(_)) => Failure::usage(e.to_string()),
            e => Failure::other(e.to_string()),
        })
}

/// `conveyor gateway`: serves the remote-worker API until SIGTERM or SIGINT.
pub async fn gateway(config: Config, listen: &str) -> CliResult {
    use crate::gateway::GatewayError;
    let shutdown = crate::shutdown::on_signals()
        .map_err(|e| Failure::other(format!("cannot install signal handlers: {e}")))?;
    crate::gateway::serve(config, listen, shutdown)
        .await
        .map_err(|e| match e {
            GatewayError::Serve(e @ ServeError::BadAddress(_)) => Failure::usage(e.to_string()),
            e @ (GatewayError::NothingToServe | GatewayError::Config(_)) => {
                Failure::usage(e.to_string())
            }
            e => Failure::other(e.to_string()),
        })
}

/// `conveyor bench`: measures, prints its report, and ends.
pub async fn bench(global: &Global, args: &BenchArgs) -> CliResult {
    let redis_url = explicit_redis_url(global);
    let options = crate::bench::Options::from_args(args, redis_url).map_err(Failure::usage)?;
    crate::bench::run(options)
        .await
        .map_err(|e| Failure::other(format!("bench: {e:#}")))
}

/// `--redis-url` only when given on the command line: a `CONVEYOR_REDIS_URL`
/// in the environment (a production Redis, say) is not benchmarked by
/// accident.
fn explicit_redis_url(global: &Global) -> Option<String> {
    use clap::CommandFactory;
    use clap::parser::ValueSource;
    let url = global.redis_url.clone()?;
    let matches = super::Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()?;
    let from_flag =
        |m: &clap::ArgMatches| m.value_source("redis_url") == Some(ValueSource::CommandLine);
    let explicit =
        from_flag(&matches) || matches.subcommand_matches("bench").is_some_and(from_flag);
    if !explicit {
        eprintln!(
            "conveyor bench: CONVEYOR_REDIS_URL is ignored (pass --redis-url to bench that Redis); starting a private redis-server"
        );
    }
    explicit.then_some(url)
}
