//! The dead lists as operators handle them: list, pick by id, revive with
//! fresh attempts (`conveyor retry`, the dashboard), purge.

use redis::RedisResult;
use serde_json::{Value, json};

use crate::job::{META_FIELD, Meta};
use crate::queue::Broker;

/// One entry of a dead list, as stored.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    pub queue: String,
    pub raw: Vec<u8>,
}

impl DeadEntry {
    /// The job id, when the entry is a job object with one.
    pub fn id(&self) -> Option<String> {
        entry_id(&self.raw)
    }

    /// The entry as JSON; a message that was not JSON as `{"raw": text}`.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.raw)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&self.raw)}))
    }
}

/// What [`Broker::revive_entries`] did with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revival {
    /// Back on its queue's pending list; `id` is empty for a raw message.
    Requeued { queue: String, id: String },
    /// Not a job that can be revived (unreadable); left in place.
    Unreadable { queue: String },
    /// Gone from the dead list meanwhile (retried or purged by someone else).
    Gone,
}

impl Broker {
    /// Up to `limit` entries of each of `queues`' dead lists, newest first.
    pub async fn dead_list(&self, queues: &[String], limit: usize) -> RedisResult<Vec<DeadEntry>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        for q in queues {
            for raw in self.dead_entries(q, 0, stop).await? {
                out.push(DeadEntry {
                    queue: q.clone(),
                    raw,
                });
            }
        }
        Ok(out)
    }

    /// Dead entries of the chosen queues whose id is in `ids` (all when empty).
    pub async fn dead_matching(
        &self,
        queues: &[String],
        ids: &[String],
    ) -> RedisResult<Vec<DeadEntry>> {
        let mut out = Vec::new();
        for q in queues {
            for raw in self.dead_entries(q, 0, -1).await? {
                let wanted = ids.is_empty() || entry_id(&raw).is_some_and(|id| ids.contains(&id));
                if wanted {
                    out.push(DeadEntry {
                        queue: q.clone(),
                        raw,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Puts dead entries back on their queues with fresh attempts: the error
    /// is cleared, the epoch raised, finished stages' results kept (a raw
    /// message goes back as it was); `each` hears of every entry as it is done.
    pub async fn revive_entries(
        &self,
        entries: Vec<DeadEntry>,
        mut each: impl FnMut(&Revival),
    ) -> RedisResult<u64> {
        let mut n = 0;
        for DeadEntry { queue, raw } in entries {
            let Some((id, job)) = revived(&raw) else {
                each(&Revival::Unreadable { queue });
                continue;
            };
            if self.revive(&queue, &raw, &id, &job).await? {
                n += 1;
                each(&Revival::Requeued { queue, id });
            } else {
                each(&Revival::Gone);
            }
        }
        Ok(n)
    }

    /// Deletes the dead entries of `queues` whose id is in `ids`, or every
    /// entry when `ids` is empty; returns how many went.
    pub async fn purge_dead_matching(&self, queues: &[String], ids: &[String]) -> RedisResult<u64> {
        let mut n = 0;
        if ids.is_empty() {
            for q in queues {
                n += self.purge_dead(q).await?;
            }
        } else {
            for entry in self.dead_matching(queues, ids).await? {
                if self.remove_dead(&entry.queue, &entry.raw).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// A dead entry as a job to push back with fresh attempts: the error is
/// cleared, the epoch raised (so SQLite lets it run again), and the results
/// of finished stages kept (they do not run again). An entry that was not a
/// job object (`raw`) goes back as it was.
fn revived(entry: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut object: serde_json::Map<String, Value> = serde_json::from_slice(entry).ok()?;
    if let Some(Value::String(raw)) = object.get("raw") {
        return Some((String::new(), raw.clone().into_bytes()));
    }
    if let Some(Value::String(b64)) = object.get("raw_base64") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return Some((String::new(), raw));
    }
    let meta: Meta = object
        .get(META_FIELD)
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let fresh = Meta {
        epoch: meta.epoch + 1,
        results: meta.results,
        ..Meta::default()
    };
    object.insert(META_FIELD.into(), serde_json::to_value(fresh).ok()?);
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Some((id, Value::Object(object).to_string().into_bytes()))
}

fn entry_id(entry: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(entry).ok()?;
    v.get("id").and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;

    #[test]
    fn revived_jobs_get_fresh_attempts_and_keep_results() {
        let entry = json!({"id":"j","type":"t","payload":1,
            "_conveyor":{"attempt":3,"results":{"a":1},"error":"boom","failed_at":"x","worker_id":"w","epoch":1}});
        let (id, job) = revived(entry.to_string().as_bytes()).unwrap();
        assert_eq!(id, "j");
        let job = Job::parse(&job, 1 << 20).unwrap();
        assert_eq!(job.meta.attempt, 0);
        assert_eq!(job.meta.epoch, 2);
        assert_eq!(job.meta.results["a"], 1);
        assert_eq!(job.meta.error, None);
        let (id, raw) = revived(
            json!({"raw":"{bad","_conveyor":{"error":"x"}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!((id.as_str(), raw.as_slice()), ("", &b"{bad"[..]));
    }
}
