//! A job: its state ([`Status`]), and its envelope: parsing untrusted
//! messages, and the JSON a daemon writes back when it requeues or
//! dead-letters a job.
//!
//! A job is a JSON object `{"id", "type", "payload", "max_attempts",
//! "timeout_secs", ...}`. Unknown fields are kept. The daemon's own
//! bookkeeping (attempt, finished stages' results, last error) travels in one
//! reserved field, `_conveyor`, so it never clashes with a producer's fields.

mod parse;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use parse::{Poison, SizeLimits, poison_entry};

/// A job's state, as published and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Scheduled,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
    /// Stage pools: this host's last word on a job it handed over to the
    /// pool of its next stage (SQLite only: never published, never in
    /// Redis). The job goes on elsewhere; its record in Redis says where.
    #[serde(rename = "handed_over")]
    HandedOver,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::HandedOver => "handed_over",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }

    /// No further change is expected without an operator.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// Nothing more happens to the job on this host's SQLite row unless
    /// the job comes back: final, or handed over to another pool.
    /// `conveyor cleanup` deletes such rows once old enough.
    pub fn is_done_here(self) -> bool {
        self.is_final() || self == Status::HandedOver
    }
}

/// Name of the reserved field holding [`Meta`].
pub const META_FIELD: &str = "_conveyor";
/// Longest accepted job id.
pub const MAX_ID_LEN: usize = 256;

/// The daemon's bookkeeping inside a job (`_conveyor`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Meta {
    /// 1-based number of the attempt this delivery belongs to (0 = never run).
    #[serde(skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// Results of finished stages, by stage name: the checkpoint a requeued
    /// job resumes from.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub results: Map<String, Value>,
    /// How many times the job was put back unfinished (shutdown, recovery).
    #[serde(skip_serializing_if = "is_zero")]
    pub requeues: u32,
    /// How many times the job was revived from the dead list (`conveyor
    /// retry`). A delivery of a job that SQLite knows as finished is a
    /// duplicate unless it comes from a later revival.
    #[serde(skip_serializing_if = "is_zero")]
    pub epoch: u32,
    /// Why the job is in the dead list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// `None` when the producer did not set one; the daemon assigns one.
    pub id: Option<String>,
    pub kind: String,
    pub payload: Value,
    pub max_attempts: Option<u32>,
    pub timeout_secs: Option<u64>,
    /// Overrides of the job type's retry delays.
    pub backoff_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub meta: Meta,
    /// Producer fields conveyor does not know, kept as they were.
    pub extra: Map<String, Value>,
}

impl Job {
    pub fn new(id: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        Self {
            id: Some(id.into()),
            kind: kind.into(),
            payload,
            max_attempts: None,
            timeout_secs: None,
            backoff_ms: None,
            backoff_max_ms: None,
            meta: Meta::default(),
            extra: Map::new(),
        }
    }

    /// The id; only valid once the daemon assigned one to an id-less job.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }

    pub fn to_object(&self) -> Map<String, Value> {
        let mut o = self.extra.clone();
        if let Some(id) = &self.id {
            o.insert("id".into(), Value::String(id.clone()));
        }
        o.insert("type".into(), Value::String(self.kind.clone()));
        o.insert("payload".into(), self.payload.clone());
        if let Some(n) = self.max_attempts {
            o.insert("max_attempts".into(), n.into());
        }
        if let Some(n) = self.timeout_secs {
            o.insert("timeout_secs".into(), n.into());
        }
        if let Some(n) = self.backoff_ms {
            o.insert("backoff_ms".into(), n.into());
        }
        if let Some(n) = self.backoff_max_ms {
            o.insert("backoff_max_ms".into(), n.into());
        }
        if self.meta != Meta::default() {
            let meta = serde_json::to_value(&self.meta).unwrap_or(Value::Null);
            o.insert(META_FIELD.into(), meta);
        }
        o
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.to_object()).to_string()
    }
}

/// Ids end up in channel names, log lines and terminals: keep them printable.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("must be at most {MAX_ID_LEN} bytes"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(())
}
