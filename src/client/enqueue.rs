//! Enqueueing: a request, checked against the config and encoded without
//! Redis ([`prepare`]), then pushed by [`super::Client::send`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::{ClientError, check_name};
use crate::config::Config;
use crate::job::Job;
use crate::job::Status;
use crate::queue::When;

/// One job to enqueue: its type, then what the defaults do not cover.
///
/// ```
/// use std::time::{Duration, SystemTime};
///
/// use conveyor::EnqueueRequest;
///
/// #[derive(serde::Serialize)]
/// struct Report<'a> {
///     scope: &'a str,
/// }
///
/// let nightly = EnqueueRequest::new("report.daily")
///     .payload(Report { scope: "all" })
///     .id("report-2026-11-23")
///     .queue("reports")
///     .max_attempts(5)
///     .timeout_secs(600)
///     .at(SystemTime::now() + Duration::from_secs(3600));
/// # let _ = nightly;
/// ```
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    kind: String,
    /// The payload, or why it could not be encoded (reported by `enqueue`).
    payload: Result<Value, String>,
    queue: Option<String>,
    id: Option<String>,
    max_attempts: Option<u32>,
    timeout_secs: Option<u64>,
    due: Due,
}

#[derive(Debug, Clone, Copy)]
enum Due {
    Now,
    After(Duration),
    At(SystemTime),
}

impl EnqueueRequest {
    /// A job of type `kind` (a `[jobs."<kind>"]` of the daemons' config),
    /// with a `null` payload, a new UUIDv7 id, due now.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            payload: Ok(Value::Null),
            queue: None,
            id: None,
            max_attempts: None,
            timeout_secs: None,
            due: Due::Now,
        }
    }

    /// The payload: a [`serde_json::Value`] or anything [`Serialize`]. A
    /// value that cannot be encoded makes [`Client::enqueue`] fail.
    pub fn payload(mut self, payload: impl Serialize) -> Self {
        self.payload = serde_json::to_value(payload).map_err(|e| e.to_string());
        self
    }

    /// The queue [default: the job type's `queue` when the client has a
    /// config, else `default`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// The job's id [default: a new UUIDv7]. A live job with this id on the
    /// queue makes the request a duplicate.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Attempts before the job is dead-lettered [default: the job type's].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Deadline of one attempt, all stages together [default: the job type's].
    pub fn timeout_secs(mut self, secs: u64) -> Self {
        self.timeout_secs = Some(secs);
        self
    }

    /// Due this long from now, by Redis' clock (replaces any [`Self::at`]).
    /// The job waits in the scheduled set, status `scheduled`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.due = Due::After(delay);
        self
    }

    /// Due at this time (replaces any [`Self::delay`]).
    pub fn at(mut self, at: SystemTime) -> Self {
        self.due = Due::At(at);
        self
    }
}

/// The answer of [`Client::enqueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub id: String,
    pub queue: String,
    /// False: a job with this id is live on the queue; nothing was enqueued.
    pub added: bool,
    /// `Pending` or `Scheduled` (the new job, or the live one), or `Running`
    /// (the live one).
    pub status: Status,
    /// When a scheduled job is due.
    pub due: Option<SystemTime>,
}

/// A job checked against the config and encoded, ready to push.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub id: String,
    pub queue: String,
    pub kind: String,
    pub body: String,
    pub when: When,
}

/// Everything about an enqueue that needs no Redis: the type is known (when
/// the config has `[jobs]`), the queue is the type's unless given, the id is
/// valid (or a new UUIDv7), the job fits `worker.max_job_bytes`. A chosen
/// id gets a new epoch: it may be one that ran before, and this is then a
/// new story of the job in SQLite, not a duplicate of the finished one.
pub(crate) fn prepare(config: &Config, request: EnqueueRequest) -> Result<Prepared, ClientError> {
    let EnqueueRequest {
        kind,
        payload,
        queue,
        id,
        max_attempts,
        timeout_secs,
        due,
    } = request;
    let payload = payload.map_err(ClientError::Payload)?;
    let job_type = config.jobs.get(&kind);
    if job_type.is_none() && !config.jobs.is_empty() {
        let known: Vec<_> = config.jobs.keys().map(String::as_str).collect();
        return Err(ClientError::UnknownType {
            kind,
            known: known.join(", "),
        });
    }
    let queue = queue
        .or_else(|| job_type.map(|t| t.queue.clone()))
        .unwrap_or_else(|| "default".into());
    check_name(&queue).map_err(|message| ClientError::InvalidQueue {
        queue: queue.clone(),
        message,
    })?;
    let chosen_id = id.is_some();
    let id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    crate::job::check_id(&id).map_err(ClientError::InvalidId)?;
    let mut job = Job::new(id.clone(), kind.clone(), payload);
    if chosen_id {
        job.meta.epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
    }
    job.max_attempts = max_attempts;
    job.timeout_secs = timeout_secs;
    let body = job.to_json();
    let max = config.worker.max_job_bytes;
    if body.len() > max {
        return Err(ClientError::TooLarge {
            size: body.len(),
            max,
        });
    }
    let when = match due {
        Due::Now => When::Now,
        Due::After(d) if d.is_zero() => When::Now,
        Due::After(d) => When::After(d),
        Due::At(t) => When::At(unix_ms(t)?),
    };
    Ok(Prepared {
        id,
        queue,
        kind,
        body,
        when,
    })
}

fn unix_ms(t: SystemTime) -> Result<u64, ClientError> {
    let since = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ClientError::InvalidTime)?;
    u64::try_from(since.as_millis()).map_err(|_| ClientError::InvalidTime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::time_of_ms;

    #[test]
    fn requests_keep_the_last_due_time_and_report_bad_payloads() {
        let r = EnqueueRequest::new("t")
            .at(UNIX_EPOCH)
            .delay(Duration::from_secs(1));
        assert!(matches!(r.due, Due::After(d) if d == Duration::from_secs(1)));
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        assert!(EnqueueRequest::new("t").payload(Bad).payload.is_err());
        assert_eq!(
            EnqueueRequest::new("t").payload([1, 2]).payload,
            Ok(serde_json::json!([1, 2]))
        );
    }

    #[test]
    fn names_and_times_are_checked() {
        assert!(check_name("video.gen-1_a").is_ok());
        assert!(check_name("a{b}").is_err());
        assert!(check_name("").is_err());
        assert_eq!(unix_ms(time_of_ms(1234)).ok(), Some(1234));
        assert!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)).is_err());
    }
}
