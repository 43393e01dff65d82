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

/// Most entries [`Broker::find_in_pools`] reads, over every list it scans.
pub const POOL_SCAN_ENTRIES: usize = 10_000;

/// About the most bytes [`Broker::find_in_pools`] reads, over every list
/// it scans: it stops once past this (the last `LRANGE` may pass it by
/// what its entries hold beyond their expected size).
pub const POOL_SCAN_BYTES: usize = 32 << 20;

/// Most entries of one `LRANGE`; fewer when entries are large (about
/// [`CHUNK_BYTES`] by the average entry seen so far).
const CHUNK_ENTRIES: usize = 1_000;
const CHUNK_BYTES: usize = 1 << 20;

/// The first `LRANGE`, before any entry's size is known.
const FIRST_CHUNK: usize = 8;

/// What a bounded scan of pool lists has left to read, and how much the
/// next `LRANGE` asks for.
#[derive(Debug)]
struct ScanBudget {
    entries_read: usize,
    bytes_read: usize,
}

impl ScanBudget {
    fn new() -> Self {
        Self {
            entries_read: 0,
            bytes_read: 0,
        }
    }

    /// Entries for the next `LRANGE`; `None` once the budget is spent.
    fn next_chunk(&self) -> Option<usize> {
        let entries_left = POOL_SCAN_ENTRIES.saturating_sub(self.entries_read);
        let bytes_left = POOL_SCAN_BYTES.saturating_sub(self.bytes_read);
        if entries_left == 0 || bytes_left == 0 {
            return None;
        }
        let n = match self.bytes_read.checked_div(self.entries_read) {
            None => FIRST_CHUNK,
            Some(avg) => {
                let avg = avg.max(1);
                (CHUNK_BYTES / avg)
                    .min(bytes_left / avg)
                    .clamp(1, CHUNK_ENTRIES)
            }
        };
        Some(n.min(entries_left))
    }

    fn spend(&mut self, entries: &[Vec<u8>]) {
        self.entries_read += entries.len();
        self.bytes_read += entries.iter().map(Vec::len).sum::<usize>();
    }
}

/// Whether a list entry is the job `id` (a JSON object whose `id` it is);
/// the other fields are skipped, not built.
fn entry_is(entry: &[u8], id: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<IdOnly>(entry).is_ok_and(|e| e.id.as_deref() == Some(id))
}

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
    /// entry. Bounded, as `conveyor job` must not pull whole lists of
    /// entries carrying finished stages' results: each list is read from
    /// its left (the newest end; an entry that stays is never skipped,
    /// one pushed meanwhile only shifts the rest) in `LRANGE`s of at most
    /// 1,000 entries and about 1 MiB, [`POOL_SCAN_ENTRIES`] entries and
    /// about [`POOL_SCAN_BYTES`] in all; `None` when not found within that.
    pub async fn find_in_pools(
        &self,
        queue: &str,
        pools: &BTreeSet<String>,
        id: &str,
    ) -> RedisResult<Option<(String, Vec<u8>)>> {
        let mut budget = ScanBudget::new();
        for pool in pools {
            let key = self.keys().pool(queue, pool);
            let mut start = 0;
            while let Some(n) = budget.next_chunk() {
                let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(start)
                    .arg(start + n - 1)
                    .query_async(&mut self.conn())
                    .await?;
                budget.spend(&entries);
                let read = entries.len();
                if let Some(entry) = entries.into_iter().find(|e| entry_is(e, id)) {
                    return Ok(Some((pool.clone(), entry)));
                }
                if read < n {
                    break;
                }
                start += read;
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
    fn the_scan_budget_sizes_chunks_by_the_entries_seen_and_stops_at_its_bounds() {
        let mut b = ScanBudget::new();
        assert_eq!(b.next_chunk(), Some(FIRST_CHUNK));
        // Small entries: the most a chunk asks for.
        b.spend(&vec![vec![0u8; 100]; 8]);
        assert_eq!(b.next_chunk(), Some(CHUNK_ENTRIES));
        // 256 KiB entries: 4 a chunk (about 1 MiB).
        let mut b = ScanBudget::new();
        b.spend(&vec![vec![0u8; 256 << 10]; 8]);
        assert_eq!(b.next_chunk(), Some(4));
        // Entries over 1 MiB: one at a time.
        let mut b = ScanBudget::new();
        b.spend(&[vec![0u8; 3 << 20]]);
        assert_eq!(b.next_chunk(), Some(1));
        // The bytes bound.
        let mut b = ScanBudget::new();
        b.spend(&vec![vec![0u8; 1 << 20]; POOL_SCAN_BYTES >> 20]);
        assert_eq!(b.next_chunk(), None);
        // The entries bound: what is left of it, then nothing.
        let mut b = ScanBudget::new();
        b.spend(&vec![vec![0u8; 10]; POOL_SCAN_ENTRIES - 5]);
        assert_eq!(b.next_chunk(), Some(5));
        b.spend(&vec![vec![0u8; 10]; 5]);
        assert_eq!(b.next_chunk(), None);
    }

    #[test]
    fn an_entry_is_matched_by_its_id_field_only() {
        assert!(entry_is(br#"{"id":"j1","payload":{"big":[1,2,3]}}"#, "j1"));
        assert!(entry_is(br#"{"payload":{"id":"x"},"id":"j\u0031"}"#, "j1"));
        assert!(!entry_is(br#"{"payload":{"id":"j1"},"id":"j2"}"#, "j1"));
        assert!(!entry_is(br#"{"payload":{"id":"j1"}}"#, "j1"));
        assert!(!entry_is(b"not json j1", "j1"));
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
