//! Promotes scheduled jobs (retries) that are due back to pending.
//!
//! Every daemon runs one, for its queues, at a jittered interval; the Lua
//! script is atomic and reads Redis' clock, so any number of daemons may run
//! it at once and host clocks do not matter.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::queue::Broker;
use crate::retry::jittered;

/// Most jobs moved per script call (keeps each call short).
const BATCH: usize = 500;

pub struct Promoter {
    pub broker: Broker,
    pub queues: Vec<String>,
    pub every: Duration,
}

impl Promoter {
    pub async fn run(self, token: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.every)) => {}
            }
            match self.promote_all().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(promoted = n, "scheduled_promoted"),
                Err(err) if !failing => {
                    tracing::warn!(error = %err, "scheduled_promote_failed");
                    failing = true;
                    continue;
                }
                Err(_) => continue,
            }
            failing = false;
        }
    }

    async fn promote_all(&self) -> redis::RedisResult<u64> {
        let mut total = 0;
        for queue in &self.queues {
            loop {
                let n = self.broker.promote(queue, BATCH).await?;
                total += n;
                if n < BATCH as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }
}
