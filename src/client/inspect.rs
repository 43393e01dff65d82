//! [`Inspector`]: the queues as an operator sees them (depths, workers,
//! waiting, running and dead jobs) and the dead-list actions (revive,
//! purge). `conveyor status|jobs|dead|retry` and the dashboard use it; the
//! Redis side is [`crate::queue::inspect`].

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Client, ClientError};
use crate::config::Config;
use crate::queue::Broker;
pub use crate::queue::inspect::{
    DeadEntry, LiveJobs, QueueStatus, Revival, StatusReport, WaitingQuery, WorkerInfo,
};

/// Read-only views of the queues, and the dead-list actions. Made by
/// [`Client::inspector`]; cheap to clone.
#[derive(Clone)]
pub struct Inspector {
    broker: Broker,
    /// The queues the config names (served, or used by a job type); the
    /// registered daemons add theirs.
    configured: Vec<String>,
    /// Queue -> the stage pools its job types' stages name.
    stage_pools: BTreeMap<String, BTreeSet<String>>,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector")
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The queues as an operator sees them; see [`Inspector`].
    pub fn inspector(&self) -> Inspector {
        Inspector::new(self.broker.clone(), &self.config)
    }
}

impl Inspector {
    fn new(broker: Broker, config: &Config) -> Self {
        let mut configured = config.worker.queues.clone();
        configured.extend(config.jobs.values().map(|j| j.queue.clone()));
        let stage_pools = configured
            .iter()
            .map(|q| (q.clone(), config.stage_pools(q)))
            .filter(|(_, pools)| !pools.is_empty())
            .collect();
        Self {
            broker,
            configured,
            stage_pools,
        }
    }

    /// Every queue the config names and every queue a registered daemon
    /// serves (a dead daemon's until it is reaped), sorted.
    pub async fn queues(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.broker.known_queues(&self.configured).await?)
    }

    /// `[queue]` when one is chosen, else [`Inspector::queues`].
    pub async fn queues_or_all(&self, queue: Option<&str>) -> Result<Vec<String>, ClientError> {
        match queue {
            Some(q) => Ok(vec![q.to_owned()]),
            None => self.queues().await,
        }
    }

    /// Per queue: pending, active, scheduled and dead counts; the live
    /// workers.
    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        Ok(self
            .broker
            .status(&self.configured, &self.stage_pools)
            .await?)
    }

    /// The stage pool list of `queue` holding job `id` (a job handed over
    /// and not taken yet), with its entry; among the pools the config's
    /// stages name and those the live daemons serve.
    pub async fn pool_holding(
        &self,
        queue: &str,
        id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, ClientError> {
        let workers = self.broker.live_workers().await?;
        let known = crate::queue::pools::known_pools(queue, self.stage_pools.get(queue), &workers);
        let pools = known.into_keys().collect();
        Ok(self.broker.find_in_pools(queue, &pools, id).await?)
    }

    /// The live workers, each with its heartbeat's age in ms (by Redis'
    /// clock; `None` when the daemon does not say its TTL).
    pub async fn workers(&self) -> Result<Vec<(WorkerInfo, Option<u64>)>, ClientError> {
        let workers = self.broker.live_workers().await?;
        let ages = self.broker.heartbeat_ages(&workers).await?;
        Ok(workers.into_iter().zip(ages).collect())
    }

    /// Pending or scheduled jobs, in the order they will run, one page of
    /// them and how many match in all.
    pub async fn waiting(&self, query: &WaitingQuery) -> Result<(Vec<Value>, u64), ClientError> {
        let queues = self.queues_or_all(query.queue.as_deref()).await?;
        Ok(self.broker.waiting_jobs(&queues, query).await?)
    }

    /// The latest progress message of every running job.
    pub async fn live_jobs(&self) -> Result<LiveJobs, ClientError> {
        Ok(self.broker.live_jobs().await?)
    }

    /// The latest progress message of one running job.
    pub async fn live_message(&self, id: &str) -> Result<Option<Value>, ClientError> {
        Ok(self.broker.live_message(id).await?)
    }

    /// Up to `limit` entries of each of `queues`' dead lists, newest first.
    pub async fn dead_list(
        &self,
        queues: &[String],
        limit: usize,
    ) -> Result<Vec<DeadEntry>, ClientError> {
        Ok(self.broker.dead_list(queues, limit).await?)
    }

    /// Dead entries of `queues` whose id is in `ids` (all when empty).
    pub async fn dead_matching(
        &self,
        queues: &[String],
        ids: &[String],
    ) -> Result<Vec<DeadEntry>, ClientError> {
        Ok(self.broker.dead_matching(queues, ids).await?)
    }

    /// Puts dead entries back on their queues with fresh attempts (finished
    /// stages are not run again); `each` hears of every entry as it is done.
    /// Returns how many went back.
    pub async fn revive(
        &self,
        entries: Vec<DeadEntry>,
        each: impl FnMut(&Revival),
    ) -> Result<u64, ClientError> {
        Ok(self.broker.revive_entries(entries, each).await?)
    }

    /// Deletes the dead entries of `queues` whose id is in `ids`, or every
    /// one when `ids` is empty; returns how many went.
    pub async fn purge_dead(&self, queues: &[String], ids: &[String]) -> Result<u64, ClientError> {
        Ok(self.broker.purge_dead_matching(queues, ids).await?)
    }
}
