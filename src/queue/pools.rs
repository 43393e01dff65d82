//! Stage pools as an operator sees them: the depth of each pool list of a
//! queue (`P:{Q}:pool:<name>`) with the live daemons serving it, and where
//! a job waits when it is in one, and the depths a daemon's metrics show. The lists themselves are filled by the
//! handover settle (`lua/settle.lua`) and read by the fetch
//! (`Broker::fetch_available_from`).

use std::collections::{BTreeMap, BTreeSet};

use redis::RedisResult;
use serde::Serialize;

use super::Broker;
use super::inspect::WorkerInfo;

/// The pool of a stage without `pool`, and what a daemon registered
/// without `pools` (older than pools) serves.
const DEFAULT_POOL: &str = "default";

/// Most entries of one pool list [`Broker::find_in_pools`] reads.
const POOL_SCAN: isize = 10_000;

/// One stage pool of one queue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolStatus {
    pub name: String,
    /// Jobs handed over to the pool and not taken yet (`LLEN`).
    pub depth: u64,
    /// Ids of the live daemons of the queue serving the pool.
    pub workers: Vec<String>,
}

/// The pools of `queue` worth showing: those its stages name
/// (`configured`) and those the live daemons serving the queue run.
pub fn known_pools(
    queue: &str,
    configured: Option<&BTreeSet<String>>,
    workers: &[WorkerInfo],
) -> BTreeMap<String, Vec<String>> {
    let mut pools: BTreeMap<String, Vec<String>> = configured
        .into_iter()
        .flatten()
        .map(|p| (p.clone(), Vec::new()))
        .collect();
    for w in workers
        .iter()
        .filter(|w| w.queues.iter().any(|q| q == queue))
    {
        let served: Vec<&str> = match w.pools.is_empty() {
            true => vec![DEFAULT_POOL],
            false => w.pools.iter().map(String::as_str).collect(),
        };
        for p in served {
            pools.entry(p.to_owned()).or_default().push(w.id.clone());
        }
    }
    pools
}

impl Broker {
    /// The depth of each of `pools` (name -> serving daemons) of `queue`;
    /// one pipeline of `LLEN`s.
    pub async fn pool_depths(
        &self,
        queue: &str,
        pools: BTreeMap<String, Vec<String>>,
    ) -> RedisResult<Vec<PoolStatus>> {
        if pools.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in pools.keys() {
            pipe.llen(self.keys().pool(queue, name));
        }
        let depths: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(pools
            .into_iter()
            .zip(depths)
            .map(|((name, workers), depth)| PoolStatus {
                name,
                depth,
                workers,
            })
            .collect())
    }

    /// The depth of each pool list of `pools` (queue -> pool names), in
    /// that order: `(queue, pool, LLEN)`. One pipeline; the metrics of
    /// `conveyor_queue_depth{list="pool"}`.
    pub async fn pool_list_depths(
        &self,
        pools: &BTreeMap<String, BTreeSet<String>>,
    ) -> RedisResult<Vec<(String, String, u64)>> {
        let lists: Vec<(&String, &String)> = pools
            .iter()
            .flat_map(|(q, names)| names.iter().map(move |p| (q, p)))
            .collect();
        if lists.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (queue, pool) in &lists {
            pipe.llen(self.keys().pool(queue, pool));
        }
        let depths: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(lists
            .into_iter()
            .zip(depths)
            .map(|((q, p), n)| (q.clone(), p.clone(), n))
            .collect())
    }

    /// The pool list of `queue`, among `pools`, holding job `id`, with the
    /// entry (its first `POOL_SCAN` entries of each list are read).
    pub async fn find_in_pools(
        &self,
        queue: &str,
        pools: &BTreeSet<String>,
        id: &str,
    ) -> RedisResult<Option<(String, Vec<u8>)>> {
        for pool in pools {
            let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(self.keys().pool(queue, pool))
                .arg(-POOL_SCAN)
                .arg(-1)
                .query_async(&mut self.conn())
                .await?;
            let found = entries.into_iter().find(|e| {
                serde_json::from_slice::<serde_json::Value>(e)
                    .ok()
                    .is_some_and(|v| v.get("id").and_then(|i| i.as_str()) == Some(id))
            });
            if let Some(entry) = found {
                return Ok(Some((pool.clone(), entry)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, queues: &[&str], pools: &[&str]) -> WorkerInfo {
        let v = serde_json::json!({
            "id": id, "host": "h", "pid": 1, "instance": "i", "started_at": "t",
            "queues": queues, "pools": pools, "concurrency": 1, "version": "0",
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn known_pools_are_the_configured_ones_and_those_live_daemons_serve() {
        let configured: BTreeSet<String> = ["default", "gpu"].map(String::from).into();
        let workers = [
            worker("w1", &["q"], &["gpu"]),
            worker("w2", &["q"], &[]),
            worker("w3", &["q", "r"], &["cpu", "gpu"]),
            worker("w4", &["r"], &["gpu"]),
        ];
        let pools = known_pools("q", Some(&configured), &workers);
        let want: BTreeMap<String, Vec<String>> = [
            ("cpu".to_owned(), vec!["w3".to_owned()]),
            ("default".to_owned(), vec!["w2".to_owned()]),
            ("gpu".to_owned(), vec!["w1".to_owned(), "w3".to_owned()]),
        ]
        .into();
        assert_eq!(pools, want);
        let none = known_pools("z", None, &workers);
        assert!(none.is_empty());
    }
}
