//! Listens on `P:control` for requests about running jobs (cancellation).
//!
//! A session loop on its own pub/sub connection: when the connection ends it
//! reconnects with backoff and subscribes again. Messages sent while it is
//! away are lost (pub/sub is at-most-once); the heartbeat's check of the
//! cancellation flags catches those within one heartbeat interval.

use std::sync::Arc;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::inflight::{InFlight, StopReason};
use crate::queue::Broker;
use crate::retry::Reconnect;

#[derive(Debug, Deserialize)]
struct ControlMessage {
    cancel: Option<String>,
}

/// Why a subscription session ended.
enum SessionEnd {
    Shutdown,
    Disconnected,
}

pub struct Control {
    pub broker: Broker,
    pub runs: Arc<InFlight>,
}

impl Control {
    pub async fn run(self, token: CancellationToken) {
        let mut backoff = Reconnect::new();
        loop {
            match self.session(&token).await {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Disconnected) => {
                    tracing::warn!("control_channel_lost");
                    // It was subscribed: a new outage starts from the first step.
                    backoff.reset();
                }
                Err(err) => tracing::warn!(error = %err, "control_subscribe_failed"),
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn session(&self, token: &CancellationToken) -> redis::RedisResult<SessionEnd> {
        let mut pubsub = self.broker.pubsub().await?;
        pubsub.subscribe(self.broker.keys().control()).await?;
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(SessionEnd::Shutdown),
                msg = messages.next() => msg,
            };
            let Some(msg) = msg else {
                return Ok(SessionEnd::Disconnected);
            };
            let body: Vec<u8> = msg.get_payload().unwrap_or_default();
            match serde_json::from_slice::<ControlMessage>(&body) {
                Ok(ControlMessage { cancel: Some(id) }) => {
                    if self.runs.stop(&id, None, StopReason::Cancelled) {
                        tracing::info!(job_id = %id, "cancel_requested");
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(error = %err, "control_message_malformed"),
            }
        }
    }
}
