//! `conveyor dashboard`: a web page of queues, workers and jobs with live
//! progress, and the JSON API it is drawn from.
//!
//! The dashboard is a reader like the CLI, and keeps no state of its own:
//! any number may run, on any hosts. The daemons report to it only through
//! Redis (queue lists, registrations, the `P:live` snapshot, the
//! `P:progress:*` channels, read through [`crate::client::Inspector`]) and
//! the SQLite file at `store.path` (opened read-only, per request). It
//! changes nothing unless `CONVEYOR_DASHBOARD_TOKEN` is set. The
//! remote-worker API is `conveyor gateway` ([`crate::gateway`]).
//!
//! - [`reads`]: `/api/...` JSON reads, open to all.
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
pub mod events;
pub mod reads;

use std::path::PathBuf;
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
use crate::http::{ServeError, Server};
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
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Connect(#[from] crate::queue::ConnectError),
    #[error(transparent)]
    Serve(#[from] ServeError),
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
        .route("/api/queues", get(reads::queues))
        .route("/api/workers", get(reads::workers))
        .route("/api/jobs", get(reads::jobs))
        .route("/api/jobs/{id}", get(reads::job))
        .route("/api/jobs/{id}/cancel", post(actions::cancel))
        .route("/api/jobs/{id}/retry", post(actions::retry))
        .route("/api/dead", get(reads::dead))
        .route("/api/dead/retry", post(actions::dead_retry))
        .route("/api/dead/purge", post(actions::dead_purge))
        .route("/api/live", get(reads::live))
        .fallback(reads::not_found)
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
    let server = Server::bind(listen, tls_files(&config)).await?;
    let Some(broker) = Broker::connect_waiting(&config.redis, &shutdown).await? else {
        return Ok(());
    };
    let local = server.local;
    if server.plain_beyond_loopback() {
        eprintln!(
            "conveyor: warning: the dashboard serves plain HTTP on {local}: set [dashboard] tls_cert_file and tls_key_file for HTTPS"
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
    let remote = config.remote_queues();
    if !remote.is_empty() {
        eprintln!(
            "conveyor: the remote-worker API (/api/v1) of queue(s) {} is served by `conveyor gateway`, not by the dashboard",
            remote.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
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
    println!("conveyor dashboard on {}://{local}/", server.scheme());
    tracing::info!(addr = %local, "dashboard_started");
    let served = server
        .serve(router(app), shutdown.clone(), shutdown.clone())
        .await;
    let _ = bridge.await;
    tracing::info!("dashboard_stopped");
    Ok(served?)
}

/// `[dashboard]`'s certificate; else, for a config that still has the old
/// `[api]` section, its TLS files, which served the whole dashboard then.
fn tls_files(config: &Config) -> Option<(&'static str, &PathBuf, &PathBuf)> {
    let d = &config.dashboard;
    if let (Some(cert), Some(key)) = (&d.tls_cert_file, &d.tls_key_file) {
        return Some(("dashboard", cert, key));
    }
    let g = &config.gateway;
    match (&g.tls_cert_file, &g.tls_key_file) {
        (Some(cert), Some(key)) if config.from_legacy_api() => Some(("api", cert, key)),
        _ => None,
    }
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
