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

// ------------------------------------------------------------ ceiling

/// One run of the ceiling.
pub struct CeilingRun {
    pub jobs_per_sec: f64,
    pub redis_cpu_us_per_job: Option<f64>,
    /// The consumers' side: this process.
    pub bench_cpu_us_per_job: Option<f64>,
}

/// A minimal Rust loop doing only what a safe fetch needs per job, on the
/// daemon's kind of connection: `concurrency` tasks share one multiplexed
/// [`redis::aio::ConnectionManager`], each moving a job from pending to an
/// active list (`LMOVE`, non-blocking; done on nil) and removing it (`LREM`).
/// The jobs are pushed before the clock starts.
pub async fn ceiling(env: &Env, jobs: u64, concurrency: usize) -> Result<CeilingRun> {
    let space = env.run_space("ceiling")?;
    let broker = Broker::connect(&env.url, &space.prefix).await?;
    let pending = broker.keys().pending(QUEUE);
    let active = broker.keys().active(QUEUE, "bench");
    push_jobs(env.connection().await?, pending.clone(), "noop1", 0..jobs).await?;

    let mut ctl = env.connection().await?;
    let cpu0 = redis_cpu_secs(&mut ctl).await.ok();
    let bench0 = cpu_secs("/proc/self/stat");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut conn = broker.conn();
        let (src, dst) = (pending.clone(), active.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                let job: Option<Vec<u8>> = redis::cmd("LMOVE")
                    .arg(&src)
                    .arg(&dst)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .query_async(&mut conn)
                    .await?;
                let Some(job) = job else {
                    return Ok::<u64, redis::RedisError>(done);
                };
                redis::cmd("LREM")
                    .arg(&dst)
                    .arg(1)
                    .arg(&job)
                    .query_async::<i64>(&mut conn)
                    .await?;
                done += 1;
            }
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        done += result.context("a ceiling task panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    let bench1 = cpu_secs("/proc/self/stat");
    let cpu1 = redis_cpu_secs(&mut ctl).await.ok();
    if done != jobs {
        bail!("ceiling: {done} of {jobs} jobs were taken");
    }
    env.clean(space).await?;
    Ok(CeilingRun {
        jobs_per_sec: jobs as f64 / secs,
        redis_cpu_us_per_job: per_job_us(cpu0, cpu1, jobs),
        bench_cpu_us_per_job: per_job_us(bench0, bench1, jobs),
    })
}

fn per_job_us(before: Option<f64>, after: Option<f64>, jobs: u64) -> Option<f64> {
    Some((after? - before?) * 1e6 / jobs as f64)
}

// ------------------------------------------------------------ throughput

/// `jobs` jobs of `job_type` through `daemons` daemons at `concurrency`.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub job_type: &'static str,
    pub jobs: u64,
    pub daemons: usize,
    pub concurrency: usize,
    /// What daemon i serves (`serves[i % len]`); empty: [`QUEUE`], default pool.
    pub serves: &'static [Serves],
}

impl Workload {
    /// The queue its jobs go through: the first daemon's.
    fn queue(&self) -> &'static str {
        self.serves.first().map_or(QUEUE, |s| s.queue)
    }

    /// The pool lists its daemons take from (empty without `--pools`).
    fn pool_lists(&self, keys: &Keys) -> Vec<String> {
        let mut names: Vec<&str> = self
            .serves
            .iter()
            .filter_map(|s| s.pools)
            .flat_map(|p| p.split(','))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|p| keys.pool(self.queue(), p))
            .collect()
    }
}

/// One run of a [`Workload`].
pub struct ThroughputRun {
    pub jobs_per_sec: f64,
    pub completed_in_sqlite: u64,
    pub round_trips_per_job: f64,
    pub events_dropped: u64,
    /// Highest VmHWM of the run's daemons, KiB.
    pub peak_rss_kib: u64,
    pub cpu_us_per_job: Cpu,
    /// Daemon-side calls by command (the bench's own removed).
    pub commands: BTreeMap<String, u64>,
    pub producer_commands: u64,
    /// Jobs handed over to a stage pool: the daemons' `LPUSH` calls
    /// (settle.lua's handover; the producer's LPUSHes are the bench's own,
    /// and nothing is dead-lettered or revived in a bench run).
    pub handovers: u64,
    /// Redis `used_memory` after the queues drained minus before the first
    /// push, per job: with the queues empty, what stays is the job records
    /// (and the daemons' registrations), so this is the cost of a retained
    /// record. `None` when INFO could not be read.
    pub redis_bytes_per_job: Option<f64>,
}

/// CPU microseconds per job.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub daemons: Option<f64>,
    pub redis: Option<f64>,
    pub bench: Option<f64>,
}

/// CPU seconds used so far by the daemons, Redis and the bench.
struct CpuSnapshot {
    daemons: Option<f64>,
    redis: Option<f64>,
    bench: Option<f64>,
}

impl CpuSnapshot {
    async fn take(ctl: &mut MultiplexedConnection, daemons: &[Daemon]) -> Self {
        Self {
            daemons: daemons.iter().map(Daemon::cpu_secs).sum(),
            redis: redis_cpu_secs(ctl).await.ok(),
            bench: cpu_secs("/proc/self/stat"),
        }
    }

    fn per_job(&self, after: &Self, jobs: u64) -> Cpu {
        Cpu {
            daemons: per_job_us(self.daemons, after.daemons, jobs),
            redis: per_job_us(self.redis, after.redis, jobs),
            bench: per_job_us(self.bench, after.bench, jobs),
        }
    }
}

/// The clock starts before the first push (pushing goes on while the
/// daemons work) and stops when pending and every active list are empty.
/// Then SQLite must hold every job as completed: a job leaves its active
/// list only after its commit.
pub async fn throughput(env: &Env, w: &Workload) -> Result<ThroughputRun> {
    let space = env.run_space(w.name)?;
    let mut daemons = start_daemons(env, &space, w.daemons, w.concurrency, w.serves).await?;
    let keys = Keys::new(&space.prefix);
    let queue = w.queue();
    let pending = keys.pending(queue);
    // Active lists, then pool lists: every place a job can wait or run.
    let mut lists: Vec<String> = daemons.iter().map(|d| keys.active(queue, &d.id)).collect();
    lists.extend(w.pool_lists(&keys));
    let mut ctl = env.connection().await?;
    let producer_conn = env.connection().await?;
    let calls_before = command_calls(&mut ctl).await?;
    let memory_before = redis_used_memory(&mut ctl).await.ok();
    let cpu_before = CpuSnapshot::take(&mut ctl, &daemons).await;

    let start = Instant::now();
    let producer = tokio::spawn(push_jobs(
        producer_conn,
        pending.clone(),
        w.job_type,
        0..w.jobs,
    ));
    let polls = wait_drained(&mut ctl, &mut daemons, &pending, &lists, Some(producer)).await?;
    let secs = start.elapsed().as_secs_f64();

    let cpu_after = CpuSnapshot::take(&mut ctl, &daemons).await;
    let calls_after = command_calls(&mut ctl).await?;
    let memory_after = redis_used_memory(&mut ctl).await.ok();
    let peak_rss_kib = daemons
        .iter()
        .filter_map(|d| d.memory())
        .map(|m| m.hwm_kib)
        .max()
        .unwrap_or(0);
    // Counted while the daemons still run: nothing is flushed by a shutdown.
    let completed = completed_in_sqlite(&space.db).await?;
    let shutdowns = stop_daemons(daemons).await?;
    if completed != w.jobs {
        bail!(
            "{}: the queues drained but SQLite holds {completed} of {} jobs as completed (acknowledged before commit?)",
            w.name,
            w.jobs
        );
    }
    let by_daemons: u64 = shutdowns.iter().map(|s| s.completed).sum();
    let round_trips: u64 = shutdowns.iter().map(|s| s.round_trips).sum();
    let bench_calls = [
        ("llen", polls * (1 + lists.len() as u64)),
        ("lpush", w.jobs),
    ];
    let commands = daemon_commands(&calls_before, &calls_after, &bench_calls);
    let handovers = commands.get("lpush").copied().unwrap_or(0);
    let redis_bytes_per_job = match (memory_before, memory_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / w.jobs as f64),
        _ => None,
    };
    env.clean(space).await?;
    Ok(ThroughputRun {
        jobs_per_sec: w.jobs as f64 / secs,
        completed_in_sqlite: completed,
        round_trips_per_job: round_trips as f64 / by_daemons.max(1) as f64,
        events_dropped: shutdowns.iter().map(|s| s.events_dropped).sum(),
        peak_rss_kib,
        cpu_us_per_job: cpu_before.per_job(&cpu_after, w.jobs),
        commands,
        producer_commands: w.jobs,
        handovers,
        redis_bytes_per_job,
    })
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

// ------------------------------------------------------------ latency

/// Percentiles of one latency measurement, ms.
#[derive(Debug, Clone, Copy)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&ms, 0.50),
            p99: percentile(&ms, 0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// One rate of one latency run.
pub struct LatencyRun {
    pub rate: u32,
    pub pushed: u64,
    pub missed_started: u64,
    pub missed_completed: u64,
    pub to_start: Quantiles,
    pub to_done: Quantiles,
    /// Daemon-side calls by command while this rate ran.
    pub commands: BTreeMap<String, u64>,
}

/// One idle daemon at concurrency 64; for each rate, a producer pushes one
/// job per tick of a fixed-rate interval for `secs`, recording when it
/// pushed each job; a subscriber records when `job_started` and
/// `job_completed` arrive.
pub async fn latency(env: &Env, rates: &[u32], secs: u64) -> Result<Vec<LatencyRun>> {
    let space = env.run_space("latency")?;
    let mut daemons = start_daemons(env, &space, 1, 64, &[]).await?;
    let keys = Keys::new(&space.prefix);
    let pending = keys.pending(QUEUE);
    let subscriber = Subscriber::start(env.url.clone(), keys.progress_pattern()).await?;
    let mut ctl = env.connection().await?;
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut ctl)
        .await?;
    if patterns < 1 {
        bail!("latency: the progress subscription is not registered");
    }
    // Idle: its fetch loop is blocked in BLMOVE.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut producer = env.connection().await?;
    let mut out = Vec::new();
    let mut total = 0;
    for &rate in rates {
        let calls_before = command_calls(&mut ctl).await?;
        let pushes = produce_at_rate(&mut producer, &pending, rate, secs).await?;
        total += pushes.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while subscriber.completed_of(&pushes) < pushes.len() && Instant::now() < deadline {
            daemons[0].check_alive()?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls_after = command_calls(&mut ctl).await?;
        let mut run = subscriber.measure(rate, &pushes);
        run.commands = daemon_commands(
            &calls_before,
            &calls_after,
            &[("lpush", pushes.len() as u64)],
        );
        out.push(run);
        // Idle again before the next rate.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    subscriber.stop()?;
    let completed = completed_in_sqlite(&space.db).await?;
    stop_daemons(daemons).await?;
    if completed != total {
        bail!("latency: SQLite holds {completed} of {total} pushed jobs as completed");
    }
    env.clean(space).await?;
    Ok(out)
}

/// Pushes one job per tick for `secs`; a late tick is skipped rather than
/// made up with a burst. Returns each job id with the instant it was pushed.
async fn produce_at_rate(
    conn: &mut MultiplexedConnection,
    pending: &str,
    rate: u32,
    secs: u64,
) -> Result<Vec<(String, Instant)>> {
    let period = Duration::from_nanos(1_000_000_000 / u64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut pushes = Vec::with_capacity((u64::from(rate) * secs) as usize);
    loop {
        tick.tick().await;
        let at = Instant::now();
        if at >= end {
            return Ok(pushes);
        }
        let id = format!("r{rate}-{}", pushes.len());
        redis::cmd("LPUSH")
            .arg(pending)
            .arg(job_body("noop1", &id))
            .query_async::<i64>(conn)
            .await
            .context("latency: push failed")?;
        pushes.push((id, at));
    }
}

/// When the first `job_started` / `job_completed` of each job arrived.
#[derive(Default)]
struct Seen {
    started: HashMap<String, Instant>,
    completed: HashMap<String, Instant>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct EventHead {
    job_id: String,
    event: String,
}

/// A progress subscriber on its own connection and its own thread, so that
/// the receive instant is taken as soon as the message is read.
struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Returns once the server confirmed the subscription.
    async fn start(url: String, pattern: String) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (sink, stopped) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || subscribe(&url, &pattern, sink, stopped, ready_tx))?;
        let mut subscriber = Self {
            seen,
            stop,
            thread: Some(thread),
        };
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(e))) => Err(anyhow!("latency: cannot subscribe: {e}")),
            _ => {
                subscriber.stop.store(true, Ordering::Relaxed);
                subscriber.thread.take();
                Err(anyhow!("latency: the subscriber did not start"))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn completed_of(&self, pushes: &[(String, Instant)]) -> usize {
        let seen = self.lock();
        pushes
            .iter()
            .filter(|(id, _)| seen.completed.contains_key(id))
            .count()
    }

    fn measure(&self, rate: u32, pushes: &[(String, Instant)]) -> LatencyRun {
        let seen = self.lock();
        let since = |map: &HashMap<String, Instant>| -> Vec<f64> {
            pushes
                .iter()
                .filter_map(|(id, at)| map.get(id).map(|t| t.duration_since(*at)))
                // Microsecond precision.
                .map(|d| d.as_micros() as f64 / 1000.0)
                .collect()
        };
        let (to_start, to_done) = (since(&seen.started), since(&seen.completed));
        LatencyRun {
            rate,
            pushed: pushes.len() as u64,
            missed_started: (pushes.len() - to_start.len()) as u64,
            missed_completed: (pushes.len() - to_done.len()) as u64,
            to_start: Quantiles::of(to_start),
            to_done: Quantiles::of(to_done),
            commands: BTreeMap::new(),
        }
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.lock().error.take() {
            Some(e) => Err(anyhow!("latency: subscriber failed: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The subscriber thread: reads messages until `stop` (checked every 100 ms).
fn subscribe(
    url: &str,
    pattern: &str,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let setup = || -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(url)?;
        client.get_connection_with_timeout(Duration::from_secs(5))
    };
    let mut conn = match setup() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let mut pubsub = conn.as_pubsub();
    // Returns once the server confirmed it.
    if let Err(e) = pubsub
        .psubscribe(pattern)
        .and_then(|()| pubsub.set_read_timeout(Some(Duration::from_millis(100))))
    {
        let _ = ready.send(Err(e.to_string()));
        return;
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match pubsub.get_message() {
            Ok(msg) => {
                let at = Instant::now();
                let Ok(head) = serde_json::from_slice::<EventHead>(msg.get_payload_bytes()) else {
                    continue;
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let map = match head.event.as_str() {
                    "job_started" => &mut seen.started,
                    "job_completed" => &mut seen.completed,
                    _ => continue,
                };
                map.entry(head.job_id).or_insert(at);
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => {
                if !stop.load(Ordering::Relaxed) {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e.to_string());
                }
                return;
            }
        }
    }
}

// ------------------------------------------------------------ memory

/// VmRSS of a daemon after each checkpoint.
pub struct GrowthRun {
    /// (jobs done, VmRSS KiB).
    pub samples: Vec<(u64, u64)>,
    pub peak_kib: u64,
    pub secs: f64,
}

/// One daemon at concurrency 64 runs `large` jobs, pushed in chunks while
/// it works (at most 20,000 waiting); its VmRSS is read each
/// time the queue is drained at a checkpoint (`small` first, `large` last).
pub async fn memory_growth(
    env: &Env,
    small: u64,
    large: u64,
    report: impl Fn(u64, u64),
) -> Result<GrowthRun> {
    let space = env.run_space("memory")?;
    let mut daemons = start_daemons(env, &space, 1, 64, &[]).await?;
    let keys = Keys::new(&space.prefix);
    let pending = keys.pending(QUEUE);
    let actives = [keys.active(QUEUE, &daemons[0].id)];
    let mut ctl = env.connection().await?;
    let producer = env.connection().await?;
    let mut checkpoints = vec![small, large / 10, large / 4, large / 2, large];
    checkpoints.retain(|&c| c >= small && c <= large);
    checkpoints.sort_unstable();
    checkpoints.dedup();

    let start = Instant::now();
    let mut pushed = 0;
    let mut samples = Vec::new();
    for checkpoint in checkpoints {
        while pushed < checkpoint {
            daemons[0].check_alive()?;
            let waiting: u64 = redis::cmd("LLEN")
                .arg(&pending)
                .query_async(&mut ctl)
                .await?;
            if waiting > MEMORY_BACKLOG {
                tokio::time::sleep(POLL).await;
                continue;
            }
            let end = (pushed + 10 * CHUNK).min(checkpoint);
            push_jobs(producer.clone(), pending.clone(), "noop1", pushed..end).await?;
            pushed = end;
        }
        wait_drained(&mut ctl, &mut daemons, &pending, &actives, None).await?;
        let rss = daemons[0]
            .memory()
            .ok_or_else(|| anyhow!("memory: cannot read /proc/<pid>/status"))?
            .rss_kib;
        report(checkpoint, rss);
        samples.push((checkpoint, rss));
    }
    let secs = start.elapsed().as_secs_f64();
    let peak_kib = daemons[0].memory().map(|m| m.hwm_kib).unwrap_or(0);
    let completed = completed_in_sqlite(&space.db).await?;
    stop_daemons(daemons).await?;
    if completed != large {
        bail!("memory: SQLite holds {completed} of {large} jobs as completed");
    }
    env.clean(space).await?;
    Ok(GrowthRun {
        samples,
        peak_kib,
        secs,
    })
}

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

    #[test]
    fn quantiles() {
        let q = Quantiles::of((1..=1000).rev().map(|v| v as f64 / 10.0).collect());
        assert_eq!((q.p50, q.p99, q.max), (50.0, 99.0, 100.0));
    }
}
