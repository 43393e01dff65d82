//! How a server serves its connections: the accept loop under a cap, the
//! timeouts that shed idle and slow clients, the access log, and a handler
//! panic answered with a 500.
//!
//! Each connection is HTTP/1.1 (hyper's `http1` server, with a timer so its
//! header-read timeout works). The timeouts only bound *reading* from the
//! client: a response being served, however long (a long-polled claim, an
//! SSE stream), is never cut.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// How long a client may take to send a request's head (request line and
/// headers). A real client sends its few hundred bytes in well under a
/// second; 10 s tolerates a congested link yet frees a connection held by a
/// silent or trickling client quickly. Hyper starts this timer as soon as
/// it waits for a request, so it is also how long a kept-alive connection
/// may sit idle between two requests: browsers, Prometheus and HTTP client
/// pools reconnect when an idle connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause between two chunks of a request body. Our bodies are
/// JSON of at most `worker.max_job_bytes` and arrive in one go; 30 s
/// leaves room for a slow uplink without letting a stalled upload hold a
/// handler (and its connection) open for ever.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Open connections per server. Past it the server stops accepting (new
/// connections wait in the kernel's backlog) until one closes. 768 stays
/// under the common 1024 open-file soft limit with room left for Redis,
/// SQLite and the process's own files.
pub const MAX_CONNECTIONS: usize = 768;

/// Testing knob: the header-read (and idle) timeout in milliseconds,
/// read when a server starts, so tests need not wait 10 s.
pub const HEADER_TIMEOUT_ENV: &str = "CONVEYOR_HTTP_HEADER_TIMEOUT_MS";

/// The limits one server applies to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read: Duration,
    pub body_read: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: HEADER_READ_TIMEOUT,
            body_read: BODY_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

impl Limits {
    /// The defaults, with [`HEADER_TIMEOUT_ENV`] applied when it is set.
    pub fn from_env() -> Result<Self, String> {
        Self::with_header_timeout(std::env::var(HEADER_TIMEOUT_ENV).ok().as_deref())
    }

    fn with_header_timeout(ms: Option<&str>) -> Result<Self, String> {
        let mut limits = Self::default();
        if let Some(ms) = ms {
            match ms.trim().parse::<u64>() {
                Ok(n) if n > 0 => limits.header_read = Duration::from_millis(n),
                _ => {
                    return Err(format!(
                        "{HEADER_TIMEOUT_ENV}=`{ms}` is not a number of milliseconds above 0"
                    ));
                }
            }
        }
        Ok(limits)
    }
}

/// `routes` with what every server adds around them: the request-body
/// timeout, a 500 for a handler that panics, and the access log.
pub fn layered(routes: Router, limits: &Limits) -> Router {
    routes
        .layer(RequestBodyTimeoutLayer::new(limits.body_read))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(access_log))
}

/// Whether reading a request body failed on [`BODY_READ_TIMEOUT`] (rather
/// than on its size, say): anywhere in `err`'s chain of sources.
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Accepts connections from `listener` and serves `routes` on them until
/// `stop` is cancelled; then stops accepting and waits for the requests
/// under way to finish (idle connections close at once).
pub async fn serve<L>(mut listener: L, routes: Router, limits: Limits, stop: CancellationToken)
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    let service = TowerToHyperService::new(layered(routes, &limits));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        // The semaphore is never closed; were it, nothing more is served.
        let Ok(slot) = slot else { break };
        let (io, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(io), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, ?peer, "http_connection_error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One line per request at debug level: method, path (without the query),
/// status and the time to the response's head. Headers are never logged:
/// `Authorization` carries the tokens.
async fn access_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "http_request"
    );
    response
}

/// A handler that panicked: logged, answered with a plain 500.
fn panicked(panic: Box<dyn Any + Send + 'static>) -> Response<Body> {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = what, "http_handler_panicked");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn the_header_timeout_knob_is_checked() {
        assert_eq!(Limits::with_header_timeout(None), Ok(Limits::default()));
        assert_eq!(
            Limits::with_header_timeout(Some("250")).map(|l| l.header_read),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0", "-1", "1s", ""] {
            let err = Limits::with_header_timeout(Some(bad)).unwrap_err();
            assert!(err.contains(HEADER_TIMEOUT_ENV), "{err}");
        }
    }

    /// Serves a router that panics, and one that reads a body, on
    /// loopback with the real accept loop.
    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let routes = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("a handler bug");
                    }
                    "unreachable"
                }),
            )
            .route("/ok", get(|| async { "fine" }))
            .route("/echo", post(|body: String| async move { body }))
            .route(
                "/limited",
                post(|req: Request| async move {
                    match axum::body::to_bytes(req.into_body(), 4).await {
                        Ok(b) => (StatusCode::OK, format!("{} bytes", b.len())),
                        Err(e) if is_body_timeout(&e) => {
                            (StatusCode::REQUEST_TIMEOUT, "slow".into())
                        }
                        Err(_) => (StatusCode::PAYLOAD_TOO_LARGE, "big".into()),
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, routes, limits, stop.clone()));
        (addr, stop)
    }

    /// Sends `raw` and reads until the server closes (10 s at most).
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server answered and closed within 10 s")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_and_the_server_goes_on() {
        let (addr, stop) = start(Limits::default()).await;
        let r = exchange(
            addr,
            b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
        assert!(r.ends_with("internal error\n"), "{r}");
        let r = exchange(
            addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_stalled_body_is_given_up_on() {
        let limits = Limits {
            body_read: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        // 10 bytes announced, 2 sent, then silence.
        let r = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\nab",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        // A whole body is read as before.
        let r = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200 ") && r.ends_with("hello"),
            "{r}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_half_sent_head_is_closed_and_the_cap_holds() {
        let limits = Limits {
            header_read: Duration::from_millis(1000),
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        // Two clients fill the cap with half a request each.
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(b"GET /ok HTTP/1.1\r\nHo").await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        b.write_all(b"GET /ok HTTP/1.1\r\nHo").await.unwrap();
        // A third waits in the backlog: no answer while they hold the cap.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), c.read(&mut first)).await;
        assert!(early.is_err(), "answered past the cap: {early:?}");
        // The header timeout closes the two (hyper may answer 408 first)...
        for s in [&mut a, &mut b] {
            let mut out = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            assert!(closed.is_ok(), "a half-sent head was not closed");
        }
        // ...and the third is served.
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .expect("served once a slot is free")
            .unwrap();
        let r = String::from_utf8_lossy(&out);
        assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("fine"), "{r}");
        stop.cancel();
    }
}
