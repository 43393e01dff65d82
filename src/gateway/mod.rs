//! `conveyor gateway`: remote workers over HTTP, `/api/v1/...`, described
//! by `openapi.json` (served at `/api/v1/openapi.json`).
//!
//! Remote job types (`jobs."T".remote = true`) run through the same engine
//! as every other job: the gateway starts its own daemon ([`embedded_config`])
//! on the remote queues, in which each stage of a remote type is a
//! [`RemoteStage`]. That daemon takes jobs from Redis into its active list,
//! records them in SQLite, publishes progress, retries with backoff,
//! dead-letters, honours cancels and requeues on shutdown, exactly as
//! `conveyor worker` does. A [`RemoteStage`] only hands its stage to a
//! remote worker and waits for what the worker reports:
//!
//! ```text
//!  daemon (runner) ──stage a──► RemoteStage ──offer──► claim (long poll) ◄── remote worker
//!                                   ▲ events: progress, stage done,           │
//!                                   └──────── job done, fail ◄────────────────┘ (lease token)
//! ```
//!
//! A claim leases the job to one worker for `gateway.lease_secs`; heartbeats
//! and progress renew it. A lease that runs out fails the attempt as
//! retryable ("remote worker W did not renew its lease"), and the engine
//! retries the job later, on any worker, from its first unfinished stage.
//! Every call carries the lease token; a token that is not the job's
//! current lease (expired, stolen, the job cancelled or stopped) is refused
//! with 409 and changes nothing.
//!
//! - [`dispatch`]: jobs in the gateway's hands and the leases on them.
//! - [`stage`]: [`RemoteStage`], the daemon's side.
//! - [`routes`]: the HTTP side, `/api/v1`.

mod dispatch;
mod routes;
mod stage;

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{ServeError, Server};
use crate::queue::Broker;

pub use dispatch::Dispatch;
pub use routes::{ApiState, router};
pub use stage::RemoteStage;

/// The OpenAPI document of `/api/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Name under which the embedded daemon knows [`RemoteStage`].
pub const REMOTE_STAGE: &str = "remote";

/// Tokens remembered to say why a lease ended (cancelled or not).
const ENDED_MEMORY: usize = 4096;

/// The config of the gateway's own daemon: the remote queues, `gateway.max_jobs`
/// at once, and every remote stage run by [`RemoteStage`]. `None` when
/// the config has no remote job type.
pub fn embedded_config(config: &Config) -> Option<Config> {
    let queues: Vec<String> = config
        .remote_queues()
        .into_iter()
        .map(str::to_owned)
        .collect();
    if queues.is_empty() {
        return None;
    }
    let mut c = config.clone();
    c.worker.id = Some(
        config
            .gateway
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", crate::config::hostname())),
    );
    c.worker.queues = queues;
    c.worker.queue_weights.clear();
    // Remote stages have no pool (refused in the config): the gateway's
    // daemon runs them all, whatever `[worker] pools` says for this host's
    // `conveyor worker`.
    c.worker.pools = vec![crate::config::DEFAULT_POOL.to_owned()];
    c.worker.concurrency = config.gateway.max_jobs;
    c.worker.http = None;
    c.schedules.clear();
    c.jobs.retain(|_, j| j.remote);
    for job in c.jobs.values_mut() {
        job.remote = false;
        for stage in &mut job.stages {
            stage.builtin = Some(REMOTE_STAGE.to_owned());
        }
    }
    Some(c)
}

/// The gateway's dispatch and its daemon's task (which ends with the
/// daemon's error, if it could not start).
pub type Started = (Arc<Dispatch>, tokio::task::JoinHandle<Result<(), String>>);

/// Starts the gateway's daemon when the config has remote job types; the
/// dispatch the HTTP handlers use, and the daemon's task.
pub fn start(
    config: &Config,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<Option<Started>, String> {
    let Some(embedded) = embedded_config(config) else {
        return Ok(None);
    };
    let dispatch = Dispatch::new(config, broker, shutdown.clone());
    let worker = crate::worker::builder::Worker::builder(embedded)
        .stage(REMOTE_STAGE, RemoteStage::new(dispatch.clone()))
        .build()
        .map_err(|e| format!("the gateway's daemon: {e}"))?;
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        worker.run(shutdown).await.map_err(|e| {
            // Without its daemon the API would hand out nothing: stop all.
            tracing::error!(error = %e, "gateway_daemon_stopped");
            stop.cancel();
            format!("the gateway's daemon: {e}")
        })
    });
    Ok(Some((dispatch, task)))
}

/// Tokens by name: `[gateway] tokens` and `CONVEYOR_API_TOKENS="name=token,..."`.
pub fn tokens(config: &Config) -> Result<Vec<(String, String)>, String> {
    let mut all: Vec<(String, String)> = config
        .gateway
        .tokens
        .iter()
        .map(|(k, v)| (k.clone(), v.trim().to_owned()))
        .collect();
    if let Ok(env) = std::env::var(TOKENS_ENV) {
        for item in env.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, token)) = item.split_once('=') else {
                return Err(format!("{TOKENS_ENV}: `name=token` pairs expected"));
            };
            if token.trim().len() < 16 {
                return Err(format!(
                    "{TOKENS_ENV}: the token of `{}` must be at least 16 characters",
                    name.trim()
                ));
            }
            all.push((name.trim().to_owned(), token.trim().to_owned()));
        }
    }
    Ok(all)
}

/// Environment variable with more API tokens.
pub const TOKENS_ENV: &str = "CONVEYOR_API_TOKENS";

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "the config has no remote job type (jobs.\"T\".remote = true): the gateway would have nothing to hand out"
    )]
    NothingToServe,
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Connect(#[from] crate::queue::ConnectError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Daemon(String),
}

/// `conveyor gateway --listen ADDR`: the remote-worker API and its daemon,
/// until `shutdown`. At shutdown unclaimed jobs go back to their queues at
/// once; the server stays up until the daemon has drained, so remote
/// workers can still report the jobs they hold during the grace period
/// (new claims get 503).
pub async fn serve(
    config: Config,
    listen: &str,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    if embedded_config(&config).is_none() {
        return Err(GatewayError::NothingToServe);
    }
    let tokens = tokens(&config).map_err(GatewayError::Config)?;
    let g = &config.gateway;
    let tls = match (&g.tls_cert_file, &g.tls_key_file) {
        (Some(cert), Some(key)) => Some(("gateway", cert, key)),
        _ => None,
    };
    let server = Server::bind(listen, tls).await?;
    let Some(broker) = Broker::connect_waiting(&config.redis, &shutdown).await? else {
        return Ok(());
    };
    let local = server.local;
    if server.plain_beyond_loopback() {
        eprintln!(
            "conveyor: warning: the gateway serves plain HTTP on {local}: set [gateway] tls_cert_file and tls_key_file for HTTPS"
        );
    }
    if tokens.is_empty() {
        eprintln!(
            "conveyor: the remote-worker API refuses every call: set [gateway] tokens or {TOKENS_ENV}"
        );
    }
    let Some((dispatch, daemon)) =
        start(&config, broker, shutdown.clone()).map_err(GatewayError::Daemon)?
    else {
        return Err(GatewayError::NothingToServe);
    };
    let routes = router(Arc::new(ApiState {
        dispatch,
        tokens,
        max_body: config.worker.max_job_bytes,
        waiting: Arc::new(Semaphore::new(g.max_waiting_claims)),
        waiting_workers: Default::default(),
        claim_rate: Default::default(),
        claims_per_sec: g.claims_per_sec,
        shutdown: shutdown.clone(),
    }));
    println!(
        "conveyor gateway on {}://{local}/api/v1/ (OpenAPI: /api/v1/openapi.json)",
        server.scheme()
    );
    tracing::info!(addr = %local, "gateway_started");
    let drained = CancellationToken::new();
    let daemon = tokio::spawn({
        let drained = drained.clone();
        async move {
            let result = daemon.await;
            drained.cancel();
            result
        }
    });
    let served = server.serve(routes, drained, shutdown.clone()).await;
    // The server ends only once the daemon has: its result is at hand.
    match daemon.await {
        Ok(Ok(Err(e))) => return Err(GatewayError::Daemon(e)),
        Ok(Err(e)) | Err(e) => {
            return Err(GatewayError::Daemon(format!(
                "the gateway's daemon failed: {e}"
            )));
        }
        Ok(Ok(Ok(()))) => {}
    }
    tracing::info!("gateway_stopped");
    Ok(served?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_daemon_runs_every_remote_stage_whatever_the_hosts_pools() {
        let config = Config::from_toml(
            "[worker]\npools = [\"gpu\"]\n[jobs.r]\nremote = true\nqueue = \"r\"\nstages = [{ name = \"s\" }]\n",
        )
        .unwrap();
        let embedded = embedded_config(&config).expect("a remote queue");
        assert_eq!(embedded.worker.pools, [crate::config::DEFAULT_POOL]);
        assert_eq!(embedded.pool_lists(), Ok(Vec::new()), "pending alone");
        assert_eq!(
            embedded.jobs["r"].stages[0].pool(),
            crate::config::DEFAULT_POOL
        );
    }
}
