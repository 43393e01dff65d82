//! The gateway's `/api/v1` routes: bearer tokens, bodies read within a limit and
//! checked against the OpenAPI schemas, JSON errors with a `reason`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::OPENAPI;
use super::dispatch::{Dispatch, Refusal};
use crate::http::{bearer, same_secret};

/// What the handlers share.
pub struct ApiState {
    pub dispatch: Arc<Dispatch>,
    /// (name, token); empty: every call is refused.
    pub tokens: Vec<(String, String)>,
    /// Largest request body.
    pub max_body: usize,
    /// Claims waiting at once.
    pub waiting: Arc<Semaphore>,
    /// Worker ids with a claim waiting (one each).
    pub waiting_workers: Mutex<HashSet<String>>,
    /// Claims per worker id in the current second: (second's start, count).
    pub claim_rate: Mutex<HashMap<String, (Instant, u32)>>,
    /// Most claims per second per worker id.
    pub claims_per_sec: u32,
    pub shutdown: CancellationToken,
}

/// The `/api/v1` router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/claim", post(claim))
        .route("/api/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/jobs/{id}/progress", post(progress))
        .route("/api/v1/jobs/{id}/complete", post(complete))
        .route("/api/v1/jobs/{id}/fail", post(fail))
        .route("/api/v1/jobs/{id}/release", post(release))
        .with_state(state)
}

/// An error answer: `{"error": ..., "reason": ...}`.
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::LeaseLost => Self::new(
                StatusCode::CONFLICT,
                "lease_lost",
                "this lease is not the job's: it expired, the job went to another worker, or it ended; drop the job",
            ),
            Refusal::Cancelled => Self::new(
                StatusCode::CONFLICT,
                "cancelled",
                "the job was cancelled; drop it",
            ),
            Refusal::WrongStage => Self::new(
                StatusCode::CONFLICT,
                "wrong_stage",
                "that is not the job's current stage",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({ "error": self.message, "reason": self.reason })),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// The name of the token the request carries; every token is compared,
/// so the time taken does not tell which one matched.
fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    if state.tokens.is_empty() {
        return Err(unauthorized(
            "the API has no tokens: set [gateway] tokens or CONVEYOR_API_TOKENS",
        ));
    }
    let given =
        bearer(headers).ok_or_else(|| unauthorized("Authorization: Bearer <token> is required"))?;
    let mut found = None;
    for (name, token) in &state.tokens {
        if same_secret(given.as_bytes(), token.as_bytes()) && found.is_none() {
            found = Some(name.clone());
        }
    }
    found.ok_or_else(|| unauthorized("unknown token"))
}

/// Reads and parses a JSON body of at most `max_body` bytes.
async fn body<T: DeserializeOwned>(state: &ApiState, request: Request) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(request.into_body(), state.max_body)
        .await
        .map_err(|e| {
            if crate::http::conn::is_body_timeout(&e) {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the body stopped arriving",
                )
            } else {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body is over {} bytes", state.max_body),
                )
            }
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid body: {e}")))
}

fn ok(value: Value) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n < min || n > max {
        return Err(ApiError::bad(format!(
            "`{field}` must be {min} to {max} characters"
        )));
    }
    Ok(())
}

fn check_job_id(id: &str) -> Result<(), ApiError> {
    check_len("id", id, 1, 200)
}

/// A request body that carries a lease token.
trait WithLease: DeserializeOwned {
    fn lease(&self) -> &str;
}

/// What every call after a claim does first: the token, the body, the
/// job id and the lease's shape.
async fn leased_call<T: WithLease>(
    state: &ApiState,
    id: &str,
    headers: &HeaderMap,
    request: Request,
) -> Result<T, ApiError> {
    authorize(state, headers)?;
    let req: T = body(state, request).await?;
    check_job_id(id)?;
    check_len("lease", req.lease(), 1, 200)?;
    Ok(req)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(OPENAPI),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    worker_id: String,
    #[serde(default)]
    types: Vec<String>,
    wait_secs: Option<u64>,
}

impl ApiState {
    /// Counts a claim of `worker` against its per-second budget.
    fn allow_claim(&self, worker: &str) -> bool {
        let now = Instant::now();
        let mut rate = self.claim_rate.lock().unwrap_or_else(|p| p.into_inner());
        if rate.len() > 10_000 {
            rate.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let (start, count) = rate.entry(worker.to_owned()).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= self.claims_per_sec
    }
}

/// Frees a worker id's waiting slot when its claim ends, however it ends.
struct Waiting<'a> {
    state: &'a ApiState,
    worker: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.state.waiting_workers.lock() {
            w.remove(&self.worker);
        }
    }
}

async fn claim(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let group = authorize(&state, &headers)?;
    let req: ClaimRequest = body(&state, request).await?;
    check_len("worker_id", &req.worker_id, 1, 100)?;
    if !req
        .worker_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(ApiError::bad(
            "`worker_id` may hold letters, digits and _ . - only",
        ));
    }
    if req.types.len() > 100 {
        return Err(ApiError::bad("`types` lists at most 100 job types"));
    }
    for t in &req.types {
        check_len("types[]", t, 1, 200)?;
    }
    let wait = req.wait_secs.unwrap_or(20);
    if wait > 30 {
        return Err(ApiError::bad("`wait_secs` must be 0 to 30"));
    }
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let too_many = |m: &str| ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_claims", m);
    if !state.allow_claim(&req.worker_id) {
        return Err(too_many(
            "more than gateway.claims_per_sec claims this second from this worker id; wait_secs > 0 long-polls instead",
        ));
    }
    let _slot = state
        .waiting
        .clone()
        .try_acquire_owned()
        .map_err(|_| too_many("too many claims are waiting; retry later"))?;
    {
        let mut w = state
            .waiting_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !w.insert(req.worker_id.clone()) {
            return Err(too_many("this worker id already waits in a claim"));
        }
    }
    let _waiting = Waiting {
        state: &state,
        worker: req.worker_id.clone(),
    };
    let d = &state.dispatch;
    let until = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let offered = d.offered();
        tokio::pin!(offered);
        offered.as_mut().enable();
        if state.shutdown.is_cancelled() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        if let Some(job) = d.take(&req.worker_id, &req.types) {
            tracing::debug!(job_id = %job.job_id, token_name = %group, "api_job_claimed");
            return Ok(ok(serde_json::to_value(job).unwrap_or(Value::Null)));
        }
        tokio::select! {
            _ = offered => {}
            _ = tokio::time::sleep_until(until) => return Ok(StatusCode::NO_CONTENT.into_response()),
            _ = state.shutdown.cancelled() => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseOnly {
    lease: String,
}

impl WithLease for LeaseOnly {
    fn lease(&self) -> &str {
        &self.lease
    }
}

async fn heartbeat(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let req: LeaseOnly = leased_call(&state, &id, &headers, request).await?;
    let lease = state.dispatch.heartbeat(&id, &req.lease)?;
    Ok(ok(serde_json::to_value(lease).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressRequest {
    lease: String,
    stage: Option<String>,
    progress: f64,
    message: Option<String>,
}

impl WithLease for ProgressRequest {
    fn lease(&self) -> &str {
        &self.lease
    }
}

async fn progress(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let req: ProgressRequest = leased_call(&state, &id, &headers, request).await?;
    if let Some(stage) = &req.stage {
        check_len("stage", stage, 1, 200)?;
    }
    if !(0.0..=100.0).contains(&req.progress) {
        return Err(ApiError::bad("`progress` must be 0 to 100"));
    }
    if let Some(m) = &req.message {
        check_len("message", m, 0, 1000)?;
    }
    let lease = state.dispatch.progress(
        &id,
        &req.lease,
        req.stage.as_deref(),
        req.progress,
        req.message,
    )?;
    Ok(ok(serde_json::to_value(lease).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    lease: String,
    stage: Option<String>,
    #[serde(default)]
    result: Value,
}

impl WithLease for CompleteRequest {
    fn lease(&self) -> &str {
        &self.lease
    }
}

async fn complete(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let req: CompleteRequest = leased_call(&state, &id, &headers, request).await?;
    if let Some(stage) = &req.stage {
        check_len("stage", stage, 1, 200)?;
    }
    let next = state
        .dispatch
        .complete(&id, &req.lease, req.stage.as_deref(), req.result)?;
    Ok(ok(json!({ "status": "accepted", "next_stage": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailRequest {
    lease: String,
    error: String,
    retryable: Option<bool>,
}

impl WithLease for FailRequest {
    fn lease(&self) -> &str {
        &self.lease
    }
}

async fn fail(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let req: FailRequest = leased_call(&state, &id, &headers, request).await?;
    check_len("error", &req.error, 1, 4000)?;
    state
        .dispatch
        .fail(&id, &req.lease, req.error, req.retryable.unwrap_or(true))?;
    Ok(ok(json!({ "status": "accepted", "next_stage": null })))
}

async fn release(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult {
    let req: LeaseOnly = leased_call(&state, &id, &headers, request).await?;
    state.dispatch.give_back(&id, &req.lease)?;
    Ok(ok(json!({ "status": "accepted", "next_stage": null })))
}
