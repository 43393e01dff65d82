//! One function per measurement. Each takes a fresh key prefix and SQLite
//! file ([`Env::run_space`]), starts its daemons and waits until they are
//! ready before its clock starts, checks SQLite afterwards, stops its
//! daemons with SIGTERM, and deletes its keys.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::infra::{
    Daemon, Env, QUEUE, Serves, command_calls, completed_in_sqlite, cpu_secs, redis_cpu_secs,
    redis_used_memory, start_daemons, stop_daemons,
};
use super::report::percentile;
use crate::queue::{Broker, Keys};

/// Jobs per pipelined push.
const CHUNK: u64 = 1000;
/// How often the clock checks whether the queues are drained.
const POLL: Duration = Duration::from_millis(5);
/// A run whose queues do not move for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// Most jobs waiting in pending while the memory run pushes.
const MEMORY_BACKLOG: u64 = 20_000;

fn job_body(job_type: &str, id: &str) -> String {
    format!(r#"{{"id":"{id}","type":"{job_type}","payload":null}}"#)
}

/// Pushes jobs `j<n>` for each n of `ids`, as pipelines of [`CHUNK`] LPUSHes
/// (one LPUSH per job, what any producer does).
async fn push_jobs(
    mut conn: MultiplexedConnection,
    pending: String,
    job_type: &'static str,
    ids: Range<u64>,
) -> Result<()> {
    let mut next = ids.start;
    while next < ids.end {
        let end = (next + CHUNK).min(ids.end);
        let mut pipe = redis::pipe();
        for n in next..end {
            pipe.cmd("LPUSH")
                .arg(&pending)
                .arg(job_body(job_type, &format!("j{n}")))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .context("push failed")?;
        next = end;
    }
    Ok(())
}

fn per_job_us(before: Option<f64>, after: Option<f64>, jobs: u64) -> Option<f64> {
    Some((after? - before?) * 1e6 / jobs as f64)
}

/// Calls made between two `INFO commandstats`, without the bench's own
/// (`bench_calls`) and without INFO.
fn daemon_commands(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    bench_calls: &[(&str, u64)],
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, calls)| {
            let mut n = calls.saturating_sub(before.get(name).copied().unwrap_or(0));
            for (bench_name, bench_n) in bench_calls {
                if name == bench_name {
                    n = n.saturating_sub(*bench_n);
                }
            }
            (name.clone(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Polls every [`POLL`] until the producer (if any) is done and pending
/// and every list of `actives` (active and pool lists) are empty; returns
/// how many polls it made.
/// Fails when a daemon exits or nothing moves for [`STALL`].
async fn wait_drained(
    ctl: &mut MultiplexedConnection,
    daemons: &mut [Daemon],
    pending: &str,
    actives: &[String],
    mut producer: Option<JoinHandle<Result<()>>>,
) -> Result<u64> {
    let mut polls = 0u64;
    let mut last = (u64::MAX, Instant::now());
    loop {
        tokio::time::sleep(POLL).await;
        for d in daemons.iter_mut() {
            d.check_alive()?;
        }
        if let Some(done) = producer.take_if(|p| p.is_finished()) {
            done.await.context("the producer panicked")??;
        }
        if producer.is_some() {
            continue;
        }
        let mut pipe = redis::pipe();
        pipe.llen(pending);
        for a in actives {
            pipe.llen(a);
        }
        let lens: Vec<u64> = pipe.query_async(ctl).await?;
        polls += 1;
        let left: u64 = lens.iter().sum();
        if left == 0 {
            return Ok(polls);
        }
        if left != last.0 {
            last = (left, Instant::now());
        } else if last.1.elapsed() > STALL {
            bail!(
                "no progress for {} s: {} pending, {} active",
                STALL.as_secs(),
                lens[0],
                left - lens[0]
            );
        }
    }
}

mod ceiling;
mod latency;
mod memory;
mod throughput;

pub use ceiling::{CeilingRun, ceiling};
pub use latency::{LatencyRun, latency};
pub use memory::{GrowthRun, memory_growth};
pub use throughput::{ThroughputRun, Workload, throughput};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_calls_are_taken_out() {
        let before: BTreeMap<String, u64> = [
            ("llen".into(), 5),
            ("info".into(), 1),
            ("evalsha".into(), 10),
        ]
        .into();
        let after: BTreeMap<String, u64> = [
            ("llen".into(), 25),
            ("info".into(), 3),
            ("evalsha".into(), 30),
            ("lpush".into(), 7),
            ("publish".into(), 4),
        ]
        .into();
        let got = daemon_commands(&before, &after, &[("llen", 20), ("lpush", 7)]);
        assert_eq!(
            got,
            BTreeMap::from([("evalsha".into(), 20), ("publish".into(), 4)])
        );
    }
}
