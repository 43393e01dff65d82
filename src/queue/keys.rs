//! Every Redis key and channel name conveyor uses, built in one place.
//!
//! Per-queue keys carry the queue name as a Redis Cluster hash tag (`{Q}`),
//! so all keys of one queue live in one slot and every multi-key script or
//! `BLMOVE` on a queue stays atomic on a single Redis and on a cluster.

/// Key builder for one prefix (`P` in the contract).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// LIST `P:{Q}:pending`: producers `LPUSH`, daemons take from the right.
    pub fn pending(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:pending", self.prefix)
    }

    /// LIST `P:{Q}:pool:<pool>`: jobs handed over to a stage pool (their
    /// next stage runs in it), taken by the daemons serving that pool
    /// before `pending`. FIFO, like pending for new jobs: pushed on the
    /// left (`LPUSH`), taken from the right, so the job handed over first
    /// is taken first.
    pub fn pool(&self, queue: &str, pool: &str) -> String {
        format!("{}:{{{queue}}}:pool:{pool}", self.prefix)
    }

    /// LIST `P:{Q}:active:<worker>`: jobs a daemon has taken and not finished.
    pub fn active(&self, queue: &str, worker: &str) -> String {
        format!("{}:{{{queue}}}:active:{worker}", self.prefix)
    }

    /// ZSET `P:{Q}:scheduled`: delayed jobs and retries, score = due Unix ms.
    pub fn scheduled(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:scheduled", self.prefix)
    }

    /// LIST `P:{Q}:dead`: failed and unparsable jobs, each with its reason.
    pub fn dead(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dead", self.prefix)
    }

    /// HASH `P:{Q}:leases`: job id -> fencing token of its current delivery.
    /// Every state change of a delivery checks it (see `lua/settle.lua`).
    pub fn leases(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:leases", self.prefix)
    }

    /// HASH `P:{Q}:crashes`: job id -> times a daemon died while running it.
    pub fn crashes(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:crashes", self.prefix)
    }

    /// HASH `P:{Q}:cancelled`: job id -> when its cancellation was asked
    /// (Unix ms). A cancelled job is dropped when it is next taken.
    pub fn cancelled(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:cancelled", self.prefix)
    }

    /// HASH `P:{Q}:unique`: job id -> `"<state> <due ms> <enqueued ms> <type>"` for a job
    /// enqueued through conveyor (`enqueue`, the library's `Client`) and not
    /// finished yet. `lua/enqueue.lua` refuses a second job with a live id;
    /// the settle script frees the id when the job completes or dies.
    pub fn unique(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:unique", self.prefix)
    }

    /// HASH `P:{Q}:schedules`: schedule name -> its last tick enqueued
    /// (Unix ms), for `[[schedules]]` whose jobs go to queue `Q`.
    pub fn schedules(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:schedules", self.prefix)
    }

    /// ZSET `P:rate:<type>`: recent starts of a job type with a `rate`
    /// limit (member = delivery token, score = start time in Unix ms).
    pub fn rate(&self, job_type: &str) -> String {
        format!("{}:rate:{job_type}", self.prefix)
    }

    /// Pub/sub channel `P:control`: `{"cancel": "<job id>"}` messages to the
    /// daemons.
    pub fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Pub/sub channel `P:progress:<job_id>`: every state change and progress report.
    pub fn progress(&self, job_id: &str) -> String {
        format!("{}:progress:{job_id}", self.prefix)
    }

    /// HASH `P:live`: job id -> the latest progress message (JSON) of each
    /// running job, kept by the daemons' publishers (see
    /// [`crate::progress`]) for dashboards that open late or reconnect.
    pub fn live(&self) -> String {
        format!("{}:live", self.prefix)
    }

    /// Pattern matching every job's progress channel.
    pub fn progress_pattern(&self) -> String {
        format!("{}:progress:*", self.prefix)
    }

    /// HASH `P:workers`: worker id -> its queues and host (JSON), so that
    /// the reaper knows which active lists a dead daemon left.
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// STRING `P:worker:<id>`: a daemon's registration (JSON), with a TTL the
    /// heartbeat refreshes. Its absence means the daemon is gone.
    pub fn worker(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_contract() {
        let k = Keys::new("conveyor");
        assert_eq!(k.pending("default"), "conveyor:{default}:pending");
        assert_eq!(k.active("default", "w1"), "conveyor:{default}:active:w1");
        assert_eq!(k.scheduled("q"), "conveyor:{q}:scheduled");
        assert_eq!(k.dead("q"), "conveyor:{q}:dead");
        assert_eq!(k.progress("j1"), "conveyor:progress:j1");
        assert_eq!(k.progress_pattern(), "conveyor:progress:*");
        assert_eq!(k.worker("w1"), "conveyor:worker:w1");
        assert_eq!(k.leases("q"), "conveyor:{q}:leases");
        assert_eq!(k.crashes("q"), "conveyor:{q}:crashes");
        assert_eq!(k.cancelled("q"), "conveyor:{q}:cancelled");
        assert_eq!(k.control(), "conveyor:control");
        assert_eq!(k.live(), "conveyor:live");
        assert_eq!(k.pool("q", "gpu"), "conveyor:{q}:pool:gpu");
    }
}
