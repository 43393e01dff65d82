//! Parsing untrusted messages into [`Job`]s within their [`SizeLimits`],
//! and the dead-list entry of a message that is not a job ([`Poison`]).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Job, META_FIELD, Meta, check_id};

/// A message that is not a valid job. It goes to the dead list with
/// [`Poison::reason`]; `object` keeps what could be parsed so the dead entry
/// is the original job plus the reason.
#[derive(Debug)]
pub struct Poison {
    pub reason: String,
    pub object: Option<Map<String, Value>>,
}

impl Poison {
    fn raw(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            object: None,
        }
    }
}

impl Job {
    /// Parses an untrusted message of at most `max_bytes`, with nothing
    /// carried beyond it: [`Job::parse_with`] with
    /// [`SizeLimits::producer_only`].
    pub fn parse(raw: &[u8], max_bytes: usize) -> Result<Self, Poison> {
        Self::parse_with(raw, SizeLimits::producer_only(max_bytes))
    }

    /// Parses an untrusted message. The whole message is checked against
    /// `limits.message` before any parsing, and against `limits.producer`
    /// when it has no `"_conveyor"` field; what the producer sent (the
    /// envelope without `_conveyor`) against `limits.producer` after it, so
    /// results a daemon carries in `_conveyor` never make a job poison.
    /// serde_json's recursion limit (128) bounds nesting.
    pub fn parse_with(raw: &[u8], limits: SizeLimits) -> Result<Self, Poison> {
        let limit = limits.message.max(limits.producer);
        if raw.len() > limit {
            return Err(over_the_limit(raw.len(), limit));
        }
        // Over the producer limit with nothing carried: refused unparsed,
        // as a producer's message always was.
        if raw.len() > limits.producer && !mentions_meta(raw) {
            return Err(over_the_limit(raw.len(), limits.producer));
        }
        let text = std::str::from_utf8(raw).map_err(|e| Poison::raw(format!("not UTF-8: {e}")))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| Poison::raw(format!("invalid JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(Poison::raw(format!(
                "a job must be a JSON object, got {}",
                json_kind(&value)
            )));
        };
        if raw.len() > limits.producer {
            let producer = producer_bytes(raw.len(), &object);
            if producer > limits.producer {
                return Err(over_the_limit(producer, limits.producer));
            }
        }
        Self::from_object(object)
    }

    fn from_object(mut o: Map<String, Value>) -> Result<Self, Poison> {
        macro_rules! bad {
            ($o:expr, $($msg:tt)*) => {
                return Err(Poison { reason: format!($($msg)*), object: Some($o) })
            };
        }
        let kind = match o.get("type") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => bad!(o, "`type` must not be empty"),
            Some(v) => bad!(o, "`type` must be a string, got {}", json_kind(v)),
            None => bad!(o, "missing `type`"),
        };
        let id = match o.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match check_id(s) {
                Ok(()) => Some(s.clone()),
                Err(e) => bad!(o, "`id` {e}"),
            },
            Some(v) => bad!(o, "`id` must be a string, got {}", json_kind(v)),
        };
        let max_attempts = match o.get("max_attempts") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=1000) => Some(n as u32),
                _ => bad!(o, "`max_attempts` must be an integer from 1 to 1000"),
            },
        };
        let timeout_secs = match o.get("timeout_secs") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(n),
                _ => bad!(o, "`timeout_secs` must be a positive integer"),
            },
        };
        let mut backoff = [None, None];
        for (slot, field) in backoff.iter_mut().zip(["backoff_ms", "backoff_max_ms"]) {
            *slot = match o.get(field) {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(n) => Some(n),
                    None => bad!(o, "`{field}` must be a non-negative integer"),
                },
            };
        }
        let meta = match o.get(META_FIELD) {
            None | Some(Value::Null) => Meta::default(),
            Some(v) => match Meta::deserialize(v) {
                Ok(m) => m,
                Err(e) => bad!(o, "`{META_FIELD}` is malformed: {e}"),
            },
        };
        for key in [
            "id",
            "type",
            "max_attempts",
            "timeout_secs",
            "backoff_ms",
            "backoff_max_ms",
            META_FIELD,
        ] {
            o.remove(key);
        }
        let payload = o.remove("payload").unwrap_or(Value::Null);
        Ok(Self {
            id,
            kind,
            payload,
            max_attempts,
            timeout_secs,
            backoff_ms: backoff[0],
            backoff_max_ms: backoff[1],
            meta,
            extra: o,
        })
    }
}

/// The size limits of a message a daemon takes from a queue.
///
/// A producer's job is bounded by `worker.max_job_bytes`. A message the
/// daemon wrote itself (a requeue at shutdown, a retry, a revived dead job)
/// also carries the results of finished stages in `_conveyor.results`,
/// each at most `worker.max_result_bytes`: that part has its own room, so
/// the whole message is bounded by
/// `max_job_bytes + stages × (max_result_bytes + STAGE_ROOM) + META_ROOM`,
/// where `stages` is the most stages of any job type served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// What the producer sent: the envelope without `_conveyor`.
    pub producer: usize,
    /// The whole message, `_conveyor` included.
    pub message: usize,
}

impl SizeLimits {
    /// Room per carried result beyond its own size: its stage name, quotes
    /// and separators.
    pub const STAGE_ROOM: usize = 1024;
    /// Room for the rest of `_conveyor`: counters, the error text (a stage's
    /// last stderr line, cut at 2 KiB, with its context), times, worker id.
    pub const META_ROOM: usize = 64 * 1024;

    /// Nothing carried: the whole message must fit `max_bytes`.
    pub fn producer_only(max_bytes: usize) -> Self {
        Self {
            producer: max_bytes,
            message: max_bytes,
        }
    }

    /// The limits of a daemon serving job types of at most `max_stages`
    /// stages.
    pub fn carrying(max_job_bytes: usize, max_result_bytes: usize, max_stages: usize) -> Self {
        let per_stage = max_result_bytes.saturating_add(Self::STAGE_ROOM);
        let carried = per_stage
            .saturating_mul(max_stages)
            .saturating_add(Self::META_ROOM);
        Self {
            producer: max_job_bytes,
            message: max_job_bytes.saturating_add(carried),
        }
    }
}

fn over_the_limit(bytes: usize, limit: usize) -> Poison {
    Poison::raw(format!(
        "message of {bytes} bytes is over the limit of {limit} bytes"
    ))
}

/// Whether `raw` may hold a `_conveyor` field: its quoted name appears
/// (the daemon writes it so; a name written with escapes only loses the
/// carried room).
fn mentions_meta(raw: &[u8]) -> bool {
    let needle = b"\"_conveyor\"";
    raw.windows(needle.len()).any(|w| w == needle)
}

/// The size of what the producer sent: the message without `_conveyor`.
/// A message without that field is all the producer's, byte for byte;
/// otherwise the rest is measured as the daemon writes it (compact JSON),
/// without building it.
fn producer_bytes(raw_len: usize, object: &Map<String, Value>) -> usize {
    if !object.contains_key(META_FIELD) {
        return raw_len;
    }
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(2); // the braces
    for (i, (key, value)) in object.iter().filter(|(k, _)| *k != META_FIELD).enumerate() {
        count.0 += usize::from(i > 0) + 1; // comma, colon
        // Writing to a counter cannot fail; a failure would only undercount
        // what the whole-message limit bounds anyway.
        let _ = serde_json::to_writer(&mut count, key);
        let _ = serde_json::to_writer(&mut count, value);
    }
    count.0
}

/// The dead-list entry for a message that could not be run as a job: the
/// original object with the reason in `_conveyor.error`, or, for a message
/// that is not a JSON object, the raw text (or base64 for non-UTF-8 bytes).
pub fn poison_entry(raw: &[u8], poison: Poison, worker_id: &str, now: &str) -> String {
    use base64::Engine as _;
    let mut object = match poison.object {
        Some(o) => o,
        None => {
            let mut o = Map::new();
            match std::str::from_utf8(raw) {
                Ok(text) => o.insert("raw".into(), Value::String(text.to_owned())),
                Err(_) => o.insert(
                    "raw_base64".into(),
                    base64::engine::general_purpose::STANDARD.encode(raw).into(),
                ),
            };
            o
        }
    };
    let mut meta = match object.get(META_FIELD).map(Meta::deserialize) {
        Some(Ok(m)) => m,
        _ => Meta::default(),
    };
    meta.error = Some(poison.reason);
    meta.failed_at = Some(now.to_owned());
    meta.worker_id = Some(worker_id.to_owned());
    object.insert(
        META_FIELD.into(),
        serde_json::to_value(&meta).unwrap_or(Value::Null),
    );
    Value::Object(object).to_string()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<Job, Poison> {
        Job::parse(s.as_bytes(), 1024)
    }

    #[test]
    fn minimal_job() {
        let j = parse(r#"{"type":"echo"}"#).unwrap();
        assert_eq!(j.kind, "echo");
        assert_eq!(j.id, None);
        assert_eq!(j.payload, Value::Null);
    }

    #[test]
    fn round_trip_keeps_unknown_fields_and_meta() {
        let src = json!({"id":"a","type":"t","payload":{"x":1},"max_attempts":2,"backoff_ms":5,
            "custom":[1,2],"_conveyor":{"attempt":2,"results":{"s1":{"ok":true}}}});
        let j = parse(&src.to_string()).unwrap();
        assert_eq!(j.meta.attempt, 2);
        assert_eq!(j.meta.results["s1"], json!({"ok":true}));
        let back: Value = serde_json::from_str(&j.to_json()).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn poison_reasons() {
        let cases = [
            ("{\"id\":", "invalid JSON"),
            ("[1]", "must be a JSON object, got an array"),
            ("{\"id\":\"x\"}", "missing `type`"),
            ("{\"type\":5}", "`type` must be a string"),
            ("{\"type\":\"t\",\"id\":7}", "`id` must be a string"),
            (
                "{\"type\":\"t\",\"id\":\"a b\"}",
                "`id` must not contain spaces",
            ),
            ("{\"type\":\"t\",\"max_attempts\":0}", "`max_attempts`"),
            ("{\"type\":\"t\",\"backoff_ms\":-1}", "`backoff_ms`"),
            (
                "{\"type\":\"t\",\"_conveyor\":{\"attempt\":\"x\"}}",
                "`_conveyor` is malformed",
            ),
        ];
        for (raw, want) in cases {
            let p = parse(raw).unwrap_err();
            assert!(p.reason.contains(want), "{raw}: {}", p.reason);
        }
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let big = format!("{{\"type\":\"t\",\"payload\":\"{}\"}}", "x".repeat(2000));
        let p = Job::parse(big.as_bytes(), 1024).unwrap_err();
        assert!(p.reason.contains("over the limit"), "{}", p.reason);
    }

    #[test]
    fn carried_results_have_their_own_limit() {
        let limits = SizeLimits::carrying(1024, 8192, 2);
        assert_eq!(
            limits.message,
            1024 + 2 * (8192 + SizeLimits::STAGE_ROOM) + SizeLimits::META_ROOM
        );
        // A requeued job: a small envelope carrying a result of 5000 bytes,
        // over max_job_bytes but within max_result_bytes.
        let big = "r".repeat(5000);
        let src = json!({"id":"a","type":"t","payload":{"x":1},
            "_conveyor":{"attempt":1,"requeues":1,"results":{"s1":{"blob":big}}}});
        let raw = src.to_string();
        assert!(raw.len() > 1024);
        let j = Job::parse_with(raw.as_bytes(), limits).unwrap();
        assert_eq!(j.meta.results["s1"]["blob"].as_str().unwrap().len(), 5000);
        assert_eq!(j.meta.requeues, 1);
        // The same message under the producer-only limit is poison, as before.
        let p = Job::parse(raw.as_bytes(), 1024).unwrap_err();
        assert_eq!(
            p.reason,
            format!(
                "message of {} bytes is over the limit of 1024 bytes",
                raw.len()
            )
        );
    }

    #[test]
    fn the_producer_part_keeps_the_producer_limit() {
        let limits = SizeLimits::carrying(1024, 8192, 2);
        // No `_conveyor`: measured byte for byte, the same reason as today.
        let raw = format!("{{\"type\":\"t\",\"payload\":\"{}\"}}", "x".repeat(2000));
        let p = Job::parse_with(raw.as_bytes(), limits).unwrap_err();
        assert_eq!(
            p.reason,
            format!(
                "message of {} bytes is over the limit of 1024 bytes",
                raw.len()
            )
        );
        assert!(p.object.is_none(), "refused unparsed, like before");
        // Even when it would not parse: the size is checked first.
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let p = Job::parse_with(deep.as_bytes(), limits).unwrap_err();
        assert_eq!(
            p.reason,
            "message of 10000 bytes is over the limit of 1024 bytes"
        );
        // A `_conveyor` does not lend its room to a payload over the limit.
        let src = json!({"type":"t","payload":"x".repeat(2000),
            "_conveyor":{"results":{"s1":1}}});
        let p = Job::parse_with(src.to_string().as_bytes(), limits).unwrap_err();
        let mut producer = src.as_object().unwrap().clone();
        producer.remove(META_FIELD);
        let producer_len = Value::Object(producer).to_string().len();
        assert_eq!(
            p.reason,
            format!("message of {producer_len} bytes is over the limit of 1024 bytes")
        );
        // The producer part exactly at the limit is accepted.
        let mut src =
            json!({"type":"t","payload":"", "_conveyor":{"results":{"s1":"y".repeat(3000)}}});
        let bare = json!({"type":"t","payload":""}).to_string().len();
        src["payload"] = Value::String("p".repeat(1024 - bare));
        let j = Job::parse_with(src.to_string().as_bytes(), limits).unwrap();
        assert_eq!(j.payload.as_str().unwrap().len(), 1024 - bare);
        // The whole message over its own limit is refused before parsing.
        let huge = json!({"type":"t","_conveyor":{"results":{"s1":"z".repeat(limits.message)}}});
        let raw = huge.to_string();
        let p = Job::parse_with(raw.as_bytes(), limits).unwrap_err();
        assert_eq!(
            p.reason,
            format!(
                "message of {} bytes is over the limit of {} bytes",
                raw.len(),
                limits.message
            )
        );
    }

    #[test]
    fn producer_bytes_match_the_compact_encoding() {
        let src = json!({"id":"a","type":"t","payload":{"k":[1,"é\"\n",null]},"x":true,
            "_conveyor":{"results":{"s":1}}});
        let object = src.as_object().unwrap().clone();
        let mut without = object.clone();
        without.remove(META_FIELD);
        assert_eq!(
            producer_bytes(0, &object),
            Value::Object(without).to_string().len()
        );
        let only_meta = json!({"_conveyor":{}});
        assert_eq!(producer_bytes(0, only_meta.as_object().unwrap()), 2);
    }

    #[test]
    fn deep_nesting_is_poison_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let p = Job::parse(deep.as_bytes(), 1 << 20).unwrap_err();
        assert!(p.reason.contains("invalid JSON"), "{}", p.reason);
    }

    #[test]
    fn poison_entries_keep_the_original() {
        let p = parse("{\"id\":\"p1\",\"type\":\"nope\"}").unwrap();
        let entry = poison_entry(
            b"{}",
            Poison {
                reason: "unknown job type `nope`".into(),
                object: Some(p.to_object()),
            },
            "w1",
            "now",
        );
        let v: Value = serde_json::from_str(&entry).unwrap();
        assert_eq!(v["id"], "p1");
        assert_eq!(v["_conveyor"]["error"], "unknown job type `nope`");

        let raw = b"\xff\xfe not utf8";
        let p = Job::parse(raw, 1024).unwrap_err();
        let v: Value = serde_json::from_str(&poison_entry(raw, p, "w1", "now")).unwrap();
        assert!(v["raw_base64"].is_string());
        assert!(v["_conveyor"]["error"].as_str().unwrap().contains("UTF-8"));

        let p = parse("{\"id\":").unwrap_err();
        let v: Value = serde_json::from_str(&poison_entry(b"{\"id\":", p, "w1", "now")).unwrap();
        assert_eq!(v["raw"], "{\"id\":");
    }
}
