//! `conveyor dashboard`: a web page of queues, workers and jobs with live
//! progress, and the JSON API it is drawn from.
//!
//! The dashboard is a reader like the CLI: any number of daemons on any
//! hosts report to it only through Redis (queue lists, registrations, the
//! `P:live` snapshot, the `P:progress:*` channels) and the SQLite file at
//! `store.path` (opened read-only, per request).
//!
//! - [`api`]: `/api/...` JSON reads, open to all.
//! - [`actions`]: cancel, retry, purge (`POST`), which need
//!   `Authorization: Bearer $CONVEYOR_DASHBOARD_TOKEN`.
//! - [`events`]: `/events`, server-sent events bridged from one
//!   `PSUBSCRIBE P:progress:*` connection shared by every browser.
//! - `assets/`: one static page (HTML, JS, CSS) embedded in the binary; the
//!   JS renders the API and never writes job data as HTML. The
//!   `Content-Security-Policy` allows scripts and styles from this origin
//!   only (no inline script).
//!
//! Shutdown: the token given to [`serve`] ends the SSE streams
//! (`take_until`), the pub/sub bridge, and then axum's graceful shutdown,
//! which an open SSE stream would otherwise hold up forever.

pub mod actions;
pub mod api;
pub mod events;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::client::inspect::Inspector;
use crate::config::Config;
use crate::queue::Broker;

/// Environment variable holding the token the actions need.
pub const TOKEN_ENV: &str = "CONVEYOR_DASHBOARD_TOKEN";
/// Browsers following `/events` at once; more are answered 503.
const MAX_EVENT_STREAMS: usize = 256;
/// SQLite reads running at once (each on a blocking thread).
const MAX_SQLITE_READS: usize = 8;
/// Progress messages buffered per browser before it is told to resync.
const EVENT_BUFFER: usize = 1024;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Why the dashboard could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("--listen `{0}` is not an address like 127.0.0.1:8080")]
    BadAddress(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Api(String),
}

/// What every handler reads.
pub struct App {
    pub config: Config,
    /// Job lookups and the actions.
    pub client: Client,
    /// Every read of the queues.
    pub inspector: Inspector,
    /// `CONVEYOR_DASHBOARD_TOKEN`; `None`: actions are refused.
    pub token: Option<String>,
    /// Progress messages from the bridge to the browsers.
    pub events: broadcast::Sender<events::Message>,
    /// Slots for `/events` streams.
    pub streams: Arc<Semaphore>,
    /// Slots for SQLite reads.
    pub sqlite: Arc<Semaphore>,
    /// Cancelled at shutdown: ends the SSE streams.
    pub shutdown: CancellationToken,
}

/// The router, for [`serve`] and for tests that drive it in-process.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/events", get(events::stream))
        .route("/api/queues", get(api::queues))
        .route("/api/workers", get(api::workers))
        .route("/api/jobs", get(api::jobs))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/cancel", post(actions::cancel))
        .route("/api/jobs/{id}/retry", post(actions::retry))
        .route("/api/dead", get(api::dead))
        .route("/api/dead/retry", post(actions::dead_retry))
        .route("/api/dead/purge", post(actions::dead_purge))
        .route("/api/live", get(api::live))
        .fallback(api::not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

/// `conveyor dashboard --listen ADDR`: serves until `shutdown`.
pub async fn serve(
    config: Config,
    listen: &str,
    token: Option<String>,
    shutdown: CancellationToken,
) -> Result<(), DashboardError> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| DashboardError::BadAddress(listen.to_owned()))?;
    let broker = Broker::connect_config(&config.redis, 6).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DashboardError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    let tls = match (&config.api.tls_cert_file, &config.api.tls_key_file) {
        (Some(cert), Some(key)) => {
            Some(tls::server_config(cert, key).map_err(DashboardError::Api)?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if !local.ip().is_loopback() && tls.is_none() {
        eprintln!(
            "conveyor: warning: the dashboard serves plain HTTP on {local}: set [api] tls_cert_file and tls_key_file for HTTPS"
        );
    }
    if !local.ip().is_loopback() {
        eprintln!(
            "conveyor: warning: the dashboard listens on {local}, beyond this host; \
             its pages and API show job payloads to anyone who can reach it"
        );
    }
    let token = token.filter(|t| !t.is_empty());
    if token.is_none() {
        eprintln!(
            "conveyor: actions (cancel, retry, purge) are disabled: set {TOKEN_ENV} to enable them"
        );
    }
    let api_tokens = crate::api::tokens(&config).map_err(DashboardError::Api)?;
    let api = crate::api::start(&config, broker.clone(), shutdown.clone())
        .map_err(DashboardError::Api)?;
    let api_router = api.as_ref().map(|(dispatch, _)| {
        if api_tokens.is_empty() {
            eprintln!(
                "conveyor: the remote-worker API refuses every call: set [api] tokens or {}",
                crate::api::TOKENS_ENV
            );
        }
        crate::api::router(Arc::new(crate::api::ApiState {
            dispatch: dispatch.clone(),
            tokens: api_tokens,
            max_body: config.worker.max_job_bytes,
            waiting: Arc::new(Semaphore::new(config.api.max_waiting_claims)),
            waiting_workers: Default::default(),
            claim_rate: Default::default(),
            claims_per_sec: config.api.claims_per_sec,
            shutdown: shutdown.clone(),
        }))
    });
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let bridge = events::Bridge::new(broker.clone(), events.clone());
    let bridge = tokio::spawn(bridge.run(shutdown.clone()));
    let client = Client::with_broker(broker, &config);
    let app = Arc::new(App {
        inspector: client.inspector(),
        client,
        config,
        token,
        events,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        sqlite: Arc::new(Semaphore::new(MAX_SQLITE_READS)),
        shutdown: shutdown.clone(),
    });
    println!("conveyor dashboard on {scheme}://{local}/");
    tracing::info!(addr = %local, "dashboard_started");
    let routes = match api_router {
        Some(api) => {
            println!(
                "remote-worker API on {scheme}://{local}/api/v1/ (OpenAPI: /api/v1/openapi.json)"
            );
            api.merge(router(app))
        }
        None => router(app),
    };
    // The server stays up until the API's daemon has drained, so remote
    // workers can still report the jobs they hold during the grace period
    // (new claims get 503).
    let daemon_done = CancellationToken::new();
    let daemon = api.map(|(_, handle)| {
        let done = daemon_done.clone();
        tokio::spawn(async move {
            let result = handle.await;
            done.cancel();
            result
        })
    });
    if daemon.is_none() {
        daemon_done.cancel();
    }
    let http_stop = CancellationToken::new();
    tokio::spawn({
        let (shutdown, done, http_stop) = (shutdown.clone(), daemon_done, http_stop.clone());
        async move {
            shutdown.cancelled().await;
            done.cancelled().await;
            http_stop.cancel();
        }
    });
    let served = match &tls {
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config.clone(), shutdown.clone())
                .map_err(DashboardError::Serve)?;
            axum::serve(listener, routes)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        }
        None => {
            axum::serve(listener, routes)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        }
    };
    let _ = bridge.await;
    if let Some(daemon) = daemon
        && let Ok(Ok(Err(e))) = daemon.await
    {
        return Err(DashboardError::Api(e));
    }
    tracing::info!("dashboard_stopped");
    served.map_err(DashboardError::Serve)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
