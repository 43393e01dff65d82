//! The progress subscriber: a pattern subscription on the test's Redis,
//! collecting every message in a thread of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::{Harness, TestRedis, wait_for};

/// Collects progress messages from a pattern subscription in a thread of its
/// own. The thread ends when its Redis goes away (end of the test).
pub struct ProgressSub {
    messages: Arc<Mutex<Vec<Value>>>,
}

impl ProgressSub {
    pub fn start(redis: &TestRedis, pattern: &str) -> Self {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut conn = redis.conn();
        let pattern_owned = pattern.to_owned();
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut pubsub = conn.as_pubsub();
            // Returns once the server confirmed the subscription.
            let subscribed = pubsub.psubscribe(&pattern_owned);
            let ok = subscribed.is_ok();
            let _ = ready_tx.send(subscribed.map_err(|e| e.to_string()));
            if !ok {
                return;
            }
            while let Ok(msg) = pubsub.get_message() {
                let body: Vec<u8> = match msg.get_payload() {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                    Value::String(format!(
                        "unparsable message: {}",
                        String::from_utf8_lossy(&body)
                    ))
                });
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscriber thread answered")
            .expect("PSUBSCRIBE succeeded");
        // Belt and braces: the server counts the pattern.
        let numpat: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query(&mut redis.conn())
            .expect("PUBSUB NUMPAT");
        assert!(numpat >= 1, "pattern subscription not registered");
        ProgressSub { messages }
    }

    /// Every message so far, in arrival order.
    pub fn all(&self) -> Vec<Value> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The messages of one job, in arrival order.
    pub fn for_job(&self, id: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|m| m["job_id"] == id)
            .collect()
    }

    /// The whole-job progress of `id`'s messages never goes down, whichever
    /// daemon (host, pool) published them.
    pub fn assert_progress_never_goes_back(&self, id: &str) {
        let messages = self.for_job(id);
        let mut high = 0.0;
        for m in &messages {
            let p = m["progress"].as_f64().expect("progress");
            assert!(
                p >= high,
                "progress went back from {high} to {p}: {messages:#?}"
            );
            high = p;
        }
    }

    /// Waits until a message of `id` has `status`; returns it.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("a progress message of {id} with status {status}"),
            || self.for_job(id).into_iter().find(|m| m["status"] == status),
        )
    }
}

impl Harness {
    /// A progress subscriber on `P:progress:*`, subscribed on return.
    pub fn subscribe(&self) -> ProgressSub {
        ProgressSub::start(&self.redis, &format!("{}:progress:*", self.prefix))
    }
}
