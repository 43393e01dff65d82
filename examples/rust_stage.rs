//! A Rust stage in a conveyor worker, end to end in one process.
//!
//! Registers two in-process stages, `wordcount` (counts the words of
//! `payload.text`, reporting progress line by line) and `top_words` (reads
//! wordcount's result and keeps the most frequent words), runs a worker
//! with them, enqueues one job with the [`Client`], prints its progress
//! messages until it ends, prints its result from SQLite and shuts the
//! worker down.
//!
//! ```sh
//! cargo run --example rust_stage                          # Redis at $CONVEYOR_REDIS_URL or 127.0.0.1:6379
//! cargo run --example rust_stage -- --redis-url redis://127.0.0.1:6380
//! ```
//!
//! Keys go under the prefix `conveyor-example` (`--prefix`); the SQLite file
//! is in a temporary directory, removed at the end. `RUST_LOG=conveyor=info`
//! shows the worker's logs.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use conveyor::{
    BoxFuture, Client, Config, EnqueueRequest, ProgressEvent, Stage, StageContext, StageError,
    Status, Worker,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Runs one job through Rust stages registered with a conveyor worker")]
struct Args {
    /// Redis URL
    #[arg(
        long,
        env = "CONVEYOR_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    redis_url: String,
    /// Prefix of every Redis key
    #[arg(long, default_value = "conveyor-example")]
    prefix: String,
    /// Longest wait for the job, in seconds
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// Counts words: in all and per word. Reports progress after each line.
struct WordCount;

impl Stage for WordCount {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let Some(text) = ctx.payload["text"].as_str() else {
                // Running it again would not help: fail without retries.
                return Err(StageError::permanent("payload.text must be a string"));
            };
            let lines: Vec<&str> = text.lines().collect();
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for (i, line) in lines.iter().enumerate() {
                // Stop soon when asked (shutdown, timeout, cancellation): the
                // job is put back and this stage runs again later.
                if ctx.cancel.is_cancelled() {
                    return Err(StageError::interrupted());
                }
                for word in line.split_whitespace() {
                    let word = word
                        .trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase();
                    if !word.is_empty() {
                        *counts.entry(word).or_default() += 1;
                    }
                }
                let done = (i + 1) as f64 * 100.0 / lines.len() as f64;
                ctx.progress(done, Some(format!("line {} of {}", i + 1, lines.len())));
                // Something slow would happen here; yield to show progress.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let total: u64 = counts.values().sum();
            Ok(json!({ "lines": lines.len(), "words": total, "counts": counts }))
        })
    }
}

/// The `n` most frequent words, from wordcount's result.
struct TopWords {
    n: usize,
}

impl Stage for TopWords {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let counts = ctx
                .results
                .get("wordcount")
                .and_then(|r| r["counts"].as_object())
                .ok_or_else(|| StageError::permanent("no wordcount result"))?;
            let mut ranked: Vec<(&String, u64)> = counts
                .iter()
                .map(|(w, n)| (w, n.as_u64().unwrap_or(0)))
                .collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let top: Vec<Value> = ranked
                .into_iter()
                .take(self.n)
                .map(|(w, n)| json!({ "word": w, "count": n }))
                .collect();
            Ok(Value::Array(top))
        })
    }
}

const TEXT: &str = "the quick brown fox\njumps over the lazy dog\nthe dog sleeps\nand the fox runs";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The worker's logs only when asked for, e.g. RUST_LOG=conveyor=info.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rust_stage: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether the job completed.
async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("conveyor.db");
    // `builtin` names the Rust stages registered below as well as the
    // built-ins. A worker id of its own: two live daemons may not share one.
    let toml = format!(
        r#"
        [redis]
        url = {url}
        prefix = {prefix}

        [worker]
        id = "rust-stage-example-{pid}"
        concurrency = 2
        shutdown_grace_secs = 5

        [store]
        path = {db}

        [jobs."text.stats"]
        stages = [
          {{ name = "wordcount", builtin = "wordcount", weight = 3 }},
          {{ name = "top_words", builtin = "top_words" }},
        ]
        "#,
        url = toml_string(&args.redis_url),
        prefix = toml_string(&args.prefix),
        pid = std::process::id(),
        db = toml_string(&db.to_string_lossy()),
    );
    let config = Config::from_toml(&toml)?;

    let worker = Worker::builder(config.clone())
        .stage("wordcount", WordCount)
        .stage("top_words", TopWords { n: 3 })
        .build()?;
    let client = Client::from_config(&config).await?;

    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(worker.run(shutdown.clone()));

    // Progress messages are published on a channel per job: subscribe
    // before enqueueing, so none is missed.
    let id = format!("text-stats-{}", uuid::Uuid::now_v7());
    let mut pubsub = client.broker().pubsub().await?;
    pubsub
        .subscribe(client.broker().keys().progress(&id))
        .await?;
    let job = client
        .enqueue(
            EnqueueRequest::new("text.stats")
                .id(&id)
                .payload(json!({ "text": TEXT })),
        )
        .await?;
    println!("enqueued {} on queue {}", job.id, job.queue);

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut messages = pubsub.on_message();
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let info = loop {
        tokio::select! {
            Some(msg) = messages.next() => {
                let body: Vec<u8> = msg.get_payload().unwrap_or_default();
                if let Ok(ev) = serde_json::from_slice::<ProgressEvent>(&body) {
                    println!(
                        "  {:<9} {:>5.1}%  {:<16} {}",
                        ev.status.as_str(),
                        ev.progress,
                        ev.stage.as_deref().unwrap_or("-"),
                        ev.message.as_deref().unwrap_or(&ev.event),
                    );
                }
            }
            // Pub/sub is at-most-once: the job's end is read from SQLite.
            _ = poll.tick() => {
                if daemon.is_finished() {
                    // Only a failed start ends the worker before the shutdown.
                    daemon.await??;
                    return Err("the worker stopped early".into());
                }
                match client.job(&job.id).await? {
                    Some(info) if info.is_final() => break Some(info),
                    _ if Instant::now() >= deadline => break None,
                    _ => {}
                }
            }
        }
    };
    drop(messages);

    shutdown.cancel();
    daemon.await??;

    let Some(info) = info else {
        eprintln!(
            "rust_stage: job {} did not finish within {}s",
            job.id, args.timeout_secs
        );
        return Ok(false);
    };
    println!("job {} {}", info.id, info.status.as_str());
    for stage in ["wordcount", "top_words"] {
        if let Some(result) = info.result(stage) {
            println!("{stage}: {result}");
        }
    }
    if let Some(error) = info.record.as_ref().and_then(|r| r.error.as_deref()) {
        eprintln!("rust_stage: {error}");
    }
    Ok(info.status == Status::Completed)
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}
