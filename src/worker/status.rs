//! What `conveyor status` reports: queue depths and live workers, from Redis.

use std::collections::BTreeSet;

use redis::AsyncCommands;
use serde::Serialize;

use super::registry::{Registration, WorkerInfo};
use crate::config::Config;
use crate::queue::Broker;

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub name: String,
    pub pending: u64,
    /// In the active lists of every registered worker.
    pub active: u64,
    pub scheduled: u64,
    pub dead: u64,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub queues: Vec<QueueStatus>,
    /// Workers whose registration has not expired.
    pub workers: Vec<WorkerInfo>,
}

/// Every queue the config names (served, or used by a job type) and every
/// queue a registered daemon serves (from `P:workers`, so a dead daemon's
/// queues count until it is reaped).
pub async fn known_queues(broker: &Broker, config: &Config) -> redis::RedisResult<Vec<String>> {
    let mut queues: BTreeSet<String> = config.worker.queues.iter().cloned().collect();
    queues.extend(config.jobs.values().map(|j| j.queue.clone()));
    let mut conn = broker.conn();
    let registry: Vec<String> = conn.hvals(broker.keys().workers()).await?;
    for r in registry {
        if let Ok(r) = serde_json::from_str::<Registration>(&r) {
            queues.extend(r.queues);
        }
    }
    Ok(queues.into_iter().collect())
}

/// Counts for [`known_queues`], and the live workers; one pipeline of counts.
pub async fn collect(broker: &Broker, config: &Config) -> redis::RedisResult<StatusReport> {
    let keys = broker.keys();
    let mut conn = broker.conn();
    let mut ids: Vec<String> = conn.hkeys(keys.workers()).await?;
    ids.sort();
    let mut workers = Vec::new();
    if !ids.is_empty() {
        let regs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(ids.iter().map(|id| keys.worker(id)).collect::<Vec<_>>())
            .query_async(&mut conn)
            .await?;
        workers = regs
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str::<WorkerInfo>(&r).ok())
            .collect();
    }
    let names = known_queues(broker, config).await?;

    let mut pipe = redis::pipe();
    for q in &names {
        pipe.llen(keys.pending(q))
            .zcard(keys.scheduled(q))
            .llen(keys.dead(q));
        for id in &ids {
            pipe.llen(keys.active(q, id));
        }
    }
    let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
    let per_queue = 3 + ids.len();
    let queues = names
        .into_iter()
        .zip(counts.chunks(per_queue))
        .map(|(name, c)| QueueStatus {
            name,
            pending: c[0],
            scheduled: c[1],
            dead: c[2],
            active: c[3..].iter().sum(),
        })
        .collect();
    Ok(StatusReport { queues, workers })
}
