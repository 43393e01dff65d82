//! Property tests over every parser of outside input that the library's
//! public and hidden modules expose: the command line's values (through
//! clap, as the binary parses them), `Config::from_toml` on any text and
//! on mutated valid configs, and the query strings and bodies of the
//! dashboard and the gateway (the real binary, a bounded number of
//! requests). Whatever the input: no panic, and a refusal names the input.
//! The private parsers have their proptests next to them (`time`,
//! `config::jobs::parse_rate`, `config::timing`, `pipeline::exec`), and job
//! envelopes are in `fuzz_job.rs`.

mod common;

use clap::Parser;
use conveyor::Config;
use conveyor::cli::Cli;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// Text a user could type: any printable text, multi-byte characters
/// included, and near-valid durations and times.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,30}",
        "[0-9]{0,22} ?[a-zµ€ ]{0,8}",
        "[0-9]{1,5}-[0-9]{1,2}-[0-9]{1,2}[T ][0-9:.]{0,15}(Z|z|[+-][0-9:€]{0,6})?",
        "-[0-9a-z]{0,10}",
    ]
}

/// Parses `conveyor ARGS` as the binary does; on a refusal, checks that the
/// message names the flag and the value.
fn check_flag(args: &[&str], flag: &str, value: &str) -> Result<(), TestCaseError> {
    let mut argv = vec!["conveyor".to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    // `--flag=value`: a value starting with '-' stays this flag's value.
    argv.push(format!("{flag}={value}"));
    if let Err(e) = Cli::try_parse_from(&argv) {
        let text = e.to_string();
        prop_assert_eq!(e.exit_code(), 2, "{}", text);
        prop_assert!(text.contains(flag), "{:?}: {}", argv, text);
        if !value.is_empty() {
            prop_assert!(text.contains(value), "{:?}: {}", argv, text);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// `--delay`, `--at`, `--since`, `--older-than`, `--limit`, `--page`:
    /// a value or exit 2 naming the flag and the value.
    #[test]
    fn cli_values_never_panic(v in value()) {
        check_flag(&["enqueue", "t"], "--delay", &v)?;
        check_flag(&["enqueue", "t"], "--at", &v)?;
        check_flag(&["jobs"], "--since", &v)?;
        check_flag(&["cleanup"], "--older-than", &v)?;
        check_flag(&["jobs"], "--limit", &v)?;
        check_flag(&["jobs"], "--page", &v)?;
        check_flag(&["dead", "list"], "--limit", &v)?;
    }

    /// Any text as a config: a config or an error, never a panic.
    #[test]
    fn config_from_any_text(text in "\\PC{0,200}") {
        if let Err(e) = Config::from_toml(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// The shipped config with a few characters replaced, cut or repeated:
    /// a config or an error that says what is wrong, never a panic.
    #[test]
    fn config_from_mutated_valid_configs(
        edits in prop::collection::vec((any::<prop::sample::Index>(), "\\PC{0,6}"), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut text = mutated(SHIPPED, &edits);
        if cut.index(4) == 0 {
            let mut end = cut.index(text.len() + 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        if let Err(e) = Config::from_toml(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// A valid config's values replaced by arbitrary TOML values of other
    /// types and ranges: refused with the key named, or accepted.
    #[test]
    fn config_values_of_any_kind(
        key in prop::sample::select(KEYS),
        raw in prop_oneof![
            "-?[0-9]{1,25}",
            "\"\\PC{0,20}\"".prop_map(|s| s.replace('\\', "/")),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            "-?[0-9]{1,3}\\.[0-9]{1,3}(e[0-9]{1,3})?",
        ],
    ) {
        let (section, name) = key.split_once('.').unwrap();
        let text = format!("[{section}]\n{name} = {raw}\n\n{JOBS}");
        if let Err(e) = Config::from_toml(&text) {
            prop_assert!(!e.to_string().is_empty(), "{}", text);
        }
    }
}

/// A valid job envelope, as a producer pushes it (mid-run, with results).
const ENVELOPE: &[u8] = br#"{"id":"j-1","type":"t","payload":{"n":1,"s":"\u20ac"},"queue":"q","max_attempts":3,"timeout_secs":5,"_conveyor":{"attempt":1,"results":{"a":{"x":1}},"epoch":7}}"#;

const SHIPPED: &str = include_str!("../config/conveyor.toml");

const JOBS: &str = r#"[jobs.t]
stages = [{ name = "a", builtin = "noop" }]
rate = "10/1s"
"#;

/// Keys whose values get arbitrary replacements.
const KEYS: &[&str] = &[
    "worker.concurrency",
    "worker.queues",
    "worker.heartbeat_secs",
    "worker.dead_after_secs",
    "worker.fetch_block_ms",
    "worker.max_job_bytes",
    "worker.shutdown_grace_secs",
    "retry.max_attempts",
    "retry.backoff_ms",
    "retry.backoff_max_ms",
    "redis.url",
    "redis.prefix",
    "redis.mode",
    "gateway.lease_secs",
    "gateway.tokens",
];

fn mutated(text: &str, edits: &[(prop::sample::Index, String)]) -> String {
    let mut text = text.to_owned();
    for (at, with) in edits {
        let mut i = at.index(text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        let mut end = (i + with.len().max(1)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        text.replace_range(i..end, with);
    }
    text
}

/// Text for a query string: what a browser would send, and what it would
/// not (bad percent escapes, repeated keys, huge numbers).
fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("limit"),
        Just("page"),
        Just("status"),
        Just("type"),
        Just("queue"),
        Just("q"),
        Just("ids"),
        Just("all"),
        Just("x"),
    ];
    let val = prop_oneof![
        "[A-Za-z0-9%+._~,-]{0,24}",
        "-?[0-9]{1,25}",
        Just("%".to_owned()),
        Just("%E2%82%AC%FF%00".to_owned()),
    ];
    prop_oneof![
        prop::collection::vec((key, val), 0..5).prop_map(|kv| kv
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")),
        "[A-Za-z0-9%=&+._~,;-]{0,40}",
    ]
}

/// A path segment made of anything, percent-encoded where needed.
fn segment() -> impl Strategy<Value = String> {
    "\\PC{1,20}".prop_map(|s| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    })
}

/// The status of a server's answer; fails the case when it did not answer
/// (a reset connection is what a handler panic looks like) or answered 500.
fn answered(r: Option<common::HttpResponse>, what: &str) -> Result<u16, TestCaseError> {
    let r = r.ok_or_else(|| TestCaseError::fail(format!("{what}: no answer")))?;
    prop_assert!(r.code != 500, "{}: {} {}", what, r.code, r.body);
    Ok(r.code)
}

const TOKEN: &str = "fuzz-token-0123456789";

/// The dashboard (with actions on, so POSTs reach their parsers) under
/// arbitrary query strings, ids and bodies: 200 or a 4xx, never a 500 or a
/// reset connection; the server still answers afterwards.
#[test]
fn dashboard_query_strings_and_bodies() {
    let h = common::Harness::new(JOBS);
    let dash = h.dashboard(Some(TOKEN));
    let auth = format!("Bearer {TOKEN}");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&(query(), segment(), "\\PC{0,60}"), |(q, id, body)| {
            for path in ["/api/jobs", "/api/dead", "/api/queues", "/api/live"] {
                let url = format!("{path}?{q}");
                let code = answered(common::http(dash.port, "GET", &url, &[], None), &url)?;
                prop_assert!([200, 400, 404].contains(&code), "{}: {}", url, code);
            }
            let url = format!("/api/jobs/{id}");
            let code = answered(common::http(dash.port, "GET", &url, &[], None), &url)?;
            prop_assert!([200, 400, 404].contains(&code), "{}: {}", url, code);
            let headers = [("Authorization", auth.as_str())];
            for path in [
                format!("/api/jobs/{id}/cancel"),
                format!("/api/jobs/{id}/retry"),
                format!("/api/dead/retry?{q}"),
                format!("/api/dead/purge?{q}"),
            ] {
                let r = common::http(dash.port, "POST", &path, &headers, Some(&body));
                let code = answered(r, &path)?;
                prop_assert!((200..500).contains(&code), "{}: {}", path, code);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", dash.log()));
    assert_eq!(dash.get("/api/queues").code, 200);
}

/// The gateway under arbitrary bodies and ids, authorized and not: a 2xx
/// or 4xx with a JSON error, never a 500 or a reset connection.
#[test]
fn gateway_bodies_and_ids() {
    let h = common::Harness::new(&format!(
        "[gateway]\ntokens = {{ workers = \"{TOKEN}\" }}\n\n[jobs.\"r\"]\nremote = true\nqueue = \"remote\"\nstages = [{{ name = \"s\" }}]\n"
    ));
    let api = h.gateway();
    let json_value = prop_oneof![
        "\\PC{0,20}".prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ];
    let body = prop_oneof![
        "\\PC{0,60}",
        (
            prop::sample::select(
                &[
                    "worker_id",
                    "types",
                    "wait_secs",
                    "lease",
                    "result",
                    "error",
                    "progress",
                    "message",
                    "retry"
                ][..]
            ),
            json_value.clone(),
            prop::sample::select(&["worker_id", "lease", "x"][..]),
            json_value,
        )
            .prop_map(|(k1, v1, k2, v2)| {
                let mut o = serde_json::Map::new();
                o.insert(k1.to_owned(), v1);
                o.insert(k2.to_owned(), v2);
                // Long polls are the claim's job, not this test's.
                o.insert("wait_secs".into(), serde_json::json!(0));
                serde_json::Value::Object(o).to_string()
            }),
    ];
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let auth = format!("Bearer {TOKEN}");
    runner
        .run(
            &(body, segment(), any::<bool>()),
            |(body, id, authorized)| {
                let headers: Vec<(&str, &str)> = if authorized {
                    vec![("Authorization", auth.as_str())]
                } else {
                    vec![]
                };
                for path in [
                    "/api/v1/claim".to_owned(),
                    format!("/api/v1/jobs/{id}/heartbeat"),
                    format!("/api/v1/jobs/{id}/progress"),
                    format!("/api/v1/jobs/{id}/complete"),
                    format!("/api/v1/jobs/{id}/fail"),
                    format!("/api/v1/jobs/{id}/release"),
                ] {
                    let r = common::http(api.port, "POST", &path, &headers, Some(&body));
                    let r = r.ok_or_else(|| TestCaseError::fail(format!("{path}: no answer")))?;
                    prop_assert!(
                        (200..500).contains(&r.code),
                        "{}: {} {}",
                        path,
                        r.code,
                        r.body
                    );
                    if r.code >= 400 {
                        let v: serde_json::Value = serde_json::from_str(&r.body)
                            .map_err(|e| TestCaseError::fail(format!("{path}: {e}: {}", r.body)))?;
                        prop_assert!(v.is_object(), "{}: {}", path, r.body);
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", api.log()));
    assert_eq!(api.get("/api/v1/openapi.json").code, 200);
}

/// The texts the config properties start from are valid, so the mutations
/// are what gets refused.
#[test]
fn the_unmutated_configs_are_valid() {
    Config::from_toml(SHIPPED).expect("config/conveyor.toml");
    Config::from_toml(JOBS).expect("JOBS");
    conveyor::job::Job::parse(ENVELOPE, 64 * 1024).expect("ENVELOPE");
    for key in KEYS {
        let (section, name) = key.split_once('.').unwrap();
        let bad = format!("[{section}]\n{name} = {{ nested = [[]] }}\n\n{JOBS}");
        let e = Config::from_toml(&bad).expect_err(key).to_string();
        assert!(e.contains(name), "{key}: {e}");
    }
}

/// `--id` and `--payload` through the real binary (their checks run after
/// clap): exit 0 (enqueued) or 2 with the flag and the value named.
#[test]
fn cli_ids_and_payloads_through_the_binary() {
    let h = common::Harness::new(JOBS);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    let payload = prop_oneof![
        "\\PC{0,40}",
        Just("{\"a\": [1, 2, {\"b\": null}]}".to_owned()),
        "[\\[{]{1,4}[0-9a-z\":,€ ]{0,20}",
    ];
    let id = prop_oneof![
        "\\PC{0,30}",
        "[A-Za-z0-9._:-]{1,20}",
        " ?[a-z]{0,3}[\\t\\n ]?[a-z]{0,3}"
    ];
    runner
        .run(&(id, payload), |(id, payload)| {
            let args = [
                "enqueue",
                "t",
                &format!("--id={id}"),
                &format!("--payload={payload}"),
            ];
            let o = h.cli(&args, &[]);
            let err = String::from_utf8_lossy(&o.stderr);
            match o.status.code() {
                Some(0) => {}
                Some(2) => {
                    let named = (err.contains("--id") && err.contains(&format!("`{id}`")))
                        || (err.contains("--payload") && err.contains(&format!("`{payload}`")));
                    prop_assert!(named, "{:?}: {}", args, err);
                }
                other => prop_assert!(false, "{:?}: exit {:?}: {}", args, other, err),
            }
            Ok(())
        })
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// A valid job envelope with bytes replaced, removed or cut (UTF-8
    /// broken included): a job or a refusal with a reason, never a panic.
    /// (`fuzz_job.rs` covers arbitrary bytes and arbitrary JSON.)
    #[test]
    fn job_envelopes_near_valid(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let mut raw = ENVELOPE.to_vec();
        for (at, byte, remove) in edits {
            let i = at.index(raw.len());
            if remove {
                raw.remove(i);
            } else {
                raw[i] = byte;
            }
        }
        if let Err(poison) = conveyor::job::Job::parse(&raw, 64 * 1024) {
            prop_assert!(!poison.reason.is_empty());
        }
    }
}
