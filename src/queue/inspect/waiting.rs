//! The jobs waiting on queues (pending lists and scheduled sets) in the
//! order they will run, filtered and paged (`conveyor jobs`, the
//! dashboard's lists).

use redis::{AsyncCommands, RedisResult};
use serde_json::{Value, json};

use crate::queue::Broker;

/// Most entries of one queue's pending list or scheduled set that
/// [`Broker::waiting_jobs`] reads to filter and page through.
const WAITING_SCAN: isize = 10_000;

/// Which waiting jobs [`Broker::waiting_jobs`] lists.
#[derive(Debug, Clone, Default)]
pub struct WaitingQuery {
    /// One queue, or every known one.
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Only ids that contain this text.
    pub id_contains: Option<String>,
    /// Scheduled jobs due at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// The scheduled sets, else the pending lists.
    pub scheduled: bool,
    pub offset: usize,
    pub limit: usize,
}

impl Broker {
    /// Pending or scheduled jobs of `queues`, in the order they will run (at
    /// most 10,000 per queue are read); one page, and how many match in all.
    pub async fn waiting_jobs(
        &self,
        queues: &[String],
        q: &WaitingQuery,
    ) -> RedisResult<(Vec<Value>, u64)> {
        let mut all = Vec::new();
        for queue in queues {
            for (entry, due) in self.waiting_entries(queue, q.scheduled).await? {
                if let Some(row) = waiting_row(queue, &entry, due, q) {
                    all.push(row);
                }
            }
        }
        let total = all.len() as u64;
        let page = all.into_iter().skip(q.offset).take(q.limit).collect();
        Ok((page, total))
    }

    /// The first [`WAITING_SCAN`] entries of a queue's scheduled set (with
    /// their due time) or pending list, in the order they will run.
    async fn waiting_entries(
        &self,
        queue: &str,
        scheduled: bool,
    ) -> RedisResult<Vec<(Vec<u8>, Option<u64>)>> {
        let mut conn = self.conn();
        if scheduled {
            let raw: Vec<(Vec<u8>, f64)> = conn
                .zrange_withscores(self.keys().scheduled(queue), 0, WAITING_SCAN - 1)
                .await?;
            return Ok(raw
                .into_iter()
                .map(|(e, due)| (e, Some(due as u64)))
                .collect());
        }
        // Daemons take from the right: the last entry runs first.
        let mut raw: Vec<Vec<u8>> = conn
            .lrange(self.keys().pending(queue), -WAITING_SCAN, -1)
            .await?;
        raw.reverse();
        Ok(raw.into_iter().map(|e| (e, None)).collect())
    }
}

/// A waiting entry as a row of [`Broker::waiting_jobs`], if `q` wants it.
fn waiting_row(queue: &str, entry: &[u8], due: Option<u64>, q: &WaitingQuery) -> Option<Value> {
    let v: Value = serde_json::from_slice(entry).unwrap_or(Value::Null);
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let id = v.get("id").and_then(Value::as_str).unwrap_or("");
    if q.kind.as_deref().is_some_and(|k| k != kind)
        || q.id_contains.as_deref().is_some_and(|s| !id.contains(s))
    {
        return None;
    }
    if let (Some(since), Some(due)) = (q.since_ms, due)
        && due < since
    {
        return None;
    }
    Some(json!({
        "id": id,
        "type": kind,
        "queue": queue,
        "status": if q.scheduled { "scheduled" } else { "pending" },
        "attempt": v.pointer("/_conveyor/attempt").and_then(Value::as_u64).unwrap_or(0),
        "due_at": due.map(crate::time::rfc3339_of_ms),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_rows_filter_by_type_id_and_due_time() {
        let q = WaitingQuery {
            kind: Some("a".into()),
            id_contains: Some("7".into()),
            since_ms: Some(1000),
            scheduled: true,
            ..WaitingQuery::default()
        };
        let entry = |kind: &str, id: &str| json!({"id": id, "type": kind}).to_string();
        assert!(waiting_row("q", entry("a", "x7").as_bytes(), Some(1000), &q).is_some());
        assert!(waiting_row("q", entry("b", "x7").as_bytes(), Some(1000), &q).is_none());
        assert!(waiting_row("q", entry("a", "x8").as_bytes(), Some(1000), &q).is_none());
        assert!(waiting_row("q", entry("a", "x7").as_bytes(), Some(999), &q).is_none());
        let row = waiting_row("q", entry("a", "x7").as_bytes(), Some(1000), &q).unwrap();
        assert_eq!(row["status"], "scheduled");
        assert_eq!(row["queue"], "q");
    }
}
