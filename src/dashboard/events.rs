//! `/events`: progress messages as server-sent events.
//!
//! One [`Bridge`] holds the dashboard's only `PSUBSCRIBE P:progress:*`
//! connection and hands each message to every browser through a broadcast
//! channel. A lost connection is made again with backoff; since pub/sub
//! messages sent meanwhile are gone, the browsers are then told to
//! `resync` (read `/api/live` again), as they are when they fall behind.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::App;
use super::reads::ApiError;
use crate::queue::Broker;
use crate::retry::Reconnect;

/// What the bridge hands the browsers.
#[derive(Debug, Clone)]
pub enum Message {
    /// A progress message: compact JSON (one line).
    Progress(Arc<str>),
    /// Messages may have been missed: read the snapshot again.
    Resync,
}

/// Why a pub/sub session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Bound on connecting and subscribing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Owns the dashboard's pub/sub connection; see the module docs.
pub struct Bridge {
    broker: Broker,
    tx: broadcast::Sender<Message>,
}

impl Bridge {
    pub fn new(broker: Broker, tx: broadcast::Sender<Message>) -> Self {
        Self { broker, tx }
    }

    pub async fn run(self, token: CancellationToken) {
        let mut backoff = Reconnect::new();
        let mut failing = false;
        loop {
            match self.session(&token, &mut failing).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) => {
                    // Not failing: the session had subscribed (or this is
                    // the first try), so this outage starts afresh.
                    if !failing {
                        tracing::warn!(error = %why, "progress_subscription_lost");
                        failing = true;
                        backoff.reset();
                    }
                }
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn session(&self, token: &CancellationToken, failing: &mut bool) -> SessionEnd {
        let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
            crate::progress::subscribe(&self.broker, None).await
        });
        let mut pubsub = tokio::select! {
            biased;
            _ = token.cancelled() => return SessionEnd::Shutdown,
            r = subscribed => match r {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return SessionEnd::Lost(e.to_string()),
                Err(_) => return SessionEnd::Lost("Redis did not answer within 5 s".into()),
            },
        };
        if *failing {
            tracing::info!("progress_subscription_restored");
            *failing = false;
        }
        // Whatever was published while we were away is gone.
        let _ = self.tx.send(Message::Resync);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return SessionEnd::Shutdown,
                msg = messages.next() => {
                    let Some(msg) = msg else {
                        return SessionEnd::Lost("the connection closed".into());
                    };
                    let body: Vec<u8> = msg.get_payload().unwrap_or_default();
                    if let Some(line) = compact(&body) {
                        // No browser listening is not an error.
                        let _ = self.tx.send(Message::Progress(line.into()));
                    }
                }
            }
        }
    }
}

/// A message as one line of JSON; `None` for anything but a JSON object
/// (anyone who can publish on the channel can send anything).
fn compact(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body).ok()? {
        v @ Value::Object(_) => serde_json::to_string(&v).ok(),
        _ => None,
    }
}

/// `GET /events`: the progress messages as SSE `message` events, and
/// `resync` events when messages were missed; ends at shutdown.
pub async fn stream(
    State(app): State<Arc<App>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let slot = app
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy("too many /events streams open".into()))?;
    let rx = app.events.subscribe();
    let events = futures_util::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        let event = match rx.recv().await {
            Ok(Message::Progress(line)) => Event::default().data(&*line),
            Ok(Message::Resync) | Err(RecvError::Lagged(_)) => {
                Event::default().event("resync").data("{}")
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), (rx, slot)))
    })
    .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_objects_pass_as_one_line() {
        assert_eq!(
            compact(b"{\"a\": \"x\\ny\",\n \"b\": 1}").as_deref(),
            Some(r#"{"a":"x\ny","b":1}"#)
        );
        assert_eq!(compact(b"[1]"), None);
        assert_eq!(compact(b"not json"), None);
    }
}
