//! Property tests (fuzzing) of the job parser: whatever a producer pushes,
//! parsing never panics, every refusal has a reason and a valid dead-list
//! entry, and every accepted job survives the round trip through the JSON
//! the daemon writes back (requeue, retry, dead list).

use conveyor::job::Job;
use conveyor::job::poison_entry;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const LIMIT: usize = 64 * 1024;

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,10}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Checks the contract of a refusal: a reason, and a dead entry that is a
/// JSON object carrying it.
fn assert_poison_entry(raw: &[u8], result: Result<Job, conveyor::job::Poison>) {
    if let Err(poison) = result {
        assert!(!poison.reason.is_empty());
        let reason = poison.reason.clone();
        let entry = poison_entry(raw, poison, "w", "now");
        let v: Value = serde_json::from_str(&entry).expect("dead entry is JSON");
        assert_eq!(v["_conveyor"]["error"], Value::String(reason));
        assert!(
            v.get("raw").is_some()
                || v.get("raw_base64").is_some()
                || v.get("type").is_some()
                || v.get("id").is_some()
                || v.is_object()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..2048)) {
        let result = Job::parse(&raw, LIMIT);
        assert_poison_entry(&raw, result);
    }

    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        let raw = v.to_string().into_bytes();
        let result = Job::parse(&raw, LIMIT);
        if let Ok(job) = &result {
            // Accepted: the daemon's own rewrite parses back to the same job.
            let again = Job::parse(job.to_json().as_bytes(), LIMIT).expect("round trip");
            prop_assert_eq!(&again, job);
        }
        assert_poison_entry(&raw, result);
    }

    #[test]
    fn valid_jobs_round_trip(
        id in "[A-Za-z0-9._:-]{1,40}",
        kind in "[a-z][a-z0-9._]{0,20}",
        payload in any_json(),
        extra in prop::collection::btree_map("x_[a-z]{1,8}", any_json(), 0..4),
        attempt in 0u32..10,
        max_attempts in prop::option::of(1u32..100),
    ) {
        let mut o: Map<String, Value> = extra.into_iter().collect();
        o.insert("id".into(), json!(id));
        o.insert("type".into(), json!(kind));
        o.insert("payload".into(), payload.clone());
        if let Some(n) = max_attempts {
            o.insert("max_attempts".into(), json!(n));
        }
        if attempt > 0 {
            o.insert("_conveyor".into(), json!({"attempt": attempt}));
        }
        let raw = Value::Object(o.clone()).to_string();
        let job = Job::parse(raw.as_bytes(), LIMIT).expect("valid job");
        prop_assert_eq!(job.id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(&job.kind, &kind);
        prop_assert_eq!(&job.payload, &payload);
        prop_assert_eq!(job.meta.attempt, attempt);
        // Unknown fields are kept, and the rewrite is the same object.
        let back: Value = serde_json::from_str(&job.to_json()).unwrap();
        prop_assert_eq!(back, Value::Object(o));
    }

    #[test]
    fn numbers_survive_the_rewrite_exactly(
        f in any::<f64>().prop_filter("finite", |f| f.is_finite()),
        digits in "[1-9][0-9]{0,60}",
    ) {
        // Producers' numbers (floats, integers wider than 64 bits) come back
        // exactly as they were sent after a requeue or retry.
        let raw = format!(r#"{{"id":"n","type":"t","payload":{{"f":{f:e},"big":{digits},"neg":-{digits}}}}}"#);
        let job = Job::parse(raw.as_bytes(), LIMIT).unwrap();
        let back = job.to_json();
        prop_assert!(back.contains(&format!("\"big\":{digits}")), "{}", back);
        prop_assert!(back.contains(&format!("\"neg\":-{digits}")), "{}", back);
        let again = Job::parse(back.as_bytes(), LIMIT).unwrap();
        prop_assert_eq!(again.payload["f"].as_f64(), Some(f));
    }

    #[test]
    fn oversize_is_refused_without_parsing(extra in 1usize..4096) {
        let raw = vec![b'{'; LIMIT + extra];
        let poison = Job::parse(&raw, LIMIT).unwrap_err();
        prop_assert!(poison.reason.contains("over the limit"));
    }

    #[test]
    fn deep_nesting_is_refused(depth in 129usize..5000) {
        let raw = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let poison = Job::parse(raw.as_bytes(), LIMIT).unwrap_err();
        prop_assert!(poison.reason.contains("invalid JSON"), "{}", poison.reason);
    }
}
