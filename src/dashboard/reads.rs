//! The dashboard's JSON API: the reads, open to all, and the error type.
//! The actions (`POST`) are in [`super::actions`].
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /api/queues` | per queue: pending, active, scheduled, dead, stage pools (depth, daemons); finished jobs per minute (15 min, SQLite) |
//! | `GET /api/workers` | live daemons with their heartbeat's age |
//! | `GET /api/jobs?status=&type=&queue=&q=&page=&limit=` | jobs from SQLite, newest first (`q`: id contains); pending and scheduled ones from Redis |
//! | `GET /api/jobs/{id}` | one job: record (stages, attempts), live message, whether it is dead |
//! | `GET /api/dead?queue=&limit=` | dead entries, newest first |
//! | `GET /api/live` | the latest message of every running job (`P:live`) |
//! | `POST /api/jobs/{id}/cancel` | cancel, as `conveyor cancel` |
//! | `POST /api/jobs/{id}/retry` | a dead job back to its queue, as `conveyor retry` |
//! | `POST /api/dead/retry`, `/api/dead/purge` | `{"queue"?, "ids": [...]}` or `{"queue"?, "all": true}` |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{App, TOKEN_ENV};
use crate::client::ClientError;
use crate::client::inspect::WaitingQuery;
use crate::job::META_FIELD;
use crate::job::Status;
use crate::store::{JobFilter, Reader, StoreError};

/// Minutes of throughput `/api/queues` reports.
const THROUGHPUT_MINUTES: u64 = 15;
/// Largest page of `/api/jobs`.
const MAX_PAGE: usize = 500;
/// Largest `limit` of `/api/dead` (per queue).
const MAX_DEAD: usize = 1000;

/// A request that could not be served, as `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this action needs `Authorization: Bearer <token>` with the dashboard's token")]
    Unauthorized,
    #[error(
        "actions are disabled: start the dashboard with {TOKEN_ENV}=<secret> in its environment, then send `Authorization: Bearer <secret>` (the page has a token field)"
    )]
    Disabled,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Busy(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("SQLite: {0}")]
    Store(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Redis(e) => Self::Redis(e),
            ClientError::Connect(e) => Self::Redis(e.source),
            ClientError::Store(e) => Self::Store(e.to_string()),
            e @ ClientError::AlreadyFinished { .. } => Self::Conflict(e.to_string()),
            e => Self::BadRequest(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Disabled => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Busy(_) | Self::Redis(_) | Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = Json(json!({ "error": self.to_string() }));
        if code == StatusCode::UNAUTHORIZED {
            return (code, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (code, body).into_response()
    }
}

pub(super) type ApiResult = Result<Json<Value>, ApiError>;

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such page; the API is under /api/ (see docs/dashboard.md)".into())
}

// ------------------------------------------------------------ helpers

/// Runs `read` on a read-only connection to the SQLite file, on a
/// blocking thread; `None` while there is no file (or no tables) yet.
async fn read<T, F>(app: &App, read: F) -> Result<Option<T>, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
{
    let _slot = app
        .sqlite
        .acquire()
        .await
        .map_err(|_| ApiError::Busy("shutting down".into()))?;
    let path = app.config.store.path.clone();
    let done = tokio::task::spawn_blocking(move || {
        if !path.exists() {
            return Ok(None);
        }
        match Reader::open(&path).and_then(|r| read(&r)) {
            Ok(v) => Ok(Some(v)),
            // The first daemon is still creating the tables.
            Err(StoreError::Sql(rusqlite::Error::SqliteFailure(_, Some(m))))
                if m.starts_with("no such table") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| ApiError::Store(format!("the reading task failed: {e}")))?;
    Ok(done?)
}

pub(super) async fn known_queues(app: &App) -> Result<Vec<String>, ApiError> {
    Ok(app.inspector.queues().await?)
}

/// `None` for an absent or empty parameter.
pub(super) fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

// ------------------------------------------------------------ reads

/// `GET /api/queues`.
pub async fn queues(State(app): State<Arc<App>>) -> ApiResult {
    let report = app.inspector.status().await?;
    let minute = 60_000;
    let first = (crate::time::now_ms() / minute - (THROUGHPUT_MINUTES - 1)) * minute;
    let minutes: Vec<String> = (0..THROUGHPUT_MINUTES)
        .map(|i| {
            crate::time::rfc3339_of_ms(first + i * minute)
                .chars()
                .take(16)
                .collect()
        })
        .collect();
    let since = crate::time::rfc3339_of_ms(first);
    let counts = read(&app, move |r| r.finished_per_minute(&since))
        .await?
        .unwrap_or_default();
    let by_status = read(&app, |r| r.counts_by_status())
        .await?
        .unwrap_or_default();
    let slot = |m: &str| minutes.iter().position(|x| x == m);
    let zeros = vec![0u64; minutes.len()];
    let (mut completed, mut failed) = (zeros.clone(), zeros.clone());
    let mut by_queue: BTreeMap<String, Vec<u64>> = report
        .queues
        .iter()
        .map(|q| (q.name.clone(), zeros.clone()))
        .collect();
    for c in &counts {
        let Some(i) = slot(&c.minute) else { continue };
        if c.status == "completed" {
            completed[i] += c.count;
            by_queue
                .entry(c.queue.clone())
                .or_insert_with(|| zeros.clone())[i] += c.count;
        } else {
            failed[i] += c.count;
        }
    }
    Ok(Json(json!({
        "queues": report.queues,
        "throughput": {
            "minutes": minutes,
            "completed": completed,
            "failed": failed,
            "by_queue": by_queue,
        },
        "jobs_by_status": by_status.into_iter().collect::<BTreeMap<_, _>>(),
        "store": app.config.store.path,
    })))
}

/// `GET /api/workers`.
pub async fn workers(State(app): State<Arc<App>>) -> ApiResult {
    let workers: Vec<Value> = app
        .inspector
        .workers()
        .await?
        .into_iter()
        .map(|(w, age)| {
            let mut v = serde_json::to_value(&w).unwrap_or(Value::Null);
            v["heartbeat_age_ms"] = json!(age);
            v
        })
        .collect();
    Ok(Json(json!({ "workers": workers })))
}

#[derive(Debug, Deserialize)]
pub struct JobsQuery {
    status: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    queue: Option<String>,
    /// Id contains.
    q: Option<String>,
    page: Option<usize>,
    limit: Option<usize>,
}

/// `GET /api/jobs`: as `conveyor jobs --json`: from SQLite, and waiting
/// jobs (`status=pending|scheduled`) from Redis, in the order they will run.
/// A search (`q`) by the exact id of a job this host's SQLite does not know
/// shows it from its record in Redis (another host ran it).
pub async fn jobs(State(app): State<Arc<App>>, Query(q): Query<JobsQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(50);
    let page = q.page.unwrap_or(1);
    if !(1..=MAX_PAGE).contains(&limit) || page == 0 {
        return Err(ApiError::BadRequest(format!(
            "limit is 1 to {MAX_PAGE} and page starts at 1"
        )));
    }
    let status = given(&q.status);
    if let Some(s) = &status
        && Status::parse(s).is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "status `{s}` is not one of pending, scheduled, running, retrying, completed, failed, cancelled, handed_over"
        )));
    }
    let offset = (page - 1).saturating_mul(limit);
    if let Some(waiting @ ("pending" | "scheduled")) = status.as_deref() {
        let query = WaitingQuery {
            queue: given(&q.queue),
            kind: given(&q.kind),
            id_contains: given(&q.q),
            since_ms: None,
            scheduled: waiting == "scheduled",
            offset,
            limit,
        };
        let (rows, total) = app.inspector.waiting(&query).await?;
        return Ok(Json(
            json!({ "total": total, "page": page, "limit": limit, "jobs": rows }),
        ));
    }
    let filter = JobFilter {
        status,
        kind: given(&q.kind),
        queue: given(&q.queue),
        since: None,
        id_contains: given(&q.q),
        limit,
        offset,
    };
    let found = read(&app, move |r| r.list_jobs(&filter))
        .await?
        .unwrap_or_default();
    let mut jobs: Vec<Value> = found
        .jobs
        .iter()
        .map(|j| serde_json::to_value(j).unwrap_or(Value::Null))
        .collect();
    let mut total = found.total;
    // A job another host ran is not in this host's SQLite: searched by its
    // exact id, its record in Redis answers.
    if let Some(id) = given(&q.q)
        && page == 1
        && !found.jobs.iter().any(|j| j.id == id)
        && let Some(row) = recorded_row(&app, &id, &q).await?
    {
        jobs.insert(0, row);
        jobs.truncate(limit);
        total += 1;
    }
    Ok(Json(json!({
        "total": total,
        "total_capped": found.total_capped,
        "page": page,
        "limit": limit,
        "jobs": jobs,
    })))
}

/// The job `id` as a row of `GET /api/jobs` (the fields of
/// [`crate::store::JobSummary`]), from its record, when it matches the
/// list's other filters.
async fn recorded_row(app: &App, id: &str, q: &JobsQuery) -> Result<Option<Value>, ApiError> {
    let Some(record) = app.client.job(id).await?.and_then(|info| info.record) else {
        return Ok(None);
    };
    let matches = |want: &Option<String>, have: &str| given(want).is_none_or(|w| w == have);
    if !(matches(&q.status, &record.status)
        && matches(&q.kind, &record.kind)
        && matches(&q.queue, &record.queue))
    {
        return Ok(None);
    }
    Ok(Some(json!({
        "id": record.id,
        "type": record.kind,
        "queue": record.queue,
        "status": record.status,
        "attempt": record.attempt,
        "progress": record.progress,
        "stage": record.stage,
        "error": record.error,
        "worker_id": record.worker_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "finished_at": record.finished_at,
    })))
}

/// `GET /api/jobs/{id}`: the job's record (Redis's, readable from any
/// host, or this host's SQLite: see [`crate::Client::job`]), Redis' live state (pending,
/// scheduled, running: as `conveyor job`), the latest progress message,
/// whether it sits in a dead list (so it can be retried), and `hosts`: the
/// host of each daemon the record names that is still registered.
pub async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    let Some(info) = app.client.job(&id).await? else {
        return Err(ApiError::NotFound(format!("no job `{id}`")));
    };
    let hosts = daemon_hosts(&app, info.record.as_ref()).await?;
    let live = app.inspector.live_message(&id).await?;
    let dead = if info.status == Status::Failed {
        let queues = known_queues(&app).await?;
        !app.inspector
            .dead_matching(&queues, std::slice::from_ref(&id))
            .await?
            .is_empty()
    } else {
        false
    };
    let queue = info
        .live
        .as_ref()
        .map(|l| l.queue.clone())
        .or_else(|| info.record.as_ref().map(|r| r.queue.clone()));
    let kind = info
        .record
        .as_ref()
        .map(|r| r.kind.clone())
        .or_else(|| info.live.as_ref().and_then(|l| l.kind.clone()));
    Ok(Json(json!({
        "id": info.id,
        "status": info.status,
        "queue": queue,
        "type": kind,
        "due_at": info.live.as_ref().and_then(|l| l.due).map(crate::time::rfc3339_of),
        "record": info.record,
        "live": live,
        "dead": dead,
        "hosts": hosts,
    })))
}

/// Worker id → host of the daemons named by `record` (the job's, each
/// stage's) that are registered now; a daemon that is gone is left out.
async fn daemon_hosts(
    app: &App,
    record: Option<&crate::store::JobRecord>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(record) = record else {
        return Ok(BTreeMap::new());
    };
    let named: std::collections::BTreeSet<&str> = record
        .stages
        .iter()
        .filter_map(|s| s.worker_id.as_deref())
        .chain(record.worker_id.as_deref())
        .collect();
    if named.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(app
        .inspector
        .workers()
        .await?
        .into_iter()
        .filter(|(w, _)| named.contains(w.id.as_str()))
        .map(|(w, _)| (w.id, w.host))
        .collect())
}

#[derive(Debug, Deserialize)]
pub struct DeadQuery {
    pub(super) queue: Option<String>,
    pub(super) limit: Option<usize>,
}

/// `GET /api/dead`.
pub async fn dead(State(app): State<Arc<App>>, Query(q): Query<DeadQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).min(MAX_DEAD);
    let queues = match given(&q.queue) {
        Some(q) => vec![q],
        None => known_queues(&app).await?,
    };
    let entries: Vec<Value> = app
        .inspector
        .dead_list(&queues, limit)
        .await?
        .into_iter()
        .map(|e| {
            let v = e.value();
            let meta = &v[META_FIELD];
            json!({
                "queue": e.queue,
                "id": v.get("id").and_then(Value::as_str),
                "type": v.get("type").and_then(Value::as_str),
                "failed_at": meta.get("failed_at"),
                "error": meta.get("error"),
                "attempt": meta.get("attempt"),
                "entry": v,
            })
        })
        .collect();
    Ok(Json(json!({ "queues": queues, "entries": entries })))
}

/// `GET /api/live`: the latest message of every running job, from
/// `P:live`; entries left by a daemon that is gone (killed mid-job) are
/// counted as `stale` and not listed.
pub async fn live(State(app): State<Arc<App>>) -> ApiResult {
    let live = app.inspector.live_jobs().await?;
    Ok(Json(json!({ "jobs": live.jobs, "stale": live.stale })))
}
