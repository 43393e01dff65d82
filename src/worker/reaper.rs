//! Recovers the jobs of daemons that died.
//!
//! Every daemon runs one. Each scan reads the worker registry (`P:workers`)
//! and checks which registrations (`P:worker:<id>`, with a TTL the
//! heartbeat refreshes) are gone. A daemon is reaped only when it is missing
//! on two scans at least one heartbeat interval apart, with no Redis error
//! in between: after a Redis pause or restart every TTL may look expired at
//! once, and the live daemons get one heartbeat to show up again (no live
//! daemon's jobs are taken). Reaping moves the dead daemon's active lists
//! back to pending with one atomic script per queue, dropping the jobs'
//! leases and counting a crash for each job that was running; when several
//! reapers race, the first moves the jobs and the others find empty lists.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::queue::Broker;
use crate::queue::inspect::Registration;
use crate::retry::jittered;

pub struct Reaper {
    pub broker: Broker,
    pub worker_id: String,
    pub every: Duration,
}

impl Reaper {
    pub async fn run(self, token: CancellationToken) {
        // Worker id -> when it was first seen missing.
        let mut suspects: HashMap<String, Instant> = HashMap::new();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.every)) => {}
            }
            if let Err(err) = self.scan(&mut suspects).await {
                // Both sightings must come after the last error: a missing
                // key seen across an outage proves nothing.
                suspects.clear();
                tracing::debug!(error = %err, "reaper_scan_failed");
            }
        }
    }

    async fn scan(&self, suspects: &mut HashMap<String, Instant>) -> redis::RedisResult<()> {
        let keys = self.broker.keys();
        let mut conn = self.broker.conn();
        let registry: HashMap<String, String> = conn.hgetall(keys.workers()).await?;
        let others: Vec<(&String, &String)> = registry
            .iter()
            .filter(|(id, _)| **id != self.worker_id)
            .collect();
        if others.is_empty() {
            suspects.clear();
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &others {
            pipe.exists(keys.worker(id));
        }
        let alive: Vec<bool> = pipe.query_async(&mut conn).await?;
        let now = Instant::now();
        suspects.retain(|id, _| registry.contains_key(id));
        for ((id, info), alive) in others.into_iter().zip(alive) {
            if alive {
                suspects.remove(id);
                continue;
            }
            match suspects.get(id) {
                None => {
                    suspects.insert(id.clone(), now);
                }
                Some(first) if now.duration_since(*first) >= self.every => {
                    self.reap(id, info).await?;
                    suspects.remove(id);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn reap(&self, id: &str, info: &str) -> redis::RedisResult<()> {
        let queues = match serde_json::from_str::<Registration>(info) {
            Ok(r) => r.queues,
            Err(_) => {
                tracing::warn!(worker_id = %id, "dead_worker_unreadable");
                Vec::new()
            }
        };
        let mut recovered = 0;
        for queue in &queues {
            recovered += self.broker.recover_active(queue, id, true).await?;
        }
        let mut conn = self.broker.conn();
        let _: () = conn.hdel(self.broker.keys().workers(), id).await?;
        if recovered > 0 {
            tracing::warn!(dead_worker = %id, recovered, queues = ?queues, "worker_reaped");
        } else {
            tracing::info!(dead_worker = %id, "worker_reaped");
        }
        Ok(())
    }
}
