//! The dashboard's actions: cancel, retry, and the dead list's retry and
//! purge, as the CLI does them (through [`crate::Client`] and its
//! inspector). Each
//! needs `Authorization: Bearer <token>` with the token of
//! `CONVEYOR_DASHBOARD_TOKEN`; with none configured, every action is
//! refused (403) with a message saying how to enable them.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::reads::{ApiError, ApiResult, DeadQuery, given, known_queues};
use crate::client::Cancelled;
use crate::client::inspect::{DeadEntry, Revival};

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.token else {
        return Err(ApiError::Disabled);
    };
    let given = crate::http::bearer(headers).unwrap_or("");
    if crate::http::same_secret(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// `POST /api/jobs/{id}/cancel`.
pub async fn cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let (result, message) = match app.client.cancel(&id).await? {
        Cancelled::Stopped => ("stopped", format!("{id} cancelled")),
        Cancelled::Recorded => (
            "recorded",
            format!(
                "{id} cancellation recorded: it is not running, and is dropped when a daemon takes it"
            ),
        ),
    };
    tracing::info!(job_id = %id, result, "dashboard_cancel");
    Ok(Json(
        json!({ "id": id, "result": result, "message": message }),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct DeadTarget {
    queue: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// [`DeadTarget`] in a query string: `?queue=q&ids=a,b&all=true`.
#[derive(Debug, Default, Deserialize)]
pub struct DeadTargetQuery {
    queue: Option<String>,
    /// Comma-separated.
    ids: Option<String>,
    all: Option<bool>,
}

/// The target of a dead-list action: the query string, overridden by a
/// JSON body when there is one.
fn target(query: DeadTargetQuery, body: &[u8]) -> Result<DeadTarget, ApiError> {
    let query = DeadTarget {
        queue: query.queue,
        ids: query
            .ids
            .iter()
            .flat_map(|ids| ids.split(','))
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect(),
        all: query.all.unwrap_or(false),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(query);
    }
    let t: DeadTarget = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not {{queue, ids, all}}: {e}")))?;
    Ok(DeadTarget {
        queue: t.queue.or(query.queue),
        ids: if t.ids.is_empty() { query.ids } else { t.ids },
        all: t.all || query.all,
    })
}

async fn queues_of(app: &App, queue: &Option<String>) -> Result<Vec<String>, ApiError> {
    match given(queue) {
        Some(q) => Ok(vec![q]),
        None => known_queues(app).await,
    }
}

/// What the dead-list actions share: the token, the target (`ids` or
/// `all`, from the body or the query), and the queues to look in.
async fn dead_action(
    app: &App,
    headers: &HeaderMap,
    q: DeadTargetQuery,
    body: &[u8],
) -> Result<(DeadTarget, Vec<String>), ApiError> {
    authorize(app, headers)?;
    let t = target(q, body)?;
    if t.ids.is_empty() && !t.all {
        return Err(ApiError::BadRequest(
            "name the jobs (`ids`), or send `all: true`".into(),
        ));
    }
    let queues = queues_of(app, &t.queue).await?;
    Ok((t, queues))
}

async fn revive(app: &App, entries: Vec<DeadEntry>) -> Result<(u64, Vec<Value>), ApiError> {
    let mut done = Vec::new();
    let n = app
        .inspector
        .revive(entries, |r| {
            if let Revival::Requeued { queue, id } = r {
                done.push(json!({ "queue": queue, "id": id }));
            }
        })
        .await?;
    Ok((n, done))
}

/// `POST /api/jobs/{id}/retry` (`?queue=` to look in one queue only).
pub async fn retry(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DeadQuery>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let queues = queues_of(&app, &q.queue).await?;
    let found = app
        .inspector
        .dead_matching(&queues, std::slice::from_ref(&id))
        .await?;
    if found.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no dead job `{id}` (queues: {})",
            queues.join(", ")
        )));
    }
    let (n, requeued) = revive(&app, found.into_iter().take(1).collect()).await?;
    tracing::info!(job_id = %id, requeued = n, "dashboard_retry");
    Ok(Json(json!({
        "requeued": requeued,
        "message": format!("{id} requeued"),
    })))
}

/// `POST /api/dead/retry`.
pub async fn dead_retry(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<DeadTargetQuery>,
    body: Bytes,
) -> ApiResult {
    let (t, queues) = dead_action(&app, &headers, q, &body).await?;
    let found = app.inspector.dead_matching(&queues, &t.ids).await?;
    let (n, requeued) = revive(&app, found).await?;
    tracing::info!(requeued = n, "dashboard_dead_retry");
    Ok(Json(json!({
        "requeued": requeued,
        "message": format!("{n} job(s) requeued"),
    })))
}

/// `POST /api/dead/purge`.
pub async fn dead_purge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<DeadTargetQuery>,
    body: Bytes,
) -> ApiResult {
    let (t, queues) = dead_action(&app, &headers, q, &body).await?;
    let ids = if t.all { Vec::new() } else { t.ids };
    let n = app.inspector.purge_dead(&queues, &ids).await?;
    tracing::info!(purged = n, "dashboard_dead_purge");
    Ok(Json(json!({
        "purged": n,
        "message": format!("{n} dead job(s) purged"),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_overrides_the_query() {
        let q = || DeadTargetQuery {
            queue: Some("a".into()),
            ids: Some("x, z".into()),
            all: None,
        };
        let t = target(q(), &Bytes::new()).unwrap();
        assert_eq!(t.ids, ["x", "z"]);
        let t = target(q(), &Bytes::from_static(br#"{"ids":["y"]}"#)).unwrap();
        assert_eq!(
            (t.queue.as_deref(), t.ids, t.all),
            (Some("a"), vec!["y".to_owned()], false)
        );
        assert!(target(DeadTargetQuery::default(), &Bytes::from_static(b"[")).is_err());
        assert!(target(DeadTargetQuery::default(), &Bytes::from_static(b" ")).is_ok());
    }
}
