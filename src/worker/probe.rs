//! The daemon's HTTP listener (`[worker] http`): `/healthz`, `/readyz` and
//! `/metrics` in the Prometheus text format (the metrics are
//! [`crate::telemetry::metrics`]), served by [`crate::http::Server`] like
//! the dashboard and the gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use crate::http::Server;
use crate::queue::Broker;
use crate::telemetry::metrics::{recorder, redis_error};

/// What the listener reads at each scrape or probe.
pub struct Probe {
    pub health: Arc<Health>,
    pub broker: Broker,
    pub queues: Vec<String>,
    /// The stage pool lists whose depth `/metrics` shows: per queue served,
    /// the pools its stages name and those this daemon serves. Empty when
    /// the daemon does not use pools (a one-pool fleet reads no pool list).
    pub pools: BTreeMap<String, BTreeSet<String>>,
    pub worker_id: String,
    /// Jobs in hand now (the runner's count).
    pub in_flight: Box<dyn Fn() -> u64 + Send + Sync>,
    /// How long Redis may stay silent before `/readyz` says no.
    pub ready_window: Duration,
}

struct App {
    probe: Probe,
    metrics: PrometheusHandle,
}

/// Binds the listener, before the daemon registers: a taken port fails
/// the start, with the key named.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, String> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| format!("config key `worker.http`: `{addr}` is not an address"))?;
    tokio::net::TcpListener::bind(parsed)
        .await
        .map_err(|e| format!("config key `worker.http`: cannot listen on {parsed}: {e}"))
}

/// Installs the metrics recorder and serves the listener until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, probe: Probe, shutdown: CancellationToken) {
    let metrics = match recorder() {
        Ok(m) => m,
        Err(err) => {
            tracing::error!(error = %err, "metrics_recorder_failed");
            return;
        }
    };
    metrics::gauge!("conveyor_up", "worker_id" => probe.worker_id.clone(),
        "version" => env!("CARGO_PKG_VERSION"))
    .set(1.0);
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let app = Arc::new(App { probe, metrics });
    let upkeep = app.metrics.clone();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(app);
    tracing::info!(addr = %local, "http_listening");
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = every.tick() => upkeep.run_upkeep(),
            }
        }
    });
    // The dashboard's and gateway's server, with their limits on clients.
    let served = match Server::plain(listener) {
        Ok(server) => server.serve(router, shutdown.clone(), shutdown).await,
        Err(err) => Err(err),
    };
    if let Err(err) = served {
        tracing::error!(error = %err, "http_listener_failed");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    match app.probe.health.readiness(app.probe.ready_window) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// `conveyor_queue_depth{queue, list="pool", pool}` of each pool list the
/// daemon knows of (none without pools), read like the other depths.
async fn pool_depths(p: &Probe) {
    if p.pools.is_empty() {
        return;
    }
    let depths =
        tokio::time::timeout(Duration::from_secs(2), p.broker.pool_list_depths(&p.pools)).await;
    match depths {
        Ok(Ok(rows)) => {
            for (queue, pool, n) in rows {
                metrics::gauge!("conveyor_queue_depth", "queue" => queue, "list" => "pool",
                    "pool" => pool)
                .set(n as f64);
            }
        }
        Ok(Err(_)) | Err(_) => redis_error("metrics"),
    }
}

async fn metrics_page(State(app): State<Arc<App>>) -> impl IntoResponse {
    let p = &app.probe;
    metrics::gauge!("conveyor_jobs_in_flight").set((p.in_flight)() as f64);
    metrics::gauge!("conveyor_heartbeat_age_seconds").set(p.health.heartbeat_age().as_secs_f64());
    // Queue depths, read at scrape time: one pipeline, bounded by a timeout
    // so a Redis outage does not hang the scrape.
    let depths = tokio::time::timeout(
        Duration::from_secs(2),
        p.broker.own_depths(&p.queues, &p.worker_id),
    )
    .await;
    match depths {
        Ok(Ok(rows)) => {
            for (queue, list, n) in rows {
                metrics::gauge!("conveyor_queue_depth", "queue" => queue, "list" => list)
                    .set(n as f64);
            }
        }
        Ok(Err(_)) | Err(_) => redis_error("metrics"),
    }
    pool_depths(p).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
